"""``spotpipe reliability analyze``: read any supported trace, measure it, print or export it.

One :class:`TraceAnalysis` per file, whatever its format (job trace, failure trace, spotpipe
event log), so the CLI, the HTML report and the benchmarks share one code path. JSON output never
holds ``inf`` or ``NaN``: an MTTF without failures is ``null`` next to a sentence that says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spotpipe.errors import SpotpipeError
from spotpipe.reliability.columns import no_gc
from spotpipe.reliability.failure_traces import FailureTrace, read_bamboo, read_lanl
from spotpipe.reliability.fits import MIN_INTERVALS, IntervalFits
from spotpipe.reliability.metrics import DEFAULT_BUCKETS, JobMetrics, TraceMetrics, job_metrics, trace_metrics
from spotpipe.reliability.runs import RunSummary, read_runs
from spotpipe.reliability.taxonomy import Taxonomy
from spotpipe.reliability.traces import FORMATS, IngestReport, detect_format, read_acme, read_sacct
from spotpipe.reliability.units import format_duration, mttf_text


@dataclass(frozen=True)
class TraceAnalysis:
    """The measurements of one trace file."""

    report: IngestReport
    jobs: JobMetrics | None = None
    traces: tuple[TraceMetrics, ...] = ()
    runs: tuple[RunSummary, ...] = ()
    failure_traces: tuple[FailureTrace, ...] = field(default=(), repr=False)


def analyze_path(
    path: str | Path,
    fmt: str = "auto",
    taxonomy: Taxonomy | None = None,
    gpus_per_node: int = 8,
    buckets: tuple[int, ...] = DEFAULT_BUCKETS,
    min_intervals: int = MIN_INTERVALS,
) -> TraceAnalysis:
    """Read and measure one trace; ``fmt`` is one of :data:`FORMATS` or ``auto``.

    Args:
        path: The trace file.
        fmt: Its format, or ``auto`` to tell it from name and first line.
        taxonomy: Rules that give each record a category and the categories that count toward ``r_f``.; ``None``: the default.
        gpus_per_node: GPUs of a node, for traces that count nodes only (sacct).
        buckets: Lower bounds of the job-size buckets, in GPUs.
        min_intervals: Fewest positive intervals between failures to fit (fewer: no fit).

    Returns:
        The :class:`TraceAnalysis`: ingest report, and job metrics, failure-trace metrics or run
        summaries by format.

    Raises:
        SpotpipeError: for a missing file, an unknown format, or a trace that cannot be read.
    """
    with no_gc():
        return _analyze(path, fmt, taxonomy, gpus_per_node, buckets, min_intervals)


def _analyze(
    path: str | Path,
    fmt: str,
    taxonomy: Taxonomy | None,
    gpus_per_node: int,
    buckets: tuple[int, ...],
    min_intervals: int,
) -> TraceAnalysis:
    tax = taxonomy if taxonomy is not None else Taxonomy()
    if fmt == "auto":
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise SpotpipeError(f"--format {fmt!r}: use auto or one of {', '.join(FORMATS)}")
    elif not Path(path).is_file():
        raise SpotpipeError(f"trace {path} does not exist")
    if fmt in ("sacct", "acme"):
        table, report = read_sacct(path, gpus_per_node) if fmt == "sacct" else read_acme(path)
        metrics = job_metrics(table, tax, buckets, min_intervals)
        return TraceAnalysis(report=report, jobs=metrics)
    if fmt == "lanl":
        systems, report = read_lanl(path)
        return TraceAnalysis(
            report=report,
            traces=tuple(trace_metrics(t, tax, min_intervals) for t in systems),
            failure_traces=tuple(systems),
        )
    if fmt == "bamboo":
        trace, report = read_bamboo(path)
        return TraceAnalysis(
            report=report, traces=(trace_metrics(trace, tax, min_intervals),), failure_traces=(trace,)
        )
    runs, report = read_runs(path)
    return TraceAnalysis(report=report, runs=tuple(runs))


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: non-finite floats become ``None``; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def fits_to_json(fits: IntervalFits | None, unit: str = "hours") -> dict[str, Any] | None:
    """Fit parameters with the time unit of the intervals (hours for traces).

    Args:
        fits: Fits of intervals in seconds, or ``None``.
        unit: Name of the unit written; scales and means are converted from seconds to hours.

    Returns:
        Count, zero gaps dropped, Weibull shape/scale/mean, exponential mean, KS distances and the
        preferred fit; ``None`` without fits.
    """
    if fits is None:
        return None
    return {
        "unit": unit,
        "intervals": fits.n_intervals,
        "zero_gaps_dropped": fits.n_zero_dropped,
        "weibull_shape": fits.weibull.shape,
        "weibull_scale": fits.weibull.scale / 3600.0,
        "weibull_mean": fits.weibull.mean / 3600.0,
        "weibull_ks": fits.weibull.ks,
        "exponential_mean": fits.exponential.mean / 3600.0,
        "exponential_ks": fits.exponential.ks,
        "preferred": fits.preferred,
    }


def _jobs_json(m: JobMetrics) -> dict[str, Any]:
    return {
        "jobs": m.jobs,
        "node_days": m.node_days,
        "gpu_hours": m.gpu_hours,
        "job_hours": m.exposure_hours,
        "interruptions": m.interruptions,
        "counted_categories": list(m.counted),
        "rf_per_1000_node_days": m.rf,
        "mttf_cluster_hours": m.mttf_cluster_h,
        "mttf_cluster_text": mttf_text(m.mttf_cluster_h, m.exposure_hours),
        "by_size": [
            {
                "gpus": b.label,
                "jobs": b.jobs,
                "failed": b.failed,
                "failure_rate": b.failure_rate,
                "interrupted": b.interrupted,
                "node_days": b.node_days,
                "median_nodes": b.median_nodes,
                "mttf_measured_hours": b.mttf_measured_h,
                "mttf_measured_text": mttf_text(b.mttf_measured_h, b.job_hours),
                "mttf_model_hours": b.mttf_model_h,
            }
            for b in m.buckets
        ],
        "by_state": [s.__dict__ for s in m.by_state],
        "by_category": [s.__dict__ for s in m.by_category],
        "requeued_jobs": m.requeued_jobs,
        "ettr_upper_bound_mean": m.ettr_upper_mean,
        "ettr_upper_bound_min": m.ettr_upper_min,
        "time_between_interruptions": fits_to_json(m.fits),
    }


def _trace_json(t: TraceMetrics) -> dict[str, Any]:
    return {
        "name": t.name,
        "kind": t.kind,
        "unit": t.unit,
        "events": t.events,
        "mean_units": t.mean_units,
        "duration_hours": t.duration_h,
        "unit_hours": t.unit_hours,
        "events_per_unit_hour": t.per_unit_hour,
        "rf_per_1000_node_days": t.rf,
        "mttf_system_hours": t.mttf_system_h,
        "mttf_system_text": mttf_text(t.mttf_system_h, t.duration_h),
        "mttf_per_unit_hours": t.mttf_unit_h,
        "mean_repair_hours": t.mean_repair_h,
        "causes": dict(t.causes),
        "categories": dict(t.categories),
        "time_between_events": fits_to_json(t.fits),
    }


def _run_json(r: RunSummary) -> dict[str, Any]:
    return {
        "name": r.name,
        "mode": r.mode,
        "status": r.status,
        "wall_s": r.wall_s,
        "productive_s": r.productive_s,
        "ettr": r.ettr,
        "steps": r.steps,
        "failures": r.failures,
        "mttf_hours": r.mttf_hours,
        "mttf_text": r.mttf_text,
        "time_lost_s": r.lost_s,
        "lost_recovery_s": r.recovery_s,
        "lost_checkpoint_s": r.checkpoint_s,
        "lost_redone_steps_s": r.redone_s,
        "lost_other_s": r.other_lost_s,
        "mean_recovery_s": r.mean_recovery_s,
        "duplicate_step_records": r.duplicate_steps,
        "notes": list(r.notes),
    }


def analysis_to_json(a: TraceAnalysis) -> dict[str, Any]:
    """A JSON-ready dict (no NaN or infinity anywhere).

    Args:
        a: One file's analysis.

    Returns:
        Ingest report fields, then the job, trace or run measurements.
    """
    rep = a.report
    out: dict[str, Any] = {
        "path": rep.path,
        "format": rep.fmt,
        "rows": rep.rows,
        "used": rep.used,
        "skipped": rep.skipped,
        "malformed_count": rep.malformed_count,
        "malformed": [{"line": p.line, "message": p.message} for p in rep.malformed],
        "unknown_columns": list(rep.unknown_columns),
        "notes": list(rep.notes),
    }
    if a.jobs is not None:
        out["jobs"] = _jobs_json(a.jobs)
    if a.traces:
        out["traces"] = [_trace_json(t) for t in a.traces]
    if a.runs:
        out["runs"] = [_run_json(r) for r in a.runs]
    cleaned: dict[str, Any] = _clean(out)
    return cleaned


def _pct(x: float) -> str:
    return f"{100.0 * x:5.1f}%"


def _opt(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _fits_line(fits: IntervalFits | None, what: str) -> str:
    if fits is None:
        return f"  {what}: too few intervals to fit"
    w, e = fits.weibull, fits.exponential
    return (
        f"  {what} ({fits.n_intervals} intervals, {fits.n_zero_dropped} simultaneous dropped): "
        f"Weibull shape {w.shape:.3f} scale {w.scale / 3600:.3g} h (KS {w.ks:.3f}); "
        f"exponential mean {e.mean / 3600:.3g} h (KS {e.ks:.3f}); better: {fits.preferred}"
    )


def render_analysis(a: TraceAnalysis) -> str:
    """The text ``spotpipe reliability analyze`` prints for one file.

    Args:
        a: One file's analysis.

    Returns:
        The text, lines joined by newlines.
    """
    lines = a.report.summary_lines()
    if a.jobs is not None:
        m = a.jobs
        lines.append(
            f"jobs {m.jobs}, {m.exposure_hours:.5g} job-hours, {m.node_days:.4g} node-days, {m.gpu_hours:.4g} GPU-hours; "
            f"interruptions ({'+'.join(m.counted)}): {m.interruptions}"
        )
        if m.rf is None:
            lines.append("r_f: no exposure (no job ran on any node)")
        else:
            lines.append(f"r_f: {m.rf:.3g} failures per 1000 node-days")
        lines.append(f"MTTF over all job-hours: {mttf_text(m.mttf_cluster_h, m.exposure_hours)}")
        lines.append("by job size (GPUs):  jobs  failed  interrupted  node-days  MTTF measured          MTTF model")
        for b in m.buckets:
            lines.append(
                f"  {b.label:>10} {b.jobs:>9} {_pct(b.failure_rate)} {b.interrupted:>8} "
                f"{b.node_days:>11.4g}  {mttf_text(b.mttf_measured_h, b.job_hours):<22} "
                f"{_opt(b.mttf_model_h)} h"
            )
        lines.append("final state:          jobs   share  GPU-time share")
        for s in m.by_state:
            lines.append(f"  {s.name:<16} {s.jobs:>8} {_pct(s.job_share)} {_pct(s.gpu_time_share)}")
        lines.append("failure taxonomy:     jobs   share  GPU-time share")
        for s in m.by_category:
            lines.append(f"  {s.name:<16} {s.jobs:>8} {_pct(s.job_share)} {_pct(s.gpu_time_share)}")
        if m.requeued_jobs:
            lines.append(
                f"ETTR of {m.requeued_jobs} requeued jobs (upper bound, run time / wall time): "
                f"mean {_opt(m.ettr_upper_mean)}, min {_opt(m.ettr_upper_min)}"
            )
        else:
            lines.append("ETTR: no requeued jobs (one record per JobID), so no per-job ETTR")
        lines.append(_fits_line(m.fits, "time between interruptions"))
    for t in a.traces:
        rate = "-" if t.per_unit_hour is None else f"{t.per_unit_hour:.4g}"
        lines.append(
            f"{t.name} ({t.kind}): {t.events} events, {t.mean_units:.4g} {t.unit}s on average over "
            f"{t.duration_h:.4g} h; {rate} per {t.unit}-hour; r_f {_opt(t.rf)}; "
            f"system MTTF {mttf_text(t.mttf_system_h, t.duration_h)}"
        )
        lines.append("  causes: " + ", ".join(f"{c} {n}" for c, n in t.causes[:6]))
        lines.append(_fits_line(t.fits, "time between events"))
    for r in a.runs:
        ettr = "-" if r.ettr is None else f"{r.ettr:.4f}"
        lines.append(
            f"run {r.name} ({r.status}): wall {format_duration(r.wall_s)}, productive "
            f"{format_duration(r.productive_s)}, ETTR {ettr}, {r.steps} steps, {r.failures} failures, "
            f"MTTF {r.mttf_text}"
        )
        lines.append(
            f"  time lost {format_duration(r.lost_s)}: recovery {format_duration(r.recovery_s)}, "
            f"checkpoints {format_duration(r.checkpoint_s)}, redone steps {format_duration(r.redone_s)}, "
            f"other {format_duration(r.other_lost_s)}"
        )
        lines.extend(f"  note: {n}" for n in r.notes)
    return "\n".join(lines)
