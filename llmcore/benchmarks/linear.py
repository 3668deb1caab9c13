"""linear: a projection of N tokens, y = x W^T + b, forward and backward (dx = dy W, dW = dy^T x,
db = sum dy).

x (N, K), weight (M, K), bias (M,). "torch" is F.linear (MKL's sgemm on the CPU, cuBLAS on a
GPU), the call the model made before llmcore.linear; llmcore_native is llmcore's CPU GEMM
(csrc/cpu/gemm.cpp), float32. No Triton or CUDA kernel: on a GPU llmcore uses F.linear, so the
op has no GPU cases.

TFLOP/s counts the products: fwd 2 N K M, bwd 4 N K M (dx and dW), fwd+bwd 6 N K M.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

# (size set, device) -> [(N, K, M)]: the default `llmcore pretrain` model's projections (2048
# tokens of width 128: QKV, fc1, fc2) and the CPU quick train step's gpt2 fc1 (512 x 256 -> 1024)
_SHAPES = {
    ("tiny", "cpu"): [(37, 24, 40), (16, 70, 33)],
    ("quick", "cpu"): [(2048, 128, 384), (2048, 128, 512), (2048, 512, 128), (512, 256, 1024)],
    ("full", "cpu"): [(2048, 128, 384), (2048, 128, 512), (2048, 512, 128), (512, 256, 1024),
                      (4096, 768, 3072)],
}


class LinearBench(OpBench):
    name = "linear"
    case_families = ("linear",)
    providers = ("torch", "llmcore_native")
    unit = "TFLOP/s"
    x_key = "K"

    def shapes(self, size_set, device):
        return [{"variant": f"N{n} K{k} M{m}", "N": n, "K": k, "M": m}
                for n, k, m in _SHAPES.get((size_set, device), [])]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        k = shape["K"]
        return {"x": rnd.normal(shape["N"], k, dtype=dtype, requires_grad=True),
                "weight": rnd.normal(shape["M"], k, dtype=dtype, requires_grad=True,
                                     std=k ** -0.5),
                "bias": rnd.normal(shape["M"], dtype=dtype, requires_grad=True)}

    def function(self, provider, shape):
        if provider == "torch":
            return F.linear
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(x, weight, bias):
                return llmcore.linear(x, weight, bias, backend=backend)
            return fn
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * shape["N"] * shape["K"] * shape["M"]


BENCHES = {"linear": LinearBench()}
