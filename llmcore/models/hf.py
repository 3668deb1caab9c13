"""Hugging Face interop: `from_hf`, `to_hf`, `export_hf` for BERT, GPT-2 and Llama checkpoints.

Everything model-specific is data: `_ARCHITECTURES` (HF class -> family, head), one
`_*_config` pair per family (HF config <-> TransformerConfig) and `_RULES` (parameter name
templates). A rule maps one llmcore parameter to HF parameters by one of three kinds:
  copy  the same tensor (several HF names: the first present is read, all are written);
  t     transposed (GPT-2's Conv1D stores Linear weights as (in, out));
  cat   concatenated along dim 0 (llmcore fuses q|k|v and gate|up into one Linear).
HF names starting with "^" live outside the base model (task heads); the others are relative to
the base model, whose prefix ("bert.", "transformer.", "model.") task models add.

transformers is imported only inside the functions (it is an optional dependency).
"""
from __future__ import annotations

import json
import os

import torch

from llmcore.models.config import TransformerConfig, bert, gpt2, llama
from llmcore.models.transformer import Transformer

# HF class name -> (family, llmcore head)
_ARCHITECTURES = {
    "BertModel": ("bert", None),
    "BertForMaskedLM": ("bert", "mlm"),
    "BertForSequenceClassification": ("bert", "seq_cls"),
    "BertForTokenClassification": ("bert", "token_cls"),
    "GPT2Model": ("gpt2", None),
    "GPT2LMHeadModel": ("gpt2", "clm"),
    "LlamaModel": ("llama", None),
    "LlamaForCausalLM": ("llama", "clm"),
}
_HF_CLASS = {family_head: name for name, family_head in _ARCHITECTURES.items()}
_PREFIX = {"bert": "bert.", "gpt2": "transformer.", "llama": "model."}

_L = "blocks.{i}."
_RULES = {
    "bert": [
        ("tok_emb", "copy", ["embeddings.word_embeddings"]),
        ("pos_emb", "copy", ["embeddings.position_embeddings"]),
        ("type_emb", "copy", ["embeddings.token_type_embeddings"]),
        ("emb_norm", "copy", ["embeddings.LayerNorm"]),
        (_L + "attn.qkv", "cat", ["encoder.layer.{i}.attention.self." + n
                                  for n in ("query", "key", "value")]),
        (_L + "attn.out", "copy", ["encoder.layer.{i}.attention.output.dense"]),
        (_L + "norm1", "copy", ["encoder.layer.{i}.attention.output.LayerNorm"]),
        (_L + "mlp.fc1", "copy", ["encoder.layer.{i}.intermediate.dense"]),
        (_L + "mlp.fc2", "copy", ["encoder.layer.{i}.output.dense"]),
        (_L + "norm2", "copy", ["encoder.layer.{i}.output.LayerNorm"]),
        ("pooler", "copy", ["pooler.dense"]),
        ("head.dense", "copy", ["^cls.predictions.transform.dense"]),
        ("head.norm", "copy", ["^cls.predictions.transform.LayerNorm"]),
        # the decoder's bias is what HF's forward adds; tied checkpoints store only the alias
        ("head.bias", "copy", ["^cls.predictions.decoder.bias", "^cls.predictions.bias"]),
        ("head.weight", "copy", ["^cls.predictions.decoder.weight"]),
        ("head.classifier", "copy", ["^classifier"]),
    ],
    "gpt2": [
        ("tok_emb", "copy", ["wte"]),
        ("pos_emb", "copy", ["wpe"]),
        (_L + "norm1", "copy", ["h.{i}.ln_1"]),
        (_L + "attn.qkv", "t", ["h.{i}.attn.c_attn"]),
        (_L + "attn.out", "t", ["h.{i}.attn.c_proj"]),
        (_L + "norm2", "copy", ["h.{i}.ln_2"]),
        (_L + "mlp.fc1", "t", ["h.{i}.mlp.c_fc"]),
        (_L + "mlp.fc2", "t", ["h.{i}.mlp.c_proj"]),
        ("final_norm", "copy", ["ln_f"]),
        ("head.weight", "copy", ["^lm_head.weight"]),
    ],
    "llama": [
        ("tok_emb", "copy", ["embed_tokens"]),
        (_L + "norm1", "copy", ["layers.{i}.input_layernorm"]),
        (_L + "attn.qkv", "cat", ["layers.{i}.self_attn." + n for n in ("q_proj", "k_proj",
                                                                         "v_proj")]),
        (_L + "attn.out", "copy", ["layers.{i}.self_attn.o_proj"]),
        (_L + "norm2", "copy", ["layers.{i}.post_attention_layernorm"]),
        (_L + "mlp.fc1", "cat", ["layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"]),
        (_L + "mlp.fc2", "copy", ["layers.{i}.mlp.down_proj"]),
        ("final_norm", "copy", ["norm"]),
        ("head.weight", "copy", ["^lm_head.weight"]),
    ],
}

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


