"""attention, flash_attn_func and flash_attn_varlen_func on every backend that runs here,
forward and all gradients against a float64 oracle written below (explicit masked softmax)."""
import math

import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import assert_close_to_oracle, kernel_backends

BACKENDS = kernel_backends("attention")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _oracle(q, k, v, *, scale=None, causal=False, window=(-1, -1), bottom_right=False,
            softcap=0.0, mask=None, alibi=None, seg_lens=None):
    """Attention in q's dtype (float64: the oracle; the input dtype: eager PyTorch), computed
    the plain way. q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D/Dv). alibi: slopes (B, Hq). Returns
    (out (B, Hq, Nq, Dv), lse (B, Hq, Nq) with +inf on rows that see no key)."""
    nq, nk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    diag = i + (nk - nq if bottom_right else 0)                  # the aligned diagonal
    left, right = window[0], 0 if causal else window[1]
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= diag - left
    if right >= 0:
        allowed &= j <= diag + right
    if alibi is not None:
        s = s - alibi[:, :, None, None].to(s.dtype) * (diag - j).abs().to(s.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.to(s.dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    empty = ~torch.isfinite(s).any(-1, keepdim=True)             # rows that see no key
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1)
    p = torch.where(empty, torch.zeros_like(p), p)
    lse = torch.logsumexp(s.double(), -1).masked_fill(empty.squeeze(-1), float("inf"))
    return p @ v, lse


def _leaves(shapes, dtype):
    return [torch.randn(s, dtype=dtype).requires_grad_() for s in shapes]


def _check_fwd_bwd(impl, ref, shapes, dtype, *, atol=None):
    """impl(*leaves) -> output under test; ref(*leaves) -> the same computed plainly (run in the
    input dtype for eager, and in float64 for the oracle). Checks the output and every grad."""
    leaves = _leaves(shapes, dtype)
    got = impl(*leaves)
    eager = ref(*leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    oracle = ref(*leaves64)
    assert got.dtype == dtype
    assert_close_to_oracle(got, eager, oracle, name="out")
    seed = torch.randn(oracle.shape, dtype=torch.float64)
    g_got = torch.autograd.grad(got, leaves, seed.to(dtype))
    g_eager = torch.autograd.grad(eager, leaves, seed.to(dtype))
    g_oracle = torch.autograd.grad(oracle, leaves64, seed)
    for name, a, e, o in zip(["dq", "dk", "dv"], g_got, g_eager, g_oracle):
        assert_close_to_oracle(a, e, o, name=name, atol=atol)
    return leaves, got


def _grad_atol(dtype):
    # gradients sum over keys / queries: a few ulps more than the default in float32
    return 1e-5 if dtype == torch.float32 else None


# (B, Hq, Hkv, Nq, Nk, D): head dims 16/48/80, lengths 1/17/97, Nq < Nk and Nq > Nk, GQA
SHAPES = [
    (2, 2, 2, 17, 17, 16),
    (1, 2, 1, 61, 61, 48),
    (2, 2, 1, 1, 17, 80),
    (1, 2, 1, 17, 97, 80),
    (1, 2, 2, 97, 17, 16),
]
BIG = pytest.param((2, 4, 2, 130, 127, 48), marks=pytest.mark.slow)
FEATURES = [
    dict(),
    dict(causal=True),
    dict(window=(5, 3)),
    dict(causal=True, window=(7, -1)),
    dict(softcap=2.5, scale=0.4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [BIG], ids=str)
@pytest.mark.parametrize("feat", FEATURES, ids=str)
def test_attention_matches_oracle(backend, dtype, shape, feat):
    b, hq, hkv, nq, nk, d = shape
    kw = dict(is_causal=feat.get("causal", False), scale=feat.get("scale"),
              window_size=feat.get("window", (-1, -1)), softcap=feat.get("softcap", 0.0))

    def impl(q, k, v):
        return llmcore.attention(q, k, v, enable_gqa=hq != hkv, backend=backend, **kw)

    def ref(q, k, v):
        return _oracle(q, k, v, **feat)[0]

    _check_fwd_bwd(impl, ref, [(b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)], dtype,
                   atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[:2])                    # float16: in the tests above
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("feat", [dict(causal=True), dict(window=(4, 0)), dict(window=(-1, 6)),
                                  dict(alibi="H"), dict(alibi="BH", causal=True),
                                  dict(softcap=1.5, causal=True)], ids=str)
def test_flash_attn_func_matches_oracle(backend, dtype, shape, feat):
    b, hq, hkv, nq, nk, d = shape
    feat = dict(feat)
    slopes = {"H": torch.rand(hq), "BH": torch.rand(b, hq), None: None}[feat.pop("alibi", None)]
    kw = dict(causal=feat.get("causal", False), window_size=feat.get("window", (-1, -1)),
              softcap=feat.get("softcap", 0.0), alibi_slopes=slopes)
    ref_slopes = None if slopes is None else slopes.expand(b, hq)

    def impl(q, k, v):
        return llmcore.flash_attn_func(q, k, v, backend=backend, **kw)

    def ref(q, k, v):
        out = _oracle(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bottom_right=True,
                      alibi=ref_slopes, **feat)[0]
        return out.transpose(1, 2)

    _check_fwd_bwd(impl, ref, [(b, nq, hq, d), (b, nk, hkv, d), (b, nk, hkv, d)], dtype,
                   atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_func_returns_lse(backend, dtype):
    q, k, v = (torch.randn(2, n, 4, 16, dtype=dtype) for n in (17, 5, 5))
    out, lse, probs = llmcore.flash_attn_func(q, k, v, causal=True, return_attn_probs=True,
                                              backend=backend)
    assert probs is None and lse.dtype == torch.float32 and lse.shape == (2, 4, 17)
    want_out, want_lse = _oracle(*(t.double().transpose(1, 2) for t in (q, k, v)), causal=True,
                                 bottom_right=True)
    # bottom-right causal with Nq = 17 > Nk = 5: the first 12 query rows see no key
    assert torch.isinf(lse[:, :, :12]).all() and (lse[:, :, :12] > 0).all()
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out, llmcore.flash_attn_func(q, k, v, causal=True, backend=backend))


def _packed(lens_q, lens_k, hq, hkv, d, dtype):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    shapes = [(sum(lens_q), hq, d), (sum(lens_k), hkv, d), (sum(lens_k), hkv, d)]
    return cu_q, cu_k, shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("feat", [dict(), dict(causal=True), dict(window=(3, 2)),
                                  dict(alibi=True, causal=True), dict(softcap=3.0)], ids=str)
def test_varlen_matches_per_sequence_oracle(backend, dtype, feat):
    # Nq < Nk, Nq > Nk, Nq = Nk = 1, and an empty query sequence
    lens_q, lens_k, hq, hkv, d = [17, 5, 1, 0, 30], [23, 3, 1, 4, 30], 4, 2, 48
    cu_q, cu_k, shapes = _packed(lens_q, lens_k, hq, hkv, d, dtype)
    feat = dict(feat)
    slopes = torch.rand(len(lens_q), hq) if feat.pop("alibi", False) else None
    kw = dict(causal=feat.get("causal", False), window_size=feat.get("window", (-1, -1)),
              softcap=feat.get("softcap", 0.0), alibi_slopes=slopes)

    def impl(q, k, v):
        return llmcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                              backend=backend, **kw)

    def ref(q, k, v):  # loop over sequences; each one as a batch of 1 in (1, H, N, D)
        outs = []
        for b in range(len(lens_q)):
            sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            one = [t[s].transpose(0, 1)[None] for t, s in ((q, sq), (k, sk), (v, sk))]
            a = None if slopes is None else slopes[b:b + 1]
            outs.append(_oracle(*one, bottom_right=True, alibi=a, **feat)[0][0].transpose(0, 1))
        return torch.cat(outs)

    _check_fwd_bwd(impl, ref, shapes, dtype, atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_flash_attn_func_per_sequence(backend):
    lens_q, lens_k = [17, 1, 9], [17, 13, 40]
    cu_q, cu_k, shapes = _packed(lens_q, lens_k, 2, 2, 16, torch.float32)
    q, k, v = (torch.randn(s) for s in shapes)
    out, lse, _ = llmcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 40, causal=True,
                                                 return_attn_probs=True, backend=backend)
    assert out.shape == (27, 2, 16) and lse.shape == (2, 27)
    for b in range(3):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, l, _ = llmcore.flash_attn_func(q[None, sq], k[None, sk], v[None, sk], causal=True,
                                          return_attn_probs=True, backend=backend)
        torch.testing.assert_close(out[sq], o[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[:, sq], l[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive", "key_padding", "padding+causal"])
def test_attention_masks(backend, dtype, kind):
    b, h, nq, nk, d = 2, 2, 17, 23, 16
    if kind == "bool":
        mask = torch.rand(b, 1, nq, nk) > 0.3                    # broadcast over heads
    elif kind == "additive":
        mask = (torch.randn(nq, nk) * 2).to(dtype)               # broadcast over batch and heads
        mask[3, 5:] = float("-inf")
    else:
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool)         # key padding, right-padded
        mask[0, ..., 19:] = False
        mask[1, ..., 7:] = False
    causal = kind == "padding+causal"

    def impl(q, k, v):
        return llmcore.attention(q, k, v, mask, is_causal=causal, backend=backend)

    def ref(q, k, v):
        return _oracle(q, k, v, mask=mask, causal=causal)[0]

    _check_fwd_bwd(impl, ref, [(b, h, nq, d), (b, h, nk, d), (b, h, nk, d)], dtype,
                   atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_mask_gradient(backend, dtype):
    q, k, v = (torch.randn(1, 2, n, 16, dtype=dtype) for n in (5, 7, 7))
    mask = torch.randn(2, 5, 1, dtype=dtype, requires_grad=True)    # broadcast over keys too
    got = torch.autograd.grad(llmcore.attention(q, k, v, mask, backend=backend).sum(), mask)[0]
    mask_big = torch.randn(2, 5, 7, dtype=dtype, requires_grad=True)
    got_big = torch.autograd.grad(
        (llmcore.attention(q, k, v, mask_big, backend=backend) ** 2).sum(), mask_big)[0]
    # a mask constant along keys shifts every score of a row equally: softmax, zero gradient
    assert got.shape == mask.shape and got.abs().max() < 1e-2 * got_big.abs().max()

    def dmask(dt):  # eager (the input dtype) and oracle (float64) gradient of the same loss
        mm = mask_big.detach().to(dt).requires_grad_()
        out = _oracle(q.to(dt), k.to(dt), v.to(dt), mask=mm)[0]
        return torch.autograd.grad((out ** 2).sum(), mm)[0]

    assert_close_to_oracle(got_big, dmask(dtype), dmask(torch.float64), name="dmask")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zero_output_and_gradient(backend, dtype):
    q, k, v = _leaves([(2, 2, 9, 16), (2, 2, 5, 16), (2, 2, 5, 16)], dtype)
    mask = torch.ones(2, 2, 9, 5, dtype=torch.bool)
    mask[0, 1, 4] = False                                        # one row sees nothing
    outs = [
        llmcore.attention(q, k, v, mask, backend=backend)[0, 1, 4],
        # bottom-right causal, Nq = 9 > Nk = 5: query rows 0..3 see no key
        llmcore.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                causal=True, backend=backend)[:, :4],
        # top-left window (1, 0): row i sees keys i-1..i, none of the 5 keys for rows 6..8
        llmcore.attention(q, k, v, window_size=(1, 0), backend=backend)[:, :, 6:],
    ]
    for out in outs:
        assert torch.equal(out, torch.zeros_like(out))
    loss = sum(o.float().sum() for o in outs)
    dq, dk, dv = torch.autograd.grad(loss, [q, k, v])
    assert torch.equal(dq, torch.zeros_like(dq))                 # only empty rows had a gradient
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))
    # and elsewhere the rows are finite with a finite gradient
    full = llmcore.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   causal=True, backend=backend)
    grads = torch.autograd.grad(full.float().sum(), [q, k, v])
    assert torch.isfinite(full).all() and all(torch.isfinite(g).all() for g in grads)
    assert full[:, 4:].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_dim_may_differ(backend):
    def impl(q, k, v):
        return llmcore.attention(q, k, v, is_causal=True, backend=backend)

    def ref(q, k, v):
        return _oracle(q, k, v, causal=True)[0]

    _check_fwd_bwd(impl, ref, [(1, 2, 17, 16), (1, 2, 17, 16), (1, 2, 17, 48)], torch.float32,
                   atol=1e-5)


# ---------------------------------------------------------------------------- torch == SDPA

SDPA_CASES = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, nq=23, nk=9),
    dict(is_causal=True, nq=9, nk=23),
    dict(scale=0.3, nq=9, nk=23),
    dict(mask="bool"),
    dict(mask="float"),
    dict(enable_gqa=True, hkv=1),
    dict(lead=()),
    dict(lead=(2, 3)),
    dict(lead=(2, 3), mask="float", is_causal=False),
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=str)
def test_torch_backend_equals_sdpa(case):
    case = dict(case)
    lead, nq, nk = case.pop("lead", (2,)), case.pop("nq", 17), case.pop("nk", 17)
    hkv, mask = case.pop("hkv", 3), case.pop("mask", None)
    f64 = dict(dtype=torch.float64)
    q = torch.randn(*lead, 3, nq, 16, **f64, requires_grad=True)
    k = torch.randn(*lead, hkv, nk, 16, **f64, requires_grad=True)
    v = torch.randn(*lead, hkv, nk, 24, **f64, requires_grad=True)
    if mask == "bool":
        case["attn_mask"] = torch.rand(nq, nk) > 0.5
        case["attn_mask"][2] = False                            # a fully masked row
    elif mask == "float":
        case["attn_mask"] = torch.randn(3, nq, nk, **f64)
    got = llmcore.attention(q, k, v, backend="torch", **case)
    want = F.scaled_dot_product_attention(q, k, v, **case)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    seed = torch.randn_like(want)
    g_got = torch.autograd.grad(got, [q, k, v], seed)
    g_want = torch.autograd.grad(want, [q, k, v], seed)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- dropout

