"""Host cost of one attention kernel launch through triton's autotuner against a direct launch
of the JIT kernel with the config it chose (a measurement script, not a test; no GPU needed).

    python benchmarks/triton_autotune_overhead.py [--reps 3000] [--rounds 7]

`triton.autotune`'s run() looks its cache up on every call: it builds a dict of the kernel's
arguments (the attention kernels take ~60), keeps those whose names are in its argument-name
list, and appends str(dtype) of every tensor to the key. llmcore's attention launcher
(llmcore/kernels/triton/attention.py, `_launch`) goes through it once per shape class and then
straight to the JIT kernel. Here both routes run the attention forward's real arguments, with
the JIT kernel's own run() (Triton's launcher, common to both routes, a few microseconds on a
GPU host) replaced by a stub, so what is timed is what each route adds in Python.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the launcher; nothing is launched

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_host_overhead import per_call_us  # noqa: E402

from llmcore.kernels.triton import attention as A  # noqa: E402


class _StubJit:
    """Stands in for the JIT kernel: run() accepts the launch and does nothing."""

    def __init__(self, arg_names):
        self.arg_names = arg_names

    def run(self, *args, **kwargs):
        return None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


def forward_launch():
    """The attention forward's launch arguments for a causal fp16 1x2x64x64 call."""
    seen = {}

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs)

    real, A._fwd_kernel = A._fwd_kernel, Capture()
    try:
        q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.float16) for _ in range(3))
        A.attention_fwd(q, k, v, scale=0.125, window=(-1, 0))
    finally:
        A._fwd_kernel = real
    consts = {n: x for n, x in seen["kwargs"].items() if n not in A._INTERPRET_CONFIG}
    return seen["args"], consts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    launch_args, consts = forward_launch()
    jit = _StubJit(A._attn_fwd_kernel.arg_names)
    tuner = A._autotuned(A._attn_fwd_kernel, A._FWD_TABLE)
    tuner.fn = jit
    tuner._bench = lambda *a, config, **kw: [1.0]    # "tuning" picks the first candidate
    grid = lambda meta: (A.cdiv(64, meta["BLOCK_M"]), 2, 1)  # noqa: E731
    tuner[grid](*launch_args, **consts)                # fills the tuner's cache
    config = tuner.best_config.all_kwargs()

    def through_autotuner():
        tuner[grid](*launch_args, **consts)

    def direct():
        jit[grid(config)](*launch_args, **consts, **config)

    for f in (through_autotuner, direct):
        per_call_us(f, 200)
    times = {f.__name__: [] for f in (through_autotuner, direct)}
    for _ in range(args.rounds):
        for f in (through_autotuner, direct):
            times[f.__name__].append(per_call_us(f, args.reps))
    print(f"attention forward launch, {len(launch_args)} positional + {len(consts)} constexpr "
          f"arguments; torch {torch.__version__}; median of {args.rounds} rounds x {args.reps}")
    print("| route | host us per launch (JIT launcher stubbed) |")
    print("|---|---|")
    for name, ts in times.items():
        print(f"| {name.replace('_', ' ')} | {statistics.median(ts):.1f} |")


if __name__ == "__main__":
    main()
