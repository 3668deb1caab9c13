"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay pulls weights towards zero; on gains and shifts (norm weights, biases) and on
embedding tables that only shrinks useful scale, so they go into a group with weight_decay=0,
as GPT-2/BERT training recipes do. Schedules return a multiplier of the peak lr per step:

    warmup       m(s) = (s + 1) / warmup                          for s < warmup
    cosine       m = r + (1 - r) * 0.5 * (1 + cos(pi * t)),  t = (s - warmup) / (total - warmup)
    linear       m = r + (1 - r) * (1 - t)
    constant     m = 1
    wsd          m = 1 until the last `decay_fraction` of steps, then linear down to r
                 (warmup-stable-decay)

with r = min_lr_ratio.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (weights of Linear layers and other >= 2-D non-embedding
    parameters) and not decayed (biases, norm parameters, embeddings). Shared (tied) parameters
    are listed once."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
                               nn.BatchNorm1d)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in no_decay_ids or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused implementation on CUDA and the CPU (one kernel per
    step, and it can skip a non-finite step on the device: see the Trainer)."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def lr_multiplier(step: int, *, total: int, warmup: int, schedule: str,
                  min_ratio: float = 0.0, decay_fraction: float = 0.2) -> float:
    """The factor applied to the peak lr at optimiser step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * (total - warmup)))
        start = total - decay_steps
        if step < start:
            return 1.0
        t = min(1.0, (step - start) / decay_steps)
        return min_ratio + (1.0 - min_ratio) * (1.0 - t)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - t)
    raise ValueError(f"schedule must be cosine, linear, constant or wsd, got {schedule!r}")


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def fn(step):
        return lr_multiplier(step, total=total_steps, warmup=cfg.warmup_steps,
                             schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio,
                             decay_fraction=cfg.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
