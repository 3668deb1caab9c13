"""TransformerConfig and the named presets.

One dataclass describes every flavour; the flavours differ only by field values:

  field            bert              gpt2              llama
  norm             "layer"           "layer"           "rms"
  norm_position    "post"            "pre"             "pre"
  position         "learned"         "learned"         "rotary"
  mlp              "gelu"            "gelu_tanh"       "swiglu"
  causal           False             True              True
  type_vocab_size  2                 0                 0
  head             "mlm"             "clm"             "clm"

Presets are plain functions returning a config (`gpt2_small()`), looked up by name with
`preset("gpt2-small", n_layers=6)`; keyword overrides replace fields.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

_CHOICES = {
    "norm": ("layer", "rms"),
    "norm_position": ("pre", "post"),
    "position": ("learned", "rotary"),
    "mlp": ("gelu", "gelu_tanh", "swiglu", "relu"),
    "head": (None, "mlm", "clm", "seq_cls", "token_cls"),
    "pooling": ("cls", "last", "mean"),
}


@dataclass
class TransformerConfig:
    vocab_size: int = 50257
    dim: int = 768                      # model width E
    n_layers: int = 12
    n_heads: int = 12                   # query heads
    n_kv_heads: int | None = None       # key/value heads (GQA); None -> n_heads
    head_dim: int | None = None         # None -> dim // n_heads
    ffn_dim: int | None = None          # MLP hidden width; None -> 4 * dim
    max_seq_len: int = 1024             # learned-position table size / rotary cache length
    # --- flavour fields
    norm: str = "layer"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    position: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "gelu_tanh"
    causal: bool = True
    type_vocab_size: int = 0            # > 0: token-type (segment) embeddings, as BERT
    attn_bias: bool = True              # bias on the QKV and output projections
    mlp_bias: bool = True
    tie_embeddings: bool = True         # LM / MLM decoder weight is the token embedding
    # --- head
    head: str | None = "clm"            # None: backbone only (last_hidden_state)
    num_labels: int = 2                 # seq_cls / token_cls classes (1 -> regression)
    pooling: str = "cls"                # seq_cls pooling: first token, last valid token, mean
    pooler: bool = False                # BERT's dense + tanh on the pooled vector
    pad_token_id: int | None = None
    # --- training
    dropout: float = 0.0                # residual / embedding / head dropout
    attn_dropout: float = 0.0
    init_std: float = 0.02
    activation_checkpointing: bool = False
    backend: str = "auto"               # llmcore backend for every op family in the model

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "unless head_dim is given")
            self.head_dim = self.dim // self.n_heads
        if self.position == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.dim
        if self.head in ("seq_cls", "token_cls") and self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.head == "mlm" and self.causal:
            raise ValueError("head='mlm' needs causal=False (a bidirectional encoder)")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def replace(self, **overrides) -> "TransformerConfig":
        """A copy with `overrides`; derived fields still at their derived value (n_kv_heads ==
        n_heads, head_dim == dim // n_heads, ffn_dim == 4 * dim) are derived again."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown TransformerConfig fields: {sorted(unknown)}")
        derived = {"n_kv_heads": self.n_heads, "head_dim": self.dim // self.n_heads,
                   "ffn_dim": 4 * self.dim}
        for name, value in derived.items():
            if name not in overrides and getattr(self, name) == value:
                overrides[name] = None
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- flavours

def bert(**kw) -> TransformerConfig:
    """BERT layout: post-norm LayerNorm, learned positions, token types, exact GELU, MLM head."""
    base = dict(norm="layer", norm_position="post", norm_eps=1e-12, position="learned",
                mlp="gelu", causal=False, type_vocab_size=2, attn_bias=True, mlp_bias=True,
                tie_embeddings=True, head="mlm", pooling="cls", pad_token_id=0,
                max_seq_len=512, vocab_size=30522)
    return TransformerConfig(**{**base, **kw})


def gpt2(**kw) -> TransformerConfig:
    """GPT-2 layout: pre-norm LayerNorm, learned positions, tanh-GELU, causal, tied LM head."""
    base = dict(norm="layer", norm_position="pre", norm_eps=1e-5, position="learned",
                mlp="gelu_tanh", causal=True, attn_bias=True, mlp_bias=True,
                tie_embeddings=True, head="clm", pooling="last", max_seq_len=1024,
                vocab_size=50257)
    return TransformerConfig(**{**base, **kw})


def llama(**kw) -> TransformerConfig:
    """Llama layout: pre-norm RMSNorm, rotary positions, SwiGLU, GQA, no biases."""
    base = dict(norm="rms", norm_position="pre", norm_eps=1e-5, position="rotary",
                rope_theta=10000.0, mlp="swiglu", causal=True, attn_bias=False, mlp_bias=False,
                tie_embeddings=False, head="clm", pooling="last", max_seq_len=2048,
                vocab_size=32000)
    return TransformerConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- presets

def tiny_gpt(**kw) -> TransformerConfig:
    """~0.2M parameters with the default vocab: CPU tests and demos."""
    return gpt2(**{**dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=256), **kw})


def tiny_bert(**kw) -> TransformerConfig:
    return bert(**{**dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=256), **kw})


def tiny_llama(**kw) -> TransformerConfig:
    return llama(**{**dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_dim=176, max_seq_len=256), **kw})


def bert_base(**kw) -> TransformerConfig:
    """bert-base-uncased: 110M parameters."""
    return bert(**{**dict(dim=768, n_layers=12, n_heads=12, ffn_dim=3072), **kw})


def gpt2_small(**kw) -> TransformerConfig:
    """GPT-2 small: 124M parameters."""
    return gpt2(**{**dict(dim=768, n_layers=12, n_heads=12, ffn_dim=3072), **kw})


def llama_small(**kw) -> TransformerConfig:
    """A small Llama (~150M with a 32k vocab): 12 layers, width 768, GQA 12/4, SwiGLU 2048."""
    return llama(**{**dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                           rope_theta=10000.0), **kw})


PRESETS = {
    "tiny-gpt": tiny_gpt,
    "tiny-bert": tiny_bert,
    "tiny-llama": tiny_llama,
    "bert-base": bert_base,
    "gpt2-small": gpt2_small,
    "llama-small": llama_small,
}


def preset(name: str, **overrides) -> TransformerConfig:
    """The named preset's config, with `overrides` replacing fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown TransformerConfig fields: {sorted(unknown)}")
    return PRESETS[name](**overrides)
