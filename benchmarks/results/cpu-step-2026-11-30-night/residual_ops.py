# The residual stream's ops in one default-pretrain-shaped train step (gpt2, width 128, 4 layers,
# B16 T128, native, 2 threads): calls and CPU time of the norms and of the (16, 128, 128) adds,
# from torch.profiler over 5 steps. Run it with PYTHONPATH=<tree> to compare two commits.
import collections
import torch
from torch.profiler import profile, ProfilerActivity
from llmcore.benchmarks.train_step import pretrain_case

torch.set_num_threads(2)
model, opt, batch = pretrain_case("auto")


def step():
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    for _ in range(5):
        step()
tot = collections.defaultdict(lambda: [0, 0.0])
for e in p.events():
    stream = any(s[-1:] == [128] and len(s) >= 2 and s[0] in (16, 2048) for s in e.input_shapes if s)
    if e.name in ("llmcore::norm_fwd", "llmcore::norm_bwd") or (e.name in ("aten::add", "aten::add_") and stream):
        tot[e.name][0] += 1
        tot[e.name][1] += e.cpu_time_total
for name, (n, us) in sorted(tot.items()):
    print(f"{name:20s} {n / 5:5.1f} calls/step {us / 5 / 1e3:6.2f} ms/step")
print(f"{'total':20s} {sum(n for n, _ in tot.values()) / 5:5.1f} calls/step "
      f"{sum(us for _, us in tot.values()) / 5 / 1e3:6.2f} ms/step")
