"""generate(): the KV cache gives the same tokens as recomputing the whole sequence; greedy
equals an explicit argmax loop; top-k / top-p restrict the draw; eos; checks."""
import pytest
import torch

from llmcore.models import Transformer, sample_next, tiny_bert, tiny_gpt, tiny_llama

V = 97


def _model(kind):
    torch.manual_seed(0)
    cfg = {"gpt2": tiny_gpt(vocab_size=V, dim=48, n_heads=4, max_seq_len=40),
           "llama": tiny_llama(vocab_size=V, dim=48, n_heads=6, n_kv_heads=2)}[kind]
    return Transformer(cfg.replace(init_std=0.2)).eval()     # peaked logits: no near-ties


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cache_equals_no_cache(kind):
    model = _model(kind)
    prompt = torch.randint(0, V, (3, 5))
    greedy = model.generate(prompt, 12, temperature=0)
    assert greedy.shape == (3, 17) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 12, temperature=0, use_cache=False))
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        runs.append(model.generate(prompt, 12, temperature=0.8, top_k=20, top_p=0.9,
                                   use_cache=use_cache, generator=g))
    assert torch.equal(*runs)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_logits_equal_full_forward(kind):
    """Prefill + one-token steps through the cache reproduce the full forward's logits."""
    model = _model(kind)
    ids = torch.randint(0, V, (2, 9))
    full = model(ids).logits
    cache = model.new_cache(2, 9)
    steps = [model.lm_logits(model.hidden_states(ids[:, :4], cache=cache))]
    for t in range(4, 9):
        steps.append(model.lm_logits(model.hidden_states(ids[:, t:t + 1], cache=cache)))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_is_argmax_loop_and_restores_mode():
    model = _model("gpt2").train()
    prompt = torch.randint(0, V, (2, 3))
    out = model.generate(prompt, 6, temperature=0)
    assert model.training
    model.eval()
    ids = prompt
    for _ in range(6):
        ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ids)


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=0.1, generator=g), logits.argmax(-1))
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    # top_p = 0.8: probabilities 0.64, 0.24, 0.09, ... -> the first two reach 0.8
    drawn = sample_next(logits, 1.0, top_p=0.8, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    assert len(set(sample_next(logits, 1.0, generator=g).tolist())) >= 4


def test_eos_rows_stay_finished():
    model = _model("llama")
    prompt = torch.randint(0, V, (4, 2))
    free = model.generate(prompt, 8, temperature=0)
    eos = int(free[0, 4])                         # a token row 0 emits at step 3
    out = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    for row in out[:, 2:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == eos).all()


def test_generate_checks():
    model = _model("gpt2")
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds max_seq_len=40"):
        model.generate(prompt, 37)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(prompt, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        model.generate(prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="input_ids must be a non-empty 2-D integer tensor"):
        model.generate(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="needs a causal LM"):
        Transformer(tiny_bert(vocab_size=V)).generate(prompt, 2)
