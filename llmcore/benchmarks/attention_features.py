"""Attention with the features SDPA has no fused kernel for: sliding window, softcap, ALiBi,
document masking (packed sequences) and an arbitrary boolean mask.

Providers: "torch" (textbook eager attention with the mask / bias / softcap materialised),
"sdpa" (F.scaled_dot_product_attention with a materialised boolean or additive mask; it has no
softcap), "flex_attention" (torch.compile'd FlexAttention with the equivalent score_mod and
block mask; on the CPU forward only, and without building a graph: it refuses inputs that
require grad there), and llmcore: `attention` (window, softcap, boolean mask),
`flash_attn_func` (ALiBi) and `flash_attn_varlen_func` (documents).

Every variant is causal except bool_mask. Every provider computes the same thing:
  window      keys i - W <= j <= i
  softcap     scores s -> 50 tanh(s / 50) (Gemma 2), causal
  alibi       scores s -> s - slope_h (i - j), slopes 2^(-8 (h + 1) / H), causal
  documents   n_docs packed documents of equal length, causal within each, none across
  bool_mask   a fixed random mask of 64 x 64 blocks, about half of them on, the diagonal blocks
              always on (so every row sees a key)
TFLOP/s counts 4 * B * H * D per visible (query, key) pair in the forward, x2.5 backward, x3.5
fwd+bwd: the work a kernel that skips masked pairs must do (the same count for every provider).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND

SOFTCAP = 50.0
MASK_BLOCK = 64
FEATURES = ("window", "softcap", "alibi", "documents", "bool_mask")


def _shapes(size_set: str, device: str) -> list[dict]:
    if device == "cpu":
        s, h, d = {"tiny": (96, 2, 32), "quick": (512, 4, 64), "full": (1024, 8, 64)}[size_set]
        base = {f: dict(B=1, S=s) for f in FEATURES}
        base["window"]["W"] = s // 4
        base["documents"]["n_docs"] = 4
    elif size_set == "tiny":
        h, d = 4, 64
        base = {f: dict(B=1, S=256) for f in FEATURES}
        base["window"]["W"] = 64
        base["documents"]["n_docs"] = 4
    else:  # 16k-32k tokens, 16 heads of 128 (issue "GPU speed II")
        h, d = 16, 128
        big = 2 if size_set == "full" else 1
        base = {"window": dict(B=big, S=16384, W=4096), "softcap": dict(B=2 * big, S=8192),
                "alibi": dict(B=2 * big, S=8192),
                "documents": dict(B=1, S=16384 * big, n_docs=8 * big),
                "bool_mask": dict(B=2 * big, S=4096)}
    return [{"variant": f, "feature": f, "H": h, "D": d, **base[f]} for f in FEATURES]


def _slopes(h: int, device) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device=device)


def _doc_len(shape) -> int:
    return shape["S"] // shape["n_docs"]


def _random_blocks(s: int, device) -> torch.Tensor:
    """(S, S) bool: 64 x 64 blocks, about half on (fixed seed), the diagonal blocks on."""
    nb = -(-s // MASK_BLOCK)
    g = torch.Generator().manual_seed(1234 + s)
    blocks = torch.rand(nb, nb, generator=g) < 0.5
    blocks |= torch.eye(nb, dtype=torch.bool)
    full = blocks.repeat_interleave(MASK_BLOCK, 0).repeat_interleave(MASK_BLOCK, 1)
    return full[:s, :s].to(device)


def allowed(shape, device) -> torch.Tensor:
    """(S, S) bool: which keys each query sees (the materialised mask of torch and sdpa)."""
    s = shape["S"]
    f = shape["feature"]
    if f == "bool_mask":
        return _random_blocks(s, device)
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    ok = j <= i
    if f == "window":
        ok &= i - j <= shape["W"]
    if f == "documents":
        ok &= (i // _doc_len(shape)) == (j // _doc_len(shape))
    return ok


def visible_pairs(shape) -> int:
    s, f = shape["S"], shape["feature"]
    if f == "bool_mask":
        return int(_random_blocks(s, "cpu").sum())
    if f == "window":
        w = shape["W"]
        return sum(min(i, w) + 1 for i in range(s))
    if f == "documents":
        n = _doc_len(shape)
        return shape["n_docs"] * n * (n + 1) // 2
    return s * (s + 1) // 2


class _Lazy:
    """Per-device cache of a tensor built on first use (masks live on the inputs' device)."""

    def __init__(self, make):
        self.make, self.cache = make, {}

    def __call__(self, device):
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.make(device)
        return self.cache[key]


def _eager(q, k, v, mask, bias, softcap):
    # q, k, v (B, H, S, D); mask (S, S) bool; bias (H, S, S) or None
    s = q @ k.transpose(-2, -1)
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * q.shape[-1] ** -0.5   # fp32 or fp64
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, dim=-1).to(q.dtype)) @ v