def _dropout_keep_mask(backend, shape, p):
    """With q = k = 0 every key gets weight 1/Nk, and with v = identity (Dv = Nk) the output
    is the kept pattern itself: out[..., i, j] = keep_ij / (Nk (1 - p))."""
    b, h, nq, nk = shape
    q = torch.zeros(b, h, nq, nk)
    v = torch.eye(nk).expand(b, h, nk, nk)
    out = llmcore.attention(q, q[:, :, :1].expand(b, h, nk, nk), v, dropout_p=p, backend=backend)
    return out, out != 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate_and_scale(backend):
    shape, p = (2, 4, 33, 32), 0.3
    out, keep = _dropout_keep_mask(backend, shape, p)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.02, rate                      # 8448 draws: sd ~0.005
    torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1 / (32 * (1 - p))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_and_matches_oracle(backend):
    shape, p = (1, 2, 17, 32), 0.25
    torch.manual_seed(123)
    _, keep = _dropout_keep_mask(backend, shape, p)
    q, k, v = _leaves([(1, 2, 17, 32), (1, 2, 32, 32), (1, 2, 32, 32)], torch.float32)
    torch.manual_seed(123)                                       # same seed -> same pattern
    got = llmcore.attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(123)
    again = llmcore.attention(q, k, v, dropout_p=p, backend=backend)
    assert torch.equal(got, again)
    other = llmcore.attention(q, k, v, dropout_p=p, backend=backend)
    assert not torch.equal(got, other)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    probs = torch.softmax((q64 @ k64.transpose(-1, -2)) / math.sqrt(32), -1)
    want = (probs * keep / (1 - p)) @ v64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    seed = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [q, k, v], seed.float()),
                    torch.autograd.grad(want, [q64, k64, v64], seed)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- layouts, checks

