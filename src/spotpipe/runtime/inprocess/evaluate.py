"""Validation loss and perplexity of a trained run with pipeline stages left out (`spotpipe eval`).

SkipPipe (Blagoev, Chen, Ersoy 2025) reports how much perplexity a model loses when stages are
skipped at inference (about 7% with half the model skipped, for a model trained on partial paths).
:func:`evaluate_skipping` measures it for one set of skipped stages: the mean token cross-entropy
over the first ``samples`` windows of the validation split, read by the reference's own
:meth:`~spotpipe.runtime.inprocess.local.LocalTrainer.validation_loss` (the loop its
``evaluate`` uses, so with nothing skipped the two agree); perplexity = exp(loss). :func:`evaluate_fraction` draws several
distinct sets of ``round(f x S)`` skippable stages (:mod:`spotpipe.runtime.inprocess.skipsets`)
and reports the full model and the mean, spread and extremes over the sets.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from spotpipe.runtime.inprocess.restore import TrainedRun
from spotpipe.runtime.inprocess.skipsets import draw_skip_sets, skip_count, skippable_stages

Progress = Callable[[int], None]


@dataclass(frozen=True)
class SkipEval:
    """The validation loss with some stages skipped.

    Attributes:
        skipped: Pipeline stages left out (empty: the full model).
        loss: Mean token cross-entropy in nats.
        samples: Validation windows read.
        tokens: Target tokens scored (``samples x model.context``).
    """

    skipped: tuple[int, ...]
    loss: float
    samples: int
    tokens: int

    @property
    def perplexity(self) -> float:
        """``exp(loss)`` (inf when that overflows)."""
        return math.exp(self.loss) if self.loss < 709 else math.inf


@dataclass(frozen=True)
class FractionEval:
    """Perplexity over random sets of skipped stages.

    Attributes:
        fraction: The skip fraction asked for.
        count: Stages skipped in each set (``round(fraction x S)``).
        possible: How many such sets exist (``C(skippable stages, count)``).
        full: The full model's result on the same windows.
        sets: One result per distinct set of skipped stages.
    """

    fraction: float
    count: int
    possible: int
    full: SkipEval
    sets: tuple[SkipEval, ...]

    def _ppl(self) -> list[float]:
        return [r.perplexity for r in self.sets]

    @property
    def mean_perplexity(self) -> float:
        """Mean perplexity over the sets."""
        return statistics.fmean(self._ppl())

    @property
    def std_perplexity(self) -> float:
        """Standard deviation of the perplexity over the sets (population; 0 for one set)."""
        return statistics.pstdev(self._ppl())

    @property
    def min_perplexity(self) -> float:
        """Lowest perplexity of a set."""
        return min(self._ppl())

    @property
    def max_perplexity(self) -> float:
        """Highest perplexity of a set."""
        return max(self._ppl())

    @property
    def mean_loss(self) -> float:
        """Mean loss over the sets (nats)."""
        return statistics.fmean(r.loss for r in self.sets)


def eval_samples(run: TrainedRun, samples: int | None) -> int:
    """Windows to read: ``samples``, or the run's own evaluation windows (``train.eval_batches x
    train.batch_size``), at most the validation split's windows.

    Args:
        run: The trained run.
        samples: ``--samples``, or None.

    Returns:
        A number of windows, at least 1.
    """
    t = run.cfg.train
    want = t.eval_batches * t.batch_size if samples is None else samples
    return max(1, min(want, run.trainer.val_sampler.num_windows))


def evaluate_skipping(run: TrainedRun, skip_stages: tuple[int, ...] = (), samples: int | None = None,
                      progress: Progress | None = None) -> SkipEval:
    """Validation loss of ``run`` with ``skip_stages`` left out.

    Args:
        run: The restored run.
        skip_stages: Pipeline stages to skip (checked by
            :func:`~spotpipe.runtime.inprocess.skipsets.check_skip_stages`).
        samples: Validation windows to read (see :func:`eval_samples`).
        progress: Called with the windows done so far after each batch.

    Returns:
        The :class:`SkipEval`.
    """
    n = eval_samples(run, samples)  # never more than the split holds
    loss = run.trainer.validation_loss(n, run.chunks_of(skip_stages), progress)
    return SkipEval(tuple(skip_stages), loss, n, n * run.cfg.model.context)


def fraction_sets(run: TrainedRun, fraction: float, subsets: int, seed: int) -> tuple[int, list[tuple[int, ...]]]:
    """``(count, sets)``: stages per set (``round(fraction x S)``) and the distinct sets of skippable
    stages :func:`evaluate_fraction` evaluates, drawn from ``seed`` (at most ``subsets``).

    Args:
        run: The trained run.
        fraction: Share of the stages to skip, in [0, 1).
        subsets: Most sets to draw.
        seed: Seed of the draw.

    Returns:
        The stage count and the sets, each ascending.

    Raises:
        SpotpipeError: The fraction skips more stages than may be skipped.
    """
    num_chunks = len(run.chunks)
    count = skip_count(fraction, run.stage_chunks, num_chunks)
    return count, draw_skip_sets(skippable_stages(run.stage_chunks, num_chunks), count, subsets, seed)


def possible_sets(run: TrainedRun, count: int) -> int:
    """How many distinct sets of ``count`` skippable stages ``run`` has.

    Args:
        run: The trained run.
        count: Stages per set.

    Returns:
        ``C(skippable stages, count)``.
    """
    return math.comb(len(skippable_stages(run.stage_chunks, len(run.chunks))), count)


def evaluate_fraction(run: TrainedRun, fraction: float, subsets: int, seed: int, samples: int | None = None,
                      progress: Progress | None = None) -> FractionEval:
    """The full model, then ``subsets`` distinct random sets of ``round(fraction x S)`` skipped stages.

    Args:
        run: The restored run.
        fraction: Share of the stages to skip, in ``[0, 1)``.
        subsets: Distinct sets to draw (fewer when fewer exist).
        seed: Seed of the draw (:func:`~spotpipe.runtime.inprocess.skipsets.draw_skip_sets`).
        samples: Validation windows per evaluation.
        progress: Called with the windows done so far, over every evaluation.

    Returns:
        The :class:`FractionEval`.

    Raises:
        SpotpipeError: The fraction skips more stages than may be skipped.
    """
    count, sets = fraction_sets(run, fraction, subsets, seed)
    n = eval_samples(run, samples)
    done = 0

    def step(k: int) -> None:
        if progress is not None:
            progress(done + k)

    full = evaluate_skipping(run, (), n, step)
    done += n
    results = []
    for s in sets:
        results.append(full if not s else evaluate_skipping(run, s, n, step))
        done += n
    return FractionEval(fraction, count, possible_sets(run, count), full, tuple(results))
