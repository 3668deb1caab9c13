"""The Triton norm kernels beyond the shared suite (tests/ops/test_norm.py): deterministic weight
gradients, strided rows, the row-size cap, float64, the registered ops (opcheck) and
torch.compile. On CUDA tensors when a GPU is present, else on CPU tensors through the Triton
interpreter."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import assert_close_to_oracle, kernel_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in kernel_backends("norm", DEVICE),
                                reason="the triton backend cannot run norms here")


@pytest.fixture(autouse=True)
def _on_device():
    # with a GPU these tests run the compiled kernels on CUDA tensors; without one, the Triton
    # interpreter on CPU tensors (tests/conftest.py switches it on)
    with torch.device(DEVICE):
        yield


def _oracle(kind, x, w, b, eps, r):
    h = x.double() + (r.double() if r is not None else 0)
    if kind == "layer":
        y = F.layer_norm(h, h.shape[-1:], None if w is None else w.double(),
                         None if b is None else b.double(), eps)
    else:
        y = F.rms_norm(h, h.shape[-1:], None if w is None else w.double(), eps)
    return y, h


def _run(kind, x, w, b, r, eps=1e-5, backend="triton"):
    if kind == "layer":
        return llmcore.layer_norm(x, x.shape[-1], w, b, eps, residual=r, backend=backend)
    return llmcore.rms_norm(x, x.shape[-1], w, eps, residual=r, backend=backend)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grads_bit_identical_run_after_run(kind, dtype):
    # 37 rows over several programs: the fp32 partials and their one reduction are the only
    # path, so the same inputs give the same bits (atomics would not, on a GPU)
    x = torch.randn(37, 300, dtype=dtype)
    w = torch.rand(300, dtype=dtype) + 0.5
    b = torch.randn(300, dtype=dtype) if kind == "layer" else None
    dy = torch.randn(37, 300, dtype=dtype)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        out = _run(kind, leaves[0], leaves[1], leaves[2] if b is not None else None, None)
        return torch.autograd.grad(out, leaves, dy)

    first, second = grads(), grads()
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_strided_rows_residual_and_grads(kind):
    # rows with a stride (a slice), a transposed residual (feature stride != 1), leading dims
    base = torch.randn(2, 3, 130)
    x = base[..., 5:102].requires_grad_()                             # (2, 3, 97), row stride 130
    r = torch.randn(97, 3, 2).permute(2, 1, 0).requires_grad_()       # (2, 3, 97), stride (1, 2, 6)
    w = (torch.rand(97) + 0.5).requires_grad_()
    b = torch.randn(97, requires_grad=True) if kind == "layer" else None
    assert not x.is_contiguous() and not r.is_contiguous()
    y, h = _run(kind, x, w, b, r)
    leaves = [t for t in (x, r, w, b) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64, h64 = _oracle(kind, leaves64[0], leaves64[2], leaves64[3] if b is not None else None,
                       1e-5, leaves64[1])
    ye, he = (F.layer_norm(x + r, (97,), w, b) if kind == "layer"
              else F.rms_norm(x + r, (97,), w, 1e-5)), x + r               # eager, fp32
    assert_close_to_oracle(y, ye, y64, name="y")
    assert_close_to_oracle(h, he, h64, name="h")
    gy, gh = torch.randn(2, 3, 97), torch.randn(2, 3, 97)
    got = torch.autograd.grad((y, h), leaves, (gy, gh))
    eager = torch.autograd.grad((ye, he), leaves, (gy, gh))
    want = torch.autograd.grad((y64, h64), leaves64, (gy.double(), gh.double()))
    for name, a, e, q in zip(["dx", "dresidual", "dweight", "dbias"], got, eager, want):
        assert_close_to_oracle(a, e, q, name=name, atol=1e-5)


def test_strided_upstream_gradient_and_bias_only():
    # a non-contiguous dy (expand) reaches the backward kernel as is; bias without weight
    x = torch.randn(5, 97, requires_grad=True)
    b = torch.randn(97, requires_grad=True)
    y = llmcore.layer_norm(x, 97, None, b, backend="triton")
    dy = torch.randn(97).expand(5, 97)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = torch.autograd.grad(F.layer_norm(x64, (97,), None, b64), (x64, b64), dy.double())
    ye = F.layer_norm(x, (97,), None, b)
    eager = torch.autograd.grad(ye, (x, b), dy)
    assert_close_to_oracle(gx, eager[0], want[0], name="dx")
    assert_close_to_oracle(gb, eager[1], want[1], name="dbias", atol=1e-5)
    assert gb.dtype == b.dtype


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_float64_is_exact(kind):
    x = torch.randn(6, 2, 33, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 33, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 33, dtype=torch.float64, requires_grad=True)
    if kind == "layer":
        got = llmcore.layer_norm(x, (2, 33), w, b, 1e-6, backend="triton")
        want = F.layer_norm(x, (2, 33), w, b, 1e-6)
        leaves = (x, w, b)
    else:
        got = llmcore.rms_norm(x, (2, 33), w, 1e-6, backend="triton")
        want = F.rms_norm(x, (2, 33), w, 1e-6)
        leaves = (x, w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    seed = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, leaves, seed)
    for a, e in zip(got_grads, torch.autograd.grad(want, leaves, seed)):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_no_grad_route_equals_the_autograd_route(kind, dtype):
    # without anything to differentiate the kernel runs without the autograd.Function and
    # without storing statistics: the same bits, and nothing attached to the graph
    x = torch.randn(3, 7, 45, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 7, 45, dtype=dtype)
    w = torch.rand(45, dtype=dtype) + 0.5
    b = torch.randn(45, dtype=dtype) if kind == "layer" else None
    for res in (None, r):
        with_grad = _run(kind, x, w, b, res)
        with torch.no_grad():
            no_grad = _run(kind, x, w, b, res)
        frozen = _run(kind, x.detach(), w, b, res)                   # grad mode, no leaf
        for got in (no_grad, frozen):
            pairs = zip(got, with_grad) if res is not None else [(got, with_grad)]
            for a, e in pairs:
                assert not a.requires_grad and a.shape == e.shape
                assert torch.equal(a, e)


def test_row_size_cap():
    # 64 KB per row: 16384 fp32 / 32768 bf16 features are the largest allowed
    ok = torch.randn(2, 32768, dtype=torch.bfloat16)
    torch.testing.assert_close(llmcore.rms_norm(ok, 32768, backend="triton"),
                               F.rms_norm(ok, (32768,)), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match=r"16385 in torch.float32 is 65540 bytes.*at most 65536"):
        llmcore.layer_norm(torch.randn(2, 16385), 16385, backend="triton")
    with pytest.raises(ValueError, match=r"rms_norm on the triton backend"):
        llmcore.rms_norm(torch.randn(1, 2, 32769, dtype=torch.float16), (2, 32769),
                         backend="triton")


def test_opcheck_norm_ops():
    ops = torch.ops.llmcore_triton
    x = torch.randn(5, 37, requires_grad=True)
    r = torch.randn(5, 37, requires_grad=True)
    w = torch.rand(37, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    torch.library.opcheck(ops.norm_fwd.default, (x, r, w, b, 1e-5, False))
    torch.library.opcheck(ops.norm_fwd.default, (x, None, None, None, 1e-6, True))
    xt = torch.randn(37, 5).t().requires_grad_()                     # strided: outputs contiguous
    torch.library.opcheck(ops.norm_fwd.default, (xt, None, w, None, 1e-6, True))
    _y, _h, mean, rstd = ops.norm_fwd(x.detach(), None, w.detach(), b.detach(), 1e-5, False)
    torch.library.opcheck(ops.norm_bwd.default, (torch.randn(5, 37), None, x.detach(), w.detach(),
                                                 mean, rstd, False, True, True))
    _y, _h, mean, rstd = ops.norm_fwd(x.detach(), None, None, None, 1e-5, True)
    torch.library.opcheck(ops.norm_bwd.default, (torch.randn(5, 37), torch.randn(5, 37),
                                                 x.detach(), None, mean, rstd, True, False, False))
    _y, _h, mean, rstd = ops.norm_fwd(xt.detach(), None, w.detach(), None, 1e-5, True)
    torch.library.opcheck(ops.norm_bwd.default, (torch.randn(37, 5).t(), None, xt.detach(),
                                                 w.detach(), mean, rstd, True, True, False))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_compile_fullgraph(kind):
    # the custom ops are opaque to dynamo; aot_eager runs their fake impls and registered
    # autograd through AOTAutograd, without inductor's C++ build of the surrounding graph
    x = torch.randn(4, 3, 40, requires_grad=True)
    r = torch.randn(4, 3, 40, requires_grad=True)
    w = torch.rand(40, requires_grad=True)

    def block(x, r, w):
        y, h = _run(kind, x, w, None, r)
        return (y * y).sum() + h.mean()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w)
    got = torch.autograd.grad(out, (x, r, w))
    want_out = block(x, r, w)
    want = torch.autograd.grad(want_out, (x, r, w))
    torch.testing.assert_close(out, want_out)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
