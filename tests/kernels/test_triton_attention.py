"""The Triton flash-attention kernels (llmcore/kernels/triton/attention.py), called through their
launchers and through the llmcore_triton torch.library ops: forward, dq, dk, dv (and d mask)
against a float64 oracle with the tolerance rule in conftest, every feature and the useful
combinations, dropout statistics, registration (opcheck, torch.compile).

On a machine without CUDA this runs under TRITON_INTERPRET=1 (set by conftest), so shapes are
small but awkward: lengths 1, 17, 97, 130, head dims that are not powers of two."""
import math

import pytest
import torch

from llmcore_testing import HAS_CUDA, assert_close_to_oracle

pytest.importorskip("triton")
A = pytest.importorskip("llmcore.kernels.triton.attention")
import llmcore  # noqa: E402
import llmcore.ops.attention  # noqa: E402,F401  (registers the llmcore_triton ops)

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------- reference

def _reference(q, k, v, *, scale, window=(-1, -1), bottom_right=False, softcap=0.0, mask=None,
               alibi=None, keep=None, dropout_p=0.0):
    """Attention computed plainly in q's dtype (float64: the oracle; the input dtype: eager).
    q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D/Dv); window with causal folded in; alibi (B or 1, Hq);
    keep: the dropout keep mask (B, Hq, Nq, Nk). A row that sees no key gives 0."""
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    diag = i + (nk - nq if bottom_right else 0)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if window[0] >= 0:
        allowed = allowed & (j >= diag - window[0])
    if window[1] >= 0:
        allowed = allowed & (j <= diag + window[1])
    if alibi is not None:
        s = s - alibi[:, :, None, None].to(s.dtype) * (diag - j).abs().to(s.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(s.dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    empty = ~torch.isfinite(s).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v


def _leaves(shapes, dtype):
    return [torch.randn(s, device=DEVICE, dtype=dtype).requires_grad_() for s in shapes]


class _KernelFn(torch.autograd.Function):
    """The launchers wrapped for autograd, so a test calls the kernels with no ops layer."""

    @staticmethod
    def forward(ctx, q, k, v, kw):
        out, lse = A.attention_fwd(q, k, v, **{n: x for n, x in kw.items()
                                               if n != "deterministic"})
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw = kw
        return out

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv, _ = A.attention_bwd(do, *ctx.saved_tensors, **ctx.kw)
        return dq, dk, dv, None


def _check(shapes, dtype, kernel_kw, ref_kw, *, layout="bhnd", atol=None):
    """Forward and dq/dk/dv of the kernels vs the oracle. layout "bnhd" feeds (B, N, H, D)
    memory as transposed (B, H, N, D) views, as flash_attn_func does."""
    leaves = _leaves(shapes, dtype)
    views = leaves if layout == "bhnd" else [t.transpose(1, 2) for t in leaves]
    got = _KernelFn.apply(*views, kernel_kw)
    eager = _reference(*views, **ref_kw)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    views64 = leaves64 if layout == "bhnd" else [t.transpose(1, 2) for t in leaves64]
    oracle = _reference(*views64, **ref_kw)
    assert_close_to_oracle(got, eager, oracle, name="out")
    seed = torch.randn(oracle.shape, device=DEVICE, dtype=torch.float64)
    grads = torch.autograd.grad(got, leaves, seed.to(dtype))
    g_eager = torch.autograd.grad(eager, leaves, seed.to(dtype))
    g_oracle = torch.autograd.grad(oracle, leaves64, seed)
    grad_atol = 1e-5 if dtype == torch.float32 else atol
    for name, a, e, o, leaf in zip(("dq", "dk", "dv"), grads, g_eager, g_oracle, leaves):
        assert a.stride() == leaf.stride(), f"{name}: strides {a.stride()} != {leaf.stride()}"
        assert_close_to_oracle(a, e, o, name=name, atol=grad_atol)


def _kw(d, **extra):
    scale = extra.pop("scale", 1 / math.sqrt(d))
    kernel = dict(scale=scale, **extra)
    ref = {key: val for key, val in kernel.items()
           if key not in ("alibi_slopes", "attn_mask", "deterministic")}
    ref["alibi"] = extra.get("alibi_slopes")
    ref["mask"] = extra.get("attn_mask")
    return kernel, ref


# ---------------------------------------------------------------------------- dense features

# (B, Hq, Hkv, Nq, Nk, D, Dv): every supported odd head dim, lengths 1/17/97/130
SHAPES = [
    (2, 2, 2, 17, 17, 16, 16),
    (1, 2, 1, 97, 130, 48, 48),
    (1, 1, 1, 130, 97, 80, 80),
    (2, 2, 1, 1, 17, 96, 96),
    (1, 2, 2, 17, 1, 112, 112),
    (1, 1, 1, 33, 20, 160, 160),
    (1, 2, 1, 19, 23, 192, 192),
    (1, 1, 1, 18, 21, 256, 256),
    (1, 2, 2, 21, 18, 40, 72),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_head_dims_and_lengths(shape):
    b, hq, hkv, nq, nk, d, dv = shape
    kernel, ref = _kw(d)
    _check([(b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv)], torch.float32, kernel, ref)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 3)], ids=["full", "causal", "band"])
