"""A/B of llmcore.swiglu inside a train step, in one process: the CPU quick train step's llama
case (the llmcore model, backend auto) with its gated MLPs on swiglu's auto backend, or on the
eager formula (backend torch: what every MLP ran before the op), alternating step by step so
both see the same machine load; medians and the 20th-80th percentile of the step time.

    OMP_NUM_THREADS=1 python benchmarks/swiglu_train_step_ab.py [--steps 25] [--size-set quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmcore.benchmarks import train_step as ts
from llmcore.models import Transformer
from llmcore.models.transformer import MLP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25, help="timed steps per arm")
    ap.add_argument("--size-set", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = next(s for s in ts.TrainStepBench().shapes(args.size_set, "cpu")
                 if s["flavour"] == "llama")
    model = Transformer(ts._config(shape, "auto"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = ts.batch(shape, 0)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    arms = (mlps[0].backend, "torch")

    def step(backend: str) -> float:
        for m in mlps:
            m.backend = backend
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
    print(f"llama case {shape}, {args.threads} thread(s), {args.steps} steps per arm")
    for arm, ms in times.items():
        q = statistics.quantiles(ms, n=5)
        print(f"  MLP swiglu backend {arm:7s} median {statistics.median(ms):7.1f} ms "
              f"(p20-p80 {q[0]:.1f}-{q[3]:.1f})")
    print(f"  torch / {arms[0]}: "
          f"{statistics.median(times['torch']) / statistics.median(times[arms[0]]):.3f}x")


if __name__ == "__main__":
    main()
