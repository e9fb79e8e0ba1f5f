"""ETTR, failures and time lost of spotpipe runs, from their ``events.jsonl``.

The runtime and the simulator write the same events (:mod:`spotpipe.events`), so one reader
measures both. Following Kokolis et al. (Meta, 2025), the effective training time ratio is
``ETTR = productive time / wall time``:

* wall time runs from ``run_start`` to ``run_end`` (or to the last event of a run that never
  ended, which is said in a note);
* productive time is the ``step_time`` of every committed step, counted once. A step number
  that is committed again after a failure (work rolled back to a checkpoint and redone) counts
  once, and its earlier time is lost work; the same step reported twice with no failure in
  between (several writers) is a duplicate, not lost work. Records without ``step_time`` use
  the median gap between consecutive steps.

Time lost is split into recovery (``recovery_finished.seconds``), checkpoint writes
(``checkpoint.seconds``), redone steps, and the rest (detection, restarts, idle).
"""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotpipe import events as ev
from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import read_text
from spotpipe.reliability.traces import IngestReport, ProblemLog
from spotpipe.reliability.units import SECONDS_PER_HOUR, mttf_text

_EPOCH_EVENTS = frozenset({ev.FAILURE_CONFIRMED, ev.GENERATION, ev.STEP_REPLAYED})


@dataclass(frozen=True)
class RunSummary:
    """Measured reliability of one run (seconds unless named otherwise)."""

    name: str
    mode: str
    status: str
    wall_s: float
    productive_s: float
    steps: int
    failures: int
    recoveries: int
    recovery_s: float
    checkpoint_s: float
    redone_s: float
    duplicate_steps: int
    notes: tuple[str, ...] = ()
    recovery_times: tuple[float, ...] = field(default=(), repr=False)

    @property
    def ettr(self) -> float | None:
        """Productive time / wall time; ``None`` for a run with no wall time."""
        return self.productive_s / self.wall_s if self.wall_s > 0 else None

    @property
    def lost_s(self) -> float:
        return max(0.0, self.wall_s - self.productive_s)

    @property
    def other_lost_s(self) -> float:
        """Lost time not explained by recovery, checkpoints or redone steps."""
        return max(0.0, self.lost_s - self.recovery_s - self.checkpoint_s - self.redone_s)

    @property
    def mttf_hours(self) -> float | None:
        return self.wall_s / self.failures / SECONDS_PER_HOUR if self.failures else None

    @property
    def mttf_text(self) -> str:
        return mttf_text(self.mttf_hours, self.wall_s / SECONDS_PER_HOUR)

    @property
    def mean_recovery_s(self) -> float | None:
        return statistics.fmean(self.recovery_times) if self.recovery_times else None


class _Run:
    """Accumulates one run's events."""

    def __init__(self, name: str, mode: str, t0: float | None) -> None:
        self.name = name
        self.mode = mode
        self.t0 = t0
        self.t_last = t0
        self.t_end: float | None = None
        self.status = "no run_end"
        self.epoch = 0
        self.steps: dict[int, tuple[float | None, int, float]] = {}  # step -> (step_time, epoch, t)
        self.redone_s = 0.0
        self.redone_unknown = 0
        self.duplicates = 0
        self.failures = 0
        self.recoveries: list[float] = []
        self.checkpoint_s = 0.0

    def see(self, t: float) -> None:
        if self.t0 is None:
            self.t0 = t
        self.t_last = t if self.t_last is None else max(self.t_last, t)

    def summary(self) -> RunSummary:
        notes: list[str] = []
        if self.t0 is None:
            return RunSummary(self.name, self.mode, "empty", 0.0, 0.0, 0, 0, 0, 0.0, 0.0, 0.0, 0, ("no events",))
        end = self.t_end if self.t_end is not None else self.t_last
        if self.t_end is None:
            notes.append("no run_end: wall time runs to the last event")
        assert end is not None
        wall = max(0.0, end - self.t0)
        known = [st for st, _, _ in self.steps.values() if st is not None]
        missing = len(self.steps) - len(known)
        productive = math.fsum(known)
        if missing:
            ordered = sorted(t for _, _, t in self.steps.values())
            gaps = [b - a for a, b in zip(ordered, ordered[1:]) if b > a]
            fill = statistics.median(gaps) if gaps else 0.0
            productive += missing * fill
            self.redone_s += self.redone_unknown * fill
            notes.append(f"{missing} steps without step_time: median gap {fill:.3g} s used")
        return RunSummary(
            name=self.name,
            mode=self.mode,
            status=self.status,
            wall_s=wall,
            productive_s=min(productive, wall) if wall > 0 else productive,
            steps=len(self.steps),
            failures=self.failures,
            recoveries=len(self.recoveries),
            recovery_s=math.fsum(self.recoveries),
            checkpoint_s=self.checkpoint_s,
            redone_s=self.redone_s,
            duplicate_steps=self.duplicates,
            notes=tuple(notes),
            recovery_times=tuple(self.recoveries),
        )


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_runs(path: str | Path) -> tuple[list[RunSummary], IngestReport]:
    """Summaries of every run in an event file (a new run begins at each ``run_start``).

    Lines that are not JSON raise a one-line error naming the file and line (from
    :func:`spotpipe.events.iter_events`); records with missing or bad fields are counted as
    malformed with their line numbers.

    Args:
        path: An ``events.jsonl`` of the runtime or the simulator.

    Returns:
        One :class:`RunSummary` per run, and the ingest report.

    Raises:
        SpotpipeError: for a missing file or a line that is not JSON.
    """
    p = Path(path)
    log = ProblemLog(str(p), "events")
    if not p.is_file():
        raise SpotpipeError(f"event log {p} does not exist")
    lines = io.StringIO(read_text(p, "event log"), newline=None).readlines()
    line_numbers = [n for n, line in enumerate(lines, 1) if line.strip()]
    runs: list[_Run] = []
    current: _Run | None = None
    for k, record in enumerate(ev.iter_events(p)):
        number = line_numbers[k] if k < len(line_numbers) else k + 1
        log.rows += 1
        name = record["event"]
        t = _number(record, "t")
        if t is None:
            log.bad(number, f"{name}: 't' is missing or not a number")
            continue
        if name == ev.RUN_START or current is None:
            current = _Run(str(record.get("name", f"run {len(runs) + 1}")), str(record.get("mode", "")), None)
            runs.append(current)
        current.see(t)
        if name == ev.STEP:
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                log.bad(number, "step: 'step' is missing or not an integer")
                continue
            step_time = _number(record, "step_time")
            previous = current.steps.get(step)
            if previous is not None:
                if previous[1] == current.epoch:
                    current.duplicates += 1
                    log.used += 1
                    continue
                if previous[0] is None:
                    current.redone_unknown += 1
                else:
                    current.redone_s += previous[0]
            current.steps[step] = (step_time, current.epoch, t)
        elif name in _EPOCH_EVENTS:
            current.epoch += 1
            if name == ev.FAILURE_CONFIRMED:
                current.failures += 1
        elif name == ev.RECOVERY_FINISHED:
            seconds = _number(record, "seconds")
            if seconds is None:
                log.bad(number, "recovery_finished: 'seconds' is missing or not a number")
                continue
            current.recoveries.append(seconds)
        elif name == ev.CHECKPOINT:
            seconds = _number(record, "seconds")
            if seconds is not None:
                current.checkpoint_s += seconds
        elif name == ev.RUN_END:
            current.t_end = t
            current.status = str(record.get("status", "finished"))
        log.used += 1
    if not runs:
        raise SpotpipeError(f"event log {p} has no events")
    return [run.summary() for run in runs], log.report()
