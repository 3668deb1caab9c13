"""The native cross-entropy ops as torch.library ops: opcheck (schema, fake impl, the C++
autograd kernel, AOT dispatch, the declared in-place mutation), torch.compile(fullgraph=True)
through the public functions, what one call dispatches, and native-only behaviour (class
weights that require grad, the target check in C++)."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import OpLog, kernel_backends

pytestmark = pytest.mark.skipif("native" not in kernel_backends("cross_entropy"),
                                reason="llmcore._native is not built")


def _target(n, v, ignored=(1,)):
    t = torch.randint(0, v, (n,))
    for i in ignored:
        t[i] = -100
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted,ls,z,cap", [(False, 0.0, 0.0, 0.0), (True, 0.1, 1e-3, 7.0)])
def test_cross_entropy_fwd_opcheck(dtype, weighted, ls, z, cap):
    # not differentiable on its own (llmcore::cross_entropy is): no input requires grad
    x = torch.randn(6, 131, dtype=dtype)
    w = torch.rand(131, dtype=dtype) + 0.5 if weighted else None
    args = (x, _target(6, 131), w, -100, ls, z, cap)
    torch.library.opcheck(torch.ops.llmcore.cross_entropy_fwd.default, args)
    torch.library.opcheck(torch.ops.llmcore.cross_entropy_fwd.default,
                          args + (torch.tensor(0.75),))                      # z_ratio


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("weighted,ls,z,cap", [(False, 0.0, 0.0, 0.0), (True, 0.1, 1e-3, 7.0)])
def test_cross_entropy_opcheck(reduction, dtype, wdtype, weighted, ls, z, cap):
    # the op llmcore.cross_entropy calls: schema, fake impl, the C++ autograd kernel
    x = torch.randn(6, 131, dtype=dtype, requires_grad=True)
    w = torch.rand(131, dtype=wdtype) + 0.5 if weighted else None
    args = (x, _target(6, 131), w, -100, reduction, ls, z, cap)
    torch.library.opcheck(torch.ops.llmcore.cross_entropy.default, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_call_dispatches_the_kernels_once(reduction):
    # the host cost of a call, counted rather than timed: each kernel once, and beyond them only
    # the reduction's few tiny ops (mean: the valid count, the sum, the division and, in
    # backward, grad / count)
    x = torch.randn(8, 97, requires_grad=True)
    t = _target(8, 97)
    seed = torch.randn(8) if reduction == "none" else torch.tensor(1.5)
    mode = OpLog()
    with mode:
        out = llmcore.cross_entropy(x, t, reduction=reduction, backend="native")
        torch.autograd.grad(out, x, seed)
    kernels = [op for op in mode.ops if op.startswith("llmcore.")]
    # each kernel once: the ordinary call goes through the C++ eager entry, whose op checks the
    # CPU targets' range itself (no separate check op)
    assert kernels == ["llmcore.cross_entropy_fwd", "llmcore.cross_entropy_bwd"], mode.ops
    others = len(mode.ops) - len(kernels)
    assert others <= {"mean": 5, "sum": 1, "none": 0}[reduction], mode.ops


def test_the_ops_check_the_target_range_on_the_cpu():
    # the public function checks first (tests/reliability); the ops themselves refuse too, in
    # the same words (on CUDA the kernel's device-side assert does)
    x = torch.randn(3, 7)
    for bad in (7, -1):
        t = torch.tensor([1, bad, 0])
        words = rf"target values must be in \[0, 7\) or equal ignore_index=-100, got {bad}"
        with pytest.raises(ValueError, match=words):
            torch.ops.llmcore.cross_entropy(x, t, None, -100, 1, 0.0, 0.0, 0.0)
        with pytest.raises(ValueError, match=words):
            torch.ops.llmcore.cross_entropy_bwd(torch.ones(3), x, t, None, torch.zeros(3), -100,
                                                0.0, 0.0, 0.0)


def test_cross_entropy_bwd_and_rows_opcheck():
    x = torch.randn(5, 77)
    t = _target(5, 77)
    _, lse = torch.ops.llmcore.cross_entropy_fwd(x, t, None, -100, 0.1, 1e-3, 0.0)
    torch.library.opcheck(torch.ops.llmcore.cross_entropy_bwd.default,
                          (torch.randn(5), x, t, None, lse, -100, 0.1, 1e-3, 0.0))
    torch.library.opcheck(torch.ops.llmcore.cross_entropy_rows_.default,
                          (x.clone(), t, None, -100, 0.1, 1e-3, 0.0, torch.tensor(0.25)))


def test_rows_inplace_equals_fwd_then_bwd():
    x = torch.randn(7, 301) * 4
    t = _target(7, 301, ignored=(0, 5))
    scale = torch.randn(7)
    loss, lse = torch.ops.llmcore.cross_entropy_fwd(x, t, None, -100, 0.1, 1e-3, 9.0)
    dx = torch.ops.llmcore.cross_entropy_bwd(scale, x, t, None, lse, -100, 0.1, 1e-3, 9.0)
    buf = x.clone()
    loss2 = torch.ops.llmcore.cross_entropy_rows_(buf, t, None, -100, 0.1, 1e-3, 9.0, scale)
    assert torch.equal(loss, loss2) and torch.equal(buf, dx)
    assert not dx[0].any() and not dx[5].any() and loss[0] == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    torch._dynamo.reset()

    def loss_fn(x, t, w):
        out = llmcore.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1,
                                    z_loss=1e-3, softcap=20.0, backend="native")
        return out.sum()

    x = torch.randn(9, 3, 211, requires_grad=True)                  # (N, C, d1) layout
    t = torch.randint(0, 3, (9, 211)).where(torch.rand(9, 211) > 0.1, -100)
    xt = torch.randn(9, 211, requires_grad=True)
    w = torch.rand(3) + 0.5
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for args in ((x, t, w), (xt, torch.randint(0, 211, (9,)), None)):
        got = compiled(*args)
        (g,) = torch.autograd.grad(got, args[0])
        ref = llmcore.cross_entropy(*args[:2], args[2], reduction=reduction, label_smoothing=0.1,
                                    z_loss=1e-3, softcap=20.0, backend="torch").sum()
        (g_ref,) = torch.autograd.grad(ref, args[0])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_compile_linear_cross_entropy():
    torch._dynamo.reset()
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    t = torch.randint(0, 97, (37,))

    def fn(x, w):
        return llmcore.linear_cross_entropy(x, w, t, chunk_size=8, backend="native")

    got = torch.compile(fn, backend="aot_eager")(x, w)
    gx, gw = torch.autograd.grad(got, [x, w])
    ref = F.cross_entropy(x @ w.t(), t)
    rx, rw = torch.autograd.grad(ref, [x, w])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_class_weight_requiring_grad_is_refused():
    x = torch.randn(4, 10, requires_grad=True)
    w = torch.rand(10, requires_grad=True)
    with pytest.raises(ValueError, match="weight must not require grad with backend 'native'"):
        llmcore.cross_entropy(x, torch.randint(0, 10, (4,)), w, backend="native")
    with torch.no_grad():
        llmcore.cross_entropy(x, torch.randint(0, 10, (4,)), w, backend="native")


def test_op_level_errors_name_the_argument():
    x = torch.randn(3, 8)
    t = torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match="target must be int64"):
        torch.ops.llmcore.cross_entropy_fwd(x, t.int(), None, -100, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        torch.ops.llmcore.cross_entropy_fwd(x, t, torch.ones(7), -100, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        torch.ops.llmcore.cross_entropy_rows_(torch.randn(8, 3).t(), t, None, -100, 0.0, 0.0,
                                              0.0, torch.tensor(1.0))


def test_check_targets_op_takes_any_integer_layout():
    # the public functions' CPU range check: narrow dtypes and strided targets, first bad value
    t32 = torch.tensor([[1, 9], [7, 0], [8, 2]], dtype=torch.int32)[:, 0]      # [1, 7, 8]
    with pytest.raises(ValueError, match=r"in \[0, 7\) or equal ignore_index=-100, got 7"):
        torch.ops.llmcore.cross_entropy_check_targets(t32, 7, -100)
    torch.ops.llmcore.cross_entropy_check_targets(t32, 9, -100)
    torch.ops.llmcore.cross_entropy_check_targets(torch.tensor(-100), 9, -100)


# ---------------------------------------------------------------- llmcore::linear_cross_entropy
# The eager one-chunk call (every row in one chunk) is one C++ op with its autograd in C++; the
# Python chunk loop (what torch.compile traces, and every larger call) must agree with it bit
# for bit.

def _lce_inputs(n, h, v, dtype, bias):
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, h) / h ** 0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(v) * 0.5).to(dtype).requires_grad_() if bias else None
    return x, w, b, _target(n, v, ignored=(1, 4))


def _lce_both_routes(x, w, b, t, reduction, opts):
    from llmcore.ops.cross_entropy import _LINEAR_CROSS_ENTROPY

    leaves = [p for p in (x, w, b) if p is not None]
    results = []
    for route in ("op", "loop"):
        if route == "op":
            out = llmcore.linear_cross_entropy(x, w, t, b, reduction=reduction, backend="native",
                                               **opts)
            assert "LinearCrossEntropyFunction" in out.grad_fn.name(), out.grad_fn.name()
        else:
            loop = _LINEAR_CROSS_ENTROPY["native"].chunked
            out = loop(x, w, t, b, -100, reduction, opts.get("label_smoothing", 0.0),
                       opts.get("z_loss", 0.0), opts.get("softcap"), x.shape[0])
        torch.manual_seed(0)                          # the same output gradient for both
        seed = torch.randn(out.shape).to(out.dtype)
        results.append([out, *torch.autograd.grad(out, leaves, seed)])
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0}],
                         ids=["plain", "options"])
def test_linear_cross_entropy_op_equals_the_chunk_loop(dtype, reduction, bias, opts):
    x, w, b, t = _lce_inputs(9, 24, 301, dtype, bias)
    op, loop = _lce_both_routes(x, w, b, t, reduction, opts)
    for got, want in zip(op, loop):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_linear_cross_entropy_op_second_backward_recomputes():
    # the first backward overwrites the kept logits with their gradient; with retain_graph a
    # second backward recomputes them and gets the same gradients
    x, w, b, t = _lce_inputs(6, 16, 97, torch.float32, True)
    out = llmcore.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, backend="native")
    first = torch.autograd.grad(out, [x, w, b], retain_graph=True)
    second = torch.autograd.grad(out, [x, w, b])
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_linear_cross_entropy_op_without_grad():
    x, w, b, t = _lce_inputs(6, 16, 97, torch.float32, True)
    with torch.no_grad():
        got = llmcore.linear_cross_entropy(x, w, t, b, z_loss=1e-3, backend="native")
    want = llmcore.linear_cross_entropy(x, w, t, b, z_loss=1e-3, backend="native")
    assert got.grad_fn is None and torch.equal(got, want.detach())


def test_linear_cross_entropy_op_grads_only_what_is_asked():
    x, w, b, t = _lce_inputs(6, 16, 97, torch.float32, True)
    w.requires_grad_(False)
    out = llmcore.linear_cross_entropy(x, w, t, b, backend="native")
    dx, db = torch.autograd.grad(out, [x, b])
    x2 = x.detach().requires_grad_()
    b2 = b.detach().requires_grad_()
    want = F.cross_entropy(F.linear(x2, w, b2), t)
    torch.testing.assert_close(out, want)
    for a, c in zip((dx, db), torch.autograd.grad(want, [x2, b2])):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False)])
def test_linear_cross_entropy_opcheck(reduction, dtype, bias):
    x, w, b, t = _lce_inputs(5, 8, 61, dtype, bias)
    args = (x, w, b, t, -100, reduction, 0.1, 1e-3, 0.0)
    torch.library.opcheck(torch.ops.llmcore.linear_cross_entropy.default, args)


def test_linear_cross_entropy_op_refuses_bad_shapes():
    x, w, b, t = _lce_inputs(5, 8, 61, torch.float32, True)
    op = torch.ops.llmcore.linear_cross_entropy
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
        op(x, w[:, :4], b, t, -100, 1, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"bias must have shape \[61\]"):
        op(x, w, b[:3], t, -100, 1, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError, match="weight must have input's dtype"):
        op(x, w.double(), b, t, -100, 1, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="target values must be in"):
        op(x, w, b, torch.full((5,), 61), -100, 1, 0.0, 0.0, 0.0)
