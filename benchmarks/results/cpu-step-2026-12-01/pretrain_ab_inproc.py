# The default `llmcore pretrain` model, batch and fused AdamW (llmcore.benchmarks.train_step.
# pretrain_case) on backend torch and auto (native), steps interleaved in one process.
# argv: steps per backend. Threads from OMP_NUM_THREADS.
import sys, time, statistics, torch
from llmcore.benchmarks.train_step import pretrain_case
n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
cases = {b: pretrain_case(b) for b in ("torch", "auto")}
def step(case):
    model, opt, batch = case
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return (time.perf_counter() - t) * 1e3
for c in cases.values():
    for _ in range(5): step(c)
ts = {b: [] for b in cases}
for i in range(n):
    for b, c in cases.items(): ts[b].append(step(c))
for b in cases: print(f"{b:6s} median {statistics.median(ts[b]):6.1f} ms  min {min(ts[b]):6.1f}")
print(f"torch / auto: {statistics.median(ts['torch']) / statistics.median(ts['auto']):.3f}x")
