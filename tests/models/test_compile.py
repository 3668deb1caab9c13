"""llmcore.models.compile_model: one graph where the model is one, graph breaks (with a warning)
where the inputs make a size data-dependent, and the eager model's numbers either way.

The aot_eager backend traces exactly what inductor would get (dynamo + AOT autograd, llmcore's
ops as opaque custom ops) without generating C++, which keeps these tests to seconds."""
from __future__ import annotations

import warnings

import pytest
import torch

from llmcore.models import Transformer, compile_model, tiny_bert, tiny_gpt, tiny_llama

V = 97


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # dynamo caches graphs per code object across torch.compile calls: a graph cached by one
    # test would let the next one's fullgraph call through without tracing
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fallbacks(caught) -> list[str]:
    return [str(w.message) for w in caught if "compile_model" in str(w.message)]


def _loss_and_grads(fn, model, **inputs):
    loss = fn(**inputs).loss
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def _same_as_eager(compiled, model, **inputs):
    got, got_grads = _loss_and_grads(compiled, model, **inputs)
    want, want_grads = _loss_and_grads(model, model, **inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_gpt, tiny_llama], ids=["gpt2", "llama"])
def test_causal_lm_training_step_is_one_graph(make):
    model = Transformer(make(vocab_size=V, n_layers=1)).train()
    compiled = compile_model(model, backend="aot_eager")
    ids = torch.randint(1, V, (2, 9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same_as_eager(compiled, model, input_ids=ids, labels=ids)
    assert not _fallbacks(caught)
    assert compiled.fullgraph
    # one set of parameters, the model's own
    assert [p for p in compiled.parameters()] == [p for p in model.parameters()]
    assert set(compiled.state_dict()) == {"module." + k for k in model.state_dict()}


def test_mlm_targets_fall_back_to_graph_breaks_with_a_warning():
    model = Transformer(tiny_bert(vocab_size=V, n_layers=1)).train()
    ids = torch.randint(1, V, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    compiled = compile_model(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="not one graph for these inputs.*graph breaks"):
        _same_as_eager(compiled, model, input_ids=ids, labels=labels)
    assert not compiled.fullgraph
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same_as_eager(compiled, model, input_ids=ids, labels=labels)
    assert not _fallbacks(caught)                     # warned once, not per call


def test_mlm_targets_with_their_count_are_one_graph():
    # given num_targets (the trainer and the benchmark pass it) the MLM gather and the loss
    # schedule have host-known sizes: no fallback, padded or not
    model = Transformer(tiny_bert(vocab_size=V, n_layers=1)).train()
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, ::2] = -100
    counts = {"num_tokens": int(mask.sum()), "num_targets": int((labels != -100).sum())}
    compiled = compile_model(model, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same_as_eager(compiled, model, input_ids=ids, attention_mask=mask, labels=labels,
                       **counts)
    assert not _fallbacks(caught)
    assert compiled.fullgraph


def test_explicit_fullgraph_fails_on_a_graph_break_and_false_allows_them():
    model = Transformer(tiny_bert(vocab_size=V, n_layers=1)).train()
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0                                   # a padded row
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, ::2] = -100
    strict = compile_model(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        strict(input_ids=ids, attention_mask=mask, labels=labels)
    torch._dynamo.reset()
    loose = compile_model(model, fullgraph=False, backend="aot_eager")
    assert isinstance(loose, torch._dynamo.eval_frame.OptimizedModule)
    _same_as_eager(loose, model, input_ids=ids, attention_mask=mask, labels=labels)


def test_padded_causal_lm_batch_is_one_graph():
    """The padded path packs the real tokens with nonzero; dynamo captures it in the graph."""
    model = Transformer(tiny_gpt(vocab_size=V, n_layers=1)).train()
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    compiled = compile_model(model, backend="aot_eager")
    _same_as_eager(compiled, model, input_ids=ids, attention_mask=mask, labels=ids)
    assert compiled.fullgraph
