"""Token shards: flat arrays of token ids in memory-mapped files.

File layout (little-endian), a 32-byte header then the tokens:

    offset 0   8 bytes  magic b"LLMCTOK\\0"
    offset 8   uint32   format version (1)
    offset 12  uint32   bytes per token: 2 (uint16) or 4 (uint32)
    offset 16  uint64   token count
    offset 24  8 bytes  reserved (zero)
    offset 32  count * bytes-per-token token ids

`ShardWriter` streams tokens to a temporary file and publishes it (header patched, fsync, rename)
only when closed cleanly, so a shard on disk is always complete. `Shard` maps a file without
reading it; slicing reads only the pages it touches. `TokenStream` joins shards into one
sequence of tokens, the view the CLM and MLM block datasets read.
"""
from __future__ import annotations

import bisect
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MAGIC = b"LLMCTOK\0"
VERSION = 1
HEADER_BYTES = 32
_HEADER = struct.Struct("<8sIIQ8x")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardError(ValueError):
    """A token shard file is missing, truncated or not a shard."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


class ShardWriter:
    """Streams token ids into `path`. Use as a context manager; on an exception nothing is
    published and the temporary file is removed."""

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = vocab_size
        self.count = 0
        self._tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._f.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range "
                             f"[{arr.min()}, {arr.max()}]")
        self._f.write(arr.astype(self.dtype, copy=False).tobytes())
        self.count += arr.size

    def close(self) -> Path:
        self._f.seek(0)
        self._f.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Shard:
    """A read-only memory map of one shard file; `len()` tokens, numpy slicing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except FileNotFoundError:
            raise ShardError(f"token shard {str(self.path)!r} does not exist") from None
        if len(head) < HEADER_BYTES:
            raise ShardError(f"{self.path}: too short for a token shard header")
        magic, version, width, count = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ShardError(f"{self.path}: not an llmcore token shard (bad magic {magic!r})")
        if version != VERSION:
            raise ShardError(f"{self.path}: shard format version {version}, this llmcore reads "
                             f"{VERSION}")
        if width not in _DTYPES:
            raise ShardError(f"{self.path}: bad token width {width} (expected 2 or 4)")
        if size != HEADER_BYTES + count * width:
            raise ShardError(f"{self.path}: {size} bytes on disk, header promises "
                             f"{HEADER_BYTES + count * width} ({count} tokens); truncated?")
        self.dtype = _DTYPES[width]
        self.count = count
        self._map = (np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                               shape=(count,)) if count else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, idx):
        return self._map[idx]


class TokenStream:
    """Several shards read as one token sequence. `read(start, n)` returns int64 ids."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.shards = [Shard(p) for p in paths]
        if not self.shards:
            raise ShardError("no token shards given")
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + len(s))

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, start: int, n: int) -> np.ndarray:
        if start < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) outside [0, {len(self)})")
        out = np.empty(n, dtype=np.int64)
        pos, filled = start, 0
        while filled < n:
            k = bisect.bisect_right(self._starts, pos) - 1
            local = pos - self._starts[k]
            take = min(n - filled, len(self.shards[k]) - local)
            out[filled:filled + take] = self.shards[k][local:local + take]
            filled += take
            pos += take
        return out


def write_shards(texts: Iterable[str], tokenizer, out_dir: str | os.PathLike, *,
                 prefix: str = "train", tokens_per_shard: int = 2**27, batch_docs: int = 1024,
                 progress: bool = False) -> list[Path]:
    """Tokenise `texts` (any iterable, streamed in batches of `batch_docs` documents) into shards
    `out_dir/{prefix}-00000.bin`, ... of at most `tokens_per_shard` tokens, documents separated by
    `tokenizer.doc_separator`. Memory stays bounded by one batch of documents."""
    if tokens_per_shard < 1:
        raise ValueError(f"tokens_per_shard must be >= 1, got {tokens_per_shard}")
    out = Path(out_dir)
    sep = tokenizer.doc_separator
    paths: list[Path] = []
    writer: ShardWriter | None = None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc=f"tokenising {prefix}", unit=" docs", leave=False)

    def flush(batch):
        nonlocal writer
        for ids in tokenizer.encode_batch(batch):
            arr = np.asarray(ids + [sep], dtype=np.int64)
            while arr.size:
                if writer is None:
                    writer = ShardWriter(out / f"{prefix}-{len(paths):05d}.bin",
                                         tokenizer.vocab_size)
                room = tokens_per_shard - writer.count
                writer.write(arr[:room])
                arr = arr[room:]
                if writer.count >= tokens_per_shard:
                    paths.append(writer.close())
                    writer = None
        if bar is not None:
            bar.update(len(batch))

    try:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) >= batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        if writer is not None:
            paths.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if bar is not None:
            bar.close()
    if not paths:
        raise ValueError("no text to tokenise: the input had no documents")
    return paths
