import torch, time, statistics, sys
import llmcore
th=int(sys.argv[1]); torch.set_num_threads(th)
shapes=[tuple(map(int,s.split("x"))) for s in sys.argv[2].split(",")]
chunks=[None if c=="d" else int(c) for c in sys.argv[3].split(",")]
reps=int(sys.argv[4]) if len(sys.argv)>4 else 10
for (N,H,V) in shapes:
    torch.manual_seed(0)
    x=torch.randn(N,H,requires_grad=True); w=(torch.randn(V,H)*0.05).requires_grad_(True)
    tgt=torch.randint(0,V,(N,))
    def run(c):
        llmcore.linear_cross_entropy(x,w,tgt,backend="native",chunk_size=c).backward()
        x.grad=None; w.grad=None
    for c in chunks: run(c); run(c)
    res={c:[] for c in chunks}
    for r in range(reps):
        for c in (chunks if r%2==0 else chunks[::-1]):
            t0=time.perf_counter(); run(c); res[c].append((time.perf_counter()-t0)*1e3)
    base=statistics.median(res[chunks[0]])
    print(f"th={th} N={N} H={H} V={V}: " + "  ".join(f"{c or 'default'}: {statistics.median(v):.2f}ms ({base/statistics.median(v):.2f}x)" for c,v in res.items()), flush=True)
