"""Reliability metrics of job traces and failure traces (Kokolis et al., Meta, 2025).

From a :class:`~spotpipe.reliability.traces.JobTable`:

* the share of jobs, and of GPU time, by final state and by failure category;
* the job failure rate per job-size bucket (GPUs);
* ``r_f``, failures per 1000 node-days: interruptions in the counted categories (hardware and
  infrastructure by default) over the node-days the jobs ran;
* MTTF by job size, measured (job-hours in the bucket / interruptions in it) and modelled
  (``1000 days / (N r_f)`` at the bucket's median node count);
* ETTR upper bounds of requeued jobs (several records with one JobID): run time over the wall
  time from first start to last end, since lost work since the last checkpoint is not recorded;
* time between interruptions (job end times) with exponential and Weibull fits.

From a :class:`~spotpipe.reliability.failure_traces.FailureTrace`: events per unit-hour, ``r_f``,
MTTF of the whole system and per unit, causes, and fits of the time between events.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from spotpipe.reliability.columns import factorize
from spotpipe.reliability.failure_traces import FailureTrace
from spotpipe.reliability.fits import MIN_INTERVALS, IntervalFits, fit_intervals
from spotpipe.reliability.taxonomy import FAILED_CATEGORIES, Taxonomy
from spotpipe.reliability.traces import JobTable
from spotpipe.reliability.units import SECONDS_PER_DAY, SECONDS_PER_HOUR, rf_from_counts

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 8, 16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class SizeBucket:
    """Jobs whose GPU count lies in ``[lo, hi)`` (``hi`` is ``None`` for the last bucket)."""

    lo: int
    hi: int | None
    jobs: int
    failed: int
    interrupted: int
    job_hours: float
    node_days: float
    median_nodes: float
    mttf_measured_h: float | None
    mttf_model_h: float | None

    @property
    def label(self) -> str:
        if self.hi is None:
            return f">={self.lo}"
        return f"{self.lo}" if self.hi == self.lo + 1 else f"{self.lo}-{self.hi - 1}"

    @property
    def failure_rate(self) -> float:
        """Share of the bucket's jobs that ended in a failure of any kind."""
        return self.failed / self.jobs if self.jobs else 0.0


@dataclass(frozen=True)
class Share:
    """Jobs and GPU time of one state or category."""

    name: str
    jobs: int
    job_share: float
    gpu_hours: float
    gpu_time_share: float


@dataclass(frozen=True)
class JobMetrics:
    """Everything :func:`job_metrics` measures."""

    jobs: int
    node_days: float
    gpu_hours: float
    exposure_hours: float  # job-hours
    interruptions: int
    counted: tuple[str, ...]
    rf: float | None
    buckets: tuple[SizeBucket, ...]
    by_state: tuple[Share, ...]
    by_category: tuple[Share, ...]
    requeued_jobs: int
    ettr_upper_mean: float | None
    ettr_upper_min: float | None
    fits: IntervalFits | None
    interruption_times: NDArray[np.float64] = field(default_factory=lambda: np.empty(0), repr=False, compare=False)

    @property
    def mttf_cluster_h(self) -> float | None:
        """Mean job-hours between interruptions over the whole trace."""
        return self.exposure_hours / self.interruptions if self.interruptions else None


def _shares(names: NDArray[Any], gpu_hours: NDArray[np.float64]) -> tuple[Share, ...]:
    total_jobs = names.size
    total_gpu = float(gpu_hours.sum())
    uniques, inverse = factorize(names.tolist())
    uniq = [str(u) for u in uniques]
    counts = np.bincount(inverse, minlength=len(uniq))
    hours = np.bincount(inverse, weights=gpu_hours, minlength=len(uniq))
    order = np.argsort(-counts, kind="stable")
    return tuple(
        Share(
            name=str(uniq[i]),
            jobs=int(counts[i]),
            job_share=float(counts[i]) / total_jobs if total_jobs else 0.0,
            gpu_hours=float(hours[i]),
            gpu_time_share=float(hours[i]) / total_gpu if total_gpu > 0 else 0.0,
        )
        for i in order
    )


def _requeue_ettr(table: JobTable) -> tuple[int, float | None, float | None]:
    """ETTR upper bounds of jobs with several records (requeued allocations)."""
    if len(table) == 0:
        return 0, None, None
    ids = table.job_id.tolist()
    if len(dict.fromkeys(ids)) == len(ids):  # one record per job: nothing was requeued
        return 0, None, None
    uniques, inverse = factorize(ids)
    size = len(uniques)
    counts = np.bincount(inverse, minlength=size)
    multi = counts > 1
    run = np.bincount(inverse, weights=table.runtime, minlength=size)
    first = np.full(size, np.inf)
    last = np.full(size, -np.inf)
    np.minimum.at(first, inverse, table.start)
    np.maximum.at(last, inverse, table.end)
    wall = last - first
    ok = multi & (wall > 0)
    if not ok.any():
        return int(multi.sum()), None, None
    ettr = np.minimum(run[ok] / wall[ok], 1.0)
    return int(multi.sum()), float(ettr.mean()), float(ettr.min())