# ----------------------------------------------------------------------------- configs

def _unsupported(what: str):
    return ValueError(f"this Hugging Face checkpoint uses {what}, which llmcore models do not "
                      "support")


def _activation(name) -> str:
    if name not in _ACT_FROM_HF:
        raise _unsupported(f"activation {name!r} (supported: {sorted(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


def _bert_config(c, head, has_pooler) -> TransformerConfig:
    if getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise _unsupported(f"position_embedding_type={c.position_embedding_type!r}")
    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        raise _unsupported("BERT as a decoder / cross-attention")
    return bert(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                n_heads=c.num_attention_heads, ffn_dim=c.intermediate_size,
                max_seq_len=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
                norm_eps=c.layer_norm_eps, mlp=_activation(c.hidden_act),
                dropout=c.hidden_dropout_prob, attn_dropout=c.attention_probs_dropout_prob,
                pad_token_id=c.pad_token_id, init_std=c.initializer_range, head=head,
                num_labels=c.num_labels, pooler=has_pooler,
                tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)))


def _gpt2_config(c, head, has_pooler) -> TransformerConfig:
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        raise _unsupported("scale_attn_by_inverse_layer_idx=True")
    if not getattr(c, "scale_attn_weights", True):
        raise _unsupported("scale_attn_weights=False")
    return gpt2(vocab_size=c.vocab_size, dim=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
                ffn_dim=c.n_inner or 4 * c.n_embd, max_seq_len=c.n_positions,
                norm_eps=c.layer_norm_epsilon, mlp=_activation(c.activation_function),
                dropout=c.resid_pdrop, attn_dropout=c.attn_pdrop, init_std=c.initializer_range,
                pad_token_id=c.pad_token_id, head=head,
                tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)))


def _llama_config(c, head, has_pooler) -> TransformerConfig:
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise _unsupported(f"rope_type={rope.get('rope_type')!r} (only 'default' rotary)")
    if c.hidden_act != "silu":
        raise _unsupported(f"hidden_act={c.hidden_act!r} (Llama's SwiGLU needs 'silu')")
    if getattr(c, "pretraining_tp", 1) != 1:
        raise _unsupported(f"pretraining_tp={c.pretraining_tp}")
    return llama(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                 n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                 head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                 ffn_dim=c.intermediate_size, max_seq_len=c.max_position_embeddings,
                 norm_eps=c.rms_norm_eps, rope_theta=float(theta),
                 attn_bias=bool(c.attention_bias), mlp_bias=bool(getattr(c, "mlp_bias", False)),
                 attn_dropout=c.attention_dropout, init_std=c.initializer_range,
                 pad_token_id=c.pad_token_id, head=head,
                 tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)))


_FROM_HF_CONFIG = {"bert": _bert_config, "gpt2": _gpt2_config, "llama": _llama_config}


def _family(cfg: TransformerConfig) -> str:
    """The HF family whose architecture this config's fields describe."""
    layout = (cfg.norm, cfg.norm_position, cfg.position, cfg.mlp == "swiglu", cfg.causal)
    family = {("layer", "post", "learned", False, False): "bert",
              ("layer", "pre", "learned", False, True): "gpt2",
              ("rms", "pre", "rotary", True, True): "llama"}.get(layout)
    if family is None:
        raise ValueError(
            "no Hugging Face architecture matches this config: (norm, norm_position, position, "
            f"swiglu, causal) = {layout}; BERT is ('layer', 'post', 'learned', False, False), "
            "GPT-2 ('layer', 'pre', 'learned', False, True), Llama ('rms', 'pre', 'rotary', "
            "True, True)")
    if family in ("bert", "gpt2") and not (cfg.attn_bias and cfg.mlp_bias):
        raise ValueError(f"{family} has biases on every projection: attn_bias and mlp_bias "
                         "must be True")
    mha = cfg.n_kv_heads == cfg.n_heads and cfg.head_dim * cfg.n_heads == cfg.dim
    if family == "gpt2" and not mha:
        raise ValueError("GPT-2 needs n_kv_heads == n_heads and head_dim * n_heads == dim")
    if family == "bert" and cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ValueError("BERT needs head_dim * n_heads == dim")
    return family


