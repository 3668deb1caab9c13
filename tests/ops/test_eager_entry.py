"""The native backend's C++ eager entries (csrc/torch/eager_entry.cpp): the ordinary call of
layer_norm, rms_norm, cross_entropy, linear_cross_entropy, attention, gelu and swiglu on CPU
tensors is checked and run in one C++ call, anything else returns None and takes the Python path.

Here: the entry is taken for the ordinary call (and not when another backend is chosen); it
gives bit-identical outputs and gradients to the Python path; and it admits nothing the Python
checks refuse, so every error is still the Python path's."""
from __future__ import annotations

import math

import pytest
import torch

import llmcore
from llmcore import backends
from llmcore.ops import attention as attention_ops
from llmcore.ops import cross_entropy as ce_ops
from llmcore.ops import gelu as gelu_ops
from llmcore.ops import norm as norm_ops
from llmcore.ops import swiglu as swiglu_ops

pytestmark = pytest.mark.skipif(
    backends.native_module() is None or not hasattr(backends.native_module(), "norm_eager"),
    reason="llmcore._native is not built here (or predates its eager entries)")

# module attribute holding each entry -> its module
_ENTRIES = {"norm": (norm_ops, "_norm_eager"), "ce": (ce_ops, "_native_ce_fast"),
            "lce": (ce_ops, "_native_lce_fast"),
            "attention": (attention_ops, "_native_attention_fast"),
            "gelu": (gelu_ops, "_native_fast"), "swiglu": (swiglu_ops, "_native_fast")}


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _targets(n, classes, ignored=()):
    t = torch.randint(0, classes, (n,))
    for i in ignored:
        t[i] = -100
    return t


def _calls():
    """name -> (entry, a function of fresh inputs making the public call, its leaves)."""
    def norm(kind, residual, dtype=torch.float32):
        def make():
            x, w, b, r = _leaf(5, 37, dtype=dtype), _leaf(37), _leaf(37), _leaf(5, 37, dtype=dtype)
            if kind == "layer":
                return (lambda: llmcore.layer_norm(x, (37,), w, b, 1e-5, residual=r if residual
                                                   else None, backend="native"),
                        [x, w, b] + ([r] if residual else []))
            return (lambda: llmcore.rms_norm(x, 37, w, residual=r if residual else None,
                                             backend="native"),
                    [x, w] + ([r] if residual else []))
        return "norm", make

    def ce(reduction, weight, opts):
        def make():
            x, t = _leaf(7, 53), _targets(7, 53, ignored=(2,))
            cw = torch.rand(53) if weight else None
            return (lambda: llmcore.cross_entropy(x, t, cw, reduction=reduction,
                                                  backend="native", **opts), [x])
        return "ce", make

    def lce(reduction, bias, opts):
        def make():
            x, w, b, t = _leaf(6, 16), _leaf(41, 16), _leaf(41), _targets(6, 41, ignored=(0,))
            return (lambda: llmcore.linear_cross_entropy(x, w, t, b if bias else None,
                                                         reduction=reduction, backend="native",
                                                         **opts),
                    [x, w] + ([b] if bias else []))
        return "lce", make

    def attention(causal, gqa, opts):
        def make():
            q = _leaf(2, 4, 9, 16)
            k, v = _leaf(2, 2 if gqa else 4, 11, 16), _leaf(2, 2 if gqa else 4, 11, 8)
            return (lambda: llmcore.attention(q, k, v, is_causal=causal, enable_gqa=gqa,
                                              backend="native", **opts), [q, k, v])
        return "attention", make

    def gelu(approximate):
        def make():
            x = _leaf(3, 5, 7)
            return lambda: llmcore.gelu(x, approximate, backend="native"), [x]
        return "gelu", make

    def swiglu(*shape):
        def make():
            x = _leaf(*shape)
            return lambda: llmcore.swiglu(x, backend="native"), [x]
        return "swiglu", make

    def view(kind):
        # inputs as callers pass them: views with other strides, more dims, no rows
        def make():
            if kind == "layer_norm transposed":
                x0, w = _leaf(37, 5), _leaf(37)
                return lambda: llmcore.layer_norm(x0.t(), 37, w, None, 1e-6, backend="native"), [
                    x0, w]
            if kind == "rms_norm 3-D":
                x = _leaf(2, 3, 16)
                return lambda: llmcore.rms_norm(x, torch.Size([16]), backend="native"), [x]
            if kind == "ce no rows":
                x = _leaf(0, 9)
                return (lambda: llmcore.cross_entropy(x, torch.zeros(0, dtype=torch.long),
                                                      backend="native"), [x])
            if kind == "ce all ignored":
                x = _leaf(3, 9)
                return (lambda: llmcore.cross_entropy(x, torch.full((3,), -1), ignore_index=-1,
                                                      reduction="sum", backend="native"), [x])
            if kind == "attention (B, N, H, D) views":
                q0, k0, v0 = _leaf(2, 9, 4, 16), _leaf(2, 7, 2, 16), _leaf(2, 7, 2, 16)
                return (lambda: llmcore.attention(q0.transpose(1, 2), k0.transpose(1, 2),
                                                  v0.transpose(1, 2), enable_gqa=True,
                                                  backend="native"), [q0, k0, v0])
            if kind == "gelu strided":
                x0 = _leaf(7, 12)
                return lambda: llmcore.gelu(x0[:, ::2], backend="native"), [x0]
            x0 = _leaf(8, 6)                                            # swiglu transposed
            return lambda: llmcore.swiglu(x0.t(), backend="native"), [x0]
        return kind.split()[0].replace("layer_norm", "norm").replace("rms_norm", "norm"), make

    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 15.0}
    return {
        "layer_norm": norm("layer", False), "layer_norm+residual": norm("layer", True),
        "layer_norm bf16": norm("layer", False, torch.bfloat16),
        "rms_norm": norm("rms", False), "rms_norm+residual": norm("rms", True),
        "ce mean": ce("mean", False, {}), "ce sum weighted": ce("sum", True, {}),
        "ce none options": ce("none", False, opts),
        "lce mean": lce("mean", False, {}), "lce none bias options": lce("none", True, opts),
        "attention causal": attention(True, False, {}),
        "attention gqa window softcap": attention(False, True, {"window_size": (3, 2),
                                                                "softcap": 20.0, "scale": 0.3}),
        "gelu tanh": gelu("tanh"), "gelu": gelu("none"),
        "swiglu": swiglu(3, 5, 8), "swiglu 1-D": swiglu(12),
        **{k: view(k) for k in ("layer_norm transposed", "rms_norm 3-D", "ce no rows",
                                "ce all ignored", "attention (B, N, H, D) views",
                                "gelu strided", "swiglu transposed")},
    }


