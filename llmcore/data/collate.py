"""Batches for each objective.

- CLM: the token stream cut into fixed-length blocks (packing: documents run on across blocks,
  separated by end-of-text), `labels = input_ids` (the model shifts them by one, as Hugging
  Face models do).
- MLM: blocks of `[CLS] ... [SEP]`, then dynamic masking at batch time: each non-special token is
  chosen with probability `mlm_probability` (15%); a chosen token becomes [MASK] 80% of the time,
  a random token 10%, stays itself 10%; `labels` hold the original id at chosen positions and
  -100 elsewhere. `whole_word=True` chooses whole words (a word start and its '##' pieces).
  Masking draws from a generator seeded per batch, so a resumed run masks exactly as before.
- Sequence classification from JSONL or CSV, token classification from JSONL, padded per batch.

Loaders raise `DataError` naming the file and line for malformed input.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmcore.data.shards import TokenStream

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad user data; the message names the file and line."""


# --------------------------------------------------------------------------- LM blocks

class BlockDataset:
    """Fixed-length blocks of a token stream: block i is tokens [i*L, (i+1)*L) for CLM, or
    [CLS] + tokens [i*(L-2), (i+1)*(L-2)) + [SEP] for MLM (`wrap=(cls_id, sep_id)`)."""

    def __init__(self, stream: TokenStream, block_size: int, wrap: tuple[int, int] | None = None):
        if block_size < (3 if wrap else 2):
            raise ValueError(f"block_size must be >= {3 if wrap else 2}, got {block_size}")
        self.stream = stream
        self.block_size = block_size
        self.wrap = wrap
        self.content = block_size - (2 if wrap else 0)
        self.n_blocks = len(stream) // self.content
        if self.n_blocks == 0:
            raise DataError(f"the data has {len(stream)} tokens, fewer than one block of "
                            f"{self.content}; use more data or a smaller --seq-len")

    def __len__(self) -> int:
        return self.n_blocks

    def block(self, i: int) -> np.ndarray:
        ids = self.stream.read(i * self.content, self.content)
        if self.wrap:
            ids = np.concatenate([[self.wrap[0]], ids, [self.wrap[1]]])
        return ids

    def batch(self, indices) -> torch.Tensor:
        """(B, L) int64 input ids of the blocks at `indices`."""
        return torch.from_numpy(np.stack([self.block(int(i)) for i in indices]))


def clm_batch(input_ids: torch.Tensor) -> dict:
    """CLM batch: labels are the inputs (shifted inside the model)."""
    return {"input_ids": input_ids, "labels": input_ids.clone()}


class MLMMasker:
    """Dynamic MLM masking (BERT's 80/10/10 recipe) that never touches special tokens."""

    def __init__(self, vocab_size: int, mask_id: int, special_ids, *,
                 mlm_probability: float = 0.15, whole_word: bool = False,
                 continuation_mask=None):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_id is None:
            raise ValueError("MLM needs a tokenizer with a [MASK] token (train a WordPiece "
                             "tokenizer, or load one that has it)")
        if whole_word and continuation_mask is None:
            raise ValueError("whole_word=True needs continuation_mask "
                             "(from tokenizer.continuation_mask())")
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.p = mlm_probability
        self.whole_word = whole_word
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[list(special_ids)] = True
        # random replacements are drawn from the non-special ids only
        self.regular_ids = torch.nonzero(~self.special).flatten()
        self.continuation = (torch.as_tensor(continuation_mask, dtype=torch.bool)
                             if continuation_mask is not None else None)

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> dict:
        ids = input_ids.clone()                           # (B, L)
        special = self.special[ids]                       # (B, L) never chosen
        if self.whole_word:
            # a word = a start token and the continuation pieces after it; choose per word
            cont = self.continuation[ids] & ~special
            word_start = ~cont
            word_id = torch.cumsum(word_start.long(), dim=1) - 1      # (B, L) word index in row
            pick_word = torch.rand(ids.shape, generator=generator) < self.p
            chosen = torch.gather(pick_word, 1, word_id) & ~special
        else:
            chosen = (torch.rand(ids.shape, generator=generator) < self.p) & ~special
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        r = torch.rand(ids.shape, generator=generator)
        to_mask = chosen & (r < 0.8)
        to_random = chosen & (r >= 0.8) & (r < 0.9)
        rand_ids = self.regular_ids[torch.randint(len(self.regular_ids), ids.shape,
                                                  generator=generator)]
        ids = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        ids = torch.where(to_random, rand_ids, ids)
        return {"input_ids": ids, "labels": labels}


# --------------------------------------------------------------------------- labelled data

@dataclass
class Example:
    text: str | list[str]          # a string, or pre-split words for token classification
    label: object                  # a class label, or a list of tags
    where: str                     # "file:line", for error messages


def _read_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _read_csv(path: Path, delimiter: str):
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            raise DataError(f"{path}:1: empty file, expected a header row")
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more fields than the header has")
            yield reader.line_num, row


