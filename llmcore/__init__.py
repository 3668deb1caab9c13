"""llmcore: fused attention, layer/RMS norm, cross-entropy, rotary, SwiGLU and GELU kernels (and a
CPU GEMM for linear layers) for transformer training, drop-in nn layers, a transformer model family, and a lean MLM/CLM trainer.

The functional API mirrors torch.nn.functional; every op takes a keyword-only `backend`
("auto", "triton", "native", "torch", and for attention "flash_attn"). Importing llmcore
compiles nothing, prints nothing, and works with no GPU and no compiled extension.
"""
from llmcore.backends import BackendUnavailableError, available_backends
from llmcore.ops.attention import attention, flash_attn_func, flash_attn_varlen_func
from llmcore.ops.cross_entropy import cross_entropy, linear_cross_entropy
from llmcore.ops.gelu import gelu
from llmcore.ops.linear import linear
from llmcore.ops.norm import layer_norm, rms_norm
from llmcore.ops.rope import rope
from llmcore.ops.swiglu import swiglu
from llmcore.patch import patch

__version__ = "0.1.0"


__all__ = [
    "layer_norm", "rms_norm", "cross_entropy", "linear_cross_entropy", "attention",
    "flash_attn_func", "flash_attn_varlen_func", "rope", "swiglu", "gelu",
    "linear", "available_backends", "patch",
    "BackendUnavailableError", "__version__",
]
