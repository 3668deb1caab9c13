"""The trainer's data side: document reading, the epoch sampler, MLM masks keyed by row."""
import numpy as np
import pytest
import torch

from llmcore.data import BlockDataset, DataError, MLMMasker, TokenStream, write_shards
from llmcore.train.data import EpochSampler, LMSource, iter_documents, valid_count


def test_iter_documents(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("first line\nstill first\n\nfirst, new paragraph\n\n\n\nsecond doc\n")
    j = tmp_path / "b.jsonl"
    j.write_text('{"text": "third"}\n\n{"text": "fourth"}\n')
    assert list(iter_documents([t, j])) == [
        "first line\nstill first\n\nfirst, new paragraph", "second doc", "third", "fourth"]
    assert list(iter_documents([tmp_path])) == list(iter_documents([t, j]))   # a directory
    j.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:1: missing string field 'text'"):
        list(iter_documents([j]))
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_documents([tmp_path / "c.txt"]))


def test_epoch_sampler_resumes_exactly():
    a = EpochSampler(10, seed=3)
    first = np.concatenate([a.take(4) for _ in range(4)])           # crosses an epoch
    assert sorted(first[:10]) == list(range(10)) and a.epoch == 1
    b = EpochSampler(10, seed=3)
    b.take(4)
    b.take(4)
    c = EpochSampler(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert np.array_equal(np.concatenate([c.take(4), c.take(4)]), first[8:])
    assert not np.array_equal(EpochSampler(10, seed=4).take(10), first[:10])


def test_mlm_masks_do_not_depend_on_the_split(tmp_path, wordpiece_like):
    tok = wordpiece_like
    texts = [f"open file {i} and read the stream" for i in range(30)]
    stream = TokenStream(write_shards(texts, tok, tmp_path))
    masker = MLMMasker(tok.vocab_size, tok.mask_id, tok.special_ids, mlm_probability=0.3)
    src = LMSource(BlockDataset(stream, 12, wrap=(tok.cls_id, tok.sep_id)), "mlm", masker, seed=5)
    idx = np.array([3, 1, 4, 0])
    whole = src.batch(idx, step=7, rows=np.arange(4))
    halves = [src.batch(idx[:2], 7, np.arange(2)), src.batch(idx[2:], 7, np.arange(2, 4))]
    for k in whole:
        assert torch.equal(whole[k], torch.cat([h[k] for h in halves]))
    assert not torch.equal(src.batch(idx, 8, np.arange(4))["labels"], whole["labels"])
    assert valid_count("mlm", whole) == int((whole["labels"] != -100).sum())
    assert valid_count("clm", {"labels": torch.zeros(2, 5)}) == 8


@pytest.fixture()
def wordpiece_like():
    from llmcore.data import train_tokenizer
    return train_tokenizer(["open file and read the stream", "write the file"] * 10,
                           "wordpiece", vocab_size=300, min_frequency=1)
