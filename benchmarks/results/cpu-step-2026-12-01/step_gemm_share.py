# The same cases' GEMM time per step, torch.profiler, providers' profiled steps interleaved in
# one process (3 rounds x 2 steps each), plus the optimizer step's share: what every provider
# shares, hence the bound on llmcore's step ratio. argv: flavour, providers.
import sys, torch, collections
from torch.profiler import profile, ProfilerActivity
from llmcore.benchmarks.train_step import TrainStepBench
flav = sys.argv[1]; provs = sys.argv[2].split(",")
b = TrainStepBench()
shape = next(s for s in b.shapes("quick", "cpu") if s["variant"] == flav)
rs = {p: b.runner(p, shape, torch.float32, "cpu", "step", 1) for p in provs}
def step(r): r.pre(); r.call()
for p in provs:
    for _ in range(3): step(rs[p])
gemm = {p: 0.0 for p in provs}; opt = {p: 0.0 for p in provs}; tot = {p: 0.0 for p in provs}
for rnd in range(3):
    for p in provs:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2): step(rs[p])
        for e in prof.key_averages():
            if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"):
                gemm[p] += e.self_cpu_time_total / 6 / 1000
            if e.key.startswith("Optimizer.step"):
                opt[p] += e.cpu_time_total / 6 / 1000
for p in provs:
    print(f"{flav:12s} {p:14s} GEMMs {gemm[p]:6.1f} ms/step  optimizer step {opt[p]:5.1f} ms/step")
