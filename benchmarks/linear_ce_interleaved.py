"""linear_cross_entropy against eager `F.cross_entropy(x @ w.t(), t)`, forward + backward, in one
process with the two interleaved call by call (a measurement script, not a test).

    python benchmarks/linear_ce_interleaved.py [--n 256] [--h 512] [--v 32000] [--reps 30]
                                               [--dtype float32] [--backend native]

On a shared machine the load drifts over minutes; alternating the two (and swapping which goes
first every rep) makes the ratio of their medians robust to that drift where two separate runs
are not. Prints both medians, their ratio and the spread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import llmcore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backend", default="native")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.n, args.h, dtype=dtype, requires_grad=True)
    w = (torch.randn(args.v, args.h) / args.h ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, args.v, (args.n,))

    def eager():
        F.cross_entropy((x @ w.t()).float(), t).backward()

    def ours():
        llmcore.linear_cross_entropy(x, w, t, backend=args.backend).backward()

    def timed(fn):
        x.grad = w.grad = None
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for fn in (eager, ours):                       # warm-up
        timed(fn)
    times = {"eager": [], "llmcore": []}
    for i in range(args.reps):
        order = (("eager", eager), ("llmcore", ours))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()[0]:.1f}; N={args.n} H={args.h} V={args.v} {args.dtype} fwd+bwd, "
          f"median of {args.reps}")
    for k, v in times.items():
        print(f"  {k:8s} {med[k] * 1e3:8.1f} ms  [{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}]")
    print(f"  speed-up {med['eager'] / med['llmcore']:.3f}x")


if __name__ == "__main__":
    main()
