"""NaN / Inf in an input stay in their row (norms, cross-entropy) or sequence (attention): that
row's output is non-finite exactly where the float64 oracle's is, every other row is finite and
correct, and nothing non-finite is masked into a finite wrong answer. conftest's
assert_close_to_oracle demands the same non-finite pattern as the oracle, element by element,
for the outputs and the gradients alike.
"""
import pytest
import torch

import llmcore
from llmcore_testing import kernel_backends
from reliability_oracles import (assert_close_to_oracle, attention_eager, attention_oracle,
                                 call_norm, ce_eager, ce_oracle, check_fwd_bwd, loss_atol,
                                 norm_eager, norm_oracle, varlen_oracle)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------- norms

@pytest.mark.parametrize("backend", kernel_backends("norm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_nonfinite_rows_stay_put(backend, dtype, kind, residual):
    rows, n = 6, 37
    x = torch.randn(rows, n, dtype=dtype)
    x[1, 3] = NAN
    x[4, 0] = INF                       # an inf makes its whole row nan (inf - inf), no other
    r = torch.randn(rows, n, dtype=dtype) if residual else None
    if r is not None:
        r[2, 5] = -INF                  # through the residual: h's row 2 is -inf there
    w = torch.rand(n, dtype=dtype) + 0.5
    b = torch.randn(n, dtype=dtype) if kind == "layer" else None
    leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b, r)]

    def run(fn):
        def f(x, w, b, r):
            y, h = fn(kind, x, w, b, 1e-5, r)
            return y if h is None or r is None else torch.cat([y, h], -1)
        return f

    got = check_fwd_bwd(run(lambda *a: call_norm(*a, backend)), run(norm_eager),
                        run(norm_oracle), leaves, grad_names=["dx", "dweight", "dbias", "dres"],
                        grad_atol=1e-5 if dtype == torch.float32 else None)
    y = got[:, :n]
    bad = {1, 4} | ({2} if residual else set())
    for i in range(rows):
        assert torch.isfinite(y[i]).all() != (i in bad), f"row {i}"


# ---------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_cross_entropy_nonfinite_rows_stay_put(backend, dtype, reduction, smoothing, z_loss):
    n, c = 6, 37
    x = torch.randn(n, c, dtype=dtype) * 3
    t = torch.randint(0, c, (n,))
    x[1, 7] = NAN                       # nan anywhere in a row: that row's loss is nan
    t[3] = 11
    x[3, 11] = INF                      # +inf at the target: lse - y_t = inf - inf = nan
    t[4] = 2
    x[4, 20] = -INF                     # -inf at another class: a masked logit, finite loss
    # (with label smoothing its -log p is inf: the row's loss is inf, as F.cross_entropy's)
    leaves = [x.requires_grad_(), t]
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)
    got = check_fwd_bwd(
        lambda x, t: llmcore.cross_entropy(x, t, backend=backend, **kw),
        lambda x, t: ce_eager(x, t, **kw), lambda x, t: ce_oracle(x, t, **kw), leaves,
        grad_names=["dlogits"], atol=loss_atol(torch.tensor(10.0), dtype))
    if reduction == "none":
        assert torch.isnan(got[1]) and torch.isnan(got[3])
        assert torch.isfinite(got[4]) == (smoothing == 0)
        assert torch.isfinite(got[[0, 2, 5]]).all()
    else:
        assert torch.isnan(got)                         # never a finite average over the rest


@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
def test_cross_entropy_ignored_row_with_nan_is_ignored(backend):
    # F.cross_entropy drops ignored tokens from the loss whatever their logits hold
    x = torch.randn(4, 11)
    x[2] = NAN
    t = torch.tensor([1, 2, -100, 4])
    for reduction in ("none", "mean", "sum"):
        got = llmcore.cross_entropy(x, t, reduction=reduction, backend=backend)
        want = ce_oracle(x.double(), t, reduction=reduction)
        assert_close_to_oracle(got, ce_eager(x, t, reduction=reduction), want, name=reduction,
                               atol=1e-6)


# A row whose first vocabulary tile is entirely -inf (a masked vocabulary range: constrained
# decoding, tied padding rows) still has a finite loss. The kernels walk the vocabulary in tiles
# with an online logsumexp; a first tile with max -inf makes exp(-inf - (-inf)) = nan unless the
# running max is guarded (the attention kernel does guard it).
LEAD_INF_V, LEAD_INF_K = 8200, 8192     # past the native (2048) and triton (8192) tile widths


@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
def test_cross_entropy_leading_masked_vocabulary_is_finite(backend):
    x = torch.randn(2, LEAD_INF_V)
    x[0, :LEAD_INF_K] = -INF
    t = torch.tensor([LEAD_INF_V - 3, 5])
    x.requires_grad_()
    check_fwd_bwd(lambda x, t: llmcore.cross_entropy(x, t, reduction="none", backend=backend),
                  lambda x, t: ce_eager(x, t, reduction="none"),
                  lambda x, t: ce_oracle(x, t, reduction="none"), [x, t], grad_names=["dlogits"])


