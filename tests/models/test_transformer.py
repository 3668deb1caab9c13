"""The llmcore Transformer on its own: configs and presets, padded (varlen) vs unpadded runs,
losses against explicit float64 formulas, activation checkpointing, save/load, FLOPs,
backend resolution, input checks."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from llmcore_testing import assert_close_to_oracle
from llmcore import backends
from llmcore.models import (PRESETS, Transformer, TransformerConfig, preset, tiny_bert,
                            tiny_gpt, tiny_llama)

V = 101
FLAVOURS = {
    "bert": lambda **kw: tiny_bert(vocab_size=V, dim=40, n_heads=5, ffn_dim=72, **kw),
    "gpt2": lambda **kw: tiny_gpt(vocab_size=V, dim=40, n_heads=5, ffn_dim=72, **kw),
    "llama": lambda **kw: tiny_llama(vocab_size=V, dim=48, n_heads=6, n_kv_heads=2, ffn_dim=72,
                                     **kw),
}


def _model(flavour, **kw):
    torch.manual_seed(0)
    model = Transformer(FLAVOURS[flavour](**kw))
    with torch.no_grad():                        # non-trivial norms and biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_presets_build_and_count():
    assert set(PRESETS) >= {"tiny-gpt", "tiny-bert", "tiny-llama", "bert-base", "gpt2-small",
                            "llama-small"}
    with torch.device("meta"):
        gpt2 = Transformer(preset("gpt2-small"))
        bert = Transformer(preset("bert-base", head=None, pooler=True))
        llama = Transformer(preset("llama-small"))
    assert gpt2.num_parameters() == 124_439_808          # GPT-2 small, as published
    assert bert.num_parameters() == 109_482_240          # bert-base-uncased BertModel
    assert 100e6 < llama.num_parameters() < 200e6
    assert preset("tiny-gpt", n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")
    with pytest.raises(TypeError, match="unknown TransformerConfig fields"):
        preset("tiny-gpt", layers=3)


@pytest.mark.parametrize("field, value, match", [
    ("norm", "batch", "norm must be one of"),
    ("n_kv_heads", 3, "multiple of n_kv_heads"),
    ("dim", 66, "divisible by n_heads"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("head", "lm", "head must be one of"),
])
def test_config_checks(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_gpt(**{field: value})
    with pytest.raises(ValueError, match="causal=False"):
        tiny_gpt(head="mlm")


def test_config_json_round_trip():
    cfg = tiny_llama(rope_theta=500.0)
    assert TransformerConfig.from_dict(dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_padded_batch_equals_each_sequence_alone(flavour):
    """The varlen path (padding dropped) gives each sequence exactly its unpadded result,
    and zeros at padded positions; gradients flow only from real tokens."""
    model = _model(flavour, head=None).eval()
    lengths = [13, 7, 1]
    ids = torch.randint(1, V, (3, 13))
    mask = torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]
    h = model(ids, attention_mask=mask).last_hidden_state
    for b, n in enumerate(lengths):
        alone = model(ids[b:b + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(h[b, :n], alone, rtol=1e-5, atol=1e-5)
        assert not h[b, n:].any()


def _double(model):
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_lm_loss_matches_explicit_formula_and_grads(flavour):
    """clm: position t predicts labels[t+1]; mlm: loss on masked positions only (head run on
    them alone). fp32 vs float64 model, eager = the same formula on fp32 logits."""
    model = _model(flavour)
    ids = torch.randint(1, V, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 12:] = False
    if flavour == "bert":
        labels = torch.where(torch.rand(2, 17) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 0] = ids[:, 0]
    else:
        labels = ids.clone()
    labels = labels.masked_fill(~mask, -100)
    shift = flavour != "bert"

    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits is None                       # fused loss: no (tokens, V) logits
    m64 = _double(model)
    logits64 = m64(ids, attention_mask=mask, return_logits=True).logits
    logits32 = model(ids, attention_mask=mask, return_logits=True).logits
    def formula(logits):
        lg, lb = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
        return F.cross_entropy(lg.reshape(-1, V), lb.reshape(-1))
    ref64, ref32 = formula(logits64), formula(logits32)
    assert_close_to_oracle(out.loss, ref32, ref64, name="loss")

    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    g32 = torch.autograd.grad(ref32, list(model.parameters()), allow_unused=True)
    g64 = torch.autograd.grad(ref64, list(m64.parameters()), allow_unused=True)
    for (name, _), g, e, o in zip(model.named_parameters(), grads, g32, g64):
        e = torch.zeros_like(g) if e is None else e
        o = torch.zeros_like(g, dtype=torch.float64) if o is None else o
        assert_close_to_oracle(g, e, o, name=f"grad {name}")


@pytest.mark.parametrize("pooling", ["cls", "last", "mean"])
def test_sequence_classification(pooling):
    model = _model("llama", head="seq_cls", num_labels=3, pooling=pooling).eval()
    ids = torch.randint(1, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, :3] = 0                                  # left padding
    labels = torch.tensor([0, 2, 1])
    out = model(ids, attention_mask=mask, labels=labels)
    h = model(ids, attention_mask=mask).last_hidden_state
    pooled = []
    for b in range(3):
        real = h[b][mask[b].bool()]
        pooled.append({"cls": h[b, 0], "last": real[-1], "mean": real.mean(0)}[pooling])
    logits = model.head.classifier(torch.stack(pooled))
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels))
    reg = _model("bert", head="seq_cls", num_labels=1, pooler=True)
    target = torch.tensor([0.5, -1.0])
    out = reg(ids[:2], labels=target)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), target))


def test_token_classification():
    model = _model("bert", head="token_cls", num_labels=4)
    ids = torch.randint(1, V, (2, 6))
    labels = torch.randint(0, 4, (2, 6))
    labels[0, 2] = -100
    out = model(ids, token_type_ids=torch.ones_like(ids), labels=labels)
    assert out.logits.shape == (2, 6, 4)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 4),
                                                         labels.reshape(-1)))


def test_activation_checkpointing_same_grads():
    ids = torch.randint(1, V, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = _model("llama", activation_checkpointing=ckpt).train()
        loss = model(ids, labels=ids).loss
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("padded", [False, True])
def test_residual_adds_run_inside_the_norms(flavour, padded):
    """No residual add runs on its own: pre-norm blocks hand their MLP output to the next
    block's norm1 (the last one to the final norm), post-norm adds in its norms. The only adds
    of (tokens, E) activations left in the forward are the embeddings' (token + position, +
    type); in a pre-norm backward, one gradient accumulation (the first block's input feeds two
    norms; every later stream tensor feeds one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _model(flavour, backend="native")
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    kw = {"attention_mask": mask} if padded else {}
    width = model.config.dim
    tokens = {ids.numel(), int(mask.sum()) if padded else ids.numel()}
    seen = {"forward": 0, "backward": 0}
    phase = ["forward"]

    class CountAdds(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and any(
                    isinstance(a, torch.Tensor) and a.shape[-1:] == (width,)
                    and a.numel() // width in tokens for a in args[:2]):
                seen[phase[0]] += 1
            return func(*args, **(kwargs or {}))

    with CountAdds():
        loss = model(ids, labels=ids, **kw).loss
        phase[0] = "backward"
        loss.backward()
    embedding_adds = 0 if flavour == "llama" else 1 + (model.type_emb is not None)
    assert seen["forward"] == embedding_adds
    if model.config.norm_position == "pre":
        assert seen["backward"] == 1


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_autocast_bf16_trains(flavour):
    """Under autocast the fp32 residual stream meets bf16 projections: the fused norms and the
    loss get one dtype each, and the loss stays close to the fp32 one."""
    model = _model(flavour)
    ids = torch.randint(1, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    labels = ids.masked_fill(~mask, -100)
    full = model(ids, attention_mask=mask, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - full.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if not n.startswith("pooler"))


def test_save_load_round_trip(tmp_path):
    model = _model("gpt2").eval()
    model.save(tmp_path / "m")
    again = Transformer.load(tmp_path / "m").eval()
    assert Transformer.load(tmp_path / "m", dtype=torch.bfloat16).tok_emb.weight.dtype \
        == torch.bfloat16
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ids = torch.randint(0, V, (1, 5))
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert Transformer.load(tmp_path / "m", dropout=0.1).config.dropout == 0.1
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.load(tmp_path / "nothing")


def test_flops_per_token():
    model = Transformer(tiny_gpt(vocab_size=V, dim=64, n_layers=2, n_heads=4, max_seq_len=32))
    c = model.config
    matmul = 2 * (4 * 64 * 64 + 2 * 64 * 256) + V * 64      # blocks' weights + LM head
    matmul += 2 * (3 * 64 + 64 + 256 + 64) + 2 * 2 * 64 * 2 + 2 * 64  # biases, norms
    expected = 6 * matmul + 0.5 * 12 * c.n_layers * c.n_heads * c.head_dim * 16
    assert model.estimate_flops_per_token(16) == pytest.approx(expected)


def test_backend_resolved_at_build_and_move(monkeypatch):
    model = Transformer(tiny_gpt(vocab_size=V))
    auto = backends.resolve("attention", "auto", "cpu")
    assert model.blocks[0].attn.backend == auto
    assert model.blocks[0].norm1.backend == backends.resolve("norm", "auto", "cpu")
    named = Transformer(tiny_gpt(vocab_size=V, backend="torch"))
    assert named.blocks[1].attn.backend == "torch" and named.head.backend == "torch"
    monkeypatch.setenv("LLMCORE_BACKEND", "torch")
    model.to(torch.float32)                         # a move re-resolves "auto"
    assert model.blocks[0].attn.backend == "torch"


def test_input_checks():
    model = Transformer(tiny_gpt(vocab_size=V, max_seq_len=8))
    with pytest.raises(TypeError, match="input_ids must be a 2-D integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of shape \(2, 3\)"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="type_vocab_size is 0"):
        model(torch.zeros(2, 3, dtype=torch.long), token_type_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        model(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        model(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no head"):
        Transformer(tiny_gpt(vocab_size=V, head=None))(torch.zeros(1, 2, dtype=torch.long),
                                                        labels=torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.slow
def test_torch_compile_whole_model_fullgraph():
    """The whole training step (forward, fused loss, backward) compiles as one graph."""
    model = _model("llama", n_layers=1).train()
    ids = torch.randint(1, V, (2, 9))
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(ids, labels=ids).loss
    grads = torch.autograd.grad(got, list(model.parameters()))
    want = model(ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flavour", ["bert", "gpt2"])
def test_padded_batch_compiles_fullgraph_given_the_counts(flavour):
    """With the host-side counts (num_tokens, num_targets) a padded batch's packing and the MLM
    gather have no data-dependent shapes: the training forward and backward compile as one
    graph (aot_eager: the graph capture, without inductor's compile time)."""
    model = _model(flavour, n_layers=1, backend="native").train()
    ids = torch.randint(1, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    counts = {"num_tokens": int(mask.sum())}
    if flavour == "bert":
        labels[:, ::2] = -100
        counts["num_targets"] = int((labels != -100).sum())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(ids, mask, labels=labels, **counts).loss
    grads = torch.autograd.grad(got, list(model.parameters()))
    want = model(ids, mask, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad(want, list(model.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_logits_with_labels_in_eval_mode_as_hugging_face(flavour):
    """Training skips the (tokens, V) logits (the fused loss never holds them); in eval mode
    they come with the loss, as Hugging Face and Liger return them; return_logits overrides."""
    model = _model(flavour)
    ids = torch.randint(1, V, (2, 9))
    labels = ids.clone()
    if flavour == "bert":
        labels[:, 1::2] = -100
    model.train()
    assert model(ids, labels=labels).logits is None
    assert model(ids, labels=labels, return_logits=True).logits.shape == (2, 9, V)
    model.eval()
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 9, V) and out.loss is not None
    torch.testing.assert_close(out.logits, model(ids).logits)
    assert model(ids, labels=labels, return_logits=False).logits is None
