"""llmcore.swiglu on every backend: forward and both gradient halves against the float64 formula
(the oracle rule) for every dtype, odd widths and 1-D to 3-D inputs, strided rows, one
gradient buffer, only x saved for the backward, bad input, empty input, registration
(opcheck, torch.compile), and the model's MLP calling it."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import (OpLog, assert_close_to_oracle, assert_compiled_grad_matches,
                             kernel_backends, stub_triton_kernels)
from llmcore.ops import swiglu as S

BACKENDS = kernel_backends("swiglu")
KERNELS = [b for b in BACKENDS if b != "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _formula(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _check_against_oracle(backend, x):
    """Forward and the gradient's two halves of llmcore.swiglu(x) against eager in x's dtype
    and the float64 oracle; x a leaf (or a view of one) that requires grad."""
    leaf = x if x.is_leaf else x._base
    got = llmcore.swiglu(x, backend=backend)
    eager = _formula(x)
    leaf64 = leaf.detach().double().requires_grad_()
    x64 = leaf64 if x.is_leaf else leaf64.as_strided(x.shape, x.stride(), x.storage_offset())
    oracle = _formula(x64)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert_close_to_oracle(got, eager, oracle, name="y")
    seed = torch.randn(oracle.shape, dtype=torch.float64)
    g = torch.autograd.grad(got, leaf, seed.to(x.dtype))[0]
    ge = torch.autograd.grad(eager, leaf, seed.to(x.dtype))[0]
    go = torch.autograd.grad(oracle, leaf64, seed)[0]
    if not x.is_leaf:                  # the part of the leaf's gradient that x covers
        g, ge, go = (t.as_strided(x.shape, x.stride(), x.storage_offset()) for t in (g, ge, go))
    for name, half in (("d gate", 0), ("d up", 1)):
        assert_close_to_oracle(*(t.chunk(2, -1)[half] for t in (g, ge, go)), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 2), (14,), (3, 5, 194), (4, 600)],
                         ids=["F1", "F7-1d", "F97-3d", "F300"])
def test_matches_the_formula(backend, dtype, shape):
    x = (torch.randn(shape, dtype=torch.float64) * 2.5).to(dtype).requires_grad_()
    _check_against_oracle(backend, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(backend, dtype):
    # rows of a wider buffer (unit last-dim stride, any row stride): read in place
    big = torch.randn(9, 2 * 33 + 5, dtype=dtype, requires_grad=True)
    _check_against_oracle(backend, big[:, 2:2 * 33 + 2])
    big3 = torch.randn(2, 7, 2 * 20 + 3, dtype=dtype, requires_grad=True)
    _check_against_oracle(backend, big3[:, 1:6, :40])


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_rows_are_read_in_place(backend, monkeypatch):
    if backend == "triton":
        stub_triton_kernels(monkeypatch, "swiglu")    # the interpreter's own copies aside
    big = torch.randn(6, 50)
    x = big[:, 3:43]                                   # (6, 2 * 20), row stride 50
    with OpLog() as log:
        llmcore.swiglu(x, backend=backend)
    assert not {"aten.clone", "aten.copy_", "aten.contiguous"} & set(log.ops), log.ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_layouts_and_gradients(backend):
    # a last dim with stride != 1 (copied), and the stride-0 gradient of y.sum()
    xt = torch.randn(16, 5, requires_grad=True)
    x = xt.t()                                         # (5, 16), strides (1, 5)
    y = llmcore.swiglu(x, backend=backend)
    torch.testing.assert_close(y, _formula(x))
    g = torch.autograd.grad(y.sum(), xt)[0]
    torch.testing.assert_close(g, torch.autograd.grad(_formula(x).sum(), xt)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 6), (3, 0)])
def test_empty_input(backend, shape):
    # no rows (an empty batch) or F = 0: empty out, empty gradients
    x = torch.randn(shape, requires_grad=True)
    y = llmcore.swiglu(x, backend=backend)
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    g = torch.autograd.grad(y.sum(), x)[0]
    assert g.shape == x.shape


@pytest.mark.parametrize("backend", KERNELS)
def test_gradient_is_one_buffer_and_nothing_but_x_is_saved(backend, monkeypatch):
    if backend == "triton":
        stub_triton_kernels(monkeypatch, "swiglu")    # the host path alone (values are garbage)
    x = torch.randn(5, 3, 2 * 11, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = llmcore.swiglu(x, backend=backend)
    # only x is kept for the backward (a view of its storage: no new bytes). Eager saves
    # silu(gate), an (N, F) activation, besides gate and up (views of x)
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == x.data_ptr()
    assert saved[0].shape == (15, 22)
    dy = torch.randn(y.shape)
    with OpLog() as log:
        y.backward(dy)
    # one kernel writes both halves: no cat/stack/copy of two half gradients, no zero-fill
    waste = {"aten.cat", "aten.stack", "aten.copy_", "aten.zeros", "aten.fill_", "aten.zero_",
             "aten.slice_backward", "aten.new_zeros"} & set(log.ops)
    assert not waste, log.ops
    assert x.grad.is_contiguous() and x.grad.shape == x.shape


def test_eager_saves_an_activation_that_the_kernels_do_not():
    # the reason for the op: eager keeps silu(gate), (N, F), alive until the backward
    x = torch.randn(4, 2 * 8, requires_grad=True)
    new = []

    def pack(t):
        if t.untyped_storage().data_ptr() != x.data_ptr():
            new.append(t.shape)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        llmcore.swiglu(x, backend="torch")
    assert new == [torch.Size((4, 8))]


@pytest.mark.parametrize("backend", KERNELS)
def test_registered_op_saves_only_x_and_equals_the_eager_path(backend):
    fwd_op, bwd_op = _ops(backend)
    x = torch.randn(7, 2 * 9, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y_op = fwd_op(x)
    assert len(saved) == 1 and saved[0] is x
    y = llmcore.swiglu(x, backend=backend)
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    dy = torch.randn(y.shape)
    g = torch.autograd.grad(y, x, dy)[0]
    torch.testing.assert_close(torch.autograd.grad(y_op, x, dy)[0], g, rtol=0, atol=0)
    torch.testing.assert_close(bwd_op(dy, x.detach()), g, rtol=0, atol=0)


def _ops(backend):
    """(the differentiable op, its backward kernel op): Triton's forward custom op carries the
    autograd; the native forward is llmcore::swiglu (C++ autograd) over llmcore::swiglu_fwd."""
    if backend == "triton":
        return torch.ops.llmcore_triton.swiglu_fwd.default, torch.ops.llmcore_triton.swiglu_bwd.default
    return torch.ops.llmcore.swiglu.default, torch.ops.llmcore.swiglu_bwd.default


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_and_compile(backend):
    fwd_op, bwd_op = _ops(backend)
    x = torch.randn(6, 2 * 13, requires_grad=True)
    torch.library.opcheck(fwd_op, (x,))
    torch.library.opcheck(bwd_op, (torch.randn(6, 13), x.detach()))
    torch.library.opcheck(fwd_op, (torch.randn(5, 2 * 13 + 4)[:, :26].requires_grad_(),))
    x3 = torch.randn(2, 3, 2 * 13, requires_grad=True)
    if backend == "native":            # the differentiable op takes any shape; its kernel op
        torch.library.opcheck(fwd_op, (x3,))
        torch.library.opcheck(fwd_op, (torch.randn(6, 4).t().requires_grad_(),))
        torch.library.opcheck(fwd_op, (torch.randn(12, requires_grad=True),))
        torch.library.opcheck(torch.ops.llmcore.swiglu_fwd.default, (x.detach(),))

    def f(x):
        return (llmcore.swiglu(x, backend=backend) * 2).sum()
    assert_compiled_grad_matches(f, x3)


def test_bad_input_is_refused_naming_the_argument():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        llmcore.swiglu(x.tolist())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        llmcore.swiglu(torch.ones(4, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 2F\).*even last dim.*\(4, 7\)"):
        llmcore.swiglu(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 2F\).*got shape \(\)"):
        llmcore.swiglu(torch.tensor(1.0))
    with pytest.raises(ValueError, match="backend must be one of"):
        llmcore.swiglu(x, backend="cuda")
    with pytest.raises(ValueError, match="backend 'flash_attn' exists only for attention"):
        llmcore.swiglu(x, backend="flash_attn")
    if "native" in KERNELS:                    # the C++ op's own checks
        with pytest.raises(ValueError, match="x must be 2-dimensional"):
            torch.ops.llmcore.swiglu_fwd(torch.randn(2, 3, 4))
        with pytest.raises(ValueError, match="x needs a unit stride"):
            torch.ops.llmcore.swiglu_fwd(torch.randn(6, 4).t())
        with pytest.raises(ValueError, match=r"dy must have shape \[4, 3\]"):
            torch.ops.llmcore.swiglu_bwd(torch.randn(4, 2), torch.randn(4, 6))


def test_the_model_runs_swiglu_on_its_backend(monkeypatch):
    from llmcore.models import Transformer, preset

    # the native C++ eager entry off (tests/ops/test_eager_entry.py holds it to this path), so
    # the call reaches the backend table spied on below
    monkeypatch.setattr(S, "_native_fast", None)

    model = Transformer(preset("tiny-llama", vocab_size=31, dim=32, n_layers=1, n_heads=4,
                               n_kv_heads=2, ffn_dim=40))
    mlp = model.blocks[0].mlp
    assert mlp.backend == llmcore.backends.resolve("swiglu", "auto", "cpu")
    calls = []
    impl = S._SWIGLU[mlp.backend]

    def spy(x):
        calls.append(x.shape)
        return impl(x)
    S._SWIGLU[mlp.backend] = spy
    try:
        model(torch.randint(0, 31, (2, 9)), labels=torch.randint(0, 31, (2, 9))).loss.backward()
    finally:
        S._SWIGLU[mlp.backend] = impl
    assert calls == [torch.Size((2, 9, 80))]


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_is_refused_not_silently_wrong(backend):
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.autograd.grad(llmcore.swiglu(x, backend=backend).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
