"""cross_entropy / linear_cross_entropy on every backend that runs here, against a float64
oracle written out below (log-softmax by hand), with the tolerance rule of conftest."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llmcore
from llmcore_testing import assert_close_to_oracle, default_atol, kernel_backends

BACKENDS = kernel_backends("cross_entropy")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------- oracle and eager

def _oracle(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
            z_loss=0.0, softcap=None):
    """The documented semantics in float64, written independently of llmcore and F:
    ce_i = (1-e) w[t] (-logp_t) + e/C sum_c w[c] (-logp_c), z_i = z lse^2 on valid tokens;
    mean is sum ce_i / sum of w[t] over valid tokens + sum z_i / n_valid."""
    y = logits.double()
    if y.dim() == 1:                                   # (C,) -> (1, C)
        y, target = y[None], target[None]
    y = y.movedim(1, -1)                               # (N, d..., C)
    n_classes = y.shape[-1]
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    m = y.max(-1, keepdim=True).values.detach()
    lse = (y - m).exp().sum(-1).log() + m.squeeze(-1)  # (N, d...)
    logp = y - lse[..., None]
    w = weight.double() if weight is not None else torch.ones(n_classes, dtype=torch.float64)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    w_t = torch.where(valid, w[t], 0.0)
    nll = -logp.gather(-1, t[..., None]).squeeze(-1)
    smooth = -(logp * w).sum(-1)
    ce = torch.where(valid, (1 - label_smoothing) * w_t * nll
                     + label_smoothing / n_classes * smooth, 0.0)
    z = torch.where(valid, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return (ce + z).reshape(target.shape[1:] if logits.dim() == 1 else target.shape)
    if reduction == "sum":
        return ce.sum() + z.sum()
    return ce.sum() / w_t.sum() + z.sum() / valid.sum()


def _eager(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
           z_loss=0.0, softcap=None):
    """Eager PyTorch in the input's dtype: F.cross_entropy plus the extras, term by term."""
    y = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(y, target, weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    w_t = weight[torch.where(valid, target, 0)] if weight is not None else torch.ones_like(loss)
    w_t = torch.where(valid, w_t, 0)
    lse = torch.logsumexp(y, dim=1 if y.dim() > 1 else 0)
    z = torch.where(valid, z_loss * lse * lse, 0)
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss.sum() + z.sum()
    return loss.sum() / w_t.sum() + z.sum() / valid.sum()


def _targets(shape, n_classes, ignore_index, ignore_frac):
    t = torch.randint(0, n_classes, shape)
    if ignore_frac:
        t = torch.where(torch.rand(shape) < ignore_frac, ignore_index, t)
    return t


def _loss_atol(oracle, dtype):
    """A scalar loss is one rounded number, so eager's own error there can be 0 by luck: allow
    the default atol plus two ulps of the value (a sum over many tokens)."""
    return default_atol(dtype) + 2 * torch.finfo(dtype).eps * oracle.abs().max().item()


def _grad(out, leaves, seed):
    return torch.autograd.grad((out.float() * seed.float()).sum(), leaves)


# ---------------------------------------------------------------------------- cross_entropy

# (input shape, reduction, class weight, label_smoothing, z_loss, softcap, ignore_index)
CASES = [
    ((7, 4099), "mean", False, 0.0, 0.0, None, -100),
    ((97, 1001), "sum", True, 0.0, 0.0, None, -100),
    ((1, 1001), "none", False, 0.1, 0.0, None, -100),
    ((97, 1001), "mean", True, 0.1, 0.0, None, -100),      # weight + smoothing: F's denominator
    ((7, 4099), "mean", False, 0.0, 1e-3, None, -100),
    ((7, 4099), "none", True, 0.0, 1e-3, 30.0, 3),         # ignore_index inside [0, C)
    ((97, 1001), "mean", False, 0.0, 0.0, 5.0, -100),
    ((97, 1001), "mean", True, 0.2, 1e-2, 20.0, -100),
    ((1001,), "sum", True, 0.1, 1e-3, 30.0, -100),         # unbatched (C,)
    ((3, 97, 5), "mean", True, 0.1, 1e-3, 30.0, -100),     # (N, C, d1)
    ((2, 1001, 3, 2), "none", False, 0.0, 1e-3, None, -100),
    ((2, 50257), "mean", False, 0.1, 1e-4, 30.0, -100),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cross_entropy_matches_oracle(backend, dtype, case):
    shape, reduction, use_weight, ls, z, cap, ii = case
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    t = _targets(tshape, n_classes, ii, 0.2 if len(shape) > 1 else 0.0)
    if ii >= 0:
        t.view(-1)[0] = ii
    w = (torch.rand(n_classes) + 0.5).to(dtype) if use_weight else None
    opts = dict(ignore_index=ii, reduction=reduction, label_smoothing=ls, z_loss=z, softcap=cap)
    got = llmcore.cross_entropy(x, t, w, ii, reduction, ls, z_loss=z, softcap=cap, backend=backend)
    eager = _eager(x, t, w, **opts)
    x64 = x.detach().double().requires_grad_()
    oracle = _oracle(x64, t, w, **opts)
    assert got.dtype == dtype
    assert_close_to_oracle(got, eager, oracle, name="loss", atol=_loss_atol(oracle, dtype))
    seed = torch.randn(oracle.shape, dtype=torch.float64)
    assert_close_to_oracle(_grad(got, x, seed)[0], _grad(eager, x, seed)[0],
                           _grad(oracle, x64, seed)[0], name="dinput")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_class_weight_on_half_logits(backend, dtype):
    # the mixed-precision layout (float32 class weights, half-precision logits): applied in
    # float32, so the result is the half-precision-weight call's on the float32 weight's values
    x = (torch.randn(23, 301) * 3).to(dtype).requires_grad_()
    t = _targets((23,), 301, -100, 0.2)
    w = torch.rand(301) + 0.5                                         # float32
    opts = dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    got = llmcore.cross_entropy(x, t, w, **opts, backend=backend)
    assert got.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    oracle = _oracle(x64, t, w, **opts)
    eager = _eager(x.float(), t, w, **opts).to(dtype)                 # F in float32, rounded
    assert_close_to_oracle(got, eager, oracle, name="loss", atol=_loss_atol(oracle, dtype))
    seed = torch.randn((), dtype=torch.float64)
    (g,) = torch.autograd.grad(got.float() * seed.float(), x)
    (g64,) = torch.autograd.grad(oracle * seed, x64)
    torch.testing.assert_close(g.double(), g64, rtol=0, atol=4 * torch.finfo(dtype).eps
                               * g64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_is_unweighted_and_averaged_over_valid_tokens(backend):
    # the peers' convention, spelled with F: weighted F.cross_entropy + z_loss * mean_valid lse^2
    x = torch.randn(31, 57, dtype=torch.float64, requires_grad=True)
    t = _targets((31,), 57, -100, 0.3)
    w = torch.rand(57, dtype=torch.float64) * 3 + 0.1
    z = 0.05
    valid = t != -100
    for reduction in ("mean", "sum", "none"):
        lse2 = torch.logsumexp(x, 1) ** 2
        ref = {"mean": lambda: F.cross_entropy(x, t, w) + z * lse2[valid].mean(),
               "sum": lambda: F.cross_entropy(x, t, w, reduction="sum") + z * lse2[valid].sum(),
               "none": lambda: F.cross_entropy(x, t, w, reduction="none")
               + z * torch.where(valid, lse2, 0)}[reduction]()
        got = llmcore.cross_entropy(x, t, w, reduction=reduction, z_loss=z, backend=backend)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        seed = torch.randn(ref.shape, dtype=torch.float64)
        torch.testing.assert_close(_grad(got, [x], seed)[0], _grad(ref, [x], seed)[0],
                                   rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(13, 37), (37,), (4, 37, 3)])
def test_torch_backend_equals_functional(reduction, shape):
    # extras off -> F.cross_entropy itself, float64, forward and gradient
    n_classes = 37
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = _targets(tshape, n_classes, -100, 0.3 if len(shape) > 1 else 0.0)
    w = torch.rand(n_classes, dtype=torch.float64)
    for weight, ls in [(None, 0.0), (w, 0.0), (w, 0.15), (None, 0.3)]:
        got = llmcore.cross_entropy(x, t, weight, reduction=reduction, label_smoothing=ls,
                                    backend="torch")
        want = F.cross_entropy(x, t, weight, reduction=reduction, label_smoothing=ls)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
        seed = torch.randn(want.shape, dtype=torch.float64)
        torch.testing.assert_close(_grad(got, [x], seed)[0], _grad(want, [x], seed)[0],
                                   rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_match_oracle_float64(backend):
    # every option at once against the oracle, tight (float64 leaves no room for rounding)
    x = torch.randn(11, 53, 2, dtype=torch.float64, requires_grad=True)
    t = _targets((11, 2), 53, 7, 0.2)
    w = torch.rand(53, dtype=torch.float64) + 0.1
    for reduction in ("none", "mean", "sum"):
        opts = dict(ignore_index=7, reduction=reduction, label_smoothing=0.05, z_loss=0.02,
                    softcap=4.0)
        got = llmcore.cross_entropy(x, t, w, **opts, backend=backend)
        want = _oracle(x, t, w, **opts)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        seed = torch.randn(want.shape, dtype=torch.float64)
        torch.testing.assert_close(_grad(got, [x], seed)[0], _grad(want, [x], seed)[0],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extras", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)])
def test_all_ignored_and_empty(backend, extras):
    # all ignored: "mean" is nan, "sum" 0, "none" zeros; gradients 0 (F.cross_entropy's values)
    x = torch.randn(5, 17, requires_grad=True)
    w = torch.rand(17)
    for weight in (None, w):
        t = torch.full((5,), -100)
        for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
            out = llmcore.cross_entropy(x, t, weight, reduction=reduction, backend=backend, **extras)
            torch.testing.assert_close(out, torch.tensor(want), equal_nan=True)
            (g,) = torch.autograd.grad(out, x)
            assert torch.equal(g, torch.zeros_like(x))
        out = llmcore.cross_entropy(x, t, weight, reduction="none", backend=backend, **extras)
        assert torch.equal(out, torch.zeros(5))
    # empty batch, 2-D and (N, C, d)
    for shape in [(0, 17), (0, 17, 3)]:
        e = torch.randn(shape, requires_grad=True)
        t = torch.zeros((0,) + shape[2:], dtype=torch.long)
        for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
            out = llmcore.cross_entropy(e, t, reduction=reduction, backend=backend, **extras)
            torch.testing.assert_close(out, torch.tensor(want), equal_nan=True)
            out.backward()
            assert e.grad.shape == e.shape and not e.grad.any()
        out = llmcore.cross_entropy(e, t, reduction="none", backend=backend, **extras)
        assert out.shape == t.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    t = _targets((9,), 101, -100, 0.2)
    w = torch.rand(101)
    sliced = torch.randn(9, 120)[:, 5:106]                      # strided rows
    transposed = torch.randn(101, 9).t()                       # (9, 101), stride (1, 9)
    for x in (sliced, transposed):
        assert not x.is_contiguous()
        got = llmcore.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=8.0,
                                    backend=backend)
        want = _oracle(x, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # class dim not innermost in memory: (N, d, C) stored, viewed as (N, C, d)
    x = torch.randn(3, 4, 101).permute(0, 2, 1).requires_grad_()
    t = _targets((3, 4), 101, -100, 0.2)
    got = llmcore.cross_entropy(x, t, reduction="none", backend=backend)
    want = F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(got, want)
    seed = torch.randn(3, 4)
    torch.testing.assert_close(_grad(got, [x], seed)[0], _grad(want, [x], seed)[0])


def _bad(**overrides):
    args = dict(input=torch.randn(4, 6), target=torch.tensor([0, 1, 5, -100]))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (_bad(input=torch.randint(0, 3, (4, 6))), TypeError, "input must be a floating"),
        (_bad(input=torch.tensor(1.0)), ValueError, "input must be (C,), (N, C)"),
        (_bad(input=torch.randn(4, 0)), ValueError, "at least one class"),
        (_bad(target=torch.tensor([0.0, 1, 2, 3])), TypeError, "target must be an integer"),
        (_bad(target=torch.rand(4, 6)), TypeError, "class-probability targets"),
        (_bad(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape (4,)"),
        (_bad(input=torch.randn(4, 6, 3)), ValueError, "target must have shape (4, 3)"),
        (_bad(target=torch.tensor([0, 1, 6, 2])), ValueError, r"target values must be in [0, 6) or equal ignore_index=-100, got 6"),
        (_bad(target=torch.tensor([0, -1, 2, 2])), ValueError, "got -1"),
        (_bad(weight=torch.rand(5)), ValueError, "weight must have shape (6,)"),
        (_bad(weight=torch.rand(6, dtype=torch.float64)), TypeError, "weight must have input's dtype"),
        (_bad(weight=torch.ones(6, dtype=torch.long)), TypeError, "weight must be a floating"),
        (_bad(reduction="avg"), ValueError, "reduction must be one of ('none', 'mean', 'sum')"),
        (_bad(label_smoothing=1.5), ValueError, "label_smoothing must be a float in [0, 1]"),
        (_bad(label_smoothing=-0.1), ValueError, "label_smoothing must be a float in [0, 1]"),
        (_bad(z_loss=-1e-4), ValueError, "z_loss must be a float >= 0"),
        (_bad(softcap=0.0), ValueError, "softcap must be None or a float > 0"),
        (_bad(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (_bad(backend="cuda"), ValueError, "backend must be one of"),
        (_bad(backend="flash_attn"), ValueError, "only for attention"),
        (_bad(target=[0, 1, 2, 3]), TypeError, "target must be a torch.Tensor"),
    ],
)
def test_bad_input_is_named(kwargs, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        llmcore.cross_entropy(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tdtype", [torch.int32, torch.int16])
def test_narrow_integer_targets(backend, tdtype):
    x = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)
    t = _targets((6,), 33, -100, 0.3)
    want = F.cross_entropy(x, t, reduction="none")
    got = llmcore.cross_entropy(x, t.to(tdtype), reduction="none", backend=backend)
    torch.testing.assert_close(got, want)
    w = torch.randn(33, 5, dtype=torch.float64)
    got = llmcore.linear_cross_entropy(x[:, :5], w, t.to(tdtype), reduction="none", backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(x[:, :5], w), t, reduction="none"))


def test_ignore_index_target_is_accepted_and_masked():
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([0, 9, 5, 9])
    got = llmcore.cross_entropy(x, t, ignore_index=9, reduction="none", backend="torch")
    assert got[1] == 0 and got[3] == 0
    torch.testing.assert_close(got, F.cross_entropy(x, t, ignore_index=9, reduction="none"))


def test_named_backend_that_cannot_run_raises(fresh_backends, monkeypatch):
    backends = fresh_backends
    monkeypatch.setattr(backends, "IMPLEMENTED", {**backends.IMPLEMENTED, "cross_entropy": ("torch",)})
    with pytest.raises(llmcore.BackendUnavailableError, match="native.*cross_entropy"):
        llmcore.cross_entropy(torch.randn(2, 4), torch.tensor([0, 1]), backend="native")
    with pytest.raises(llmcore.BackendUnavailableError, match="triton.*cross_entropy"):
        llmcore.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]),
                                     backend="triton")


# ---------------------------------------------------------------------------- linear_cross_entropy

def _linear_oracle(x, w, t, b, **opts):
    logits = x.double() @ w.double().t()
    if b is not None:
        logits = logits + b.double()
    return _oracle(logits.reshape(-1, w.shape[0]), t.reshape(-1), **opts).reshape(
        t.shape if opts.get("reduction") == "none" else ())


def _linear_eager(x, w, t, b, **opts):
    logits = F.linear(x, w, b)
    return _eager(logits.reshape(-1, w.shape[0]), t.reshape(-1), **opts).reshape(
        t.shape if opts.get("reduction") == "none" else ())


# (input shape, V, chunk_size, bias, reduction, label_smoothing, z_loss, softcap)
LINEAR_CASES = [
    ((97, 32), 1001, 16, True, "mean", 0.0, 0.0, None),        # 16 does not divide 97
    ((2, 7, 24), 4099, None, False, "sum", 0.0, 0.0, None),    # 3-D input, default chunk
    ((13, 16), 1001, 1, True, "none", 0.1, 1e-3, 20.0),        # one row per chunk
    ((7, 16), 1001, 100, False, "mean", 0.2, 1e-2, 10.0),      # chunk > N
    ((3, 5, 16), 1001, 4, True, "none", 0.0, 0.0, None),
    ((1, 8), 4099, None, True, "mean", 0.1, 1e-3, 30.0),       # N = 1
    ((2, 48), 50257, 1, False, "mean", 0.1, 1e-4, 30.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_linear_cross_entropy_matches_oracle(backend, dtype, case):
    shape, n_classes, chunk, use_bias, reduction, ls, z, cap = case
    hidden = shape[-1]
    x = torch.randn(shape).to(dtype).requires_grad_()
    w = (torch.randn(n_classes, hidden) / hidden ** 0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(n_classes) * 0.5).to(dtype).requires_grad_() if use_bias else None
    t = _targets(shape[:-1], n_classes, -100, 0.2 if shape[0] > 1 else 0.0)
    opts = dict(reduction=reduction, label_smoothing=ls, z_loss=z, softcap=cap)
    got = llmcore.linear_cross_entropy(x, w, t, b, chunk_size=chunk, backend=backend, **opts)
    eager = _linear_eager(x, w, t, b, **opts)
    leaves = [v for v in (x, w, b) if v is not None]
    leaves64 = [v.detach().double().requires_grad_() for v in leaves]
    oracle = _linear_oracle(leaves64[0], leaves64[1], t, leaves64[2] if use_bias else None, **opts)
    assert got.dtype == dtype and got.shape == oracle.shape
    assert_close_to_oracle(got, eager, oracle, name="loss", atol=_loss_atol(oracle, dtype))
    seed = torch.randn(oracle.shape, dtype=torch.float64)
    for name, a, e, q in zip(["dinput", "dweight", "dbias"], _grad(got, leaves, seed),
                             _grad(eager, leaves, seed), _grad(oracle, leaves64, seed)):
        assert a.dtype == dtype
        # weight/bias grads sum over tokens: a few ulps of headroom in float32
        assert_close_to_oracle(a, e, q, name=name, atol=1e-5 if dtype == torch.float32 else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_equals_unfused_float64(backend, reduction):
    # extras off: F.cross_entropy(F.linear(...)); extras on: the oracle. Every chunk size agrees.
    x = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, dtype=torch.float64, requires_grad=True)
    t = _targets((2, 11), 101, -100, 0.25)
    for extras in (dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=6.0)):
        if extras:
            want = _linear_oracle(x, w, t, b, reduction=reduction, **extras)
        else:
            want = F.cross_entropy(F.linear(x, w, b).reshape(-1, 101), t.reshape(-1),
                                   reduction=reduction)
            want = want.reshape(t.shape) if reduction == "none" else want
        seed = torch.randn(want.shape, dtype=torch.float64)
        g_want = _grad(want, [x, w, b], seed)
        for chunk in (5, 22, None):
            got = llmcore.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=chunk,
                                               backend=backend, **extras)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            for g, gw in zip(_grad(got, [x, w, b], seed), g_want):
                torch.testing.assert_close(g, gw, rtol=1e-12, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active, in bytes (the Triton
    interpreter moves a kernel's arguments as byte views of their storage)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_never_holds_all_logits(backend, reduction):
    n_rows, hidden, n_classes, chunk = 96, 16, 1001, 8
    x = torch.randn(n_rows, hidden, requires_grad=True)
    w = torch.randn(n_classes, hidden, requires_grad=True)
    b = torch.randn(n_classes, requires_grad=True)
    t = _targets((n_rows,), n_classes, -100, 0.1)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    probe = _LargestTensor()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), probe:
        out = llmcore.linear_cross_entropy(x, w, t, b, reduction=reduction, z_loss=1e-3,
                                           softcap=5.0, chunk_size=chunk, backend=backend)
        out.sum().backward()
    # bounded by one chunk of fp32 logits or the weight itself, far below N * V
    bound = max(chunk * n_classes, n_classes * hidden)
    assert max(saved) <= n_classes * hidden, saved
    assert probe.largest <= 4 * bound and bound < n_rows * n_classes // 4, probe.largest
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_all_ignored_and_empty(backend):
    w = torch.randn(29, 8, requires_grad=True)
    b = torch.randn(29, requires_grad=True)
    for n_rows, fill in ((6, -100), (0, 0)):
        x = torch.randn(n_rows, 8, requires_grad=True)
        t = torch.full((n_rows,), fill)
        for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
            out = llmcore.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=4,
                                               z_loss=1e-3, label_smoothing=0.1, backend=backend)
            torch.testing.assert_close(out, torch.tensor(want), equal_nan=True)
            grads = torch.autograd.grad(out, [x, w, b])
            assert all(g.shape == v.shape and not g.any() for g, v in zip(grads, [x, w, b]))
        out = llmcore.linear_cross_entropy(x, w, t, b, reduction="none", backend=backend)
        assert out.shape == (n_rows,) and not out.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_no_grad_partial_grads_and_retain_graph(backend):
    x = torch.randn(10, 12, requires_grad=True)
    w = torch.randn(41, 12, requires_grad=True)
    t = _targets((10,), 41, -100, 0.2)
    want = F.cross_entropy(F.linear(x, w), t)
    with torch.no_grad():
        out = llmcore.linear_cross_entropy(x, w, t, chunk_size=3, backend=backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, want)
    # only the weight needs a gradient (frozen hidden states)
    xd = x.detach()
    out = llmcore.linear_cross_entropy(xd, w, t, chunk_size=3, backend=backend)
    (gw,) = torch.autograd.grad(out, w)
    torch.testing.assert_close(gw, torch.autograd.grad(F.cross_entropy(F.linear(xd, w), t), w)[0])
    # the saved gradients serve a second backward, scaled by its grad_output
    out = llmcore.linear_cross_entropy(x, w, t, chunk_size=3, backend=backend)
    g1 = torch.autograd.grad(out, x, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, x, torch.tensor(2.0))[0]
    torch.testing.assert_close(g2, 2 * g1)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(input=torch.randint(0, 3, (4, 8))), TypeError, "input must be a floating"),
        (dict(weight=torch.randn(11, 7)), ValueError, "weight must have shape (V, 8)"),
        (dict(weight=torch.randn(11)), ValueError, "weight must have shape (V, 8)"),
        (dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "weight must have input's dtype"),
        (dict(bias=torch.randn(10)), ValueError, "bias must have shape (11,)"),
        (dict(bias=torch.randn(11, dtype=torch.float16)), TypeError, "bias must have input's dtype"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape (4,)"),
        (dict(target=torch.tensor([0, 1, 11, 2])), ValueError, "target values must be in [0, 11)"),
        (dict(target=torch.tensor([0.0, 1, 2, 3])), TypeError, "target must be an integer"),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
        (dict(chunk_size=2.5), ValueError, "chunk_size must be None or an int >= 1"),
        (dict(reduction="mean_tokens"), ValueError, "reduction must be one of"),
        (dict(softcap=-1.0), ValueError, "softcap must be None or a float > 0"),
    ],
)
def test_linear_bad_input_is_named(kwargs, exc, words):
    args = dict(input=torch.randn(4, 8), weight=torch.randn(11, 8), target=torch.tensor([0, 1, 10, -100]))
    args.update(kwargs)
    with pytest.raises(exc, match=re.escape(words)):
        llmcore.linear_cross_entropy(**args)


def test_default_chunk_size():
    from llmcore.ops.cross_entropy import default_chunk_size

    assert default_chunk_size(100000, 50257) * 50257 * 4 <= 64 * 2 ** 20
    assert default_chunk_size(100000, 50257) % 8 == 0
    assert default_chunk_size(5, 1001) == 5
    assert default_chunk_size(0, 1001) == 1
    assert default_chunk_size(10, 2 ** 26) == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_backend_compiles_fullgraph(reduction):
    # aot_eager traces forward and backward with no C++ codegen; the CPU target check turns
    # into an asynchronous assert while compiling, so there is no graph break
    x = torch.randn(8, 33, requires_grad=True)
    w = torch.randn(40, 33, requires_grad=True)
    t = _targets((8,), 33, -100, 0.2)

    def losses(x, w, t):
        a = llmcore.cross_entropy(x, t, z_loss=1e-3, softcap=5.0, reduction=reduction,
                                  backend="torch")
        b = llmcore.linear_cross_entropy(x, w, t, z_loss=1e-3, chunk_size=3, reduction=reduction,
                                         backend="torch")
        return (a + b).sum()

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, w, t), losses(x, w, t)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, [x, w]), torch.autograd.grad(want, [x, w])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward_gives_the_same_loss_and_gradient(backend, reduction):
    from llmcore.ops import cross_entropy as ce_ops

    logits = torch.randn(13, 1001)
    target = torch.randint(0, 1001, (13,))
    target[3] = -100
    ref_x = logits.clone().requires_grad_()
    ref = llmcore.cross_entropy(ref_x, target, reduction=reduction, z_loss=1e-3, backend=backend)
    ref_g, = torch.autograd.grad(ref.sum() if reduction == "none" else ref, ref_x)

    x = logits.clone().requires_grad_()
    h = x * 1.0                       # a non-leaf whose buffer the kernel may overwrite
    got = llmcore.cross_entropy(h, target, reduction=reduction, z_loss=1e-3,
                                inplace_backward=True, backend=backend)
    got_g, = torch.autograd.grad(got.sum() if reduction == "none" else got, x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-7)
    if backend in ce_ops._INPLACE_BACKWARD:   # the logits' buffer now holds the gradient
        torch.testing.assert_close(h.detach(), got_g, rtol=1e-5, atol=1e-7)


