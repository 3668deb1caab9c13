"""Data: the embedded default corpus and task, tokenizers, token shards and collators."""
from llmcore.data.collate import (IGNORE_INDEX, BlockDataset, DataError, Example, MLMMasker,
                                  build_label_map, clm_batch, encode_classification,
                                  encode_token_classification, load_classification,
                                  load_token_classification, pad_batch)
from llmcore.data.corpus import default_classification_task, default_corpus, default_documents
from llmcore.data.shards import Shard, ShardError, ShardWriter, TokenStream, write_shards
from llmcore.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX", "BlockDataset", "DataError", "Example", "MLMMasker", "build_label_map",
    "clm_batch", "encode_classification", "encode_token_classification", "load_classification",
    "load_token_classification", "pad_batch", "default_classification_task", "default_corpus",
    "default_documents", "Shard", "ShardError", "ShardWriter", "TokenStream", "write_shards",
    "Tokenizer", "train_tokenizer",
]
