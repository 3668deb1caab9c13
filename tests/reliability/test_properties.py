"""Property-based tests (hypothesis): random small shapes, dtypes and options for every public op
on every backend, forward and every gradient against the float64 oracle with conftest's rule.

Runs are reproducible by default (derandomized: CI sees the same examples every time); set
LLMCORE_HYPOTHESIS_EXPLORE=1 to draw fresh examples, and LLMCORE_HYPOTHESIS_EXAMPLES=N to draw
more. The Triton interpreter is slow, so its backends draw fewer examples.
"""
import os

import pytest
import torch

import llmcore
from llmcore_testing import kernel_backends
from reliability_oracles import (attention_eager, attention_oracle, call_norm, ce_eager,
                                 ce_oracle, check_fwd_bwd, loss_atol, norm_eager, norm_oracle,
                                 varlen_oracle)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_EXTRA = int(os.environ.get("LLMCORE_HYPOTHESIS_EXAMPLES", "0"))


def _settings(n):
    return settings(max_examples=_EXTRA or n, deadline=None, database=None,
                    derandomize=not os.environ.get("LLMCORE_HYPOTHESIS_EXPLORE"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)


def _examples(backend, fast, slow):
    return slow if backend == "triton" else fast


DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _grad_atol(dtype):
    # sums over rows / keys: a few ulps more than the default in float32
    return 1e-5 if dtype == torch.float32 else None


def _seeded(seed):
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- norms

@st.composite
def norm_cases(draw):
    return dict(
        kind=draw(st.sampled_from(["layer", "rms"])),
        lead=draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)),
        n=draw(st.sampled_from([1, 2, 3, 7, 31, 64, 97, 130])),
        dtype=draw(DTYPES),
        weight=draw(st.booleans()), bias=draw(st.booleans()), residual=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-6, 0.1])),
        transposed=draw(st.booleans()),       # rows strided as a (n, rows) matrix's columns
        scale=draw(st.sampled_from([1.0, 30.0])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _norm_property(backend, c):
    _seeded(c["seed"])
    kind, n, dtype = c["kind"], c["n"], c["dtype"]
    rows = 1
    for d in c["lead"]:
        rows *= d
    if c["transposed"]:
        x = (torch.randn(n, rows, dtype=dtype) * c["scale"]).requires_grad_()
        view = lambda x: x.t().reshape(*c["lead"], n)  # noqa: E731  a copy unless 2-D
    else:
        x = (torch.randn(*c["lead"], n, dtype=dtype) * c["scale"]).requires_grad_()
        view = lambda x: x  # noqa: E731
    w = (torch.rand(n, dtype=dtype) + 0.5).requires_grad_() if c["weight"] else None
    b = torch.randn(n, dtype=dtype, requires_grad=True) if c["bias"] and kind == "layer" else None
    r = torch.randn(*c["lead"], n, dtype=dtype, requires_grad=True) if c["residual"] else None

    def run(fn):
        def f(x, w, b, r):
            y, h = fn(kind, view(x), w, b, c["eps"], r)
            return y if r is None else torch.cat([y, h], -1)
        return f

    check_fwd_bwd(run(lambda *a: call_norm(*a, backend)), run(norm_eager), run(norm_oracle),
                  [x, w, b, r], grad_names=["dx", "dweight", "dbias", "dresidual"],
                  grad_atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", kernel_backends("norm"))
def test_norm_property(backend):
    @_settings(_examples(backend, 30, 12))
    @given(norm_cases())
    def prop(c):
        _norm_property(backend, c)
    prop()


# ---------------------------------------------------------------------------- cross-entropy

@st.composite
def ce_cases(draw):
    return dict(
        n=draw(st.integers(0, 9)),
        c=draw(st.sampled_from([1, 2, 5, 37, 130, 1031])),
        dtype=draw(DTYPES),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        weight=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.3])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 5.0, 30.0])),
        ignore=draw(st.sampled_from([0.0, 0.3, 1.0])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        scale=draw(st.sampled_from([1.0, 8.0])),
        transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _targets(n, c, ignore, ignore_index):
    t = torch.randint(0, c, (n,))
    return torch.where(torch.rand(n) < ignore, torch.full_like(t, ignore_index), t)


def _ce_property(backend, c):
    _seeded(c["seed"])
    n, cls, dtype = c["n"], c["c"], c["dtype"]
    if c["transposed"]:
        x = (torch.randn(cls, n, dtype=dtype) * c["scale"]).requires_grad_()
        view = lambda x: x.t()  # noqa: E731
    else:
        x = (torch.randn(n, cls, dtype=dtype) * c["scale"]).requires_grad_()
        view = lambda x: x  # noqa: E731
    t = _targets(n, cls, c["ignore"], c["ignore_index"])
    w = torch.rand(cls, dtype=dtype) + 0.5 if c["weight"] else None
    kw = {k: c[k] for k in ("reduction", "label_smoothing", "z_loss", "softcap", "ignore_index")}
    ref = ce_oracle(view(x.detach().double()), t, w, **kw)
    check_fwd_bwd(lambda x, t: llmcore.cross_entropy(view(x), t, w, backend=backend, **kw),
                  lambda x, t: ce_eager(view(x), t, w, **kw),
                  lambda x, t: ce_oracle(view(x), t, w, **kw), [x, t],
                  grad_names=["dlogits", None], atol=loss_atol(ref, dtype),
                  grad_atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
def test_cross_entropy_property(backend):
    @_settings(_examples(backend, 40, 15))
    @given(ce_cases())
    def prop(c):
        _ce_property(backend, c)
    prop()


@st.composite
def lce_cases(draw):
    return dict(
        lead=draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)),
        h=draw(st.sampled_from([1, 3, 16])),
        v=draw(st.sampled_from([1, 7, 37, 130])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        bias=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 5.0])),
        ignore=draw(st.sampled_from([0.0, 0.3, 1.0])),
        chunk_size=draw(st.sampled_from([None, 1, 3])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _lce_property(backend, c):
    _seeded(c["seed"])
    dtype, lead = c["dtype"], c["lead"]
    n = 1
    for d in lead:
        n *= d
    x = torch.randn(*lead, c["h"], dtype=dtype, requires_grad=True)
    w = (torch.randn(c["v"], c["h"], dtype=dtype) / c["h"] ** 0.5).requires_grad_()
    b = torch.randn(c["v"], dtype=dtype, requires_grad=True) if c["bias"] else None
    t = _targets(n, c["v"], c["ignore"], -100).reshape(lead)
    kw = {k: c[k] for k in ("reduction", "label_smoothing", "z_loss", "softcap")}

    def ref(fn):
        def f(x, w, b):
            logits = torch.nn.functional.linear(x.reshape(-1, c["h"]), w, b)
            out = fn(logits, t.reshape(-1), **kw)
            return out.reshape(lead) if c["reduction"] == "none" else out
        return f

    want = ref(ce_oracle)(x.detach().double(), w.detach().double(),
                          None if b is None else b.detach().double())
    check_fwd_bwd(lambda x, w, b: llmcore.linear_cross_entropy(
                      x, w, t, b, chunk_size=c["chunk_size"], backend=backend, **kw),
                  ref(ce_eager), ref(ce_oracle), [x, w, b],
                  grad_names=["dinput", "dweight", "dbias"], atol=loss_atol(want, dtype),
                  grad_atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
def test_linear_cross_entropy_property(backend):
    @_settings(_examples(backend, 25, 10))
    @given(lce_cases())
    def prop(c):
        _lce_property(backend, c)
    prop()


# ---------------------------------------------------------------------------- attention

@st.composite
def attention_cases(draw):
    api = draw(st.sampled_from(["attention", "flash_attn_func", "varlen"]))
    hkv = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([8, 16, 24, 40]))
    c = dict(
        api=api, b=draw(st.integers(1, 2)), hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2])),
        nq=draw(st.integers(1, 20)), nk=draw(st.integers(1, 20)), d=d,
        dv=draw(st.sampled_from([d, 16])),
        dtype=draw(DTYPES),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (3, -1), (-1, 2), (4, 1)])),
        softcap=draw(st.sampled_from([0.0, 5.0])),
        scale=draw(st.sampled_from([None, 0.3])),
        mask=draw(st.sampled_from([None, "bool", "additive"])) if api == "attention" else None,
        alibi=draw(st.booleans()) if api == "flash_attn_func" else False,
        lens_q=draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)),
        lens_k=None,
        seed=draw(st.integers(0, 2 ** 16)),
    )
    c["lens_k"] = draw(st.lists(st.integers(0, 9), min_size=len(c["lens_q"]),
                                max_size=len(c["lens_q"])))
    return c


