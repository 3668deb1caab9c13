"""Float64 oracles and the forward+gradient check shared by the reliability tests.

The oracles are the documented semantics written out plainly (no llmcore code, no fused torch
op where the math fits in a line), evaluated in float64; the "eager" twins are plain PyTorch in
the input's dtype, the yardstick of conftest's tolerance rule (at most 2x eager's error).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import llmcore
import llmcore_testing as conftest
from llmcore_testing import default_atol


# ---------------------------------------------------------------------------- norms

def norm_oracle(kind, x, w, b, eps, res):
    """(y, h) with h = x + res, y = norm(h) over the last dim; in x's dtype (float64 = oracle)."""
    h = x if res is None else x + res
    if kind == "layer":
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        y = (h - mu) / torch.sqrt(var + eps)
    else:
        y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y, h


def norm_eager(kind, x, w, b, eps, res):
    h = x if res is None else x + res
    if kind == "layer":
        return F.layer_norm(h, h.shape[-1:], w, b, eps), h
    return F.rms_norm(h, h.shape[-1:], w, eps), h


def call_norm(kind, x, w, b, eps, res, backend):
    """llmcore's norm with the same (y, h) return shape as the oracles."""
    if kind == "layer":
        out = llmcore.layer_norm(x, x.shape[-1], w, b, eps, residual=res, backend=backend)
    else:
        out = llmcore.rms_norm(x, x.shape[-1], w, eps, residual=res, backend=backend)
    return out if res is not None else (out, None)


# ---------------------------------------------------------------------------- cross-entropy

