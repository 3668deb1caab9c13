# llmcore::gemm over torch.mm (time ratio, above 1: llmcore faster) for few rows M, B row-major
# (NN) or transposed (NT, x W^T); argv: threads. Run before llmcore::gemm handed such calls to
# at::mm (the rule in csrc/torch/linear_ops.cpp, ours()); after it, the small-M cells are MKL.
import torch, time, sys, llmcore
torch.set_num_threads(int(sys.argv[1]))
g = torch.ops.llmcore.gemm
for lay in ("NT", "NN"):
    for K, N in ((4096, 4096), (256, 1024), (256, 8192)):
        row = []
        for M in (1, 4, 8, 16, 24, 32, 48):
            a = torch.randn(M, K)
            b = torch.randn(N, K).t() if lay[1] == "T" else torch.randn(K, N)
            tm=[]; tg=[]
            for _ in range(2): torch.mm(a,b); g(a,b,None)
            for _ in range(9):
                t=time.perf_counter(); torch.mm(a,b); tm.append(time.perf_counter()-t)
                t=time.perf_counter(); g(a,b,None); tg.append(time.perf_counter()-t)
            tm.sort(); tg.sort(); row.append(f"M{M}:{tm[4]/tg[4]:.2f}")
        print(lay, K, N, " ".join(row), flush=True)
