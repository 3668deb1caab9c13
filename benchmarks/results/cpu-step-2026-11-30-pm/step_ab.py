# one tree per process; prints the median step time of the pretrain model at 2 threads
import sys, time, torch, statistics
from llmcore.benchmarks import train_step as ts
from llmcore.models import Transformer
th = int(sys.argv[1]); steps = int(sys.argv[2])
torch.set_num_threads(th); torch.manual_seed(0)
shape = dict(flavour="gpt2", dim=128, n_layers=4, n_heads=4, vocab=4096, B=16, T=128)
model = Transformer(ts._config(shape, "auto"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
batch = ts.batch(shape, 0)
def step():
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(4): step()
t=[]; c=[]
for _ in range(steps):
    t0=time.perf_counter(); c0=time.process_time(); step(); t.append((time.perf_counter()-t0)*1e3); c.append((time.process_time()-c0)*1e3)
print(f"{statistics.median(t):.1f}/{statistics.median(c):.1f}")
