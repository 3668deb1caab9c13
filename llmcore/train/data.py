"""From a TrainConfig to batches: documents, tokenizer, shards, and the batch sources the Trainer
draws from.

A *source* has `len()` items and `batch(indices, step) -> dict` of CPU tensors
(input_ids, labels, attention_mask where padding exists). MLM masks are drawn per row from a
generator keyed by (seed, step, row), so the same global batch is masked identically whether it
runs on one process or several, and after a resume.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llmcore.data import collate, corpus
from llmcore.data.collate import IGNORE_INDEX, BlockDataset, DataError, MLMMasker
from llmcore.data.shards import TokenStream, write_shards
from llmcore.data.tokenizer import Tokenizer, train_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_MAX_DOC_CHARS = 1 << 20


# --------------------------------------------------------------------------- documents

def _expand(paths) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataError(f"directory {str(p)!r} holds no .txt/.md/.rst/.jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data path {str(p)!r} does not exist")
    return files


def check_paths(paths) -> None:
    """Raise DataError for a path that does not exist."""
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path {str(p)!r} does not exist")


def iter_documents(paths, text_field: str = "text") -> Iterator[str]:
    """Documents from text files and JSONL files (one document per line, field `text_field`).
    A text file is split into documents at runs of two or more blank lines, and at about 1 MB so
    that memory stays bounded; a file without such runs is one document. Streams."""
    for f in _expand(paths):
        if f.suffix.lower() in JSONL_SUFFIXES:
            for n, row in collate._read_jsonl(f):
                text = row.get(text_field)
                if not isinstance(text, str):
                    raise DataError(f"{f}:{n}: missing string field {text_field!r}")
                if text.strip():
                    yield text
            continue
        try:
            with f.open(encoding="utf-8") as fh:
                doc: list[str] = []
                blank = size = 0
                for line in fh:
                    if not line.strip():
                        blank += 1
                        if blank >= 2 and doc:
                            yield "".join(doc).strip()
                            doc, size = [], 0
                        elif doc:
                            doc.append(line)
                        continue
                    blank = 0
                    doc.append(line)
                    size += len(line)
                    if size > _MAX_DOC_CHARS:
                        yield "".join(doc).strip()
                        doc, size = [], 0
                if doc and "".join(doc).strip():
                    yield "".join(doc).strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def lm_documents(cfg, split: str) -> Iterator[str]:
    """The train or eval documents of an LM run: the embedded corpus by default; user files
    split by text hash unless --eval-data is given."""
    if not cfg.data:
        train, evals = corpus.default_corpus(cfg.eval_fraction)
        yield from (train if split == "train" else evals)
        return
    if split == "eval" and cfg.eval_data:
        yield from iter_documents(cfg.eval_data, cfg.text_field)
        return
    cut = int(cfg.eval_fraction * 2**64) if not cfg.eval_data else 0
    for doc in iter_documents(cfg.data, cfg.text_field):
        in_eval = corpus.text_hash(doc, "split:") < cut
        if in_eval == (split == "eval"):
            yield doc


# --------------------------------------------------------------------------- tokenizer + shards

def lm_tokenizer(cfg, data_dir: Path) -> Tokenizer:
    """The run's tokenizer: data_dir/tokenizer.json when it exists (resume), else the one
    cfg.tokenizer names, else trained on the training documents."""
    saved = data_dir / "tokenizer.json"
    if saved.is_file():
        return Tokenizer.load(saved)
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    else:
        kind = "wordpiece" if cfg.task == "mlm" else "bpe"
        tok = train_tokenizer(lm_documents(cfg, "train"), kind, cfg.vocab_size)
    if cfg.task == "mlm" and tok.mask_id is None:
        raise DataError("--objective mlm needs a tokenizer with a [MASK] token; "
                        f"the tokenizer from {cfg.tokenizer!r} has none")
    tok.save(data_dir)
    return tok


def lm_shards(cfg, tok: Tokenizer, data_dir: Path, split: str, progress: bool) -> list[Path]:
    """Token shards of a split, written once into data_dir and reused (resume)."""
    index = data_dir / f"{split}.index.json"
    if index.is_file():
        return [data_dir / name for name in json.loads(index.read_text())]
    try:
        paths = write_shards(lm_documents(cfg, split), tok, data_dir, prefix=split,
                             progress=progress)
    except ValueError as exc:
        if "no text" not in str(exc):
            raise
        if split == "eval" and not cfg.eval_data:
            raise DataError(f"the eval split of --data is empty (eval_fraction "
                            f"{cfg.eval_fraction} of the documents, chosen by hash); give "
                            "--eval-data, more documents, or --set eval_fraction=0.1") from None
        raise DataError(f"the {split} data holds no text") from None
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps([p.name for p in paths]))
    os.replace(tmp, index)
    return paths


# --------------------------------------------------------------------------- sources

class LMSource:
    """Blocks of a token stream, as CLM batches or dynamically masked MLM batches."""

    def __init__(self, blocks: BlockDataset, task: str, masker: MLMMasker | None = None,
                 seed: int = 0):
        self.blocks, self.task, self.masker, self.seed = blocks, task, masker, seed

    def __len__(self) -> int:
        return len(self.blocks)

    def batch(self, indices, step: int, rows=None) -> dict:
        """`rows`: each index's position in the global batch (it keys the MLM masks)."""
        ids = self.blocks.batch(indices)                          # (B, L)
        if self.task == "clm":
            return collate.clm_batch(ids)
        rows = range(len(indices)) if rows is None else rows
        parts = [self.masker(ids[i:i + 1], _row_generator(self.seed, step, r))
                 for i, r in enumerate(rows)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _row_generator(seed: int, step: int, row: int) -> torch.Generator:
    key = (int(seed) * 1_000_003 + int(step)) * 1_000_003 + int(row)
    return torch.Generator().manual_seed(key % (2**63 - 1))


class LabelledSource:
    """Encoded (ids, label) items, padded per batch."""

    def __init__(self, items, pad_id: int, per_token: bool):
        self.items, self.pad_id, self.per_token = items, pad_id, per_token

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices, step: int = 0, rows=None) -> dict:
        return collate.pad_batch([self.items[int(i)] for i in indices], self.pad_id,
                                 self.per_token)


