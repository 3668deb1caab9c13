"""Per-call host overhead: every public op on tiny inputs, where the kernels themselves cost
next to nothing, so what is measured is the dispatch: checks, backend choice, autograd, launches.

Variants (each the op as a user calls it, next to its torch.nn.functional / SDPA twin):
  layer_norm      x (4, 64), weight, bias
  rms_norm        x (4, 64), weight, residual (the fused pre-norm add; torch: an eager add)
  cross_entropy   logits (4, 100), target (4,)
  linear_ce       hidden (4, 32), weight (100, 32), target (4,)   (torch: F.linear + F.cross_entropy)
  attention       q, k, v (1, 2, 8, 16), causal                    (torch: SDPA)
  rope            q, k (1, 8, 2, 16), tables (8, 1, 16)            (torch: the eager formula)
  swiglu          x (8, 64) = [gate | up]                          (torch: F.silu(gate) * up)
  gelu            x (4, 64), approximate "tanh"                    (torch: F.gelu)

Timing: each call is timed alone, without L2 flushes or input rotation. `ms` is the wall time
of the call (on CUDA up to a synchronize after it); `cpu_ms` is the process CPU time the call
costs on the host (on CUDA: without waiting for the device). Throughput is calls per second.
Targets (issue "GPU speed I"): native <= 1.5x the torch call on the CPU; on CUDA the Triton
path <= 2x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

_FAMILY = {"layer_norm": "norm", "rms_norm": "norm", "cross_entropy": "cross_entropy",
           "linear_ce": "cross_entropy", "attention": "attention", "rope": "rope",
           "swiglu": "swiglu", "gelu": "gelu"}


class OverheadBench(OpBench):
    name = "overhead"
    families = ("norm", "cross_entropy")     # attention is checked per variant (skip_reason)
    providers = ("torch", "llmcore_native", "llmcore_triton")
    modes = ("fwd", "fwd+bwd")
    unit = "calls/s"
    x_key = ""
    host_timing = True

    def shapes(self, size_set, device):
        return [{"variant": v} for v in _FAMILY]

    def skip_reason(self, provider, shape, device, mode):
        from llmcore.benchmarks import providers

        if provider not in LLMCORE_BACKEND:
            return None
        return providers.probe(provider, (_FAMILY[shape["variant"]],), device)

    def function_key(self, shape):
        return shape["variant"]

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        v = shape["variant"]
        if v in ("layer_norm", "rms_norm"):
            inp = {"x": rnd.normal(4, 64, dtype=dtype, requires_grad=True),
                   "weight": rnd.normal(64, dtype=dtype, requires_grad=True)}
            if v == "layer_norm":
                inp["bias"] = rnd.normal(64, dtype=dtype, requires_grad=True)
            else:
                inp["residual"] = rnd.normal(4, 64, dtype=dtype, requires_grad=True)
            return inp
        if v == "cross_entropy":
            return {"logits": rnd.normal(4, 100, dtype=dtype, requires_grad=True),
                    "target": rnd.integers(100, 4)}
        if v == "linear_ce":
            return {"x": rnd.normal(4, 32, dtype=dtype, requires_grad=True),
                    "weight": rnd.normal(100, 32, dtype=dtype, requires_grad=True),
                    "target": rnd.integers(100, 4)}
        if v == "rope":
            ang = rnd.normal(8, 1, 16, dtype=torch.float32)            # fp32 tables
            return {"q": rnd.normal(1, 8, 2, 16, dtype=dtype, requires_grad=True),
                    "k": rnd.normal(1, 8, 2, 16, dtype=dtype, requires_grad=True),
                    "cos": ang.cos(), "sin": ang.sin()}
        if v == "swiglu":
            return {"x": rnd.normal(8, 64, dtype=dtype, requires_grad=True)}
        if v == "gelu":
            return {"x": rnd.normal(4, 64, dtype=dtype, requires_grad=True)}
        return {k: rnd.normal(1, 2, 8, 16, dtype=dtype, requires_grad=True) for k in "qkv"}

    def work(self, shape, dtype, mode):
        return 1.0  # one call

    def function(self, provider, shape):
        v = shape["variant"]
        if provider == "torch":
            return {
                "layer_norm": lambda x, weight, bias: F.layer_norm(x, (64,), weight, bias),
                "rms_norm": lambda x, weight, residual: _eager_rms_residual(x, weight, residual),
                "cross_entropy": lambda logits, target: F.cross_entropy(logits, target),
                "linear_ce": lambda x, weight, target: F.cross_entropy(F.linear(x, weight), target),
                "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                                           is_causal=True),
                "rope": _eager_rope,
                "swiglu": _eager_swiglu,
                "gelu": lambda x: F.gelu(x, approximate="tanh"),
            }[v]
        import llmcore

        b = LLMCORE_BACKEND[provider]
        return {
            "layer_norm": lambda x, weight, bias: llmcore.layer_norm(x, (64,), weight, bias,
                                                                     backend=b),
            "rms_norm": lambda x, weight, residual: llmcore.rms_norm(x, (64,), weight,
                                                                     residual=residual, backend=b),
            "cross_entropy": lambda logits, target: llmcore.cross_entropy(logits, target,
                                                                          backend=b),
            "linear_ce": lambda x, weight, target: llmcore.linear_cross_entropy(x, weight, target,
                                                                                backend=b),
            "attention": lambda q, k, v: llmcore.attention(q, k, v, is_causal=True, backend=b),
            "rope": lambda q, k, cos, sin: llmcore.rope(q, k, cos, sin, backend=b),
            "swiglu": lambda x: llmcore.swiglu(x, backend=b),
            "gelu": lambda x: llmcore.gelu(x, approximate="tanh", backend=b),
        }[v]


def _eager_rope(q, k, cos, sin):
    from llmcore.benchmarks.rope import _eager_rope as formula
    return formula(q, k, cos, sin)


def _eager_swiglu(x):
    from llmcore.benchmarks.swiglu import _eager_swiglu as formula
    return formula(x)


def _eager_rms_residual(x, weight, residual):
    h = x + residual
    return F.rms_norm(h, (64,), weight), h


BENCHES = {"overhead": OverheadBench()}
