"""rope: rotary position embedding of queries and keys in one call, and backend dispatch.

    q, k = llmcore.rope(q, k, cos, sin)

q (..., Hq, D) and k (..., Hkv, D) with the same leading dims (a dense (B, N, H, D) batch or
packed (T, H, D) tokens, as flash_attn_func / flash_attn_varlen_func take them); cos and sin
the per-position tables, (*rows, D) or (*rows, 1, D) where `rows` are the trailing leading dims
of q (e.g. (N, D) for a dense batch, (T, 1, D) packed). Half-split convention (Llama / Hugging
Face): y = x cos + rotate_half(x) sin, rotate_half(x1, x2) = (-x2, x1). Returns new tensors in
q's and k's dtype, computed in float32 and rounded once (what the eager formula gives with
float32 tables). The tables get no gradient on the kernel backends (they are functions of the
positions); tables that require one are refused there.

Eager, the formula above costs ~6 elementwise kernels per tensor forward (with float32
intermediates of q and k's size) and more backward; the Triton kernel is one launch for q and
k together each way, reading x once and writing y once.
"""
from __future__ import annotations

import torch

from llmcore import backends
from llmcore.ops import _checks


def _check(q, k, cos, sin) -> tuple[int, ...]:
    """-> rows: the shape of the table rows, a suffix of q's leading dims."""
    for name, t in (("q", q), ("k", k)):
        _checks.floating(name, t)
        if t.dim() < 3:
            raise ValueError(f"{name} must be (..., heads, head_dim) with at least one leading "
                             f"(token) dim, got shape {tuple(t.shape)}")
    _checks.same_dtype("k", k, q, "q")
    _checks.same_device("k", k, q, "q")
    lead, d = tuple(q.shape[:-2]), q.shape[-1]
    if tuple(k.shape[:-2]) != lead or k.shape[-1] != d:
        raise ValueError(f"k must be (*{lead}, heads, {d}) like q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if d % 2:
        raise ValueError(f"the head dim must be even (rotate_half splits it in two), got {d}")

    def suffix(r):                # a non-empty run of q's trailing leading dims
        return 0 < len(r) <= len(lead) and r == lead[len(lead) - len(r):]

    rows = None
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.floating(name, t)
        _checks.same_device(name, t, q, "q")
        shape = tuple(t.shape)
        r = shape[:-1]
        if not suffix(r) and r[-1:] == (1,):
            r = r[:-1]                                        # (*rows, 1, D): a head axis
        if not shape or shape[-1] != d or not suffix(r):
            raise ValueError(f"{name} must have shape (*rows, {d}) or (*rows, 1, {d}) with rows "
                             f"the trailing leading dims of q {lead} (e.g. ({lead[-1]}, {d})), "
                             f"got {shape}")
        if rows is not None and r != rows:
            raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {shape}")
        rows = r
    return rows


def rope(q, k, cos, sin, *, backend="auto"):
    """(q rotated, k rotated); see the module docstring."""
    rows = _check(q, k, cos, sin)
    name = backends.resolve("rope", backend, q.device)
    impl = _ROPE.get(name)
    if impl is None:              # "native" from a build of llmcore._native older than rope
        raise backends.BackendUnavailableError(
            "this build of llmcore._native has no rope kernel; rebuild it (pip install -e .)")
    return impl(q, k, cos, sin, rows)


def _torch_rope(q, k, cos, sin, rows):
    # the formula, in the promoted dtype of x and the tables, rounded to x's dtype
    shape = (*rows, 1, q.shape[-1])
    cos, sin = cos.reshape(shape), sin.reshape(shape)

    def one(x):
        x1, x2 = x.chunk(2, dim=-1)
        return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    return one(q), one(k)


# ---------------------------------------------------------------------------- kernel backends
# One autograd for both kernel backends: a launch (q, k, cos, sin, backward) -> (q', k') rotates
# the gradients too (backward=True: the transposed rotation). Eager calls go through _Rope, a
# plain autograd.Function that launches directly; under torch.compile each backend's registered
# op (llmcore_triton::rope, a custom op; llmcore::rope_rotate from the C++ extension) with a
# fake impl and this same backward as its autograd. The kernels take (T, H, D) views with a unit
# stride on D and (R, D) tables in which token t uses row t % R.

def _rope_save(ctx, q, k, cos, sin):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cos, sin)
    ctx.q_shape, ctx.k_shape, ctx.dtype = q.shape, k.shape, q.dtype


