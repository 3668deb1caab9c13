"""Eager PyTorch implementations: the "torch" backend and the semantics every other backend
must match. Differentiable through torch autograd; no input checks here (llmcore.ops checks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- norms

def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    out = F.layer_norm(h, normalized_shape, weight, bias, eps)
    return out if residual is None else (out, h)


def rms_norm(x, normalized_shape, weight=None, eps=None, residual=None):
    h = x if residual is None else x + residual
    out = F.rms_norm(h, normalized_shape, weight, eps)
    return out if residual is None else (out, h)


# ---------------------------------------------------------------------------- cross-entropy
# (cross_entropy, linear_cross_entropy: written by the cross-entropy work)


# ---------------------------------------------------------------------------- attention
# (attention, flash-attn API: written by the attention work)
