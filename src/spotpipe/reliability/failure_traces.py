"""Failure traces: events that take a node or instance away, with the exposure behind them.

Unlike a job trace, a failure trace lists interruptions of machines, not the fate of jobs:

* LANL failure data 1996-2005 (LA-UR-05-7318; Schroeder & Gibson, "A large-scale study of
  failures in high-performance computing systems", DSN 2006): one record per node failure with
  the system, its node count, start and end of the problem, and one root-cause column
  (Facilities, Hardware, Human Error, Network, Undetermined, Software). Each system becomes one
  :class:`FailureTrace`; its exposure is nodes x (last record - first record).
* Bamboo spot traces (Thorpe et al., "Bamboo: Making Preemptible Instances Resilient for
  Affordable Training of Large DNNs", NSDI 2023): ``<ms since start>,<add|remove>,<node>``, no
  header. Every ``remove`` is a preemption; exposure is the integral of live instances over time.

Times inside a trace are seconds since its first event.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import read_text
from spotpipe.reliability.traces import IngestReport, ProblemLog


@dataclass(frozen=True)
class FailureTrace:
    """Interruptions of the machines of one system or spot pool."""

    name: str
    kind: str  # "node failures" or "spot preemptions"
    unit: str  # "node" or "instance"
    times: NDArray[np.float64]  # seconds since the trace's first event, sorted
    causes: NDArray[Any]  # root-cause class (LANL column name) or "remove"
    details: NDArray[Any]  # the cause's detail text ("CPU", "Memory Dimm", node name)
    pool: NDArray[np.float64]  # units in service just before each event
    duration_s: float
    unit_seconds: float  # exposure: unit-seconds observed
    repair_s: NDArray[np.float64] | None = None  # downtime per event, when recorded

    @property
    def mean_units(self) -> float:
        """Average number of units in service over the trace."""
        return self.unit_seconds / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def events(self) -> int:
        return int(self.times.size)


_LANL_CAUSES = ("Facilities", "Hardware", "Human Error", "Network", "Undetermined", "Software")
_LANL_REQUIRED = ("System", "nodes", "Prob Started") + _LANL_CAUSES
_LANL_KNOWN = frozenset(
    {
        "System", "machine type", "nodes", "procstot", "procsinnode", "nodenum", "nodenumz",
        "node install", "node prod", "node decom", "fru type", "mem", "cputype", "memtype",
        "num intercon", "purpose", "Prob Started", "Prob Fixed", "Down Time", "Same Event",
    }
    | set(_LANL_CAUSES)
)


def _lanl_time(text: str) -> float:
    dt = datetime.strptime(text.strip(), "%m/%d/%Y %H:%M").replace(tzinfo=timezone.utc)
    return dt.timestamp()


def read_lanl(path: str | Path) -> tuple[list[FailureTrace], IngestReport]:
    """Read the LANL failure CSV; one :class:`FailureTrace` per system, in system order.

    Args:
        path: The LANL failure data CSV.

    Returns:
        The traces (times in seconds) and the ingest report.

    Raises:
        SpotpipeError: for a missing or empty file, or a header without the required columns.
    """
    p = Path(path)
    log = ProblemLog(str(p), "lanl")
    rows: dict[str, list[tuple[float, str, str, float, int, str]]] = defaultdict(list)
    declared_nodes: dict[str, int] = {}
    no_cause = 0
    with io.StringIO(read_text(p, "trace"), newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SpotpipeError(f"{p}: empty file") from None
        index = {h: i for i, h in enumerate(header)}
        missing = [c for c in _LANL_REQUIRED if c not in index]
        if missing:
            raise SpotpipeError(f"{p}: LANL failure CSV lacks columns {', '.join(missing)}")
        log.unknown_columns = tuple(h for h in header if h not in _LANL_KNOWN)
        i_sys, i_nodes, i_start = index["System"], index["nodes"], index["Prob Started"]
        i_down = index.get("Down Time")
        i_node = index.get("nodenumz")
        cause_idx = [(c, index[c]) for c in _LANL_CAUSES]
        width = len(header)
        for row in reader:
            number = reader.line_num
            if not row or not any(v.strip() for v in row):
                continue
            log.rows += 1
            if len(row) != width:
                log.bad(number, f"{len(row)} fields, header has {width}")
                continue
            system = row[i_sys].strip()
            try:
                t = _lanl_time(row[i_start])
                down = float(row[i_down]) * 60.0 if i_down is not None and row[i_down].strip() else math.nan
                if row[i_nodes].strip():
                    declared_nodes.setdefault(system, int(row[i_nodes]))
            except ValueError as exc:
                log.bad(number, f"system {system}: {exc}")
                continue
            if not system:
                log.bad(number, "empty System")
                continue
            cause, detail = "Undetermined", ""
            for name, i in cause_idx:
                if row[i].strip():
                    cause, detail = name, row[i].strip()
                    break
            else:
                no_cause += 1
            node = row[i_node].strip() if i_node is not None else ""
            rows[system].append((t, cause, detail, down, number, node))
            log.used += 1
    if no_cause:
        log.notes.append(f"{no_cause} records name no root cause; counted as Undetermined")
    traces: list[FailureTrace] = []
    for system in sorted(rows, key=lambda s: (len(s), s)):
        records = sorted(rows[system])
        times = np.array([r[0] for r in records], dtype=np.float64)
        t0 = float(times[0])
        duration = float(times[-1] - t0)
        nodes = declared_nodes.get(system)
        if nodes is None or nodes <= 0:
            nodes = max(1, len({r[5] for r in records}))
            log.notes.append(f"system {system}: no node count; using {nodes} distinct nodes seen")
        causes = np.empty(len(records), dtype=object)
        causes[:] = [r[1] for r in records]
        details = np.empty(len(records), dtype=object)
        details[:] = [r[2] for r in records]
        traces.append(
            FailureTrace(
                name=f"LANL system {system}",
                kind="node failures",
                unit="node",
                times=times - t0,
                causes=causes,
                details=details,
                pool=np.full(len(records), float(nodes)),
                duration_s=duration,
                unit_seconds=float(nodes) * duration,
                repair_s=np.array([r[3] for r in records], dtype=np.float64),
            )
        )
    if log.rows == 0:
        raise SpotpipeError(f"{p}: a header and no failure records: nothing to measure")
    return traces, log.report()


def read_bamboo(path: str | Path) -> tuple[FailureTrace, IngestReport]:
    """Read a Bamboo AWS spot trace (``<ms>,<add|remove>,<node>``, no header).

    Args:
        path: The trace (times in milliseconds).

    Returns:
        The trace (removals as events, times in seconds) and the ingest report.

    Raises:
        SpotpipeError: for a missing file or one with no usable events.
    """
    p = Path(path)
    log = ProblemLog(str(p), "bamboo")
    live: set[str] = set()
    last_t = 0.0
    unit_seconds = 0.0
    times: list[float] = []
    names: list[str] = []
    pool: list[float] = []
    with io.StringIO(read_text(p, "trace"), newline="") as fh:
        for number, raw in enumerate(fh, 1):
            text = raw.strip()
            if not text:
                continue
            log.rows += 1
            fields = [f.strip() for f in text.split(",")]
            if len(fields) != 3:
                log.bad(number, f"{len(fields)} fields, expected <ms>,<add|remove>,<node>")
                continue
            try:
                t = int(fields[0]) / 1000.0
            except ValueError:
                log.bad(number, f"time {fields[0]!r} is not an integer number of milliseconds")
                continue
            action, node = fields[1].lower(), fields[2]
            if action not in ("add", "remove"):
                log.bad(number, f"action {fields[1]!r} is not add or remove")
                continue
            if t < last_t:
                log.bad(number, f"time {t:g} s goes back (previous {last_t:g} s)")
                continue
            if action == "add" and node in live:
                log.bad(number, f"{node} added while already live")
                continue
            if action == "remove" and node not in live:
                log.bad(number, f"{node} removed while not live")
                continue
            unit_seconds += len(live) * (t - last_t)
            last_t = t
            if action == "add":
                live.add(node)
            else:
                times.append(t)
                names.append(node)
                pool.append(float(len(live)))
                live.discard(node)
            log.used += 1
    if log.used == 0:
        raise SpotpipeError(f"{p}: no valid <ms>,<add|remove>,<node> rows")
    causes = np.empty(len(times), dtype=object)
    causes[:] = ["remove"] * len(times)
    details = np.empty(len(times), dtype=object)
    details[:] = names
    trace = FailureTrace(
        name=p.stem,
        kind="spot preemptions",
        unit="instance",
        times=np.asarray(times, dtype=np.float64),
        causes=causes,
        details=details,
        pool=np.asarray(pool, dtype=np.float64),
        duration_s=last_t,
        unit_seconds=unit_seconds,
    )
    return trace, log.report()
