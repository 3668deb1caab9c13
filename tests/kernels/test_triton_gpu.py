"""The Triton kernels of every op family compiled for a GPU (`pytest -m gpu`: the GPU check's
tests stage), at realistic widths, against the float64 oracle with the rule of
tests/llmcore_testing.py. The interpreter runs the same kernels on the CPU in the other test
files; these catch what only a compiled kernel can get wrong (approximate division and exp,
layouts, launch configurations) and exercise the eager host path as a GPU run takes it: the
no-grad forwards, the attention launch cache after the autotuner's first choice, the direct
launches of linear cross-entropy's chunk kernels."""
import pytest
import torch

import llmcore
from llmcore_testing import assert_close_to_oracle

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float32]


def _leaves(tensors, dtype):
    """(inputs in dtype requiring grad, their float64 twins requiring grad)"""
    ours = [t.to(dtype).requires_grad_() for t in tensors]
    return ours, [t.detach().double().requires_grad_() for t in ours]


def _compare(run, tensors, dtype, names, extra=(), atol=None):
    """run(*leaves, *extra, backend) -> tuple of outputs: Triton vs eager torch (same dtype)
    vs torch in float64, outputs and the gradients of every leaf for a random output grad."""
    ours, wide = _leaves(tensors, dtype)
    got = run(*ours, *extra, backend="triton")
    eager = run(*ours, *extra, backend="torch")
    oracle = run(*wide, *extra, backend="torch")
    seeds = [torch.randn(o.shape, device=DEV, dtype=torch.float64) for o in oracle]
    for i, (g, e, o) in enumerate(zip(got, eager, oracle)):
        assert_close_to_oracle(g, e, o, name=f"output {i}", atol=atol)

    def grads(outs, leaves):
        loss = sum((o.double() * s).sum() for o, s in zip(outs, seeds))
        return torch.autograd.grad(loss, leaves)

    for name, g, e, o in zip(names, grads(got, ours), grads(eager, ours), grads(oracle, wide)):
        assert_close_to_oracle(g, e, o, name=f"d{name}", atol=atol)
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms_with_residual(dtype, kind):
    n = 4000                                   # a 4096-wide block, the last 96 lanes masked
    x = torch.randn(257, n, device=DEV) * 2 + 0.5
    r = torch.randn(257, n, device=DEV)
    w = torch.rand(n, device=DEV) + 0.5
    b = torch.randn(n, device=DEV)
    if kind == "layer":
        tensors, names = (x, r, w, b), ["x", "residual", "weight", "bias"]

        def run(x, r, w, b, backend):
            return llmcore.layer_norm(x, n, w, b, residual=r, backend=backend)
    else:
        tensors, names = (x, r, w), ["x", "residual", "weight"]

        def run(x, r, w, backend):
            return llmcore.rms_norm(x, n, w, 1e-5, residual=r, backend=backend)

    ours = _compare(run, tensors, dtype, names, atol=1e-5 if dtype == torch.float32 else None)
    # the no-grad forward (no autograd.Function, no statistics stored) gives the same bits
    with torch.no_grad():
        bare = run(*ours, backend="triton")
    for a, c in zip(bare, run(*ours, backend="triton")):
        assert torch.equal(a, c.detach())


@pytest.mark.parametrize("dtype, opts", [
    (torch.float32, {}),
    (torch.bfloat16, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 30.0})])
