import torch, time, statistics, sys, llmcore
torch.set_num_threads(1)
N, D = 2048, 128
h = torch.randn(N, D); dy = torch.randn(N, D); w = torch.randn(D)
mean = h.mean(1); rstd = 1 / h.var(1, unbiased=False).add(1e-5).sqrt()
op = torch.ops.llmcore.norm_bwd
for _ in range(50): op(dy, None, h, w, mean, rstd, False, True, True)
ts = []
for r in range(15):
    t0 = time.perf_counter()
    for _ in range(200): op(dy, None, h, w, mean, rstd, False, True, True)
    ts.append((time.perf_counter() - t0) / 200 * 1e6)
print(f"norm_bwd 2048x128: {statistics.median(ts):.1f} us (min {min(ts):.1f})")
b = torch.randn(D)
fop = torch.ops.llmcore.norm_fwd
for _ in range(50): fop(h, None, w, b, 1e-5, False)
ts = []
for r in range(15):
    t0 = time.perf_counter()
    for _ in range(200): fop(h, None, w, b, 1e-5, False)
    ts.append((time.perf_counter() - t0) / 200 * 1e6)
print(f"norm_fwd 2048x128: {statistics.median(ts):.1f} us (min {min(ts):.1f})")
