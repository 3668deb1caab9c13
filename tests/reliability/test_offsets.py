"""Index arithmetic past 2**31 elements, for real: the kernels read views whose row, column or
sequence stride puts an element at an offset above 2**31 (int32 would wrap to a negative
offset), and the results must match the float64 oracle.

How this fits in a small machine: the views live in a float16 buffer of 2**31 + 200 elements
(4 GiB of address space) that is allocated but never filled. The operating system backs only
the pages that are written, so the few rows the views touch cost a few pages, not 4 GiB (the
test checks the resident size). The row stride S = 2**30 + 64 fits in int32, as a kernel
argument, while row 2 starts at 2 S > 2**31: exactly the product that overflows when a
kernel multiplies an int32 index by an int32 stride.

Each case runs in a child process: a kernel that does overflow reads or writes outside its
buffers, and a crash must fail one test, not end the session.
"""
import multiprocessing
import resource

import pytest
import torch

import llmcore
from llmcore_testing import kernel_backends
from reliability_oracles import (assert_close_to_oracle, attention_eager, attention_oracle,
                                 ce_eager, ce_oracle, norm_eager, norm_oracle)

S = (1 << 30) + 64                      # an int32 stride; 2 * S > 2**31
SPAN = 2 * S + 200                      # elements of the buffer: 4 GiB of float16
MAX_RSS_GROWTH = 512 << 20              # bytes: the lazily backed buffer must stay lazy

if "forkserver" not in multiprocessing.get_all_start_methods():
    pytest.skip("needs the forkserver start method to isolate crashes", allow_module_level=True)


def _huge_buffer():
    try:
        return torch.empty(SPAN, dtype=torch.float16)
    except (RuntimeError, MemoryError) as exc:  # strict overcommit: no 4 GiB of address space
        pytest.skip(f"cannot reserve 4 GiB of address space here: {exc}")


def _view(buf, shape, strides):
    """A view of `buf` with these strides, filled with N(0, 1) values where it has elements."""
    v = buf.as_strided(shape, strides)
    with torch.no_grad():
        v.copy_(torch.randn(shape, dtype=torch.float16))
    assert max((n - 1) * s for n, s in zip(shape, strides)) >= 2 * S > 2 ** 31
    return v


def _rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(conn, factory, args):
    """In the child: runs factory(*args)() and sends back (status, message). Seeded: a child
    of the forkserver starts from a different random state on every run (its initial_seed
    varies), and the cases' random data must not, or a tolerance met by most draws fails on
    a rare one (it did once: dq 1.535e-3 against a bound of 1.508e-3)."""
    status, message = 0, ""
    try:
        torch.manual_seed(0)
        before = _rss_bytes()
        factory(*args)()
        grown = _rss_bytes() - before
        assert grown < MAX_RSS_GROWTH, f"resident memory grew by {grown >> 20} MiB"
    except BaseException as exc:  # report everything, skips included, to the parent
        status = 2 if type(exc).__name__ == "Skipped" else 1
        message = f"{type(exc).__name__}: {exc}"[:60000]
    conn.send((status, message))
    conn.close()


_CONTEXT = []


def _context():
    """A forkserver: a fresh process that has imported torch and llmcore but never run a kernel.
    Each case is forked from it, not from pytest's process, whose OpenMP / intra-op thread pools
    do not survive a fork (a child forked after they ran can deadlock)."""
    if not _CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "llmcore", "reliability_oracles"])
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _run_isolated(factory, *args, timeout=300):
    """Runs factory(*args)() in a child process; fails with its error, or with the signal that
    killed it. factory: a module-level function (it is pickled by name)."""
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, factory, args))
    proc.start()
    send.close()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the case did not finish in {timeout} s")
    try:
        status, message = receive.recv()
    except EOFError:                                        # died before it could report
        status, message = None, ""
    if proc.exitcode < 0:
        raise AssertionError(f"the kernel crashed (signal {-proc.exitcode}): an offset past "
                             f"2**31 went out of bounds")
    if status == 2:
        pytest.skip(message)
    assert status == 0 and proc.exitcode == 0, message or f"exit code {proc.exitcode}"


def _grads(out, leaves, seed):
    return torch.autograd.grad(out, leaves, seed.to(out.dtype))


# ---------------------------------------------------------------------------- cases