class AttentionFeaturesBench(OpBench):
    name = "attention_features"
    families = ("attention",)
    providers = ("torch", "sdpa", "flex_attention", "llmcore_triton", "llmcore_native")
    unit = "TFLOP/s"
    x_key = "S"
    baselines = ("flex_attention", "sdpa")

    def shapes(self, size_set, device):
        return _shapes(size_set, device)

    def skip_reason(self, provider, shape, device, mode):
        if provider == "flex_attention" and device == "cpu":
            if mode != "fwd":
                return "FlexAttention has no backward on the CPU"
            if shape["feature"] == "bool_mask":
                return ("inductor's CPU FlexAttention fails to build a mask_mod that reads a "
                        f"mask tensor (CppCompileError, torch {torch.__version__})")
        if provider == "sdpa" and shape["feature"] == "softcap":
            return "SDPA has no softcap (no mask expresses it)"
        return None

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
        return {n: rnd.normal(b, h, s, d, dtype=dtype, requires_grad=True) for n in "qkv"}

    def function_key(self, shape):
        return tuple(sorted((k, v) for k, v in shape.items() if k != "variant"))

    def function(self, provider, shape):
        f, h, s = shape["feature"], shape["H"], shape["S"]
        mask = _Lazy(lambda dev: allowed(shape, dev))
        softcap = SOFTCAP if f == "softcap" else 0.0

        def alibi_bias(dev):  # (H, S, S) fp32: -slope_h (i - j) (masked pairs get -inf anyway)
            i = torch.arange(s, device=dev)
            return -_slopes(h, dev)[:, None, None] * (i[:, None] - i[None, :]).abs().float()
        bias = _Lazy(alibi_bias)

        if provider == "torch":
            def fn(q, k, v):
                return _eager(q, k, v, mask(q.device), bias(q.device) if f == "alibi" else None,
                              softcap)
            return fn
        if provider == "sdpa":
            def fn(q, k, v):
                m = mask(q.device)
                if f == "alibi":  # additive: the ALiBi bias, -inf where masked
                    m = bias(q.device).masked_fill(~m, float("-inf")).to(q.dtype)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            return fn
        if provider == "flex_attention":
            return self._flex(shape)
        import llmcore

        backend = LLMCORE_BACKEND[provider]
        if f == "alibi":
            def fn(q, k, v):
                out = llmcore.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), causal=True,
                                              alibi_slopes=_slopes(h, q.device), backend=backend)
                return out.transpose(1, 2)
            return fn
        if f == "documents":
            n = _doc_len(shape)

            def fn(q, k, v):
                b = q.shape[0]
                cu = torch.arange(0, b * s + 1, n, dtype=torch.int32, device=q.device)
                pack = lambda t: t.transpose(1, 2).reshape(b * s, h, t.shape[-1])  # noqa: E731
                out = llmcore.flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, n, n,
                                                     causal=True, backend=backend)
                return out.reshape(b, s, h, -1).transpose(1, 2)
            return fn
        if f == "bool_mask":
            return lambda q, k, v: llmcore.attention(q, k, v, attn_mask=mask(q.device),
                                                     backend=backend)
        window = (shape["W"], 0) if f == "window" else (-1, -1)
        return lambda q, k, v: llmcore.attention(q, k, v, is_causal=True, window_size=window,
                                                 softcap=softcap, backend=backend)

    def _flex(self, shape):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        f, h, s = shape["feature"], shape["H"], shape["S"]
        w = shape.get("W", 0)
        doc = _doc_len(shape) if f == "documents" else 0
        dense = _Lazy(lambda dev: allowed(shape, dev))
        slopes = _Lazy(lambda dev: _slopes(h, dev))

        def mask_for(device):
            if f == "bool_mask":
                m = dense(device)

                def mask_mod(b, hh, qi, kj):
                    return m[qi, kj]
            elif f == "window":
                def mask_mod(b, hh, qi, kj):
                    return (kj <= qi) & (qi - kj <= w)
            elif f == "documents":
                def mask_mod(b, hh, qi, kj):
                    return (kj <= qi) & (qi // doc == kj // doc)
            else:
                def mask_mod(b, hh, qi, kj):
                    return kj <= qi
            return create_block_mask(mask_mod, None, None, s, s, device=device)
        block_mask = _Lazy(mask_for)
        compiled = torch.compile(flex_attention)

        def softcap_mod(score, b, hh, qi, kj):
            return SOFTCAP * torch.tanh(score / SOFTCAP)

        def alibi_mod_for(device):
            sl = slopes(device)

            def alibi_mod(score, b, hh, qi, kj):
                return score - sl[hh] * (qi - kj).abs()
            return alibi_mod

        alibi_mod = _Lazy(alibi_mod_for)   # one function per device: compiled once

        def fn(q, k, v):
            score_mod = {"softcap": lambda dev: softcap_mod, "alibi": alibi_mod}.get(
                f, lambda dev: None)(q.device)
            if q.device.type == "cpu":  # no backward there: an inference forward (no graph)
                q, k, v = q.detach(), k.detach(), v.detach()
            return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask(q.device))
        return fn

    def work(self, shape, dtype, mode):
        fwd = 4 * shape["B"] * shape["H"] * shape["D"] * visible_pairs(shape)
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


BENCHES = {"attention_features": AttentionFeaturesBench()}
