"""Stand-ins with the llmcore model and batch-source interfaces, for trainer tests that must
not depend on the kernels: model(input_ids, attention_mask=None, labels=None) -> .loss/.logits."""
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from llmcore.data.collate import IGNORE_INDEX


class TinyModel(torch.nn.Module):
    """Embedding -> LayerNorm -> MLP; task "clm" (shifted), "mlm"/"tokens" (per position) or
    "classify" (mean pooling)."""

    def __init__(self, vocab=23, dim=8, task="clm", num_labels=3, dropout=0.0):
        super().__init__()
        self.task = task
        self.tok_emb = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(dropout)
        out = num_labels if task in ("classify", "tokens") else vocab
        self.out = torch.nn.Linear(dim, out)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        h = self.drop(torch.tanh(self.fc(self.norm(self.tok_emb(input_ids)))))
        if self.task == "classify":
            m = (attention_mask if attention_mask is not None
                 else torch.ones_like(input_ids)).unsqueeze(-1).float()
            h = (h * m).sum(1) / m.sum(1)
        logits = self.out(h)
        loss = None
        if labels is not None:
            lg, lb = (logits[:, :-1], labels[:, 1:]) if self.task == "clm" else (logits, labels)
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return SimpleNamespace(loss=loss, logits=logits)


class RandomLMSource:
    """Deterministic random token rows; with `mask_rate`, MLM-like labels (a variable number of
    valid targets per row, so the global-count normalisation matters)."""

    def __init__(self, n=64, seq=9, vocab=23, task="clm", mask_rate=0.3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(vocab, (n, seq), generator=g)
        keep = torch.rand(n, seq, generator=g) < mask_rate
        keep[::7] = False                             # some rows with no target at all
        self.labels = self.ids if task == "clm" else torch.where(keep, self.ids, IGNORE_INDEX)

    def __len__(self):
        return len(self.ids)

    def batch(self, indices, step=0, rows=None):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"input_ids": self.ids[idx], "labels": self.labels[idx].clone()}


def poison_loss(model, nan_calls):
    """Makes the model's loss NaN on the given (1-based) forward calls; returns the model."""
    forward, calls = model.forward, {"n": 0}

    def poisoned(*a, **k):
        out = forward(*a, **k)
        calls["n"] += 1
        if calls["n"] in nan_calls:
            out.loss = out.loss * float("nan")
        return out
    model.forward = poisoned
    return model
