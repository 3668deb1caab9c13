# The quick train-step benchmark's cases (llmcore.benchmarks.train_step, CPU "quick" sizes,
# torch.optim.AdamW default settings for every provider) with the providers' steps interleaved
# in ONE process, so the VM's drift between processes (10-30%) does not enter the ratios.
# argv: flavour, comma-separated providers (the first is the base), steps per provider.
import sys, time, statistics, torch
from llmcore.benchmarks.train_step import TrainStepBench
flav = sys.argv[1]; provs = sys.argv[2].split(","); n = int(sys.argv[3]) if len(sys.argv) > 3 else 15
b = TrainStepBench()
shape = next(s for s in b.shapes("quick", "cpu") if s["variant"] == flav)
rs = {p: b.runner(p, shape, torch.float32, "cpu", "step", 1) for p in provs}
def step(r):
    r.pre(); t = time.perf_counter(); r.call(); return time.perf_counter() - t
for p in provs:
    for _ in range(3): step(rs[p])
ts = {p: [] for p in provs}
for i in range(n):
    for p in provs: ts[p].append(step(rs[p]) * 1e3)
base = statistics.median(ts[provs[0]])
for p in provs:
    m = statistics.median(ts[p])
    print(f"{flav:12s} {p:14s} median {m:7.1f} ms  min {min(ts[p]):7.1f}  {provs[0]}/this {base/m:.3f}")
