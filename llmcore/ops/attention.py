"""attention, flash_attn_func and flash_attn_varlen_func: public functions, input checks and
backend dispatch.

Three thin wrappers over one generic op, `_attention_core`, so each backend implements one
function. They differ on purpose, so each is a drop-in for its twin:

- `attention` mirrors F.scaled_dot_product_attention: layout (..., H, N, D); `is_causal` and
  `window_size` aligned top-left (query i sees keys j <= i); bool `attn_mask` True = attend, or
  an additive float mask. Unlike SDPA, `attn_mask` and `is_causal` may be given together (both
  apply), and `window_size` / `softcap` exist.
- `flash_attn_func` / `flash_attn_varlen_func` mirror the flash-attn package: layouts
  (B, N, H, D) and packed (total, H, D); causal and windows aligned bottom-right (query i sees
  keys j <= i + Nk - Nq, per sequence for varlen); ALiBi; GQA by head counts.

Common semantics: scores s = scale * q.k, then softcap * tanh(s / softcap) when softcap > 0,
then ALiBi and the float mask are added, then masked keys removed; window_size=(left, right)
keeps keys j with i + o - left <= j <= i + o + right (o = alignment offset; -1 = unbounded).
A query row that can see no key (every key masked) returns 0 with zero gradients, as SDPA
(torch >= 2.5) and flash-attn do. Dropout is applied whenever dropout_p > 0, like both twins
(modules pass 0 in eval), with torch's RNG on the torch backend.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from llmcore import backends
from llmcore.kernels import reference
from llmcore.ops import _checks


# ---------------------------------------------------------------------------- checks

def _check_qkv(names, q, k, v, ndim=None):
    for name, t in zip(names, (q, k, v)):
        _checks.floating(name, t)
    for name, t in zip(names[1:], (k, v)):
        _checks.same_dtype(name, t, q, names[0])
        _checks.same_device(name, t, q, names[0])
    for name, t in zip(names, (q, k, v)):
        want = q.dim() if ndim is None else ndim
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-dimensional, got shape {tuple(t.shape)}")


def _check_head_dim(name, d):
    # head dim 0 would make the default scale 1/sqrt(D) infinite: refused rather than defined
    if d == 0:
        raise ValueError(f"{name}'s head dim (last dim) must be >= 1, got 0")


def _check_heads(names, q_heads, k_heads, v_heads, *, gqa_flag=None):
    qn, kn, vn = names
    if v_heads != k_heads:
        raise ValueError(f"{vn} must have {kn}'s number of heads {k_heads}, got {v_heads}")
    if q_heads == k_heads:
        return
    if gqa_flag is not None and not gqa_flag:
        raise ValueError(
            f"{qn} has {q_heads} heads and {kn} {k_heads}: pass enable_gqa=True for "
            f"grouped-query attention, or give them the same number of heads"
        )
    if k_heads == 0 or q_heads % k_heads != 0:
        raise ValueError(
            f"{qn}'s number of heads ({q_heads}) must be a multiple of {kn}'s ({k_heads}) "
            f"for grouped-query attention"
        )


def _check_options(dropout_p, window_size, softcap, scale, scale_name):
    # the common call (plain floats, a tuple of ints, no scale) without the ABC isinstance
    # checks below, which cost microseconds per call
    if (type(dropout_p) is float and 0.0 <= dropout_p < 1.0 and scale is None
            and type(softcap) in (float, int) and softcap >= 0 and type(window_size) is tuple
            and len(window_size) == 2 and type(window_size[0]) is int
            and type(window_size[1]) is int and window_size[0] >= -1 and window_size[1] >= -1):
        return window_size
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) \
            or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{scale_name} must be None or a float, got {scale!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap >= 0:
        raise ValueError(f"softcap must be a float >= 0 (0 disables it), got {softcap!r}")
    if isinstance(window_size, torch.Tensor):
        # a 2-element integer tensor, as some callers build it: read on the host (it sizes
        # the kernels' loops), so keep it on the CPU where a loop calls this every step
        if window_size.dtype.is_floating_point or window_size.dtype == torch.bool \
                or window_size.numel() != 2:
            raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 "
                             f"(-1: unbounded), got a tensor of dtype {window_size.dtype} and "
                             f"shape {tuple(window_size.shape)}")
        window_size = tuple(int(w) for w in window_size.reshape(2).tolist())
    # any 2-element sequence (tuple, list, torch.Size, ...), as flash-attn accepts
    ok = (isinstance(window_size, Sequence) and not isinstance(window_size, (str, bytes))
          and len(window_size) == 2 and all(
              isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1
              for w in window_size))
    if not ok:
        raise ValueError(
            f"window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), "
            f"got {window_size!r}"
        )
    return int(window_size[0]), int(window_size[1])


def _check_alibi(alibi_slopes, batch, heads, q):
    """alibi_slopes (H,) or (batch, H), as flash-attn takes them -> (batch, H)."""
    if alibi_slopes is None:
        return None
    _checks.floating("alibi_slopes", alibi_slopes)
    _checks.same_device("alibi_slopes", alibi_slopes, q, "q")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(
            f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), "
            f"got {tuple(alibi_slopes.shape)}"
        )
    return alibi_slopes.expand(batch, heads)


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k):
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _checks.integer(name, cu)
        _checks.same_device(name, cu, q, "q")
        if cu.dim() != 1 or cu.numel() == 0:
            raise ValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k must have cu_seqlens_q's length (batch + 1 = {cu_seqlens_q.numel()}), "
            f"got {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
            raise ValueError(f"{name} must be an int >= 0, got {m!r}")
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        # The value checks below read the offsets on the host: on CUDA that is a device sync
        # on every call, and under torch.compile a graph break, so only eager CPU calls do them.
        return
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        offsets = cu.tolist()
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or offsets[-1] != total or any(n < 0 for n in lengths):
            raise ValueError(
                f"{name} must start at 0, be non-decreasing and end at the packed length "
                f"{total}, got {offsets}"
            )
        if lengths and max(lengths) > max_len:
            side = name[-1]
            raise ValueError(
                f"max_seqlen_{side} must be >= the longest sequence in {name} "
                f"({max(lengths)}), got {max_len}"
            )


# ---------------------------------------------------------------------------- public functions

def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, window_size=(-1, -1), softcap=0.0, backend="auto"):
    """Scaled dot-product attention, like F.scaled_dot_product_attention.

    query (..., Hq, Nq, D), key (..., Hkv, Nk, D), value (..., Hkv, Nk, Dv): any leading batch
    dims, equal across the three (3-D (H, N, D) works); D >= 1 (a head dim of 0 is refused in
    all three attention functions). Returns (..., Hq, Nq, Dv).
    attn_mask: bool (True = attend) or float added to the scores (query's dtype), broadcastable
    to (..., Hq, Nq, Nk). is_causal: query i sees keys j <= i (top-left, as SDPA); may be
    combined with attn_mask. scale: default 1/sqrt(D). enable_gqa: Hq a multiple of Hkv, query
    head h reads kv head h // (Hq // Hkv). window_size=(left, right): keys i-left <= j <= i+right
    (-1 unbounded; is_causal sets right=0). softcap: scores s -> softcap*tanh(s/softcap) (0: off).
    """
    if (_native_attention_fast is not None
            and backends.native_eager("attention", backend, query)):
        out = _native_attention_fast(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                     enable_gqa, window_size, softcap)
        if out is not None:  # the ordinary 4-D call on CPU tensors, checked and run in C++
            return out
    names = ("query", "key", "value")
    _check_qkv(names, query, key, value)
    if query.dim() < 3:
        raise ValueError(f"query must be at least 3-dimensional (H, N, D), got shape "
                         f"{tuple(query.shape)}")
    # shapes as tuples: slicing a torch.Size builds another one, several times the cost
    qs, ks, vs = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    lead = qs[:-3]
    for name, shape in zip(names[1:], (ks, vs)):
        if shape[:-3] != lead:
            raise ValueError(f"{name} must have query's batch dims {lead}, got shape {shape}")
    (hq, nq, d), (hk, nk, dk), (hv, nv, _) = qs[-3:], ks[-3:], vs[-3:]
    if dk != d:
        raise ValueError(f"key's head dim (last dim) must equal query's {d}, got {dk}")
    _check_head_dim("query", d)
    if nv != nk:
        raise ValueError(f"value must have key's sequence length {nk} (dim -2), got {nv}")
    _check_heads(names, hq, hk, hv, gqa_flag=bool(enable_gqa))
    left, right = _check_options(dropout_p, window_size, softcap, scale, "scale")
    if is_causal:
        right = 0
    if attn_mask is not None:
        _checks.tensor("attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool or query's dtype {query.dtype}, "
                            f"got {attn_mask.dtype}")
        _checks.same_device("attn_mask", attn_mask, query, "query")
        target = (*lead, hq, nq, nk)
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attn_mask must be broadcastable to (..., Hq, Nq, Nk) = {target}, "
                             f"got shape {tuple(attn_mask.shape)}")
        # to 4-D, keeping broadcast dims unmaterialised: (B or 1, Hq or 1, Nq or 1, Nk or 1)
        attn_mask = attn_mask[(None,) * (query.dim() - attn_mask.dim())]
        if query.dim() == 3:
            attn_mask = attn_mask[None]
        elif query.dim() > 4:
            attn_mask = attn_mask.expand(*lead, *attn_mask.shape[-3:])
            attn_mask = attn_mask.reshape(math.prod(lead), *attn_mask.shape[-3:])

    # (..., H, N, D) -> (B, H, N, D); 4-D inputs as they are (a reshape per call costs host time)
    four = query.dim() == 4
    q, k, v = (t if four else t.reshape(math.prod(lead), *t.shape[-3:])
               for t in (query, key, value))
    out, _ = _attention_core(
        q, k, v, scale=1.0 / math.sqrt(d) if scale is None else float(scale),
        window=(left, right), bottom_right=False, softcap=float(softcap), attn_mask=attn_mask,
        dropout_p=float(dropout_p), backend=backend)
    return out if four else out.reshape(*lead, *out.shape[-3:])


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=None,
                    return_attn_probs=False, *, backend="auto"):
    """flash-attn's flash_attn_func: q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv),
    Hq a multiple of Hkv. Returns out (B, Nq, Hq, Dv), contiguous.

    causal / window_size align bottom-right: query i sees keys j <= i + Nk - Nq (a row left with
    no key outputs 0). alibi_slopes (Hq,) or (B, Hq): bias -slope * |i + Nk - Nq - j|.
    return_attn_probs=True returns (out, softmax_lse, None): softmax_lse (B, Hq, Nq) float32 is
    the logsumexp of each row's scores (+inf for a row with no allowed key, as flash-attn), with
    no gradient; the attention probabilities themselves are not returned (None).
    deterministic: the backward is deterministic by default (None) and with True, and whenever
    torch.use_deterministic_algorithms is on; an explicit False lets a backend take a faster
    path whose bitwise results may vary between runs (flash-attn's meaning of the flag): the
    Triton backward then adds dq atomically. The torch and native backends are always
    deterministic.
    """
    names = ("q", "k", "v")
    _check_qkv(names, q, k, v, ndim=4)
    (b, _, hq, d), (bk, nk, hk, dk), (bv, nv, hv, _) = q.shape, k.shape, v.shape
    if bk != b or bv != b:
        raise ValueError(f"k and v must have q's batch size {b}, got {bk} and {bv}")
    if dk != d:
        raise ValueError(f"k's head dim (last dim) must equal q's {d}, got {dk}")
    _check_head_dim("q", d)
    if nv != nk:
        raise ValueError(f"v must have k's sequence length {nk} (dim 1), got {nv}")
    _check_heads(names, hq, hk, hv)
    left, right = _check_options(dropout_p, window_size, softcap, softmax_scale, "softmax_scale")
    slopes = _check_alibi(alibi_slopes, b, hq, q)
    if causal:
        right = 0
    # (B, N, H, D) -> (B, H, N, D): views, no copy
    out, lse = _attention_core(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        scale=1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale),
        window=(left, right), bottom_right=True, softcap=float(softcap), alibi_slopes=slopes,
        dropout_p=float(dropout_p), deterministic=_deterministic(deterministic),
        return_lse=bool(return_attn_probs), backend=backend)
    out = out.transpose(1, 2).contiguous()                  # (B, Nq, Hq, Dv)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=None,
                           return_attn_probs=False, block_table=None, *, backend="auto"):
    """flash-attn's flash_attn_varlen_func: sequences packed along dim 0.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b holds rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v
    (int32 (batch + 1,), as flash-attn). max_seqlen_q/k: the longest sequence lengths (used to
    size kernel grids). Each sequence attends only to itself, causal / window_size aligned
    bottom-right per sequence; alibi_slopes (Hq,) or (batch, Hq). Returns out (total_q, Hq, Dv),
    or with return_attn_probs (out, softmax_lse (Hq, total_q) float32, None), and deterministic
    as flash_attn_func.
    block_table: only None (flash-attn's paged KV cache is not supported: a table is refused).
    """
    if block_table is not None:
        raise NotImplementedError(
            "block_table: llmcore's flash_attn_varlen_func has no paged KV cache; pass "
            "block_table=None with k and v packed like q (total_k, Hkv, D)")
    names = ("q", "k", "v")
    _check_qkv(names, q, k, v, ndim=3)
    (_, hq, d), (tk, hk, dk), (tv, hv, _) = q.shape, k.shape, v.shape
    if dk != d:
        raise ValueError(f"k's head dim (last dim) must equal q's {d}, got {dk}")
    _check_head_dim("q", d)
    if tv != tk:
        raise ValueError(f"v must have k's packed length {tk} (dim 0), got {tv}")
    _check_heads(names, hq, hk, hv)
    left, right = _check_options(dropout_p, window_size, softcap, softmax_scale, "softmax_scale")
    _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
    slopes = _check_alibi(alibi_slopes, cu_seqlens_q.numel() - 1, hq, q)
    if causal:
        right = 0
    # (total, H, D) -> (1, H, total, D): one packed "batch" row, views
    out, lse = _attention_core(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        scale=1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale),
        window=(left, right), bottom_right=True, softcap=float(softcap), alibi_slopes=slopes,
        dropout_p=float(dropout_p), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k),
        deterministic=_deterministic(deterministic), return_lse=bool(return_attn_probs),
        backend=backend)
    out = out[0].transpose(0, 1).contiguous()               # (total_q, Hq, Dv)
    return (out, lse[0], None) if return_attn_probs else out


def _deterministic(flag) -> bool:
    """The flash functions' `deterministic`: None (the default) and True mean a deterministic
    backward, as does torch.use_deterministic_algorithms(True); only an explicit False allows
    a nondeterministic one."""
    return flag is None or bool(flag) or torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------- the generic op

def _attention_core(q, k, v, *, scale, window=(-1, -1), bottom_right=False, softcap=0.0,
                    attn_mask=None, alibi_slopes=None, dropout_p=0.0, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, deterministic=True,
                    return_lse=False, backend="auto"):
    """The one op every backend implements; inputs are already checked.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides (the flash layouts
    arrive as transposed views); Hq a multiple of Hkv. scale: float. window: (left, right) ints
    with causal folded in (right=0), -1 unbounded. bottom_right: align the diagonal at
    i + Nk - Nq (per sequence with cu_seqlens) instead of i. softcap: 0 = off. attn_mask: None,
    or bool / q-dtype float, 4-D and broadcastable to (B, Hq, Nq, Nk). alibi_slopes: None or
    (B, Hq) (varlen: (S, Hq)), bias -slope * |i + offset - j|. cu_seqlens_q/k: None, or varlen
    with B == 1, rows packed by these int offsets (S+1,), max_seqlen_q/k their longest
    sequences; never combined with attn_mask. Returns (out (B, Hq, Nq, Dv) in q's dtype, lse
    (B, Hq, Nq) float32 or None); out may be a view of memory in (B, Nq, Hq, Dv) order, which
    makes the flash wrappers' final .contiguous() free.
    """
    name = backends.resolve("attention", backend, q.device)
    return _CORE[name](q, k, v, scale=scale, window=window, bottom_right=bottom_right,
                       softcap=softcap, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                       dropout_p=dropout_p, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                       deterministic=deterministic, return_lse=return_lse)


def _flash_attn_core(q, k, v, *, scale, window, bottom_right, softcap, attn_mask, alibi_slopes,
                     dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     deterministic, return_lse):
    """The core op on the flash-attn package (CUDA, float16/bfloat16)."""
    import flash_attn

    def lacks(feature):
        return backends.BackendUnavailableError(
            f"backend 'flash_attn' cannot run attention {feature}; use backend='torch' or "
            f"'triton'")

    if attn_mask is not None:
        raise lacks("with an attn_mask (flash-attn takes only causal/window_size masks; pad "
                    "with flash_attn_varlen_func instead of a key padding mask)")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise lacks(f"in {q.dtype} (flash-attn runs float16 and bfloat16 only)")
    if v.shape[-1] != q.shape[-1]:
        raise lacks("with value's head dim different from query's")
    if not bottom_right and window != (-1, -1) and q.shape[2] != k.shape[2]:
        raise lacks("with top-left aligned is_causal/window_size and query length != key "
                    "length (flash-attn aligns them bottom-right)")
    kwargs = dict(dropout_p=dropout_p, softmax_scale=scale, causal=window[1] == 0,
                  window_size=window, softcap=softcap, deterministic=deterministic,
                  return_attn_probs=return_lse,
                  alibi_slopes=None if alibi_slopes is None else alibi_slopes.float())
    if cu_seqlens_q is None:
        res = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         **kwargs)
        out, lse = (res[0], res[1]) if return_lse else (res, None)
        return out.transpose(1, 2), lse                       # (B, Hq, Nq, Dv) view
    res = flash_attn.flash_attn_varlen_func(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
        cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k, **kwargs)
    out, lse = (res[0], res[1][None]) if return_lse else (res, None)
    return out.transpose(0, 1)[None], lse


# ---------------------------------------------------------------------------- triton backend
# Eager calls go through _TritonAttention, a plain autograd.Function that launches the kernels
# (llmcore.kernels.triton.attention) directly. torch.compile sees the same kernels as two
# torch.library ops in namespace llmcore_triton (the C++ extension owns `llmcore`): forward
# (q, k, v, ...) -> (out, lse) and backward -> (dq, dk, dv, d attn_mask), with fake impls for
# tracing and the same backward (_attention_grads) registered as the forward's autograd (lse has
# no gradient). The kernels are imported on first use, so importing llmcore never imports
# triton. The dropout seed is drawn before the op, from torch's generator for q's device, and
# passed in: the ops stay pure functions of their inputs (opcheck, torch.compile) and
# torch.manual_seed reproduces a run. Scalars travel packed: floats (scale, softcap, dropout_p),
# ints (window left, window right, bottom_right, max_seqlen_q, max_seqlen_k, deterministic; 0
# for the max lengths when not varlen).

_triton_attention_kernels = None  # llmcore.kernels.triton.attention, once imported


def _triton_kernels():
    # a module global after the first call: an import statement costs a microsecond per call
    global _triton_attention_kernels
    if _triton_attention_kernels is None:
        from llmcore.kernels.triton import attention as kernels
        _triton_attention_kernels = kernels
    return _triton_attention_kernels


def _triton_kwargs(attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, floats, ints):
    scale, softcap, dropout_p = floats
    left, right, bottom_right, max_seqlen_q, max_seqlen_k = ints[:5]   # ints[5]: backward only
    return dict(scale=scale, window=(left, right), bottom_right=bool(bottom_right),
                softcap=softcap, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def _triton_bwd_kernels(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, cu_seqlens_q,
                        cu_seqlens_k, seed, floats, ints, mask_grad):
    # -> (dq, dk, dv, d attn_mask or None)
    return _triton_kernels().attention_bwd(
        grad_out, q, k, v, out, lse, mask_grad=mask_grad, deterministic=bool(ints[5]),
        **_triton_kwargs(attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, floats, ints))


def _attention_save(ctx, inputs, out, lse) -> None:
    """The state the backward needs: q, k, v, out, lse, the optional tensors and the packed
    scalars. Shared by the eager Function and the registered op's autograd."""
    q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, floats, ints = inputs
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, cu_seqlens_q,
                          cu_seqlens_k, seed)
    ctx.floats, ctx.ints = floats, ints


def _attention_grads(ctx, grad_out, attention_bwd):
    """(dq, dk, dv, d attn_mask) + Nones for the slopes, offsets, seed and packed scalars;
    `attention_bwd` is a backend's backward with the op's argument order."""
    if grad_out is None:  # out unused (only lse was read): nothing to propagate
        return (None,) * 10
    mask_grad = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dmask = attention_bwd(grad_out, *ctx.saved_tensors, ctx.floats, ctx.ints,
                                      mask_grad)
    return (dq, dk, dv, dmask if mask_grad else None) + (None,) * 6


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, floats,
                ints):
        out, lse = _triton_kernels().attention_fwd(
            q, k, v, **_triton_kwargs(attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                                      floats, ints))
        _attention_save(ctx, (q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                              seed, floats, ints), out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        return _attention_grads(ctx, grad_out, _triton_bwd_kernels)


@torch.library.custom_op("llmcore_triton::attention_fwd", mutates_args=())
def _triton_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, seed: torch.Tensor | None, floats: list[float],
    ints: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_kernels().attention_fwd(
        q, k, v, **_triton_kwargs(attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                                  floats, ints))


@_triton_attention_fwd.register_fake
def _(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, floats, ints):
    B, H, Nq, _ = q.shape
    kernels = _triton_kernels()
    out = kernels._like_layout(q, (B, H, Nq, v.shape[-1]))  # same strides as the real output
    return out, q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("llmcore_triton::attention_bwd", mutates_args=())
def _triton_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, attn_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, seed: torch.Tensor | None, floats: list[float],
    ints: list[int], mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # -> (dq, dk, dv, d attn_mask); the last is an empty (0,) tensor unless mask_grad
    dq, dk, dv, dmask = _triton_bwd_kernels(grad_out, q, k, v, out, lse, attn_mask,
                                            alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                                            floats, ints, mask_grad)
    return dq, dk, dv, (q.new_empty(0) if dmask is None else dmask)


@_triton_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
      floats, ints, mask_grad):
    kernels = _triton_kernels()
    dq, dk, dv = (kernels._like_layout(t, t.shape) for t in (q, k, v))
    return dq, dk, dv, (torch.empty_like(attn_mask, memory_format=torch.contiguous_format)
                        if mask_grad else q.new_empty(0))


def _triton_op_setup_context(ctx, inputs, output):
    _attention_save(ctx, inputs, *output)


def _triton_op_backward(ctx, grad_out, _grad_lse):
    return _attention_grads(ctx, grad_out, _triton_attention_bwd)


_triton_attention_fwd.register_autograd(_triton_op_backward,
                                        setup_context=_triton_op_setup_context)


def _packed_ints(window, bottom_right, max_seqlen_q, max_seqlen_k) -> list[int]:
    return [int(window[0]), int(window[1]), int(bool(bottom_right)),
            0 if max_seqlen_q is None else int(max_seqlen_q),
            0 if max_seqlen_k is None else int(max_seqlen_k)]


def _triton_core(q, k, v, *, scale, window, bottom_right, softcap, attn_mask, alibi_slopes,
                 dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 deterministic, return_lse):
    """The core op on the Triton kernels; deterministic=False: the one-pass backward that adds
    dq atomically."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise backends.BackendUnavailableError(
            f"backend 'triton' runs attention in float16, bfloat16 and float32, not {q.dtype}; "
            f"use backend='torch'")
    seed = _triton_kernels().draw_seed(q.device) if dropout_p > 0 else None
    args = (q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
            [float(scale), float(softcap), float(dropout_p)],
            [*_packed_ints(window, bottom_right, max_seqlen_q, max_seqlen_k),
             int(bool(deterministic))])
    if torch.compiler.is_compiling():
        out, lse = _triton_attention_fwd(*args)
    elif torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
            or (attn_mask is not None and attn_mask.requires_grad)
            or (alibi_slopes is not None and alibi_slopes.requires_grad)):
        out, lse = _TritonAttention.apply(*args)
    else:
        # nothing to differentiate (inference, evaluation): the kernel alone, without an
        # autograd node (an autograd.Function call costs several microseconds)
        out, lse = _triton_kernels().attention_fwd(q, k, v, **_triton_kwargs(*args[3:]))
    return out, (lse if return_lse else None)


# Backend -> implementation of the core op. Kernel backends add their entries as they land.
_CORE = {"torch": reference.attention, "flash_attn": _flash_attn_core,
         "triton": _triton_core}


# ---------------------------------------------------------------------------- native backend
# llmcore::attention (csrc/torch/attention_ops.cpp) is differentiable in C++: it runs
# llmcore::attention_fwd and records a C++ autograd node whose backward runs
# llmcore::attention_bwd (flash-style CPU kernels: csrc/cpu/attention.cpp), with the same
# arguments as the Triton ops above: packed floats/ints, a dropout seed drawn here from torch's
# generator. One op call from Python, for eager and torch.compile alike. Here: the fake impls
# of the two kernel ops, which torch.compile traces llmcore::attention down to.

def _native_attention_fwd_fake(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                               seed, floats, ints):
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, Nq, H, v.shape[-1])).transpose(1, 2)  # the kernel's (B, Nq, H, Dv) memory
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_empty((B, H, Nq), dtype=lse_dtype)


def _native_grad_like(t):
    """The native backward's gradient layout (attention_ops.cpp, grad_like): (B, N, H, D) in
    memory when t's heads are inner to its rows, else contiguous (B, H, N, D)."""
    if t.stride(1) < t.stride(2):
        return t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2)
    return t.new_empty(t.shape)


