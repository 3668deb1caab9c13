"""CrossEntropyLoss (a drop-in for torch.nn's) and LinearCrossEntropyLoss (the LM-head loss
without materialised logits), running llmcore.cross_entropy / linear_cross_entropy.

CrossEntropyLoss subclasses torch.nn.CrossEntropyLoss, so constructor arguments, the `weight`
buffer and state_dict keys are torch's own. Extras (keyword-only): z_loss, softcap, backend.
"""
from __future__ import annotations

import torch

from llmcore.ops.cross_entropy import cross_entropy, linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def __init__(self, *args, z_loss: float = 0.0, softcap: float | None = None,
                 backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             backend=self.backend)


class LinearCrossEntropyLoss(torch.nn.Module):
    """loss(input (..., H), weight (V, H), target (...), bias=None): the cross-entropy of
    input @ weight.T + bias, in token chunks. It holds no parameters: pass the LM head's."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: float | None = None, chunk_size: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, self.ignore_index,
                                    self.reduction, self.label_smoothing, z_loss=self.z_loss,
                                    softcap=self.softcap, chunk_size=self.chunk_size,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size}")
