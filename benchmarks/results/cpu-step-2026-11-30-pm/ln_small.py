import torch, time, statistics, sys
import llmcore
torch.set_num_threads(int(sys.argv[1]))
N, D = int(sys.argv[2]), int(sys.argv[3])
x = torch.randn(N, D, requires_grad=True); w = torch.randn(D, requires_grad=True); b = torch.randn(D, requires_grad=True)
dy = torch.randn(N, D)
def nat():
    y = llmcore.layer_norm(x, (D,), w, b, backend="native"); y.backward(dy)
def eag():
    y = torch.nn.functional.layer_norm(x, (D,), w, b); y.backward(dy)
fs = {"native": nat, "eager": eag}
for f in fs.values():
    for _ in range(5): f()
res = {k: [] for k in fs}
for r in range(200):
    for k, f in fs.items():
        t0 = time.perf_counter(); f(); res[k].append((time.perf_counter() - t0) * 1e6)
        x.grad = w.grad = b.grad = None
m = {k: statistics.median(v) for k, v in res.items()}
print(f"th={sys.argv[1]} {N}x{D}: native {m['native']:.1f} us, eager {m['eager']:.1f} us, eager/native {m['eager']/m['native']:.2f}x")
