"""Host cost of llmcore's Triton path, measured on a machine without a GPU (a measurement
script, not a test).

    python benchmarks/triton_host_overhead.py [--reps 3000] [--rounds 7] [--threads 1]

The Triton backend runs CPU tensors only through the interpreter, whose kernels cost
milliseconds. Here every @triton.jit kernel of llmcore.kernels.triton.* is replaced by a stub
that accepts the launch and does nothing, so what is timed is everything the host does around
the launches: checks, backend choice, allocations, autograd. On a GPU, Triton's own launcher
adds its per-launch cost on top (a few microseconds per kernel). Each op is timed on tiny
inputs next to its torch.nn.functional / SDPA twin, interleaved round by round; the table gives
the median of the rounds' per-call means and the ratio llmcore / torch (target on CUDA: <= 2x,
issue "GPU speed I"). Modes: "fwd" (inputs that require grad, grad mode on: the forward of a
training step), "fwd no_grad" (under torch.no_grad(): evaluation and inference) and "fwd+bwd"
(`out.sum().backward()`). `PYTHONPATH=<tree>` times another checkout with this script.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated: CPU tensors reach Triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import llmcore  # noqa: E402
from llmcore.benchmarks.rope import _eager_rope  # noqa: E402


class _Stub:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing (but tell
    `on_launch`, when given, the kernel's name)."""

    def __init__(self, name=None, on_launch=None):
        self.name, self.on_launch = name, on_launch

    def __getitem__(self, grid):
        if self.on_launch is None:
            return lambda *args, **kwargs: None
        return lambda *args, **kwargs: self.on_launch(self.name)


def stub_kernels(on_launch=None) -> int:
    import importlib

    n = 0
    for name in ("norm", "cross_entropy", "attention", "rope", "swiglu", "gelu"):
        mod = importlib.import_module(f"llmcore.kernels.triton.{name}")
        for attr, obj in list(vars(mod).items()):
            if hasattr(obj, "run") and hasattr(obj, "__getitem__"):
                setattr(mod, attr, _Stub(f"{name}.{attr}", on_launch))
                n += 1
    return n


def cases():
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    r = torch.randn(4, 64, requires_grad=True)
    logits = torch.randn(4, 100, requires_grad=True)
    t = torch.randint(0, 100, (4,))
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    rq, rk = (torch.randn(1, 8, 2, 16, requires_grad=True) for _ in range(2))
    ang = torch.randn(8, 1, 16)
    cos, sin = ang.cos(), ang.sin()

    def eager_rope():
        yq, yk = _eager_rope(rq, rk, cos, sin)         # the rope benchmark's eager formula
        return yq.sum() + yk.sum()

    def llmcore_rope():
        yq, yk = llmcore.rope(rq, rk, cos, sin, backend="triton")
        return yq.sum() + yk.sum()
    return {
        "layer_norm": (lambda: F.layer_norm(x, (64,), w, b),
                       lambda: llmcore.layer_norm(x, (64,), w, b, backend="triton")),
        "rms_norm+residual": (lambda: F.rms_norm(x + r, (64,), w),
                              lambda: llmcore.rms_norm(x, (64,), w, residual=r,
                                                       backend="triton")[0]),
        "cross_entropy": (lambda: F.cross_entropy(logits, t),
                          lambda: llmcore.cross_entropy(logits, t, backend="triton")),
        "attention": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      lambda: llmcore.attention(q, k, v, is_causal=True, backend="triton")),
        "rope (q and k; + 2 sums)": (eager_rope, llmcore_rope),
        "gelu tanh": (lambda: F.gelu(x, approximate="tanh"),
                      lambda: llmcore.gelu(x, "tanh", backend="triton")),
    }


def per_call_us(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"stubbed {stub_kernels()} Triton kernels; torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.rounds} rounds x {args.reps} calls")
    print("| op | mode | torch us | llmcore triton (host) us | ratio |")
    print("|---|---|---|---|---|")
    for name, (eager, ours) in cases().items():
        for mode in ("fwd", "fwd no_grad", "fwd+bwd"):
            def run(f, mode=mode):
                if mode == "fwd":
                    return f
                if mode == "fwd no_grad":
                    def no_grad():
                        with torch.no_grad():
                            f()
                    return no_grad
                return lambda: f().sum().backward()
            fe, fo = run(eager), run(ours)
            for f in (fe, fo):  # warm up
                per_call_us(f, 200)
            te, to = [], []
            for _ in range(args.rounds):
                te.append(per_call_us(fe, args.reps))
                to.append(per_call_us(fo, args.reps))
            me, mo = statistics.median(te), statistics.median(to)
            print(f"| {name} | {mode} | {me:.1f} | {mo:.1f} | {mo / me:.2f}x |")


if __name__ == "__main__":
    main()