def _native_attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes,
                               cu_seqlens_q, cu_seqlens_k, seed, floats, ints, mask_grad):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty(0)
    return _native_grad_like(q), _native_grad_like(k), _native_grad_like(v), dmask


# llmcore._native.attention_eager: `attention`'s ordinary call (4-D CPU tensors, no mask, no
# dropout, options of the usual types) checked and run in one C++ call; None for anything
# else, which takes the Python path (csrc/torch/eager_entry.cpp). None when the build predates it.
_native_attention_fast = None
_native_attention = None  # llmcore._native.attention: llmcore::attention's eager entry point


def _register_native_attention() -> bool:
    global _native_attention, _native_attention_fast
    # loading the extension registers the C++ ops; an older build may predate attention
    if backends.native_module() is None or not hasattr(torch.ops.llmcore, "attention"):
        return False
    torch.library.register_fake("llmcore::attention_fwd")(_native_attention_fwd_fake)
    torch.library.register_fake("llmcore::attention_bwd")(_native_attention_bwd_fake)
    _native_attention = backends.native_module().attention
    _native_attention_fast = getattr(backends.native_module(), "attention_eager", None)
    return True


def _native_core(q, k, v, *, scale, window, bottom_right, softcap, attn_mask, alibi_slopes,
                 dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 deterministic, return_lse):
    """The core op on the C++ CPU kernels (always deterministic: `deterministic` is moot)."""
    if not q.is_cpu:
        raise backends.BackendUnavailableError(
            f"backend 'native' runs attention on CPU tensors only (no CUDA attention kernel "
            f"yet), got {q.device}; use backend='triton' or 'torch'")
    seed = (torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64)
            if dropout_p > 0 else None)
    # the same op either way; dynamo traces torch.ops, eager calls skip its boxed argument path
    op = torch.ops.llmcore.attention.default if torch.compiler.is_compiling() else _native_attention
    out, lse = op(
        q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
        [float(scale), float(softcap), float(dropout_p)],
        _packed_ints(window, bottom_right, max_seqlen_q, max_seqlen_k))
    return out, (lse.float() if return_lse else None)  # lse is fp64 for fp64 inputs


if _register_native_attention():
    _CORE["native"] = _native_core
