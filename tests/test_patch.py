"""llmcore.patch on Hugging Face BERT / GPT-2 / Llama / Mistral (sliding window) and on plain
torch models: outputs, losses and every gradient vs the unpatched model in float64 (oracle
rule, unpatched fp32 = eager), state_dict keys and parameter objects unchanged, HF Trainer."""
import copy
import importlib.util
import pathlib

import pytest
import torch

import llmcore
from llmcore_testing import assert_close_to_oracle

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 103


def _hf(name):
    T = transformers
    llama = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, intermediate_size=72, max_position_embeddings=64)
    bert = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=80, max_position_embeddings=40, num_labels=3)
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**llama)),
        "mistral-window": lambda: T.MistralForCausalLM(T.MistralConfig(**llama,
                                                                        sliding_window=4)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=48, n_layer=2,
                                                       n_head=4, n_positions=40,
                                                       bos_token_id=1, eos_token_id=2)),
        "bert-mlm": lambda: T.BertForMaskedLM(T.BertConfig(**bert)),
        "bert-cls": lambda: T.BertForSequenceClassification(T.BertConfig(**bert)),
        "bert-tok": lambda: T.BertForTokenClassification(T.BertConfig(**bert)),
    }[name]()


def _batch(name, padded):
    B, N = 3, 11
    ids = torch.randint(1, V, (B, N))
    mask = torch.ones(B, N, dtype=torch.long)
    if padded:
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    if name == "bert-cls":
        labels = torch.tensor([2, 0, 1])
    elif name == "bert-tok":
        labels = torch.randint(0, 3, (B, N))
    elif name == "bert-mlm":
        labels = torch.where(torch.rand(B, N) < 0.4, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]
    else:
        labels = ids.clone()
    if labels.dim() == 2:
        labels = labels.masked_fill(mask == 0, -100)
    return ids, mask if padded else None, labels


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name", ["llama", "mistral-window", "gpt2", "bert-mlm", "bert-cls",
                                  "bert-tok"])
def test_patched_hf_matches_unpatched(name, padded):
    eager = _hf(name).eval()
    _perturb(eager)
    oracle = copy.deepcopy(eager).double()
    patched = copy.deepcopy(eager)
    keys, params = list(patched.state_dict()), [id(p) for p in patched.parameters()]
    assert llmcore.patch(patched) is patched
    assert list(patched.state_dict()) == keys
    assert [id(p) for p in patched.parameters()] == params          # shared, not copied
    assert patched.config._attn_implementation == "llmcore"
    kinds = {type(m) for m in patched.modules()}
    assert kinds & {llmcore.nn.LayerNorm, llmcore.nn.RMSNorm}
    assert not any(type(m).__name__ in ("LlamaRMSNorm", "MistralRMSNorm") or
                   type(m) is torch.nn.LayerNorm for m in patched.modules())
    # GPT-2's "gelu_new" formula and BERT's GELU module become llmcore.nn.GELU of that form
    gelus = [m.approximate for m in patched.modules() if type(m) is llmcore.nn.GELU]
    assert not any(type(m).__name__ in ("NewGELUActivation", "GELUActivation")
                   for m in patched.modules())
    if name == "gpt2":
        assert gelus == ["tanh"] * 2
    elif name.startswith("bert"):
        assert gelus and set(gelus) == {"none"}

    ids, mask, labels = _batch(name, padded)
    real = (mask if mask is not None else torch.ones_like(ids)).bool()
    outs = {}
    for key, model in (("got", patched), ("eager", eager), ("oracle", oracle)):
        with_labels = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = model(input_ids=ids, attention_mask=mask).logits
        outs[key] = (with_labels.loss, logits[real] if logits.dim() == 3 else logits)
        if key == "got" and name in ("llama", "mistral-window", "gpt2"):
            assert with_labels.logits is None        # fused linear cross-entropy: no logits
        with_labels.loss.backward()
    for i, what in enumerate(("loss", "logits")):
        assert_close_to_oracle(outs["got"][i], outs["eager"][i], outs["oracle"][i], name=what)
    named = {k: dict(m.named_parameters()) for k, m in
             (("got", patched), ("eager", eager), ("oracle", oracle))}
    for pname, p in named["got"].items():
        e, o = named["eager"][pname].grad, named["oracle"][pname].grad
        if o is None:
            assert p.grad is None or not p.grad.any(), pname
            continue
        assert_close_to_oracle(p.grad, e, o, name=f"grad {pname}")


