"""Token shards: header, streaming writes, memmap reads, corruption detection."""
import numpy as np
import pytest

from llmcore.data import Shard, ShardError, ShardWriter, TokenStream, write_shards
from llmcore.data.shards import HEADER_BYTES


def test_roundtrip_and_header(tmp_path):
    p = tmp_path / "a.bin"
    with ShardWriter(p, vocab_size=70_000) as w:      # > 2**16 -> uint32
        w.write([1, 2, 69_999])
        w.write(np.arange(5))
        w.write([])
    s = Shard(p)
    assert s.dtype == np.dtype("<u4") and len(s) == 8
    assert list(s[:]) == [1, 2, 69_999, 0, 1, 2, 3, 4]
    assert p.stat().st_size == HEADER_BYTES + 8 * 4
    assert isinstance(s._map, np.memmap)              # mapped, not read
    with ShardWriter(tmp_path / "b.bin", vocab_size=1000) as w:
        w.write(np.arange(999))
    assert Shard(tmp_path / "b.bin").dtype == np.dtype("<u2")


def test_writer_rejects_bad_ids_and_publishes_nothing_on_error(tmp_path):
    p = tmp_path / "a.bin"
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"):
        with ShardWriter(p, vocab_size=10) as w:
            w.write([1, 2, 10])
    assert not p.exists() and not list(tmp_path.iterdir())


def test_corrupt_shards_are_refused(tmp_path):
    p = tmp_path / "a.bin"
    with ShardWriter(p, vocab_size=100) as w:
        w.write(np.arange(50))
    data = p.read_bytes()
    p.write_bytes(data[:-3])
    with pytest.raises(ShardError, match="truncated"):
        Shard(p)
    p.write_bytes(b"NOTASHRD" + data[8:])
    with pytest.raises(ShardError, match="bad magic"):
        Shard(p)
    with pytest.raises(ShardError, match="does not exist"):
        Shard(tmp_path / "missing.bin")


def test_stream_reads_across_shards(tmp_path, bpe):
    texts = [f"document number {i} says hello" for i in range(57)]
    paths = write_shards(iter(texts), bpe, tmp_path, tokens_per_shard=97, batch_docs=10)
    assert len(paths) > 2
    stream = TokenStream(paths)
    expected = np.concatenate([ids + [bpe.doc_separator] for ids in bpe.encode_batch(texts)])
    assert len(stream) == expected.size
    assert all(len(Shard(p)) <= 97 for p in paths)
    for start, n in [(0, 10), (90, 20), (95, 200), (len(stream) - 7, 7)]:
        assert np.array_equal(stream.read(start, n), expected[start:start + n])
    with pytest.raises(IndexError):
        stream.read(len(stream) - 2, 5)
    with pytest.raises(ValueError, match="no text"):
        write_shards([], bpe, tmp_path / "empty")