def _check_path(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    return p


def load_classification(path: str | os.PathLike, *, text_field: str = "text",
                        label_field: str = "label") -> list[Example]:
    """Examples from a .jsonl/.json-lines or .csv/.tsv file with a text and a label field."""
    p = _check_path(path)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _read_csv(p, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = _read_jsonl(p)
    else:
        raise DataError(f"{p}: unknown format {suffix!r}; expected .jsonl, .csv or .tsv")
    out = []
    for n, row in rows:
        for field in (text_field, label_field):
            if field not in row or row[field] is None:
                raise DataError(f"{p}:{n}: missing field {field!r} (fields: {sorted(row)})")
        text, label = row[text_field], row[label_field]
        if not isinstance(text, str):
            raise DataError(f"{p}:{n}: field {text_field!r} must be a string, "
                            f"got {type(text).__name__}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{p}:{n}: field {label_field!r} must be a string or an int, "
                            f"got {label!r}")
        out.append(Example(text, label, f"{p}:{n}"))
    if not out:
        raise DataError(f"{p}: no examples")
    return out


def load_token_classification(path: str | os.PathLike, *, tokens_field: str = "tokens",
                              tags_field: str = "tags") -> list[Example]:
    """Examples from a JSONL file whose lines hold a list of words and a list of tags."""
    p = _check_path(path)
    out = []
    for n, row in _read_jsonl(p):
        for field in (tokens_field, tags_field):
            if not isinstance(row.get(field), list):
                raise DataError(f"{p}:{n}: field {field!r} must be a list")
        words, tags = row[tokens_field], row[tags_field]
        if len(words) != len(tags):
            raise DataError(f"{p}:{n}: {len(words)} tokens but {len(tags)} tags")
        if not all(isinstance(w, str) for w in words):
            raise DataError(f"{p}:{n}: every entry of {tokens_field!r} must be a string")
        if not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tags):
            raise DataError(f"{p}:{n}: every tag must be a string or an int")
        out.append(Example(words, tags, f"{p}:{n}"))
    if not out:
        raise DataError(f"{p}: no examples")
    return out


def build_label_map(labels) -> dict[str, int]:
    """Label (as its string) -> id. Int labels keep numeric order, strings sort."""
    values = set(labels)
    if all(isinstance(v, int) for v in values):
        return {str(v): i for i, v in enumerate(sorted(values))}
    return {str(v): i for i, v in enumerate(sorted(str(v) for v in values))}


def _label_id(label_map: dict[str, int], label, where: str) -> int:
    key = str(label)
    if key not in label_map:
        raise DataError(f"{where}: label {label!r} was not seen in training "
                        f"(known: {sorted(label_map)})")
    return label_map[key]


def encode_classification(examples: list[Example], tokenizer, label_map: dict[str, int],
                          max_length: int) -> list[tuple[list[int], int]]:
    """(input ids with specials, label id) per example, truncated to `max_length`."""
    ids = tokenizer.encode_batch([e.text for e in examples])
    return [(tokenizer.wrap(x, max_length), _label_id(label_map, e.label, e.where))
            for x, e in zip(ids, examples)]


def encode_token_classification(examples: list[Example], tokenizer, label_map: dict[str, int],
                                max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, per-token labels) per example: each word's first piece carries its tag,
    other pieces and specials -100; truncated to `max_length`."""
    out = []
    for e in examples:
        ids: list[int] = []
        labels: list[int] = []
        for word, tag in zip(e.text, e.label):
            pieces = tokenizer.encode(word if tokenizer.kind == "wordpiece" or not ids
                                      else " " + word)
            if not pieces:
                continue
            ids += pieces
            labels += [_label_id(label_map, tag, e.where)] + [IGNORE_INDEX] * (len(pieces) - 1)
        wrapped = tokenizer.wrap(ids, max_length)
        # the same truncation and specials as wrap(), with -100 on the specials
        if tokenizer.kind == "wordpiece":
            labels = [IGNORE_INDEX] + labels[: max_length - 2] + [IGNORE_INDEX]
        elif tokenizer.eos_id is not None:
            labels = labels[: max_length - 1] + [IGNORE_INDEX]
        else:
            labels = labels[:max_length]
        out.append((wrapped, labels))
    return out


def pad_batch(items, pad_id: int, per_token_labels: bool) -> dict:
    """Right-pad a list of (ids, label) to the longest in the batch.
    Returns input_ids (B, T), attention_mask (B, T) and labels ((B,) or (B, T))."""
    T = max(len(ids) for ids, _ in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = (torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if per_token_labels
              else torch.empty(B, dtype=torch.long))
    for b, (ids, lab) in enumerate(items):
        input_ids[b, :len(ids)] = torch.as_tensor(ids)
        mask[b, :len(ids)] = 1
        if per_token_labels:
            labels[b, :len(lab)] = torch.as_tensor(lab)
        else:
            labels[b] = lab
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
