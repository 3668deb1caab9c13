"""Bad input to every public op, on every backend that runs here: a ValueError / TypeError whose
message names the argument and what was expected, raised before any kernel is launched.

"Before any kernel" is checked, not assumed: for argument errors the backend's implementation in
the op's dispatch table is replaced by a sentinel that fails the test if it is ever reached.
Backend-specific limits (the Triton kernels' row size and head dim) are raised inside the
backend, before its launcher runs; those cases run without the sentinel.
"""
import re

import pytest
import torch

import llmcore
from llmcore_testing import kernel_backends
from llmcore.ops import attention as attention_ops
from llmcore.ops import cross_entropy as ce_ops
from llmcore.ops import norm as norm_ops

META = "meta"  # a second device that exists on every machine: device mismatches without a GPU


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------- cases
# (id, call(backend), exception type, words the message must contain)

def _ln(**kw):
    args = dict(input=_x(3, 8), normalized_shape=8)
    args.update(kw)
    return lambda be: llmcore.layer_norm(**args, backend=be)


def _rms(**kw):
    args = dict(input=_x(3, 8), normalized_shape=8)
    args.update(kw)
    return lambda be: llmcore.rms_norm(**args, backend=be)


NORM_CASES = [
    ("ln-int-input", _ln(input=torch.ones(3, 8, dtype=torch.int32)), TypeError,
     "input must be a floating-point tensor"),
    ("rms-bool-input", _rms(input=torch.ones(3, 8, dtype=torch.bool)), TypeError,
     "input must be a floating-point tensor"),
    ("ln-fp8-input", _ln(input=_x(3, 8).to(torch.float8_e4m3fn)), TypeError,
     "input must be a floating-point tensor"),
    ("rms-list-input", _rms(input=[[1.0] * 8]), TypeError, "input must be a torch.Tensor"),
    ("ln-normalized-shape", _ln(normalized_shape=7), ValueError,
     "normalized_shape (7,) must equal the trailing dims of input"),
    ("rms-normalized-shape-str", _rms(normalized_shape="8"), TypeError,
     "normalized_shape must be an int or a sequence of ints"),
    ("ln-weight-shape", _ln(weight=_x(7)), ValueError, "weight must have shape (8,), got (7,)"),
    ("rms-weight-shape", _rms(weight=_x(1, 8)), ValueError, "weight must have shape (8,)"),
    ("ln-bias-shape", _ln(bias=_x(9)), ValueError, "bias must have shape (8,), got (9,)"),
    ("ln-weight-int", _ln(weight=torch.ones(8, dtype=torch.int64)), TypeError,
     "weight must be a floating-point tensor"),
    ("ln-residual-shape", _ln(residual=_x(3, 9)), ValueError,
     "residual must have shape (3, 8), got (3, 9)"),
    ("rms-residual-dtype", _rms(residual=_x(3, 8, dtype=torch.float64)), TypeError,
     "residual must have input's dtype torch.float32"),
    ("ln-weight-device", _ln(weight=_x(8, device=META)), ValueError,
     "weight must be on input's device cpu"),
    ("ln-bias-device", _ln(bias=_x(8, device=META)), ValueError, "bias must be on input's device"),
    ("rms-residual-device", _rms(residual=_x(3, 8, device=META)), ValueError,
     "residual must be on input's device"),
    ("ln-weight-dtype", _ln(weight=_x(8, dtype=torch.bfloat16)), TypeError, "weight"),
    ("ln-eps-negative", _ln(eps=-1.0), ValueError, "eps"),
]


def _ce(**kw):
    args = dict(input=_x(3, 7), target=torch.tensor([1, 6, 0]))
    args.update(kw)
    return lambda be: llmcore.cross_entropy(**args, backend=be)


def _lce(**kw):
    args = dict(input=_x(5, 4), weight=_x(7, 4), target=torch.tensor([0, 1, 2, 3, 6]))
    args.update(kw)
    return lambda be: llmcore.linear_cross_entropy(**args, backend=be)


