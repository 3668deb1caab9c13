"""from_hf / to_hf / export_hf against Hugging Face BERT, GPT-2 and Llama (small random configs,
no downloads): outputs and every gradient vs HF in float64 (the oracle rule, HF fp32 = eager),
padding masks, GQA, tied and untied heads, round trips through objects and directories."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from llmcore_testing import assert_close_to_oracle  # noqa: E402
from llmcore.models import (Transformer, export_hf, from_hf, tiny_gpt,  # noqa: E402
                            tiny_llama, to_hf)

V = 103  # prime vocab


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=80,
                                   max_position_embeddings=40, num_labels=3, **kw)


def gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=40,
                                   bos_token_id=1, eos_token_id=2, **kw)


def llama_config(**kw):
    base = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, intermediate_size=72, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return transformers.LlamaConfig(**{**base, **kw})


CASES = {
    "BertModel": lambda: transformers.BertModel(bert_config()),
    "BertForMaskedLM": lambda: transformers.BertForMaskedLM(bert_config()),
    "BertForMaskedLM-untied":
        lambda: transformers.BertForMaskedLM(bert_config(tie_word_embeddings=False)),
    "BertForSequenceClassification":
        lambda: transformers.BertForSequenceClassification(bert_config()),
    "BertForTokenClassification": lambda: transformers.BertForTokenClassification(bert_config()),
    "GPT2Model": lambda: transformers.GPT2Model(gpt2_config()),
    "GPT2LMHeadModel": lambda: transformers.GPT2LMHeadModel(gpt2_config()),
    "LlamaModel": lambda: transformers.LlamaModel(llama_config()),
    "LlamaForCausalLM-untied": lambda: transformers.LlamaForCausalLM(llama_config()),
    "LlamaForCausalLM-tied":
        lambda: transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=True)),
}


def _perturb(model):
    """Random non-trivial norms and biases (HF initialises them to 1 / 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def _inputs(name, padded):
    B, N = 3, 13
    ids = torch.randint(1, V, (B, N))
    mask = torch.ones(B, N, dtype=torch.long)
    if padded:
        mask[1, 9:] = 0          # right padding
        mask[2, 4:] = 0
    if name.startswith("BertForSequence"):
        labels = torch.tensor([0, 2, 1])
    elif name.startswith("BertForMaskedLM"):
        labels = torch.where(torch.rand(B, N) < 0.4, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]
    elif name.startswith(("BertForToken",)):
        labels = torch.randint(0, 3, (B, N))
    elif "LM" in name or "Causal" in name:
        labels = ids.clone()
    else:
        labels = None
    if labels is not None and labels.dim() == 2:
        labels = labels.masked_fill(mask == 0, -100)
    types = torch.randint(0, 2, (B, N)) if name.startswith("Bert") else None
    return ids, (mask if padded else None), labels, types


def _hf_out(model, ids, mask, labels, types):
    extra = {} if types is None else {"token_type_ids": types}
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra) \
        if labels is not None else model(input_ids=ids, attention_mask=mask, **extra)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out, main


