import sys, time, torch, statistics
from llmcore.benchmarks import train_step as ts
from llmcore.models import Transformer
from llmcore.ops import cross_entropy as ce
th = int(sys.argv[1]); steps = int(sys.argv[2]); backend = sys.argv[3]
torch.set_num_threads(th); torch.manual_seed(0)
shape = dict(flavour="gpt2", dim=128, n_layers=4, n_heads=4, vocab=4096, B=16, T=128)
model = Transformer(ts._config(shape, backend))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
batch = ts.batch(shape, 0)
def step(cap):
    ce._CPU_CHUNK_ROWS = cap
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) * 1e3
arms = (1 << 30, 512)
for _ in range(3):
    for a in arms: step(a)
res = {a: [] for a in arms}
for i in range(steps):
    for a in (arms if i % 2 == 0 else arms[::-1]): res[a].append(step(a))
m = {a: statistics.median(v) for a, v in res.items()}
print(f"{backend} th={th}: one chunk {m[arms[0]]:.1f} ms, 512-row chunks {m[512]:.1f} ms: {m[arms[0]]/m[512]:.3f}x")
