"""Collators: CLM blocks, MLM masking statistics, labelled data loaders and their errors."""
import json

import numpy as np
import pytest
import torch

from llmcore.data import (IGNORE_INDEX, BlockDataset, DataError, MLMMasker, TokenStream,
                          build_label_map, clm_batch, encode_classification,
                          encode_token_classification, load_classification,
                          load_token_classification, pad_batch, write_shards)


@pytest.fixture()
def stream(tmp_path, wordpiece):
    texts = [f"open the file number {i} and return the stream" for i in range(40)]
    return TokenStream(write_shards(texts, wordpiece, tmp_path, tokens_per_shard=53))


def test_clm_blocks(stream):
    ds = BlockDataset(stream, 17)
    assert len(ds) == len(stream) // 17
    b = ds.batch([0, 3])
    assert b.shape == (2, 17) and b.dtype == torch.int64
    assert np.array_equal(b[1].numpy(), stream.read(3 * 17, 17))
    batch = clm_batch(b)
    assert torch.equal(batch["labels"], batch["input_ids"])
    with pytest.raises(DataError, match="fewer than one block"):
        BlockDataset(stream, len(stream) + 1)


def test_mlm_blocks_are_wrapped(stream, wordpiece):
    ds = BlockDataset(stream, 13, wrap=(wordpiece.cls_id, wordpiece.sep_id))
    b = ds.batch([2])[0]
    assert b[0] == wordpiece.cls_id and b[-1] == wordpiece.sep_id and len(b) == 13
    assert np.array_equal(b[1:-1].numpy(), stream.read(2 * 11, 11))


def _masker(tok, **kw):
    return MLMMasker(tok.vocab_size, tok.mask_id, tok.special_ids,
                     continuation_mask=tok.continuation_mask(), **kw)


def test_mlm_masking_rates_and_specials(wordpiece):
    tok = wordpiece
    regular = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(regular, dtype=torch.long)[torch.randint(len(regular), (64, 257),
                                                                 generator=g)]
    ids[:, 0], ids[:, -1], ids[:, 100] = tok.cls_id, tok.sep_id, tok.pad_id
    out = _masker(tok)(ids, torch.Generator().manual_seed(1))
    chosen = out["labels"] != IGNORE_INDEX
    special = torch.isin(ids, torch.tensor(tok.special_ids))
    assert not (chosen & special).any(), "special tokens must never be masked"
    assert torch.equal(out["labels"][chosen], ids[chosen])
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])
    rate = chosen.float().sum() / (~special).sum()
    assert 0.13 < rate < 0.17
    n = chosen.sum()
    masked = (out["input_ids"] == tok.mask_id) & chosen
    kept = (out["input_ids"] == ids) & chosen
    assert 0.76 < masked.sum() / n < 0.84
    assert 0.07 < kept.sum() / n < 0.14     # 10% kept + random draws that hit the same id
    # random replacements are never special tokens
    assert not torch.isin(out["input_ids"][chosen & ~masked], torch.tensor(tok.special_ids)).any()
    # same generator seed -> same masks (exact resume)
    again = _masker(tok)(ids, torch.Generator().manual_seed(1))
    assert torch.equal(again["input_ids"], out["input_ids"])
    rate30 = (_masker(tok, mlm_probability=0.3)(ids, torch.Generator().manual_seed(2))["labels"]
              != IGNORE_INDEX).float().sum() / (~special).sum()
    assert 0.27 < rate30 < 0.33


def test_whole_word_masking(wordpiece):
    tok = wordpiece
    text = " ".join(["encoding registered containerisation jumps"] * 40)
    ids = torch.tensor([tok.wrap(tok.encode(text), 400)])
    cont = torch.tensor(tok.continuation_mask())[ids]
    assert cont.any(), "the test text must contain multi-piece words"
    out = _masker(tok, whole_word=True)(ids, torch.Generator().manual_seed(3))
    chosen = (out["labels"] != IGNORE_INDEX)[0]
    assert chosen.any()
    # every continuation piece is chosen exactly when its word start is
    starts = torch.cumsum((~cont[0]).long(), 0)
    for w in starts.unique():
        sel = chosen[starts == w]
        assert sel.all() or not sel.any()


