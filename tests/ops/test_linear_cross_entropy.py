"""linear_cross_entropy's schedules (llmcore/ops/cross_entropy.py, "the chunk loop"): precision
of bf16/fp16 against the float64 oracle on multi-chunk shapes, the dtype of every GEMM, the
memory it holds, and bit-reproducible chunking. The API-level tests are in
test_cross_entropy.py."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llmcore
from llmcore.ops.cross_entropy import default_chunk_size
from llmcore_testing import assert_close_to_oracle, default_atol, kernel_backends

BACKENDS = kernel_backends("cross_entropy")


def _oracle(x, w, t, b, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The documented semantics in float64 (no class weight), over full logits."""
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    lse = torch.logsumexp(y, -1)
    valid = t != -100
    logp = y - lse[:, None]
    per = -(1 - label_smoothing) * logp.gather(1, torch.where(valid, t, 0)[:, None])[:, 0] \
        - label_smoothing * logp.mean(-1) + z_loss * lse * lse
    per = torch.where(valid, per, 0.0)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / valid.sum()


def _eager(x, w, t, b, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    """What Hugging Face computes: F.linear in the input dtype, the loss in fp32."""
    y = F.linear(x, w, b).float()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    loss = F.cross_entropy(y, t, reduction="none", label_smoothing=label_smoothing)
    valid = t != -100
    loss = loss + torch.where(valid, z_loss * torch.logsumexp(y, -1) ** 2, 0)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / valid.sum()
    return loss.to(x.dtype)


def _inputs(n, h, v, dtype, bias=True, ignore=0.1):
    x = torch.randn(n, h).to(dtype).requires_grad_()
    w = (torch.randn(v, h) / h ** 0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(v) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,))
    t = torch.where(torch.rand(n) < ignore, -100, t)
    return x, w, b, t


def _grads(out, leaves, seed):
    return torch.autograd.grad((out.float() * seed.float()).sum(), leaves)


# (N, H, V, chunk_size, reduction, label_smoothing, z_loss, softcap): several token chunks
# forward and several vocabulary blocks backward, except the one-chunk cases (chunk >= N)
CASES = [
    (300, 64, 2003, 64, "mean", 0.0, 0.0, None),      # 5 chunks, blocks of 427 columns
    (257, 48, 1009, 32, "sum", 0.1, 1e-3, 30.0),      # 9 chunks, every option on
    (130, 40, 3001, 16, "none", 0.0, 1e-4, None),     # "none": dx and dW both in backward
    (96, 64, 2003, None, "mean", 0.1, 0.0, None),     # one chunk: the kept-gradient path
]
TRITON_CASES = [(70, 32, 1001, 16, "mean", 0.1, 1e-3, 20.0), (33, 16, 517, 8, "none", 0.0, 0.0, None)]


def _params(backends):
    out = []
    for backend in backends:
        for case in TRITON_CASES if backend == "triton" else CASES:
            out.append(pytest.param(backend, case, id=f"{backend}-" + "-".join(map(str, case))))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend, case", _params(BACKENDS))
