"""The eager dispatch path of every kernel backend: lean (no placeholder work) and equal to the
registered ops that torch.compile sees.

Eager calls run a thin autograd path (a Python autograd.Function over the Triton launchers; C++
autograd for the native ops); torch.compile traces the torch.library ops. Both share one
backward per family. Here: the two paths give bit-identical outputs and gradients, and an
eager fwd+bwd dispatches no zero-fill, no reduction or dtype conversion of placeholder
gradients, and no extra ops for outputs nobody differentiates."""
from __future__ import annotations

import pytest
import torch

import llmcore
from llmcore_testing import OpLog, kernel_backends, stub_triton_kernels


_WASTE = {"aten.fill_", "aten.zero_", "aten.zeros", "aten.zeros_like", "aten.sum",
          "aten._to_copy", "aten.copy_", "aten.clone", "aten.new_zeros"}


def _leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("backend", [b for b in kernel_backends("norm") if b != "torch"])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_fwd_bwd_dispatches_no_placeholder_work(backend, residual, monkeypatch):
    if backend == "triton":
        stub_triton_kernels(monkeypatch, "norm")  # the host path alone (values are garbage)
    x, w, b, r = _leaves((6, 40), (40,), (40,), (6, 40))
    dy = torch.randn(6, 40)
    with OpLog() as log:
        out = llmcore.layer_norm(x, 40, w, b, residual=r if residual else None, backend=backend)
        y = out[0] if residual else out
        y.backward(dy)              # h unused: its gradient is never materialised
    ops = list(log.ops)
    if residual and ops.count("aten.copy_") == 1:
        # x and residual share one gradient tensor: autograd copies it once so that x.grad and
        # residual.grad are distinct tensors (eager x + residual does the same)
        ops.remove("aten.copy_")
    waste = sorted(set(ops) & _WASTE)
    assert not waste, f"{backend}: placeholder work dispatched: {waste} in {log.ops}"
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert (r.grad is not None) == residual


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_triton_norm_eager_path_equals_the_registered_op(kind, residual):
    if "triton" not in kernel_backends("norm"):
        pytest.skip("triton cannot run here")
    from llmcore.ops import norm as ops

    x, w, b, r = _leaves((5, 33), (33,), (33,), (5, 33))
    dy, dh = torch.randn(5, 33), torch.randn(5, 33)
    rms = kind == "rms"
    bias = None if rms else b
    res = r if residual else None
    leaves = [x, w] + ([] if rms else [b]) + ([r] if residual else [])

    y1, h1 = ops._TritonNorm.apply(x, res, w, bias, 1e-5, rms)                  # eager path
    y2, h2, _mean, _rstd = ops._triton_norm_fwd(x, res, w, bias, 1e-5, rms)    # compile path
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    outs1, outs2 = [(y1, dy)], [(y2, dy)]
    if residual:
        torch.testing.assert_close(h1, h2, rtol=0, atol=0)
        outs1.append((h1, dh))
        outs2.append((h2, dh))
    g1 = torch.autograd.grad([o for o, _ in outs1], leaves, [g for _, g in outs1])
    g2 = torch.autograd.grad([o for o, _ in outs2], leaves, [g for _, g in outs2])
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_triton_attention_eager_path_equals_the_registered_op(with_mask):
    if "triton" not in kernel_backends("attention"):
        pytest.skip("triton cannot run here")
    from llmcore.ops import attention as ops

    q, k, v = _leaves((1, 2, 19, 16), (1, 1, 23, 16), (1, 1, 23, 16))
    mask = torch.randn(1, 1, 19, 23, requires_grad=True) if with_mask else None
    args = (q, k, v, mask, None, None, None, None, [0.25, 0.0, 0.0], [-1, 0, 1, 0, 0, 1])
    out1, lse1 = ops._TritonAttention.apply(*args)
    out2, lse2 = ops._triton_attention_fwd(*args)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.testing.assert_close(lse1, lse2, rtol=0, atol=0)
    assert not lse1.requires_grad                                     # lse has no gradient
    leaves = [q, k, v] + ([mask] if with_mask else [])
    go = torch.randn_like(out1)
    for a, e in zip(torch.autograd.grad(out1, leaves, go), torch.autograd.grad(out2, leaves, go)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_native_attention_has_its_autograd_in_cpp():
    if "native" not in kernel_backends("attention"):
        pytest.skip("llmcore._native is not built")
    q, k, v = _leaves((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8))
    out = llmcore.attention(q, k, v, is_causal=True, backend="native")
    # a C++ autograd node (torch::autograd::CppNode), not a Python Function's BackwardCFunction;
    # the output is a (B, Hq, Nq, Dv) view of (B, Nq, Hq, Dv) memory, so it may sit behind a view
    node, names = out.grad_fn, []
    while node is not None and len(names) < 3:
        names.append(node.name())
        node = node.next_functions[0][0] if node.next_functions else None
    assert any("CppNode" in n and "AttentionFunction" in n for n in names), names


def test_native_norm_has_its_autograd_in_cpp():
    if "native" not in kernel_backends("norm"):
        pytest.skip("llmcore._native is not built")
    x, w = _leaves((3, 8), (8,))
    y = llmcore.rms_norm(x, 8, w, backend="native")
    assert "CppNode" in y.grad_fn.name() and "NormFunction" in y.grad_fn.name(), y.grad_fn.name()


@pytest.mark.parametrize("op", ["gelu", "swiglu"])
def test_native_activations_have_their_autograd_in_cpp(op):
    if "native" not in kernel_backends(op):
        pytest.skip("llmcore._native is not built")
    x, = _leaves((3, 5, 8))
    y = llmcore.gelu(x, backend="native") if op == "gelu" else llmcore.swiglu(x, backend="native")
    name = "GeluFunction" if op == "gelu" else "SwigluFunction"
    assert "CppNode" in y.grad_fn.name() and name in y.grad_fn.name(), y.grad_fn.name()