@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    base = torch.randn(2, 17, 3, 3, 16)                          # a packed qkv projection
    q, k, v = base.unbind(2)                                     # (B, N, H, D), strided
    got = llmcore.flash_attn_func(q, k, v, causal=True, backend=backend)
    want = llmcore.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                                   backend=backend)
    assert got.is_contiguous() and got.shape == (2, 17, 3, 16)
    torch.testing.assert_close(got, want)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))          # (B, H, N, D) views
    torch.testing.assert_close(llmcore.attention(qt, kt, vt, is_causal=True, backend=backend),
                               F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    for shapes in ([(0, 2, 5, 16)] * 3, [(1, 2, 0, 16), (1, 2, 5, 16), (1, 2, 5, 16)],
                   [(1, 2, 5, 16), (1, 2, 0, 16), (1, 2, 0, 16)]):
        q, k, v = _leaves(shapes, torch.float32)
        out = llmcore.attention(q, k, v, backend=backend)
        assert out.shape == shapes[0] and torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert q.grad.shape == q.shape
    cu = torch.zeros(1, dtype=torch.int32)                       # a batch of no sequences
    e = torch.randn(0, 2, 16)
    assert llmcore.flash_attn_varlen_func(e, e, e, cu, cu, 0, 0, backend=backend).shape == e.shape


def _qkv(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes]


Q4 = _qkv((2, 4, 5, 16), (2, 4, 7, 16), (2, 4, 7, 16))
F4 = [t.transpose(1, 2) for t in Q4]                             # flash layout (B, N, H, D)
P3 = _qkv((9, 4, 16), (11, 2, 16), (11, 2, 16))
CU_Q, CU_K = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)