def _full_backends():
    from llmcore_testing import kernel_backends
    return [b for b in kernel_backends("norm")
            if b in kernel_backends("cross_entropy") and b in kernel_backends("attention")]


@pytest.mark.parametrize("backend", _full_backends())
@pytest.mark.parametrize("name", ["llama", "bert-mlm"])
def test_patch_on_each_backend(name, backend):
    """patch(model, backend=...) runs every op on that backend (Triton via the interpreter)."""
    T = transformers
    small = {"llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
                 vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=40)),
             "bert-mlm": lambda: T.BertForMaskedLM(T.BertConfig(
                 vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=40, max_position_embeddings=16))}[name]
    eager = small().eval()
    _perturb(eager)
    oracle = copy.deepcopy(eager).double()
    patched = llmcore.patch(copy.deepcopy(eager), backend=backend)
    assert patched.config._attn_implementation == ("llmcore" if backend == "auto"
                                                   else f"llmcore_{backend}")
    ids, mask, labels = _batch(name, padded=True)
    losses = [m(input_ids=ids, attention_mask=mask, labels=labels).loss
              for m in (patched, eager, oracle)]
    assert_close_to_oracle(*losses, name="loss")
    grads = [torch.autograd.grad(loss, list(m.parameters()))
             for loss, m in zip(losses, (patched, eager, oracle))]
    for (pname, _), g, e, o in zip(patched.named_parameters(), *grads):
        assert_close_to_oracle(g, e, o, name=f"grad {pname}")


def test_patched_generation_and_num_items_in_batch():
    model = _hf("llama").eval()
    ref = copy.deepcopy(model)
    llmcore.patch(model)
    prompt = torch.randint(1, V, (2, 4))
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False),
                       ref.generate(prompt, max_new_tokens=5, do_sample=False))
    ids = torch.randint(1, V, (2, 8))
    n = torch.tensor(9)
    got = model(input_ids=ids, labels=ids, num_items_in_batch=n).loss
    want = ref(input_ids=ids, labels=ids, num_items_in_batch=n).loss
    torch.testing.assert_close(got, want)
    positional = model(ids, None, labels=ids).loss                  # positional arguments too
    torch.testing.assert_close(positional, ref(ids, labels=ids).loss)


