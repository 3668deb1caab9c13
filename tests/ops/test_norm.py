"""layer_norm / rms_norm on every backend that runs here, against the float64 oracle."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import assert_close_to_oracle, kernel_backends

BACKENDS = kernel_backends("norm")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 97), (2, 5, 64), (17, 1023), (1, 1500)]


def _oracle_layer_norm(x, w, b, eps, res):
    h = x.double() + (res.double() if res is not None else 0)
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    y = (h - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y, h


def _oracle_rms_norm(x, w, eps, res):
    h = x.double() + (res.double() if res is not None else 0)
    y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.double()
    return y, h


def _eager_same_dtype(kind, x, w, b, eps, res):
    h = x if res is None else x + res
    if kind == "layer":
        return F.layer_norm(h, h.shape[-1:], w, b, eps), h
    return F.rms_norm(h, h.shape[-1:], w, eps), h


def _leaves(shape, dtype, affine, residual):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    w = (torch.rand(n, dtype=dtype) + 0.5) if affine else None
    b = torch.randn(n, dtype=dtype) if affine else None
    r = torch.randn(shape, dtype=dtype) if residual else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b, r)]


def _grads(outs, inputs, seed_grads):
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, seed_grads))
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(loss, live)
    it = iter(got)
    return [next(it) if t is not None else None for t in inputs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("affine,residual", [(True, False), (False, False), (True, True)])
def test_norm_matches_oracle(backend, dtype, shape, kind, affine, residual):
    x, w, b, r = _leaves(shape, dtype, affine, residual)
    if kind == "rms":
        b = None
    eps = 1e-5
    if kind == "layer":
        got = llmcore.layer_norm(x, shape[-1], w, b, eps, residual=r, backend=backend)
    else:
        got = llmcore.rms_norm(x, [shape[-1]], w, eps, residual=r, backend=backend)
    eager = _eager_same_dtype(kind, x, w, b, eps, r)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    if kind == "layer":
        oracle = _oracle_layer_norm(*leaves64[:3], eps, leaves64[3])
    else:
        oracle = _oracle_rms_norm(leaves64[0], leaves64[1], eps, leaves64[3])
    if residual:
        assert isinstance(got, tuple) and len(got) == 2
        outs, eager_outs, oracle_outs = list(got), list(eager), list(oracle)
    else:
        assert isinstance(got, torch.Tensor)
        outs, eager_outs, oracle_outs = [got], [eager[0]], [oracle[0]]
    for name, o, e, q in zip(["out", "h"], outs, eager_outs, oracle_outs):
        assert o.dtype == dtype
        assert_close_to_oracle(o, e, q, name=name)
    seeds = [torch.randn(o.shape) for o in outs]
    inputs = [x, w, b, r]
    g_got = _grads(outs, inputs, seeds)
    g_eager = _grads(eager_outs, inputs, seeds)
    g_oracle = _grads(oracle_outs, leaves64, [s.double() for s in seeds])
    for name, a, e, q in zip(["dx", "dweight", "dbias", "dresidual"], g_got, g_eager, g_oracle):
        if q is None:
            continue
        # weight/bias grads sum over rows: allow a few ulps more in low precision
        atol = 1e-5 if dtype == torch.float32 else None
        assert_close_to_oracle(a, e, q, name=name, atol=atol)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_torch_backend_equals_functional(kind):
    x = torch.randn(4, 6, 33, dtype=torch.float64)
    w = torch.rand(6, 33, dtype=torch.float64)
    b = torch.randn(6, 33, dtype=torch.float64)
    if kind == "layer":
        got = llmcore.layer_norm(x, (6, 33), w, b, 1e-6, backend="torch")
        want = F.layer_norm(x, (6, 33), w, b, 1e-6)
    else:
        got = llmcore.rms_norm(x, (6, 33), w, backend="torch")
        want = F.rms_norm(x, (6, 33), w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    base = torch.randn(8, 130)
    x = base[:, 1:98]  # strided rows
    w = torch.rand(97)
    got = llmcore.layer_norm(x, 97, w, None, backend=backend)
    torch.testing.assert_close(got, F.layer_norm(x, (97,), w))
    xt = torch.randn(97, 5).t()  # transposed, (5, 97) with stride (1, 5)
    torch.testing.assert_close(llmcore.rms_norm(xt, 97, w, backend=backend), F.rms_norm(xt, (97,), w))
    empty = torch.randn(0, 97, requires_grad=True)
    out = llmcore.layer_norm(empty, 97, backend=backend)
    assert out.shape == (0, 97)
    out.sum().backward()
    assert empty.grad.shape == (0, 97)


def test_rms_norm_default_eps_is_dtype_eps():
    x = torch.full((2, 8), 1e-4, dtype=torch.float32)
    got = llmcore.rms_norm(x, 8, backend="torch")
    torch.testing.assert_close(got, F.rms_norm(x, (8,)))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(input=torch.randint(0, 3, (2, 4)), normalized_shape=4), TypeError, "input must be a floating"),
        (dict(input=torch.randn(2, 4), normalized_shape=5), ValueError, "normalized_shape"),
        (dict(input=torch.randn(2, 4), normalized_shape=4, weight=torch.randn(3)), ValueError, "weight must have shape (4,)"),
        (dict(input=torch.randn(2, 4), normalized_shape=4, bias=torch.randn(4, 1)), ValueError, "bias must have shape (4,)"),
        (dict(input=torch.randn(2, 4), normalized_shape=4, residual=torch.randn(2, 5)), ValueError, "residual must have shape (2, 4)"),
        (dict(input=torch.randn(2, 4), normalized_shape=4, residual=torch.randn(2, 4, dtype=torch.float64)), TypeError, "residual must have input's dtype"),
        (dict(input=torch.randn(2, 4), normalized_shape=4, backend="cuda"), ValueError, "backend must be one of"),
        (dict(input=torch.randn(2, 4), normalized_shape=4, backend="flash_attn"), ValueError, "only for attention"),
    ],
)
def test_bad_input_is_named(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        llmcore.layer_norm(**kwargs)


def test_named_backend_that_cannot_run_raises(fresh_backends, monkeypatch):
    backends = fresh_backends
    monkeypatch.setattr(backends, "IMPLEMENTED", {**backends.IMPLEMENTED, "norm": ("torch",)})
    with pytest.raises(llmcore.BackendUnavailableError, match="native.*norm"):
        llmcore.layer_norm(torch.randn(2, 4), 4, backend="native")


def test_env_overrides_auto(monkeypatch):
    from llmcore import backends

    monkeypatch.setenv("LLMCORE_BACKEND", "torch")
    assert backends.resolve("norm", "auto", "cpu") == "torch"
    monkeypatch.setenv("LLMCORE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        llmcore.rms_norm(torch.randn(2, 4), 4)
