"""The names the benchmark command accepts (no torch import, so building the `llmcore` argument
parser stays cheap)."""

# op name -> module in llmcore.benchmarks that defines it (imported on first use)
OP_MODULES = {
    "layer_norm": "norm", "rms_norm": "norm",
    "cross_entropy": "cross_entropy", "linear_cross_entropy": "cross_entropy",
    "attention": "attention", "attention_varlen": "attention",
    "attention_features": "attention_features",
    "rope": "rope",
    "swiglu": "swiglu",
    "gelu": "gelu",
    "linear": "linear",
    "train_step": "train_step",
    "overhead": "overhead",
}
OPS = tuple(OP_MODULES)
MODES = ("fwd", "bwd", "fwd+bwd", "step")
SIZE_SETS = ("tiny", "quick", "full")
PROVIDERS = ("torch", "torch_compile", "sdpa", "llmcore_triton", "llmcore_native", "llmcore_auto",
             "llmcore_triton_nondet", "llmcore_triton_ordered", "llmcore_compile", "flash_attn", "liger", "hf", "hf_compile",
             "flex_attention")