def test_inplace_backward_must_be_bool():
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        llmcore.cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), inplace_backward=1)


def test_default_chunk_size_depends_on_shapes_and_device_type_only():
    # 64 MiB of fp32 logits, 256 MiB of bf16 ones (forward only: the backward's blocks are small)
    from llmcore.ops.cross_entropy import default_chunk_size

    assert default_chunk_size(8192, 128256, 4) == 128
    assert default_chunk_size(8192, 128256, 2) == 1040
    assert default_chunk_size(8192, 128256, 2) * 128256 * 2 <= 256 * 2 ** 20
    # on the CPU, fp32/fp64 chunks are at most 512 rows (they stay in the last-level cache);
    # bf16 keeps its budget (its schedule changes with the number of chunks)
    cpu = torch.device("cpu")
    assert default_chunk_size(2048, 4096, 4) == 2048
    assert default_chunk_size(2048, 4096, 4, device=cpu) == 512
    assert default_chunk_size(2048, 4096, 8, device="cpu") == 512
    assert default_chunk_size(300, 4096, 4, device=cpu) == 300
    assert default_chunk_size(8192, 128256, 4, device=cpu) == 128
    assert default_chunk_size(8192, 4096, 2, device=cpu) == 8192
    assert default_chunk_size(2048, 4096, 4, device="meta") == 2048


def test_cpu_call_chunks_by_default():
    # a 2048-row fp32 call on the CPU runs 4 chunks of 512 rows: the default chunk size gives the
    # same bits as chunk_size=512, and not those of one 2048-row chunk (dW sums 4 partials)
    torch.manual_seed(0)
    x = torch.randn(2048, 16, requires_grad=True)
    w = torch.randn(200, 16, requires_grad=True)
    t = torch.randint(0, 200, (2048,))
    grads = {}
    for c in (None, 512, 2048):
        loss = llmcore.linear_cross_entropy(x, w, t, chunk_size=c, backend="torch")
        grads[c] = (loss, *torch.autograd.grad(loss, [x, w]))
    assert all(torch.equal(a, b) for a, b in zip(grads[None], grads[512]))
    assert not torch.equal(grads[None][2], grads[2048][2])
    for a, b in zip(grads[None], grads[2048]):
        torch.testing.assert_close(a, b)
