"""LayerNorm and RMSNorm: drop-ins for torch.nn's, running llmcore.layer_norm / rms_norm.

They subclass the torch modules, so constructor arguments, parameters, initialisation and
state_dict keys are torch's own, and isinstance checks in other code still hold. Extra:
`backend=` (keyword) and `forward(input, residual=None)` for the fused residual add.
"""
from __future__ import annotations

import torch

from llmcore.ops.norm import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input, residual=None):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, input, residual=None):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        residual=residual, backend=self.backend)
