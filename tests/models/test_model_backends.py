"""The whole model on every backend that runs all three op families here (Triton through the
interpreter on CPU): loss and every gradient of a padded batch vs the float64 torch-backend
model (oracle rule, eager = the fp32 torch-backend model); cached generation."""
import copy

import pytest
import torch

from llmcore_testing import assert_close_to_oracle, kernel_backends
from llmcore.models import Transformer, preset

FULL = [b for b in kernel_backends("norm")
        if b in kernel_backends("cross_entropy") and b in kernel_backends("attention")]
V = 67


def _config(name, backend):
    extra = {"n_kv_heads": 1} if name == "tiny-llama" else {}
    return preset(name, vocab_size=V, dim=32, n_layers=1, n_heads=2, ffn_dim=48,
                  backend=backend, **extra)


@pytest.mark.parametrize("backend", FULL)
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt", "tiny-llama"])
def test_model_loss_and_grads_on_backend(name, backend):
    torch.manual_seed(0)
    model = Transformer(_config(name, backend))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    eager = Transformer(_config(name, "torch"))
    eager.load_state_dict(model.state_dict())
    oracle = copy.deepcopy(eager).double()
    ids = torch.randint(1, V, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    labels = ids.masked_fill(~mask, -100)
    if name == "tiny-bert":
        labels[:, 1::2] = -100
    losses = [m(ids, attention_mask=mask, labels=labels).loss for m in (model, eager, oracle)]
    assert_close_to_oracle(*losses, name="loss")
    grads = [torch.autograd.grad(loss, list(m.parameters()))
             for loss, m in zip(losses, (model, eager, oracle))]
    for (pname, _), g, e, o in zip(model.named_parameters(), *grads):
        assert_close_to_oracle(g, e, o, name=f"grad {pname}")


@pytest.mark.parametrize("backend", FULL)
def test_cached_generation_on_backend(backend):
    torch.manual_seed(0)
    model = Transformer(_config("tiny-llama", backend).replace(init_std=0.2)).eval()
    prompt = torch.randint(0, V, (2, 3))
    assert torch.equal(model.generate(prompt, 4, temperature=0),
                       model.generate(prompt, 4, temperature=0, use_cache=False))
