# Mean relative error against float64 of llmcore::gemm and torch.mm (MKL) on random float32
# matrices, 5 draws per shape (k past the 256-deep block: the blocked sum keeps MKL's error).
import torch, llmcore
torch.manual_seed(0)
g = torch.ops.llmcore.gemm
for m,k,n in [(64,32,64),(64,128,64),(256,512,128),(128,2048,128),(64,4096,64)]:
    eo=[];em=[]
    for t in range(5):
        a=torch.randn(m,k); b=torch.randn(k,n)
        ref=a.double()@b.double()
        eo.append(((g(a,b,None).double()-ref).abs().mean()/ref.abs().mean()).item())
        em.append(((torch.mm(a,b).double()-ref).abs().mean()/ref.abs().mean()).item())
    print(m,k,n, "ours %.2e  mkl %.2e  ratio %.2f" % (sum(eo)/5, sum(em)/5, sum(eo)/sum(em)))
