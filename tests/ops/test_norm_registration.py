"""The native norm ops as torch.library ops: opcheck (schema, fake impl, autograd registration,
AOT dispatch) and torch.compile(fullgraph=True) through the public functions."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends("norm"),
                                reason="llmcore._native is not built")


def _args(rows, cols, dtype, residual, affine, bias, rms):
    x = torch.randn(rows, cols, dtype=dtype, requires_grad=True)
    r = torch.randn(rows, cols, dtype=dtype, requires_grad=True) if residual else None
    w = torch.rand(cols, dtype=dtype, requires_grad=True) if affine else None
    b = torch.randn(cols, dtype=dtype, requires_grad=True) if bias else None
    return (x, r, w, b, 1e-5, rms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms,residual,affine", [(False, False, True), (False, True, True),
                                                 (True, True, True), (True, False, False)])
def test_norm_opcheck(dtype, rms, residual, affine):
    # llmcore::norm, the differentiable op the public functions call (autograd in C++), and
    # the kernel op below it (no autograd of its own: inputs that do not require grad)
    x, r, w, b, eps, rms = _args(5, 37, dtype, residual, affine, affine and not rms, rms)
    torch.library.opcheck(torch.ops.llmcore.norm.default, (x, r, w, b, 1, eps, rms))
    plain = tuple(None if t is None else t.detach() for t in (x, r, w, b))
    torch.library.opcheck(torch.ops.llmcore.norm_fwd.default, (*plain, eps, rms))


@pytest.mark.parametrize("rms", [False, True])
def test_norm_bwd_opcheck(rms):
    x = torch.randn(6, 41)
    w = torch.rand(41)
    _, _, mean, rstd = torch.ops.llmcore.norm_fwd(x, None, w, None, 1e-5, rms)
    dy, dh = torch.randn(6, 41), torch.randn(6, 41)
    args = (dy, dh, x, w, mean, rstd, rms, True, not rms)
    torch.library.opcheck(torch.ops.llmcore.norm_bwd.default, args)


@pytest.mark.parametrize("rms", [False, True])
def test_opcheck_of_a_transposed_input(rms):
    # the kernel ops return contiguous outputs whatever the input's strides: a dense but
    # transposed x must get the same strides from the fake impls as from the kernels (the fakes
    # once kept x's, and a compiled call of layer_norm(x.t()) failed inductor's stride check)
    x, res, dy, dh = (torch.randn(53, 6).t() for _ in range(4))
    w = torch.rand(53)
    torch.library.opcheck(torch.ops.llmcore.norm_fwd.default, (x, res, w, None, 1e-5, rms))
    _, h, mean, rstd = torch.ops.llmcore.norm_fwd(x, res, w, None, 1e-5, rms)
    torch.library.opcheck(torch.ops.llmcore.norm_bwd.default,
                          (dy, dh, h.t().contiguous().t(), w, mean, rstd, rms, True, False))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_compile_fullgraph_forward_and_backward(kind):
    torch._dynamo.reset()

    def block(x, res, w, b):
        if kind == "layer":
            y, h = llmcore.layer_norm(x, x.shape[-1:], w, b, residual=res, backend="native")
        else:
            y, h = llmcore.rms_norm(x, x.shape[-1], w, 1e-6, residual=res, backend="native")
        return (y * 2).sum() + h.square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [torch.randn(2, 7, 53, requires_grad=True), torch.randn(2, 7, 53, requires_grad=True),
              torch.rand(53, requires_grad=True), torch.randn(53, requires_grad=True)]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)

    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    x, res, w, b = ref_leaves
    h = x + res
    y = F.layer_norm(h, (53,), w, b) if kind == "layer" else F.rms_norm(h, (53,), w, 1e-6)
    ref_loss = (y * 2).sum() + h.square().sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
    torch.testing.assert_close(loss, ref_loss)
    for name, g, want in zip(["x", "residual", "weight", "bias"], grads, ref_grads):
        if kind == "rms" and name == "bias":
            assert g is None and want is None
            continue
        torch.testing.assert_close(g, want, atol=2e-5, rtol=1e-5, msg=name)


def test_mixed_dtype_weight_grad_keeps_weight_dtype():
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(16, dtype=torch.float32, requires_grad=True)
    y = llmcore.rms_norm(x, 16, w, backend="native")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_float64_runs_natively():
    x = torch.randn(3, 29, dtype=torch.float64, requires_grad=True)
    w = torch.rand(29, dtype=torch.float64, requires_grad=True)
    got = llmcore.layer_norm(x, 29, w, None, backend="native")
    torch.testing.assert_close(got, F.layer_norm(x, (29,), w), rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(got.sum(), [w])
    (want,) = torch.autograd.grad(F.layer_norm(x, (29,), w).sum(), [w])
    torch.testing.assert_close(g, want, rtol=0, atol=1e-12)


def test_op_level_errors_name_the_argument():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="x must be 2-dimensional"):
        torch.ops.llmcore.norm_fwd(torch.randn(8), None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        torch.ops.llmcore.norm_fwd(x, None, torch.randn(7), None, 1e-5, False)
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        torch.ops.llmcore.norm_fwd(x.int(), None, None, None, 1e-5, False)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        torch.ops.llmcore.norm_fwd(x, x.double(), None, None, 1e-5, False)


def test_deterministic_weight_grad():
    x = torch.randn(513, 300)
    w = torch.rand(300, requires_grad=True)
    b = torch.randn(300, requires_grad=True)
    dy = torch.randn(513, 300)
    runs = []
    for _ in range(2):
        y = llmcore.layer_norm(x, 300, w, b, backend="native")
        runs.append(torch.autograd.grad(y, [w, b], dy))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