def job_metrics(
    table: JobTable,
    taxonomy: Taxonomy,
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    min_intervals: int = MIN_INTERVALS,
) -> JobMetrics:
    """Measure a job table (see the module docstring); vectorised over rows.

    Args:
        table: The jobs (one column per field).
        taxonomy: Rules that give each record a category and the categories that count toward ``r_f``.
        buckets: Lower bounds of the job-size buckets, in GPUs.
        min_intervals: Fewest positive intervals between failures to fit (fewer: no fit).

    Returns:
        Exposure (node-days, GPU-hours, job-hours), interruptions, ``r_f``, size buckets, shares by
        state and category, ETTR upper bounds and interval fits.
    """
    categories = taxonomy.classify_arrays(table.state, table.exit_code, table.signal, table.reason)
    cat_str = categories.astype(str)
    counted = np.isin(cat_str, sorted(taxonomy.failure_categories))
    failed = np.isin(cat_str, sorted(FAILED_CATEGORIES))
    runtime = np.clip(table.runtime, 0.0, None)
    node_seconds = runtime * table.nodes
    gpu_hours = runtime * table.gpus / SECONDS_PER_HOUR
    interruptions = int(counted.sum())
    rf = rf_from_counts(interruptions, float(node_seconds.sum()))
    edges = np.asarray(sorted(set(buckets)), dtype=np.int64)
    which = np.searchsorted(edges, table.gpus, side="right") - 1  # -1: below the first edge
    rows: list[SizeBucket] = []
    for b in range(-1, edges.size):
        mask = which == b
        if not mask.any():
            continue
        lo = 0 if b < 0 else int(edges[b])
        hi = int(edges[0]) if b < 0 else (int(edges[b + 1]) if b + 1 < edges.size else None)
        n_int = int(counted[mask].sum())
        hours = float(runtime[mask].sum()) / SECONDS_PER_HOUR
        median_nodes = float(np.median(table.nodes[mask]))
        model = None
        if rf is not None and rf > 0 and median_nodes > 0:
            model = 1000.0 * 24.0 / (median_nodes * rf)
        rows.append(
            SizeBucket(
                lo=lo,
                hi=hi,
                jobs=int(mask.sum()),
                failed=int(failed[mask].sum()),
                interrupted=n_int,
                job_hours=hours,
                node_days=float(node_seconds[mask].sum()) / SECONDS_PER_DAY,
                median_nodes=median_nodes,
                mttf_measured_h=hours / n_int if n_int else None,
                mttf_model_h=model,
            )
        )
    requeued, ettr_mean, ettr_min = _requeue_ettr(table)
    return JobMetrics(
        jobs=len(table),
        node_days=float(node_seconds.sum()) / SECONDS_PER_DAY,
        gpu_hours=float(gpu_hours.sum()),
        exposure_hours=float(runtime.sum()) / SECONDS_PER_HOUR,
        interruptions=interruptions,
        counted=tuple(sorted(taxonomy.failure_categories)),
        rf=rf,
        buckets=tuple(rows),
        by_state=_shares(table.state, gpu_hours),
        by_category=_shares(categories, gpu_hours),
        requeued_jobs=requeued,
        ettr_upper_mean=ettr_mean,
        ettr_upper_min=ettr_min,
        fits=fit_intervals(table.end[counted], min_intervals) if interruptions > 2 else None,
        interruption_times=table.end[counted],
    )


@dataclass(frozen=True)
class TraceMetrics:
    """Rates of one failure trace (LANL system or spot pool)."""

    name: str
    kind: str
    unit: str
    events: int
    mean_units: float
    duration_h: float
    unit_hours: float
    per_unit_hour: float | None
    rf: float | None
    mttf_system_h: float | None
    mttf_unit_h: float | None
    mean_repair_h: float | None
    causes: tuple[tuple[str, int], ...]
    categories: tuple[tuple[str, int], ...]
    fits: IntervalFits | None


def trace_metrics(trace: FailureTrace, taxonomy: Taxonomy, min_intervals: int = MIN_INTERVALS) -> TraceMetrics:
    """Measure a failure trace: every event counts (LANL records and spot removals are all
    interruptions); categories are shown for the taxonomy.

    Args:
        trace: The failure trace.
        taxonomy: Rules that give each record a category and the categories that count toward ``r_f``.
        min_intervals: Fewest positive intervals between failures to fit (fewer: no fit).

    Returns:
        Events, exposure (hours), rates per unit-hour and ``r_f``, MTTF of the system and of one unit
        (hours), mean repair (hours), causes, categories and interval fits.
    """
    unit_hours = trace.unit_seconds / SECONDS_PER_HOUR
    n = trace.events
    empty = np.zeros(n, dtype=np.int64)
    categories = taxonomy.classify_arrays(trace.causes, empty, empty, trace.details)
    repair = None
    if trace.repair_s is not None and n:
        finite = trace.repair_s[np.isfinite(trace.repair_s)]
        repair = float(finite.mean()) / SECONDS_PER_HOUR if finite.size else None
    return TraceMetrics(
        name=trace.name,
        kind=trace.kind,
        unit=trace.unit,
        events=n,
        mean_units=trace.mean_units,
        duration_h=trace.duration_s / SECONDS_PER_HOUR,
        unit_hours=unit_hours,
        per_unit_hour=n / unit_hours if unit_hours > 0 else None,
        rf=rf_from_counts(n, trace.unit_seconds),
        mttf_system_h=trace.duration_s / SECONDS_PER_HOUR / n if n else None,
        mttf_unit_h=unit_hours / n if n else None,
        mean_repair_h=repair,
        causes=tuple(Counter(trace.causes.tolist()).most_common()),
        categories=tuple(Counter(categories.tolist()).most_common()),
        fits=fit_intervals(trace.times, min_intervals) if n > 2 else None,
    )