def _hf_config(cfg: TransformerConfig, family: str):
    import transformers

    common = dict(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id,
                  initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.head in ("seq_cls", "token_cls"):
        common["num_labels"] = cfg.num_labels
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim,
            max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.norm_eps, hidden_act=_ACT_TO_HF[cfg.mlp],
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout,
            **common)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=cfg.dim, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim,
            n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
            activation_function=_ACT_TO_HF[cfg.mlp], resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout, **common)
    return transformers.LlamaConfig(
        hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.ffn_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, attention_dropout=cfg.attn_dropout,
        hidden_act="silu", **common)


# ----------------------------------------------------------------------------- weights

def _rules_for(model: Transformer, family: str, prefix: str):
    """llmcore parameter name -> (kind, [HF parameter names]) for this model's parameters."""
    table = {}
    for ours, kind, theirs in _RULES[family]:
        layers = range(model.config.n_layers) if "{i}" in ours else [None]
        for i in layers:
            src = ours.format(i=i) if i is not None else ours
            dst = [t.format(i=i) if i is not None else t for t in theirs]
            dst = [t[1:] if t.startswith("^") else prefix + t for t in dst]
            table[src] = (kind, dst)
    out = {}
    for name in model.state_dict():
        module, _, leaf = name.rpartition(".")
        if name in table:                    # a rule for the parameter itself
            out[name] = table[name]
        elif module in table:                # a rule for its module: same leaf name on HF's side
            kind, dst = table[module]
            out[name] = (kind, [f"{d}.{leaf}" for d in dst])
    return out


def _load_into(model: Transformer, hf_state: dict, family: str, prefix: str,
               fresh: tuple[str, ...]) -> None:
    """Loads every llmcore parameter from the HF state dict, except those whose names start
    with a `fresh` prefix (a new head / pooler), which keep their initialisation."""
    rules = {n: r for n, r in _rules_for(model, family, prefix).items() if not n.startswith(fresh)}
    ours = model.state_dict()
    missing = [n for n in ours if n not in rules and not n.startswith(fresh)]
    if missing:
        raise AssertionError(f"no Hugging Face mapping for llmcore parameters {missing}")
    new = {}
    for name, (kind, theirs) in rules.items():
        if kind == "copy":
            found = [t for t in theirs if t in hf_state]
            if not found:
                raise KeyError(f"the checkpoint has no {theirs[0]!r} (for llmcore's {name!r})")
            value = hf_state[found[0]]
        else:
            absent = [t for t in theirs if t not in hf_state]
            if absent:
                raise KeyError(f"the checkpoint has no {absent[0]!r} (for llmcore's {name!r})")
            if kind == "t":
                value = hf_state[theirs[0]].t() if hf_state[theirs[0]].dim() == 2 \
                    else hf_state[theirs[0]]
            else:
                value = torch.cat([hf_state[t] for t in theirs], dim=0)
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(f"shape mismatch for {name!r}: llmcore {tuple(ours[name].shape)}, "
                             f"checkpoint {tuple(value.shape)}")
        new[name] = value
    result = model.load_state_dict(new, strict=False)
    unexpected = [k for k in result.missing_keys if not k.startswith(fresh)]
    if unexpected:
        raise AssertionError(f"parameters left unloaded: {unexpected}")


def _read_checkpoint(path: str) -> dict:
    """The state dict of an HF checkpoint directory: safetensors (single or sharded) or .bin."""
    def shards(index_name):
        with open(os.path.join(path, index_name)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))

    files = os.listdir(path)
    if "model.safetensors" in files:
        names = ["model.safetensors"]
    elif "model.safetensors.index.json" in files:
        names = shards("model.safetensors.index.json")
    elif "pytorch_model.bin" in files:
        names = ["pytorch_model.bin"]
    elif "pytorch_model.bin.index.json" in files:
        names = shards("pytorch_model.bin.index.json")
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their sharded "
                                f"index) in {path!r}")
    state = {}
    for name in names:
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file
            state.update(load_file(full))
        else:
            state.update(torch.load(full, map_location="cpu", weights_only=True))
    # old BERT checkpoints (e.g. bert-base-uncased) name LayerNorm parameters gamma / beta
    renamed = {".gamma": ".weight", ".beta": ".bias"}
    return {next((k[:-len(old)] + new for old, new in renamed.items() if k.endswith(old)), k): v
            for k, v in state.items()}


# ----------------------------------------------------------------------------- public

_KEEP = object()


