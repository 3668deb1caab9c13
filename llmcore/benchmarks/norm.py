"""layer_norm and rms_norm, with and without the fused residual add.

Input x: (N, D) rows of hidden size D, weight (D,) [and bias (D,)], optional residual (N, D);
with a residual the op returns (norm(x + residual), x + residual).

GB/s counts the bytes an implementation must move at least, with s bytes per element and
r = 1 with a residual, else 0 (weights, biases and per-row statistics are negligible):
  fwd      read x [and residual], write y [and h]          (2 + 2r) * N * D * s
  bwd      read h, dy [and dh], write dx                    (3 + r)  * N * D * s
  fwd+bwd  the sum of the two
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

EPS = 1e-5

_HIDDEN = {
    ("tiny", "cpu"): (64, [96, 160]),
    ("quick", "cpu"): (8192, [1024, 2048]),
    ("full", "cpu"): (8192, [512, 1024, 2048, 4096]),
    ("tiny", "cuda"): (256, [256, 1024]),
    ("quick", "cuda"): (16384, [1024, 2048, 4096, 8192]),
    ("full", "cuda"): (32768, [512, 1024, 2048, 4096, 8192, 16384]),
}


def _eager_layer_norm(x, weight, bias, residual=None):
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, EPS)
    return y if residual is None else (y, h)


def _eager_rms_norm(x, weight, residual=None):
    h = x if residual is None else x + residual
    y = F.rms_norm(h, (h.shape[-1],), weight, EPS)
    return y if residual is None else (y, h)


class _NormBench(OpBench):
    families = ("norm",)
    providers = ("torch", "torch_compile", "llmcore_triton", "llmcore_native", "liger")
    unit = "GB/s"
    x_key = "D"
    has_bias = True

    def shapes(self, size_set, device):
        n, hidden = _HIDDEN[(size_set, device)]
        return [{"variant": "residual" if res else "plain", "N": n, "D": d, "residual": res}
                for res in (False, True) for d in hidden]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        n, d = shape["N"], shape["D"]
        inp = {"x": rnd.normal(n, d, dtype=dtype, requires_grad=True),
               "weight": rnd.normal(d, dtype=dtype, requires_grad=True)}
        if self.has_bias:
            inp["bias"] = rnd.normal(d, dtype=dtype, requires_grad=True)
        if shape["residual"]:
            inp["residual"] = rnd.normal(n, d, dtype=dtype, requires_grad=True)
        return inp

    def work(self, shape, dtype, mode):
        r = 1 if shape["residual"] else 0
        per = {"fwd": 2 + 2 * r, "bwd": 3 + r, "fwd+bwd": 5 + 3 * r}[mode]
        return per * shape["N"] * shape["D"] * dtype.itemsize


class LayerNormBench(_NormBench):
    name = "layer_norm"

    def function(self, provider, shape):
        if provider == "torch":
            return _eager_layer_norm
        if provider == "torch_compile":
            return torch.compile(_eager_layer_norm)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(x, weight, bias, residual=None):
                return llmcore.layer_norm(x, (x.shape[-1],), weight, bias, EPS,
                                          residual=residual, backend=backend)
            return fn
        if provider == "liger":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            def fn(x, weight, bias, residual=None):
                # Liger has no fused residual layer norm: the add runs in eager PyTorch
                h = x if residual is None else x + residual
                y = LigerLayerNormFunction.apply(h, weight, bias, EPS)
                return y if residual is None else (y, h)
            return fn
        raise AssertionError(provider)


class RMSNormBench(_NormBench):
    name = "rms_norm"
    has_bias = False

    def function(self, provider, shape):
        if provider == "torch":
            return _eager_rms_norm
        if provider == "torch_compile":
            return torch.compile(_eager_rms_norm)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(x, weight, residual=None):
                return llmcore.rms_norm(x, (x.shape[-1],), weight, EPS, residual=residual,
                                        backend=backend)
            return fn
        if provider == "liger":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            def fn(x, weight, residual=None):
                # Liger's RMSNorm takes no residual here: the add runs in eager PyTorch.
                # Positional (X, W, eps, offset, casting_mode, in_place): in_place=False, or
                # its backward overwrites our reused output gradient.
                h = x if residual is None else x + residual
                y = LigerRMSNormFunction.apply(h, weight, EPS, 0.0, "llama", False)
                return y if residual is None else (y, h)
            return fn
        raise AssertionError(provider)


BENCHES = {"layer_norm": LayerNormBench(), "rms_norm": RMSNormBench()}
