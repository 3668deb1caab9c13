"""attention (B, H, N, D) causal and not, head dims 64/128, GQA; and packed variable-length
attention (flash-attn's varlen API).

TFLOP/s uses the standard count: a forward does 4*B*H*N*N*D floating-point operations (two
N x N x D matmuls), halved when causal; a backward 2.5x the forward, fwd+bwd 3.5x. For varlen
the sum over sequences of 4*H*L*L*D (halved when causal). Every provider gets the same count.

The eager baseline ("torch") is the textbook formulation: scores = q @ k^T * D^-0.5, the causal
mask by masked_fill, softmax in fp32, then @ v, with K/V heads repeated for GQA (as Hugging Face
eager attention does). "sdpa" is F.scaled_dot_product_attention with its default kernel choice.
"llmcore_triton_nondet" is the Triton kernels with flash-attn's deterministic=False (dq added
atomically in the backward), next to "llmcore_triton" (the deterministic default) and
"llmcore_triton_ordered" (deterministic, the backward's dq added atomically in a fixed order:
the Triton attention's BWD_SCHEDULE "ordered").
For varlen, torch and sdpa loop over the packed sequences.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llmcore.benchmarks.harness import OpBench, Rand
from llmcore.benchmarks.providers import LLMCORE_BACKEND


def _scheduled(fn, schedule):
    """fn setting the Triton attention's deterministic backward schedule (BWD_SCHEDULE) at every
    call, for the backward that follows it: `schedule`, or with None the one the process
    started with (BWD_SCHEDULE_AT_START). Every Triton provider sets its own, so one
    provider's choice never carries over to the next."""
    from llmcore.kernels.triton import attention as tri

    schedule = schedule or tri.BWD_SCHEDULE_AT_START

    def call(q, k, v):
        tri.BWD_SCHEDULE = schedule
        return fn(q, k, v)
    return call


def _variant(causal: bool, d: int, h: int, hkv: int) -> str:
    gqa = f" gqa {h}/{hkv}" if hkv != h else ""
    return f"{'causal' if causal else 'full'} d{d}{gqa}"


def _dense(b, h, hkv, d, causal, lengths):
    return [{"variant": _variant(causal, d, h, hkv), "B": b(n), "H": h, "Hkv": hkv, "N": n,
             "D": d, "causal": causal} for n in lengths]


# (size set, device) -> list of shapes
def _attention_shapes(size_set: str, device: str) -> list[dict]:
    if device == "cpu":
        if size_set == "tiny":
            ns, one = [64, 96], (lambda n: 1)
            return (_dense(one, 2, 2, 32, True, ns) + _dense(one, 2, 2, 32, False, ns)
                    + _dense(one, 4, 2, 32, True, ns))
        ns, one = ([512, 1024] if size_set == "quick" else [512, 1024, 2048]), (lambda n: 1)
        shapes = _dense(one, 8, 8, 64, True, ns) + _dense(one, 4, 4, 128, False, ns)
        shapes += _dense(one, 8, 2, 64, True, ns)
        if size_set == "full":
            shapes += _dense(one, 8, 8, 64, False, ns) + _dense(one, 4, 4, 128, True, ns)
        return shapes
    if size_set == "tiny":
        return _dense(lambda n: 2, 4, 4, 64, True, [128, 256]) + _dense(lambda n: 2, 4, 2, 128, False, [128, 256])
    # 16k tokens per batch at model width 2048 (H = 2048 / D), as flash-attention's benchmarks
    ns = [1024, 4096, 8192] if size_set == "quick" else [512, 1024, 2048, 4096, 8192, 16384]
    per_batch = lambda n: max(1, 16384 // n)
    shapes = _dense(per_batch, 32, 32, 64, True, ns) + _dense(per_batch, 16, 16, 128, True, ns)
    shapes += _dense(per_batch, 16, 16, 128, False, ns) + _dense(per_batch, 16, 4, 128, True, ns)
    if size_set == "full":
        shapes += _dense(per_batch, 32, 32, 64, False, ns)
    return shapes


def _eager_attention(q, k, v, causal: bool):
    # q (B, H, N, D), k and v (B, Hkv, N, D)
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5             # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return p @ v                                                       # (B, H, N, D)


def _sdpa(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                          enable_gqa=k.shape[-3] != q.shape[-3])


class AttentionBench(OpBench):
    name = "attention"
    families = ("attention",)
    providers = ("torch", "torch_compile", "sdpa", "llmcore_triton", "llmcore_triton_nondet",
                 "llmcore_triton_ordered", "llmcore_native", "flash_attn")
    unit = "TFLOP/s"
    x_key = "N"
    baselines = ("torch", "sdpa")

    def shapes(self, size_set, device):
        return _attention_shapes(size_set, device)

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        b, h, hkv, n, d = shape["B"], shape["H"], shape["Hkv"], shape["N"], shape["D"]
        return {"q": rnd.normal(b, h, n, d, dtype=dtype, requires_grad=True),
                "k": rnd.normal(b, hkv, n, d, dtype=dtype, requires_grad=True),
                "v": rnd.normal(b, hkv, n, d, dtype=dtype, requires_grad=True)}

    def function_key(self, shape):
        return (shape["causal"],)

    def function(self, provider, shape):
        causal = shape["causal"]
        if provider == "torch":
            return functools.partial(_eager_attention, causal=causal)
        if provider == "torch_compile":
            return torch.compile(functools.partial(_eager_attention, causal=causal))
        if provider == "sdpa":
            return functools.partial(_sdpa, causal=causal)
        if provider == "llmcore_triton_nondet":
            from llmcore import flash_attn_func as llmcore_flash_attn

            def fn(q, k, v):
                # flash_attn_func with deterministic=False: the atomic-dq backward (bottom-right
                # causal is top-left here, Nq == Nk); transposed views, no copies
                out = llmcore_flash_attn(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), causal=causal, deterministic=False,
                                         backend="triton")
                return out.transpose(1, 2)
            return fn
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(q, k, v):
                return llmcore.attention(q, k, v, is_causal=causal,
                                         enable_gqa=k.shape[-3] != q.shape[-3], backend=backend)
            if backend != "triton":
                return fn
            return _scheduled(fn, "ordered" if provider == "llmcore_triton_ordered" else None)
        if provider == "flash_attn":
            from flash_attn import flash_attn_func

            def fn(q, k, v):
                # flash-attn's layout is (B, N, H, D): transposed views, no copies (it needs
                # only a unit stride on D)
                out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      causal=causal)
                return out.transpose(1, 2)
            return fn
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        fwd = 4 * shape["B"] * shape["H"] * shape["N"] ** 2 * shape["D"]
        fwd *= 0.5 if shape["causal"] else 1.0
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


