"""The embedded default corpus and the default classification task.

Every Python installation carries a few megabytes of English technical prose: the docstrings of
its standard library and the `pydoc_data.topics` help texts. With no data given, `llmcore
pretrain` trains on them and `llmcore finetune` on a labelled task built from the same source
(docstring -> its top-level standard-library package). Both are built in seconds with `ast`, are
deterministic for a given Python version, and are cached as JSONL under the cache directory
(`$LLMCORE_CACHE`, else `~/.cache/llmcore`).
"""
from __future__ import annotations

import ast
import collections
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

# Bump when the extraction rules change, so stale caches are rebuilt.
CORPUS_VERSION = 1

# Directories and files that hold tests, not library code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One docstring (or help topic) and where it came from."""
    text: str
    source: str   # "module.path:qualname" for docstrings, "pydoc_data.topics:NAME" for topics
    package: str  # top-level stdlib package or module name; "pydoc_data" for topics


def cache_dir() -> Path:
    """Where built corpora are cached: $LLMCORE_CACHE, else ~/.cache/llmcore."""
    env = os.environ.get("LLMCORE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llmcore"


def text_hash(text: str, salt: str = "") -> int:
    """A stable 64-bit hash of a text (Python's hash() is salted per process). Different uses
    take different salts so that, e.g., balancing and splitting do not select the same texts."""
    return int.from_bytes(hashlib.sha1((salt + text).encode("utf-8")).digest()[:8], "little")


def _is_test_path(parts: list[str], filename: str) -> bool:
    return (filename.startswith("test_") or filename == "conftest.py"
            or any(p in _SKIP_DIRS or p.startswith("test") for p in parts))


def _docstrings_of(tree: ast.Module, module: str):
    """(qualname, docstring) for the module and every class/function in it, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc
    stack = [(tree, module)]
    while stack:
        node, prefix = stack.pop()
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for child in children:
            name = f"{prefix}.{child.name}"
            doc = ast.get_docstring(child, clean=True)
            if doc:
                yield name, doc
        stack.extend((c, f"{prefix}.{c.name}") for c in reversed(children))


def _scan_stdlib() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        parts = list(rel.parts)
        # walk in a fixed order so the corpus is the same on every run
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith("test"))
        for fn in sorted(filenames):
            if not fn.endswith(".py") or _is_test_path(parts, fn):
                continue
            path = Path(dirpath) / fn
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are templates or deliberately invalid
            mod_parts = parts + ([] if fn == "__init__.py" else [fn[:-3]])
            module = ".".join(mod_parts) or fn[:-3]
            package = parts[0] if parts else fn[:-3]
            for qualname, text in _docstrings_of(tree, module):
                text = text.strip()
                if text and text not in seen:
                    seen.add(text)
                    docs.append(Document(text, qualname, package))
    return docs


def _scan_topics(seen: set[str]) -> list[Document]:
    from pydoc_data import topics

    docs = []
    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if text and text not in seen:
            seen.add(text)
            docs.append(Document(text, f"pydoc_data.topics:{name}", "pydoc_data"))
    return docs


def _cache_path(name: str, directory: str | os.PathLike | None) -> Path:
    d = Path(directory) if directory is not None else cache_dir()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-v{CORPUS_VERSION}"
    return d / f"{name}-{tag}.jsonl"


def _write_jsonl_atomic(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_documents(cache: str | os.PathLike | None = None) -> list[Document]:
    """All documents of the embedded corpus: stdlib docstrings (tests excluded, deduplicated) then
    the pydoc topics, in a fixed order. Cached as JSONL; an unwritable cache only costs a
    rebuild."""
    path = _cache_path("stdlib-corpus", cache)
    if path.exists():
        try:
            with path.open(encoding="utf-8") as f:
                return [Document(**json.loads(line)) for line in f]
        except (OSError, ValueError, TypeError):
            pass  # a damaged cache file is rebuilt below
    docs = _scan_stdlib()
    docs += _scan_topics({d.text for d in docs})
    try:
        _write_jsonl_atomic(path, (d.__dict__ for d in docs))
    except OSError as exc:
        warnings.warn(f"could not cache the default corpus at {path}: {exc}", stacklevel=2)
    return docs


def split_by_hash(texts: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/eval split: a text goes to eval when its hash falls in the first
    `eval_fraction` of the hash range, so the split never depends on order or on the run."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    cut = int(eval_fraction * 2**64)
    train, evals = [], []
    for t in texts:
        (evals if text_hash(t, "split:") < cut else train).append(t)
    return train, evals


def default_corpus(eval_fraction: float = 0.02, cache: str | os.PathLike | None = None
                   ) -> tuple[list[str], list[str]]:
    """(train_texts, eval_texts) of the embedded corpus, split by text hash."""
    return split_by_hash([d.text for d in default_documents(cache)], eval_fraction)


def default_classification_task(num_classes: int = 10, min_chars: int = 40,
                                eval_fraction: float = 0.2,
                                cache: str | os.PathLike | None = None):
    """The embedded classification task: docstring -> its top-level stdlib package.

    Only packages (directories) count as classes, the `num_classes` with the most docstrings of at
    least `min_chars` characters. Classes are balanced by keeping, per class, the texts with the
    smallest hashes down to the size of the rarest class; the split is by text hash. Returns
    (train_rows, eval_rows, labels) with rows {"text": str, "label": str}, labels sorted."""
    by_pkg: dict[str, list[str]] = collections.defaultdict(list)
    for d in default_documents(cache):
        if len(d.text) >= min_chars and d.package != "pydoc_data" and _is_package(d.package):
            by_pkg[d.package].append(d.text)
    if len(by_pkg) < num_classes:
        raise ValueError(f"num_classes={num_classes} but only {len(by_pkg)} packages qualify")
    # most frequent first; ties broken by name so the choice is deterministic
    chosen = sorted(by_pkg, key=lambda p: (-len(by_pkg[p]), p))[:num_classes]
    per_class = min(len(by_pkg[p]) for p in chosen)
    rows = []
    for pkg in chosen:
        keep = sorted(by_pkg[pkg], key=lambda t: text_hash(t, "balance:"))[:per_class]
        rows += [{"text": t, "label": pkg} for t in keep]
    # a docstring shared by two packages was deduplicated upstream, so texts are unique here
    _, eval_texts = split_by_hash([r["text"] for r in rows], eval_fraction)
    label_of = {r["text"]: r["label"] for r in rows}
    # a deterministic shuffle, so the classes are interleaved
    order = sorted(label_of, key=lambda t: text_hash(t, "order:"))
    eval_set = set(eval_texts)
    train_rows = [{"text": t, "label": label_of[t]} for t in order if t not in eval_set]
    eval_rows = [{"text": t, "label": label_of[t]} for t in order if t in eval_set]
    return train_rows, eval_rows, sorted(chosen)


@functools.lru_cache(maxsize=None)
def _is_package(name: str) -> bool:
    root = Path(sysconfig.get_paths()["stdlib"])
    return (root / name).is_dir()
