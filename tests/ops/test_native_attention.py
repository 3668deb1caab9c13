"""The native (C++ CPU) attention kernel beyond the shared suite (tests/ops/test_attention.py,
which runs it against the float64 oracle in fp32/bf16/fp16): float64 exactness against the
torch backend across tile boundaries and every feature, determinism across thread counts,
lengths that are not multiples of the 64 x 64 tiles, and the op registration (opcheck)."""
import math

import pytest
import torch

import llmcore
from llmcore import backends
from llmcore.ops import attention as attention_ops

pytestmark = pytest.mark.skipif("native" not in attention_ops._CORE,
                                reason="llmcore._native was built without attention")


def _core(backend, q, k, v, **kw):
    kw.setdefault("scale", 1 / math.sqrt(q.shape[-1]))
    impl = attention_ops._CORE[backend]
    defaults = dict(window=(-1, -1), bottom_right=False, softcap=0.0, attn_mask=None,
                    alibi_slopes=None, dropout_p=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, deterministic=False, return_lse=True)
    return impl(q, k, v, **{**defaults, **kw})


def _leaves(shapes, dtype=torch.float64):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


# (B, Hq, Hkv, Nq, Nk, D, Dv): several 64-row tiles with ragged ends, GQA, Dv != D
SHAPES = [(1, 4, 2, 130, 67, 24, 24), (2, 2, 1, 65, 129, 16, 40), (1, 3, 3, 1, 200, 8, 8)]
FEATURES = [
    dict(),
    dict(window=(-1, 0)),
    dict(window=(-1, 0), bottom_right=True),
    dict(window=(70, 3)),
    dict(window=(0, 0), bottom_right=True),
    dict(softcap=1.5, scale=0.7),
    dict(alibi=True, window=(-1, 0), bottom_right=True),
    dict(mask="bool"),
    dict(mask="float", window=(-1, 5)),
]


