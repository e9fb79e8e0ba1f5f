"""Time at each shape of an elastic run, and the throughput lost to shrinking (from its events).

An elastic job (``ft.elastic``) trains at the configured shape (``S x R``: stages x replicas)
until it loses a worker with no replacement; then it shrinks (``reshape`` events) and later grows
back. Every ``step`` event of such a run names the shape it ran at (``shape``, e.g. ``"3x1"``).
:func:`shape_times` adds up the step time at each shape and prices the smaller shapes the way the
simulator does (:class:`spotpipe.sim.elastic.ElasticResult`'s ``shrink_lost_s``): over the steps
at another shape than the configured one, their step time minus the configured shape's median
step time. Steps whose time includes a reshape or a recovery (the first of a generation) are
counted at their shape but left out of the medians. Pure Python.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShapeTimes:
    """Where an elastic run spent its steps.

    Attributes:
        configured: The shape the run was configured with (``"SxR"``).
        seconds: ``(shape, seconds of its steps, steps)`` in order of first use.
        shrink_lost_s: Seconds lost to running at other shapes than ``configured`` (>= 0).
        median_step_s: Per shape, its median step seconds (steady steps only).
    """

    configured: str
    seconds: tuple[tuple[str, float, int], ...]
    shrink_lost_s: float
    median_step_s: Mapping[str, float]

    def line(self) -> str:
        """``4x1 20.1 s (200 steps), 3x1 5.2 s (40 steps); 1.1 s lost to shrinking``.

        Returns:
            One line, no newline.
        """
        parts = ", ".join(f"{label} {s:.1f} s ({n} step{'s' if n != 1 else ''})" for label, s, n in self.seconds)
        return f"time at shape {parts}; {self.shrink_lost_s:.1f} s lost to shrinking"


def shape_times(records: Iterable[Mapping[str, Any]], configured: str) -> ShapeTimes | None:
    """Time at each shape from a run's ``step`` events (module docstring).

    Args:
        records: The run's events, in order (dicts with ``event``; ``step`` events with
            ``step_time`` in seconds, ``generation`` and ``shape``).
        configured: The configured shape, ``"SxR"``.

    Returns:
        The times, or None when no step names a shape other than ``configured`` (not elastic,
        or it never reshaped).
    """
    seconds: dict[str, float] = {}
    steps: dict[str, int] = {}
    steady: dict[str, list[float]] = {}
    times: list[tuple[str, float]] = []
    last_generation = None
    for r in records:
        if r.get("event") != "step" or "shape" not in r:
            continue
        label, t = str(r["shape"]), max(0.0, float(r.get("step_time", 0.0)))
        seconds[label] = seconds.get(label, 0.0) + t
        steps[label] = steps.get(label, 0) + 1
        if r.get("generation") == last_generation:  # the first step of a generation includes its set-up
            steady.setdefault(label, []).append(t)
            times.append((label, t))
        last_generation = r.get("generation")
    if not seconds or set(seconds) == {configured}:
        return None
    medians = {label: statistics.median(ts) for label, ts in steady.items() if ts}
    base = medians.get(configured)
    lost = 0.0 if base is None else sum(max(0.0, t - base) for label, t in times if label != configured)
    return ShapeTimes(configured, tuple((label, seconds[label], steps[label]) for label in seconds), lost, medians)
