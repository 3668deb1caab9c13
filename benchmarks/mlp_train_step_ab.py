"""A/B of the MLP activation ops (llmcore.swiglu, llmcore.gelu) inside a train step, in one
process: a train-step case (the llmcore model, backend auto) with its MLP activations (and the
BERT MLM head's GELU) on the op's auto backend, or on eager PyTorch (backend torch: what the
model ran before the ops), alternating step by step so both arms see the same machine load;
medians and the 20th-80th percentile of the step time.

    OMP_NUM_THREADS=1 python benchmarks/mlp_train_step_ab.py [--case llama] [--steps 25]

Cases: the CPU train-step benchmark's llama (swiglu), gpt2 (GELU tanh) and bert (exact GELU)
of --size-set, and "pretrain": the model of the default `llmcore pretrain` run (GPT, width
128, 4 layers, 4 heads, vocab 4096, B16 T128: GELU tanh).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmcore.benchmarks import train_step as ts
from llmcore.models import Transformer
from llmcore.models.heads import MaskedLMHead
from llmcore.models.transformer import MLP

_PRETRAIN = dict(flavour="gpt2", dim=128, n_layers=4, n_heads=4, vocab=4096, B=16, T=128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="llama", choices=("llama", "gpt2", "bert", "pretrain"))
    ap.add_argument("--steps", type=int, default=25, help="timed steps per arm")
    ap.add_argument("--size-set", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = _PRETRAIN if args.case == "pretrain" else next(
        s for s in ts.TrainStepBench().shapes(args.size_set, "cpu") if s["flavour"] == args.case)
    model = Transformer(ts._config(shape, "auto"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = ts.batch(shape, 0)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    heads = [m for m in model.modules() if isinstance(m, MaskedLMHead)]
    op = "swiglu" if mlps[0].gated else "gelu"
    arms = (mlps[0].backend, "torch")

    def step(backend: str) -> float:
        for m in mlps:
            m.backend = backend
        for h in heads:
            h.gelu_backend = backend
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(3):                                    # warm-up
        for arm in arms:
            step(arm)
    times = {arm: [] for arm in arms}
    for i in range(args.steps):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            times[arm].append(step(arm) * 1e3)
    print(f"{args.case} case {shape}, {args.threads} thread(s), {args.steps} steps per arm")
    for arm, ms in times.items():
        q = statistics.quantiles(ms, n=5)
        print(f"  {op} backend {arm:7s} median {statistics.median(ms):7.1f} ms "
              f"(p20-p80 {q[0]:.1f}-{q[3]:.1f})")
    print(f"  torch / {arms[0]}: "
          f"{statistics.median(times['torch']) / statistics.median(times[arms[0]]):.3f}x")


if __name__ == "__main__":
    main()
