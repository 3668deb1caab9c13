"""Pretrain a causal LM from a script: your own text, tokenizer, model and Trainer, no CLI.

    python examples/pretrain_custom.py --out runs/custom --max-steps 200
    python examples/pretrain_custom.py --data my_corpus.txt --out runs/custom

With no --data it uses the embedded stdlib corpus. The same pieces the `llmcore pretrain`
command uses, assembled by hand: tokenizer -> token shards -> block dataset -> model -> Trainer.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmcore.data import BlockDataset, TokenStream, default_corpus, train_tokenizer, write_shards
from llmcore.models import Transformer, tiny_llama
from llmcore.train import Trainer, TrainConfig
from llmcore.train.data import LMSource, iter_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="*", default=[], help="text or JSONL files (default: the "
                    "embedded stdlib corpus)")
    ap.add_argument("--out", default="runs/pretrain-custom")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args()
    out = Path(args.out)

    # 1. documents: the embedded corpus, or the user's files with every 50th document held out
    if args.data:
        docs = list(iter_documents(args.data))
        train_docs = [d for i, d in enumerate(docs) if i % 50]
        eval_docs = docs[::50]
    else:
        train_docs, eval_docs = default_corpus()

    # 2. a byte-level BPE tokenizer trained on the training text, saved with the run
    tok = train_tokenizer(train_docs, "bpe", vocab_size=args.vocab_size)

    # 3. token shards on disk (memory-mapped), cut into fixed-length CLM blocks
    data_dir = out / "data"
    train = LMSource(BlockDataset(TokenStream(write_shards(train_docs, tok, data_dir,
                                                           prefix="train")), args.seq_len), "clm")
    evals = LMSource(BlockDataset(TokenStream(write_shards(eval_docs, tok, data_dir,
                                                           prefix="eval")), args.seq_len), "clm")

    # 4. a small Llama-style model (RMSNorm, rotary positions, SwiGLU, GQA)
    torch.manual_seed(0)
    model = Transformer(tiny_llama(vocab_size=tok.vocab_size, dim=96, n_layers=3, n_heads=4,
                                   n_kv_heads=2, ffn_dim=256, max_seq_len=args.seq_len))

    # 5. the Trainer: AdamW (no decay on norms/biases/embeddings), warmup + cosine, periodic
    #    eval, checkpoints, metrics.jsonl / loss.png / summary.json, final model in OUT/final
    cfg = TrainConfig(task="clm", seq_len=args.seq_len, batch_size=16, max_steps=args.max_steps,
                      lr=2e-3, warmup_steps=max(1, args.max_steps // 20),
                      eval_every=max(1, args.max_steps // 4), eval_batches=5, out=str(out))
    summary = Trainer(model, cfg, train_data=train, eval_data=evals, tokenizer=tok).train()
    print(f"eval loss {summary['initial_eval_loss']:.3f} -> {summary['eval_loss']:.3f} "
          f"in {summary['steps']} steps; run in {out}")


if __name__ == "__main__":
    main()
