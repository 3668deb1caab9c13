"""Edge cases on every backend, forward and every gradient against the float64 oracle:
non-contiguous and expanded (stride-0) inputs, empty batches, every target ignored, a single
row / token / class, sequences of length 1, and sizes at and just past a backend's limits.
"""
import pytest
import torch

import llmcore
from llmcore_testing import kernel_backends
from reliability_oracles import (assert_close_to_oracle, attention_eager, attention_oracle,
                                 call_norm, ce_eager, ce_oracle, check_fwd_bwd, loss_atol,
                                 norm_eager, norm_oracle, varlen_oracle)

NORM = kernel_backends("norm")
CE = kernel_backends("cross_entropy")
ATTN = kernel_backends("attention")


def _grad_atol(dtype):
    return 1e-5 if dtype == torch.float32 else None


# ---------------------------------------------------------------------------- norms

def _norm_check(backend, kind, make, leaves, dtype=torch.float32):
    """make(*leaves) -> (x, w, b, r) as llmcore receives them (views of the leaves)."""
    def run(fn):
        def f(*ls):
            x, w, b, r = make(*ls)
            y, h = fn(kind, x, w, b, 1e-5, r)
            return y if r is None else torch.cat([y, h], -1)
        return f
    return check_fwd_bwd(run(lambda *a: call_norm(*a, backend)), run(norm_eager), run(norm_oracle),
                         leaves, grad_names=[f"grad{i}" for i in range(len(leaves))],
                         grad_atol=_grad_atol(dtype))


LAYOUTS = ["strided-rows", "transposed", "expanded-input", "expanded-residual",
           "strided-weight", "permuted-3d"]


@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_layouts(backend, kind, layout):
    n = 37
    w = (torch.rand(n) + 0.5).requires_grad_()
    b = torch.randn(n, requires_grad=True) if kind == "layer" else None
    if layout == "strided-rows":                      # rows 50 apart, columns 1:38
        base = torch.randn(6, 50, requires_grad=True)
        _norm_check(backend, kind, lambda a, w, b: (a[:, 1:1 + n], w, b, None), [base, w, b])
    elif layout == "transposed":                      # (6, n) with strides (1, 6)
        base = torch.randn(n, 6, requires_grad=True)
        _norm_check(backend, kind, lambda a, w, b: (a.t(), w, b, None), [base, w, b])
    elif layout == "expanded-input":                  # one row repeated: row stride 0
        base = torch.randn(1, n, requires_grad=True)
        _norm_check(backend, kind, lambda a, w, b: (a.expand(5, n), w, b, None), [base, w, b])
    elif layout == "expanded-residual":
        x = torch.randn(5, n, requires_grad=True)
        r = torch.randn(n, requires_grad=True)
        _norm_check(backend, kind, lambda x, r, w, b: (x, w, b, r.expand(5, n)), [x, r, w, b])
    elif layout == "strided-weight":
        x = torch.randn(4, n, requires_grad=True)
        w2 = (torch.rand(2 * n) + 0.5).requires_grad_()
        _norm_check(backend, kind, lambda x, w, b: (x, w[::2], b, None), [x, w2, b])
    else:                                             # (2, 3, n) seen through a permute
        base = torch.randn(3, n, 2, requires_grad=True)
        _norm_check(backend, kind, lambda a, w, b: (a.permute(2, 0, 1), w, b, None), [base, w, b])


@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("rows,n", [(0, 37), (1, 37), (3, 1), (1, 1)])
def test_norm_empty_single_row_single_feature(backend, kind, rows, n):
    x = torch.randn(rows, n, requires_grad=True)
    w = (torch.rand(n) + 0.5).requires_grad_()
    b = torch.randn(n, requires_grad=True) if kind == "layer" else None
    r = torch.randn(rows, n, requires_grad=True)
    got = _norm_check(backend, kind, lambda x, w, b, r: (x, w, b, r), [x, w, b, r])
    assert got.shape == (rows, 2 * n)


