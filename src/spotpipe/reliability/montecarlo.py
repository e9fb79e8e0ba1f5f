"""Step-level Monte Carlo of long training jobs under failures (vectorised with numpy).

A job runs for ``wall_s`` seconds of wall time. Failures arrive as a renewal process whose gaps
are exponential or Weibull with a given mean (the job's MTTF), or are replayed from a failure
trace (a spot-preemption trace or a LANL system), each event hitting the job with probability
``min(1, job nodes / units in service)``, from a random offset into the trace, which repeats
when the job outlasts it.

Two recovery policies are played step by step, where a step of ``step_s`` seconds is atomic
(a failure discards the step in flight, as spotpipe's runtime does):

* :class:`CheckpointRestart` (Kokolis et al., Meta, 2025; Young 1974; Daly 2006): after a
  failure, a restart of ``u0`` (a failure during it starts it again), then cycles of ``dt``
  compute (a whole number of steps) and a ``w`` checkpoint write; a failure loses everything
  since the last completed write. At the end of the job the work since the last checkpoint
  counts (a final save).
* :class:`CheckpointFree` (CheckFree, Blagoev, Ersoy, Chen 2025): after a failure, a recovery of
  ``r`` (the lost stage is rebuilt from its neighbours), then steps; a failure loses only the
  step in flight, plus ``penalty_s`` of progress-equivalent per failure if given.

Because both policies forget everything at a failure, every gap between failures is
independent, so all gaps of all trials are evaluated at once. ETTR of a trial is productive
time / wall time; the result carries the mean, a 95% confidence interval of the mean and the
5th-95th percentile spread between jobs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from spotpipe.errors import SpotpipeError
from spotpipe.reliability.failure_traces import FailureTrace
from spotpipe.reliability.units import SECONDS_PER_HOUR

_MAX_CELLS = 2_000_000  # gaps drawn per chunk of trials
# Measured on one busy core: drawing and playing a gap between failures takes about 0.4 us, and a
# chunk holds about 100 bytes per gap at its peak.
SECONDS_PER_FAILURE = 4e-7
BYTES_PER_FAILURE = 100


@dataclass(frozen=True)
class CheckpointRestart:
    """Checkpoint every ``interval_s`` of compute, write ``write_s``, restart ``restart_s``."""

    interval_s: float
    write_s: float
    restart_s: float

    @property
    def label(self) -> str:
        return "checkpoint/restart"


@dataclass(frozen=True)
class CheckpointFree:
    """Recover in ``recovery_s`` without losing committed steps; ``penalty_s`` per failure."""

    recovery_s: float
    penalty_s: float = 0.0

    @property
    def label(self) -> str:
        return "checkpoint-free"


@dataclass(frozen=True)
class Exponential:
    """Poisson failures with mean time between them ``mttf_s``."""

    mttf_s: float

    @property
    def label(self) -> str:
        return f"exponential(MTTF {self.mttf_s / SECONDS_PER_HOUR:.3g} h)"


@dataclass(frozen=True)
class Weibull:
    """Renewal failures with Weibull gaps of mean ``mttf_s`` and ``shape`` (< 1: bursty)."""

    mttf_s: float
    shape: float

    @property
    def scale_s(self) -> float:
        return self.mttf_s / math.gamma(1.0 + 1.0 / self.shape)

    @property
    def label(self) -> str:
        return f"weibull(shape {self.shape:.3g}, MTTF {self.mttf_s / SECONDS_PER_HOUR:.3g} h)"


@dataclass(frozen=True)
class TraceReplay:
    """Failures replayed from ``trace`` for a job on ``nodes`` of its units."""

    trace: FailureTrace
    nodes: int

    @property
    def label(self) -> str:
        return f"trace({self.trace.name}, {self.nodes} {self.trace.unit}s)"


Policy = CheckpointRestart | CheckpointFree
FailureModel = Exponential | Weibull | TraceReplay


@dataclass(frozen=True)
class MonteCarloResult:
    """ETTR of ``trials`` simulated jobs; fractions are of wall time, averaged over trials."""

    policy: str
    failures: str
    trials: int
    wall_s: float
    step_s: float
    ettr_mean: float
    ettr_std: float
    ettr_ci95: tuple[float, float]
    ettr_p05: float
    ettr_p95: float
    failures_mean: float
    restart_fraction: float
    checkpoint_fraction: float
    lost_work_fraction: float
    penalty_fraction: float
    gpus: int | None = None

    @property
    def goodput_gpu_hours(self) -> float | None:
        """Productive GPU-hours of the average job (ETTR x GPUs x wall hours)."""
        if self.gpus is None:
            return None
        return self.ettr_mean * self.gpus * self.wall_s / SECONDS_PER_HOUR


@dataclass(frozen=True)
class _Gaps:
    """Flattened gaps between failures of all trials of a chunk."""

    length: NDArray[np.float64]
    trial: NDArray[np.int64]
    first: NDArray[np.bool_]
    final: NDArray[np.bool_]


def _renewal_gaps(model: Exponential | Weibull, trials: int, wall_s: float, rng: np.random.Generator) -> _Gaps:
    mean = model.mttf_s
    expected = wall_s / mean
    width = int(math.ceil(expected + 6.0 * math.sqrt(expected) + 10.0))

    def draw(cols: int) -> NDArray[np.float64]:
        if isinstance(model, Exponential):
            return rng.exponential(mean, size=(trials, cols))
        return model.scale_s * rng.weibull(model.shape, size=(trials, cols))

    gaps = draw(width)
    ends = np.cumsum(gaps, axis=1)
    while float(ends[:, -1].min()) < wall_s:
        extra = draw(width)
        gaps = np.concatenate([gaps, extra], axis=1)
        ends = np.concatenate([ends, ends[:, -1:] + np.cumsum(extra, axis=1)], axis=1)
    starts = ends - gaps
    valid = starts < wall_s
    rows, cols = np.nonzero(valid)
    s = starts[rows, cols]
    e = ends[rows, cols]
    return _Gaps(
        length=np.minimum(e, wall_s) - s,
        trial=rows.astype(np.int64),
        first=cols == 0,
        final=e >= wall_s,
    )


def _replay_gaps(model: TraceReplay, trials: int, wall_s: float, rng: np.random.Generator) -> _Gaps:
    trace = model.trace
    duration = trace.duration_s
    if duration <= 0 or trace.events == 0:
        raise SpotpipeError(f"trace {trace.name} has no events over a positive duration to replay")
    if model.nodes <= 0:
        raise SpotpipeError(f"trace replay needs a job of >= 1 {trace.unit}, got {model.nodes}")
    hit = np.minimum(1.0, model.nodes / np.maximum(trace.pool, 1.0))
    lengths: list[NDArray[np.float64]] = []
    trial_ids: list[NDArray[np.int64]] = []
    firsts: list[NDArray[np.bool_]] = []
    finals: list[NDArray[np.bool_]] = []
    for i in range(trials):
        offset = rng.uniform(0.0, duration)
        cycles = int(math.ceil((wall_s + offset) / duration)) + 1
        shifts = np.arange(cycles, dtype=np.float64)[:, None] * duration - offset
        times = (trace.times[None, :] + shifts).ravel()
        keep = (times >= 0.0) & (times < wall_s) & (rng.random(times.size) < np.tile(hit, cycles))
        failures = np.sort(times[keep])
        bounds = np.concatenate([[0.0], failures, [wall_s]])
        n = bounds.size - 1
        lengths.append(np.diff(bounds))
        trial_ids.append(np.full(n, i, dtype=np.int64))
        first = np.zeros(n, dtype=bool)
        first[0] = True
        final = np.zeros(n, dtype=bool)
        final[-1] = True
        firsts.append(first)
        finals.append(final)
    return _Gaps(
        length=np.concatenate(lengths),
        trial=np.concatenate(trial_ids),
        first=np.concatenate(firsts),
        final=np.concatenate(finals),
    )


def _floor_steps(seconds: NDArray[np.float64], step_s: float) -> NDArray[np.float64]:
    if step_s <= 0:
        return seconds
    return np.floor(seconds / step_s + 1e-9) * step_s


def _play(gaps: _Gaps, policy: Policy, step_s: float, trials: int) -> dict[str, NDArray[np.float64]]:
    """Per-trial totals (seconds) of productive time, restart, checkpoint, lost work; failures."""
    length = gaps.length
    if isinstance(policy, CheckpointRestart):
        restart = np.where(gaps.first, 0.0, np.minimum(length, policy.restart_s))
        work = length - restart
        interval = policy.interval_s
        if step_s > 0:
            interval = max(1, round(interval / step_s)) * step_s
        cycle = interval + policy.write_s
        cycles = np.floor(work / cycle)
        rest = work - cycles * cycle
        partial = np.minimum(rest, interval)
        saved_at_end = np.where(gaps.final, _floor_steps(partial, step_s), 0.0)
        productive = cycles * interval + saved_at_end
        writes = cycles * policy.write_s + np.maximum(rest - interval, 0.0)
        lost = partial - saved_at_end
    else:
        restart = np.where(gaps.first, 0.0, np.minimum(length, policy.recovery_s))
        work = length - restart
        productive = _floor_steps(work, step_s)
        writes = np.zeros_like(length)
        lost = work - productive

    def total(values: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.bincount(gaps.trial, weights=values, minlength=trials).astype(np.float64, copy=False)

    counts = np.bincount(gaps.trial, minlength=trials).astype(np.float64)
    return {
        "productive": total(productive),
        "restart": total(restart),
        "checkpoint": total(writes),
        "lost": total(lost),
        "failures": counts - 1.0,
    }


def expected_failures(failures: FailureModel, wall_s: float) -> float:
    """Expected failures of one simulated job of ``wall_s`` seconds (the gaps it draws, less one).

    Renewal models: ``wall / MTTF``. Trace replay: the expected hits of one pass of the trace
    (each event hits with probability ``min(1, nodes / units in service)``), times the passes
    ``wall / trace duration``.

    Args:
        failures: The failure model (renewal, or trace replay).
        wall_s: Wall time of the job, seconds.

    Returns:
        The expected count (``inf`` for an MTTF of 0).
    """
    if isinstance(failures, TraceReplay):
        trace = failures.trace
        if trace.duration_s <= 0:
            return 0.0
        hits = float(np.minimum(1.0, failures.nodes / np.maximum(trace.pool, 1.0)).sum())
        return hits * wall_s / trace.duration_s
    return wall_s / failures.mttf_s if failures.mttf_s > 0 else math.inf


@dataclass(frozen=True)
class Cost:
    """What a Monte Carlo run will cost, estimated before it starts."""

    failures: float  # gaps between failures drawn and played, all trials and runs together
    largest_chunk: float  # gaps held in memory at once

    @property
    def seconds(self) -> float:
        return self.failures * SECONDS_PER_FAILURE

    @property
    def gib(self) -> float:
        return self.largest_chunk * BYTES_PER_FAILURE / 2**30


def estimate_cost(failures: FailureModel, wall_s: float, trials: int, runs: int = 1) -> Cost:
    """Cost of ``runs`` calls of :func:`simulate` with these arguments.

    Args:
        failures: The failure model.
        wall_s: Wall time of each job, seconds.
        trials: Jobs per run.
        runs: Calls of :func:`simulate`.

    Returns:
        Gaps drawn in all, and the most held in memory at once (its ``seconds`` estimates the run time).
    """
    per_trial = expected_failures(failures, wall_s) + 1.0
    chunk = max(float(_MAX_CELLS), per_trial) if not isinstance(failures, TraceReplay) else per_trial * trials
    return Cost(failures=per_trial * trials * runs, largest_chunk=min(chunk, per_trial * trials))


def check_cost(cost: Cost, limit: int, what: str) -> None:
    """Refuse work above ``limit`` failures, naming the estimate and the option that allows it.

    Args:
        cost: From :func:`estimate_cost` (summed over the command's runs).
        limit: ``--max-failures``.
        what: The command and what the count is made of, e.g. ``reliability simulate (5 trials x
            2 policies)``.

    Raises:
        SpotpipeError: one line with the estimated failures, seconds and memory.
    """
    if cost.failures > limit:
        raise SpotpipeError(
            f"{what} would draw and play about {cost.failures:,.0f} failures: about {cost.seconds:,.0f} s and "
            f"{cost.gib:.1f} GiB; the limit is --max-failures {limit}: raise it to go on, or shorten --wall, "
            "lower --trials"
        )


def simulate(
    failures: FailureModel,
    policy: Policy,
    wall_s: float,
    step_s: float = 10.0,
    trials: int = 200,
    seed: int = 0,
    gpus: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> MonteCarloResult:
    """Simulate ``trials`` jobs of ``wall_s`` seconds; see the module docstring.

    Args:
        failures: When failures strike.
        policy: What a failure costs.
        wall_s: Wall time of each job (seconds).
        step_s: Training step time (seconds); a failure loses the step in flight.
        trials: Jobs to simulate (>= 2).
        seed: Random seed.
        gpus: GPUs of the job, for goodput in GPU-hours.
        progress: Called with the number of trials done after each chunk of trials.

    Returns:
        The :class:`MonteCarloResult` (ETTR per trial and its summary).

    Raises:
        SpotpipeError: a non-positive wall time, MTTF, shape or trial count.
    """
    if not (wall_s > 0 and math.isfinite(wall_s)):
        raise SpotpipeError(f"job wall time must be > 0, got {wall_s!r}")
    if trials < 2:
        raise SpotpipeError(f"--trials must be >= 2 for a confidence interval, got {trials}")
    if isinstance(failures, (Exponential, Weibull)) and not failures.mttf_s > 0:
        raise SpotpipeError(f"MTTF must be > 0, got {failures.mttf_s!r}")
    if isinstance(failures, Weibull) and not failures.shape > 0:
        raise SpotpipeError(f"Weibull shape must be > 0, got {failures.shape!r}")
    if isinstance(policy, CheckpointRestart) and not policy.interval_s > 0:
        raise SpotpipeError(f"checkpoint interval must be > 0, got {policy.interval_s!r}")
    rng = np.random.default_rng(seed)
    if isinstance(failures, TraceReplay):
        chunk = trials
    else:
        per_trial = wall_s / failures.mttf_s + 6.0 * math.sqrt(wall_s / failures.mttf_s) + 10.0
        chunk = max(1, min(trials, int(_MAX_CELLS / per_trial)))
    parts: list[dict[str, NDArray[np.float64]]] = []
    done = 0
    while done < trials:
        n = min(chunk, trials - done)
        if isinstance(failures, TraceReplay):
            gaps = _replay_gaps(failures, n, wall_s, rng)
        else:
            gaps = _renewal_gaps(failures, n, wall_s, rng)
        parts.append(_play(gaps, policy, step_s, n))
        done += n
        if progress is not None:
            progress(done)
    totals = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    penalty = 0.0
    if isinstance(policy, CheckpointFree):
        penalty = policy.penalty_s
    penalties = np.minimum(totals["failures"] * penalty, totals["productive"])
    ettr = (totals["productive"] - penalties) / wall_s
    mean = float(ettr.mean())
    std = float(ettr.std(ddof=1))
    half = 1.96 * std / math.sqrt(trials)
    return MonteCarloResult(
        policy=policy.label,
        failures=failures.label,
        trials=trials,
        wall_s=wall_s,
        step_s=step_s,
        ettr_mean=mean,
        ettr_std=std,
        ettr_ci95=(mean - half, mean + half),
        ettr_p05=float(np.percentile(ettr, 5)),
        ettr_p95=float(np.percentile(ettr, 95)),
        failures_mean=float(totals["failures"].mean()),
        restart_fraction=float(totals["restart"].mean()) / wall_s,
        checkpoint_fraction=float(totals["checkpoint"].mean()) / wall_s,
        lost_work_fraction=float(totals["lost"].mean()) / wall_s,
        penalty_fraction=float(penalties.mean()) / wall_s,
        gpus=gpus,
    )