@pytest.mark.parametrize("dims", [(32, 64), (32, 40)], ids=["D32 Dv64", "D32 Dv40"])
def test_interior_tiles_load_unmasked(window, dims):
    # Interior tiles (every key, or every query of the dK/dV loop, inside the sequence) load
    # K/V and Q/dO/lse/delta without a mask when the head dim fills its block (D = 32, 64),
    # and mask only the columns when it is padded (Dv = 40 in a 64 block). 70 queries x 90 keys
    # give the interpreter's 32 x 16 tiles interior and boundary tiles in both directions;
    # GQA, and the flash-attn layout, whose tile offsets use the heads-inside-rows strides
    d, dv = dims
    kernel, ref = _kw(d, window=window)
    _check([(1, 70, 4, d), (1, 90, 2, d), (1, 90, 2, dv)], torch.float32, kernel, ref,
           layout="bnhd")


@pytest.mark.parametrize("scale", [8.0, -8.0, 0.0], ids=["positive", "negative", "zero"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=["full", "causal"])
def test_any_scale_sign(scale, window):
    # interior tiles take the running max on the raw q.k and fold the scale into one fma: the
    # row max of scale * q.k is scale * min(q.k) for a negative scale, and 0 for a zero one.
    # A scale this large makes exp2 overflow (nan) if the shift is not the true max. 70 x 90
    # keys spans interior and boundary tiles of the interpreter's 32 x 16 config.
    shapes = [(1, 2, 70, 24), (1, 2, 90, 24), (1, 2, 90, 24)]
    kernel, ref = _kw(24, scale=scale, window=window)
    q, k, v = (t.detach() for t in _leaves(shapes, torch.float32))
    out, _ = A.attention_fwd(q, k, v, **kernel)
    oracle = _reference(q.double(), k.double(), v.double(), **ref)
    assert_close_to_oracle(out, _reference(q, k, v, **ref), oracle, name="out")
    # the gradients too, at a scale of the same sign small enough for the backward's
    # recomputation from lse to stay within the rule (its error grows with |scale q.k|)
    kernel, ref = _kw(24, scale=scale / 25, window=window)
    _check(shapes, torch.float32, kernel, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16: masks, dropout
@pytest.mark.parametrize("case", [
    dict(),                                                   # plain
    dict(window=(-1, 0)),                                     # causal, top-left
    dict(window=(-1, 0), bottom_right=True),                  # causal, bottom-right
    dict(window=(6, 0)),                                      # sliding window + causal
    dict(window=(4, 9), bottom_right=True),                   # two-sided window
    dict(window=(-1, 3)),                                     # right-only window
    dict(softcap=2.0, scale=0.7),                             # softcap with its derivative
    dict(alibi=True, window=(-1, 0), bottom_right=True),      # ALiBi + causal
    dict(softcap=5.0, alibi=True, window=(9, 2)),             # everything positional
], ids=str)
@pytest.mark.parametrize("sizes", [(37, 61), (61, 37)], ids=["Nq<Nk", "Nq>Nk"])
def test_features_gqa_both_alignments(dtype, case, sizes):
    nq, nk = sizes
    b, hq, hkv, d = 1, 4, 2, 48
    case = dict(case)
    slopes = (torch.rand(1, hq, device=DEVICE) + 0.1) if case.pop("alibi", False) else None
    kernel, ref = _kw(d, alibi_slopes=slopes, **case)
    _check([(b, nq, hq, d), (b, nk, hkv, d), (b, nk, hkv, d)], dtype, kernel, ref,
           layout="bnhd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["key_padding", "bool", "additive", "padding+causal"])
def test_masks_with_gqa(dtype, kind):
    b, hq, hkv, nq, nk, d = 2, 2, 1, 19, 45, 32
    if kind == "bool":
        mask = torch.rand(b, hq, nq, nk, device=DEVICE) > 0.4
        mask[1, 1, 5] = False                                 # a row that sees nothing
    elif kind == "additive":
        mask = (torch.randn(1, hq, nq, nk, device=DEVICE) * 2).to(dtype)
        mask[0, 1, 3, 10:] = float("-inf")
    else:
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device=DEVICE)
        mask[0, ..., 30:] = False
        mask[1, ..., 3:] = False
    window = (-1, 0) if kind == "padding+causal" else (-1, -1)
    kernel, ref = _kw(d, attn_mask=mask, window=window)
    _check([(b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)], dtype, kernel, ref)


def test_additive_mask_gradient():
    q, k, v = _leaves([(2, 2, 17, 16), (2, 1, 23, 16), (2, 1, 23, 16)], torch.float32)
    mask = torch.randn(1, 2, 17, 23, device=DEVICE, requires_grad=True)
    kw = dict(scale=0.25, attn_mask=mask, window=(-1, 0), softcap=3.0)
    out, lse = A.attention_fwd(q, k, v, **kw)
    do = torch.randn_like(out)
    dmask = A.attention_bwd(do, q, k, v, out, lse, mask_grad=True, **kw)[3]
    ref = dict(scale=0.25, mask=mask, window=(-1, 0), softcap=3.0)
    eager = torch.autograd.grad(_reference(q, k, v, **ref), mask, do)[0]
    m64 = mask.detach().double().requires_grad_()
    oracle = torch.autograd.grad(
        _reference(*(t.double() for t in (q, k, v)), **{**ref, "mask": m64}), m64, do.double())[0]
    assert_close_to_oracle(dmask, eager, oracle, name="dmask", atol=1e-5)
    # and through the registered op's autograd, broadcast over the batch
    got = torch.autograd.grad(llmcore.attention(q, k, v, mask[0], enable_gqa=True, softcap=3.0,
                                                is_causal=True, scale=0.25, backend="triton"),
                              mask, do)[0]
    assert_close_to_oracle(got, eager, oracle, name="dmask via op", atol=1e-5)


def test_empty_rows_zero_output_inf_lse_zero_grad():
    q, k, v = _leaves([(1, 2, 20, 16), (1, 2, 7, 16), (1, 2, 7, 16)], torch.float32)
    kw = dict(scale=0.25, window=(-1, 0), bottom_right=True)  # rows 0..12 see no key
    out, lse = A.attention_fwd(q, k, v, **kw)
    assert torch.equal(out[:, :, :13], torch.zeros_like(out[:, :, :13]))
    assert torch.isposinf(lse[:, :, :13]).all() and torch.isfinite(lse[:, :, 13:]).all()
    allowed = torch.ones(20, 7, dtype=torch.bool, device=DEVICE).tril(-13)  # j <= i - 13
    scores = (q @ k.transpose(-1, -2) * 0.25).detach().masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse[:, :, 13:], torch.logsumexp(scores, -1)[:, :, 13:])
    do = torch.zeros_like(out)
    do[:, :, :13] = 1.0
    dq, dk, dv, _ = A.attention_bwd(do, q, k, v, out, lse, **kw)
    for g in (dq, dk, dv):
        assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------------------- varlen

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(window=(-1, 0)), dict(window=(5, 1)),
                                  dict(alibi=True, softcap=4.0),
                                  dict(window=(-1, 0), deterministic=False),
                                  dict(alibi=True, softcap=4.0, deterministic=False)], ids=str)