@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_bias_without_weight(backend, residual):
    # F.layer_norm(x, shape, weight=None, bias=b) is valid: y = xhat + b
    x = torch.randn(4, 37, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    r = torch.randn(4, 37, requires_grad=True) if residual else None
    _norm_check(backend, "layer", lambda x, b, r: (x, None, b, r), [x, b, r])


@pytest.mark.parametrize("backend", NORM)
def test_norm_zero_features(backend):
    x = torch.randn(3, 0)
    assert llmcore.layer_norm(x, 0, backend=backend).shape == (3, 0)
    assert llmcore.rms_norm(x, (0,), backend=backend).shape == (3, 0)


# the Triton norm keeps a row in registers: 64 KiB at most, 16384 float32 or 32768 bfloat16
@pytest.mark.parametrize("backend", NORM)
@pytest.mark.parametrize("dtype,limit", [(torch.float32, 16384), (torch.bfloat16, 32768)])
def test_norm_rows_at_and_past_the_size_limit(backend, dtype, limit):
    w = torch.rand(limit + 1, dtype=dtype) + 0.5
    x = torch.randn(1, limit, dtype=dtype, requires_grad=True)
    _norm_check(backend, "rms", lambda x: (x, w[:limit], None, None), [x], dtype=dtype)
    x = torch.randn(1, limit + 1, dtype=dtype)
    if backend == "triton":
        with pytest.raises(ValueError, match=rf"rms_norm on the triton backend: the normalised "
                                             rf"size {limit + 1} in {dtype}.*at most 65536 bytes"):
            llmcore.rms_norm(x, limit + 1, w, backend=backend)
    else:
        got = llmcore.rms_norm(x, limit + 1, w, backend=backend)
        want = norm_oracle("rms", x.double(), w.double(), None, torch.finfo(dtype).eps, None)[0]
        assert_close_to_oracle(got, norm_eager("rms", x, w, None, torch.finfo(dtype).eps, None)[0],
                               want)


# ---------------------------------------------------------------------------- cross-entropy

def _ce_check(backend, make, leaves, dtype=torch.float32, **kw):
    """make(*leaves) -> (logits (N, C), target (N,)) as llmcore receives them."""
    def run(fn):
        return lambda *ls: fn(*make(*ls), **kw)
    want_scale = torch.tensor(20.0)
    return check_fwd_bwd(run(lambda x, t, **k: llmcore.cross_entropy(x, t, backend=backend, **k)),
                         run(ce_eager), run(ce_oracle), leaves,
                         grad_names=[f"grad{i}" for i in range(len(leaves))],
                         atol=loss_atol(want_scale, dtype), grad_atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", CE)
@pytest.mark.parametrize("layout", ["transposed", "expanded-logits", "strided-rows", "class-dim-1"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_logit_layouts(backend, layout, reduction):
    c = 37
    t = torch.randint(0, c, (6,))
    if layout == "transposed":                        # (6, C) with strides (1, 6)
        base = torch.randn(c, 6, requires_grad=True)
        _ce_check(backend, lambda a, t: (a.t(), t), [base, t], reduction=reduction)
    elif layout == "expanded-logits":                 # every row the same storage
        base = torch.randn(1, c, requires_grad=True)
        _ce_check(backend, lambda a, t: (a.expand(6, c), t), [base, t], reduction=reduction,
                  label_smoothing=0.1)
    elif layout == "strided-rows":
        base = torch.randn(6, 2 * c + 3, requires_grad=True)
        _ce_check(backend, lambda a, t: (a[:, 3:3 + 2 * c:2], t), [base, t], reduction=reduction,
                  z_loss=1e-3)
    else:                                             # (N, C, d) logits: classes not innermost
        x = torch.randn(2, c, 3, requires_grad=True)
        tt = torch.randint(0, c, (2, 3))
        _ce_check(backend, lambda x, t: (x.movedim(1, -1).reshape(-1, c), t.reshape(-1)),
                  [x, tt], reduction=reduction)
        got = llmcore.cross_entropy(x, tt, reduction=reduction, backend=backend)
        want = ce_oracle(x.double().movedim(1, -1).reshape(-1, c), tt.reshape(-1),
                         reduction=reduction)
        assert_close_to_oracle(got.reshape(want.shape),
                               ce_eager(x.movedim(1, -1).reshape(-1, c), tt.reshape(-1),
                                        reduction=reduction), want, atol=1e-6)


@pytest.mark.parametrize("backend", CE)
@pytest.mark.parametrize("layout", ["strided", "expanded", "column"])
def test_cross_entropy_target_layouts(backend, layout):
    c = 37
    x = torch.randn(6, c, requires_grad=True)
    big = torch.randint(0, c, (12,))
    t = {"strided": big[::2],                          # stride 2
         "expanded": big[3:4].expand(6),               # stride 0, inside a larger storage
         "column": big.reshape(6, 2)[:, 1]}[layout]    # a column of a (6, 2) matrix
    _ce_check(backend, lambda x, t: (x, t), [x, t], reduction="none")


@pytest.mark.parametrize("backend", CE)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("extras", [{}, dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)])
def test_cross_entropy_all_ignored_and_empty(backend, weighted, extras):
    """Every target ignored, or no tokens: "mean" is nan (0/0, as F.cross_entropy), "sum" 0,
    "none" zeros; all gradients exactly 0. The same on every backend."""
    c = 11
    w = torch.rand(c) + 0.5 if weighted else None
    for n in (0, 4):
        x = torch.randn(n, c, requires_grad=True)
        t = torch.full((n,), -100)
        for reduction in ("none", "mean", "sum"):
            got = llmcore.cross_entropy(x, t, w, reduction=reduction, backend=backend, **extras)
            if reduction == "none":
                assert got.shape == (n,) and bool((got == 0).all())
            elif reduction == "sum":
                assert got.shape == () and got.item() == 0.0
            else:
                assert got.shape == () and torch.isnan(got)
            assert got.dtype == x.dtype
            g, = torch.autograd.grad(got.sum(), x)
            assert g.shape == (n, c) and bool((g == 0).all()), f"{reduction}: nonzero gradient"
            # eager agrees (the values are the documented ones, not a backend's choice)
            ref = torch.nn.functional.cross_entropy(x, t, w, reduction=reduction)
            assert torch.equal(got.isnan(), ref.isnan())
            assert bool((got.nan_to_num() == ref.nan_to_num()).all())


@pytest.mark.parametrize("backend", CE)
@pytest.mark.parametrize("n,c", [(1, 37), (5, 1), (1, 1), (1, 8193)])
def test_cross_entropy_single_row_single_class(backend, n, c):
    # C = 1: the loss is exactly 0 (log 1); V = 8193 spans two of the Triton kernel's tiles
    x = torch.randn(n, c, requires_grad=True)
    t = torch.randint(0, c, (n,))
    got = _ce_check(backend, lambda x, t: (x, t), [x, t], reduction="none", label_smoothing=0.05)
    if c == 1:
        assert bool((got == 0).all())


@pytest.mark.parametrize("backend", CE)
def test_cross_entropy_unbatched(backend):
    x = torch.randn(37, requires_grad=True)
    t = torch.tensor(5)
    _ce_check(backend, lambda x, t: (x[None], t[None]), [x, t], reduction="sum")
    got = llmcore.cross_entropy(x, t, backend=backend)
    assert got.shape == ()
    assert_close_to_oracle(got, ce_eager(x[None], t[None]), ce_oracle(x.double()[None], t[None]),
                           atol=1e-6)


def _lce_check(backend, make, leaves, chunk_size=None, **kw):
    """make(*leaves) -> (input (N, H), weight (V, H), target (N,), bias)."""
    def ref(fn):
        def f(*ls):
            h, w, t, b = make(*ls)
            logits = h @ w.t() + (b if b is not None else 0)
            return fn(logits, t, **kw)
        return f

    def impl(*ls):
        h, w, t, b = make(*ls)
        return llmcore.linear_cross_entropy(h, w, t, b, chunk_size=chunk_size,
                                            backend=backend, **kw)
    return check_fwd_bwd(impl, ref(ce_eager), ref(ce_oracle), leaves,
                         grad_names=[f"grad{i}" for i in range(len(leaves))],
                         atol=loss_atol(torch.tensor(20.0), torch.float32), grad_atol=1e-5)


@pytest.mark.parametrize("backend", CE)
@pytest.mark.parametrize("case", ["expanded-input", "transposed-weight", "chunk-1",
                                  "chunk-past-n", "single-token", "bias"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_layouts(backend, case, reduction):
    h_, v_ = 8, 13
    t = torch.randint(0, v_, (5,))
    w = torch.randn(v_, h_, requires_grad=True)
    x = torch.randn(5, h_, requires_grad=True)
    kw = dict(reduction=reduction)
    if case == "expanded-input":
        base = torch.randn(1, h_, requires_grad=True)
        _lce_check(backend, lambda a, w, t: (a.expand(5, h_), w, t, None), [base, w, t], **kw)
    elif case == "transposed-weight":
        wt = torch.randn(h_, v_, requires_grad=True)
        _lce_check(backend, lambda x, w, t: (x, w.t(), t, None), [x, wt, t], **kw)
    elif case in ("chunk-1", "chunk-past-n"):
        kw["chunk_size"] = 1 if case == "chunk-1" else 64
        _lce_check(backend, lambda x, w, t: (x, w, t, None), [x, w, t], **kw)
    elif case == "single-token":
        x1 = torch.randn(1, h_, requires_grad=True)
        _lce_check(backend, lambda x, w, t: (x, w, t, None), [x1, w, t[:1]], **kw)
    else:
        b = torch.randn(v_, requires_grad=True)
        _lce_check(backend, lambda x, w, t, b: (x, w, t, b), [x, w, t, b], **kw)


@pytest.mark.parametrize("backend", CE)
def test_linear_cross_entropy_all_ignored_and_empty(backend):
    w = torch.randn(13, 8, requires_grad=True)
    for n in (0, 5):
        x = torch.randn(n, 8, requires_grad=True)
        t = torch.full((n,), -100)
        mean = llmcore.linear_cross_entropy(x, w, t, backend=backend)
        total = llmcore.linear_cross_entropy(x, w, t, reduction="sum", backend=backend)
        none = llmcore.linear_cross_entropy(x, w, t, reduction="none", backend=backend)
        assert torch.isnan(mean) and total.item() == 0.0 and none.shape == (n,)
        assert bool((none == 0).all())
        gx, gw = torch.autograd.grad(mean + total + none.sum(), [x, w])
        assert bool((gx == 0).all()) and bool((gw == 0).all())


@pytest.mark.parametrize("backend", CE)
def test_linear_cross_entropy_zero_hidden(backend):
    x, w = torch.randn(3, 0), torch.randn(7, 0)
    got = llmcore.linear_cross_entropy(x, w, torch.tensor([1, 2, 3]), reduction="none",
                                       backend=backend)
    torch.testing.assert_close(got, torch.full((3,), torch.log(torch.tensor(7.0)).item()))


# ---------------------------------------------------------------------------- attention

def _attn_check(backend, make, leaves, dtype=torch.float32, causal=False, gqa=False):
    """make(*leaves) -> (q, k, v) in (B, H, N, D) as llmcore.attention receives them."""
    kw = dict(window=(-1, 0)) if causal else {}
    return check_fwd_bwd(
        lambda *ls: llmcore.attention(*make(*ls), is_causal=causal, enable_gqa=gqa,
                                      backend=backend),
        lambda *ls: attention_eager(*make(*ls), **kw),
        lambda *ls: attention_oracle(*make(*ls), **kw), leaves,
        grad_names=[f"grad{i}" for i in range(len(leaves))], grad_atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("layout", ["bnhd-views", "expanded-kv-heads", "expanded-batch",
                                    "head-dim-slice"])
def test_attention_layouts(backend, layout):
    if layout == "bnhd-views":                        # flash layout seen as (B, H, N, D)
        q, k, v = (torch.randn(2, n, 3, 24, requires_grad=True) for n in (7, 9, 9))
        _attn_check(backend, lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)), [q, k, v], causal=True)
    elif layout == "expanded-kv-heads":               # MQA written as a stride-0 head expand
        q = torch.randn(2, 4, 7, 16, requires_grad=True)
        k, v = (torch.randn(2, 1, 9, 16, requires_grad=True) for _ in range(2))
        _attn_check(backend, lambda q, k, v: (q, k.expand(2, 4, 9, 16), v.expand(2, 4, 9, 16)),
                    [q, k, v])
    elif layout == "expanded-batch":                  # one key/value set shared by the batch
        q = torch.randn(3, 2, 7, 16, requires_grad=True)
        k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(2))
        _attn_check(backend, lambda q, k, v: (q, k.expand(3, 2, 9, 16), v.expand(3, 2, 9, 16)),
                    [q, k, v], causal=True)
    else:                                             # rows 40 apart, head dim 24 of them
        q, k, v = (torch.randn(1, 2, n, 40, requires_grad=True) for n in (5, 6, 6))
        _attn_check(backend, lambda q, k, v: (q[..., 3:27], k[..., 3:27], v[..., 8:40]),
                    [q, k, v])


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("b,hq,hk,nq,nk", [(0, 2, 2, 5, 6), (1, 2, 1, 0, 6), (1, 2, 2, 5, 0),
                                          (2, 2, 1, 1, 1), (1, 4, 1, 1, 17), (1, 2, 2, 17, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_empty_and_length_one(backend, b, hq, hk, nq, nk, causal):
    q = torch.randn(b, hq, nq, 16, requires_grad=True)
    k, v = (torch.randn(b, hk, nk, 16, requires_grad=True) for _ in range(2))
    got = _attn_check(backend, lambda q, k, v: (q, k, v), [q, k, v], causal=causal, gqa=hq != hk)
    assert got.shape == (b, hq, nq, 16)
    if nk == 0:
        assert bool((got == 0).all())               # no key to see: zeros, as SDPA


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("nq,nk", [(1, 17), (17, 1), (1, 1)])
def test_flash_attn_func_length_one_bottom_right(backend, nq, nk):
    # decoding: one new query sees every cached key (bottom-right); nq > nk leaves rows empty
    q = torch.randn(2, nq, 2, 16, requires_grad=True)
    k, v = (torch.randn(2, nk, 1, 16, requires_grad=True) for _ in range(2))
    kw = dict(window=(-1, 0), bottom_right=True)
    check_fwd_bwd(
        lambda q, k, v: llmcore.flash_attn_func(q, k, v, causal=True, backend=backend),
        lambda q, k, v: attention_eager(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        **kw).transpose(1, 2),
        lambda q, k, v: attention_oracle(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), **kw).transpose(1, 2),
        [q, k, v], grad_names=["dq", "dk", "dv"], grad_atol=1e-5)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("cu_q,cu_k", [
    ([0, 3, 3, 8], [0, 4, 6, 11]),        # an empty query sequence
    ([0, 3, 5, 8], [0, 4, 4, 11]),        # an empty key sequence: its queries output 0
    ([0, 1, 2, 3], [0, 1, 2, 3]),         # length-1 sequences
    ([0, 0], [0, 0]),                     # no tokens at all
])
def test_varlen_empty_and_length_one_sequences(backend, cu_q, cu_k):
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_k))
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(tq, 2, 16, requires_grad=True)
    k, v = (torch.randn(tk, 1, 16, requires_grad=True) for _ in range(2))
    lens = lambda cu: max([int(b - a) for a, b in zip(cu[:-1], cu[1:])] + [0])  # noqa: E731
    kw = dict(window=(-1, 0))
    got = check_fwd_bwd(
        lambda q, k, v: llmcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, lens(cu_q),
                                                       lens(cu_k), causal=True, backend=backend),
        lambda q, k, v: varlen_oracle(q, k, v, cu_q, cu_k, **kw),
        lambda q, k, v: varlen_oracle(q, k, v, cu_q, cu_k, **kw),
        [q, k, v], grad_names=["dq", "dk", "dv"], grad_atol=1e-5)
    assert got.shape == (tq, 2, 16)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("d,dv", [(256, 256), (257, 16), (16, 257)])
def test_attention_head_dim_limit(backend, d, dv):
    q, k = torch.randn(1, 1, 3, d), torch.randn(1, 1, 4, d)
    v = torch.randn(1, 1, 4, dv)
    if backend == "triton" and max(d, dv) > 256:
        with pytest.raises(ValueError, match="the triton attention kernels take head dims up "
                                             f"to 256, got query/key {d} and value {dv}"):
            llmcore.attention(q, k, v, backend=backend)
        return
    for t in (q, k, v):
        t.requires_grad_()
    _attn_check(backend, lambda q, k, v: (q, k, v), [q, k, v])


@pytest.mark.parametrize("backend", ATTN)
def test_varlen_strided_cu_seqlens(backend):
    # offsets [0, 3, 7] and [0, 4, 9] read through stride 2 (every other entry of a longer
    # storage); a kernel that assumes stride 1 sees [0, 0, 3] and [0, 0, 4]: in bounds, wrong
    cu_q = torch.tensor([0, 0, 3, 3, 7, 7], dtype=torch.int32)[::2]
    cu_k = torch.tensor([0, 0, 4, 4, 9, 9], dtype=torch.int32)[::2]
    q = torch.randn(7, 2, 16)
    k, v = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    got = llmcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, backend=backend)
    want = varlen_oracle(q.double(), k.double(), v.double(), cu_q.contiguous(),
                         cu_k.contiguous())
    assert_close_to_oracle(got, varlen_oracle(q, k, v, cu_q.contiguous(), cu_k.contiguous()), want)


@pytest.mark.parametrize("backend", CE)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_strided_class_weight(backend, label_smoothing):
    x = torch.randn(5, 11, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    w = (torch.rand(22) + 0.5)[::2]
    _ce_check(backend, lambda x, t: (x, t), [x, t], weight=w, reduction="none",
              label_smoothing=label_smoothing)