def _norm_case(backend, kind, axis):
    def case():
        buf = _huge_buffer()
        n = 40
        if axis == "rows":              # (3, 40), rows S apart
            x = _view(buf, (3, n), (S, 1))
        else:                           # (2, 3), features S apart: a transposed activation
            n = 3
            x = _view(buf, (2, n), (1, S))
        x.requires_grad_()
        w = (torch.rand(n, dtype=torch.float16) + 0.5).requires_grad_()
        b = torch.randn(n, dtype=torch.float16, requires_grad=True) if kind == "layer" else None
        if kind == "layer":
            got = llmcore.layer_norm(x, n, w, b, backend=backend)
        else:
            got = llmcore.rms_norm(x, n, w, 1e-5, backend=backend)
        x64 = x.detach().double().requires_grad_()
        live = [t for t in (w, b) if t is not None]
        live64 = [t.detach().double().requires_grad_() for t in live]
        want = norm_oracle(kind, x64, *live64, *([None] if kind == "rms" else []), 1e-5, None)[0]
        xe = x.detach().clone().requires_grad_()
        eager = norm_eager(kind, xe, w, b, 1e-5, None)[0]
        assert_close_to_oracle(got, eager, want, name="out")
        seed = torch.randn(want.shape, dtype=torch.float64)
        for name, g, e, o in zip(["dx", "dweight", "dbias"], _grads(got, [x, *live], seed),
                                 _grads(eager, [xe, *live], seed),
                                 _grads(want, [x64, *live64], seed)):
            assert_close_to_oracle(g, e, o, name=name)
    return case


def _ce_case(backend, axis):
    def case():
        buf = _huge_buffer()
        if axis == "rows":              # (3, 37) logits, rows S apart
            x = _view(buf, (3, 37), (S, 1))
        else:                           # (2, 3) logits, classes S apart: (V, N) seen transposed
            x = _view(buf, (2, 3), (1, S))
        x.requires_grad_()
        t = torch.randint(0, x.shape[1], (x.shape[0],))
        got = llmcore.cross_entropy(x, t, reduction="none", label_smoothing=0.1, backend=backend)
        x64 = x.detach().double().requires_grad_()
        want = ce_oracle(x64, t, reduction="none", label_smoothing=0.1)
        xe = x.detach().clone().requires_grad_()
        eager = ce_eager(xe, t, reduction="none", label_smoothing=0.1)
        assert_close_to_oracle(got, eager, want, name="loss")
        seed = torch.randn(want.shape, dtype=torch.float64)
        assert_close_to_oracle(_grads(got, [x], seed)[0], _grads(eager, [xe], seed)[0],
                               _grads(want, [x64], seed)[0], name="dlogits")
    return case


def _attention_case(backend, which):
    def case():
        buf = _huge_buffer()
        d = 16
        shapes = {"q": (1, 2, 3, d), "k": (1, 1, 3, d), "v": (1, 1, 3, d)}
        leaves = {}
        offset = 0
        for name, shape in shapes.items():
            if name in which:           # positions S apart; heads side by side in a lane
                strides = (0, d, S, 1)
                leaves[name] = buf[offset:].as_strided(shape, strides)
                with torch.no_grad():
                    leaves[name].copy_(torch.randn(shape, dtype=torch.float16))
                offset += shape[1] * d
            else:
                leaves[name] = torch.randn(shape, dtype=torch.float16)
            leaves[name].requires_grad_()
        assert 2 * S > 2 ** 31          # position 2 of a huge view
        q, k, v = leaves["q"], leaves["k"], leaves["v"]
        got = llmcore.attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        le = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        want = attention_oracle(*l64, window=(-1, 0))
        eager = attention_eager(*le, window=(-1, 0))
        assert_close_to_oracle(got, eager, want, name="out")
        seed = torch.randn(want.shape, dtype=torch.float64)
        for name, g, e, o in zip(["dq", "dk", "dv"], _grads(got, [q, k, v], seed),
                                 _grads(eager, le, seed), _grads(want, l64, seed)):
            assert_close_to_oracle(g, e, o, name=name)
    return case


@pytest.mark.parametrize("backend", kernel_backends("norm"))
@pytest.mark.parametrize("axis", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_offsets_past_2_31(backend, axis, kind):
    _run_isolated(_norm_case, backend, kind, axis)


@pytest.mark.parametrize("backend", kernel_backends("cross_entropy"))
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_cross_entropy_offsets_past_2_31(backend, axis):
    _run_isolated(_ce_case, backend, axis)


@pytest.mark.parametrize("backend", kernel_backends("attention"))
@pytest.mark.parametrize("which", ["q", "kv"])
def test_attention_offsets_past_2_31(backend, which):
    _run_isolated(_attention_case, backend, which)


def _crash():
    def case():
        import ctypes
        ctypes.string_at(0)                  # reads address 0: SIGSEGV
    return case


def test_isolation_reports_a_crash():
    """The runner turns a crash into a failure (a kernel that overflows fails its test)."""
    with pytest.raises(AssertionError, match="crashed"):
        _run_isolated(_crash)
