"""``spotpipe reliability report``: one self-contained HTML page with plots and tables.

Plots (PNG, embedded as base64, drawn with matplotlib's object API so no global backend is
touched; matplotlib is imported only here, when a report is asked for):

* MTTF vs job size: ``1000 days / (N r_f)`` for the planning ``r_f`` and for each measured one,
  with the measured MTTF per job-size bucket of job traces (Kokolis et al., Meta, 2025);
* ETTR vs checkpoint interval: Meta's first-order form, Daly's exact form, Monte Carlo points
  with 95% intervals, the best interval, and checkpoint-free recovery (CheckFree, 2025);
* CDF of the time between failures with the exponential and Weibull fits (Schroeder & Gibson,
  DSN 2006).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import write_output
from spotpipe.reliability.analysis import TraceAnalysis, render_analysis
from spotpipe.reliability.fits import IntervalFits, intervals_from_times
from spotpipe.reliability.models import Plan, ettr_checkpoint, ettr_checkpoint_exact, mttf_hours, render_plan
from spotpipe.reliability.montecarlo import CheckpointRestart, Exponential, simulate
from spotpipe.reliability.units import SECONDS_PER_DAY, SECONDS_PER_HOUR, rate_per_second

MAX_CDF_SERIES = 4


def _figure() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SpotpipeError("the HTML report needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_mttf(plan: Plan, analyses: list[TraceAnalysis]) -> str:
    """MTTF (hours) vs GPUs on log-log axes; returns the PNG as base64.

    Args:
        plan: The job (``gpus_per_node``, ``rf``, ``gpus``).
        analyses: Analysed traces; their ``r_f`` and measured MTTF per bucket are drawn too.

    Returns:
        The PNG, base64 text.
    """
    fig, ax = _figure()
    gpus = np.logspace(np.log10(plan.gpus_per_node), np.log10(max(131072, plan.gpus * 2)), 60)
    nodes = gpus / plan.gpus_per_node
    ax.plot(gpus, [mttf_hours(n, plan.rf) for n in nodes], label=f"model, r_f = {plan.rf:.3g}")
    for a in analyses:
        if a.jobs is not None and a.jobs.rf:
            name = Path(a.report.path).name
            ax.plot(gpus, [mttf_hours(n, a.jobs.rf) for n in nodes], "--", label=f"model, r_f = {a.jobs.rf:.3g} ({name})")
            pts = [(b.lo if b.hi is None else (b.lo + b.hi - 1) / 2, b.mttf_measured_h) for b in a.jobs.buckets if b.mttf_measured_h and b.lo > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"measured ({name})")
    ax.axvline(plan.gpus, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GPUs in the job")
    ax.set_ylabel("MTTF (hours)")
    ax.set_title("MTTF vs job size")
    ax.legend(fontsize=7)
    return _png(fig)


ETTR_POINTS = 6  # Monte Carlo points on the ETTR plot


def ettr_plot_wall(mttf_s: float) -> float:
    """Wall time of each simulated job on the ETTR plot: 30 days, at least 200 MTTFs (60 days
    when the MTTF is a day or more).

    Args:
        mttf_s: MTTF of the job, seconds.

    Returns:
        Wall time in seconds.
    """
    return max(30 * SECONDS_PER_DAY, 200 * mttf_s) if mttf_s < SECONDS_PER_DAY else 60 * SECONDS_PER_DAY


def plot_ettr(plan: Plan, trials: int, seed: int = 0) -> tuple[str, list[dict[str, float]]]:
    """ETTR vs checkpoint interval with Monte Carlo points; PNG and the simulated points.

    Args:
        plan: The job.
        trials: Monte Carlo jobs per point.
        seed: Seed of the first point (each point adds its index).

    Returns:
        The PNG (base64 text) and one dict per simulated point: ``interval_s``, ``ettr`` and its 95%
        interval ``ci_lo``, ``ci_hi``.
    """
    fig, ax = _figure()
    lam = rate_per_second(plan.nodes, plan.rf)
    mttf_s = 1.0 / lam
    lo = max(plan.step_s, plan.write_s / 4.0, 30.0)
    hi = max(8.0 * mttf_s, 4.0 * (plan.best_interval_s or mttf_s))
    grid = np.logspace(np.log10(lo), np.log10(hi), 80)
    first = [ettr_checkpoint(t, plan.write_s, plan.restart_s, plan.nodes, plan.rf) for t in grid]
    exact = [ettr_checkpoint_exact(t, plan.write_s, plan.restart_s, lam) for t in grid]
    ax.plot(grid / 60, first, label="first order (Meta)")
    ax.plot(grid / 60, exact, label="exact, exponential (Daly)")
    wall = ettr_plot_wall(mttf_s)
    points: list[dict[str, float]] = []
    for k, t in enumerate(np.logspace(np.log10(lo * 2), np.log10(hi / 2), ETTR_POINTS)):
        r = simulate(Exponential(mttf_s), CheckpointRestart(float(t), plan.write_s, plan.restart_s), wall, plan.step_s, trials, seed + k)
        points.append({"interval_s": float(t), "ettr": r.ettr_mean, "ci_lo": r.ettr_ci95[0], "ci_hi": r.ettr_ci95[1]})
    ax.errorbar(
        [p["interval_s"] / 60 for p in points],
        [p["ettr"] for p in points],
        yerr=[[p["ettr"] - p["ci_lo"] for p in points], [p["ci_hi"] - p["ettr"] for p in points]],
        fmt="o",
        label="Monte Carlo (95% CI)",
    )
    ax.axhline(plan.ettr_checkpoint_free, color="green", ls=":", label="checkpoint-free")
    if plan.best_interval_s is not None:
        ax.axvline(plan.best_interval_s / 60, color="grey", lw=0.8, label="best interval")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("checkpoint interval (minutes)")
    ax.set_ylabel("ETTR")
    ax.set_title(f"ETTR vs checkpoint interval ({plan.gpus} GPUs, MTTF {plan.mttf_hours:.3g} h)")
    ax.legend(fontsize=7)
    return _png(fig), points


def _series(analyses: list[TraceAnalysis]) -> list[tuple[str, NDArray[np.float64], IntervalFits]]:
    """Up to :data:`MAX_CDF_SERIES` interval sets, taken in turn from each file (largest first)."""
    per_file: list[list[tuple[str, NDArray[np.float64], IntervalFits]]] = []
    for a in analyses:
        found: list[tuple[str, NDArray[np.float64], IntervalFits]] = []
        if a.jobs is not None and a.jobs.fits is not None:
            gaps, _ = intervals_from_times(a.jobs.interruption_times)
            found.append((Path(a.report.path).name, gaps, a.jobs.fits))
        for metrics, trace in sorted(zip(a.traces, a.failure_traces), key=lambda p: -p[0].events):
            if metrics.fits is not None:
                gaps, _ = intervals_from_times(trace.times)
                found.append((metrics.name, gaps, metrics.fits))
        per_file.append(found)
    out: list[tuple[str, NDArray[np.float64], IntervalFits]] = []
    for rank in range(max((len(f) for f in per_file), default=0)):
        out.extend(f[rank] for f in per_file if rank < len(f))
    return out[:MAX_CDF_SERIES]


def plot_cdf(analyses: list[TraceAnalysis]) -> str | None:
    """Empirical CDF of time between failures with both fits; ``None`` if nothing to plot.

    Args:
        analyses: Analysed traces; those with interval fits are drawn.

    Returns:
        The PNG as base64 text, or ``None``.
    """
    series = _series(analyses)
    if not series:
        return None
    fig, ax = _figure()
    for k, (name, gaps, fits) in enumerate(series):
        color = f"C{k}"
        xs = np.sort(gaps)
        ax.step(xs / SECONDS_PER_HOUR, np.arange(1, xs.size + 1) / xs.size, where="post", color=color, label=f"{name} (data)")
        grid = np.logspace(np.log10(xs[0]), np.log10(xs[-1]), 100)
        ax.plot(grid / SECONDS_PER_HOUR, fits.weibull.cdf(grid), "--", color=color, label=f"Weibull k={fits.weibull.shape:.2f}")
        ax.plot(grid / SECONDS_PER_HOUR, fits.exponential.cdf(grid), ":", color=color, label="exponential")
    ax.set_xscale("log")
    ax.set_xlabel("time between failures (hours)")
    ax.set_ylabel("CDF")
    ax.set_title("Time between failures with fits")
    ax.legend(fontsize=6)
    return _png(fig)


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(path: Path, analyses: list[TraceAnalysis], plan: Plan, trials: int = 64) -> Path:
    """Write the HTML report; returns its path.

    Args:
        path: The HTML file to write.
        analyses: Analysed traces.
        plan: The job's plan.
        trials: Monte Carlo jobs per ETTR point.

    Returns:
        ``path``.
    """
    mttf_png = plot_mttf(plan, analyses)
    ettr_png, points = plot_ettr(plan, trials)
    cdf_png = plot_cdf(analyses)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>spotpipe reliability report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}pre{background:#f6f6f6;padding:.6em;"
        "overflow-x:auto;font-size:12px}img{max-width:100%}</style></head><body>",
        "<h1>spotpipe reliability report</h1>",
        "<h2>Plan</h2>",
        f"<pre>{html.escape(render_plan(plan))}</pre>",
        "<h2>MTTF vs job size</h2>",
        _img(mttf_png, "MTTF vs job size"),
        "<h2>ETTR vs checkpoint interval</h2>",
        _img(ettr_png, "ETTR vs checkpoint interval"),
        "<pre>" + html.escape("\n".join(
            f"interval {p['interval_s'] / 60:8.1f} min  MC ETTR {p['ettr']:.4f}  (95% CI {p['ci_lo']:.4f}-{p['ci_hi']:.4f})"
            for p in points
        )) + "</pre>",
    ]
    parts.append("<h2>Time between failures</h2>")
    parts.append(_img(cdf_png, "failure-interval CDF") if cdf_png else "<p>No trace with enough failures to fit.</p>")
    parts.append("<h2>Traces</h2>")
    if not analyses:
        parts.append("<p>No traces given.</p>")
    for a in analyses:
        parts.append(f"<h3>{html.escape(a.report.path)}</h3><pre>{html.escape(render_analysis(a))}</pre>")
    parts.append("</body></html>")
    write_output(path, "\n".join(parts), "--output")
    return path
