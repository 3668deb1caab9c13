"""Fixtures for the training tests."""
import pytest
import torch

from llmcore.train.data import LabelledSource


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads per test cost far
    more wall time than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def classify_source():
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(40):
        n = 3 + i % 5
        ids = torch.randint(1, 23, (n,), generator=g).tolist()
        items.append((ids, int(ids[0] % 3)))       # learnable: label from the first token
    return LabelledSource(items, pad_id=0, per_token=False)
