"""llmcore.nn.SelfAttention against the same block written out with F.scaled_dot_product_attention
in float64."""
import pytest
import torch
import torch.nn.functional as F

from llmcore_testing import kernel_backends
from llmcore.nn import SelfAttention
from llmcore.nn.attention import KVCache

BACKENDS = kernel_backends("attention")


def _rotary(n, d, offset=0):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(offset, offset + n, dtype=torch.float64)[:, None] * inv   # (n, d/2)
    ang = torch.cat([ang, ang], dim=-1)                                          # (n, d)
    return ang.cos(), ang.sin()


def _manual(m, x, pad=None, rotary=None):
    """The block by hand in x's dtype: projections, half-split rotary, SDPA, output projection."""
    B, N, E = x.shape
    hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    w, b = m.qkv.weight.to(x.dtype), None if m.qkv.bias is None else m.qkv.bias.to(x.dtype)
    qkv = F.linear(x, w, b)
    q = qkv[..., :hq * d].reshape(B, N, hq, d).transpose(1, 2)
    k = qkv[..., hq * d:(hq + hkv) * d].reshape(B, N, hkv, d).transpose(1, 2)
    v = qkv[..., (hq + hkv) * d:].reshape(B, N, hkv, d).transpose(1, 2)
    if rotary is not None:
        cos, sin = (t.to(x.dtype) for t in rotary)

        def rot(t):
            t1, t2 = t[..., :d // 2], t[..., d // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin
        q, k = rot(q), rot(k)
    allowed = torch.ones(N, N, dtype=torch.bool)
    if m.causal:
        allowed = allowed.tril()
    left = m.window_size[0]
    if left >= 0:
        allowed = allowed & ~torch.ones(N, N, dtype=torch.bool).tril(-left - 1)
    mask = allowed if pad is None else allowed & pad.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
    out = out.transpose(1, 2).reshape(B, N, hq * d)
    wo, bo = m.out_proj.weight.to(x.dtype), m.out_proj.bias
    return F.linear(out, wo, None if bo is None else bo.to(x.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [
    dict(num_heads=4),
    dict(num_heads=4, num_kv_heads=2, causal=True, bias=False),
    dict(num_heads=2, num_kv_heads=1, causal=True, window_size=(3, 0), qkv_bias=False),
], ids=str)
@pytest.mark.parametrize("with_pad, with_rotary", [(False, False), (True, True)])
def test_self_attention_matches_manual_block(backend, cfg, with_pad, with_rotary):
    m = SelfAttention(32, backend=backend, **cfg)
    B, N = 2, 13
    x = torch.randn(B, N, 32, requires_grad=True)
    pad = None
    if with_pad:
        pad = torch.ones(B, N, dtype=torch.long)
        pad[1, 9:] = 0                                       # right padding of sequence 1
    rotary = _rotary(N, m.head_dim) if with_rotary else None
    got = m(x, attention_mask=pad, rotary=None if rotary is None else
            tuple(t.float() for t in rotary))
    x64 = x.detach().double().requires_grad_()
    want = _manual(m, x64, pad, rotary)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    seed = torch.randn_like(want)
    params = list(m.parameters())
    g_got = torch.autograd.grad(got, [x] + params, seed.float())
    g_want = torch.autograd.grad(want, [x64] + params, seed)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


def test_parameters_and_bias_flags():
    m = SelfAttention(48, 6, 2, bias=True, out_bias=False)
    assert m.qkv.weight.shape == ((6 + 2 * 2) * 8, 48) and m.qkv.bias.shape == (80,)
    assert m.out_proj.weight.shape == (48, 48) and m.out_proj.bias is None
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "out_proj.weight"}
    m2 = SelfAttention(16, 2, dtype=torch.float64)
    assert m2.qkv.weight.dtype == torch.float64 and m2.qkv.bias is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(causal=True), dict(causal=True, window_size=(4, 0)),
                                 dict(causal=True, num_kv_heads=1)], ids=str)
def test_kv_cache_decoding_equals_full_forward(backend, cfg):
    m = SelfAttention(32, 4, backend=backend, **cfg).eval()
    x = torch.randn(2, 11, 32)
    full = m(x, rotary=_float(_rotary(11, 8)))
    cache = KVCache()
    # a chunked prefill of 5 tokens, then one token at a time, then a chunk of 3
    steps = [(0, 5)] + [(i, i + 1) for i in range(5, 8)] + [(8, 11)]
    outs = [m(x[:, a:b], rotary=_float(_rotary(b - a, 8, offset=a)), kv_cache=cache)
            for a, b in steps]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.key.shape == (2, m.num_kv_heads, 11, 8)


def _float(rotary):
    return tuple(t.float() for t in rotary)


def test_key_padding_hides_padded_tokens():
    m = SelfAttention(16, 2, causal=False).eval()
    x = torch.randn(1, 7, 16)
    pad = torch.tensor([[1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 2, 16) * 10                  # change only the padded tokens
    torch.testing.assert_close(m(x, pad)[:, :5], m(y, pad)[:, :5])
    assert not torch.allclose(m(x)[:, :5], m(y)[:, :5])


def test_dropout_only_in_training():
    m = SelfAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 9, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    assert torch.equal(a, m(x))
    assert not torch.allclose(a, m(x))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="embed_dim .* multiple of num_heads"):
        SelfAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SelfAttention(32, 4, 3)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, keys\)"):
        SelfAttention(16, 2)(torch.randn(2, 5, 16), attention_mask=torch.ones(2, 4))