def ce_oracle(logits, target, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None):
    """cross_entropy's documented semantics for (N, C) logits, in logits' dtype:
    loss_i = (1-e) w[t] (lse - y_t) + e/C sum_c w[c] (lse - y_c) + z lse^2 (valid i),
    "mean" divides the first two terms by sum over valid i of w[t], the z-term by n_valid."""
    y = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    n_classes = y.shape[-1]
    m = y.max(-1, keepdim=True).values.detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = (y - m).exp().sum(-1).log() + m.squeeze(-1)              # (N,)
    logp = y - lse[:, None]
    w = weight.to(y.dtype) if weight is not None else torch.ones(n_classes, dtype=y.dtype)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    w_t = torch.where(valid, w[t], 0.0)
    nll = -logp.gather(-1, t[:, None]).squeeze(-1)
    per = (1 - label_smoothing) * w_t * nll
    if label_smoothing:
        per = per + label_smoothing / n_classes * (-(logp * w).sum(-1))
    per = torch.where(valid, per, 0.0)
    z = torch.where(valid, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return per + z
    if reduction == "sum":
        return per.sum() + z.sum()
    return per.sum() / w_t.sum() + z.sum() / valid.sum()


def ce_eager(logits, target, weight=None, ignore_index=-100, reduction="mean",
             label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Eager PyTorch in logits' dtype: F.cross_entropy plus the z-loss term."""
    y = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(y, target, weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    w_t = weight[torch.where(valid, target, 0)] if weight is not None else torch.ones_like(loss)
    w_t = torch.where(valid, w_t, 0)
    lse = torch.logsumexp(y, dim=-1)
    z = torch.where(valid, z_loss * lse * lse, 0)
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss.sum() + z.sum()
    return loss.sum() / w_t.sum() + z.sum() / valid.sum()


def loss_atol(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """A reduced loss is one rounded number, so eager's error on it can be 0 by luck: allow the
    default atol plus two ulps of the largest finite value."""
    fin = oracle[torch.isfinite(oracle)]
    top = fin.abs().max().item() if fin.numel() else 0.0
    return default_atol(dtype) + 2 * torch.finfo(dtype).eps * top


# ---------------------------------------------------------------------------- attention

def attention_oracle(q, k, v, *, scale=None, window=(-1, -1), bottom_right=False, softcap=0.0,
                     mask=None, alibi=None):
    """Dense attention, q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D/Dv), computed plainly in q's dtype.
    window (left, right) around the diagonal i + o (o = Nk - Nq when bottom_right); alibi (B, Hq)
    slopes; mask bool (True = attend) or additive. A row that sees no key outputs 0."""
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale                            # (B, H, Nq, Nk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    diag = i + (nk - nq if bottom_right else 0)
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if window[0] >= 0:
        allowed &= j >= diag - window[0]
    if window[1] >= 0:
        allowed &= j <= diag + window[1]
    if alibi is not None:
        s = s - alibi[:, :, None, None].to(s.dtype) * (diag - j).abs().to(s.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(s.dtype)
    # softmax over the allowed keys only, by hand: a masked key gets p = 0 exactly, and a nan
    # in row i stays out of the keys row i cannot see (torch.softmax would spread it there)
    allowed = allowed.expand(s.shape)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.detach().amax(-1, keepdim=True) if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))       # only a shift
    e = torch.exp(s - m)                                             # 0 where masked
    l = e.sum(-1, keepdim=True)
    p = torch.where(allowed, e / torch.where(l == 0, torch.ones_like(l), l), 0.0)
    return p @ v                                                     # a row with no key: 0


def attention_eager(q, k, v, **kw):
    """The oracle's math in q's dtype, with the softmax in float32 for half inputs as eager
    SDPA's math path does."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return attention_oracle(q.float(), k.float(), v.float(), **kw).to(q.dtype)
    return attention_oracle(q, k, v, **kw)


def varlen_oracle(q, k, v, cu_q, cu_k, **kw):
    """flash_attn_varlen_func's semantics: each packed sequence on its own, bottom-right."""
    outs = []
    for b in range(cu_q.numel() - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None]          # (1, Hq, Lq, D)
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None]
        outs.append(attention_oracle(qs, ks, vs, bottom_right=True, **kw)[0].transpose(0, 1))
    return torch.cat(outs, 0)


# ---------------------------------------------------------------------------- checks

def assert_close_to_oracle(out, eager, oracle, **kw):
    """conftest's rule, with non-finite values compared exactly (nan == nan, inf == inf) first:
    conftest's own comparison refuses a correct mix of nan and inf. `out` must be non-finite
    exactly where the oracle is, with the same values; the finite rest meets the 2x rule."""
    name = kw.get("name", "output")
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    o64, r64 = out.detach().double(), oracle.detach().double()
    fin = torch.isfinite(r64)
    bad = (torch.isfinite(o64) != fin).nonzero()
    assert bad.numel() == 0, (f"{name}: non-finite pattern differs from the oracle's, first at "
                              f"{tuple(bad[0].tolist())}: got {o64[tuple(bad[0])]}, oracle "
                              f"{r64[tuple(bad[0])]}")
    same = (o64 == r64) | (torch.isnan(o64) & torch.isnan(r64))
    assert bool(same[~fin].all()), f"{name}: non-finite values differ from the oracle's"
    zero = torch.zeros((), dtype=out.dtype)
    conftest.assert_close_to_oracle(out.detach().where(fin, zero), eager.detach().where(fin, zero),
                                    oracle.detach().where(fin, zero.double()), **kw)



def check_fwd_bwd(impl, eager, oracle, leaves, *, grad_names, atol=None, grad_atol=None,
                  out_name="out"):
    """impl/eager/oracle(*leaves) -> one tensor. Checks impl's output and the gradient of every
    leaf that requires grad against the float64 oracle with conftest's rule. grad_names: one
    name per leaf (None leaves and leaves without grad are skipped). Returns impl's output."""
    got = impl(*leaves)
    ref = eager(*leaves)
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                and t.dtype.is_floating_point else t for t in leaves]
    want = oracle(*leaves64)
    assert got.dtype == ref.dtype, f"{out_name}: dtype {got.dtype}, eager {ref.dtype}"
    assert_close_to_oracle(got, ref, want, name=out_name, atol=atol)
    live = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not live:
        return got
    seed = torch.randn(want.shape, dtype=torch.float64)
    g_got = torch.autograd.grad(got, [leaves[i] for i in live], seed.to(got.dtype),
                                allow_unused=True)
    g_ref = torch.autograd.grad(ref, [leaves[i] for i in live], seed.to(ref.dtype),
                                allow_unused=True)
    g_want = torch.autograd.grad(want, [leaves64[i] for i in live], seed, allow_unused=True)
    for i, a, e, o in zip(live, g_got, g_ref, g_want):
        if o is None:
            continue
        assert a is not None, f"{grad_names[i]}: no gradient"
        assert_close_to_oracle(a, e, o, name=grad_names[i], atol=grad_atol)
    return got