def test_varlen_per_sequence(dtype, case):
    lens_q, lens_k = [17, 1, 0, 40, 9], [23, 1, 5, 33, 9]    # Nq<Nk, 1, empty, Nq>Nk, equal
    hq, hkv, d = 4, 2, 80
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32,
                        device=DEVICE)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32,
                        device=DEVICE)
    case = dict(case)
    slopes = torch.rand(len(lens_q), hq, device=DEVICE) if case.pop("alibi", False) else None
    deterministic = case.pop("deterministic", True)
    q, k, v = _leaves([(sum(lens_q), hq, d), (sum(lens_k), hkv, d), (sum(lens_k), hkv, d)],
                      dtype)
    kw = dict(scale=d ** -0.5, bottom_right=True, alibi_slopes=slopes, cu_seqlens_q=cu_q,
              cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
              deterministic=deterministic, **case)
    got = _KernelFn.apply(*(t.transpose(0, 1)[None] for t in (q, k, v)), kw)[0].transpose(0, 1)

    def ref(q, k, v):
        outs = []
        for s in range(len(lens_q)):
            sq, sk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
            one = [t[r].transpose(0, 1)[None] for t, r in ((q, sq), (k, sk), (v, sk))]
            outs.append(_reference(*one, scale=d ** -0.5, bottom_right=True,
                                   alibi=None if slopes is None else slopes[s:s + 1],
                                   **case)[0].transpose(0, 1))
        return torch.cat(outs)

    eager = ref(q, k, v)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle = ref(*leaves64)
    assert_close_to_oracle(got, eager, oracle, name="out")
    seed = torch.randn(oracle.shape, device=DEVICE, dtype=torch.float64)
    for name, a, e, o in zip(("dq", "dk", "dv"),
                             torch.autograd.grad(got, (q, k, v), seed.to(dtype)),
                             torch.autograd.grad(eager, (q, k, v), seed.to(dtype)),
                             torch.autograd.grad(oracle, leaves64, seed)):
        assert_close_to_oracle(a, e, o, name=name, atol=1e-5 if dtype == torch.float32 else None)


# ---------------------------------------------------------------------------- dropout

def test_dropout_keep_rate_and_independence():
    p = 0.3
    seed = A.draw_seed(DEVICE)
    keep = A.dropout_mask(seed, p, 2, 3, 61, 67)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # no visible structure: rows, columns and heads keep at the same rate
    for dim in (2, 3):
        per = keep.float().mean(dim)
        sd = math.sqrt(p * (1 - p) / keep.shape[dim])
        assert (per - (1 - p)).abs().max().item() < 6 * sd
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep, A.dropout_mask(A.draw_seed(DEVICE), p, 2, 3, 61, 67))
    assert torch.equal(keep, A.dropout_mask(seed, p, 2, 3, 61, 67))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [dict(), dict(window=(-1, 0), bottom_right=True)], ids=str)
