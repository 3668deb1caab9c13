"""Task heads on top of the final hidden states h (B, N, E).

  clm        logits = h W^T (W: (V, E), the token embedding when tied); the loss is the fused
             linear cross-entropy of position t against labels[t + 1].
  mlm        BERT's head: logits = LN(act(dense h)) W^T + b; with labels the head runs only on
             the masked positions (labels != -100), gathered first: without a host sync when
             the caller gives their number (`num_targets`, see `true_positions`).
  seq_cls    classifier(dropout(pooled)), pooled by `pool` (+ the model's optional pooler).
  token_cls  classifier(dropout(h)) per token.

Each head takes `label_smoothing` (default 0; not for regression) and returns (loss or None,
logits or None); LM losses are fp32 whatever the compute
dtype (as HF upcasts for its losses). LM heads do not own the decoder matrix when it
is tied: the model passes it in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.models.config import TransformerConfig
from llmcore.nn import LayerNorm, Linear, RMSNorm
from llmcore.ops.cross_entropy import cross_entropy, linear_cross_entropy
from llmcore.ops.gelu import gelu

IGNORE_INDEX = -100


class Head(nn.Module):
    """Base of the heads; `backend` (the cross-entropy backend) is set by the model."""
    backend = "auto"

    def reset_parameters(self, std: float) -> None:
        """Initialises what the model's generic Linear/Embedding init does not reach."""


def _one_dtype(x, weight, bias=None):
    """linear_cross_entropy takes a single dtype: under autocast the autocast dtype (what F.linear
    would compute in), otherwise the weight's."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    return x.to(dtype), weight.to(dtype), (None if bias is None else bias.to(dtype))


def check_count(name: str, count) -> None:
    """A host-side count hint: None or an int >= 0."""
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{name} must be None or an int (a count known on the host), "
                        f"got {type(count).__name__}")
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")


def true_positions(mask: torch.Tensor, count: int | None, name: str, what: str) -> torch.Tensor:
    """Indices (count,) of the True entries of the 1-D bool `mask`, in order.

    With `count`, their number as the caller knows it on the host, nothing waits for the
    device: each True entry's slot is its rank among them (a cumsum), every False entry goes to
    a spare slot past the end, which is dropped. A wrong count fails an assert naming `name` and
    `what` it counts (on the CPU at once; on CUDA a device-side assert, reported at the next
    sync). Without it, `nonzero`, which on CUDA syncs the host to learn the output size."""
    if count is None:
        return mask.nonzero().squeeze(1)
    torch._assert_async(mask.sum() == count,
                        f"{name}={count} must equal the number of {what}")
    slot = torch.where(mask, (mask.cumsum(0) - 1).clamp_max(count), count)
    index = torch.zeros(count + 1, dtype=torch.long, device=mask.device)
    return index.scatter_(0, slot, torch.arange(mask.numel(), device=mask.device))[:count]


def _check_labels(labels, shape, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)} ({what}), "
                         f"got {tuple(labels.shape)}")


def _check_class_labels(labels) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")


class _DecoderWeight(Head):
    """Holds a (V, E) decoder matrix only when it is not tied to the token embedding."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.tie_embeddings:
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))

    def reset_parameters(self, std):
        if self.weight is not None:
            nn.init.normal_(self.weight, mean=0.0, std=std)


class CausalLMHead(_DecoderWeight):
    def logits(self, h, weight):
        return F.linear(h, weight)                                          # (..., V)

    def forward(self, h, weight, labels, return_logits, label_smoothing=0.0):
        loss = None
        if labels is not None:
            _check_labels(labels, h.shape[:2], "the input ids; shifted inside")
            _check_class_labels(labels)
            # position t predicts token t + 1; the last position has no target
            target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)       # (B, N)
            x, w, _ = _one_dtype(h.reshape(-1, h.shape[-1]), weight)
            loss = linear_cross_entropy(x, w, target.reshape(-1), ignore_index=IGNORE_INDEX,
                                        label_smoothing=label_smoothing,
                                        backend=self.backend).float()
        return loss, (self.logits(h, weight) if return_logits else None)


class MaskedLMHead(_DecoderWeight):
    gelu_backend = "auto"          # its transform's GELU, set by the model like `backend`

    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg)
        self.dense = Linear(cfg.dim, cfg.dim)
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        self.norm = (RMSNorm if cfg.norm == "rms" else LayerNorm)(cfg.dim, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def reset_parameters(self, std):
        super().reset_parameters(std)
        nn.init.zeros_(self.bias)

    def transform(self, h):
        return self.norm(gelu(self.dense(h), self.approximate, backend=self.gelu_backend))

    def logits(self, h, weight):
        return F.linear(self.transform(h), weight, self.bias)              # (..., V)

    def forward(self, h, weight, labels, return_logits, label_smoothing=0.0, num_targets=None):
        """num_targets: the number of labels != -100, when the caller knows it on the host
        (the gather of the masked positions then needs no host sync)."""
        loss = None
        if labels is not None:
            _check_labels(labels, h.shape[:2], "-100 at unmasked positions")
            _check_class_labels(labels)
            flat = labels.reshape(-1)
            index = true_positions(flat != IGNORE_INDEX, num_targets, "num_targets",
                                   "labels != -100")                          # (M,)
            hm = self.transform(h.reshape(-1, h.shape[-1])[index])          # (M, E)
            x, w, b = _one_dtype(hm, weight, self.bias)
            loss = linear_cross_entropy(x, w, flat[index], bias=b, ignore_index=IGNORE_INDEX,
                                        label_smoothing=label_smoothing,
                                        backend=self.backend).float()
        return loss, (self.logits(h, weight) if return_logits else None)


class SequenceClassificationHead(Head):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_labels = cfg.num_labels
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.dim, cfg.num_labels)

    def forward(self, pooled, labels, label_smoothing=0.0):
        logits = self.classifier(self.drop(pooled))                        # (B, num_labels)
        loss = None
        if labels is not None:
            _check_labels(labels, pooled.shape[:1], "one per sequence")
            if self.num_labels == 1:                                        # regression
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                _check_class_labels(labels)
                loss = cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                     label_smoothing=label_smoothing, backend=self.backend)
        return loss, logits


class TokenClassificationHead(Head):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.dim, cfg.num_labels)

    def forward(self, h, labels, label_smoothing=0.0):
        logits = self.classifier(self.drop(h))                             # (B, N, num_labels)
        loss = None
        if labels is not None:
            _check_labels(labels, h.shape[:2], "-100 at ignored tokens")
            _check_class_labels(labels)
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                                 backend=self.backend)
        return loss, logits


def pool(h, attention_mask, how: str):
    """(B, N, E) -> (B, E): the first token ("cls"), the last real token ("last", the rightmost
    position whose mask is 1, so left and right padding both work) or the mean of real tokens.
    Padded positions of h are zeros (Transformer.hidden_states)."""
    if how == "cls":
        return h[:, 0]
    if attention_mask is None:
        return h[:, -1] if how == "last" else h.mean(1)
    real = attention_mask.bool()                                            # (B, N)
    if how == "mean":
        return h.sum(1) / real.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
    positions = torch.arange(h.shape[1], device=h.device)
    last = (real.long() * positions).argmax(1)                              # (B,)
    return h[torch.arange(h.shape[0], device=h.device), last]


_HEADS = {"clm": CausalLMHead, "mlm": MaskedLMHead, "seq_cls": SequenceClassificationHead,
          "token_cls": TokenClassificationHead}


def build(cfg: TransformerConfig) -> Head | None:
    return None if cfg.head is None else _HEADS[cfg.head](cfg)
