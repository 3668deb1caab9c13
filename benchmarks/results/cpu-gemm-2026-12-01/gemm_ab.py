# llmcore's CPU GEMM (llmcore::gemm) against torch.mm (MKL's sgemm) on the default pretrain
# model's and the quick train step's shapes, calls interleaved in one process (this VM drifts
# 10-30% between processes). argv: threads. GFLOP/s of the median of 15 calls each.
import sys, time, torch, llmcore
torch.set_num_threads(int(sys.argv[1]))
g = torch.ops.llmcore.gemm
# (name, m, k, n, layout): NN a @ b; NT a @ b with b a transposed view (x W^T); TN a transposed
# view @ b (dW = dy^T x)
shapes = [("pretrain qkv fwd", 2048, 128, 384, "NN"), ("pretrain fc1 fwd", 2048, 128, 512, "NN"),
          ("pretrain fc2 fwd", 2048, 512, 128, "NN"), ("pretrain fc1 dx", 2048, 512, 128, "NN"),
          ("pretrain fc1 dW", 512, 2048, 128, "TN"), ("pretrain fc2 dW", 128, 2048, 512, "TN"),
          ("pretrain lm logits", 512, 128, 4096, "NT"), ("pretrain lm dx", 512, 4096, 128, "NN"),
          ("pretrain lm dW", 4096, 512, 128, "TN"), ("quick gpt2 fc1 fwd", 4096, 256, 1024, "NN"),
          ("quick gpt2 fc1 dW", 1024, 4096, 256, "TN")]
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for name, m, k, n, lay in shapes:
    a = torch.randn(k, m).t() if lay[0] == "T" else torch.randn(m, k)
    b = torch.randn(n, k).t() if lay[1] == "T" else torch.randn(k, n)
    fl = 2 * m * n * k / 1e9
    tm, tg = [], []
    for _ in range(3):
        torch.mm(a, b); g(a, b)
    for _ in range(15):
        t = time.perf_counter(); torch.mm(a, b); tm.append(time.perf_counter() - t)
        t = time.perf_counter(); g(a, b); tg.append(time.perf_counter() - t)
    tm.sort(); tg.sort()
    print(f"{name:20s} {m}x{k}x{n} {lay}: torch.mm {fl / tm[7]:6.1f} GFLOP/s, llmcore "
          f"{fl / tg[7]:6.1f}, ratio {tm[7] / tg[7]:.2f}", flush=True)