_CALLS = _calls()


def _run(make, seed):
    torch.manual_seed(seed)
    fn, leaves = make()
    out = fn()
    outs = list(out) if isinstance(out, tuple) else [out]
    torch.manual_seed(seed + 1)
    seeds = [torch.randn(o.shape, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, seeds, allow_unused=True)
    return outs, grads


@pytest.mark.parametrize("name", list(_CALLS))
def test_the_entry_runs_the_ordinary_call_bit_for_bit_as_the_python_path(name, monkeypatch):
    kind, make = _CALLS[name]
    module, attr = _ENTRIES[kind]
    entry = getattr(module, attr)
    taken = []

    def spy(*args):
        out = entry(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(module, attr, spy)
    fast = _run(make, 0)
    assert taken == [True], f"{name}: the eager entry was not taken ({taken})"
    monkeypatch.setattr(module, attr, None)          # the Python path alone
    slow = _run(make, 0)
    _assert_same_bits(name, fast[0] + list(fast[1]), slow[0] + list(slow[1]))


def _assert_same_bits(name, got_all, want_all):
    for got, want in zip(got_all, want_all, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.stride() == want.stride(), f"{name}: another memory layout"
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name}: the entry and the Python path differ")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["layer_norm+residual", "ce mean", "lce none bias options",
                                  "attention gqa window softcap", "gelu tanh", "swiglu"])
def test_without_a_graph_the_entry_gives_the_python_paths_bits(name, mode, monkeypatch):
    kind, make = _CALLS[name]
    module, attr = _ENTRIES[kind]
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    results = []
    for entry in (getattr(module, attr), None):
        monkeypatch.setattr(module, attr, entry)
        torch.manual_seed(0)
        fn, _ = make()
        with ctx():
            out = fn()
        outs = list(out) if isinstance(out, tuple) else [out]
        assert all(o.grad_fn is None for o in outs)
        results.append(outs)
    _assert_same_bits(name, *results)


