"""Eager PyTorch implementations: the "torch" backend and the semantics every other backend
must match. Differentiable through torch autograd; no input checks here (llmcore.ops checks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- norms

# weight / bias have x's dtype or are float32 (llmcore.ops.norm checks). With a float32
# parameter on a float16/bfloat16 input everything is computed in float32 and the output
# rounded once to the input's dtype (what F's fused mixed-precision path and the kernels do,
# without F.rms_norm's per-call mismatch warning); on a float64 input the parameters are
# widened to float64, which is exact.

def _common_dtype(h, *params):
    """(h, params) in one compute dtype, and the dtype to round the output to."""
    if all(p is None or p.dtype == h.dtype for p in params):
        return h, params, h.dtype
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    return h.to(compute), tuple(None if p is None else p.to(compute) for p in params), h.dtype


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    hc, (w, b), dtype = _common_dtype(h, weight, bias)
    out = F.layer_norm(hc, normalized_shape, w, b, eps).to(dtype)
    return out if residual is None else (out, h)


def rms_norm(x, normalized_shape, weight=None, eps=None, residual=None):
    h = x if residual is None else x + residual
    hc, (w,), dtype = _common_dtype(h, weight)
    if eps is None:  # F's default for h's own dtype, not for the compute dtype
        eps = torch.finfo(h.dtype).eps
    out = F.rms_norm(hc, normalized_shape, w, eps).to(dtype)
    return out if residual is None else (out, h)


# ---------------------------------------------------------------------------- cross-entropy
# Semantics (documented in full in llmcore/ops/cross_entropy.py): logits are first capped to
# softcap*tanh(logits/softcap); the loss is F.cross_entropy's; z_loss adds z_loss*lse^2 per valid
# token (lse = logsumexp of the capped logits), not class-weighted, and "mean" averages it over
# the valid tokens (F's class-weighted denominator applies to F's loss only).

def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None):
    # logits (C,), (N, C) or (N, C, d1, ...); target: logits' shape without the class dim.
    # float16/bfloat16 are computed in float32 and the loss rounded once at the end: F in half
    # precision overflows, e.g. the label-smoothing sum over a 50k vocabulary in float16. weight
    # has logits' dtype or is float32: applied in the compute dtype.
    dtype = logits.dtype
    acc = torch.promote_types(dtype, torch.float32)
    logits = logits.to(acc)
    weight = weight.to(acc) if weight is not None else None
    target = target.long()                                           # F takes int64 only
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    if z_loss == 0:
        return loss.to(dtype)
    class_dim = 1 if logits.dim() > 1 else 0
    valid = target != ignore_index                                   # target's shape
    lse = torch.logsumexp(logits, dim=class_dim)                     # target's shape
    # torch.where, not a product with the mask: ignored tokens get an exact 0 gradient even
    # when the "mean" denominator below is 0 (all tokens ignored), as F.cross_entropy gives.
    z = torch.where(valid, z_loss * lse * lse, 0)
    if reduction == "none":
        return (loss + z).to(dtype)
    if reduction == "sum":
        return (loss + z.sum()).to(dtype)
    return (loss + z.sum() / valid.sum()).to(dtype)


def _rows_loss(y, target, ignore_index, label_smoothing, z_loss):
    """Per-row loss of (capped) logits y (n, V) in the accumulation dtype, with the pieces a
    gradient pass needs: (loss (n,), lse (n,), valid (n,), safe_target (n, 1) int64)."""
    n_classes = y.shape[1]
    valid = target != ignore_index                                   # (n,)
    safe_target = torch.where(valid, target.long(), 0)[:, None]      # (n, 1) int64 for gather
    lse = torch.logsumexp(y, dim=1)                                  # (n,)
    loss = lse - (1.0 - label_smoothing) * y.gather(1, safe_target).squeeze(1)
    if label_smoothing > 0:
        loss = loss - (label_smoothing / n_classes) * y.sum(1)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0), lse, valid, safe_target


def cross_entropy_rows(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                       softcap=None, grad_scale=None):
    """Per-row loss of logits (n, V) against class indices target (n,) and, when grad_scale is
    given, its gradient wrt the logits times grad_scale (a 0-dim or (n,) tensor): the per-chunk
    step of linear_cross_entropy. No class weight. Returns (loss (n,), dlogits (n, V) or None) in
    float32 (float64 for float64 logits); ignored rows have loss 0 and gradient 0. May overwrite
    `logits` (the caller's chunk buffer); a kernel backend's version of this function may return
    dlogits in the logits' dtype, written in place (the chunk loop casts as it needs).

    With y = softcap*tanh(logits/softcap) (or y = logits), lse = logsumexp(y), p = softmax(y),
    e = label_smoothing, t the target:
        loss    = lse - (1-e) y[t] - e/V sum_c y[c] + z_loss lse^2
        dloss/dy = p (1 + 2 z_loss lse) - (1-e) onehot(t) - e/V
        dloss/dlogits = dloss/dy * (1 - (y/softcap)^2)
    """
    n, n_classes = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)
    y = logits.to(acc)                                               # (n, V)
    capped = None
    if softcap is not None:
        capped = y.div_(softcap).tanh_()                             # tanh(logits/softcap)
        y = capped * softcap
    loss, lse, valid, safe_target = _rows_loss(y, target, ignore_index, label_smoothing, z_loss)
    if grad_scale is None:
        return loss, None
    row = torch.where(valid, grad_scale.to(acc), 0).expand(n)        # (n,) scale, 0 if ignored
    dlogits = y.sub_(lse[:, None]).exp_()                            # p, in place over y
    dlogits.mul_((row * (1.0 + 2.0 * z_loss * lse))[:, None])
    dlogits.scatter_add_(1, safe_target, (-(1.0 - label_smoothing) * row)[:, None])
    if label_smoothing > 0:
        dlogits.sub_(((label_smoothing / n_classes) * row)[:, None])
    if capped is not None:
        dlogits.mul_(capped.square_().neg_().add_(1.0))              # d tanh = 1 - tanh^2
    return loss, dlogits


def cross_entropy_rows_lse(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                           softcap=None, grad_scale=None):
    """cross_entropy_rows, also returning the per-row lse (n,) that a later gradient pass
    (cross_entropy_grad_block) starts from: (loss, lse, dlogits or None), float32 (float64 for
    float64 logits). The forward of linear_cross_entropy's vocabulary-blocked path."""
    n, n_classes = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)
    y = logits.to(acc)                                               # (n, V)
    if softcap is not None:
        y = torch.tanh(y / softcap) * softcap
    loss, lse, _, _ = _rows_loss(y, target, ignore_index, label_smoothing, z_loss)
    if grad_scale is None:
        return loss, lse, None
    dlogits = cross_entropy_grad_block(logits, target, lse, 0, n_classes, ignore_index,
                                       label_smoothing, z_loss, softcap, grad_scale)
    return loss, lse, dlogits


