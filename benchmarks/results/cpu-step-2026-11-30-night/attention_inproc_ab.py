# In-process A/B of attention kernel variants selected by LLMCORE_AB (a measurement-only build of
# attention_experiments.diff, NOT in the tree): calls alternate between variants in one process.
# argv: threads, B,H,T,D, causal|full, reps, comma-separated LLMCORE_AB values (first = baseline).
import torch, time, statistics, sys, os
import llmcore
torch.set_num_threads(int(sys.argv[1]))
B,H,T,D = [int(x) for x in sys.argv[2].split(",")]
causal = sys.argv[3] == "causal"; reps=int(sys.argv[4]); variants=[v for v in sys.argv[5].split(",")]
torch.manual_seed(0)
q,k,v = [torch.randn(B,T,H,D, requires_grad=True) for _ in range(3)]
do = torch.randn(B,T,H,D)
f = lambda: llmcore.flash_attn_func(q,k,v,causal=causal,backend="native")
res={x:([],[]) for x in variants}
for i in range(reps+3):
    order = variants if i%2 else variants[::-1]
    for var in order:
        os.environ["LLMCORE_AB"]=var
        t0=time.perf_counter(); o=f(); t1=time.perf_counter(); o.backward(do); t2=time.perf_counter()
        if i>=3: res[var][0].append((t1-t0)*1e3); res[var][1].append((t2-t1)*1e3)
base=variants[0]
for var in variants:
    fr=statistics.median(a/b for a,b in zip(res[base][0],res[var][0])); br=statistics.median(a/b for a,b in zip(res[base][1],res[var][1]))
    print(f"AB={var}: fwd {statistics.median(res[var][0]):.3f} bwd {statistics.median(res[var][1]):.3f} ms; speedup vs AB={base} (median of pair ratios): fwd {fr:.3f} bwd {br:.3f}")
