"""Shared test helpers: the oracle tolerance rule and the backends to parametrise over.

Rule (from flash-attention's tests): an implementation's error against the float64 oracle may
be at most 2x the error of eager PyTorch in the same dtype, plus a small atol.

A module of its own (not conftest.py, which sub-folders also have) so that test files can
import it by a unique name.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()


def default_atol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3,
            torch.bfloat16: 1e-2}[dtype]


def assert_close_to_oracle(out, eager, oracle, *, atol=None, factor=2.0, name="output"):
    """|out - oracle| <= factor * max|eager - oracle| + atol, elementwise max.

    `out` is the implementation under test, `eager` eager PyTorch in the same dtype, `oracle`
    the float64 result. On failure reports the worst index and the three values there."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != eager's {eager.dtype}"
    if atol is None:
        atol = default_atol(out.dtype)
    o64, e64, r64 = out.double(), eager.double(), oracle.double()
    if out.numel() == 0:
        return
    # non-finite values must agree exactly in position and value: nan where the oracle has nan,
    # the same signed inf where it has inf (any mix of the two)
    fin = torch.isfinite(r64)
    assert torch.equal(torch.isfinite(o64), fin), f"{name}: non-finite pattern differs from oracle"
    o_nf, r_nf = o64[~fin], r64[~fin]
    assert bool(((o_nf == r_nf) | (torch.isnan(o_nf) & torch.isnan(r_nf))).all()), \
        f"{name}: non-finite values differ"
    err = (o64 - r64).abs().where(fin, torch.zeros_like(o64))
    # eager's error only where eager is finite too: a non-finite eager value must not loosen the
    # bound to inf/nan (where eager fails and the oracle is finite, `out` is still held to the
    # bound set by eager's finite positions)
    both = fin & torch.isfinite(e64)
    eager_err = (e64 - r64).abs().where(both, torch.zeros_like(e64)).max().item()
    bound = factor * eager_err + atol
    worst = err.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max error {worst:.3e} > bound {bound:.3e} (eager error {eager_err:.3e}); "
            f"worst at {idx}: got {o64[idx].item():.6g}, eager {e64[idx].item():.6g}, "
            f"oracle {r64[idx].item():.6g}"
        )


def assert_compiled_grad_matches(f, x) -> None:
    """f (a scalar function of x) under torch.compile(fullgraph=True, aot_eager) gives the
    gradient of x that the eager f gives: the ops trace as one graph with their autograd."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x), x)[0]
    want = torch.autograd.grad(f(x), x)[0]
    torch.testing.assert_close(got, want)


def kernel_backends(family: str, device: str = "cpu") -> list[str]:
    """Backends whose kernels for `family` can run on `device` here (triton on the CPU through
    the interpreter). Tests parametrise over these so every backend meets the same suite."""
    from llmcore import backends

    return [name for name in backends.IMPLEMENTED[family]
            if backends._why_not(family, name, device) is None]


class OpLog(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher below autograd while active
    (`with OpLog() as log: ...; log.ops`): what an eager call really does, kernel by kernel."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing. Under the interpreter
    kernels run on torch ops of their own, which would drown a host path's ops in an OpLog."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_kernels(monkeypatch, family: str) -> None:
    """Replaces every @triton.jit kernel of llmcore.kernels.triton.<family> by NoLaunch."""
    import importlib

    mod = importlib.import_module(f"llmcore.kernels.triton.{family}")
    for name, obj in list(vars(mod).items()):
        if hasattr(obj, "run") and hasattr(obj, "__getitem__"):
            monkeypatch.setattr(mod, name, NoLaunch())


class HostSyncLog(TorchDispatchMode):
    """Records the ops that make the host wait for the device on CUDA, whatever device runs:
    reading a value (`.item()`, `bool(t)`, `int(t)`), ops whose output size depends on the
    values (nonzero, masked_select, unique, bincount, repeat_interleave without output_size,
    indexing with a bool mask) and `torch.equal`. A CPU run of a code path under this mode shows
    whether the same path on CUDA would sync (`with HostSyncLog() as log: ...; log.syncs`)."""

    SYNCS = {"_local_scalar_dense", "nonzero", "nonzero_numpy",
             "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
             "unique_dim_consecutive", "bincount", "equal", "is_nonzero"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if name in self.SYNCS:
            self.syncs.append(name)
        elif name == "repeat_interleave" and isinstance(args[0], torch.Tensor) \
                and len(args) == 1 and kwargs.get("output_size") is None:
            self.syncs.append(name)
        elif name in self.INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] if len(args) > 1 else ()) or ()):
            self.syncs.append(f"{name} with a bool mask")
        return func(*args, **kwargs)