def cross_entropy_grad_block(logits, target, lse, col_start, n_classes, ignore_index=-100,
                             label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None):
    """dloss/dlogits * grad_scale for a block of vocabulary columns, from the saved lse.

    logits (n, c): the columns [col_start, col_start + c) of rows whose full width is n_classes;
    target (n,) global class indices; lse (n,) the logsumexp of the whole (capped) row;
    grad_scale 0-dim or (n,). Returns (n, c) in float32 (float64 for float64 logits); ignored
    rows get 0. A kernel backend's version may instead write the gradient over `logits` and
    return that same tensor object (in logits' dtype). Formula as in cross_entropy_rows,
    restricted to the block:
        dloss/dy[c] = p[c] (1 + 2 z_loss lse) - (1-e) [c == t] - e/V,  p[c] = exp(y[c] - lse)
        dloss/dlogits[c] = dloss/dy[c] * (1 - (y[c]/softcap)^2)"""
    n, width = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)
    y = logits.to(acc)                                               # (n, c)
    capped = None
    if softcap is not None:
        capped = torch.tanh(y / softcap)
        y = capped * softcap
    valid = target != ignore_index
    row = torch.where(valid, grad_scale.to(acc), 0).expand(n)        # (n,) scale, 0 if ignored
    local = target.long() - col_start                                # target's column in block
    hit = valid & (local >= 0) & (local < width)                     # target inside this block
    d = (y - lse.to(acc)[:, None]).exp_()                            # p
    d.mul_((row * (1.0 + 2.0 * z_loss * lse.to(acc)))[:, None])
    d.scatter_add_(1, torch.where(hit, local, 0)[:, None],
                   torch.where(hit, -(1.0 - label_smoothing) * row, 0)[:, None])
    if label_smoothing > 0:
        d.sub_(((label_smoothing / n_classes) * row)[:, None])
    if capped is not None:
        d.mul_(capped.square_().neg_().add_(1.0))                    # d tanh = 1 - tanh^2
    return d