def test_dropout_fwd_bwd_match_reference_with_same_mask(dtype, case):
    b, hq, hkv, nq, nk, d, p = 1, 4, 2, 33, 47, 32, 0.2
    seed = A.draw_seed(DEVICE)
    keep = A.dropout_mask(seed, p, b, hq, nq, nk)
    kernel, ref = _kw(d, dropout_p=p, seed=seed, **case)
    ref.pop("seed")
    _check([(b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)], dtype, kernel,
           dict(ref, keep=keep))


def test_dropout_varlen_uses_mask_of_longest_lengths():
    lens_q, lens_k, h, d, p = [5, 17], [9, 12], 2, 16, 0.4
    cu_q = torch.tensor([0, 5, 22], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 21], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(n, h, d, device=DEVICE) for n in (22, 21, 21))
    seed = A.draw_seed(DEVICE)
    out, _ = A.attention_fwd(*(t.transpose(0, 1)[None] for t in (q, k, v)), scale=0.25,
                             dropout_p=p, seed=seed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=17, max_seqlen_k=12)
    keep = A.dropout_mask(seed, p, 2, h, 17, 12)
    for s in range(2):
        sq, sk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        one = [t[r].transpose(0, 1)[None] for t, r in ((q, sq), (k, sk), (v, sk))]
        want = _reference(*one, scale=0.25, keep=keep[s:s + 1, :, :lens_q[s], :lens_k[s]],
                          dropout_p=p)
        torch.testing.assert_close(out[0, :, sq], want[0])


def test_dropout_unbiased_over_seeds():
    # one query row repeated 256 times: every row draws its own mask (the Philox counter runs
    # over (b, h, i, j)), so the mean over rows is a mean over 256 dropout patterns per seed
    rows, p = 256, 0.5
    q = torch.randn(1, 1, 1, 16, device=DEVICE).expand(1, 1, rows, 16)
    k, v = (torch.randn(1, 1, 9, 16, device=DEVICE) for _ in range(2))
    plain = A.attention_fwd(q[:, :, :1], k, v, scale=0.25)[0][0, 0, 0]
    samples = torch.cat([A.attention_fwd(q, k, v, scale=0.25, dropout_p=p,
                                         seed=A.draw_seed(DEVICE))[0][0, 0] for _ in range(2)])
    assert not torch.equal(samples[0], samples[1])
    # out_d = sum_j P_j v_jd keep_j / (1 - p), keep_j ~ Bernoulli(1 - p): the mean is the plain
    # output and the variance sum_j P_j^2 v_jd^2 p / (1 - p); the mean of 512 must sit within 5
    # of its sd (a kernel without the 1/(1-p) rescale would be off by |plain| / 2)
    probs = torch.softmax((q[0, 0, :1] @ k[0, 0].T) * 0.25, -1)[0]          # (9,)
    sd = ((probs[:, None] ** 2 * v[0, 0] ** 2).sum(0) * p / (1 - p)).sqrt() / math.sqrt(2 * rows)
    err = (samples.mean(0) - plain).abs()
    assert (err < 5 * sd).all(), (err / sd).max()
    assert (plain.abs() / 2 > 10 * sd).any()                                 # bias is visible


def test_dropout_reproducible_from_torch_seed():
    q, k, v = _leaves([(1, 2, 17, 16)] * 3, torch.float32)
    runs = []
    for s in (7, 7, 8):
        torch.manual_seed(s)
        out = llmcore.attention(q, k, v, dropout_p=0.3, backend="triton")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        runs.append((out, *grads))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])


# ---------------------------------------------------------------------------- contract

# ---------------------------------------------------------------------------- deterministic=False

@pytest.mark.parametrize("dtype,case", [
    (torch.float32, dict()),
    (torch.bfloat16, dict(window=(-1, 0), bottom_right=True)),
    (torch.float16, dict(window=(6, 2), softcap=5.0)),
    (torch.float32, dict(window=(-1, 0), alibi=True)),
    (torch.float16, dict(dropout_p=0.2)),
], ids=str)
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_atomic_dq_backward(dtype, case, layout):
    # deterministic=False: dq added atomically by the dk/dv kernel
    _check_one_pass(dtype, case, layout, deterministic=False)


def _check_one_pass(dtype, case, layout, **kw):
    """A case of the one-pass backward (dq added by the dK/dV kernel) against the oracle: GQA,
    Nq != Nk, the (B, H, N, D) or (B, N, H, D) layout; `alibi` and dropout from the case."""
    b, hq, hkv, nq, nk, d = 2, 4, 2, 37, 50, 48
    case = dict(case)
    extra = {}
    if case.pop("alibi", False):
        extra["alibi_slopes"] = torch.rand(b, hq, device=DEVICE)
    if case.get("dropout_p"):
        case["seed"] = A.draw_seed(DEVICE)
    kernel, ref = _kw(d, **kw, **case, **extra)
    if "seed" in ref:
        ref.pop("seed")
        ref["keep"] = A.dropout_mask(case["seed"], case["dropout_p"], b, hq, nq, nk)
    shapes = [(b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)]
    if layout == "bnhd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    _check(shapes, dtype, kernel, ref, layout=layout)