def _features(feat, b, hq, nq, nk):
    kw = {k: v for k, v in feat.items() if k not in ("alibi", "mask")}
    if feat.get("alibi"):
        kw["alibi_slopes"] = torch.rand(b, hq, dtype=torch.float64)
    if feat.get("mask") == "bool":
        m = torch.rand(b, 1, nq, nk) > 0.3                     # broadcast over heads
        m[:, :, 0] = False                                     # a row that sees nothing
        kw["attn_mask"] = m
    elif feat.get("mask") == "float":
        kw["attn_mask"] = torch.randn(1, hq, nq, 1, dtype=torch.float64) + \
            torch.randn(1, 1, 1, nk, dtype=torch.float64)      # non-broadcast along (Nq, Nk)
    return kw


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("feat", FEATURES, ids=str)
def test_float64_equals_torch_backend(shape, feat):
    b, hq, hkv, nq, nk, d, dv = shape
    q, k, v = _leaves([(b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv)])
    kw = _features(feat, b, hq, nq, nk)
    out, lse = _core("native", q, k, v, **kw)
    want, want_lse = _core("torch", q, k, v, **kw)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # lse is float32 in the contract; empty rows are +inf in both
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    seed = torch.randn_like(want)
    for name, a, e in zip("qkv", torch.autograd.grad(out, [q, k, v], seed),
                          torch.autograd.grad(want, [q, k, v], seed)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_float64_varlen_equals_torch_backend():
    lens_q, lens_k = [3, 70, 0, 130], [5, 64, 4, 129]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q, k, v = _leaves([(1, 4, sum(lens_q), 16), (1, 2, sum(lens_k), 16), (1, 2, sum(lens_k), 16)])
    kw = dict(window=(20, 0), bottom_right=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
              max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
              alibi_slopes=torch.rand(4, 4, dtype=torch.float64))
    out, lse = _core("native", q, k, v, **kw)
    want, want_lse = _core("torch", q, k, v, **kw)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    seed = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(out, [q, k, v], seed),
                    torch.autograd.grad(want, [q, k, v], seed)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_float64_mask_gradient_with_broadcast():
    q, k, v = _leaves([(2, 2, 70, 8), (2, 2, 66, 8), (2, 2, 66, 8)])
    mask = torch.randn(2, 1, 70, 66, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(2, 2, 70, 8, dtype=torch.float64)
    grads = {}
    for backend in ("native", "torch"):
        out = llmcore.attention(q, k, v, mask, is_causal=True, backend=backend)
        grads[backend] = torch.autograd.grad((out * seed).sum(), [q, k, v, mask])
    for a, e in zip(grads["native"], grads["torch"]):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def _run(threads, dropout_p=0.0, batch=2):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(7)
        q, k, v = _leaves([(batch, 4, 150, 32), (batch, 2, 150, 32), (batch, 2, 150, 32)],
                          torch.float32)
        out = llmcore.attention(q, k, v, is_causal=True, enable_gqa=True, dropout_p=dropout_p,
                                backend="native")
        return (out, *torch.autograd.grad(out.square().sum(), [q, k, v]))
    finally:
        torch.set_num_threads(old)


# batch 2: the fused backward on 1 and 2 threads; batch 1 (2 (sequence, kv head) tasks): fused on
# 1 thread, the two-pass backward on 2 -- the two schedules must agree bit for bit
@pytest.mark.parametrize("batch", [2, 1])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_bitwise_deterministic_across_thread_counts(dropout_p, batch):
    one, two, again = (_run(1, dropout_p, batch), _run(2, dropout_p, batch),
                       _run(2, dropout_p, batch))
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_lse_matches_logsumexp_for_flash_layout():
    q, k, v = (torch.randn(1, 100, 2, 16) for _ in range(3))
    out, lse, _ = llmcore.flash_attn_func(q, k, v, causal=True, return_attn_probs=True,
                                          backend="native")
    s = (q.transpose(1, 2).double() @ k.transpose(1, 2).double().transpose(-1, -2)) / 4.0
    s = s.masked_fill(torch.ones(100, 100, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)
    assert out.is_contiguous() and lse.dtype == torch.float32


def test_opcheck():
    # llmcore::attention, the differentiable op the wrappers call (autograd in C++), and the two
    # kernel ops below it (no autograd of their own: inputs that do not require grad)
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 1, 9, 9, requires_grad=True)
    args = (q, k, v, mask, None, None, None, None, [0.3, 0.0, 0.0], [4, 0, 0, 0, 0])
    torch.library.opcheck(torch.ops.llmcore.attention.default, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.llmcore.attention_fwd.default, plain)
    out, lse = torch.ops.llmcore.attention_fwd(*plain)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
           mask.detach(), None, None, None, None, [0.3, 0.0, 0.0], [4, 0, 0, 0, 0], True)
    torch.library.opcheck(torch.ops.llmcore.attention_bwd.default, bwd)


def test_compiles_fullgraph():
    q, k, v = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(3))
    f = torch.compile(lambda q, k, v: llmcore.attention(q, k, v, is_causal=True,
                                                        backend="native"), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), llmcore.attention(q, k, v, is_causal=True,
                                                             backend="torch"))


@pytest.mark.parametrize("nq, nk", [(200, 200), (130, 67), (70, 190)])
def test_causal_band_skipping_changes_no_bit(nq, nk):
    # is_causal lets the kernel skip the masked band of the diagonal tiles; the same mask given
    # as a boolean attn_mask (no band: every tile product runs in full, the mask adds -inf or 0)
    # must give the same bits, forward and backward (GQA, tiles of 64 with ragged ends)
    torch.manual_seed(3)
    q, k, v = _leaves([(2, 4, nq, 32), (2, 2, nk, 32), (2, 2, nk, 32)], torch.float32)
    mask = torch.ones(nq, nk, dtype=torch.bool).tril()           # top-left, as is_causal
    seed = torch.randn(2, 4, nq, 32)
    res = []
    for kw in (dict(is_causal=True), dict(attn_mask=mask)):
        out = llmcore.attention(q, k, v, enable_gqa=True, backend="native", **kw)
        res.append((out, *torch.autograd.grad((out * seed).sum(), [q, k, v])))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def _fused_qkv(B=2, N=70, H=3, D=16, dtype=torch.float64):
    """q, k, v as the model makes them: (B, N, H, D) views of one fused QKV projection."""
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype, requires_grad=True)
    return [t.unflatten(-1, (H, D)) for t in qkv.split(H * D, -1)]


