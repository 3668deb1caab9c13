"""swiglu: silu(gate) * up of a fused [gate | up] projection, forward and backward.

x (N, 2F), the output of the model's fused fc1 projection for N tokens. "torch" is the eager
formula the model ran before llmcore.swiglu (chunk, F.silu(gate) * up); "liger" is
Liger-Kernel's LigerSiLUMulFunction on the two halves of x (it makes them contiguous first:
Liger expects separate gate and up projections, so those copies are its cost in this layout).

GB/s counts the bytes an implementation must move at least, s bytes per element:
  fwd      read x (2F), write y (F)                      3 * N * F * s
  bwd      read x (2F) and dy (F), write dx (2F)         5 * N * F * s
  fwd+bwd  the sum                                       8 * N * F * s
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

# (size set, device) -> [(N, F)]
_SHAPES = {
    ("tiny", "cpu"): [(16, 24), (7, 40)],
    # 512 x 672: the CPU quick train step's llama case (B2 T256, ffn 672)
    ("quick", "cpu"): [(512, 672), (1024, 1408)],
    ("full", "cpu"): [(512, 672), (1024, 1408), (2048, 2816)],
    ("tiny", "cuda"): [(256, 512), (128, 1408)],
    # 8192 tokens: the llama case of the train-step bench (ffn 2048), Llama-2-7B's 5632 ... and
    # Llama-3-8B's 14336 in the full set only (the GPU check's ops stage runs the quick one)
    ("quick", "cuda"): [(8192, 2048), (8192, 5632)],
    ("full", "cuda"): [(8192, 2048), (8192, 5632), (8192, 14336)],
}


def _eager_swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwigluBench(OpBench):
    name = "swiglu"
    # the native kernel is CPU-only: checked per case, so a run that names llmcore_native for
    # the other ops on CUDA lists swiglu's native cases as skipped, not failed
    case_families = ("swiglu",)
    providers = ("torch", "torch_compile", "llmcore_triton", "llmcore_native", "liger")
    unit = "GB/s"
    x_key = "F"

    def shapes(self, size_set, device):
        return [{"variant": f"N{n}", "N": n, "F": f} for n, f in _SHAPES[(size_set, device)]]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        return {"x": rnd.normal(shape["N"], 2 * shape["F"], dtype=dtype, requires_grad=True)}

    def function(self, provider, shape):
        if provider == "torch":
            return _eager_swiglu
        if provider == "torch_compile":
            return torch.compile(_eager_swiglu)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(x):
                return llmcore.swiglu(x, backend=backend)
            return fn
        if provider == "liger":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            def fn(x):
                gate, up = x.chunk(2, dim=-1)
                return LigerSiLUMulFunction.apply(gate, up)
            return fn
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        return {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode] * shape["N"] * shape["F"] * dtype.itemsize


BENCHES = {"swiglu": SwigluBench()}
