"""One transformer model family (BERT-, GPT-2- and Llama-style flavours by config), its task
heads, presets, generation, and Hugging Face checkpoint import/export."""
from llmcore.models.config import (PRESETS, TransformerConfig, bert, bert_base, gpt2, gpt2_small,
                                   llama, llama_small, preset, tiny_bert, tiny_gpt, tiny_llama)
from llmcore.models.compile import compile_model
from llmcore.models.generate import generate, sample_next
from llmcore.models.hf import export_hf, from_hf, to_hf
from llmcore.models.transformer import KVCache, Transformer, TransformerOutput

__all__ = [
    "TransformerConfig", "Transformer", "TransformerOutput", "KVCache", "PRESETS", "preset",
    "bert", "gpt2", "llama", "tiny_bert", "tiny_gpt", "tiny_llama", "bert_base", "gpt2_small",
    "llama_small", "compile_model", "generate", "sample_next", "from_hf", "to_hf", "export_hf",
]
