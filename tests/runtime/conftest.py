"""Fixtures shared by the runtime tests that run every rank in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from spotpipe.data.tokens import TokenFile, prepare_tokens


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Ranks run as threads: one intra-op thread each keeps 2 cores from thrashing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield None
    torch.set_num_threads(before)


def _word_corpus(directory: Path, words: list[str], seed: int, length: int = 6000) -> TokenFile:
    gen = torch.Generator().manual_seed(seed)
    (directory / "t.txt").write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (length,), generator=gen)))
    return prepare_tokens([directory / "t.txt"], directory / "tok")


@pytest.fixture(scope="session")
def word_corpus() -> Callable[..., TokenFile]:
    """``word_corpus(directory, words, seed)``: a token dir of 6000 words drawn (seeded) from
    ``words`` (real text, tiny and fast)."""
    return _word_corpus