@pytest.mark.parametrize("how", ["backend='torch'", "LLMCORE_BACKEND=torch"])
def test_the_entry_is_not_taken_for_another_backend(how, monkeypatch):
    module, attr = _ENTRIES["norm"]
    calls = []
    monkeypatch.setattr(module, attr, lambda *a: calls.append(a))
    x = torch.randn(3, 8)
    if how.startswith("backend"):
        llmcore.layer_norm(x, 8, backend="torch")
    else:
        monkeypatch.setenv("LLMCORE_BACKEND", "torch")
        llmcore.layer_norm(x, 8)
        monkeypatch.delenv("LLMCORE_BACKEND")
        llmcore.layer_norm(x, 8)                     # "auto" is native again: taken
        assert len(calls) == 1
        return
    assert calls == []


def test_the_environment_override_is_read_on_every_call(monkeypatch):
    monkeypatch.delenv("LLMCORE_BACKEND", raising=False)
    assert backends._env_backend() == "auto"
    monkeypatch.setenv("LLMCORE_BACKEND", "torch")
    assert backends._env_backend() == "torch"
    assert backends.resolve("norm", "auto", "cpu") == "torch"
    x = torch.randn(2, 3)
    assert not backends.native_eager("norm", "auto", x)
    monkeypatch.setenv("LLMCORE_BACKEND", "")
    assert backends._env_backend() == "auto"
    monkeypatch.delenv("LLMCORE_BACKEND")
    assert backends.native_eager("norm", "auto", x)
    assert not backends.native_eager("norm", "no-such-backend", x)
    assert not backends.native_eager("norm", "native", x.to("meta"))    # CPU tensors only
    assert not backends.native_eager("norm", "native", torch.nn.Parameter(x))  # plain ones
    assert not backends.native_eager("norm", "native", x.tolist())