def test_cross_entropy(dtype, opts):
    logits = torch.randn(512, 32000, device=DEV) * 3
    t = torch.randint(0, 32000, (512,), device=DEV)
    t[::7] = -100

    def run(x, backend):
        return (llmcore.cross_entropy(x, t, backend=backend, **opts),)

    ours = _compare(run, (logits,), dtype, ["logits"])
    # the gradient written into the logits' own buffer (here a copy of the leaf's): the same
    # loss and gradient as the usual route
    x = ours[0].detach().clone().requires_grad_()
    inplace = llmcore.cross_entropy(x * 1, t, inplace_backward=True, backend="triton", **opts)
    usual = llmcore.cross_entropy(ours[0], t, backend="triton", **opts)
    torch.testing.assert_close(inplace, usual)
    torch.testing.assert_close(torch.autograd.grad(inplace, x)[0],
                               torch.autograd.grad(usual, ours[0])[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_in_chunks(dtype):
    # several token chunks forward and, in bf16, several vocabulary blocks backward
    x = torch.randn(600, 256, device=DEV)
    w = torch.randn(5003, 256, device=DEV) / 16
    b = torch.randn(5003, device=DEV) * 0.1
    t = torch.randint(0, 5003, (600,), device=DEV)
    t[::5] = -100

    def run(x, w, b, backend):
        return (llmcore.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, chunk_size=128,
                                             backend=backend),)

    _compare(run, (x, w, b), dtype, ["input", "weight", "bias"], atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(dtype):
    q = torch.randn(2, 300, 12, 64, device=DEV)
    k = torch.randn(2, 300, 4, 64, device=DEV)
    ang = torch.arange(300, device=DEV)[:, None] * torch.rand(32, device=DEV)
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos(), ang.sin()

    def run(q, k, backend):
        return llmcore.rope(q, k, cos, sin, backend=backend)

    _compare(run, (q, k), dtype, ["q", "k"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    x = torch.randn(333, 2 * 5000, device=DEV) * 2     # column blocks of 2048, the last partial

    def run(x, backend):
        return (llmcore.swiglu(x, backend=backend),)

    _compare(run, (x,), dtype, ["x"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(dtype, approximate):
    # 3 x 111 rows of 5000: column blocks of 2048, the last partial; |x| up to ~15, far into
    # the tails where y -> 0 (negative x) and y -> x
    x = torch.randn(3, 111, 5000, device=DEV) * 3

    def run(x, backend):
        return (llmcore.gelu(x, approximate=approximate, backend=backend),)

    _compare(run, (x,), dtype, ["x"])


def test_attention_launch_cache(monkeypatch):
    # the first call of a shape class goes through triton's autotuner, later ones launch the
    # config it chose directly: both give the same bits; a new class (Dv != D) tunes anew
    from llmcore.kernels.triton import attention as A

    monkeypatch.setattr(A, "_CHOSEN", {})           # this test's choices only

    q, k, v = (torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    runs = []
    for _ in range(3):
        out = llmcore.flash_attn_func(q, k, v, causal=True, backend="triton")
        runs.append([out, *torch.autograd.grad(out.float().sum(), [q, k, v])])
    for later in runs[1:]:
        for a, c in zip(runs[0], later):
            assert torch.equal(a, c)
    assert len(A._CHOSEN) == 3                      # forward, dq and dk/dv kernels
    chosen = len(A._CHOSEN)
    v2 = torch.randn(2, 1000, 8, 64, device=DEV, dtype=torch.bfloat16)
    out = llmcore.flash_attn_func(q.detach(), k.detach(), v2, causal=True, backend="triton")
    want = llmcore.flash_attn_func(q.detach().double(), k.detach().double(), v2.double(),
                                   causal=True, backend="torch")
    eager = llmcore.flash_attn_func(q.detach(), k.detach(), v2, causal=True, backend="torch")
    assert_close_to_oracle(out, eager, want, name="Dv 64")
    assert len(A._CHOSEN) == chosen + 1


@pytest.mark.parametrize("case", [dict(n=2048, hq=16, hkv=16, d=128),
                                  dict(n=1000, hq=8, hkv=2, d=64),
                                  dict(n=4096, hq=8, hkv=8, d=128, window=(1024, 0)),
                                  dict(n=1024, hq=8, hkv=8, d=128, causal=False)], ids=str)
def test_attention_ordered_dq(monkeypatch, case):
    # BWD_SCHEDULE "ordered" compiled, with programs truly concurrent (the interpreter runs
    # them one by one): every add in turn (LOCK[0] stays 0), the same bits on every run, and
    # the gradients of the two-pass backward within the oracle rule
    from llmcore.kernels.triton import attention as A

    turns = []
    monkeypatch.setattr(A, "_TURNS_HOOK", lambda lock, tiles: turns.append(int(lock[0])))
    n, hq, hkv, d = case["n"], case["hq"], case["hkv"], case["d"]
    window = case.get("window", (-1, -1))
    q = torch.randn(2, n, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, n, hkv, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    seed = torch.randn(2, n, hq, d, device=DEV, dtype=torch.bfloat16)

    def grads(schedule, leaves, backend="triton"):
        monkeypatch.setattr(A, "BWD_SCHEDULE", schedule)
        out = llmcore.flash_attn_func(*leaves, causal=case.get("causal", True),
                                      window_size=window, backend=backend)
        return torch.autograd.grad(out, leaves, seed.to(out.dtype))

    runs = [grads("ordered", (q, k, v)) for _ in range(3)]
    assert turns == [0, 0, 0]
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later))
    two_pass = grads("two_pass", (q, k, v))
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle = grads("two_pass", wide, backend="torch")
    for name, a, e, o in zip("qkv", runs[0], two_pass, oracle):
        assert_close_to_oracle(a, e, o, name=f"d{name}")
