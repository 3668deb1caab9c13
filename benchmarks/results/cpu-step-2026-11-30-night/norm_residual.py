# native layer_norm (2048, 128) fp32: plain, add then norm, and the fused residual norm; forward
# alone, then fwd+bwd with both outputs used (as in a pre-norm block). argv[1]: threads.
# Run with PYTHONPATH=<tree> to compare commits.
import torch, time, sys, llmcore, statistics
torch.set_num_threads(int(sys.argv[1]))
R,C = 2048,128
x=torch.randn(R,C); r=torch.randn(R,C); w=torch.randn(C); b=torch.randn(C)
ops=torch.ops.llmcore
def t(f,n=300):
    for _ in range(20): f()
    rs=[]
    for _ in range(7):
        t0=time.perf_counter()
        for _ in range(n): f()
        rs.append((time.perf_counter()-t0)/n*1e6)
    return statistics.median(rs)
print("plain norm      ", t(lambda: llmcore.layer_norm(x,(C,),w,b)))
print("add             ", t(lambda: x + r))
print("add + norm      ", t(lambda: llmcore.layer_norm(x + r,(C,),w,b)))
print("residual norm   ", t(lambda: llmcore.layer_norm(x,(C,),w,b,residual=r)))
print("torch F.ln      ", t(lambda: torch.nn.functional.layer_norm(x,(C,),w,b)))
xg=x.clone().requires_grad_(); rg=r.clone().requires_grad_(); wg=w.clone().requires_grad_(); bg=b.clone().requires_grad_()
gy=torch.randn(R,C); gh=torch.randn(R,C)
def sep():
    s = xg + rg
    y = llmcore.layer_norm(s,(C,),wg,bg)
    torch.autograd.backward([y, s], [gy, gh])
def fused():
    y, h = llmcore.layer_norm(xg,(C,),wg,bg,residual=rg)
    torch.autograd.backward([y, h], [gy, gh])
print("fwd+bwd add+norm", t(sep, 100))
print("fwd+bwd residual", t(fused, 100))