def valid_count(task: str, batch: dict) -> int:
    """Targets that contribute to the loss in `batch` (host tensors, counted with numpy: no
    device sync, and no tensor read that a step's host-read check would have to tell apart)."""
    labels = batch["labels"]
    if task == "classify":
        return int(labels.shape[0])
    if task == "clm":
        labels = labels[:, 1:]                                 # the model shifts by one
    return int(np.count_nonzero((labels != IGNORE_INDEX).numpy()))


def count_hints(task: str, batch: dict) -> dict:
    """The host-side counts an llmcore Transformer takes (`num_tokens`: real tokens of a padded
    batch; `num_targets`: MLM targets) so that its forward never waits for the device; counted
    with numpy on the collator's host tensors."""
    hints = {}
    if "attention_mask" in batch:
        hints["num_tokens"] = int(np.count_nonzero(batch["attention_mask"].numpy()))
    if task == "mlm" and "labels" in batch:
        hints["num_targets"] = valid_count(task, batch)
    return hints


def build_lm_sources(cfg, data_dir: Path, *, is_main: bool, sync) -> tuple:
    """(tokenizer, train source, eval source) for an LM run. The main process builds the
    tokenizer and shards; `sync()` (a barrier) lets the others read them afterwards."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        tok = lm_tokenizer(cfg, data_dir)
        train_paths = lm_shards(cfg, tok, data_dir, "train", cfg.progress)
        eval_paths = lm_shards(cfg, tok, data_dir, "eval", cfg.progress)
    sync()
    if not is_main:
        tok = Tokenizer.load(data_dir / "tokenizer.json")
        train_paths = lm_shards(cfg, tok, data_dir, "train", False)
        eval_paths = lm_shards(cfg, tok, data_dir, "eval", False)
    wrap = (tok.cls_id, tok.sep_id) if cfg.task == "mlm" else None
    masker = None
    if cfg.task == "mlm":
        masker = MLMMasker(tok.vocab_size, tok.mask_id, tok.special_ids,
                           mlm_probability=cfg.mlm_probability, whole_word=cfg.whole_word,
                           continuation_mask=tok.continuation_mask() if cfg.whole_word else None)
    train = LMSource(BlockDataset(TokenStream(train_paths), cfg.seq_len, wrap), cfg.task,
                     masker, cfg.seed)
    evals = LMSource(BlockDataset(TokenStream(eval_paths), cfg.seq_len, wrap), cfg.task,
                     masker, cfg.seed + 1)
    return tok, train, evals


def labelled_examples(cfg):
    """(train examples, eval examples) for classify/tokens: the embedded task by default."""
    if cfg.task == "classify":
        if not cfg.data:
            if cfg.eval_data:
                raise DataError("--eval-data needs --data (the embedded task has its own split)")
            train, evals, _ = corpus.default_classification_task()
            return ([collate.Example(r["text"], r["label"], "embedded task") for r in train],
                    [collate.Example(r["text"], r["label"], "embedded task") for r in evals])

        def load(path):
            return collate.load_classification(path, text_field=cfg.text_field,
                                               label_field=cfg.label_field)
    else:
        if not cfg.data:
            raise DataError("token classification needs --data FILE.jsonl with "
                            f"{cfg.tokens_field!r} and {cfg.tags_field!r} fields")

        def load(path):
            return collate.load_token_classification(path, tokens_field=cfg.tokens_field,
                                                     tags_field=cfg.tags_field)
    train = [e for p in cfg.data for e in load(p)]
    if cfg.eval_data:
        evals = [e for p in cfg.eval_data for e in load(p)]
    else:
        cut = int(cfg.eval_fraction * 2**64)
        in_eval = [corpus.text_hash(json.dumps(e.text), "split:") < cut for e in train]
        evals = [e for e, ev in zip(train, in_eval) if ev]
        train = [e for e, ev in zip(train, in_eval) if not ev]
        if not evals:
            raise DataError("the eval split is empty: give --eval-data or more data")
    return train, evals


def label_map_for(cfg, train_examples) -> dict[str, int]:
    if cfg.task == "classify":
        return collate.build_label_map(e.label for e in train_examples)
    return collate.build_label_map(t for e in train_examples for t in e.label)


def build_labelled_sources(cfg, tok: Tokenizer, label_map: dict[str, int], train_examples,
                           eval_examples) -> tuple:
    enc = (collate.encode_classification if cfg.task == "classify"
           else collate.encode_token_classification)
    per_token = cfg.task == "tokens"
    train = LabelledSource(enc(train_examples, tok, label_map, cfg.seq_len), tok.pad_id, per_token)
    evals = LabelledSource(enc(eval_examples, tok, label_map, cfg.seq_len), tok.pad_id, per_token)
    return train, evals


class EpochSampler:
    """Indices of a dataset in a fresh seeded permutation each epoch; state = (epoch, cursor),
    saved in checkpoints so a resumed run reads exactly the batches it would have read."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise DataError("the training data is empty")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=g).numpy()

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self.cursor >= self.n:
                self.epoch += 1
                self.cursor = 0
                self._perm = self._permutation(self.epoch)
            part = self._perm[self.cursor:self.cursor + k]
            out.append(part)
            self.cursor += len(part)
            k -= len(part)
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation(self.epoch)
