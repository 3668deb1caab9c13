"""Where the native CPU ops put their large outputs (csrc/torch/output_alloc.h): a tensor of
32 MiB or more lives on memory advised for transparent huge pages (the VMA carries the `hg` flag
in /proc/self/smaps), its partial last 2 MiB page adds no memory (RSS), smaller ones are plain
at::empty, and LLMCORE_CPU_HUGEPAGES=0 turns it off. The tensors behave as any other: values,
resize_, serialisation, numpy views, and their memory is returned on release."""
import copy
import inspect
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore_testing import kernel_backends

pytestmark = [
    pytest.mark.skipif("native" not in kernel_backends("norm"),
                       reason="llmcore._native is not built"),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="huge-page advice and /proc/self/smaps are Linux's"),
]

MIB = 2 ** 20
ROWS = 8193          # 8193 x 1024 float32 = 32 MiB + 4 KiB: 16 whole 2 MiB pages and a tail
COLS = 1024


def _vm_flags(addr: int) -> list[str]:
    """VmFlags of the mapping of this process that holds addr."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head[0] == "VmFlags:":
                return head[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _advised(t: torch.Tensor) -> bool:
    return "hg" in _vm_flags(t.data_ptr())


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _assert_on_huge_pages(t: torch.Tensor):
    # That the partial last 2 MiB page is not advised (no memory added) is checked by its effect,
    # RSS, in test_no_memory_added_for_the_tail: the VMA flags at the tail's address once read
    # "hg" in a full CI run (a neighbouring mapping's flags, as far as could be told; never
    # reproduced alone), so they are not asserted here.
    nbytes = t.numel() * t.element_size()
    assert nbytes >= 32 * MIB
    assert _advised(t), "a >= 32 MiB output should be advised for huge pages"


@pytest.fixture(autouse=True)
def _no_torch_thp(monkeypatch):
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        pytest.skip("THP_MEM_ALLOC_ENABLE=1 advises every torch tensor: nothing to tell apart")


def test_layer_norm_outputs_on_huge_pages_and_correct():
    torch.manual_seed(0)
    x = torch.randn(ROWS, COLS, requires_grad=True)
    w = torch.rand(COLS, requires_grad=True)
    b = torch.randn(COLS, requires_grad=True)
    dy = torch.randn(ROWS, COLS)
    y = llmcore.layer_norm(x, COLS, w, b, backend="native")
    _assert_on_huge_pages(y)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], dy)
    _assert_on_huge_pages(dx)
    assert not _advised(dw)          # 4 KiB: plain at::empty
    ye = F.layer_norm(x, (COLS,), w, b)
    dxe, dwe, dbe = torch.autograd.grad(ye, [x, w, b], dy)
    torch.testing.assert_close(y, ye, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dxe, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dwe, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(db, dbe, atol=2e-3, rtol=1e-4)


def test_rms_norm_residual_outputs_on_huge_pages():
    x, r = torch.randn(ROWS, COLS), torch.randn(ROWS, COLS)
    y, h = llmcore.rms_norm(x, COLS, None, 1e-6, residual=r, backend="native")
    _assert_on_huge_pages(y)
    _assert_on_huge_pages(h)
    torch.testing.assert_close(h, x + r, atol=0, rtol=0)
    torch.testing.assert_close(y, F.rms_norm(x + r, (COLS,), None, 1e-6), atol=2e-5, rtol=1e-5)


def test_cross_entropy_gradient_on_huge_pages():
    torch.manual_seed(0)
    logits = torch.randn(257, 32768, requires_grad=True)     # 32 MiB + 128 KiB
    target = torch.randint(0, 32768, (257,))
    (g,) = torch.autograd.grad(llmcore.cross_entropy(logits, target, backend="native"), [logits])
    _assert_on_huge_pages(g)
    (ge,) = torch.autograd.grad(F.cross_entropy(logits, target), [logits])
    torch.testing.assert_close(g, ge, atol=1e-8, rtol=1e-5)


def test_attention_outputs_on_huge_pages():
    torch.manual_seed(0)
    # (B, H, N, D) = (65, 16, 128, 64) float32: 32.5 MiB each of out, dq, dk, dv
    q, k, v = (torch.randn(65, 16, 128, 64, requires_grad=True) for _ in range(3))
    o = llmcore.attention(q, k, v, is_causal=True, backend="native")
    _assert_on_huge_pages(o)
    grads = torch.autograd.grad(o, [q, k, v], torch.randn_like(o))
    for g in grads:
        _assert_on_huge_pages(g)
    oe = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(o, oe, atol=2e-5, rtol=1e-4)


def test_small_outputs_are_plain():
    x = torch.randn(ROWS - 16, COLS)                 # 31.9 MiB: below the threshold
    y = llmcore.layer_norm(x, COLS, backend="native")
    assert not _advised(y)


def test_switched_off_by_the_environment():
    code = (
        "import torch, llmcore\n"
        + inspect.getsource(_vm_flags)
        + f"y = llmcore.layer_norm(torch.randn({ROWS}, {COLS}), {COLS}, backend='native')\n"
        "print('hg' in _vm_flags(y.data_ptr()))\n")
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, LLMCORE_CPU_HUGEPAGES=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


def test_outputs_behave_as_tensors_and_are_released():
    x = torch.randn(ROWS, COLS)
    y = llmcore.layer_norm(x, COLS, backend="native")
    ref = y.clone()
    # serialisation round trip
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), ref)
    # resize_ through the tensor's own allocator keeps the data
    y.resize_(ROWS + 100, COLS)
    assert torch.equal(y[:ROWS], ref)
    y.resize_(ROWS, COLS)
    # numpy shares the memory
    y.numpy()[0, 0] = 123.0
    assert y[0, 0].item() == 123.0
    y[0, 0] = ref[0, 0]
    # copies and sharing between processes (share_memory_ moves it to a shared segment)
    assert torch.equal(copy.deepcopy(y), ref)
    z = llmcore.layer_norm(x, COLS, backend="native")
    z.share_memory_()
    assert z.is_shared() and torch.equal(z, ref)
    del ref, z
    del y
    # released when the last reference goes: outputs made and dropped over and over do not
    # pile up (glibc may keep a freed block for reuse rather than return it at once, so the
    # check is on growth over many, not on RSS falling after one)
    before = _rss_kib()
    for _ in range(8):
        y = llmcore.layer_norm(x, COLS, backend="native")
        y.fill_(1.0)                                         # every page touched
        del y
    assert (_rss_kib() - before) * 1024 < 3 * ROWS * COLS * 4


def test_no_memory_added_for_the_tail():
    x = torch.randn(ROWS, COLS)
    nbytes = ROWS * COLS * 4
    with torch.no_grad():
        before = _rss_kib()
        y = llmcore.layer_norm(x, COLS, backend="native")
        grown = (_rss_kib() - before) * 1024
    assert _advised(y)
    # a huge page for the 4 KiB tail would add ~2 MiB
    assert grown < nbytes + MIB, (grown, nbytes)