def test_masker_arguments(wordpiece, bpe):
    with pytest.raises(ValueError, match="mlm_probability"):
        _masker(wordpiece, mlm_probability=0.0)
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        MLMMasker(bpe.vocab_size, bpe.mask_id, bpe.special_ids)
    with pytest.raises(ValueError, match="continuation_mask"):
        MLMMasker(wordpiece.vocab_size, wordpiece.mask_id, wordpiece.special_ids, whole_word=True)


def test_classification_jsonl_csv_and_label_map(tmp_path, wordpiece):
    j = tmp_path / "a.jsonl"
    j.write_text('{"sentence": "open the file", "y": "io"}\n\n'
                 '{"sentence": "the quick fox", "y": "animals"}\n')
    ex = load_classification(j, text_field="sentence", label_field="y")
    assert [e.label for e in ex] == ["io", "animals"] and ex[1].where.endswith("a.jsonl:3")
    lm = build_label_map(e.label for e in ex)
    assert lm == {"animals": 0, "io": 1}
    enc = encode_classification(ex, wordpiece, lm, max_length=4)
    assert enc[0][1] == 1 and len(enc[0][0]) <= 4 and enc[0][0][0] == wordpiece.cls_id
    c = tmp_path / "b.csv"
    c.write_text('text,label\n"open, the file",10\nthe fox,2\n')
    ex = load_classification(c)
    assert ex[0].text == "open, the file"
    assert build_label_map(int(e.label) for e in ex) == {"2": 0, "10": 1}
    batch = pad_batch(encode_classification(ex, wordpiece, {"10": 0, "2": 1}, 32),
                      wordpiece.pad_id, per_token_labels=False)
    assert batch["labels"].tolist() == [0, 1]
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][1, lengths[1]:] == wordpiece.pad_id).all()


@pytest.mark.parametrize("content, match", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', r"b.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n', r"b.jsonl:1: missing field 'label'"),
    ('[1, 2]\n', r"b.jsonl:1: expected a JSON object"),
    ('{"text": 3, "label": "x"}\n', r"b.jsonl:1: field 'text' must be a string"),
    ('{"text": "a", "label": [1]}\n', r"b.jsonl:1: field 'label' must be a string or an int"),
    ('\n', r"no examples"),
])
def test_classification_errors_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "b.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_classification(p)


def test_classification_file_errors(tmp_path, wordpiece):
    with pytest.raises(DataError, match="does not exist"):
        load_classification(tmp_path / "missing.jsonl")
    p = tmp_path / "c.csv"
    p.write_text("text,label\na,b,c\n")
    with pytest.raises(DataError, match=r"c.csv:2: more fields"):
        load_classification(p)
    p = tmp_path / "d.txt"
    p.write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        load_classification(p)
    p = tmp_path / "e.jsonl"
    p.write_text('{"text": "a", "label": "new"}\n')
    with pytest.raises(DataError, match=r"e.jsonl:1: label 'new' was not seen in training"):
        encode_classification(load_classification(p), wordpiece, {"old": 0}, 16)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_token_classification(tmp_path, kind, request):
    tok = request.getfixturevalue(kind)
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"tokens": ["Open", "containerisation", "file"],
                             "tags": ["B-V", "O", "B-N"]}) + "\n")
    ex = load_token_classification(p)
    lm = build_label_map(t for e in ex for t in e.label)
    (ids, labels), = encode_token_classification(ex, tok, lm, max_length=64)
    assert len(ids) == len(labels)
    tagged = [lab for lab in labels if lab != IGNORE_INDEX]
    assert tagged == [lm["B-V"], lm["O"], lm["B-N"]]           # one label per word
    assert len(ids) > 4                                         # the long word split in pieces
    (ids, labels), = encode_token_classification(ex, tok, lm, max_length=3)
    assert len(ids) == len(labels) == 3
    batch = pad_batch([(ids, labels), (ids[:2], labels[:2])], tok.pad_id, per_token_labels=True)
    assert batch["labels"][1, 2] == IGNORE_INDEX


def test_token_classification_errors(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: 2 tokens but 1 tags"):
        load_token_classification(p)
    p.write_text('{"tokens": "a b", "tags": ["O"]}\n')
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'tokens' must be a list"):
        load_token_classification(p)
