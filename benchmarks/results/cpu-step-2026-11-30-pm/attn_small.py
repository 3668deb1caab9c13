import torch, time, statistics, sys
import llmcore
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 1)
B,H,T,D = 16,4,128,32
def mk(): return torch.randn(B,H,T,D, requires_grad=True)
q,k,v = mk(),mk(),mk()
do = torch.randn(B,H,T,D)
def nat_f(): return llmcore.attention(q,k,v,is_causal=True,backend="native")
def sdpa_f(): return torch.nn.functional.scaled_dot_product_attention(q,k,v,is_causal=True)
res={}
for name,f in (("native",nat_f),("sdpa",sdpa_f)):
    for _ in range(3): f().backward(do)
for rep in range(30):
  for name,f in (("native",nat_f),("sdpa",sdpa_f)):
    t0=time.perf_counter(); o=f(); t1=time.perf_counter(); o.backward(do); t2=time.perf_counter()
    res.setdefault(name+" fwd",[]).append((t1-t0)*1e3); res.setdefault(name+" bwd",[]).append((t2-t1)*1e3)
fl_f = 2*2*B*H*T*T*D/2; fl_b = 5*2*B*H*T*T*D/2
for k,v in res.items():
    m=statistics.median(v); fl = fl_f if "fwd" in k else fl_b
    print(f"{k:12s} {m:6.3f} ms  {fl/m/1e6:6.1f} GF/s (causal-half flops)")