def test_atomic_dq_matches_the_deterministic_path_and_skips_the_dq_kernel(monkeypatch):
    q, k, v = (torch.randn(1, 6, 45, 32, device=DEVICE) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    kw = dict(scale=0.2, window=(-1, 0))
    out, lse = A.attention_fwd(q, k, v, **kw)
    do = torch.randn_like(out)
    launched = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda kernel, *a: launched.append(kernel) or
                        launch(kernel, *a))
    want = A.attention_bwd(do, q, k, v, out, lse, **kw)
    assert launched == [A._dq_kernel, A._dkdv_kernel]
    launched.clear()
    got = A.attention_bwd(do, q, k, v, out, lse, deterministic=False, **kw)
    assert launched == [A._dkdv_atomic_kernel] and got[3] is None
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == w.dtype and a.stride() == w.stride(), name
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)
    # an additive mask's gradient comes from the dq kernel: deterministic=False falls back
    mask = torch.randn(1, 1, 45, 45, device=DEVICE)
    out, lse = A.attention_fwd(q, k, v, attn_mask=mask, **kw)
    launched.clear()
    dmask = A.attention_bwd(do, q, k, v, out, lse, attn_mask=mask, mask_grad=True,
                            deterministic=False, **kw)[3]
    assert launched == [A._dq_kernel, A._dkdv_kernel] and dmask.shape == mask.shape


# ---------------------------------------------------------------------------- the ordered dq

@pytest.fixture
def ordered(monkeypatch):
    """BWD_SCHEDULE "ordered"; yields the list of (LOCK, LOCK_TILES) of each ordered pass."""
    turns = []
    monkeypatch.setattr(A, "BWD_SCHEDULE", "ordered")
    monkeypatch.setattr(A, "_TURNS_HOOK", lambda lock, tiles: turns.append((lock.clone(), tiles)))
    return turns


def _spy_launches(monkeypatch):
    """The (kernel, constexpr kwargs) of every attention launch from here on, in order."""
    launched = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda kernel, *a: launched.append((kernel, a[4])) or
                        launch(kernel, *a))
    return launched


def _all_in_turn(turns):
    # LOCK[0]: set by any add that did not find its turn (under the interpreter, which runs the
    # programs one by one, that can only be a rank that disagrees with the visiting order)
    assert turns and all(int(lock[0]) == 0 for lock, _ in turns)


@pytest.mark.parametrize("dtype,case", [
    (torch.float32, dict(window=(-1, 0))),
    (torch.bfloat16, dict(window=(-1, 0), bottom_right=True)),
    (torch.float16, dict(window=(6, 2), softcap=5.0)),
    (torch.float32, dict(window=(-1, 3), alibi=True)),
    (torch.float16, dict(window=(-1, 0), dropout_p=0.2)),
    (torch.float32, dict()),
    (torch.bfloat16, dict(window=(5, -1), softcap=3.0)),
], ids=str)
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_ordered_dq_backward(ordered, dtype, case, layout):
    # BWD_SCHEDULE "ordered": one dK/dV pass that also adds dq, key tile by key tile in a
    # fixed order
    _check_one_pass(dtype, case, layout)
    _all_in_turn(ordered)


@pytest.mark.parametrize("window,bottom_right", [((-1, 0), False), ((-1, 0), True),
                                                 ((5, 1), True), ((-1, 7), False),
                                                 ((-1, -1), False), ((4, -1), True)], ids=str)
def test_ordered_dq_varlen(ordered, window, bottom_right):
    # packed sequences: Nq < Nk, a single token, an empty query sequence, Nq > Nk
    lens_q, lens_k = [17, 1, 0, 40, 9], [23, 1, 5, 33, 9]
    hq, hkv, d = 4, 2, 40
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32,
                               device=DEVICE) for n in (lens_q, lens_k))
    q = torch.randn(1, hq, sum(lens_q), d, device=DEVICE)
    k, v = (torch.randn(1, hkv, sum(lens_k), d, device=DEVICE) for _ in range(2))
    kw = dict(scale=d ** -0.5, window=window, bottom_right=bottom_right, cu_seqlens_q=cu_q,
              cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    out, lse = A.attention_fwd(q, k, v, **kw)
    do = torch.randn_like(out)
    got = A.attention_bwd(do, q, k, v, out, lse, **kw)
    _all_in_turn(ordered)
    A.BWD_SCHEDULE = "two_pass"
    want = A.attention_bwd(do, q, k, v, out, lse, **kw)
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)