def test_gradients_come_back_in_the_inputs_memory_order():
    # (B, N, H, D) views get gradients that are (B, N, H, D) in memory, so autograd hands them
    # to the QKV projection without a copy; they are not zero-filled first, so every element
    # must be written (a nan-filled buffer would show in the comparison)
    q, k, v = _fused_qkv()
    seed = torch.randn(q.shape, dtype=q.dtype)
    grads = {}
    for backend in ("native", "torch"):
        out = llmcore.flash_attn_func(q, k, v, causal=True, backend=backend)
        grads[backend] = torch.autograd.grad((out * seed).sum(), [q, k, v])
    for a, e in zip(grads["native"], grads["torch"]):
        assert a.is_contiguous(), a.stride()
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    # contiguous (B, H, N, D) inputs (SDPA's layout) keep contiguous gradients
    q, k, v = _leaves([(2, 3, 70, 16)] * 3)
    out = llmcore.attention(q, k, v, is_causal=True, backend="native")
    for g in torch.autograd.grad(out.sum(), [q, k, v]):
        assert g.is_contiguous(), g.stride()


@pytest.mark.parametrize("layout", ["flash", "sdpa"])
def test_fake_gradients_have_the_kernels_strides(layout):
    if layout == "flash":
        q, k, v = (t.detach().transpose(1, 2) for t in _fused_qkv(dtype=torch.float32))
    else:
        q, k, v = (torch.randn(2, 3, 70, 16) for _ in range(3))
    floats, ints = [0.25, 0.0, 0.0], [-1, 0, 0, 0, 0]
    out, lse = torch.ops.llmcore.attention_fwd(q, k, v, None, None, None, None, None, floats,
                                               ints)
    args = (torch.randn_like(out), q, k, v, out, lse, None, None, None, None, None, floats,
            ints, False)
    real = torch.ops.llmcore.attention_bwd(*args)
    fake = attention_ops._native_attention_bwd_fake(*args)
    assert [t.stride() for t in real[:3]] == [t.stride() for t in fake[:3]]


def test_compiles_fullgraph_with_the_models_layout():
    q, k, v = _fused_qkv(B=1, N=33, H=2, D=16, dtype=torch.float32)
    f = torch.compile(lambda q, k, v: llmcore.flash_attn_func(q, k, v, causal=True,
                                                              backend="native"), fullgraph=True)
    got = torch.autograd.grad(f(q, k, v).square().sum(), [q, k, v])
    want = torch.autograd.grad(llmcore.flash_attn_func(q, k, v, causal=True, backend="torch")
                               .square().sum(), [q, k, v])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("args, words", [
    (dict(floats=[1.0, 0.0]), "floats must be"),
    (dict(q=torch.randn(1, 3, 4, 8)), "multiple of k's"),
    (dict(k=torch.randn(1, 2, 4, 6)), "k's head dim"),
    (dict(floats=[1.0, 0.0, 0.5]), "seed must be an int64"),
    (dict(mask=torch.randn(1, 2, 3, 4)), "attn_mask must broadcast"),
])
def test_op_rejects_bad_input_by_name(args, words):
    base = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8),
                mask=None, floats=[1.0, 0.0, 0.0])
    a = {**base, **args}
    with pytest.raises((ValueError, TypeError), match=words):
        torch.ops.llmcore.attention_fwd(a["q"], a["k"], a["v"], a["mask"], None, None, None,
                                        None, a["floats"], [-1, -1, 0, 0, 0])


def test_auto_picks_native_on_cpu():
    if "native" not in backends.IMPLEMENTED["attention"]:
        pytest.skip("native attention not registered in backends.IMPLEMENTED yet")
    assert backends.resolve("attention", "auto", torch.device("cpu")) == "native"