# ---------------------------------------------------------------------------- varlen

def seq_lengths(total: int, n_seqs: int) -> list[int]:
    """Deterministic uneven sequence lengths (each >= 1) summing to `total`."""
    g = torch.Generator().manual_seed(total * 7919 + n_seqs)
    w = torch.rand(n_seqs, generator=g) + 0.25
    lens = [max(1, int(x)) for x in (w / w.sum() * total).tolist()]
    lens[-1] += total - sum(lens)
    if lens[-1] < 1:
        raise ValueError(f"cannot split {total} tokens into {n_seqs} sequences")
    return lens


def _varlen_shapes(size_set: str, device: str) -> list[dict]:
    if device == "cpu":
        h, d, mean = (2, 32, 48) if size_set == "tiny" else (8, 64, 256)
        totals = {"tiny": [96, 192], "quick": [1024, 2048], "full": [1024, 2048, 4096]}[size_set]
    else:
        h, d, mean = (4, 64, 64) if size_set == "tiny" else (16, 128, 1024)
        totals = {"tiny": [256, 512], "quick": [4096, 16384],
                  "full": [4096, 16384, 65536]}[size_set]
    return [{"variant": f"causal d{d} mean len {mean}", "total": t, "n_seqs": max(1, t // mean),
             "H": h, "D": d, "causal": True} for t in totals]


class AttentionVarlenBench(OpBench):
    name = "attention_varlen"
    families = ("attention",)
    providers = ("torch", "sdpa", "llmcore_triton", "llmcore_native", "flash_attn")
    unit = "TFLOP/s"
    x_key = "total"
    baselines = ("torch", "sdpa")

    def shapes(self, size_set, device):
        return _varlen_shapes(size_set, device)

    def inputs(self, shape, dtype, device, seed):
        rnd = Rand(device, seed)
        t, h, d = shape["total"], shape["H"], shape["D"]
        lens = seq_lengths(t, shape["n_seqs"])
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {"q": rnd.normal(t, h, d, dtype=dtype, requires_grad=True),
                "k": rnd.normal(t, h, d, dtype=dtype, requires_grad=True),
                "v": rnd.normal(t, h, d, dtype=dtype, requires_grad=True),
                "cu_seqlens": cu.to(device)}

    def function_key(self, shape):
        return tuple(sorted((k, v) for k, v in shape.items() if k != "variant"))

    def function(self, provider, shape):
        causal = shape["causal"]
        lens = seq_lengths(shape["total"], shape["n_seqs"])
        bounds = [(sum(lens[:i]), sum(lens[:i + 1])) for i in range(len(lens))]
        if provider in ("torch", "sdpa"):
            one = _eager_attention if provider == "torch" else _sdpa

            def fn(q, k, v, cu_seqlens):
                # packed (total, H, D) -> per sequence (1, H, L, D); the bounds are Python ints
                # from the shape, so the loop never reads cu_seqlens back from the device
                outs = [one(*(t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
                            causal=causal)[0].transpose(0, 1) for s, e in bounds]
                return torch.cat(outs)
            return fn
        max_len = max(lens)
        if provider in LLMCORE_BACKEND:
            import llmcore

            backend = LLMCORE_BACKEND[provider]

            def fn(q, k, v, cu_seqlens):
                return llmcore.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len,
                                                      max_len, causal=causal, backend=backend)
            return fn
        if provider == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            def fn(q, k, v, cu_seqlens):
                return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                                              causal=causal)
            return fn
        raise AssertionError(provider)

    def work(self, shape, dtype, mode):
        fwd = sum(4 * shape["H"] * n * n * shape["D"]
                  for n in seq_lengths(shape["total"], shape["n_seqs"]))
        fwd *= 0.5 if shape["causal"] else 1.0
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


BENCHES = {"attention": AttentionBench(), "attention_varlen": AttentionVarlenBench()}
