"""Corpus statistics: the unigram baseline a language model has to beat.

A model that learned only how often each token occurs, and nothing about context, reaches a
validation loss equal to the cross-entropy of the validation tokens under the training split's
unigram distribution (Shannon 1951, "Prediction and Entropy of Printed English", gives the
zero-order/first-order entropies of English this way). Anything below it is learned context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spotpipe.data.sampler import split_bounds


@dataclass(frozen=True)
class UnigramBaseline:
    """Unigram statistics of a token file, in nats per token.

    Attributes:
        val_entropy: Entropy of the validation split's own unigram distribution (a lower bound
            for any context-free model).
        val_cross_entropy: Cross-entropy of the validation split under the training split's
            unigram distribution with add-one smoothing: the loss of a context-free model
            trained on the training split. This is the baseline to report.
        train_tokens: Tokens in the training split.
        val_tokens: Tokens in the validation split.
    """

    val_entropy: float
    val_cross_entropy: float
    train_tokens: int
    val_tokens: int


def _counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    step = 1 << 24
    for i in range(0, len(tokens), step):
        counts += np.bincount(np.asarray(tokens[i : i + step]), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_baseline(token_file: Any, val_fraction: float) -> UnigramBaseline:
    """Unigram entropy and cross-entropy (nats) of ``token_file``'s validation split.

    Args:
        token_file: A :class:`~spotpipe.data.tokens.TokenFile`.
        val_fraction: ``data.val_fraction`` (the same split as the sampler's).

    Returns:
        A :class:`UnigramBaseline`, in nats per token.

    Raises:
        SpotpipeError: if ``val_fraction`` is not in (0, 0.5).
    """
    n, vocab = token_file.num_tokens, token_file.vocab_size
    t0, t1 = split_bounds(n, val_fraction, "train")
    v0, v1 = split_bounds(n, val_fraction, "val")
    train = _counts(token_file.tokens[t0:t1], vocab).astype(np.float64)
    val = _counts(token_file.tokens[v0:v1], vocab).astype(np.float64)
    val_total = val.sum()
    p_val = val / max(val_total, 1.0)
    nz = p_val > 0
    entropy = float(-(p_val[nz] * np.log(p_val[nz])).sum())
    q = (train + 1.0) / (train.sum() + vocab)
    cross = float(-(p_val[nz] * np.log(q[nz])).sum())
    return UnigramBaseline(entropy, cross, int(t1 - t0), int(v1 - v0))
