"""cross_entropy over (N, V) logits, and linear_cross_entropy (the LM head fused with the loss).

cross_entropy: logits (N, V), integer targets (N,), mean reduction. GB/s counts the logits'
bytes an unfused implementation moves (s bytes per element): fwd reads the logits once
(N*V*s), bwd reads them again and writes the gradient (2*N*V*s), fwd+bwd the sum (3*N*V*s).
The same count for every provider, so GB/s ranks providers exactly as time does.

linear_cross_entropy: hidden states x (N, H), head weight (V, H), targets (N,): the loss of
x @ weight.T. TFLOP/s counts the two matmuls of the forward (2*N*H*V) and the two of the
backward (4*N*H*V); the eager baseline is F.linear followed by F.cross_entropy in the input
dtype (no fp32 upcast of the logits), which holds all (N, V) logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

# (size set, device) -> (N, [V, ...])
_CE_SIZES = {
    ("tiny", "cpu"): (16, [503, 1000]),
    ("quick", "cpu"): (512, [8192, 50257]),
    ("full", "cpu"): (1024, [8192, 32000, 50257, 128256]),
    ("tiny", "cuda"): (64, [1000, 32000]),
    ("quick", "cuda"): (8192, [32000, 50257, 128256, 256000]),
    ("full", "cuda"): (16384, [32000, 50257, 128256, 256000]),
}
# (size set, device) -> (N, H, [V, ...])
_LCE_SIZES = {
    ("tiny", "cpu"): (16, 32, [503, 1000]),
    ("quick", "cpu"): (256, 512, [8192, 32000]),
    ("full", "cpu"): (1024, 768, [8192, 32000, 50257]),
    ("tiny", "cuda"): (64, 64, [1000, 4099]),
    ("quick", "cuda"): (8192, 4096, [32000, 128256]),
    ("full", "cuda"): (16384, 4096, [32000, 50257, 128256, 256000]),
}


def _eager_ce(logits, target):
    return F.cross_entropy(logits, target)


def _eager_linear_ce(x, weight, target):
    return F.cross_entropy(F.linear(x, weight), target)


class CrossEntropyBench(OpBench):
    name = "cross_entropy"
    families = ("cross_entropy",)
    providers = ("torch", "torch_compile", "llmcore_triton", "llmcore_native", "liger")
    unit = "GB/s"
    x_key = "V"

    def shapes(self, size_set, device):
        n, vocab = _CE_SIZES[(size_set, device)]
        return [{"variant": "mean", "N": n, "V": v} for v in vocab]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        return {"logits": rnd.normal(shape["N"], shape["V"], dtype=dtype, requires_grad=True),
                "target": rnd.integers(shape["V"], shape["N"])}

    def function(self, provider, shape):
        if provider == "torch":
            return _eager_ce
        if provider == "torch_compile":
            return torch.compile(_eager_ce)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]
            return lambda logits, target: llmcore.cross_entropy(logits, target, backend=backend)
        if provider == "liger":
            from liger_kernel.transformers import LigerCrossEntropyLoss

            # Liger computes the gradient during the forward and stores it in the logits'
            # buffer (its memory saving); the benchmark inputs are overwritten, timing is not
            # affected.
            return LigerCrossEntropyLoss()
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        per = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
        return per * shape["N"] * shape["V"] * dtype.itemsize


class LinearCrossEntropyBench(OpBench):
    name = "linear_cross_entropy"
    families = ("cross_entropy",)
    providers = ("torch", "torch_compile", "llmcore_triton", "llmcore_native", "liger")
    unit = "TFLOP/s"
    x_key = "V"

    def shapes(self, size_set, device):
        n, h, vocab = _LCE_SIZES[(size_set, device)]
        return [{"variant": "mean", "N": n, "H": h, "V": v} for v in vocab]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        n, h, v = shape["N"], shape["H"], shape["V"]
        return {"x": rnd.normal(n, h, dtype=dtype, requires_grad=True),
                "weight": rnd.normal(v, h, dtype=dtype, requires_grad=True, std=h ** -0.5),
                "target": rnd.integers(v, n)}

    def function(self, provider, shape):
        if provider == "torch":
            return _eager_linear_ce
        if provider == "torch_compile":
            return torch.compile(_eager_linear_ce)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]
            return lambda x, weight, target: llmcore.linear_cross_entropy(x, weight, target,
                                                                          backend=backend)
        if provider == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss()
            return lambda x, weight, target: loss(weight, x, target)   # (lin_weight, input, ...)
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        per = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode]
        return per * shape["N"] * shape["H"] * shape["V"]


BENCHES = {"cross_entropy": CrossEntropyBench(), "linear_cross_entropy": LinearCrossEntropyBench()}