def from_hf(model_or_path, *, head=_KEEP, **overrides) -> Transformer:
    """A Hugging Face BERT / GPT-2 / Llama model (object, or a checkpoint directory read
    offline) as the matching llmcore Transformer, with identical weights (same dtype, and the
    model object's device).

    `head` replaces the task head (e.g. "seq_cls" to fine-tune a pretrained MLM checkpoint):
    the base weights are loaded and the new head is initialised. `overrides` replace other
    config fields (dropout, backend, num_labels, ...)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        import transformers

        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a checkpoint directory (downloads are not "
                                    "done here; pass a local directory or a model object)")
        hf_config = transformers.AutoConfig.from_pretrained(path)
        archs = getattr(hf_config, "architectures", None) or []
        arch = next((a for a in archs if a in _ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architectures {archs}; llmcore reads "
                             f"{sorted(_ARCHITECTURES)}")
        state = _read_checkpoint(path)
    elif isinstance(model_or_path, torch.nn.Module):
        arch = type(model_or_path).__name__
        if arch not in _ARCHITECTURES:
            raise ValueError(f"unsupported model class {arch}; llmcore reads "
                             f"{sorted(_ARCHITECTURES)}")
        hf_config = model_or_path.config
        state = model_or_path.state_dict()
    else:
        raise TypeError("model_or_path must be a Hugging Face model or a checkpoint directory, "
                        f"got {type(model_or_path).__name__}")

    family, hf_head = _ARCHITECTURES[arch]
    prefix = _PREFIX[family] if any(k.startswith(_PREFIX[family]) for k in state) else ""
    has_pooler = any(k.startswith(prefix + "pooler.") for k in state)
    config = _FROM_HF_CONFIG[family](hf_config, hf_head, has_pooler)
    new_head = hf_head if head is _KEEP else head
    if new_head != hf_head or overrides:
        config = config.replace(head=new_head, **overrides)
    if new_head == "seq_cls" and family == "bert" and not has_pooler:
        config = config.replace(pooler=True)          # BERT classifies the pooled [CLS]
    model = Transformer(config)
    first = next(iter(state.values()))          # same dtype and device as the HF weights
    model.to(device=first.device, dtype=first.dtype if first.dtype.is_floating_point else None)
    fresh = (("head.",) if new_head != hf_head else ()) + (() if has_pooler else ("pooler.",))
    _load_into(model, state, family, prefix, fresh)
    return model


def to_hf(model: Transformer):
    """The llmcore model as the matching Hugging Face model object (weights identical)."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be an llmcore Transformer, got {type(model).__name__}")
    import transformers

    cfg = model.config
    family = _family(cfg)
    name = _HF_CLASS.get((family, cfg.head))
    if name is None:
        raise ValueError(f"no Hugging Face {family} class has head {cfg.head!r}; exportable "
                         f"heads: {sorted(str(h) for f, h in _HF_CLASS if f == family)}")
    if name == "BertForSequenceClassification" and not cfg.pooler:
        raise ValueError("BertForSequenceClassification applies a pooler: the config needs "
                         "pooler=True")
    hf_config = _hf_config(cfg, family)
    cls = getattr(transformers, name)
    hf = cls(hf_config, add_pooling_layer=cfg.pooler) if name == "BertModel" else cls(hf_config)
    prefix = "" if cfg.head is None else _PREFIX[family]
    hf_params = hf.state_dict()
    new = {}
    state = model.state_dict()
    for ours, (kind, theirs) in _rules_for(model, family, prefix).items():
        value = state[ours].detach()
        if kind == "copy":
            for t in theirs:
                if t in hf_params:
                    new[t] = value
        elif kind == "t":
            new[theirs[0]] = value.t() if value.dim() == 2 else value
        else:
            sizes = [hf_params[t].shape[0] for t in theirs]
            new.update(zip(theirs, value.split(sizes, dim=0)))
    new = {k: v for k, v in new.items() if k in hf_params}   # e.g. an unused pooler
    result = hf.load_state_dict(new, strict=False)
    # a parameter HF did not get is fine only when tied to (the same storage as) a loaded one
    params = dict(hf.named_parameters())
    loaded = {params[n].data_ptr() for n in new if n in params}
    untied = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise AssertionError(f"export left HF parameters unset {untied} / unexpected "
                             f"{result.unexpected_keys}")
    hf.to(model.tok_emb.weight.dtype)
    hf.train(model.training)
    return hf


def export_hf(model: Transformer, directory: str | os.PathLike) -> None:
    """Writes the model as a Hugging Face checkpoint directory (config.json + safetensors)."""
    to_hf(model).save_pretrained(directory)
