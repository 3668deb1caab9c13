"""One transformer, three flavours (BERT, GPT-2, Llama) chosen by TransformerConfig fields.

Shapes: B batch, N sequence length, E model width, Hq / Hkv query / key-value heads, D head
dim, V vocab, T the number of real (non-padding) tokens of a padded batch.

Attention runs through llmcore's flash-attn API, whose (..., H, D) layout needs no transposes:
  - no padding mask: dense (B, N, E) rows, `flash_attn_func` (causal aligned bottom-right, which
    is also what decoding from a KV cache needs: the new queries see every cached key);
  - with a padding mask: the padding is dropped once after the embeddings, every block runs on the
    packed (T, E) tokens with `flash_attn_varlen_func`, and the final hidden states are scattered
    back to (B, N, E) with zeros at padded positions. No compute is spent on padding, in the
    attention or anywhere else. Given the number of real tokens (`num_tokens`, which a collator
    or the trainer counts on the host), the packing needs no host sync; without it the real
    tokens are found with `nonzero`, a host sync on CUDA, paid once per forward.
Positions are the token's index in its padded row (0..N-1), as Hugging Face models use them.

Backends: with config.backend "auto", each op family's backend is resolved for the parameters'
device when the model is built and again whenever it is moved (`.to`, `.cuda`), never per step.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.export
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmcore import backends
from llmcore.models import heads
from llmcore.models.config import TransformerConfig
from llmcore.nn import LayerNorm, Linear, RMSNorm
from llmcore.ops.attention import flash_attn_func, flash_attn_varlen_func
from llmcore.ops.gelu import gelu
from llmcore.ops.rope import rope
from llmcore.ops.swiglu import swiglu


@dataclass
class TransformerOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


# A pytree node, so that wrappers that walk a module's outputs (FSDP2's root forward hooks,
# torch.export) see the tensors inside it.
torch.export.register_dataclass(TransformerOutput)


@dataclass
class _Layout:
    """How one forward pass lays out its tokens, shared by every block."""
    cu_seqlens: torch.Tensor | None           # (B + 1,) int32 when packed (T, E); None when dense
    max_seqlen: int                           # upper bound on a sequence's length (N)
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: (N, 1, D) dense, (T, 1, D) packed
    cache: "KVCache | None"


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, max_len, Hkv, D) buffers,
    filled up to `length`. Used by the decoder flavours for incremental generation. A layer's
    buffers are allocated on its first update, in the dtype its keys come in (autocast-proof)."""

    def __init__(self, cfg: TransformerConfig, batch: int, max_len: int):
        self.shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.v: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes the new (B, n, Hkv, D) keys/values after the cached ones; returns all of them."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, {end} needed")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (len(positions), head_dim), fp32: angle[p, i] = p * theta^(-2i/D) for
    i < D/2, the two halves repeated (the rotate-half convention Llama checkpoints use)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]          # (P, D/2)
    angles = torch.cat((angles, angles), dim=-1)                      # (P, D)
    return angles.cos(), angles.sin()


