"""Session setup shared by every test: the Triton interpreter on machines without CUDA, the
`gpu` marker, a seeded RNG. Helpers (the oracle tolerance rule, the backends to parametrise
over) live in llmcore_testing.py."""
from __future__ import annotations

import os

import pytest
import torch

from llmcore_testing import HAS_CUDA  # noqa: E402  (tests/ is on sys.path)

# Triton decides at @triton.jit time whether a kernel is interpreted, so the interpreter must be
# switched on before any llmcore kernel module is imported: on a machine without CUDA the whole
# session runs Triton kernels on the CPU through it.
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_backends():
    """For tests that patch llmcore.backends' tables: the cached backend choices are dropped
    before the test and again after it, so no patched answer outlives the patch."""
    from llmcore import backends

    backends.clear_cache()
    yield backends
    backends.clear_cache()
