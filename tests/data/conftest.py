"""Fixtures for the data tests: one small tokenizer of each kind, trained once per session."""
import pytest

from llmcore.data import train_tokenizer

TEXTS = [
    "Return the number of items in the container.",
    "Open the file and return a stream object.",
    "Raise ValueError when the argument is negative.",
    "The quick brown fox jumps over the lazy dog.",
    "Decode bytes using the codec registered for encoding.",
] * 20


@pytest.fixture(scope="session")
def texts():
    return TEXTS


@pytest.fixture(scope="session")
def wordpiece():
    return train_tokenizer(TEXTS, "wordpiece", vocab_size=311, min_frequency=1)


@pytest.fixture(scope="session")
def bpe():
    return train_tokenizer(TEXTS, "bpe", vocab_size=331, min_frequency=1)
