"""Tokenizers: train WordPiece (MLM) or byte-level BPE (CLM) with the `tokenizers` package, or
load a Hugging Face tokenizer (a tokenizer.json file, or a directory holding tokenizer.json,
vocab.txt, or vocab.json + merges.txt).

`Tokenizer` is a thin wrapper that knows the special-token ids the collators need (pad, mask,
cls/sep for encoders, eos for decoders) and which tokens continue a word (for whole-word
masking). It saves as a single `tokenizer.json` that Hugging Face's loaders also read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

KINDS = ("wordpiece", "bpe")

# Special tokens of the tokenizers llmcore trains; loaded tokenizers are matched by these names.
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIALS = ("<|endoftext|>", "<|pad|>")
_ROLE_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]"),
}


def _tk():
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("llmcore's data pipeline needs the `tokenizers` package: "
                          "pip install 'tokenizers>=0.15'") from exc
    return tokenizers


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids llmcore's collators use."""

    def __init__(self, backend):
        self.backend = backend
        model_type = type(backend.model).__name__
        self.kind = "wordpiece" if model_type == "WordPiece" else "bpe"
        vocab = backend.get_vocab(with_added_tokens=True)
        ids = {}
        for role, names in _ROLE_NAMES.items():
            ids[role] = next((vocab[n] for n in names if n in vocab), None)
        self.unk_id = ids["unk"]
        self.mask_id = ids["mask"]
        if self.kind == "wordpiece":
            self.cls_id, self.sep_id = ids["cls"], ids["sep"]
            self.bos_id, self.eos_id = self.cls_id, self.sep_id
        else:
            self.cls_id = self.sep_id = None
            self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        # a decoder vocabulary without a pad token (GPT-2) pads with eos; attention masks and
        # ignore_index keep padding out of every result
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        if self.pad_id is None:
            raise ValueError("tokenizer has neither a pad nor an end-of-text token; "
                             f"expected one of {_ROLE_NAMES['pad'] + _ROLE_NAMES['eos']}")
        self.special_ids = sorted({i for i in ids.values() if i is not None}
                                  | {vocab[t.content] for t in _added_specials(backend)})

    # -- sizes and encoding ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def wrap(self, ids: list[int], max_length: int) -> list[int]:
        """One model input from content ids, truncated to `max_length` in total:
        [CLS] ids [SEP] for WordPiece, ids [EOS] for BPE (the last token then marks the end,
        which last-token pooling reads)."""
        if self.kind == "wordpiece":
            return [self.cls_id] + ids[: max_length - 2] + [self.sep_id]
        if self.eos_id is None:
            return ids[:max_length]
        return ids[: max_length - 1] + [self.eos_id]

    @property
    def doc_separator(self) -> int:
        """The id placed between documents in a token stream ([SEP] or end-of-text)."""
        if self.kind == "wordpiece":
            return self.sep_id
        return self.eos_id if self.eos_id is not None else self.pad_id

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def continuation_mask(self) -> list[bool]:
        """Per id, True when the token continues the previous word (WordPiece '##' pieces).
        Byte-level BPE marks word starts instead (a leading 'Ġ' for a space); there a token
        continues a word when it is neither special nor starts with 'Ġ'."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        mask = [False] * self.vocab_size
        special = set(self.special_ids)
        for tok, i in vocab.items():
            if i in special or i >= len(mask):
                continue
            if self.kind == "wordpiece":
                mask[i] = tok.startswith("##")
            else:
                mask[i] = not tok.startswith("\u0120") and tok[:1].isalnum()
        return mask

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "tokenizer.json"
        self.backend.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a tokenizer.json file, or a directory with tokenizer.json, vocab.txt (BERT) or
        vocab.json + merges.txt (GPT-2)."""
        tk = _tk()
        p = Path(path)
        if p.is_file():
            return cls(tk.Tokenizer.from_file(str(p)))
        if not p.is_dir():
            raise FileNotFoundError(f"tokenizer path {str(p)!r} does not exist")
        if (p / "tokenizer.json").is_file():
            return cls(tk.Tokenizer.from_file(str(p / "tokenizer.json")))
        if (p / "vocab.txt").is_file():
            lower = _tokenizer_config(p).get("do_lower_case", True)
            model = tk.models.WordPiece.from_file(str(p / "vocab.txt"), unk_token="[UNK]")
            return cls(_wordpiece_pipeline(tk.Tokenizer(model), lowercase=lower))
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            model = tk.models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt"))
            return cls(_bpe_pipeline(tk.Tokenizer(model)))
        raise FileNotFoundError(f"no tokenizer in {str(p)!r}: expected tokenizer.json, vocab.txt, "
                                "or vocab.json + merges.txt")


def _added_specials(backend):
    try:
        return [t for t in backend.get_added_tokens_decoder().values() if t.special]
    except AttributeError:  # older tokenizers
        return []


def _tokenizer_config(directory: Path) -> dict:
    f = directory / "tokenizer_config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def _wordpiece_pipeline(tok, lowercase: bool = True):
    tk = _tk()
    tok.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tk.decoders.WordPiece(prefix="##")
    return tok


def _bpe_pipeline(tok):
    tk = _tk()
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int = 8192,
                    *, lowercase: bool = True, min_frequency: int = 2) -> Tokenizer:
    """Train a tokenizer on `texts`: "wordpiece" (BERT-style, for MLM; specials [PAD] [UNK] [CLS]
    [SEP] [MASK]) or "bpe" (GPT-2-style byte-level BPE, for CLM; specials <|endoftext|> <|pad|>).
    Deterministic for the same texts and settings."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (byte alphabet + specials), "
                         f"got {vocab_size!r}")
    tk = _tk()
    if kind == "wordpiece":
        tok = _wordpiece_pipeline(tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]")),
                                  lowercase=lowercase)
        trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                               special_tokens=list(WORDPIECE_SPECIALS),
                                               show_progress=False)
    else:
        tok = _bpe_pipeline(tk.Tokenizer(tk.models.BPE()))
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                         special_tokens=list(BPE_SPECIALS),
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return Tokenizer(tok)
