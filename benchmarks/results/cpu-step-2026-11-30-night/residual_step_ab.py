# in-process A/B of the residual fusion (f19d088): the old Block/_blocks structure (a standalone
# x + mlp add per block, plain norm1) against the new one, steps interleaved in one process, same
# model, optimizer and extension build. argv: threads, steps, flavour (gpt2 | llama).
import sys, time, torch, statistics
from llmcore.benchmarks.train_step import pretrain_case
from llmcore.models import transformer as tr
th = int(sys.argv[1]); steps = int(sys.argv[2])
torch.set_num_threads(th)
fl = sys.argv[3] if len(sys.argv)>3 else "gpt2"
model, opt, batch = pretrain_case("auto", fl)
new_blocks = tr.Transformer._blocks
def old_blocks(self, x, layout):
    for block in self.blocks:
        if block.pre_norm:
            a = block.drop(block.attn(block.norm1(x), layout)).to(x.dtype)
            h, x = block.norm2(a, residual=x)
            x = x + block.drop(block.mlp(h)).to(x.dtype)
        else:
            x, _ = block(x, layout)
    return self.final_norm(x) if self.final_norm is not None else x
def step():
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
res = {"old": [], "new": []}
for i in range(steps + 4):
    for name, fn in (("old", old_blocks), ("new", new_blocks)) if i % 2 else (("new", new_blocks), ("old", old_blocks)):
        tr.Transformer._blocks = fn
        t0 = time.perf_counter(); step(); dt = (time.perf_counter() - t0) * 1e3
        if i >= 4: res[name].append(dt)
o, n = statistics.median(res["old"]), statistics.median(res["new"])
pairs = sorted(a / b for a, b in zip(res["old"], res["new"]))
print(f"{fl} {th}T old {o:.1f} new {n:.1f} ms  old/new median {o/n:.3f}, pair ratios p25 {pairs[len(pairs)//4]:.3f} p50 {pairs[len(pairs)//2]:.3f} p75 {pairs[3*len(pairs)//4]:.3f}")
