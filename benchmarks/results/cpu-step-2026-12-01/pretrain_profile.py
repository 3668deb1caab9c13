# torch.profiler of the default pretrain step (pretrain_case: model, batch, fused AdamW, with
# gradient clipping as the trainer does), threads from OMP_NUM_THREADS.
#   pretrain_profile.py ab        ms per step of every op, backends torch and auto (native),
#                                 profiled steps interleaved in one process (3 rounds x 3 steps)
#   pretrain_profile.py ops K,... the auto step's ops named K, ... by input shape (5 steps)
import sys, torch, collections
from torch.profiler import profile, ProfilerActivity
from llmcore.benchmarks.train_step import pretrain_case


def step(case):
    model, opt, batch = case
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def ab():
    cases = {b: pretrain_case(b) for b in ("torch", "auto")}
    for c in cases.values():
        for _ in range(4): step(c)
    acc = {b: collections.defaultdict(lambda: [0.0, 0]) for b in cases}
    R, S = 3, 3
    for rnd in range(R):
        for b, c in cases.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(S): step(c)
            for e in prof.key_averages():
                acc[b][e.key][0] += e.self_cpu_time_total / (R * S) / 1000
                acc[b][e.key][1] += e.count / (R * S)
    keys = sorted(set(acc["torch"]) | set(acc["auto"]),
                  key=lambda k: -max(acc["torch"][k][0], acc["auto"][k][0]))
    print(f"{'op (self CPU ms per step)':60s} {'torch':>8s} {'auto':>8s}  calls torch/auto")
    for k in keys[:40]:
        print(f"{k[:60]:60s} {acc['torch'][k][0]:8.2f} {acc['auto'][k][0]:8.2f}  "
              f"{acc['torch'][k][1]:.0f}/{acc['auto'][k][1]:.0f}")


def ops(keys):
    c = pretrain_case("auto")
    for _ in range(4): step(c)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(5): step(c)
    for e in sorted(prof.key_averages(group_by_input_shape=True),
                    key=lambda e: -e.self_cpu_time_total):
        if e.key in keys:
            print(f"{e.key:24s} {e.count/5:5.1f}/step {e.self_cpu_time_total/5/1000:7.3f} ms/step "
                  f"{e.input_shapes}")


if __name__ == "__main__":
    ab() if sys.argv[1] == "ab" else ops(sys.argv[2].split(","))