def test_ordered_dq_counts_every_key_tile_and_repeats_its_bits(ordered, monkeypatch):
    # which kernels run for which calls, the turn counters at the end, and the same bits on
    # every run
    b, hq, hkv, nq, nk, d = 1, 6, 2, 70, 90, 32
    q = torch.randn(b, hq, nq, d, device=DEVICE)
    k, v = (torch.randn(b, hkv, nk, d, device=DEVICE) for _ in range(2))
    kw = dict(scale=0.2, window=(9, 0), bottom_right=True)
    out, lse = A.attention_fwd(q, k, v, **kw)
    do = torch.randn_like(out)
    launched = _spy_launches(monkeypatch)
    first = A.attention_bwd(do, q, k, v, out, lse, **kw)
    assert [(kernel, consts["ORDERED_DQ"]) for kernel, consts in launched] == [
        (A._dkdv_ordered_kernel, True)]
    second = A.attention_bwd(do, q, k, v, out, lse, **kw)
    assert all(torch.equal(x, y) for x, y in zip(first[:3], second[:3]))
    _all_in_turn(ordered)
    # each query tile's counter is the number of key tiles that added into it: at least every
    # key tile holding a key that one of its rows sees, at most every key tile
    lock, tiles = ordered[0]
    bm, bn = A._INTERPRET_CONFIG["BLOCK_M"], A._INTERPRET_CONFIG["BLOCK_N"]
    assert int(lock[1]) == math.ceil(nk / bn) * hkv * b     # one ticket per program
    counters = lock[2:].view(b, hq, tiles)[..., :math.ceil(nq / bm)]
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    seen = (j <= i + nk - nq) & (j >= i + nk - nq - 9)
    for t in range(math.ceil(nq / bm)):
        rows = seen[t * bm:(t + 1) * bm].any(0)
        needed = len({int(x) // bn for x in rows.nonzero()})
        assert (counters[..., t] >= needed).all() and (counters[..., t] <= math.ceil(nk / bn)).all()
    assert int(lock[2:].sum()) == int(counters.sum())   # nothing past the sequence's tiles
    A.BWD_SCHEDULE = "two_pass"
    want = A.attention_bwd(do, q, k, v, out, lse, **kw)
    for name, a, w in zip(("dq", "dk", "dv"), first, want):
        assert a.dtype == w.dtype and a.stride() == w.stride(), name
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)


def test_ordered_dq_only_where_it_applies(ordered, monkeypatch):
    # every deterministic backward takes the ordered pass, a boolean mask's included, except an
    # additive mask's gradient (the dq kernel writes it: two-pass); deterministic=False keeps
    # the unordered atomic pass
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    spied = _spy_launches(monkeypatch)
    mask = torch.randn(1, 1, 40, 40, device=DEVICE)
    bool_mask = torch.rand(1, 2, 40, 40, device=DEVICE) > 0.3
    ordered_pass = [(A._dkdv_ordered_kernel, True)]
    for kw, want in [(dict(), ordered_pass), (dict(window=(5, -1)), ordered_pass),
                     (dict(attn_mask=bool_mask), ordered_pass),
                     (dict(window=(-1, 0), attn_mask=mask, mask_grad=True),
                      [(A._dq_kernel, None), (A._dkdv_kernel, False)]),
                     (dict(window=(-1, 0), deterministic=False),
                      [(A._dkdv_atomic_kernel, False)])]:
        fwd_kw = {n: x for n, x in kw.items() if n not in ("mask_grad", "deterministic")}
        out, lse = A.attention_fwd(q, k, v, scale=0.25, **fwd_kw)
        do = torch.randn_like(out)
        spied.clear()
        got = A.attention_bwd(do, q, k, v, out, lse, scale=0.25, **kw)
        assert [(kernel, consts.get("ORDERED_DQ")) for kernel, consts in spied] == want, kw
        monkeypatch.setattr(A, "BWD_SCHEDULE", "two_pass")
        ref = A.attention_bwd(do, q, k, v, out, lse, scale=0.25, **kw)
        monkeypatch.setattr(A, "BWD_SCHEDULE", "ordered")
        for name, a, r in zip(("dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=f"{kw}: {name}")
    assert len(ordered) == 3
    _all_in_turn(ordered)


def test_ordered_dq_gives_up_waiting_and_says_so(ordered, monkeypatch):
    # turns that never come (counters that start at 5): the first wait gives up after the
    # spin limit and sets the status word, the later ones stop at their first look at it, and
    # every add still lands (out of turn): the gradients are right, the order not guaranteed
    monkeypatch.setattr(A, "_SPIN_LIMIT", 2048)
    monkeypatch.setattr(A, "_turn_counters", lambda n, device: torch.tensor(
        [0, 0] + [5] * (n - 2), device=device, dtype=torch.int32))
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    kw = dict(scale=0.25, window=(-1, 0))
    out, lse = A.attention_fwd(q, k, v, **kw)
    do = torch.randn_like(out)
    got = A.attention_bwd(do, q, k, v, out, lse, **kw)
    (lock, _), = ordered
    assert int(lock[0]) == 1
    monkeypatch.setattr(A, "BWD_SCHEDULE", "two_pass")
    want = A.attention_bwd(do, q, k, v, out, lse, **kw)
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)


def test_bwd_schedule_is_checked(monkeypatch):
    monkeypatch.setattr(A, "BWD_SCHEDULE", "fast")
    q, k, v = (torch.randn(1, 1, 8, 16, device=DEVICE) for _ in range(3))
    out, lse = A.attention_fwd(q, k, v, scale=0.25, window=(-1, 0))
    with pytest.raises(ValueError, match="LLMCORE_ATTN_BWD.*'fast'"):
        A.attention_bwd(out, q, k, v, out, lse, scale=0.25, window=(-1, 0))


def test_the_autotuner_runs_once_per_shape_class(monkeypatch):
    # on a GPU the first launch of a shape class goes through triton's autotuner and later ones
    # straight to the JIT kernel with the config it chose (the interpreter has one fixed config,
    # so the GPU route is driven here with stand-ins that record what they are asked to run)
    import triton

    class Jit:
        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))

    class Autotuned:
        def __init__(self):
            self.fn, self.launches, self.best_config = Jit(), [], None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
                self.launches.append((grid(config.all_kwargs()), args, kwargs))
                self.best_config = config
            return run

    monkeypatch.setattr(A, "_INTERPRET", False)
    monkeypatch.setattr(A, "_CHOSEN", {})
    tuned = Autotuned()
    args, consts = (1, 2.0), {"BLOCK_D": 64}
    for key in ("a", "a", "a", "b"):
        A._launch(tuned, lambda meta: A.cdiv(100, meta["BLOCK_M"]), 3, 5, args, consts, key)
    assert tuned.launches == [((2, 3, 5), args, consts), ((2, 3, 5), args, consts)]
    chosen = {"BLOCK_D": 64, "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    assert len(tuned.fn.launches) == 2
    for grid, a, kwargs in tuned.fn.launches:
        assert grid == (2, 3, 5) and a == args
        assert {k: kwargs[k] for k in chosen} == chosen


def test_tuning_log_records_each_choice_with_every_candidates_time(monkeypatch, tmp_path):
    # LLMCORE_TUNING_LOG (set by benchmarks/gpu_check.sh): one JSON line per shape class tuned,
    # with the chosen config and the time of each candidate; later launches add nothing
    import json

    import triton

    best = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    other = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)

    def kernel_fn(*args, **kwargs):
        pass

    class Jit:
        __name__ = "_attn_fwd_kernel"

        def __getitem__(self, grid):
            return kernel_fn

    class Autotuned:
        fn, best_config, bench_time = Jit(), None, 1.5

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.best_config = best
                self.configs_timings = {best: [0.25, 0.24, 0.26], other: [0.5, 0.49, 0.51]}
            return run

    log = tmp_path / "tuning.jsonl"
    monkeypatch.setattr(A, "_INTERPRET", False)
    monkeypatch.setattr(A, "_CHOSEN", {})
    monkeypatch.setattr(A, "_TUNING_LOG", str(log))
    tuned = Autotuned()
    for key in ("a", "a", "b"):
        A._launch(tuned, lambda meta: 1, 3, 5, (), {}, (key, torch.bfloat16))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["key"] for r in records] == [["a", "torch.bfloat16"], ["b", "torch.bfloat16"]]
    first = records[0]
    assert first["kernel"] == "_attn_fwd_kernel" and first["tuning_s"] == 1.5
    assert first["best"] == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    assert sorted((t["BLOCK_M"], t["ms"]) for t in first["timings_ms"]) == [(64, 0.25),
                                                                             (128, 0.5)]


