"""Tokenizers: training, special ids, round trips, save/load, HF vocab formats."""
import json

import pytest

from llmcore.data import Tokenizer, train_tokenizer


def test_wordpiece_specials_and_roundtrip(wordpiece, tmp_path):
    tok = wordpiece
    assert tok.kind == "wordpiece" and tok.vocab_size <= 311
    assert None not in (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id)
    assert tok.doc_separator == tok.sep_id
    ids = tok.encode("Return the number of items.")
    assert tok.decode(ids) == "return the number of items."
    assert tok.wrap(ids, 4) == [tok.cls_id] + ids[:2] + [tok.sep_id]
    saved = tok.save(tmp_path)
    assert Tokenizer.load(saved).encode("open the file") == tok.encode("open the file")
    loaded = Tokenizer.load(tmp_path)          # the directory form
    assert loaded.encode("open the file") == tok.encode("open the file")
    assert loaded.special_ids == tok.special_ids


def test_bpe_specials_and_roundtrip(bpe):
    tok = bpe
    assert tok.kind == "bpe" and tok.mask_id is None
    assert tok.eos_id is not None and tok.pad_id is not None and tok.pad_id != tok.eos_id
    text = "Raise ValueError when the argument is negative, über 😀."
    assert tok.decode(tok.encode(text)) == text                 # byte-level: lossless
    ids = tok.encode(text)
    assert tok.wrap(ids, 5) == ids[:4] + [tok.eos_id]
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_continuation_mask(wordpiece):
    mask = wordpiece.continuation_mask()
    vocab = wordpiece.backend.get_vocab()
    assert len(mask) == wordpiece.vocab_size
    assert any(mask)
    for tok, i in vocab.items():
        assert mask[i] == tok.startswith("##")


def test_training_is_deterministic(texts):
    a = train_tokenizer(texts, "bpe", vocab_size=320, min_frequency=1)
    b = train_tokenizer(texts, "bpe", vocab_size=320, min_frequency=1)
    assert a.backend.get_vocab() == b.backend.get_vocab()


def test_bad_arguments(tmp_path, texts):
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer(texts, "unigram")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, "bpe", vocab_size=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.load(tmp_path)


def test_load_hf_vocab_formats(wordpiece, bpe, tmp_path):
    # BERT: vocab.txt
    vocab = wordpiece.backend.get_vocab()
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    tok = Tokenizer.load(d)
    assert tok.kind == "wordpiece" and tok.mask_id == wordpiece.mask_id
    assert tok.encode("Open the file") == wordpiece.encode("Open the file")
    # GPT-2: vocab.json + merges.txt
    d = tmp_path / "gpt2"
    bpe.backend.model.save(str(d.mkdir() or d))
    tok = Tokenizer.load(d)
    assert tok.kind == "bpe"
    assert tok.encode("Open the file") == bpe.encode("Open the file")
    assert json.loads((d / "vocab.json").read_text())
