"""llmcore.gelu on every backend: forward and gradient in both forms against the float64
formula (the oracle rule) for every dtype, odd widths and 0-D to 3-D inputs, both tails and
non-finite values, strided rows read in place, only x saved for the backward, bad input, empty
input, registration (opcheck, torch.compile), and the model's MLP calling it."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import (OpLog, assert_close_to_oracle, assert_compiled_grad_matches,
                             kernel_backends, stub_triton_kernels)
from llmcore.ops import gelu as G

BACKENDS = kernel_backends("gelu")
KERNELS = [b for b in BACKENDS if b != "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FORMS = ["none", "tanh"]


def _check_against_oracle(backend, x, approximate):
    """Forward and gradient of llmcore.gelu(x) against eager in x's dtype and the float64
    oracle; x a leaf (or a view of one) that requires grad."""
    leaf = x if x.is_leaf else x._base
    got = llmcore.gelu(x, approximate, backend=backend)
    eager = F.gelu(x, approximate=approximate)
    leaf64 = leaf.detach().double().requires_grad_()
    x64 = leaf64 if x.is_leaf else leaf64.as_strided(x.shape, x.stride(), x.storage_offset())
    oracle = F.gelu(x64, approximate=approximate)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert_close_to_oracle(got, eager, oracle, name="y")
    seed = torch.randn(oracle.shape, dtype=torch.float64)
    g = torch.autograd.grad(got, leaf, seed.to(x.dtype))[0]
    ge = torch.autograd.grad(eager, leaf, seed.to(x.dtype))[0]
    go = torch.autograd.grad(oracle, leaf64, seed)[0]
    if not x.is_leaf:                  # the part of the leaf's gradient that x covers
        g, ge, go = (t.as_strided(x.shape, x.stride(), x.storage_offset()) for t in (g, ge, go))
    assert_close_to_oracle(g, ge, go, name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 1), (7,), (3, 5, 97), (4, 600)],
                         ids=["F1", "F7-1d", "F97-3d", "F600"])
def test_matches_the_formula(backend, approximate, dtype, shape):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    _check_against_oracle(backend, x, approximate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", FORMS)
def test_tails_zero_scalars_and_non_finite(backend, approximate):
    # far into both tails (where eager's 1 + tanh / 1 + erf cancels), exact zeros, a 0-dim x
    x = torch.cat([torch.linspace(-40, 40, 801), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    _check_against_oracle(backend, x.requires_grad_(), approximate)
    s = torch.tensor(-1.5, requires_grad=True)
    _check_against_oracle(backend, s, approximate)
    if backend == "torch":           # F.gelu itself: its exact form gives nan at inf (below)
        return
    # inf -> inf (eager's exact form gives nan there: its erf(inf) path), -inf -> nan
    # (-inf * 0, as eager), nan -> nan
    z = torch.tensor([float("inf"), float("-inf"), float("nan"), 2.0])
    want = torch.tensor([float("inf"), float("nan"), float("nan"),
                         F.gelu(torch.tensor(2.0), approximate=approximate).item()])
    torch.testing.assert_close(llmcore.gelu(z, approximate, backend=backend), want,
                               equal_nan=True)


@pytest.mark.parametrize("backend", KERNELS)
def test_the_tanh_forms_tail_keeps_its_digits(backend):
    # for x in [-9, -3] eager's 0.5 x (1 + tanh z) cancels (100% relative error in fp32 below
    # x ~ -5.5, and in fp64 too below -8); the kernels' x sigmoid(2z) keeps ~5 digits (the
    # rounding of an exponent near -80 costs the last ones)
    x = torch.linspace(-9, -3, 61, dtype=torch.float64)
    z = (2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)
    want = x * torch.sigmoid(2 * z)
    got = llmcore.gelu(x.float(), "tanh", backend=backend).double()
    assert ((got - want).abs() / want.abs()).max().item() < 2e-5
    eager = F.gelu(x.float(), approximate="tanh").double()
    assert ((eager - want).abs() / want.abs()).max().item() > 0.5     # the cancellation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(backend, dtype):
    # rows of a wider buffer (unit last-dim stride, any row stride): read in place
    big = torch.randn(9, 40, dtype=dtype, requires_grad=True)
    _check_against_oracle(backend, big[:, 2:35], "tanh")
    big3 = torch.randn(2, 7, 23, dtype=dtype, requires_grad=True)
    _check_against_oracle(backend, big3[:, 1:6, :20], "none")


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_rows_are_read_in_place(backend, monkeypatch):
    if backend == "triton":
        stub_triton_kernels(monkeypatch, "gelu")      # the interpreter's own copies aside
    big = torch.randn(6, 50)
    with OpLog() as log:
        llmcore.gelu(big[:, 3:43], "tanh", backend=backend)
    assert not {"aten.clone", "aten.copy_", "aten.contiguous"} & set(log.ops), log.ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_layouts_and_gradients(backend):
    # a last dim with stride != 1 (copied), and the stride-0 gradient of y.sum()
    xt = torch.randn(16, 5, requires_grad=True)
    x = xt.t()                                         # (5, 16), strides (1, 5)
    y = llmcore.gelu(x, "tanh", backend=backend)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))
    g = torch.autograd.grad(y.sum(), xt)[0]
    torch.testing.assert_close(g, torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), xt)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 6), (3, 0)])
def test_empty_input(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    y = llmcore.gelu(x, backend=backend)
    assert y.shape == shape
    assert torch.autograd.grad(y.sum(), x)[0].shape == x.shape


@pytest.mark.parametrize("backend", KERNELS)
def test_nothing_but_x_is_saved_and_the_backward_is_one_kernel(backend, monkeypatch):
    if backend == "triton":
        stub_triton_kernels(monkeypatch, "gelu")      # the host path alone (values are garbage)
    x = torch.randn(5, 3, 11, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = llmcore.gelu(x, "tanh", backend=backend)
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == x.data_ptr()
    assert saved[0].shape == (15, 11)
    with OpLog() as log:
        y.backward(torch.randn(y.shape))
    waste = {"aten.copy_", "aten.zeros", "aten.fill_", "aten.zero_", "aten.mul", "aten.add",
             "aten.new_zeros"} & set(log.ops)
    assert not waste, log.ops
    assert x.grad.is_contiguous() and x.grad.shape == x.shape


def _ops(backend):
    """(the differentiable op, its backward kernel op): Triton's forward custom op carries the
    autograd; the native forward is llmcore::gelu (C++ autograd) over llmcore::gelu_fwd."""
    if backend == "triton":
        return torch.ops.llmcore_triton.gelu_fwd.default, torch.ops.llmcore_triton.gelu_bwd.default
    return torch.ops.llmcore.gelu.default, torch.ops.llmcore.gelu_bwd.default


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("approximate", FORMS)
def test_registered_op_saves_only_x_and_equals_the_eager_path(backend, approximate):
    fwd_op, bwd_op = _ops(backend)
    x = torch.randn(7, 9, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y_op = fwd_op(x, approximate)
    assert len(saved) == 1 and saved[0] is x
    y = llmcore.gelu(x, approximate, backend=backend)
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    dy = torch.randn(y.shape)
    g = torch.autograd.grad(y, x, dy)[0]
    torch.testing.assert_close(torch.autograd.grad(y_op, x, dy)[0], g, rtol=0, atol=0)
    torch.testing.assert_close(bwd_op(dy, x.detach(), approximate), g, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_and_compile(backend):
    fwd_op, bwd_op = _ops(backend)
    x = torch.randn(6, 13, requires_grad=True)
    for approximate in FORMS:
        torch.library.opcheck(fwd_op, (x, approximate))
        torch.library.opcheck(bwd_op, (torch.randn(6, 13), x.detach(), approximate))
    torch.library.opcheck(fwd_op, (torch.randn(5, 17)[:, :13].requires_grad_(), "tanh"))
    x3 = torch.randn(2, 3, 13, requires_grad=True)
    if backend == "native":            # the differentiable op takes any shape; its kernel op
        torch.library.opcheck(fwd_op, (x3, "none"))
        torch.library.opcheck(fwd_op, (torch.randn(4, 6).t().requires_grad_(), "tanh"))
        torch.library.opcheck(torch.ops.llmcore.gelu_fwd.default, (x.detach(), "tanh"))

    def f(x):
        return (llmcore.gelu(x, "tanh", backend=backend) * 2).sum()
    assert_compiled_grad_matches(f, x3)


def test_bad_input_is_refused_naming_the_argument():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        llmcore.gelu(x.tolist())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        llmcore.gelu(torch.ones(4, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'erf'"):
        llmcore.gelu(x, "erf")
    with pytest.raises(ValueError, match="backend must be one of"):
        llmcore.gelu(x, backend="cuda")
    with pytest.raises(ValueError, match="backend 'flash_attn' exists only for attention"):
        llmcore.gelu(x, backend="flash_attn")
    if "native" in KERNELS:                    # the C++ op's own checks
        with pytest.raises(ValueError, match="x must be 2-dimensional"):
            torch.ops.llmcore.gelu_fwd(torch.randn(2, 3, 4), "none")
        with pytest.raises(ValueError, match="x needs a unit stride"):
            torch.ops.llmcore.gelu_fwd(torch.randn(6, 4).t(), "none")
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
            torch.ops.llmcore.gelu_fwd(x, "fast")
        with pytest.raises(ValueError, match=r"dy must have shape \[4, 6\]"):
            torch.ops.llmcore.gelu_bwd(torch.randn(4, 2), x, "tanh")


@pytest.mark.parametrize("mlp", ["gelu", "gelu_tanh"])
def test_the_model_runs_gelu_on_its_backend(mlp, monkeypatch):
    from llmcore.models import Transformer, preset

    # the native C++ eager entry off (tests/ops/test_eager_entry.py holds it to this path), so
    # the call reaches the backend table spied on below
    monkeypatch.setattr(G, "_native_fast", None)

    model = Transformer(preset("tiny-gpt", vocab_size=31, dim=32, n_layers=1, n_heads=4,
                               ffn_dim=40, mlp=mlp))
    mlp_mod = model.blocks[0].mlp
    assert mlp_mod.backend == llmcore.backends.resolve("gelu", "auto", "cpu")
    calls = []
    impl = G._GELU[mlp_mod.backend]

    def spy(x, approximate):
        calls.append((x.shape, approximate))
        return impl(x, approximate)
    G._GELU[mlp_mod.backend] = spy
    try:
        model(torch.randint(0, 31, (2, 9)), labels=torch.randint(0, 31, (2, 9))).loss.backward()
    finally:
        G._GELU[mlp_mod.backend] = impl
    assert calls == [(torch.Size((2, 9, 40)), "tanh" if mlp == "gelu_tanh" else "none")]


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_is_refused_not_silently_wrong(backend):
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.autograd.grad(llmcore.gelu(x, backend=backend).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_nn_module_is_a_drop_in_for_torch_gelu(backend):
    m = llmcore.nn.GELU("tanh", backend=backend)
    assert isinstance(m, torch.nn.GELU) and repr(m) == repr(torch.nn.GELU("tanh"))
    x = torch.randn(3, 17, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0],
                               torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)[0])
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        llmcore.nn.GELU("fast", backend=backend)(x)


def test_without_a_gradient_the_triton_forward_runs_alone(monkeypatch):
    if "triton" not in KERNELS:
        pytest.skip("the Triton interpreter is not available here")
    from llmcore.ops import _rowwise

    def refuse(*args):
        raise AssertionError("an autograd.Function ran with nothing to differentiate")
    monkeypatch.setattr(_rowwise.RowwiseFunction, "apply", refuse)
    x = torch.randn(3, 17)
    want = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(llmcore.gelu(x, "tanh", backend="triton"), want)
    with torch.no_grad():
        y = llmcore.gelu(x.requires_grad_(), "tanh", backend="triton")
    torch.testing.assert_close(y, want)
    with pytest.raises(AssertionError, match="autograd.Function"):
        llmcore.gelu(x, "tanh", backend="triton")          # x requires grad: recorded