def _rope_grads(ctx, gq, gk, launch):
    """(dq, dk): the gradients rotated back; an absent one counts as zeros."""
    if gq is None and gk is None:
        return None, None
    cos, sin = ctx.saved_tensors
    gq = torch.zeros(ctx.q_shape, device=cos.device, dtype=ctx.dtype) if gq is None else gq
    gk = torch.zeros(ctx.k_shape, device=cos.device, dtype=ctx.dtype) if gk is None else gk
    gq, gk = (g if g.stride(-1) == 1 else g.contiguous() for g in (gq, gk))
    return launch(gq, gk, cos, sin, True)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, launch):
        _rope_save(ctx, q, k, cos, sin)
        ctx.launch = launch
        return launch(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, gq, gk):
        return (*_rope_grads(ctx, gq, gk, ctx.launch), None, None, None)


def _op_setup(ctx, inputs, output):
    _rope_save(ctx, *inputs[:4])


def _op_fake(q, k, cos, sin, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)             # contiguous, as the kernels


def _kernel_rope(q, k, cos, sin, backend, launch, op):
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(f"cos and sin get no gradient from the {backend} rope kernels (they "
                         f"are tables of the positions): detach them, or use backend='torch'")
    d = q.shape[-1]
    # (T, H, D) views with a unit stride on D (copies only for other layouts), (R, D) tables
    q3, k3 = (t.reshape(-1, *t.shape[-2:]) for t in (q, k))
    q3, k3 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q3, k3))
    cos2, sin2 = (t.reshape(-1, d) for t in (cos, sin))
    if torch.compiler.is_compiling():
        yq, yk = op(q3, k3, cos2, sin2, False)
    else:
        yq, yk = _Rope.apply(q3, k3, cos2, sin2, launch)
    return yq.view(q.shape), yk.view(k.shape)


# triton: kernels imported on first use (importing llmcore never imports triton)
def _triton_launch(q, k, cos, sin, backward):
    from llmcore.kernels.triton import rope as kernels
    return kernels.rotary(q, k, cos.contiguous(), sin.contiguous(), backward=backward)


@torch.library.custom_op("llmcore_triton::rope", mutates_args=())
def _triton_rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_launch(q, k, cos, sin, backward)


_triton_rope_op.register_fake(_op_fake)
_triton_rope_op.register_autograd(
    lambda ctx, gq, gk: (*_rope_grads(ctx, gq, gk, _triton_rope_op), None, None, None),
    setup_context=_op_setup)


def _triton_rope(q, k, cos, sin, rows):
    return _kernel_rope(q, k, cos, sin, "triton", _triton_launch, _triton_rope_op)


# native: llmcore::rope_rotate (csrc/torch/rope_ops.cpp, CPU), its fake and autograd
# registered here when the extension is loaded (an older build without it: no native rope)
def _native_launch(q, k, cos, sin, backward):
    return torch.ops.llmcore.rope_rotate.default(q, k, cos, sin, backward)


def _native_rope(q, k, cos, sin, rows):
    return _kernel_rope(q, k, cos, sin, "native", _native_launch, _native_launch)


def _register_native() -> bool:
    if backends.native_module() is None or not hasattr(torch.ops.llmcore, "rope_rotate"):
        return False
    torch.library.register_fake("llmcore::rope_rotate")(_op_fake)
    torch.library.register_autograd(
        "llmcore::rope_rotate",
        lambda ctx, gq, gk: (*_rope_grads(ctx, gq, gk, _native_launch), None, None, None),
        setup_context=_op_setup)
    return True


_ROPE = {"torch": _torch_rope, "triton": _triton_rope}
if _register_native():
    _ROPE["native"] = _native_rope
