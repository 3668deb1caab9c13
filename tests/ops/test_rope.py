"""llmcore.rope on every backend: forward and both gradients against the float64 formula (the
oracle rule), the table layouts a dense and a packed batch use, strided q/k views of a fused
QKV projection, bad input, registration (opcheck, torch.compile)."""
import pytest
import torch

import llmcore
from llmcore_testing import assert_close_to_oracle, assert_compiled_grad_matches, kernel_backends
from llmcore.ops import rope as R

BACKENDS = kernel_backends("rope")
KERNELS = [b for b in BACKENDS if b != "torch"]


def _tables(n, d, dtype=torch.float32, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)                                   # (n, d)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _formula(x, cos, sin):
    # x (..., H, D); cos, sin broadcastable to it: x cos + rotate_half(x) sin, in x's dtype
    # with float32 tables promoted (what the eager model computed)
    x1, x2 = x.chunk(2, -1)
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def _qkv(lead, hq, hkv, d, dtype):
    """q, k as strided views of one fused projection output (..., (hq + 2 hkv) d), as the
    model makes them, and the leaf they come from."""
    qkv = torch.randn(*lead, (hq + 2 * hkv) * d, dtype=dtype, requires_grad=True)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], -1)
    return q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), qkv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["dense", "packed", "per_batch"])
def test_matches_the_formula(backend, dtype, layout):
    hq, hkv, d = 6, 2, 34                       # GQA, head dim not a power of two
    if layout == "dense":                         # (B, N, H, D), tables (N, 1, D)
        lead, cos, sin = (3, 13), *_tables(13, d)
        cos, sin = cos[:, None], sin[:, None]
    elif layout == "packed":                      # (T, H, D), tables (T, 1, D) gathered
        lead = (29,)
        pos = torch.randint(0, 40, (29,))
        cos, sin = (t[pos][:, None] for t in _tables(40, d))
    else:                                         # (B, N, H, D), tables (B, N, D)
        lead = (2, 7)
        cos, sin = (t.reshape(2, 7, d) for t in _tables(14, d))
    q, k, leaf = _qkv(lead, hq, hkv, d, dtype)
    got = llmcore.rope(q, k, cos, sin, backend=backend)
    shaped = [t[..., None, :] if layout == "per_batch" else t for t in (cos, sin)]
    eager = [_formula(x, *shaped) for x in (q, k)]
    leaf64 = leaf.detach().double().requires_grad_()
    q64, k64, _ = leaf64.split([hq * d, hkv * d, hkv * d], -1)
    q64, k64 = q64.unflatten(-1, (hq, d)), k64.unflatten(-1, (hkv, d))
    oracle = [_formula(x, *(t.double() for t in shaped)) for x in (q64, k64)]
    for name, a, e, o in zip("qk", got, eager, oracle):
        assert a.dtype == dtype and a.shape == o.shape
        assert_close_to_oracle(a, e, o, name=name)
    seeds = [torch.randn(o.shape, dtype=torch.float64) for o in oracle]
    g = torch.autograd.grad(got, leaf, [s.to(dtype) for s in seeds])[0]
    ge = torch.autograd.grad(eager, leaf, [s.to(dtype) for s in seeds])[0]
    go = torch.autograd.grad(oracle, leaf64, seeds)[0]
    assert_close_to_oracle(g, ge, go, name="d qkv")


@pytest.mark.parametrize("backend", KERNELS)
def test_one_output_unused_and_float64(backend):
    # only q's rotation is used: k's gradient is zero; float64 runs on the native kernel
    dtype = torch.float64 if backend == "native" else torch.float32
    q, k, leaf = _qkv((2, 5), 2, 1, 8, dtype)
    cos, sin = (t.to(dtype)[:, None] for t in _tables(5, 8))
    yq, _ = llmcore.rope(q, k, cos, sin, backend=backend)
    g = torch.autograd.grad(yq.sum(), leaf)[0]
    want = torch.autograd.grad(_formula(q, cos, sin).sum(), leaf)[0]
    torch.testing.assert_close(g, want)
    assert torch.count_nonzero(g[..., 16:]) == 0                  # k and v parts


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    # a packed batch with no real token: empty in, empty out, empty gradients
    q = torch.randn(0, 4, 8, requires_grad=True)
    k = torch.randn(0, 2, 8, requires_grad=True)
    cos, sin = torch.ones(0, 1, 8), torch.zeros(0, 1, 8)
    yq, yk = llmcore.rope(q, k, cos, sin, backend=backend)
    assert yq.shape == (0, 4, 8) and yk.shape == (0, 2, 8)
    gq, gk = torch.autograd.grad((yq.sum() + yk.sum(),), (q, k))
    assert gq.shape == q.shape and gk.shape == k.shape


def test_the_model_runs_rope_on_its_backend():
    from llmcore.models import Transformer, preset

    model = Transformer(preset("tiny-llama", vocab_size=31, dim=32, n_layers=1, n_heads=4,
                               n_kv_heads=2, ffn_dim=40))
    attn = model.blocks[0].attn
    assert attn.rope_backend == llmcore.backends.resolve("rope", "auto", "cpu")
    calls = []
    impl = R._ROPE[attn.rope_backend]

    def spy(*args):
        calls.append(args[0].shape)
        return impl(*args)
    R._ROPE[attn.rope_backend] = spy
    try:
        model(torch.randint(0, 31, (2, 9)), labels=torch.randint(0, 31, (2, 9))).loss.backward()
    finally:
        R._ROPE[attn.rope_backend] = impl
    assert calls == [torch.Size((2, 9, 4, 8))]


def test_bad_input_is_refused_naming_the_argument():
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = _tables(5, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        llmcore.rope(q.tolist(), k, cos, sin)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        llmcore.rope(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match=r"k must be \(\*\(2, 5\), heads, 8\)"):
        llmcore.rope(q, k[:, :4], cos, sin)
    with pytest.raises(ValueError, match="the head dim must be even"):
        llmcore.rope(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos must have shape \(\*rows, 8\) or \(\*rows, 1, 8\)"):
        llmcore.rope(q, k, cos[:4], sin[:4])               # 4 positions for 5 tokens
    with pytest.raises(ValueError, match=r"cos must have shape"):
        llmcore.rope(q, k, torch.randn(10, 8), torch.randn(10, 8))   # not rows of q
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        llmcore.rope(q, k, cos, sin[None].expand(2, 5, 8))
    with pytest.raises(ValueError, match=r"q must be \(\.\.\., heads, head_dim\)"):
        llmcore.rope(q[0, 0], k[0, 0], cos, sin)
    for backend in KERNELS:
        with pytest.raises(ValueError, match="cos and sin get no gradient"):
            llmcore.rope(q, k, cos.requires_grad_(), sin, backend=backend)
        cos = cos.detach()


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_and_compile(backend):
    op = (torch.ops.llmcore_triton.rope.default if backend == "triton"
          else torch.ops.llmcore.rope_rotate.default)
    q = torch.randn(6, 3, 8, requires_grad=True)
    k = torch.randn(6, 1, 8, requires_grad=True)
    cos, sin = _tables(3, 8)
    torch.library.opcheck(op, (q, k, cos, sin, False))
    qkv = torch.randn(2, 3, 5 * 8, requires_grad=True)

    def f(qkv):
        q, k, _ = qkv.split([3 * 8, 8, 8], -1)
        yq, yk = llmcore.rope(q.unflatten(-1, (3, 8)), k.unflatten(-1, (1, 8)), cos[:, None],
                              sin[:, None], backend=backend)
        return yq.sum() + (yk * 2).sum()
    assert_compiled_grad_matches(f, qkv)
