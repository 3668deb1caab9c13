"""Triton's own host cost per kernel launch, the part benchmarks/triton_host_overhead.py and
benchmarks/host_step_proxy.py leave out (they replace each kernel by a stub), measured on a
machine without a GPU (a measurement script, not a test).

    python benchmarks/triton_launch_cost.py [--reps 2000] [--rounds 7]

Each llmcore Triton kernel is launched once through its launcher on `meta` tensors at a small
training shape, with llmcore.kernels.triton.aot's stand-in sm_90 driver, so it compiles and the
arguments of the launch are kept. Then `JITFunction.run(..., warmup=True)` is timed on those
arguments: Triton's binder (argument specialisation: dtypes, 16-byte alignment, integer
values), its cache key and the cache lookup, i.e. everything Triton's Python does before the
driver call. A real launch adds the driver call itself (cuLaunchKernelEx, a few microseconds)
and the grid computation. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("run without TRITON_INTERPRET: the kernels must be the compiled ones")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from llmcore.kernels.triton import aot  # noqa: E402


def capture() -> list[tuple[str, JITFunction, tuple, dict]]:
    """(name, kernel, args, kwargs) of one launch of each llmcore Triton kernel."""
    from llmcore.kernels.triton import attention as A
    from llmcore.kernels.triton import cross_entropy as ce
    from llmcore.kernels.triton import norm, rope, swiglu

    launches = []

    def record(self, *args, grid, warmup, **kwargs):  # then compile, as compile_for does
        if all(name != self.__name__ for name, *_ in launches):
            launches.append((self.__name__, self, args, kwargs))
        return compile_only(self, *args, grid=grid, warmup=warmup, **kwargs)

    def empty(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, device="meta", dtype=dtype)

    with aot.compile_for(90, attention_configs="first"):
        compile_only, JITFunction.run = JITFunction.run, record
        try:
            # gpt2-small at B8 T1024: 8192 rows of 768, 12 heads of 64, vocabulary 50257
            x, w = empty(8192, 768), empty(768)
            y, h, mean, rstd = norm.norm_fwd(x, x, w, w, 1e-5, False)
            norm.norm_bwd(x, x, h, w, mean, rstd, False, True, True, torch.bfloat16,
                          torch.bfloat16)
            logits, target = empty(8192, 50257), empty(8192, dtype=torch.int64)
            scale = empty(dtype=torch.float32)
            loss, lse = ce.ce_fwd(logits, target, None, -100, 0.0, 0.0, None, grad=logits,
                                  grad_scale=scale)
            q = empty(8, 12, 1024, 64)
            out, lse = A.attention_fwd(q, q, q, scale=0.125, window=(-1, 0))
            A.attention_bwd(out, q, q, q, out, lse, scale=0.125, window=(-1, 0))
            tok = empty(8192, 12, 64)
            rope.rotary(tok, tok, empty(1024, 64, dtype=torch.float32),
                        empty(1024, 64, dtype=torch.float32))
            swiglu.swiglu_fwd(empty(8192, 2 * 2048))
        finally:
            JITFunction.run = compile_only
    return launches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    launches = capture()
    print(f"torch {torch.__version__}, triton {triton.__version__}, 1 thread; Triton's host "
          f"cost per launch before the driver call (median of {args.rounds} rounds of "
          f"{args.reps})")
    with aot.target(90):
        for name, kernel, a, kw in launches:
            def call():
                kernel.run(*a, grid=(1, 1, 1), warmup=True, **kw)
            call()
            rounds = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    call()
                rounds.append((time.perf_counter() - t0) / args.reps * 1e6)
            n_args = len(a) + len(kw)
            print(f"  {name:28s} {n_args:3d} arguments  {statistics.median(rounds):6.1f} us")


if __name__ == "__main__":
    main()