CE_CASES = [
    ("ce-int-input", _ce(input=torch.ones(3, 7, dtype=torch.int64)), TypeError,
     "input must be a floating-point tensor"),
    ("ce-fp8-input", _ce(input=_x(3, 7).to(torch.float8_e5m2)), TypeError,
     "input must be a floating-point tensor"),
    ("ce-0dim-input", _ce(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError,
     "input must be (C,), (N, C) or (N, C, d1, ...)"),
    ("ce-float-target", _ce(target=torch.tensor([1.0, 6.0, 0.0])), TypeError,
     "target must be an integer tensor"),
    ("ce-bool-target", _ce(target=torch.tensor([True, False, True])), TypeError,
     "target must be an integer tensor"),
    ("ce-probability-target", _ce(target=_x(3, 7).softmax(-1)), TypeError,
     "class-probability targets"),
    ("ce-target-shape", _ce(target=torch.tensor([1, 6])), ValueError,
     "target must have shape (3,), got (2,)"),
    ("ce-target-too-big", _ce(target=torch.tensor([1, 7, 0])), ValueError,
     "target values must be in [0, 7) or equal ignore_index=-100, got 7"),
    ("ce-target-negative", _ce(target=torch.tensor([1, -1, 0])), ValueError,
     "target values must be in [0, 7) or equal ignore_index=-100, got -1"),
    ("ce-target-other-ignore", _ce(target=torch.tensor([1, -100, 0]), ignore_index=3), ValueError,
     "target values must be in [0, 7) or equal ignore_index=3, got -100"),
    ("ce-target-device", _ce(target=torch.tensor([1, 6, 0], device=META)), ValueError,
     "target must be on input's device cpu"),
    ("ce-weight-shape", _ce(weight=torch.ones(6)), ValueError, "weight must have shape (7,)"),
    ("ce-weight-dtype", _ce(weight=torch.ones(7, dtype=torch.float64)), TypeError,
     "weight must have input's dtype torch.float32"),
    ("ce-weight-device", _ce(weight=torch.ones(7, device=META)), ValueError,
     "weight must be on input's device"),
    ("ce-weight-int", _ce(weight=torch.ones(7, dtype=torch.int64)), TypeError,
     "weight must be a floating-point tensor"),
    ("ce-reduction", _ce(reduction="avg"), ValueError, "reduction must be one of"),
    ("ce-label-smoothing", _ce(label_smoothing=1.5), ValueError,
     "label_smoothing must be a float in [0, 1]"),
    ("ce-z-loss", _ce(z_loss=-1e-4), ValueError, "z_loss must be a float >= 0"),
    ("ce-softcap", _ce(softcap=0.0), ValueError, "softcap must be None or a float > 0"),
    ("ce-ignore-index", _ce(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("lce-int-input", _lce(input=torch.ones(5, 4, dtype=torch.int32)), TypeError,
     "input must be a floating-point tensor"),
    ("lce-weight-hidden", _lce(weight=_x(7, 3)), ValueError,
     "weight must have shape (V, 4) with V >= 1"),
    ("lce-weight-1d", _lce(weight=_x(4)), ValueError, "weight must have shape (V, 4)"),
    ("lce-weight-empty-vocab", _lce(weight=_x(0, 4), target=torch.full((5,), -100)), ValueError,
     "weight must have shape (V, 4) with V >= 1"),
    ("lce-weight-dtype", _lce(weight=_x(7, 4, dtype=torch.float16)), TypeError,
     "weight must have input's dtype torch.float32"),
    ("lce-weight-device", _lce(weight=_x(7, 4, device=META)), ValueError,
     "weight must be on input's device"),
    ("lce-bias-shape", _lce(bias=_x(6)), ValueError, "bias must have shape (7,), got (6,)"),
    ("lce-bias-device", _lce(bias=_x(7, device=META)), ValueError,
     "bias must be on input's device"),
    ("lce-target-shape", _lce(target=torch.tensor([0, 1, 2, 3])), ValueError,
     "target must have shape (5,), got (4,)"),
    ("lce-target-range", _lce(target=torch.tensor([0, 1, 2, 3, 7])), ValueError,
     "target values must be in [0, 7)"),
    ("lce-target-float", _lce(target=torch.zeros(5)), TypeError,
     "target must be an integer tensor"),
    ("lce-chunk-size", _lce(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
    ("lce-chunk-size-float", _lce(chunk_size=2.0), ValueError, "chunk_size"),
    ("lce-reduction", _lce(reduction=None), ValueError, "reduction must be one of"),
]


def _attn(**kw):
    args = dict(query=_x(2, 4, 5, 8), key=_x(2, 2, 6, 8), value=_x(2, 2, 6, 8), enable_gqa=True)
    args.update(kw)
    return lambda be: llmcore.attention(**args, backend=be)


def _fa(**kw):
    args = dict(q=_x(2, 5, 4, 8), k=_x(2, 6, 2, 8), v=_x(2, 6, 2, 8))
    args.update(kw)
    return lambda be: llmcore.flash_attn_func(**args, backend=be)


_CU_Q = torch.tensor([0, 3, 7], dtype=torch.int32)
_CU_K = torch.tensor([0, 4, 9], dtype=torch.int32)


def _vl(**kw):
    args = dict(q=_x(7, 4, 8), k=_x(9, 2, 8), v=_x(9, 2, 8), cu_seqlens_q=_CU_Q,
                cu_seqlens_k=_CU_K, max_seqlen_q=4, max_seqlen_k=5)
    args.update(kw)
    return lambda be: llmcore.flash_attn_varlen_func(**args, backend=be)


ATTENTION_CASES = [
    ("attn-int-query", _attn(query=torch.ones(2, 4, 5, 8, dtype=torch.int64)), TypeError,
     "query must be a floating-point tensor"),
    ("attn-fp8-key", _attn(key=_x(2, 2, 6, 8).to(torch.float8_e4m3fn)), TypeError,
     "key must be a floating-point tensor"),
    ("attn-key-dtype", _attn(key=_x(2, 2, 6, 8, dtype=torch.float64)), TypeError,
     "key must have query's dtype torch.float32"),
    ("attn-value-dtype", _attn(value=_x(2, 2, 6, 8, dtype=torch.bfloat16)), TypeError,
     "value must have query's dtype"),
    ("attn-key-device", _attn(key=_x(2, 2, 6, 8, device=META)), ValueError,
     "key must be on query's device cpu"),
    ("attn-value-device", _attn(value=_x(2, 2, 6, 8, device=META)), ValueError,
     "value must be on query's device"),
    ("attn-2d-query", _attn(query=_x(5, 8), key=_x(6, 8), value=_x(6, 8)), ValueError,
     "query must be at least 3-dimensional"),
    ("attn-ndim-mismatch", _attn(key=_x(2, 6, 8)), ValueError, "key must be 4-dimensional"),
    ("attn-batch-dims", _attn(key=_x(3, 2, 6, 8), value=_x(3, 2, 6, 8)), ValueError,
     "key must have query's batch dims (2,)"),
    ("attn-gqa-flag", _attn(enable_gqa=False), ValueError, "pass enable_gqa=True"),
    ("attn-gqa-divisible", _attn(query=_x(2, 3, 5, 8)), ValueError,
     "query's number of heads (3) must be a multiple of key's (2)"),
    ("attn-value-heads", _attn(value=_x(2, 1, 6, 8)), ValueError,
     "value must have key's number of heads 2, got 1"),
    ("attn-head-dim", _attn(key=_x(2, 2, 6, 7)), ValueError,
     "key's head dim (last dim) must equal query's 8, got 7"),
    ("attn-value-length", _attn(value=_x(2, 2, 5, 8)), ValueError,
     "value must have key's sequence length 6"),
    ("attn-mask-shape", _attn(attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError,
     "attn_mask must be broadcastable to (..., Hq, Nq, Nk) = (2, 4, 5, 6), got shape (5, 5)"),
    ("attn-mask-dtype", _attn(attn_mask=torch.zeros(5, 6, dtype=torch.float64)), TypeError,
     "attn_mask must be bool or query's dtype torch.float32"),
    ("attn-mask-int", _attn(attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError,
     "attn_mask must be bool or query's dtype"),
    ("attn-mask-device", _attn(attn_mask=torch.ones(5, 6, dtype=torch.bool, device=META)),
     ValueError, "attn_mask must be on query's device"),
    ("attn-mask-list", _attn(attn_mask=[[True] * 6] * 5), TypeError,
     "attn_mask must be a torch.Tensor"),
    ("attn-window", _attn(window_size=(3,)), ValueError,
     "window_size must be a pair (left, right)"),
    ("attn-window-negative", _attn(window_size=(-2, 0)), ValueError, "ints >= -1"),
    ("attn-dropout", _attn(dropout_p=1.0), ValueError, "dropout_p must be a float in [0, 1)"),
    ("attn-softcap", _attn(softcap=-1.0), ValueError, "softcap must be a float >= 0"),
    ("attn-scale-type", _attn(scale="0.1"), TypeError, "scale must be None or a float"),
    ("attn-head-dim-zero", _attn(query=_x(2, 4, 5, 0), key=_x(2, 2, 6, 0)), ValueError,
     "head dim"),
    ("fa-3d-q", _fa(q=_x(5, 4, 8)), ValueError, "q must be 4-dimensional, got shape (5, 4, 8)"),
    ("fa-batch", _fa(k=_x(1, 6, 2, 8), v=_x(1, 6, 2, 8)), ValueError,
     "k and v must have q's batch size 2, got 1 and 1"),
    ("fa-gqa-divisible", _fa(q=_x(2, 5, 3, 8)), ValueError,
     "q's number of heads (3) must be a multiple of k's (2)"),
    ("fa-head-dim", _fa(k=_x(2, 6, 2, 16)), ValueError, "k's head dim (last dim) must equal q's 8"),
    ("fa-v-length", _fa(v=_x(2, 7, 2, 8)), ValueError, "v must have k's sequence length 6"),
    ("fa-k-dtype", _fa(k=_x(2, 6, 2, 8, dtype=torch.float16)), TypeError,
     "k must have q's dtype torch.float32"),
    ("fa-v-device", _fa(v=_x(2, 6, 2, 8, device=META)), ValueError, "v must be on q's device"),
    ("fa-alibi-shape", _fa(alibi_slopes=torch.ones(3)), ValueError,
     "alibi_slopes must have shape (4,) or (2, 4), got (3,)"),
    ("fa-alibi-int", _fa(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError,
     "alibi_slopes must be a floating-point tensor"),
    ("fa-alibi-device", _fa(alibi_slopes=torch.ones(4, device=META)), ValueError,
     "alibi_slopes must be on q's device"),
    ("fa-softmax-scale", _fa(softmax_scale=True), TypeError,
     "softmax_scale must be None or a float"),
    ("fa-window", _fa(window_size=(1.5, 0)), ValueError, "window_size must be a pair"),
    ("vl-4d-q", _vl(q=_x(1, 7, 4, 8)), ValueError, "q must be 3-dimensional"),
    ("vl-v-length", _vl(v=_x(8, 2, 8)), ValueError, "v must have k's packed length 9"),
    ("vl-cu-float", _vl(cu_seqlens_q=_CU_Q.float()), TypeError,
     "cu_seqlens_q must be an integer tensor"),
    ("vl-cu-2d", _vl(cu_seqlens_k=_CU_K[None]), ValueError,
     "cu_seqlens_k must be 1-D of length batch + 1"),
    ("vl-cu-empty", _vl(cu_seqlens_q=_CU_Q[:0]), ValueError, "cu_seqlens_q must be 1-D"),
    ("vl-cu-length", _vl(cu_seqlens_k=_CU_K[:2]), ValueError,
     "cu_seqlens_k must have cu_seqlens_q's length (batch + 1 = 3), got 2"),
    ("vl-cu-end", _vl(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must start at 0, be non-decreasing and end at the packed length 7"),
    ("vl-cu-start", _vl(cu_seqlens_k=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must start at 0"),
    ("vl-cu-decreasing", _vl(cu_seqlens_q=torch.tensor([0, 5, 3, 7], dtype=torch.int32),
                             cu_seqlens_k=torch.tensor([0, 4, 4, 9], dtype=torch.int32),
                             max_seqlen_q=5),
     ValueError, "be non-decreasing"),
    ("vl-cu-device", _vl(cu_seqlens_q=_CU_Q.to(META)), ValueError,
     "cu_seqlens_q must be on q's device"),
    ("vl-max-seqlen-small", _vl(max_seqlen_k=4), ValueError,
     "max_seqlen_k must be >= the longest sequence in cu_seqlens_k (5), got 4"),
    ("vl-max-seqlen-negative", _vl(max_seqlen_q=-1), ValueError,
     "max_seqlen_q must be an int >= 0"),
    ("vl-max-seqlen-float", _vl(max_seqlen_q=4.0), ValueError, "max_seqlen_q must be an int"),
    ("vl-alibi-batch", _vl(alibi_slopes=torch.ones(3, 4)), ValueError,
     "alibi_slopes must have shape (4,) or (2, 4), got (3, 4)"),
]

# Known bugs, each a strict xfail so that the fix shows up: (case id, backend or None = all) ->
# reason. Listed in the reliability report for the owners.
KNOWN: dict = {}


def _params(cases, family):
    out = []
    for case in cases:
        for backend in kernel_backends(family):
            reason = KNOWN.get((case[0], backend)) or KNOWN.get((case[0], None))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(case, backend, marks=marks, id=f"{case[0]}-{backend}"))
    return out


def _sentinel(*args, **kwargs):
    raise AssertionError("a kernel backend was reached: the input was not validated first")


@pytest.fixture
def no_kernel(monkeypatch):
    """Replaces every backend implementation with the sentinel."""
    def install(backend):
        for table in (norm_ops._LAYER_NORM, norm_ops._RMS_NORM, ce_ops._CROSS_ENTROPY,
                      ce_ops._LINEAR_CROSS_ENTROPY, attention_ops._CORE):
            if backend in table:
                monkeypatch.setitem(table, backend, _sentinel)
    return install


def _expect(case, backend):
    _, call, exc, words = case
    with pytest.raises(exc, match=re.escape(words)):
        call(backend)


@pytest.mark.parametrize("case,backend", _params(NORM_CASES, "norm"))
def test_norm_bad_input(case, backend, no_kernel):
    no_kernel(backend)
    _expect(case, backend)


@pytest.mark.parametrize("case,backend", _params(CE_CASES, "cross_entropy"))
def test_cross_entropy_bad_input(case, backend, no_kernel):
    no_kernel(backend)
    _expect(case, backend)


@pytest.mark.parametrize("case,backend", _params(ATTENTION_CASES, "attention"))
def test_attention_bad_input(case, backend, no_kernel):
    no_kernel(backend)
    _expect(case, backend)


def test_sentinel_catches_a_dispatch(no_kernel):
    """The sentinel itself works: valid input reaches it."""
    no_kernel("torch")
    with pytest.raises(AssertionError, match="kernel backend was reached"):
        llmcore.layer_norm(_x(2, 4), 4, backend="torch")


@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
def test_target_range_error_names_the_bad_value_even_when_ignored_present(backend):
    # a valid ignore_index in the batch does not hide an out-of-range target next to it
    t = torch.tensor([-100, 3, 99, -100])
    with pytest.raises(ValueError, match=r"target values must be in \[0, 11\).*got 99"):
        llmcore.cross_entropy(_x(4, 11), t, backend=backend)