def test_low_precision_within_twice_eager_error(backend, case, dtype):
    n, h, v, chunk, reduction, ls, z, cap = case
    x, w, b, t = _inputs(n, h, v, dtype)
    opts = dict(reduction=reduction, label_smoothing=ls, z_loss=z, softcap=cap)
    got = llmcore.linear_cross_entropy(x, w, t, b, chunk_size=chunk, backend=backend, **opts)
    eager = _eager(x, w, t, b, **opts)
    leaves64 = [p.detach().double().requires_grad_() for p in (x, w, b)]
    oracle = _oracle(*leaves64[:2], t, leaves64[2], **opts)
    atol = default_atol(dtype) + 2 * torch.finfo(dtype).eps * oracle.abs().max().item()
    assert_close_to_oracle(got, eager, oracle, name="loss", atol=atol)
    seed = torch.randn(oracle.shape, dtype=torch.float64)
    for name, a, e, q in zip(["dinput", "dweight", "dbias"], _grads(got, [x, w, b], seed),
                             _grads(eager, [x, w, b], seed), _grads(oracle, leaves64, seed)):
        assert a.dtype == dtype
        assert_close_to_oracle(a, e, q, name=name, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_identical_calls_are_bit_identical(backend, dtype):
    n, h, v = (40, 16, 301) if backend == "triton" else (200, 32, 1501)
    x, w, b, t = _inputs(n, h, v, dtype)
    results = []
    for _ in range(2):
        out = llmcore.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, backend=backend,
                                           chunk_size=n // 3)
        results.append([out, *torch.autograd.grad(out, [x, w, b])])
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_chunk_size_is_a_function_of_shapes_only(monkeypatch):
    def no_query(*args, **kwargs):
        raise AssertionError("the chunk size must not depend on free memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_query)
    assert default_chunk_size(8192, 128256, 2) == 1040
    assert default_chunk_size(8192, 128256) == default_chunk_size(8192, 128256, 4) == 128
    x, w, b, t = _inputs(20, 8, 50, torch.float32)
    llmcore.linear_cross_entropy(x, w, t, b, backend="torch").backward()


# ---------------------------------------------------------------------------- GEMM dtypes

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "addmv", "dot", "addbmm",
          "_addmm_activation", "addmm_", "baddbmm_",
          "gemm", "gemm_into"}  # llmcore::gemm / gemm_into: the native backend's CPU GEMM


class _GemmDtypes(TorchDispatchMode):
    """Records (op, dtypes of its tensor arguments) for every matrix product dispatched."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _GEMMS:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            self.calls.append((str(func), {a.dtype for a in tensors}))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk", [7, None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_gemm_runs_in_the_input_dtype(backend, chunk, reduction, dtype):
    # bf16 inputs: every mm/addmm/... takes bf16 operands (fp32 accumulation is the GEMM's own),
    # never an fp32 copy of the weight or the hidden states; fp32 stays fp32, fp64 fp64
    n, h, v = (24, 16, 301) if backend == "triton" else (50, 32, 1001)
    x, w, b, t = _inputs(n, h, v, dtype)
    probe = _GemmDtypes()
    with probe:
        out = llmcore.linear_cross_entropy(x, w, t, b, chunk_size=chunk, reduction=reduction,
                                           backend=backend)
        out.sum().backward()
    assert len(probe.calls) >= 3, probe.calls
    bad = [c for c in probe.calls if c[1] != {dtype}]
    assert not bad, bad


# ---------------------------------------------------------------------------- memory

class _LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors that aten ops create while active (the storages of their
    outputs, counted until freed: storages keep their Python object, so a weakref finalizer
    sees the free), and their peak; also the largest tensor. Storages that already existed
    (the inputs) are not counted; buffers private to one kernel call are not visible."""

    def __init__(self, existing):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing}
        self.live = {}                        # id(storage) -> bytes
        self.peak = self.largest = 0

    def _free(self, key):
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(o, torch.Tensor):
                continue
            self.largest = max(self.largest, o.numel())
            storage = o.untyped_storage()
            if id(storage) in self.live or storage.data_ptr() in self.known:
                continue
            self.live[id(storage)] = storage.nbytes()
            weakref.finalize(storage, self._free, id(storage))
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _peak(fn, existing):
    probe = _LiveBytes(existing)
    with probe:
        fn()
    return probe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_memory_is_the_gradients_plus_a_chunk(backend, dtype):
    # N*V = 16x the chunk: no (N, V) tensor ever exists, and the peak live bytes of fwd+bwd are
    # the gradients themselves (dW, dx, db) plus a few chunk-sized buffers, far below eager's
    n, h, v = 512, 32, 2048
    chunk = n // 16
    x, w, b, t = _inputs(n, h, v, dtype)

    def ours():
        llmcore.linear_cross_entropy(x, w, t, b, chunk_size=chunk, backend=backend).backward()

    def eager():
        _eager(x, w, t, b).backward()

    got, want = _peak(ours, [x, w, b, t]), _peak(eager, [x, w, b, t])
    assert got.largest <= max(chunk * v, v * h) < n * v
    size = x.element_size()
    grads = (v * h + n * h + v) * size                       # dW, dx, db in the input dtype
    # chunk-sized temporaries: fp32, one chunk of logits (the kernel writes the gradient over
    # it); bf16, the vocabulary pass's block of logits and the reference kernel's fp32 copies
    # of it (2.6 chunks of fp32 measured; the Triton kernel works in place)
    workspace = chunk * v * 4 * (1 if dtype == torch.float32 else 3)
    assert got.peak <= grads + workspace + (16 << 10), (got.peak, grads, workspace)
    assert got.peak < want.peak / 2, (got.peak, want.peak)


@pytest.mark.parametrize("dtype, chunk", [(torch.float32, None), (torch.bfloat16, None),
                                          (torch.bfloat16, 5)])
def test_every_schedule_compiles_fullgraph(dtype, chunk):
    # one chunk (kept logits), and the bf16 token + vocabulary passes, traced by aot_eager
    x, w, b, t = _inputs(16, 8, 37, dtype)

    def loss(x, w, b, t):
        return llmcore.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, chunk_size=chunk,
                                            backend="torch")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, w, b, t), loss(x, w, b, t)
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad(got, [x, w, b]), torch.autograd.grad(want, [x, w, b])):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.skipif("native" not in BACKENDS, reason="llmcore._native is not built")
def test_one_chunk_holds_one_logits_buffer(dtype):
    # every row in one chunk (native: the C++ op): the forward keeps the (N, V) logits and the
    # backward overwrites them with their gradient, so fwd+bwd holds one (N, V) buffer, not two
    n, h, v = 64, 32, 2048
    x, w, b, t = _inputs(n, h, v, dtype)

    def ours():
        llmcore.linear_cross_entropy(x, w, t, b, backend="native").backward()

    got = _peak(ours, [x, w, b, t])
    size = x.element_size()
    grads = (v * h + n * h + v) * size                       # dW, dx, db in the input dtype
    assert got.largest == n * v
    assert got.peak <= n * v * size + grads + (16 << 10), (got.peak, n * v * size + grads)


@pytest.mark.parametrize("dtype, chunk", [(torch.float32, None), (torch.float32, 7),
                                          (torch.bfloat16, 7)])
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_eager_route_launches_directly(dtype, chunk):
    # eager calls launch the chunk kernels without the llmcore_triton custom ops (what
    # torch.compile traces), with the same bits as the route through them
    from llmcore.ops import cross_entropy as ce
    from llmcore_testing import OpLog

    x, w, b, t = _inputs(20, 8, 37, dtype)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=30.0)
    chunk_size = chunk or 20
    op_route = ce.chunked_linear_cross_entropy(ce._triton_cross_entropy_rows,
                                               ce._triton_rows_lse, ce._triton_grad_block)
    results = []
    for route in ("eager", "ops"):
        log = OpLog()
        with log:
            if route == "eager":
                out = llmcore.linear_cross_entropy(x, w, t, b, chunk_size=chunk_size,
                                                   backend="triton", **opts)
            else:
                out = op_route(x, w, t, b, -100, "mean", 0.1, 1e-3, 30.0, chunk_size)
            grads = torch.autograd.grad(out, [x, w, b])
        custom = [op for op in log.ops if op.startswith("llmcore_triton.")]
        assert bool(custom) == (route == "ops"), (route, custom)
        results.append([out, *grads])
    for a, c in zip(*results):
        assert torch.equal(a, c)