def test_the_tune_key_holds_the_autotuners_key():
    # everything the autotuner keys its choice on (A._AUTOTUNE_KEY and the tensors' dtypes)
    # changes the key the launch cache keeps its choice under
    def key(q_shape=(1, 2, 40, 64), dv=64, dtype=torch.float16, window=(-1, -1), mask=None,
            alibi=None, kv_heads=None):
        q = torch.empty(q_shape, dtype=dtype)
        k_shape = q_shape if kv_heads is None else (q_shape[0], kv_heads) + q_shape[2:]
        k = torch.empty(k_shape, dtype=dtype)
        v = torch.empty(k_shape[:3] + (dv,), dtype=dtype)
        return A._Features(q, k, v, 0.1, window, False, 0.0, alibi, mask, 0.0, None, None,
                           None, None, None).tune_key
    base = key()
    assert key() == base
    others = [key(q_shape=(1, 2, 40, 128)), key(dv=128), key(dtype=torch.bfloat16),
              key(window=(-1, 0)), key(q_shape=(1, 2, 300, 64)),
              key(mask=torch.ones(1, 1, 40, 40, dtype=torch.bool)),
              key(mask=torch.zeros(1, 1, 40, 40, dtype=torch.float16)),
              key(alibi=torch.ones(2)), key(kv_heads=1)]
    assert len({base, *others}) == len(others) + 1


