"""rope: rotary embedding of queries and keys, forward and backward.

q (B, N, Hq, D) and k (B, N, Hkv, D), the layout of llmcore's model and of flash-attn; the
tables cos, sin (N, 1, D) float32, without gradient. "torch" is the eager formula as Hugging
Face models write it (x cos + rotate_half(x) sin, applied to q and to k).

GB/s counts the bytes an implementation must move at least, s bytes per element and
E = B * N * (Hq + Hkv) * D elements of q and k together (the tables are negligible):
  fwd      read q, k; write their rotations      2 * E * s
  bwd      read the two gradients; write dq, dk  2 * E * s
  fwd+bwd  the sum                               4 * E * s
"""
from __future__ import annotations

import torch

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

# (size set, device) -> [(B, N, Hq, Hkv, D)]
_SHAPES = {
    ("tiny", "cpu"): [(1, 16, 4, 2, 16), (2, 24, 2, 2, 32)],
    ("quick", "cpu"): [(2, 512, 12, 4, 64), (1, 1024, 16, 16, 128)],
    ("full", "cpu"): [(2, 512, 12, 4, 64), (1, 1024, 16, 16, 128), (1, 2048, 32, 8, 128)],
    ("tiny", "cuda"): [(2, 128, 4, 2, 64), (1, 256, 8, 8, 128)],
    # 16k tokens: the llama case of the train-step bench (12:4 heads of 64), Llama-3-8B's heads
    ("quick", "cuda"): [(8, 2048, 12, 4, 64), (4, 4096, 32, 8, 128)],
    ("full", "cuda"): [(8, 2048, 12, 4, 64), (4, 4096, 32, 8, 128), (2, 8192, 32, 8, 128),
                       (16, 1024, 16, 16, 128)],
}


def _eager_rope(q, k, cos, sin):
    def one(x):
        x1, x2 = x.chunk(2, dim=-1)
        return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    return one(q), one(k)


class RopeBench(OpBench):
    name = "rope"
    # the native kernel is CPU-only: checked per case, so a run that names llmcore_native for
    # the other ops on CUDA lists rope's native cases as skipped, not failed
    case_families = ("rope",)
    providers = ("torch", "torch_compile", "llmcore_triton", "llmcore_native")
    unit = "GB/s"
    x_key = "N"

    def shapes(self, size_set, device):
        return [{"variant": f"d{d} heads {hq}/{hkv}", "B": b, "N": n, "Hq": hq, "Hkv": hkv,
                 "D": d} for b, n, hq, hkv, d in _SHAPES[(size_set, device)]]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        b, n, d = shape["B"], shape["N"], shape["D"]
        inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, device=device) / d)
        ang = torch.arange(n, device=device)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], -1)[:, None, :]                         # (N, 1, D)
        return {"q": rnd.normal(b, n, shape["Hq"], d, dtype=dtype, requires_grad=True),
                "k": rnd.normal(b, n, shape["Hkv"], d, dtype=dtype, requires_grad=True),
                "cos": ang.cos(), "sin": ang.sin()}

    def function(self, provider, shape):
        if provider == "torch":
            return _eager_rope
        if provider == "torch_compile":
            return torch.compile(_eager_rope)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(q, k, cos, sin):
                return llmcore.rope(q, k, cos, sin, backend=backend)
            return fn
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        elems = shape["B"] * shape["N"] * (shape["Hq"] + shape["Hkv"]) * shape["D"]
        return {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[mode] * elems * dtype.itemsize


BENCHES = {"rope": RopeBench()}
