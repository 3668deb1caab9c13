"""Host cost of a whole training step's forward + backward, measured without a GPU (a
measurement script, not a test).

    python benchmarks/host_step_proxy.py [--flavours gpt2,llama,bert,bert_padded] [--rounds 7]

On the H200 the llmcore train step was host-bound (2026-11-29: 75 ms of host time against 45 ms
of GPU time per gpt2-small step), so the host's work per step is a target of its own (issue "GPU
speed III"). This script builds each train-step case at its GPU depth (12 layers, its heads,
GQA and MLP type) but tiny width and sequence (dim 64, B=2, T=16), where every kernel costs next
to nothing, and times forward + backward on the CPU:

  hf              the Hugging Face model with the same weights (its own tiny CPU kernels)
  llmcore_torch   the llmcore model on backend torch (eager PyTorch ops)
  llmcore_native  the llmcore model on the compiled CPU kernels
  llmcore_triton  the llmcore model on the Triton backend with every Triton launch stubbed (what
                  the host does around the launches; Triton's own launcher, a few microseconds
                  per launch on a GPU host, comes on top)

It also counts, per step, the ops that reach the dispatcher below autograd and how many of them
are not views (on CUDA each of those is at least one kernel launch), plus the Triton launches.
The optimizer step is left out (the same AdamW for every model).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated: CPU tensors reach Triton

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_host_overhead import stub_kernels  # noqa: E402

from llmcore.benchmarks import train_step as ts  # noqa: E402

PROVIDERS = ("hf", "llmcore_torch", "llmcore_native", "llmcore_triton")
# ops that only make a new view of existing memory: no kernel on a GPU
_VIEWS = frozenset(("view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice",
                    "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "detach",
                    "alias", "as_strided", "unflatten", "chunk", "unbind", "lift_fresh",
                    "empty", "empty_like", "new_empty", "empty_strided", "promote_types"))


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _shape(flavour: str) -> dict:
    shape = dict(flavour=flavour, dim=64, n_layers=12, n_heads=2, vocab=256, B=2, T=16)
    if flavour == "llama":
        shape.update(n_kv_heads=1, ffn=128)
    return shape


def _model(provider: str, shape: dict, host: dict):
    from llmcore.models import Transformer, to_hf

    backend = {"hf": "torch", "llmcore_torch": "torch", "llmcore_native": "native",
               "llmcore_triton": "triton"}[provider]
    torch.manual_seed(0)
    model = Transformer(ts._config(shape, backend))
    if provider == "hf":
        return to_hf(model).train(), {}
    return model.train(), ts.counts(model, host)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavours", default="gpt2,llama,bert,bert_padded")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    launches = collections.Counter()
    stub_kernels(on_launch=lambda name: launches.update([name]))
    print(f"torch {torch.__version__}, 1 thread; forward + backward per step, median of "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| case | provider | ms per step | x hf | ops / non-view ops | Triton launches |")
    print("|---|---|---|---|---|---|")
    for flavour in args.flavours.split(","):
        shape = _shape(flavour)
        host = ts.batch(shape, 0)
        models = {p: _model(p, shape, host) for p in PROVIDERS}

        def step(p):
            model, extra = models[p]
            model(**host, **extra).loss.backward()
            for param in model.parameters():
                param.grad = None

        counts = {}
        for p in PROVIDERS:
            for _ in range(3):
                step(p)
            launches.clear()
            with _Count() as mode:
                step(p)
            ops = sum(mode.ops.values())
            real = sum(n for op, n in mode.ops.items() if op not in _VIEWS)
            counts[p] = (ops, real, sum(launches.values()))
        times = {p: [] for p in PROVIDERS}
        for _ in range(args.rounds):
            for p in PROVIDERS:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(p)
                times[p].append((time.perf_counter() - t0) / args.steps * 1e3)
        base = statistics.median(times["hf"])
        for p in PROVIDERS:
            ms = statistics.median(times[p])
            ops, real, n_launch = counts[p]
            print(f"| {flavour} | {p} | {ms:.2f} | {ms / base:.2f}x | {ops} / {real} | "
                  f"{n_launch if p == 'llmcore_triton' else '-'} |")


if __name__ == "__main__":
    main()