def _attention_property(backend, c):
    _seeded(c["seed"])
    dtype, api = c["dtype"], c["api"]
    if api == "flash_attn_func" or api == "varlen":
        c = dict(c, dv=c["d"])                        # flash-attn's API: one head dim
    left, right = c["window"]
    if c["causal"]:
        right = 0
    kw = dict(window=(left, right), softcap=c["softcap"], scale=c["scale"])
    if api == "varlen":
        cu_q = torch.tensor([0] + c["lens_q"]).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + c["lens_k"]).cumsum(0).to(torch.int32)
        q = torch.randn(int(cu_q[-1]), c["hq"], c["d"], dtype=dtype, requires_grad=True)
        k = torch.randn(int(cu_k[-1]), c["hkv"], c["d"], dtype=dtype, requires_grad=True)
        v = torch.randn(int(cu_k[-1]), c["hkv"], c["d"], dtype=dtype, requires_grad=True)

        def impl(q, k, v):
            return llmcore.flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, max(c["lens_q"]), max(c["lens_k"]), softmax_scale=c["scale"],
                causal=c["causal"], window_size=c["window"], softcap=c["softcap"],
                backend=backend)

        def ref(fn):
            def f(q, k, v):
                up = q.dtype in (torch.float16, torch.bfloat16) and fn is attention_eager
                cast = (lambda t: t.float()) if up else (lambda t: t)  # noqa: E731
                out = varlen_oracle(cast(q), cast(k), cast(v), cu_q, cu_k, **kw)
                return out.to(q.dtype)
            return f
        check_fwd_bwd(impl, ref(attention_eager), ref(attention_oracle), [q, k, v],
                      grad_names=["dq", "dk", "dv"], grad_atol=_grad_atol(dtype))
        return

    b, hq, hkv, nq, nk = c["b"], c["hq"], c["hkv"], c["nq"], c["nk"]
    q = torch.randn(b, hq, nq, c["d"], dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, nk, c["d"], dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, nk, c["dv"], dtype=dtype, requires_grad=True)
    mask = None
    if c["mask"] == "bool":
        mask = torch.rand(b, 1, nq, nk) > 0.3
    elif c["mask"] == "additive":
        mask = (torch.randn(1, hq, nq, nk) * 2).to(dtype)
    slopes = torch.rand(b, hq) * 0.5 if c["alibi"] else None
    if api == "attention":
        def impl(q, k, v):
            return llmcore.attention(q, k, v, mask, is_causal=c["causal"], scale=c["scale"],
                                     enable_gqa=hq != hkv, window_size=c["window"],
                                     softcap=c["softcap"], backend=backend)
        check_fwd_bwd(impl, lambda q, k, v: attention_eager(q, k, v, mask=mask, **kw),
                      lambda q, k, v: attention_oracle(q, k, v, mask=mask, **kw), [q, k, v],
                      grad_names=["dq", "dk", "dv"], grad_atol=_grad_atol(dtype))
        return

    def impl(q, k, v):                                 # flash layout (B, N, H, D)
        return llmcore.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=c["scale"],
            causal=c["causal"], window_size=c["window"], softcap=c["softcap"],
            alibi_slopes=slopes, backend=backend).transpose(1, 2)
    check_fwd_bwd(impl,
                  lambda q, k, v: attention_eager(q, k, v, bottom_right=True, alibi=slopes, **kw),
                  lambda q, k, v: attention_oracle(q, k, v, bottom_right=True, alibi=slopes,
                                                   **kw),
                  [q, k, v], grad_names=["dq", "dk", "dv"], grad_atol=_grad_atol(dtype))


@pytest.mark.parametrize("backend", kernel_backends("attention"))
def test_attention_property(backend):
    @_settings(_examples(backend, 40, 12))
    @given(attention_cases())
    def prop(c):
        _attention_property(backend, c)
    prop()
