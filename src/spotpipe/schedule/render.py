"""Ways to look at a schedule: the ideal-time grid, the action lists, CSV and a Chrome trace.

* :func:`render_grid`: ranks as rows, time steps as columns, where every compute action takes one
  step and communication none; start times come from playing the dependencies
  (:func:`~spotpipe.schedule.validate.simulate_schedule`), so the pipeline bubble shows as ``.``
  and the footer gives its fraction, ``(S-1)/(M+S-1)`` for GPipe (Huang et al. 2019) and 1F1B
  (Narayanan et al. 2021), ``(P-1)/(VM+P-1)`` for interleaved 1F1B (Narayanan et al. SC 2021).
* :func:`render_text`: one line of actions per rank (the exact lists the players walk).
* :func:`render_csv`: :meth:`Schedule.to_csv`, readable by ``spotpipe schedule validate``.
* :func:`chrome_trace`: ``{"traceEvents": [...]}`` with one ``"X"`` event per action, ``pid`` =
  rank, that opens in Perfetto (ui.perfetto.dev) or ``chrome://tracing``. Durations come from a
  callable, so the simulator can draw its own timings with the same code.
"""

from __future__ import annotations

import json
from typing import Any

from spotpipe.schedule.ir import Schedule, ScheduleError
from spotpipe.schedule.validate import Duration, Timeline, format_grid, simulate_schedule

#: Formats accepted by :func:`render`.
FORMATS: tuple[str, ...] = ("grid", "text", "csv", "chrome")

# Chrome-trace thread ids inside each rank's process.
_TID_COMPUTE, _TID_SEND, _TID_RECV = 0, 1, 2


def unit_timeline(schedule: Schedule) -> Timeline:
    """Start/end of every action with compute = 1 step and communication = 0.

    Args:
        schedule: Compute-only or lowered.

    Returns:
        The :class:`Timeline` in unit steps.

    Raises:
        ScheduleError: when the schedule is invalid or deadlocks.
    """
    return simulate_schedule(schedule)


def bubble_fraction(schedule: Schedule) -> float:
    """Idle share of the ideal-time grid: ``1 - busy / (ranks x makespan)``.

    Args:
        schedule: Compute-only or lowered.

    Returns:
        A fraction in [0, 1].

    Raises:
        ScheduleError: when the schedule is invalid or deadlocks.
    """
    return unit_timeline(schedule).bubble_fraction()


def render_grid(schedule: Schedule) -> str:
    """The ideal-time grid: cell ``(rank, t)`` holds the compute action starting at step ``t``.

    Communication actions of a lowered schedule take no time and are not drawn; they still
    decide when data is there. A footer gives the makespan and the bubble fraction.

    Args:
        schedule: Compute-only or lowered.

    Returns:
        The grid text, one line per rank, then the footer.

    Raises:
        ScheduleError: when the schedule is invalid or deadlocks.
    """
    timeline = unit_timeline(schedule)
    span = int(round(timeline.makespan))
    rows: list[list[str]] = []
    for row in timeline.timings:
        cells = ["."] * span
        for t in row:
            if t.action.op.is_compute:
                cells[int(round(t.start))] = str(t.action)
        rows.append(cells)
    grid = format_grid([str(t) for t in range(span)], rows, label="time", max_columns=None)
    kind = "lowered, communication takes no time" if schedule.is_lowered() else "compute-only"
    footer = (
        f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_stages} stages, "
        f"{schedule.num_microbatches} microbatches ({kind}); makespan {span} steps, "
        f"bubble {timeline.bubble_fraction():.1%}"
    )
    return f"{grid}\n{footer}"


def render_text(schedule: Schedule) -> str:
    """One line per rank: ``rank 0: 0F0 0F1 0B0 ...``.

    Args:
        schedule: Any schedule.

    Returns:
        The text, one line per rank.
    """
    return schedule.to_text()


def render_csv(schedule: Schedule) -> str:
    """The schedule as CSV (:meth:`Schedule.to_csv`).

    Args:
        schedule: Any schedule.

    Returns:
        CSV text with ``rank,index,action`` rows.
    """
    return schedule.to_csv()


def chrome_trace(
    schedule: Schedule,
    duration: Duration | None = None,
    *,
    us_per_unit: float = 1e6,
    timeline: Timeline | None = None,
) -> dict[str, Any]:
    """Chrome-trace events of a schedule: one complete (``"X"``) event per action.

    Each rank is a process (``pid`` = rank) with threads ``compute`` (F/B), ``send`` (a send
    lasts until its message arrives) and ``recv``.

    Args:
        schedule: compute-only or lowered.
        duration: seconds (or units) per action; default compute = 1, communication = 0.
        us_per_unit: trace microseconds per duration unit (1e6: durations are seconds).
        timeline: timings to draw instead of playing ``schedule`` (e.g. from the simulator).

    Returns:
        ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``.
    """
    if timeline is None:
        timeline = simulate_schedule(schedule, duration)
    events: list[dict[str, Any]] = []
    for r in range(schedule.num_ranks):
        events.append({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": r, "tid": 0, "args": {"sort_index": r}})
        for tid, label in ((_TID_COMPUTE, "compute"), (_TID_SEND, "send"), (_TID_RECV, "recv")):
            events.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid, "args": {"name": label}})
    for row in timeline.timings:
        for t in row:
            a = t.action
            tid = _TID_COMPUTE if a.op.is_compute else _TID_SEND if a.op.is_send else _TID_RECV
            args: dict[str, Any] = {"stage": a.stage, "op": a.op.value, "microbatch": a.microbatch, "index": t.index}
            if a.peer is not None:
                args["peer"] = a.peer
            events.append({
                "name": str(a),
                "cat": a.op.value,
                "ph": "X",
                "pid": t.rank,
                "tid": tid,
                "ts": t.start * us_per_unit,
                "dur": (t.end - t.start) * us_per_unit,
                "args": args,
            })
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "schedule": schedule.name,
            "ranks": schedule.num_ranks,
            "stages": schedule.num_stages,
            "microbatches": schedule.num_microbatches,
            "lowered": schedule.is_lowered(),
        },
    }


def chrome_trace_json(schedule: Schedule, duration: Duration | None = None, *, us_per_unit: float = 1e6) -> str:
    """:func:`chrome_trace` as JSON text (write it to a ``.json`` file and open it in Perfetto).

    Args:
        schedule: Compute-only or lowered.
        duration: Seconds (or units) of each action; ``None``: unit time.
        us_per_unit: Trace microseconds per unit of ``duration``.

    Returns:
        The trace as indented JSON text.

    Raises:
        ScheduleError: when the schedule is invalid or deadlocks.
    """
    return json.dumps(chrome_trace(schedule, duration, us_per_unit=us_per_unit), indent=1)


def render(schedule: Schedule, fmt: str = "grid") -> str:
    """``schedule`` in one of :data:`FORMATS`.

    Args:
        schedule: Any schedule (``grid`` and ``chrome`` play it).
        fmt: One of :data:`FORMATS`: ``grid``, ``text``, ``csv``, ``chrome``.

    Returns:
        The text.

    Raises:
        ScheduleError: for an unknown format, or a schedule that is invalid or deadlocks.
    """
    if fmt == "grid":
        return render_grid(schedule)
    if fmt == "text":
        return render_text(schedule)
    if fmt == "csv":
        return render_csv(schedule)
    if fmt == "chrome":
        return chrome_trace_json(schedule)
    raise ScheduleError(f"unknown format {fmt!r}: allowed values are {', '.join(FORMATS)}")