# Calls the entries must not admit: each returns None (the Python path then runs, and raises
# where its checks refuse the call). (entry, args, what the public function does with them)
_X, _W = torch.randn(4, 8), torch.randn(8)
_LG, _T = torch.randn(4, 10), torch.randint(0, 10, (4,))
_Q = torch.randn(1, 2, 5, 8)
_REFUSED = {
    # norm_eager(input, normalized_shape, weight, bias, eps, residual, rms)
    "norm: input not a tensor": ("norm", ([1.0] * 8, 8, None, None, 1e-5, None, False)),
    "norm: integer input": ("norm", (torch.ones(4, 8, dtype=torch.int64), 8, None, None, 1e-5,
                                     None, False)),
    "norm: shape mismatch": ("norm", (_X, 7, None, None, 1e-5, None, False)),
    "norm: bool shape": ("norm", (torch.randn(4, 1), True, None, None, 1e-5, None, False)),
    "norm: 2-dim shape": ("norm", (_X, (4, 8), None, None, 1e-5, None, False)),
    "norm: shape as a list": ("norm", (_X, [8], None, None, 1e-5, None, False)),
    "norm: weight shape": ("norm", (_X, 8, torch.randn(7), None, 1e-5, None, False)),
    "norm: weight dtype": ("norm", (_X, 8, _W.double(), None, 1e-5, None, False)),
    "norm: weight not a tensor": ("norm", (_X, 8, [1.0] * 8, None, 1e-5, None, False)),
    "norm: bias dtype": ("norm", (_X.half(), 8, None, _W.double(), 1e-5, None, False)),
    "norm: negative eps": ("norm", (_X, 8, None, None, -1e-5, None, False)),
    "norm: nan eps": ("norm", (_X, 8, None, None, math.nan, None, False)),
    "norm: int eps": ("norm", (_X, 8, None, None, 0, None, False)),
    "norm: None eps for layer_norm": ("norm", (_X, 8, None, None, None, None, False)),
    "norm: residual shape": ("norm", (_X, 8, None, None, 1e-5, torch.randn(4, 1), False)),
    "norm: residual dtype": ("norm", (_X, 8, None, None, 1e-5, _X.double(), False)),
    "norm: meta input": ("norm", (_X.to("meta"), 8, None, None, 1e-5, None, False)),
    "norm: 0-dim input": ("norm", (torch.tensor(1.0), 1, None, None, 1e-5, None, False)),
    # cross_entropy_eager(input, target, weight, ignore_index, reduction, ls, z_loss, softcap)
    "ce: 1-D logits": ("ce", (torch.randn(10), torch.tensor(3), None, -100, "mean", 0.0, 0.0,
                              None)),
    "ce: no classes": ("ce", (torch.randn(4, 0), _T, None, -100, "mean", 0.0, 0.0, None)),
    "ce: int32 target": ("ce", (_LG, _T.int(), None, -100, "mean", 0.0, 0.0, None)),
    "ce: float target": ("ce", (_LG, _LG.softmax(1), None, -100, "mean", 0.0, 0.0, None)),
    "ce: target shape": ("ce", (_LG, _T[:3], None, -100, "mean", 0.0, 0.0, None)),
    "ce: weight shape": ("ce", (_LG, _T, torch.rand(9), -100, "mean", 0.0, 0.0, None)),
    "ce: weight needs grad": ("ce", (_LG, _T, torch.rand(10, requires_grad=True), -100, "mean",
                                     0.0, 0.0, None)),
    "ce: bool ignore_index": ("ce", (_LG, _T, None, True, "mean", 0.0, 0.0, None)),
    "ce: bad reduction": ("ce", (_LG, _T, None, -100, "avg", 0.0, 0.0, None)),
    "ce: label_smoothing > 1": ("ce", (_LG, _T, None, -100, "mean", 1.5, 0.0, None)),
    "ce: negative z_loss": ("ce", (_LG, _T, None, -100, "mean", 0.0, -1.0, None)),
    "ce: zero softcap": ("ce", (_LG, _T, None, -100, "mean", 0.0, 0.0, 0.0)),
    "ce: int label_smoothing": ("ce", (_LG, _T, None, -100, "mean", 0, 0.0, None)),
    # linear_cross_entropy_eager(input, weight, target, bias, ii, reduction, ls, z, cap, chunk)
    "lce: weight hidden size": ("lce", (_X, torch.randn(10, 7), _T, None, -100, "mean", 0.0,
                                        0.0, None, None)),
    "lce: weight dtype": ("lce", (_X, torch.randn(10, 8).double(), _T, None, -100, "mean", 0.0,
                                  0.0, None, None)),
    "lce: no classes": ("lce", (_X, torch.randn(0, 8), _T, None, -100, "mean", 0.0, 0.0, None,
                                None)),
    "lce: bias shape": ("lce", (_X, torch.randn(10, 8), _T, torch.randn(9), -100, "mean", 0.0,
                                0.0, None, None)),
    "lce: 3-D input": ("lce", (_X[None], torch.randn(10, 8), _T[None], None, -100, "mean", 0.0,
                               0.0, None, None)),
    "lce: more rows than a chunk": ("lce", (_X, torch.randn(10, 8), _T, None, -100, "mean", 0.0,
                                            0.0, None, 3)),
    "lce: bool chunk_size": ("lce", (_X, torch.randn(10, 8), _T, None, -100, "mean", 0.0, 0.0,
                                     None, True)),
    "lce: no rows": ("lce", (torch.randn(0, 8), torch.randn(10, 8), _T[:0], None, -100, "mean",
                             0.0, 0.0, None, None)),
    # attention_eager(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, cap)
    "attention: 3-D": ("attention", (_Q[0], _Q[0], _Q[0], None, 0.0, False, None, False,
                                     (-1, -1), 0.0)),
    "attention: mask": ("attention", (_Q, _Q, _Q, torch.ones(5, 5, dtype=torch.bool), 0.0,
                                      False, None, False, (-1, -1), 0.0)),
    "attention: dropout": ("attention", (_Q, _Q, _Q, None, 0.1, False, None, False, (-1, -1),
                                         0.0)),
    "attention: heads without gqa": ("attention", (torch.randn(1, 4, 5, 8), _Q, _Q, None, 0.0,
                                                   False, None, False, (-1, -1), 0.0)),
    "attention: heads not a multiple": ("attention", (torch.randn(1, 3, 5, 8), _Q, _Q, None,
                                                      0.0, False, None, True, (-1, -1), 0.0)),
    "attention: head dim": ("attention", (_Q, torch.randn(1, 2, 5, 4), _Q, None, 0.0, False,
                                          None, False, (-1, -1), 0.0)),
    "attention: zero head dim": ("attention", (torch.randn(1, 2, 5, 0),
                                               torch.randn(1, 2, 5, 0), _Q, None, 0.0, False,
                                               None, False, (-1, -1), 0.0)),
    "attention: value length": ("attention", (_Q, _Q, torch.randn(1, 2, 4, 8), None, 0.0,
                                              False, None, False, (-1, -1), 0.0)),
    "attention: batch": ("attention", (_Q, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8),
                                       None, 0.0, False, None, False, (-1, -1), 0.0)),
    "attention: dtype": ("attention", (_Q, _Q.double(), _Q, None, 0.0, False, None, False,
                                       (-1, -1), 0.0)),
    "attention: int is_causal": ("attention", (_Q, _Q, _Q, None, 0.0, 1, None, False, (-1, -1),
                                               0.0)),
    "attention: bool scale": ("attention", (_Q, _Q, _Q, None, 0.0, False, True, False,
                                            (-1, -1), 0.0)),
    "attention: window -2": ("attention", (_Q, _Q, _Q, None, 0.0, False, None, False, (-2, 0),
                                           0.0)),
    "attention: window list": ("attention", (_Q, _Q, _Q, None, 0.0, False, None, False, [1, 0],
                                             0.0)),
    "attention: negative softcap": ("attention", (_Q, _Q, _Q, None, 0.0, False, None, False,
                                                  (-1, -1), -1.0)),
    "attention: bool softcap": ("attention", (_Q, _Q, _Q, None, 0.0, False, None, False,
                                              (-1, -1), True)),
    # gelu_eager(x, approximate)
    "gelu: bad approximate": ("gelu", (_X, "erf")),
    "gelu: integer input": ("gelu", (torch.ones(3, dtype=torch.int32), "none")),
    "gelu: not a tensor": ("gelu", (1.0, "none")),
    # swiglu_eager(x)
    "swiglu: odd last dim": ("swiglu", (torch.randn(4, 7),)),
    "swiglu: 0-dim": ("swiglu", (torch.tensor(1.0),)),
    "swiglu: integer input": ("swiglu", (torch.ones(4, 6, dtype=torch.int64),)),
}


