"""gelu: the GELU of an MLP's hidden activations, exact (erf) or tanh-approximated, forward and
backward.

x (N, F), the output of the model's fc1 projection for N tokens; `approximate` as in
torch.nn.functional.gelu: "none" (BERT) or "tanh" (GPT-2), a field of the shape and a word of
the variant name. "torch" is F.gelu, the call the model made before llmcore.gelu. No liger:
Liger-Kernel has no plain GELU (only GEGLU, fused with a gate).

GB/s counts the bytes an implementation must move at least, s bytes per element:
  fwd      read x, write y                   2 * N * F * s
  bwd      read x and dy, write dx           3 * N * F * s
  fwd+bwd  the sum                           5 * N * F * s
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

# (size set, device) -> [(N, F, approximate)]
_SHAPES = {
    ("tiny", "cpu"): [(16, 24, "tanh"), (7, 40, "none")],
    # 2048 x 512: the default `llmcore pretrain` MLP (16 x 128 tokens, ffn 512); 512 x 1024: the
    # CPU quick train step's gpt2 (tanh) and bert (none) cases
    ("quick", "cpu"): [(2048, 512, "tanh"), (512, 1024, "tanh"), (512, 1024, "none")],
    ("full", "cpu"): [(2048, 512, "tanh"), (512, 1024, "tanh"), (512, 1024, "none"),
                      (2048, 3072, "tanh")],
    ("tiny", "cuda"): [(256, 512, "tanh"), (128, 3072, "none")],
    # 8192 tokens of ffn 3072: gpt2-small at B8 T1024 (tanh), bert-base at B16 T512 (none); a
    # 16384-wide MLP in the full set only (the GPU check's ops stage runs the quick one)
    ("quick", "cuda"): [(8192, 3072, "tanh"), (8192, 3072, "none")],
    ("full", "cuda"): [(8192, 3072, "tanh"), (8192, 3072, "none"), (8192, 16384, "tanh")],
}


class GeluBench(OpBench):
    name = "gelu"
    # the native kernel is CPU-only: checked per case, so a run that names llmcore_native for
    # the other ops on CUDA lists gelu's native cases as skipped, not failed
    case_families = ("gelu",)
    providers = ("torch", "torch_compile", "llmcore_triton", "llmcore_native")
    unit = "GB/s"
    x_key = "F"

    def shapes(self, size_set, device):
        return [{"variant": f"{a} N{n}", "N": n, "F": f, "approximate": a}
                for n, f, a in _SHAPES[(size_set, device)]]

    def function_key(self, shape):
        return shape["approximate"]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        return {"x": rnd.normal(shape["N"], shape["F"], dtype=dtype, requires_grad=True)}

    def function(self, provider, shape):
        approximate = shape["approximate"]
        if provider in ("torch", "torch_compile"):
            def fn(x):
                return F.gelu(x, approximate=approximate)
            return fn if provider == "torch" else torch.compile(fn)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(x):
                return llmcore.gelu(x, approximate=approximate, backend=backend)
            return fn
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * shape["N"] * shape["F"] * dtype.itemsize


BENCHES = {"gelu": GeluBench()}
