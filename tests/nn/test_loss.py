"""llmcore.nn.CrossEntropyLoss (drop-in for torch's) and LinearCrossEntropyLoss."""
import pytest
import torch
import torch.nn.functional as F

import llmcore
from llmcore.nn import CrossEntropyLoss, LinearCrossEntropyLoss
from llmcore_testing import kernel_backends

BACKENDS = kernel_backends("cross_entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {}),
        ((torch.rand(37, dtype=torch.float64) + 0.5,), dict(ignore_index=2, reduction="sum")),
        ((), dict(reduction="none", label_smoothing=0.1)),
        ((torch.rand(37, dtype=torch.float64),), dict(label_smoothing=0.2)),
        pytest.param((), dict(size_average=False),   # legacy arguments map to reduction as in torch
                     marks=pytest.mark.filterwarnings("ignore:size_average and reduce")),
    ],
)
def test_cross_entropy_loss_is_a_drop_in(backend, args, kwargs):
    ours = CrossEntropyLoss(*args, backend=backend, **kwargs)
    theirs = torch.nn.CrossEntropyLoss(*args, **kwargs)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.reduction == theirs.reduction
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 37, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 37, (9, 2))
    t[0, 0] = kwargs.get("ignore_index", -100)
    got, want = ours(x, t), theirs(x, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    seed = torch.randn(want.shape, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * seed).sum(), x)
    (g_want,) = torch.autograd.grad((want * seed).sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_loss_extras_and_dtype_cast(backend):
    w = torch.rand(37) + 0.5
    loss = CrossEntropyLoss(w, label_smoothing=0.1, z_loss=1e-3, softcap=10.0, backend=backend)
    x = torch.randn(8, 37)
    t = torch.randint(0, 37, (8,))
    want = llmcore.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=10.0,
                                 backend="torch")
    torch.testing.assert_close(loss(x, t), want)
    # z_loss and softcap change the value: the module really passes them on
    assert not torch.allclose(CrossEntropyLoss(w, label_smoothing=0.1, backend=backend)(x, t), want)
    loss = loss.to(torch.float64)  # the weight buffer follows the module, as in torch
    assert loss.weight.dtype == torch.float64
    assert loss(x.double(), t).dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_loss(backend, reduction):
    head = torch.nn.Linear(16, 97)
    loss = LinearCrossEntropyLoss(reduction=reduction, label_smoothing=0.1, chunk_size=5,
                                  backend=backend)
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    h = torch.randn(2, 7, 16, requires_grad=True)
    t = torch.randint(0, 97, (2, 7))
    t[1, 3] = -100
    got = loss(h, head.weight, t, head.bias)
    want = F.cross_entropy(head(h).reshape(-1, 97), t.reshape(-1), reduction=reduction,
                           label_smoothing=0.1)
    want = want.reshape(t.shape) if reduction == "none" else want
    torch.testing.assert_close(got, want)
    seed = torch.randn(want.shape)
    leaves = [h, head.weight, head.bias]
    for a, b in zip(torch.autograd.grad((got * seed).sum(), leaves),
                    torch.autograd.grad((want * seed).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "chunk_size=5" in repr(loss)


def test_linear_cross_entropy_loss_extras():
    w = torch.randn(53, 8)
    h = torch.randn(11, 8)
    t = torch.randint(0, 53, (11,))
    loss = LinearCrossEntropyLoss(ignore_index=4, z_loss=1e-2, softcap=3.0)
    want = llmcore.cross_entropy(h @ w.t(), t, ignore_index=4, z_loss=1e-2, softcap=3.0)
    torch.testing.assert_close(loss(h, w, t), want)