def test_flags_leave_parts_alone():
    model = _hf("llama")
    llmcore.patch(model, norm=False, loss=False)
    assert model.config._attn_implementation == "llmcore"
    gpt2 = llmcore.patch(_hf("gpt2"), activation=False)
    assert any(type(m).__name__ == "NewGELUActivation" for m in gpt2.modules())
    assert not any(type(m) is llmcore.nn.GELU for m in gpt2.modules())
    assert any(type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
    assert "forward" not in vars(model)
    bert = llmcore.patch(_hf("bert-mlm"), attention=False)
    assert bert.config._attn_implementation != "llmcore"
    assert not any(type(m) is torch.nn.LayerNorm for m in bert.modules())


def test_plain_torch_model():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(24)
            self.rms = torch.nn.RMSNorm(24, eps=1e-6)
            self.act = torch.nn.GELU(approximate="tanh")
            self.proj = torch.nn.Linear(24, 7)
            self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def forward(self, x, y):
            return self.loss(self.proj(self.act(self.rms(self.ln(x)))), y)

    net = Net()
    _perturb(net)
    ref = copy.deepcopy(net)
    keys = list(net.state_dict())
    llmcore.patch(net)
    assert type(net.ln) is llmcore.nn.LayerNorm and type(net.rms) is llmcore.nn.RMSNorm
    assert type(net.act) is llmcore.nn.GELU and net.act.approximate == "tanh"
    assert type(net.loss) is llmcore.nn.CrossEntropyLoss and net.loss.label_smoothing == 0.1
    assert list(net.state_dict()) == keys
    x, y = torch.randn(13, 24), torch.randint(0, 7, (13,))
    a, b = net(x, y), ref(x, y)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        llmcore.patch("model")


def test_hf_trainer_runs_patched():
    """A few HF Trainer steps through the example script: patched losses == unpatched."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    path = pathlib.Path(__file__).parents[1] / "examples" / "patch_hf_trainer.py"
    spec = importlib.util.spec_from_file_location("patch_hf_trainer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--model", "llama", "--steps", "3", "--batch-size", "4", "--seq-len", "16"]
    patched = example.main(args)
    plain = example.main(args + ["--no-patch"])
    assert len(patched) == 3
    assert patched == pytest.approx(plain, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_upcast_logits_take_the_gradient_in_place(monkeypatch, dtype):
    # HF's losses upcast half-precision logits to float32: that copy is the loss's own, so the
    # patched loss lets a kernel backend write the gradient into it; float32 logits are the
    # model's output, which the caller may read, and are left alone
    import sys

    from llmcore_testing import kernel_backends

    patch_module = sys.modules["llmcore.patch"]     # (llmcore.patch is also the function)
    seen, force = [], {}
    real = patch_module.cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs["inplace_backward"])
        return real(*args, **{**kwargs, **force})

    monkeypatch.setattr(patch_module, "cross_entropy", spy)
    backend = "triton" if "triton" in kernel_backends("cross_entropy") else "auto"
    T = transformers
    # a causal LM whose loss goes through HF's loss_function over its logits (no fused head)
    model = T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, ffn_dim=40,
                                         max_position_embeddings=32, word_embed_proj_dim=32))
    model = llmcore.patch(model.to(dtype).eval(), backend=backend)    # eval: no dropout
    ids, _, labels = _batch("gpt2", padded=False)
    results = []
    for forced in ({}, {"inplace_backward": False}):
        force.clear()
        force.update(forced)
        loss = model(input_ids=ids, labels=labels).loss
        results.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    assert seen == [dtype != torch.float32, dtype != torch.float32]
    for a, b in zip(*results):                         # the same loss and gradients either way
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["bert-mlm", "bert-tok"])
def test_heads_with_an_inline_loss_use_llmcore(monkeypatch, name):
    # BERT's MLM and token-classification heads build torch's CrossEntropyLoss inside forward:
    # the patched model computes that loss with llmcore from the logits (the values are checked
    # against the unpatched model in test_patched_hf_matches_unpatched), as a dict or a tuple
    import sys

    patch_module = sys.modules["llmcore.patch"]
    calls = []
    real = patch_module.cross_entropy
    monkeypatch.setattr(patch_module, "cross_entropy",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    eager = _hf(name).eval()
    patched = llmcore.patch(copy.deepcopy(eager))
    ids, mask, labels = _batch(name, padded=True)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels)
    want = eager(input_ids=ids, attention_mask=mask, labels=labels)
    n_classes = eager.config.vocab_size if name == "bert-mlm" else eager.config.num_labels
    assert calls == [(ids.numel(), n_classes)]
    assert list(got.keys()) == list(want.keys())
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.logits, want.logits)
    as_tuple = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(want.to_tuple())
    torch.testing.assert_close(as_tuple[0], want.loss)
    torch.testing.assert_close(as_tuple[1], want.logits)
    assert patched(input_ids=ids, attention_mask=mask).loss is None