@pytest.mark.parametrize("name", list(_REFUSED))
def test_the_entry_refuses_what_it_does_not_check(name):
    kind, args = _REFUSED[name]
    module, attr = _ENTRIES[kind]
    assert getattr(module, attr)(*args) is None


@pytest.mark.parametrize("kind", ["ce", "lce"])
def test_a_target_out_of_range_raises_the_python_checks_error(kind):
    t = torch.tensor([1, 10, 2, 3])
    with pytest.raises(ValueError, match=r"target values must be in \[0, 10\) or equal "
                                         r"ignore_index=-100, got 10"):
        if kind == "ce":
            llmcore.cross_entropy(_LG, t, backend="native")
        else:
            llmcore.linear_cross_entropy(_X, torch.randn(10, 8), t, backend="native")


@pytest.mark.parametrize("classes,dtype", [(10, torch.float32), (65536, torch.float32),
                                           (65536, torch.bfloat16), (40000, torch.float64)])
def test_the_entry_takes_exactly_the_calls_whose_rows_fit_one_default_chunk(classes, dtype):
    # the C++ entry's copy of default_chunk_size's rule (CPU tensors): one row more than a
    # default chunk is refused (the chunk loop's business); a whole chunk is taken when small
    rows = ce_ops.default_chunk_size(1 << 30, classes, dtype.itemsize, device="cpu")
    entry = getattr(*_ENTRIES["lce"])
    w = torch.randn(classes, 2, dtype=dtype)

    def call(n):
        return entry(torch.randn(n, 2, dtype=dtype), w, torch.zeros(n, dtype=torch.long), None,
                     -100, "mean", 0.0, 0.0, None, None)
    assert call(rows + 1) is None
    if rows * classes <= 1 << 16:                 # cheap enough to run here
        assert call(rows) is not None
