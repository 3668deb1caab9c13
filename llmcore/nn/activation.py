"""GELU: a drop-in for torch.nn.GELU, running llmcore.gelu.

It subclasses torch.nn.GELU, so the constructor argument (`approximate`), repr and isinstance
checks are torch's own. Extra: `backend=` (keyword).
"""
from __future__ import annotations

import torch

from llmcore.ops.gelu import gelu


class GELU(torch.nn.GELU):
    def __init__(self, approximate: str = "none", *, backend: str = "auto"):
        super().__init__(approximate)
        self.backend = backend

    def forward(self, input):
        return gelu(input, self.approximate, backend=self.backend)