def test_flash_attn_deterministic_flag(monkeypatch):
    # None (the default) and True: the deterministic backward; an explicit False: the atomic
    # one, unless torch.use_deterministic_algorithms is on
    q, k, v = (torch.randn(2, 21, 4, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    calls = []
    bwd = A.attention_bwd
    monkeypatch.setattr(A, "attention_bwd", lambda *a, **kw: calls.append(kw["deterministic"])
                        or bwd(*a, **kw))
    grads = {}
    for flag in (None, True, False):
        out = llmcore.flash_attn_func(q, k, v, causal=True, deterministic=flag, backend="triton")
        grads[flag] = torch.autograd.grad(out.sum(), (q, k, v))
    assert calls == [True, True, False]
    for a, w in zip(grads[False], grads[None]):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    calls.clear()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = llmcore.flash_attn_func(q, k, v, deterministic=False, backend="triton")
    finally:
        torch.use_deterministic_algorithms(was)
    out.sum().backward()
    assert calls == [True]


def test_backward_is_deterministic_with_gqa():
    q, k, v = (torch.randn(1, 8, 45, 32, device=DEVICE) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    kw = dict(scale=0.2, window=(-1, 0))
    out, lse = A.attention_fwd(q, k, v, **kw)
    do = torch.randn_like(out)
    first = A.attention_bwd(do, q, k, v, out, lse, **kw)[:3]
    second = A.attention_bwd(do, q, k, v, out, lse, **kw)[:3]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_grad_route_equals_the_autograd_route():
    # with nothing to differentiate the kernel runs without the autograd.Function: the same
    # bits (flash-attn layout, GQA, a mask, dropout from the same torch seed), nothing attached
    q = torch.randn(1, 19, 4, 16, device=DEVICE)
    k, v = (torch.randn(1, 23, 2, 16, device=DEVICE) for _ in range(2))
    for kw in (dict(causal=True), dict(window_size=(5, 2), softcap=3.0, dropout_p=0.3)):
        def run(*tensors):
            torch.manual_seed(0)
            return llmcore.flash_attn_func(*tensors, backend="triton", **kw)
        want = run(q.clone().requires_grad_(), k, v)
        with torch.no_grad():
            no_grad = run(q.clone().requires_grad_(), k, v)
        for got in (no_grad, run(q, k, v)):
            assert not got.requires_grad and got.stride() == want.stride()
            assert torch.equal(got, want)


def test_rejects_what_it_cannot_run():
    q = torch.randn(1, 1, 4, 272, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        A.attention_fwd(q, q, q, scale=1.0)
    x = torch.randn(1, 1, 4, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(llmcore.BackendUnavailableError, match="float16, bfloat16 and float32"):
        llmcore.attention(x, x, x, backend="triton")
    with pytest.raises(ValueError, match="seed"):
        A.attention_fwd(q[..., :16], q[..., :16], q[..., :16], scale=1.0, dropout_p=0.5)


def _op_args(with_mask=False, varlen=False, dropout=False):
    if varlen:
        q, k, v = (torch.randn(1, 2, 11, 16, device=DEVICE, requires_grad=True) for _ in range(3))
        cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE)
        return (q, k, v, None, torch.rand(1, 2, device=DEVICE), cu, cu, None,
                [0.25, 0.0, 0.0], [-1, 0, 1, 7, 7, 0])  # deterministic=False
    q = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 1, 7, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    mask = torch.randn(2, 1, 5, 7, device=DEVICE, requires_grad=True) if with_mask else None
    seed = A.draw_seed(DEVICE) if dropout else None
    return (q, k, v, mask, None, None, None, seed, [0.3, 2.0, 0.25 if dropout else 0.0],
            [3, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("kind", ["plain", "mask", "varlen", "dropout"])
def test_opcheck(kind):
    args = _op_args(with_mask=kind == "mask", varlen=kind == "varlen", dropout=kind == "dropout")
    torch.library.opcheck(torch.ops.llmcore_triton.attention_fwd.default, args)


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 13, 4, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    slopes = torch.rand(4, device=DEVICE)

    def f(q, k, v):
        return llmcore.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes,
                                       backend="triton")

    eager = f(q, k, v)
    # aot_eager on the CPU: traces the fake impls and the registered autograd without a C++
    # toolchain; inductor where there is a GPU
    backend = "inductor" if HAS_CUDA else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    g1 = torch.autograd.grad(eager.sum(), (q, k, v))
    g2 = torch.autograd.grad(compiled.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- GPU sizes
# Real lengths on a GPU: every head-dim class through the autotuned configs (the tiles that do
# not fit a small sequence are pruned there, so only long sequences reach the big ones), bf16.

@pytest.mark.gpu
@pytest.mark.parametrize("d,dv", [(64, 64), (80, 80), (96, 96), (128, 128), (192, 192),
                                  (256, 256), (128, 64)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_head_dims_at_real_lengths(d, dv, causal):
    b, hq, hkv, n = 2, 4, 2, 1000
    kernel, ref = _kw(d, window=(-1, 0) if causal else (-1, -1))
    _check([(b, hq, n, d), (b, hkv, n, d), (b, hkv, n, dv)], torch.bfloat16, kernel, ref)
