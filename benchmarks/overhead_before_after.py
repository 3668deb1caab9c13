"""Per-call host overhead of llmcore's public ops against their torch twins, for comparing two
llmcore trees on the same machine (a measurement script, not a test).

    PYTHONPATH=<llmcore tree> python benchmarks/overhead_before_after.py [--rounds 7] [--reps 1000]

Tiny inputs (the kernels cost next to nothing), 1 thread, CPU tensors, native backend (the
compiled kernels). Each case alternates torch and llmcore round by round; the table gives each
side's best round (median microseconds per call) and llmcore / torch. Unlike `llmcore bench
--ops overhead` this needs nothing newer than the public API, so it also runs against older
llmcore trees, which is how the before/after table in benchmarks/README.md was made.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import llmcore


def _median_us(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts) / 1e3


def _eager_swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _sum(pair):
    return pair[0] + pair[1]


def _eager_rope(q, k, cos, sin):
    from llmcore.benchmarks.rope import _eager_rope as formula
    return formula(q, k, cos, sin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    r = torch.randn(4, 64, requires_grad=True)
    lg, t = torch.randn(4, 100, requires_grad=True), torch.randint(0, 100, (4,))
    hx, hw = torch.randn(4, 32, requires_grad=True), torch.randn(100, 32, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    nat = dict(backend="native")
    cases = {
        "layer_norm": (lambda: F.layer_norm(x, (64,), w, b),
                       lambda: llmcore.layer_norm(x, (64,), w, b, **nat)),
        "rms_norm+residual": (lambda: F.rms_norm(x + r, (64,), w),
                              lambda: llmcore.rms_norm(x, (64,), w, residual=r, **nat)[0]),
        "cross_entropy": (lambda: F.cross_entropy(lg, t),
                          lambda: llmcore.cross_entropy(lg, t, **nat)),
        "linear_cross_entropy": (lambda: F.cross_entropy(F.linear(hx, hw), t),
                                 lambda: llmcore.linear_cross_entropy(hx, hw, t, **nat)),
        "attention": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      lambda: llmcore.attention(q, k, v, is_causal=True, **nat)),
    }
    if hasattr(llmcore, "gelu"):             # trees older than the op
        cases["gelu tanh"] = (lambda: F.gelu(x, approximate="tanh"),
                              lambda: llmcore.gelu(x, "tanh", **nat))
    if hasattr(llmcore, "swiglu"):
        gu = torch.randn(8, 64, requires_grad=True)
        cases["swiglu"] = (lambda: _eager_swiglu(gu), lambda: llmcore.swiglu(gu, **nat))
    if hasattr(llmcore, "rope"):
        rq, rk = (torch.randn(1, 8, 2, 16, requires_grad=True) for _ in range(2))
        ang = torch.randn(8, 1, 16)
        cos, sin = ang.cos(), ang.sin()
        # q and k rotated by one call; their sum (one add on either side) carries both back
        cases["rope q+k"] = (lambda: _sum(_eager_rope(rq, rk, cos, sin)),
                             lambda: _sum(llmcore.rope(rq, rk, cos, sin, **nat)))
    print(f"llmcore {llmcore.__file__}; torch {torch.__version__}; 1 thread; "
          f"best of {args.rounds} rounds x {args.reps} calls")
    print("| op | mode | torch us | llmcore native us | llmcore / torch |")
    print("|---|---|---|---|---|")
    for name, (eager, ours) in cases.items():
        for mode in ("fwd", "fwd+bwd"):
            fe = eager if mode == "fwd" else (lambda f=eager: f().sum().backward())
            fo = ours if mode == "fwd" else (lambda f=ours: f().sum().backward())
            for f in (fe, fo):
                _median_us(f, 200)
            be = bo = float("inf")
            for _ in range(args.rounds):
                be = min(be, _median_us(fe, args.reps))
                bo = min(bo, _median_us(fo, args.reps))
            print(f"| {name} | {mode} | {be:.1f} | {bo:.1f} | {bo / be:.2f}x |")


if __name__ == "__main__":
    main()
