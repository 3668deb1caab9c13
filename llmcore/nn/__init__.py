"""Drop-in modules backed by llmcore ops. They never import Triton."""
from llmcore.nn.activation import GELU
from llmcore.nn.linear import Linear
from llmcore.nn.norm import LayerNorm, RMSNorm
from llmcore.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss
from llmcore.nn.attention import SelfAttention

__all__ = ["LayerNorm", "RMSNorm", "GELU", "Linear", "CrossEntropyLoss", "LinearCrossEntropyLoss",
           "SelfAttention"]
