"""Linear: torch.nn.Linear through llmcore.linear (the native CPU GEMM for float32, F.linear
elsewhere); same constructor arguments, parameters and state_dict keys as torch's."""
from __future__ import annotations

import torch

from llmcore.ops.linear import linear


class Linear(torch.nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str = "auto"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input):
        return linear(input, self.weight, self.bias, backend=self.backend)