def _grads_hf_named(model):
    """Our gradients under HF's parameter names: to_hf of a copy holding grads as weights."""
    g = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(g.parameters(), model.parameters()):
            p.copy_(q.grad if q.grad is not None else torch.zeros_like(q))
    return {n: p for n, p in to_hf(g).named_parameters()}


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_matches_hf_outputs_and_grads(name, padded):
    hf32 = CASES[name]().eval()
    _perturb(hf32)
    hf64 = copy.deepcopy(hf32).double()
    ours = from_hf(hf32).eval()
    ids, mask, labels, types = _inputs(name, padded)
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)

    o32, m32 = _hf_out(hf32, ids, mask, labels, types)
    o64, m64 = _hf_out(hf64, ids, mask, labels, types)
    got = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels, return_logits=True)
    mine = got.logits if got.logits is not None else got.last_hidden_state
    if mine.dim() == 3:                           # HF's values at padded positions are arbitrary
        mine, m32, m64 = mine[real], m32[real], m64[real]
    assert_close_to_oracle(mine, m32, m64, name="output")

    # gradients of a loss that touches every real output (and the task loss when there is one)
    seed = torch.randn(m64.shape, dtype=torch.float64)
    def objective(out, main, dtype):
        total = (main * seed.to(dtype)).sum()
        return total + out.loss if labels is not None else total
    objective(o32, m32, torch.float32).backward()
    objective(o64, m64, torch.float64).backward()
    objective(got, mine, torch.float32).backward()
    if labels is not None:
        assert_close_to_oracle(got.loss, o32.loss, o64.loss, name="loss")
    ours_g = _grads_hf_named(ours)
    for pname, p64 in hf64.named_parameters():
        if p64.grad is None:          # unused by HF's forward (BertModel's pooler, the alias
            continue                  # bias of an untied MLM head): nothing to compare
        p32 = dict(hf32.named_parameters())[pname]
        assert_close_to_oracle(ours_g[pname], p32.grad, p64.grad, name=f"grad {pname}")


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_object_and_directory(name, tmp_path):
    hf = CASES[name]().eval()
    _perturb(hf)
    ours = from_hf(hf)
    back = to_hf(ours)
    assert type(back) is type(hf)
    a, b = hf.state_dict(), back.state_dict()
    assert list(a) == list(b)
    # an untied BertForMaskedLM adds decoder.bias; its old `predictions.bias` is unused by HF
    unused = {"cls.predictions.bias"} if name == "BertForMaskedLM-untied" else set()
    for k in a:
        assert k in unused or torch.equal(a[k], b[k]), k
    # llmcore -> HF directory -> llmcore: identical parameters
    export_hf(ours, tmp_path / "hf")
    again = from_hf(str(tmp_path / "hf"))
    for (k, x), (k2, y) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(x, y), k
    # HF's own save_pretrained directory reads the same
    hf.save_pretrained(tmp_path / "orig")
    direct = from_hf(str(tmp_path / "orig"))
    for k, x in ours.state_dict().items():
        assert torch.equal(x, direct.state_dict()[k]), k


def test_from_pytorch_model_bin_directory(tmp_path):
    hf = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    hf.config.architectures = ["GPT2LMHeadModel"]
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = from_hf(str(tmp_path)).eval()
    ids = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
    # old-style BERT names: LayerNorm.gamma / beta
    bert = transformers.BertForMaskedLM(bert_config()).eval()
    bert.config.architectures = ["BertForMaskedLM"]
    bert.config.save_pretrained(tmp_path / "bert")
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                       "LayerNorm.beta"): v
           for k, v in bert.state_dict().items()}
    torch.save(old, tmp_path / "bert" / "pytorch_model.bin")
    torch.testing.assert_close(from_hf(str(tmp_path / "bert")).eval()(ids).logits,
                               bert(ids).logits, rtol=1e-4, atol=1e-5)


def test_to_hf_of_native_models_matches_outputs():
    torch.manual_seed(1)
    for cfg in (tiny_gpt(vocab_size=V, dim=48, n_heads=4, max_seq_len=32),
                tiny_llama(vocab_size=V, dim=48, n_heads=6, n_kv_heads=3, tie_embeddings=True,
                           rope_theta=500.0)):
        ours = Transformer(cfg).eval()
        hf = to_hf(ours).eval()
        ids = torch.randint(0, V, (2, 11))
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)


def test_pretrained_mlm_to_classifier():
    """A pretrained MLM checkpoint fine-tunes as a classifier: base weights kept, new head."""
    hf = transformers.BertForMaskedLM(bert_config())
    clf = from_hf(hf, head="seq_cls", num_labels=5)
    assert clf.config.head == "seq_cls" and clf.pooler is not None
    assert torch.equal(clf.tok_emb.weight, hf.bert.embeddings.word_embeddings.weight)
    out = clf(torch.randint(1, V, (2, 7)), labels=torch.tensor([0, 4]))
    assert out.logits.shape == (2, 5) and torch.isfinite(out.loss)


def test_unsupported_inputs_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="unsupported model class"):
        from_hf(transformers.BertForPreTraining(bert_config()))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        from_hf(transformers.GPT2Model(gpt2_config(scale_attn_by_inverse_layer_idx=True)))
    with pytest.raises(ValueError, match="rope_type"):
        from_hf(transformers.LlamaModel(llama_config(rope_parameters={
            "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        from_hf(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="model_or_path"):
        from_hf(42)
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        to_hf(Transformer(tiny_gpt(norm="rms")))
    with pytest.raises(ValueError, match="no Hugging Face gpt2 class has head"):
        to_hf(Transformer(tiny_gpt(head="seq_cls")))