@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
def test_linear_cross_entropy_nan_token_stays_put(backend):
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    t = torch.randint(0, 13, (6,))
    with torch.no_grad():
        h[2, 1] = NAN
    loss = llmcore.linear_cross_entropy(h, w, t, reduction="none", chunk_size=4, backend=backend)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    want = ce_oracle((h.double() @ w.double().t()), t, reduction="none")
    assert_close_to_oracle(loss, ce_eager(h @ w.t(), t, reduction="none"), want)
    seed = torch.ones(6)
    seed[2] = 0.0
    dh, = torch.autograd.grad(loss, h, seed)
    assert torch.isnan(dh[2]).all() and torch.isfinite(dh[[0, 1, 3, 4, 5]]).all()
    mean = llmcore.linear_cross_entropy(h, w, t, chunk_size=4, backend=backend)
    assert torch.isnan(mean)


# ---------------------------------------------------------------------------- attention

def _assert_superset(got, eager, oracle, name):
    """Inside the sequence that holds the nan: got is non-finite wherever the oracle is (nothing
    masked into a finite number), and correct wherever both are finite. Extra non-finite values
    are allowed there: a kernel's masked tile may multiply a masked probability exp(-inf - nan)
    into a gradient the oracle keeps finite."""
    fin_o, fin_g = torch.isfinite(oracle), torch.isfinite(got)
    assert not bool((fin_g & ~fin_o).any()), f"{name}: finite where the oracle is not"
    both = fin_o & fin_g
    z = torch.zeros((), dtype=got.dtype)
    assert_close_to_oracle(got.where(both, z), eager.where(both, z),
                           oracle.where(both, z.double()), name=name)


@pytest.mark.parametrize("backend", kernel_backends("attention"))
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_nan_stays_in_its_batch_and_head(backend, dtype, where):
    q = torch.randn(3, 4, 9, 16, dtype=dtype)
    k = torch.randn(3, 2, 11, 16, dtype=dtype)
    v = torch.randn(3, 2, 11, 16, dtype=dtype)
    {"q": q, "k": k, "v": v}[where][1, 1, 4, 3] = NAN
    leaves = [t.requires_grad_() for t in (q, k, v)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    kw = dict(window=(-1, 0))           # causal as well, so skipped and masked tiles run
    got = llmcore.attention(*leaves, is_causal=True, enable_gqa=True, backend=backend)
    eager = attention_eager(*leaves, **kw)
    want = attention_oracle(*leaves64, **kw)
    seed = torch.randn(want.shape, dtype=torch.float64)
    grads = zip(["out", "dq", "dk", "dv"],
                [got, *torch.autograd.grad(got, leaves, seed.to(dtype))],
                [eager, *torch.autograd.grad(eager, leaves, seed.to(dtype))],
                [want, *torch.autograd.grad(want, leaves64, seed)])
    # the nan sits in batch 1, in kv group 0 (query head 1 reads kv head 0) or kv group 1 (k, v)
    nan_kv = 0 if where == "q" else 1
    tol = 1e-5 if dtype == torch.float32 else None
    for name, g, e, o in grads:
        atol = None if name == "out" else tol
        # other batch elements: exactly the oracle, all finite
        assert torch.isfinite(g[[0, 2]]).all(), f"{name}: a nan leaked into another batch element"
        assert_close_to_oracle(g[[0, 2]], e[[0, 2]], o[[0, 2]], name=name, atol=atol)
        # batch 1: the kv group that holds the nan may spread it inside itself, no further
        group = 2 if name in ("out", "dq") else 1       # heads of this tensor per kv head
        nan_heads = [h for h in range(g.shape[1]) if h // group == nan_kv]
        other = [h for h in range(g.shape[1]) if h // group != nan_kv]
        assert torch.isfinite(g[1, other]).all(), f"{name}: a nan leaked into another kv group"
        assert_close_to_oracle(g[1, other], e[1, other], o[1, other], name=name, atol=atol)
        _assert_superset(g[1, nan_heads], e[1, nan_heads], o[1, nan_heads], name)
    assert not torch.isfinite(got[1]).all()


@pytest.mark.parametrize("backend", kernel_backends("attention"))
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_varlen_nan_stays_in_its_sequence(backend, where):
    cu_q = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11, 12], dtype=torch.int32)
    q, k, v = torch.randn(10, 2, 16), torch.randn(12, 1, 16), torch.randn(12, 1, 16)
    row = {"q": 1, "k": 2, "v": 2}[where]       # inside sequence 0
    {"q": q, "k": k, "v": v}[where][row, 0, 5] = NAN
    out = llmcore.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True, backend=backend)
    want = varlen_oracle(q.double(), k.double(), v.double(), cu_q, cu_k, window=(-1, 0))
    assert_close_to_oracle(out, varlen_oracle(q, k, v, cu_q, cu_k, window=(-1, 0)), want)
    assert torch.isfinite(out[3:]).all(), "a nan leaked out of sequence 0"
    assert not torch.isfinite(out[:3]).all()


@pytest.mark.parametrize("backend", kernel_backends("attention"))
def test_flash_attn_lse_of_a_nan_row_is_nan(backend):
    # lse = +inf means "this row saw no key"; a row with a nan score must not look like that
    q, k, v = torch.randn(1, 5, 2, 16), torch.randn(1, 7, 2, 16), torch.randn(1, 7, 2, 16)
    q[0, 3, 1, 0] = NAN
    out, lse, _ = llmcore.flash_attn_func(q, k, v, return_attn_probs=True, backend=backend)
    assert torch.isnan(out[0, 3, 1]).all() and torch.isfinite(out[0, [0, 1, 2, 4]]).all()
    assert torch.isnan(lse[0, 1, 3]), f"lse of the nan row is {lse[0, 1, 3].item()}"
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(lse[0, 1, [0, 1, 2, 4]]).all()