def _attn(**kw):
    args = dict(zip(["query", "key", "value"], Q4))
    return lambda: llmcore.attention(**{**args, **kw})


def _flash(**kw):
    args = dict(zip(["q", "k", "v"], F4))
    return lambda: llmcore.flash_attn_func(**{**args, **kw})


def _varlen(**kw):
    args = dict(zip(["q", "k", "v"], P3), cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K,
                max_seqlen_q=5, max_seqlen_k=6)
    return lambda: llmcore.flash_attn_varlen_func(**{**args, **kw})


@pytest.mark.parametrize("call, exc, words", [
    (_attn(query=Q4[0].long()), TypeError, "query must be a floating"),
    (_attn(key=Q4[1].double()), TypeError, "key must have query's dtype"),
    (_attn(value=Q4[2][0]), ValueError, "value must be 4-dimensional"),
    (_attn(query=Q4[0][0, 0], key=Q4[1][0, 0], value=Q4[2][0, 0]), ValueError, "at least 3-dim"),
    (_attn(key=Q4[1][..., :8]), ValueError, "key's head dim (last dim) must equal query's 16"),
    (_attn(value=Q4[2][:, :, :6]), ValueError, "value must have key's sequence length 7"),
    (_attn(key=Q4[1][:, :2], value=Q4[2][:, :2]), ValueError, "pass enable_gqa=True"),
    (_attn(key=Q4[1][:, :3], value=Q4[2][:, :3], enable_gqa=True), ValueError, "multiple of"),
    (_attn(value=Q4[2][:, :2]), ValueError, "value must have key's number of heads 4"),
    (_attn(attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable to (..., Hq, Nq, Nk) = (2, 4, 5, 7)"),
    (_attn(attn_mask=torch.ones(5, 7, dtype=torch.int64)), TypeError,
     "attn_mask must be bool or query's dtype"),
    (_attn(attn_mask=torch.ones(5, 7, dtype=torch.float64)), TypeError, "attn_mask must be bool"),
    (_attn(dropout_p=1.0), ValueError, "dropout_p must be a float in [0, 1)"),
    (_attn(window_size=(-2, 3)), ValueError, "window_size must be a pair"),
    (_attn(window_size=4), ValueError, "window_size must be a pair"),
    (_attn(softcap=-1.0), ValueError, "softcap must be a float >= 0"),
    (_attn(scale="x"), TypeError, "scale must be None or a float"),
    (_attn(backend="cuda"), ValueError, "backend must be one of"),
    (_flash(q=Q4[0]), ValueError, "k's head dim|q's number of heads"),
    (_flash(q=F4[0][0]), ValueError, "q must be 4-dimensional"),
    (_flash(k=F4[1][:, :, :3], v=F4[2][:, :, :3]), ValueError, "multiple of k's"),
    (_flash(k=F4[1][:1], v=F4[2][:1]), ValueError, "k and v must have q's batch size 2"),
    (_flash(alibi_slopes=torch.rand(3)), ValueError,
     "alibi_slopes must have shape (4,) or (2, 4)"),
    (_flash(softmax_scale=[1.0]), TypeError, "softmax_scale must be None or a float"),
    (_varlen(cu_seqlens_q=CU_Q.float()), TypeError, "cu_seqlens_q must be an integer"),
    (_varlen(cu_seqlens_k=CU_K[None]), ValueError, "cu_seqlens_k must be 1-D"),
    (_varlen(cu_seqlens_k=CU_K[:2]), ValueError, "cu_seqlens_k must have cu_seqlens_q's length"),
    (_varlen(cu_seqlens_q=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError, "start at 0"),
    (_varlen(cu_seqlens_q=torch.tensor([0, 6, 4, 9], dtype=torch.int32),
             cu_seqlens_k=torch.tensor([0, 3, 6, 11], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    (_varlen(cu_seqlens_k=torch.tensor([0, 6, 10], dtype=torch.int32)), ValueError,
     "end at the packed length 11"),
    (_varlen(max_seqlen_q=4), ValueError, "max_seqlen_q must be >= the longest sequence"),
    (_varlen(max_seqlen_k=-1), ValueError, "max_seqlen_k must be an int >= 0"),
    (_varlen(q=P3[0][None]), ValueError, "q must be 3-dimensional"),
    (_varlen(alibi_slopes=torch.rand(3, 4)), ValueError, r"alibi_slopes must have shape"),
])
def test_bad_input_is_named(call, exc, words):
    pattern = words if "|" in words else "".join("\\" + c if c in "()[]." else c for c in words)
    with pytest.raises(exc, match=pattern):
        call()


def test_flash_attn_backend_by_name_reports_why_it_cannot_run():
    with pytest.raises(llmcore.BackendUnavailableError, match="flash_attn.*attention"):
        llmcore.flash_attn_func(*F4, backend="flash_attn")
    with pytest.raises(llmcore.BackendUnavailableError, match="flash_attn"):
        llmcore.attention(*Q4, backend="flash_attn")


# ---------------------------------------------------------------------------- drop-in parity
# Interface differences found by running flash-attn's own tests against llmcore.

@pytest.mark.parametrize("window", [(2, 0), [2, 0], torch.Size([2, 0]), torch.tensor([2, 0]),
                                    torch.tensor([[2], [0]], dtype=torch.int32)], ids=repr)
def test_window_size_accepts_any_two_element_sequence(window):
    q, k, v = (torch.randn(2, 9, 3, 8) for _ in range(3))
    want = llmcore.flash_attn_func(q, k, v, window_size=(2, 0), backend="torch")
    got = llmcore.flash_attn_func(q, k, v, window_size=window, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = llmcore.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            window_size=window, backend="torch")
    want = llmcore.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             window_size=(2, 0), backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("window", [torch.tensor([2.0, 0.0]), torch.tensor([1, 2, 3]),
                                    torch.tensor([True, False]), "20", (2,)], ids=repr)
def test_window_size_refuses_what_is_not_a_pair_of_ints(window):
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        llmcore.flash_attn_func(q, q, q, window_size=window, backend="torch")


def test_varlen_takes_block_table_none_and_refuses_a_paged_table():
    q = torch.randn(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    want = llmcore.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, backend="torch")
    got = llmcore.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, block_table=None,
                                         backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="block_table.*paged"):
        llmcore.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4,
                                       block_table=torch.zeros(2, 1, dtype=torch.int32))
