"""llmcore.linear and the native CPU GEMM under it (llmcore::gemm, gemm_into): forward and
gradients against the float64 oracle for every dtype and backend, the GEMM on awkward shapes
(every register-block and panel tail, k = 0, empty), strided and transposed operands read in
place, accumulation into a row block of a larger matrix, bits that do not depend on the thread
count, bad input, registration (opcheck, torch.compile), activation checkpointing, and the
model's projections on it."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import assert_close_to_oracle, assert_compiled_grad_matches, kernel_backends
from llmcore.ops import linear as L

BACKENDS = kernel_backends("linear")
NATIVE = "native" in BACKENDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
needs_native = pytest.mark.skipif(not NATIVE, reason="llmcore._native not built")


def _oracle_check(backend, x, w, b):
    got = llmcore.linear(x, w, b, backend=backend)
    eager = F.linear(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    oracle = F.linear(*l64) if b is not None else F.linear(l64[0], l64[1])
    assert got.shape == eager.shape and got.dtype == x.dtype
    # the products sum k terms: an error like eager's, which grows with k
    assert_close_to_oracle(got, eager, oracle, name="y", factor=3.0)
    seed = torch.randn(oracle.shape, dtype=torch.float64)
    g = torch.autograd.grad(got, leaves, seed.to(x.dtype))
    ge = torch.autograd.grad(eager, leaves, seed.to(x.dtype))
    go = torch.autograd.grad(oracle, l64, seed)
    for name, a, e, o in zip(("dx", "dw", "db"), g, ge, go):
        assert_close_to_oracle(a, e, o, name=name, factor=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((5,), 3), ((13, 37), 45), ((2, 3, 70), 33), ((9, 300), 1)],
                         ids=["1d", "2d", "3d", "out1"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_and_the_oracle(backend, dtype, shape, bias):
    lead, out = shape
    x = torch.randn(lead, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(out, lead[-1], dtype=torch.float64) / lead[-1] ** 0.5).to(dtype)
    b = torch.randn(out, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    _oracle_check(backend, x, w.requires_grad_(), b)


@needs_native
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 3, 31), (8, 32, 32), (9, 33, 33), (17, 300, 65),
                                   (100, 257, 257), (13, 513, 300), (33, 0, 5), (0, 4, 3),
                                   (5, 4, 0)])
@pytest.mark.parametrize("layout", ["NN", "NT", "TN", "TT"])
def test_gemm_on_awkward_shapes_and_layouts(m, k, n, layout):
    # rows past every multiple of the 8- (or 4-) row register block, columns past the 32-column
    # panel and the 256-column block, k past the 256-deep block; transposed views read in place
    a = torch.randn(k, m).t() if layout[0] == "T" else torch.randn(m, k)
    b = torch.randn(n, k).t() if layout[1] == "T" else torch.randn(k, n)
    for bias in (None, torch.randn(n)):
        got = torch.ops.llmcore.gemm(a, b, bias)
        want = a.double() @ b.double() + (0 if bias is None else bias.double())
        assert got.shape == (m, n) and got.is_contiguous() and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * (k + 1) ** 0.5)


@needs_native
def test_gemm_reads_strided_operands_and_accumulates_into_a_row_block():
    a = torch.randn(60, 90)[::2, ::3]                  # (30, 30), strides (180, 3)
    b = torch.randn(80, 100)[::2, 1::2][:30]           # (30, 50), strides (200, 2)
    bias = torch.randn(100)[::2]                       # (50,), stride 2
    torch.testing.assert_close(torch.ops.llmcore.gemm(a, b, bias), torch.addmm(bias, a, b))
    big = torch.randn(50, 50)
    before = big.clone()
    block = big[10:40]                                 # rows of a larger matrix
    torch.ops.llmcore.gemm_into(block, a, b, None, True)
    torch.testing.assert_close(big[10:40], before[10:40] + a @ b)
    assert torch.equal(big[:10], before[:10]) and torch.equal(big[40:], before[40:])
    torch.ops.llmcore.gemm_into(block, a, b, bias, False)
    torch.testing.assert_close(big[10:40], torch.addmm(bias, a, b))
    assert torch.equal(big[:10], before[:10]) and torch.equal(big[40:], before[40:])


@needs_native
def test_gemm_bits_do_not_depend_on_the_thread_count():
    a, b = torch.randn(203, 700), torch.randn(700, 301)
    threads = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            results.append(torch.ops.llmcore.gemm(a, b, None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_native
def test_only_float32_cpu_takes_llmcore_gemm():
    # other dtypes go through at::mm (the same bits as torch), float32 through llmcore's own
    a, b = torch.randn(64, 300, dtype=torch.float64), torch.randn(300, 40, dtype=torch.float64)
    assert torch.equal(torch.ops.llmcore.gemm(a, b, None), torch.mm(a, b))
    a32, b32 = a.float(), b.float()
    got = torch.ops.llmcore.gemm(a32, b32, None)
    torch.testing.assert_close(got, torch.mm(a32, b32), rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, torch.mm(a32, b32))  # another summation order than MKL's
    # too few rows to pay for packing B: at::mm's (a decoding step's x W^T, a single row)
    w = torch.randn(50, 300)
    for rows in (1, 8, 63):
        x = torch.randn(rows, 300)
        assert torch.equal(torch.ops.llmcore.gemm(x, w.t(), None), torch.mm(x, w.t()))
    x = torch.randn(64, 300)
    assert not torch.equal(torch.ops.llmcore.gemm(x, w.t(), None), torch.mm(x, w.t()))
    b = torch.randn(300, 40)                            # row-major B: from 4 rows on
    assert torch.equal(torch.ops.llmcore.gemm(x[:3], b, None), torch.mm(x[:3], b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_f_linear_in_its_dtype(backend):
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    h = torch.randn(6, 16).bfloat16()       # a bf16 activation meeting fp32 weights, as in the model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = llmcore.linear(x, w, b, backend=backend)
        want = F.linear(x, w, b)
        assert torch.equal(llmcore.linear(h, w, b, backend=backend), F.linear(h, w, b))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    if NATIVE:  # the kernel ops compute in their inputs' dtype, autocast or not, at any size
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for rows in (3, 80):     # at::mm's route and llmcore's own
                a = torch.randn(rows, 16)
                assert torch.ops.llmcore.gemm(a, w.detach().t(), None).dtype == torch.float32
                out = torch.empty(rows, 8)
                torch.ops.llmcore.gemm_into(out, a, w.detach().t(), None, False)
                with torch.autocast("cpu", enabled=False):
                    ref = a @ w.detach().t()
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(got.float().sum(), (x, w, b))
    ge = torch.autograd.grad(want.float().sum(), (x, w, b))
    assert all(torch.equal(p, q) for p, q in zip(g, ge))


def test_bad_input_is_refused_naming_the_argument():
    x, w = torch.randn(4, 6), torch.randn(3, 6)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        llmcore.linear(x.tolist(), w)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        llmcore.linear(x, torch.ones(3, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"weight must have shape \(out, 6\).*got \(3, 5\)"):
        llmcore.linear(x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="weight must be 2-dimensional"):
        llmcore.linear(x, torch.randn(6))
    with pytest.raises(TypeError, match="weight must have input's dtype"):
        llmcore.linear(x, w.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        llmcore.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="input must be at least 1-dimensional"):
        llmcore.linear(torch.tensor(1.0), torch.randn(3, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        llmcore.linear(x, w, backend="cuda")
    with pytest.raises(llmcore.BackendUnavailableError, match="no triton kernels for linear"):
        llmcore.linear(x, w, backend="triton")
    if NATIVE:                                  # the C++ ops' own checks
        with pytest.raises(ValueError, match=r"b must have a's columns \(6\) as rows"):
            torch.ops.llmcore.gemm(x, torch.randn(5, 3))
        with pytest.raises(ValueError, match="a must be 2-dimensional"):
            torch.ops.llmcore.gemm(torch.randn(2, 4, 6), torch.randn(6, 3))
        with pytest.raises(ValueError, match=r"out must have shape \[4, 3\]"):
            torch.ops.llmcore.gemm_into(torch.empty(4, 4), x, w.t(), None, False)


@needs_native
def test_opcheck_compile_and_checkpoint():
    x = torch.randn(5, 3, 12, requires_grad=True)
    w = torch.randn(7, 12, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    # the kernel ops run below autograd (their callers' Function differentiates)
    torch.library.opcheck(torch.ops.llmcore.gemm.default,
                          (x[:, 0].detach(), w.detach().t(), b.detach()))
    torch.library.opcheck(torch.ops.llmcore.gemm.default,
                          (torch.randn(6, 4).t(), torch.randn(6, 5), None))
    torch.library.opcheck(torch.ops.llmcore.gemm_into.default,
                          (torch.empty(4, 5), torch.randn(4, 6), torch.randn(6, 5), None, False))

    def f(x):
        return (llmcore.linear(x, w, b, backend="native") ** 2).sum()
    assert_compiled_grad_matches(f, x)
    # the op ending a non-reentrant checkpointed region (as the model's blocks end with one)
    # is recomputed in the backward and gives the same gradients
    plain = torch.autograd.grad(f(x), (x, w, b))
    ckpt = torch.utils.checkpoint.checkpoint(
        lambda t: llmcore.linear(t, w, b, backend="native"), x, use_reentrant=False)
    again = torch.autograd.grad((ckpt ** 2).sum(), (x, w, b))
    for p, q in zip(plain, again):
        assert torch.equal(p, q)


@needs_native
def test_the_model_projections_run_on_the_native_gemm():
    from llmcore.models import Transformer, preset
    from llmcore.nn import Linear

    model = Transformer(preset("tiny-gpt", vocab_size=31, dim=32, n_layers=1, n_heads=4,
                               ffn_dim=40))
    blk = model.blocks[0]
    mods = [blk.attn.qkv, blk.attn.out, blk.mlp.fc1, blk.mlp.fc2]
    assert all(isinstance(m, Linear) and m.backend == "native" for m in mods)
    ids = torch.randint(0, 31, (2, 9))
    calls = []
    real = L._native.gemm

    def spy(a, b, bias):
        calls.append(tuple(b.shape))
        return real(a, b, bias)
    L._native.gemm = spy  # the pybind entry is a module attribute, read at every call
    try:
        model(ids, labels=ids).loss.backward()
    finally:
        L._native.gemm = real
    # each projection: its forward (b = weight.T), then in the backward dx (b = weight) and dW
    assert calls[:4] == [tuple(m.weight.t().shape) for m in mods]
    assert len(calls) == 12 and sorted(calls[4:]).count(tuple(mods[0].weight.shape)) == 1
    # a named backend without a linear kernel keeps F.linear for the projections
    torch_model = Transformer(preset("tiny-gpt", vocab_size=31, dim=32, n_layers=1, n_heads=4,
                                     ffn_dim=40, backend="torch"))
    assert torch_model.blocks[0].mlp.fc1.backend == "torch"