def _norm(cfg: TransformerConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.dim if dim is None else dim
    if cfg.norm == "rms":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return LayerNorm(dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Fused QKV projection -> (rotary) -> flash attention -> output projection."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.layer, self.causal, self.dropout = layer, cfg.causal, cfg.attn_dropout
        self.hq, self.hkv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # rows: [q (Hq*D) | k (Hkv*D) | v (Hkv*D)], heads outer, head dim inner
        self.qkv = Linear(cfg.dim, (self.hq + 2 * self.hkv) * self.d, bias=cfg.attn_bias)
        self.out = Linear(self.hq * self.d, cfg.dim, bias=cfg.attn_bias)
        self.backend = self.rope_backend = cfg.backend

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        # x (B, N, E) or packed (T, E)
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        q = q.unflatten(-1, (self.hq, self.d))                        # (..., Hq, D)
        k = k.unflatten(-1, (self.hkv, self.d))                       # (..., Hkv, D)
        v = v.unflatten(-1, (self.hkv, self.d))
        if layout.rope is not None:                                   # q and k in one op
            q, k = rope(q, k, *layout.rope, backend=self.rope_backend)
        p = self.dropout if self.training else 0.0
        if layout.cu_seqlens is not None:
            o = flash_attn_varlen_func(q, k, v, layout.cu_seqlens, layout.cu_seqlens,
                                       layout.max_seqlen, layout.max_seqlen, dropout_p=p,
                                       causal=self.causal, backend=self.backend)
        else:
            if layout.cache is not None:
                k, v = layout.cache.update(self.layer, k, v)          # (B, cached + N, Hkv, D)
            o = flash_attn_func(q, k, v, dropout_p=p, causal=self.causal, backend=self.backend)
        return self.out(o.flatten(-2))


# the `approximate` of F.gelu for each GELU MLP type
GELU_FORMS = {"gelu": "none", "gelu_tanh": "tanh"}


class MLP(nn.Module):
    """GELU/ReLU: fc2(act(fc1 x)), GELU through llmcore.gelu. SwiGLU: fc2(silu(gate) * up),
    [gate | up] = fc1 x, in one op (llmcore.swiglu). Both kernels go one launch each way and
    keep only fc1's output for the backward."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.fc1 = Linear(cfg.dim, cfg.ffn_dim * (2 if self.gated else 1), bias=cfg.mlp_bias)
        self.fc2 = Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)
        self.approximate = GELU_FORMS.get(cfg.mlp)          # None: relu or swiglu
        self.backend = cfg.backend

    def forward(self, x):
        h = self.fc1(x)
        if self.gated:
            return self.fc2(swiglu(h, backend=self.backend))
        if self.approximate is not None:
            return self.fc2(gelu(h, self.approximate, backend=self.backend))
        return self.fc2(F.relu(h))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layout: _Layout, delta=None):
        """(x, delta) -> (x', delta'): the residual stream is x + delta, its last addition left to
        the next norm. Pre-norm: the block's input x + delta (delta None: x alone) is added in
        norm1, attention's output in norm2, and the MLP's output is returned as delta' for the
        next block's norm1 (or the final norm), so no residual add runs on its own. Post-norm
        (delta always None): each addition is fused into the norm that follows it anyway."""
        if self.pre_norm:
            if delta is None:
                h = self.norm1(x)
            else:
                h, x = self.norm1(delta, residual=x)     # fused: x <- x + delta, h = norm1(x)
            a = self.drop(self.attn(h, layout)).to(x.dtype)   # autocast: keep x's dtype
            h, x = self.norm2(a, residual=x)             # fused: x <- x + a, h = norm2(x)
            return x, self.drop(self.mlp(h)).to(x.dtype)
        a = self.drop(self.attn(x, layout)).to(x.dtype)   # post-norm: x <- norm1(x + attn x)
        x, _ = self.norm1(a, residual=x)
        m = self.drop(self.mlp(x)).to(x.dtype)
        x, _ = self.norm2(m, residual=x)
        return x, None


class Transformer(nn.Module):
    """model(input_ids, attention_mask=None, token_type_ids=None, labels=None) ->
    TransformerOutput(loss, logits, last_hidden_state).

    input_ids (B, N) int; attention_mask (B, N) bool or 0/1 (1 = real token); token_type_ids
    (B, N) for configs with type_vocab_size > 0; labels: (B, N) token ids for "clm" (the loss
    shifts them: position t predicts labels[t+1]) and "mlm" (-100 = not masked), (B,) classes
    for "seq_cls" (float when num_labels == 1: regression), (B, N) classes for "token_cls".
    With labels, while training, LM logits are not computed unless `return_logits=True`: the
    loss is the fused linear cross-entropy, which never holds the (tokens, V) logits. In eval
    mode the logits come with the loss, as Hugging Face and Liger models return them;
    `return_logits=False` skips them there too. `label_smoothing` goes to the head's loss (the
    trainer's label smoothing).
    num_tokens (the number of real tokens in attention_mask) and num_targets (the number of
    labels != -100, "mlm" only) are optional host-side counts, e.g. from the collator: given
    them, a forward with a padding mask or MLM labels never waits for the device (the trainer
    passes both). Without them the model finds those positions itself, with a host sync each.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        cfg = self.config = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.position == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.dim) if cfg.type_vocab_size else None
        self.emb_norm = _norm(cfg) if cfg.norm_position == "post" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = _norm(cfg) if cfg.norm_position == "pre" else None
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if cfg.pooler else None
        self.head = heads.build(cfg)
        self.reset_parameters()
        self._resolve_backends()

    # ------------------------------------------------------------------ set-up

    def reset_parameters(self):
        """N(0, init_std) weights, zero biases, unit norms; the projections that write into the
        residual stream (attn.out, mlp.fc2) scaled by 1/sqrt(2 * n_layers) as in GPT-2."""
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                scale = 1.0 / math.sqrt(2 * self.config.n_layers) \
                    if name.endswith(("attn.out", "mlp.fc2")) else 1.0
                nn.init.normal_(m.weight, mean=0.0, std=std * scale)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        if self.head is not None:
            self.head.reset_parameters(std)

    def _resolve_backends(self):
        """Pins every llmcore layer's backend for the parameters' device (config.backend "auto"
        resolved by backends.resolve; a named backend is kept and checked by the ops)."""
        device = self.tok_emb.weight.device
        chosen = {}

        def pick(family):
            if self.config.backend != "auto":
                return self.config.backend
            if family not in chosen:
                chosen[family] = backends.resolve(family, "auto", device)
            return chosen[family]

        for m in self.modules():
            if isinstance(m, (LayerNorm, RMSNorm)):
                m.backend = pick("norm")
            elif isinstance(m, Linear):
                # llmcore's linear exists on the native backend alone (a CPU GEMM): any other
                # choice (triton, flash_attn, torch) keeps F.linear for the projections
                m.backend = "native" if pick("linear") == "native" else "torch"
            elif isinstance(m, Attention):
                m.backend = pick("attention")
                m.rope_backend = pick("rope")
            elif isinstance(m, MLP):
                m.backend = pick("swiglu" if m.gated else "gelu")
            elif isinstance(m, heads.Head):
                m.backend = pick("cross_entropy")
                if isinstance(m, heads.MaskedLMHead):
                    m.gelu_backend = pick("gelu")

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._resolve_backends()                 # the device may have changed
        return out

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, *,
                return_logits: bool | None = None, label_smoothing: float = 0.0,
                num_tokens: int | None = None,
                num_targets: int | None = None) -> TransformerOutput:
        cfg = self.config
        heads.check_count("num_targets", num_targets)
        if num_targets is not None and cfg.head != "mlm":
            raise ValueError(f"num_targets counts the masked-LM targets; this model's head is "
                             f"{cfg.head!r}, not 'mlm'")
        h = self.hidden_states(input_ids, attention_mask, token_type_ids, num_tokens=num_tokens)
        if cfg.head is None:
            if labels is not None:
                raise ValueError("labels were given but the model has no head (config.head=None)")
            return TransformerOutput(last_hidden_state=h)
        if return_logits is None:
            return_logits = labels is None or not self.training
        if cfg.head == "mlm":
            loss, logits = self.head(h, self.decoder_weight(), labels, return_logits,
                                     label_smoothing, num_targets)
        elif cfg.head == "clm":
            loss, logits = self.head(h, self.decoder_weight(), labels, return_logits,
                                     label_smoothing)
        elif cfg.head == "seq_cls":
            pooled = heads.pool(h, attention_mask, cfg.pooling)             # (B, E)
            if self.pooler is not None:
                pooled = torch.tanh(self.pooler(pooled))
            loss, logits = self.head(pooled, labels, label_smoothing)
        else:
            loss, logits = self.head(h, labels, label_smoothing)
        return TransformerOutput(loss=loss, logits=logits, last_hidden_state=h)

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, *,
                      cache: KVCache | None = None, num_tokens: int | None = None) -> torch.Tensor:
        """The final hidden states (B, N, E); zeros at padded positions. num_tokens: the number
        of real tokens in attention_mask, when the caller knows it on the host (see the module
        docstring)."""
        cfg = self.config
        self._check_inputs(input_ids, attention_mask, token_type_ids, cache, num_tokens)
        B, N = input_ids.shape
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + N, device=input_ids.device)     # (N,)
        x = self.tok_emb(input_ids)                                             # (B, N, E)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.type_emb is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_emb(types)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        rope = None
        if cfg.position == "rotary":
            cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)
            rope = (cos[:, None, :], sin[:, None, :])                           # (N, 1, D)

        if attention_mask is None:
            x = self._blocks(x, _Layout(None, N, rope, cache))
            if cache is not None:
                cache.length += N
            return x

        # padded batch: pack the real tokens, run every block on them, scatter back
        keep = attention_mask.reshape(-1).bool()
        index = heads.true_positions(keep, num_tokens, "num_tokens",
                                     "real tokens in attention_mask")                  # (T,)
        seqlens = attention_mask.reshape(B, N).bool().sum(1, dtype=torch.int32)
        cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))       # (B + 1,)
        if rope is not None:
            rope = tuple(t.expand(B, N, 1, cfg.head_dim).reshape(B * N, 1, cfg.head_dim)[index]
                         for t in rope)                                         # (T, 1, D)
        packed = x.reshape(B * N, cfg.dim)[index]                               # (T, E)
        packed = self._blocks(packed, _Layout(cu_seqlens, N, rope, None))
        out = packed.new_zeros(B * N, cfg.dim).index_copy(0, index, packed)
        return out.view(B, N, cfg.dim)

    def _blocks(self, x, layout: _Layout):
        """The blocks, then the final norm (pre-norm), which also adds the last block's delta."""
        delta = None
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training:
                x, delta = checkpoint(block, x, layout, delta, use_reentrant=False)
            else:
                x, delta = block(x, layout, delta)
        if self.final_norm is None:                 # post-norm: x is the stream
            return x
        if delta is None:                           # no blocks
            return self.final_norm(x)
        return self.final_norm(delta, residual=x)[0]

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, cache, num_tokens):
        cfg = self.config
        heads.check_count("num_tokens", num_tokens)
        if num_tokens is not None and attention_mask is None:
            raise ValueError("num_tokens counts the real tokens of attention_mask; it was given "
                             "without an attention_mask")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool or input_ids.dim() != 2:
            got = (f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
                   if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__)
            raise TypeError(f"input_ids must be a 2-D integer tensor (batch, seq_len), got {got}")
        B, N = input_ids.shape
        end = N + (cache.length if cache is not None else 0)
        if self.pos_emb is not None and end > cfg.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds max_seq_len={cfg.max_seq_len} of the "
                             "learned position table")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) \
                    or tuple(attention_mask.shape) != (B, N):
                got = (str(tuple(attention_mask.shape)) if isinstance(attention_mask, torch.Tensor)
                       else type(attention_mask).__name__)
                raise ValueError(f"attention_mask must be a tensor of shape {(B, N)} (1 = real "
                                 f"token), got {got}")
            if cache is not None:
                raise ValueError("attention_mask cannot be combined with a KV cache; "
                                 "decode unpadded prompts")
        if token_type_ids is not None:
            if self.type_emb is None:
                raise ValueError("token_type_ids given but config.type_vocab_size is 0")
            if tuple(token_type_ids.shape) != (B, N):
                raise ValueError(f"token_type_ids must have shape {(B, N)}, "
                                 f"got {tuple(token_type_ids.shape)}")

    # ------------------------------------------------------------------ LM helpers

    def decoder_weight(self) -> torch.Tensor:
        """The (V, E) matrix of the LM / MLM decoder: the token embedding when tied."""
        if self.config.tie_embeddings or self.head.weight is None:
            return self.tok_emb.weight
        return self.head.weight

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM logits (..., V) of final hidden states h (..., E); clm and mlm heads."""
        if self.config.head not in ("clm", "mlm"):
            raise ValueError(f"lm_logits needs an LM head; the model's head is "
                             f"{self.config.head!r}")
        return self.head.logits(h, self.decoder_weight())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len)

    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, **kw):
        """Sampled continuation of input_ids (B, N) -> (B, N + max_new_tokens); see
        llmcore.models.generate.generate. temperature=0 is greedy."""
        from llmcore.models.generate import generate
        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, **kw)

    # ------------------------------------------------------------------ accounting, I/O

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        skip = {id(e.weight) for e in (self.tok_emb, self.pos_emb, self.type_emb) if e is not None}
        return sum(p.numel() for p in self.parameters()
                   if not (exclude_embeddings and id(p) in skip))

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, for MFU: 6 * N_matmul + attention.

        N_matmul is every parameter except the embedding tables (lookups, no FLOPs), plus the
        (V, E) decoder matrix for an LM head (tied or not); biases and norms are counted as the
        usual 6N convention counts them. The attention term is 12 * n_layers * Hq * D * seq_len
        (QK^T and AV: 2 matmuls x 2 FLOPs x 3 for forward + backward), halved for causal models
        whose kernels skip the masked half. MLM heads count as if every token went through
        them. seq_len defaults to max_seq_len.
        """
        cfg = self.config
        t = cfg.max_seq_len if seq_len is None else seq_len
        n = self.num_parameters(exclude_embeddings=True)
        if cfg.head in ("clm", "mlm"):
            n += cfg.vocab_size * cfg.dim
        attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t
        return 6.0 * n + (0.5 if cfg.causal else 1.0) * attn

    def save(self, directory: str | os.PathLike) -> None:
        """Writes config.json and model.safetensors into `directory` (created if needed)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(self.config.to_json())
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device=None, dtype=None,
             **overrides) -> "Transformer":
        """The model `save` wrote, in the saved dtype unless `dtype` is given; `overrides`
        replace config fields (e.g. dropout, backend)."""
        from safetensors.torch import load_file

        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {directory!r}: not a saved llmcore model")
        with open(path) as f:
            config = TransformerConfig.from_dict(json.load(f))
        model = cls(config.replace(**overrides) if overrides else config)
        state = load_file(os.path.join(directory, "model.safetensors"))
        model.to(dtype or next(iter(state.values())).dtype)
        model.load_state_dict(state)
        return model.to(device) if device is not None else model

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Transformer":
        from llmcore.models.config import preset
        return cls(preset(name, **overrides))
