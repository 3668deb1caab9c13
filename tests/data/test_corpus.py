"""The embedded corpus and classification task: sizes as minimums, determinism, hygiene."""
import collections

import pytest

from llmcore.data import corpus


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("llmcore-cache")


def test_corpus_size_and_hygiene(cache):
    docs = corpus.default_documents(cache)
    texts = [d.text for d in docs]
    assert len(texts) == len(set(texts)), "documents must be deduplicated"
    assert sum(map(len, texts)) > 1_500_000            # ~2.2-2.7M chars depending on Python
    assert sum(d.package == "pydoc_data" for d in docs) > 50
    # no test modules
    assert not any(".test." in d.source or d.source.startswith("test.") or ".tests." in d.source
                   or "idle_test" in d.source for d in docs)
    # built from the cache on the second call, identical
    assert [d.text for d in corpus.default_documents(cache)] == texts


def test_corpus_split_is_deterministic_and_disjoint(cache):
    train, evals = corpus.default_corpus(0.05, cache=cache)
    assert len(evals) > 100 and len(train) > 20 * len(evals) / 2
    assert not set(train) & set(evals)
    assert corpus.default_corpus(0.05, cache=cache) == (train, evals)
    with pytest.raises(ValueError, match="eval_fraction"):
        corpus.default_corpus(1.5, cache=cache)


def test_classification_task_balanced(cache):
    train, evals, labels = corpus.default_classification_task(cache=cache)
    assert len(labels) == 10 and labels == sorted(labels)
    assert len(train) >= 800 and len(evals) >= 150
    counts = collections.Counter(r["label"] for r in train + evals)
    assert set(counts) == set(labels)
    assert len(set(counts.values())) == 1, f"classes not balanced: {counts}"
    assert not {r["text"] for r in train} & {r["text"] for r in evals}
    assert all(len(r["text"]) >= 40 for r in train)
    # same call, same task
    assert corpus.default_classification_task(cache=cache) == (train, evals, labels)


def test_unwritable_cache_warns_and_still_builds(tmp_path, monkeypatch):
    few = [corpus.Document("Return x.", "m.f", "m")]
    monkeypatch.setattr(corpus, "_scan_stdlib", lambda: list(few))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="could not cache"):
        docs = corpus.default_documents(blocker / "sub")
    assert docs[0] == few[0] and len(docs) > 50            # + the pydoc topics