# ---------------------------------------------------------------------------- attention
# One generic op that llmcore.attention, flash_attn_func and flash_attn_varlen_func all map onto
# (its contract is documented at llmcore.ops.attention._attention_core). For query row i and
# key j of one sequence, with scale c and diagonal offset o (0 top-left, Nk - Nq bottom-right):
#   s_ij = c * q_i.k_j ;  s_ij = softcap * tanh(s_ij / softcap)   (softcap > 0)
#   s_ij -= slope * |i + o - j|   (ALiBi) ;  s_ij += attn_mask_ij   (float mask)
#   allowed_ij = attn_mask_ij (bool mask) and i + o - left <= j <= i + o + right   (-1: unbounded)
#   p_i = softmax over allowed j of s_i ;  out_i = sum_j dropout(p_ij) v_j
# A row with no allowed key (or every score -inf) has p_i = 0, so out_i = 0 and zero gradients,
# like F.scaled_dot_product_attention and flash-attn. This is a materialised (B, H, Nq, Nk)
# implementation: the oracle semantics, not a fast path.
#
# Varlen (packed sequences) runs as a batch of S sequences padded to max_seqlen_q/k: each
# sequence's softmax and p @ v see only its own rows. One (total_q, total_k) product over all
# packed rows would not do: p = 0 times a nan or inf value of another sequence is nan, so a
# non-finite value would reach every sequence, forward and backward.

def _sequence_layout(cu_seqlens, total, device):
    """For each of `total` packed rows: (sequence index, position inside the sequence).
    cu_seqlens (S+1,) int offsets."""
    rows = torch.arange(total, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    # right=True: a row at a boundary belongs to the next sequence, and empty sequences are skipped
    seq = torch.searchsorted(cu[1:], rows, right=True)
    return seq, rows - cu[seq]


def _pad_sequences(x, cu_seqlens, max_len):
    """Packed rows x (1, H, total, D) -> (S, H, max_len, D), sequence b's rows first and exact
    zeros after its end (differentiable, no host sync). cu_seqlens (S+1,) int offsets."""
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    total = x.shape[2]
    pos = torch.arange(max_len, device=x.device)
    valid = pos[None, :] < (cu[1:] - cu[:-1])[:, None]                  # (S, L)
    # padding gathers an appended zero row (index `total`): exact zeros, also with no rows at
    # all, and nothing of another sequence (a nan there stays there)
    index = torch.where(valid, cu[:-1, None] + pos[None, :], total)     # (S, L)
    rows = torch.cat([x[0], x.new_zeros((x.shape[1], 1, x.shape[3]))], 1)  # (H, total + 1, D)
    return rows[:, index].transpose(0, 1)                               # (S, H, L, D)


def attention(q, k, v, *, scale, window=(-1, -1), bottom_right=False, softcap=0.0,
              attn_mask=None, alibi_slopes=None, dropout_p=0.0, cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False,
              **unused):
    # q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); Hq a multiple of Hkv (GQA: query
    # head h reads kv head h // (Hq / Hkv)). Varlen: B == 1 and rows packed by cu_seqlens_q/k,
    # max_seqlen_q/k at least the longest sequences. `unused` takes the options that only steer
    # kernels (deterministic).
    options = dict(scale=scale, window=window, bottom_right=bottom_right, softcap=softcap,
                   alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=return_lse)
    if cu_seqlens_q is None:
        return _attention_padded(q, k, v, attn_mask=attn_mask, **options)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is None:  # the public API always passes them
            raise ValueError(f"varlen attention needs {name}, the longest sequence's length")
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(device=q.device, dtype=torch.int64)
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(device=q.device, dtype=torch.int64)
    out, lse = _attention_padded(_pad_sequences(q, cu_seqlens_q, max_seqlen_q),
                                 _pad_sequences(k, cu_seqlens_k, max_seqlen_k),
                                 _pad_sequences(v, cu_seqlens_k, max_seqlen_k),
                                 len_q=len_q, len_k=len_k, **options)
    # (S, Hq, Lq, .) -> packed (1, Hq, total_q, .): row r is position pos[r] of sequence seq[r]
    seq, pos = _sequence_layout(cu_seqlens_q, q.shape[2], q.device)
    out = out[seq, :, pos].transpose(0, 1)[None]                        # (1, Hq, total_q, Dv)
    return out, (None if lse is None else lse[seq, :, pos].t()[None])   # (1, Hq, total_q)


def _attention_padded(q, k, v, *, scale, window, bottom_right, softcap, alibi_slopes, dropout_p,
                      return_lse, attn_mask=None, len_q=None, len_k=None):
    # The dense computation. len_q/len_k: None, or (B,) lengths of padded sequences: batch row
    # b holds len_q[b] queries and len_k[b] keys, the rest padding (its keys never seen, its
    # query rows discarded by the caller); bottom-right alignment then uses those lengths.
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    # half-precision inputs: scores, softmax and the output sum in float32, one cast at the end
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if Hq != Hkv:
        kc = kc.repeat_interleave(Hq // Hkv, dim=1)
        vc = vc.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(qc, kc.transpose(-2, -1)) * scale                  # (B, Hq, Nq, Nk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)

    left, right = window
    positional = len_k is not None or left >= 0 or right >= 0 or alibi_slopes is not None
    keep = None                                                         # bool, broadcasts to s
    if positional:
        pos_q = torch.arange(Nq, device=q.device)
        pos_k = torch.arange(Nk, device=q.device)
        offset = 0
        if bottom_right:
            offset = (len_k - len_q)[:, None] if len_k is not None else Nk - Nq
        diag = pos_q[None, :] + offset                                  # (B or 1, Nq)
        rel = pos_k[None, None, :] - diag[:, :, None]                   # (B or 1, Nq, Nk)
        keep = torch.ones_like(rel, dtype=torch.bool)
        if len_k is not None:                                           # padding keys
            keep = keep & (pos_k[None, None, :] < len_k[:, None, None])
        if left >= 0:
            keep = keep & (rel >= -left)
        if right >= 0:
            keep = keep & (rel <= right)
        keep = keep[:, None]                                            # (B or 1, 1, Nq, Nk)
        if alibi_slopes is not None:
            slopes = alibi_slopes.to(compute)[:, :, None, None]         # (B, Hq, 1, 1)
            s = s - slopes * rel[:, None].abs().to(compute)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            s = s + attn_mask.to(compute)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))

    # softmax that maps an all -inf row to 0: the row max is only a shift (no gradient), and 0
    # where the row has no finite score, so exp gives 0 there instead of exp(nan)
    m = s.detach().amax(-1, keepdim=True) if Nk > 0 else s.new_zeros(B, Hq, Nq, 1)
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)                                         # (B, Hq, Nq, 1)
    p = e / l.masked_fill(l == 0, 1.0)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p, training=True)                      # keeps p / (1 - dropout_p)
    out = torch.matmul(p, vc).to(q.dtype)                               # (B, Hq, Nq, Dv)
    if not return_lse:
        return out, None
    # logsumexp of the scores before dropout; +inf for a row with no allowed key (flash-attn's
    # convention, so exp(s - lse) is 0 there in a backward pass)
    lse = (m + torch.log(l)).squeeze(-1).detach().float()
    return out, lse.masked_fill(l.squeeze(-1) == 0, float("inf"))
