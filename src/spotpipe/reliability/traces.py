"""Job traces: Slurm ``sacct --parsable2`` output and the AcmeTrace job CSV, as columns.

A trace becomes a :class:`JobTable` (one numpy column per field, one row per job allocation)
and an :class:`IngestReport` that says what was read: rows used, rows skipped and why (job
steps, jobs that never started or are still running), malformed rows with their line numbers,
and columns spotpipe does not know. Nothing is dropped silently.

Formats:
    * ``sacct --parsable2``: ``|``-separated with a header (``sacct -P -o JobID,State,...``).
      Needs ``JobID``, ``State``, ``Start`` + ``End`` (or ``Elapsed``/``ElapsedRaw``) and
      ``NNodes`` or ``AllocNodes``; GPUs come from ``AllocTRES``/``ReqTRES`` (``gres/gpu=N``)
      or nodes x ``gpus_per_node``. Job steps (``123.batch``, ``123.0``) are skipped.
    * AcmeTrace (Hu et al., "Characterization of Large Language Model Development in the
      Datacenter", NSDI 2024): ``job_id, user, node_num, gpu_num, cpu_num, type, state,
      submit_time, start_time, end_time, duration, queue, gpu_time`` (Kalos adds
      ``mem_per_pod_GB, shared_mem_per_pod, fail_time, stop_time``).

Naive timestamps are read as UTC; only differences matter here.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from spotpipe.errors import SpotpipeError

MAX_LISTED_PROBLEMS = 100  # malformed rows kept with their message; all are counted
FORMATS: tuple[str, ...] = ("sacct", "acme", "events", "lanl", "bamboo")


@dataclass(frozen=True)
class RowProblem:
    """A malformed row: its 1-based line number in the file and what is wrong."""

    line: int
    message: str


@dataclass(frozen=True)
class IngestReport:
    """What reading one trace file did."""

    path: str
    fmt: str
    rows: int
    used: int
    skipped: dict[str, int]
    malformed_count: int
    malformed: tuple[RowProblem, ...]
    unknown_columns: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def summary_lines(self) -> list[str]:
        """Human-readable lines: counts, malformed rows with line numbers, unknown columns."""
        lines = [f"{self.path}: {self.fmt}, {self.rows} rows, {self.used} used"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} rows: {reason}")
        if self.malformed_count:
            shown = ", ".join(str(p.line) for p in self.malformed[:20])
            more = "" if self.malformed_count <= 20 else f" (+{self.malformed_count - 20} more)"
            lines.append(f"  {self.malformed_count} malformed rows at lines {shown}{more}")
            for problem in self.malformed[:5]:
                lines.append(f"    line {problem.line}: {problem.message}")
        if self.unknown_columns:
            lines.append(f"  unknown columns (ignored): {', '.join(self.unknown_columns)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return lines


@dataclass
class ProblemLog:
    """Mutable collector used while reading; :meth:`report` freezes it."""

    path: str
    fmt: str
    rows: int = 0
    used: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    malformed_count: int = 0
    malformed: list[RowProblem] = field(default_factory=list)
    unknown_columns: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def bad(self, line: int, message: str) -> None:
        """Count a malformed row (and keep its message if fewer than the limit are kept)."""
        self.malformed_count += 1
        if len(self.malformed) < MAX_LISTED_PROBLEMS:
            self.malformed.append(RowProblem(line, message))

    def report(self) -> IngestReport:
        return IngestReport(
            path=self.path,
            fmt=self.fmt,
            rows=self.rows,
            used=self.used,
            skipped=dict(self.skipped),
            malformed_count=self.malformed_count,
            malformed=tuple(self.malformed),
            unknown_columns=self.unknown_columns,
            notes=tuple(self.notes),
        )


@dataclass(frozen=True)
class JobTable:
    """One row per job allocation; times in seconds since the epoch (NaN when unknown)."""

    job_id: NDArray[Any]
    nodes: NDArray[np.int64]
    gpus: NDArray[np.int64]
    submit: NDArray[np.float64]
    start: NDArray[np.float64]
    end: NDArray[np.float64]
    state: NDArray[Any]
    exit_code: NDArray[np.int64]
    signal: NDArray[np.int64]
    reason: NDArray[Any]
    line: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.nodes.size)

    @property
    def runtime(self) -> NDArray[np.float64]:
        """Seconds each job ran."""
        return self.end - self.start


class _Columns:
    """Lists filled row by row, turned into a :class:`JobTable` at the end."""

    def __init__(self) -> None:
        self.job_id: list[str] = []
        self.nodes: list[int] = []
        self.gpus: list[int] = []
        self.submit: list[float] = []
        self.start: list[float] = []
        self.end: list[float] = []
        self.state: list[str] = []
        self.exit_code: list[int] = []
        self.signal: list[int] = []
        self.reason: list[str] = []
        self.line: list[int] = []

    def add(self, job_id: str, nodes: int, gpus: int, submit: float, start: float, end: float,
            state: str, exit_code: int, signal: int, reason: str, line: int) -> None:
        self.job_id.append(job_id)
        self.nodes.append(nodes)
        self.gpus.append(gpus)
        self.submit.append(submit)
        self.start.append(start)
        self.end.append(end)
        self.state.append(state)
        self.exit_code.append(exit_code)
        self.signal.append(signal)
        self.reason.append(reason)
        self.line.append(line)

    def table(self) -> JobTable:
        def obj(values: list[str]) -> NDArray[Any]:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            return arr

        return JobTable(
            job_id=obj(self.job_id),
            nodes=np.asarray(self.nodes, dtype=np.int64),
            gpus=np.asarray(self.gpus, dtype=np.int64),
            submit=np.asarray(self.submit, dtype=np.float64),
            start=np.asarray(self.start, dtype=np.float64),
            end=np.asarray(self.end, dtype=np.float64),
            state=obj(self.state),
            exit_code=np.asarray(self.exit_code, dtype=np.int64),
            signal=np.asarray(self.signal, dtype=np.int64),
            reason=obj(self.reason),
            line=np.asarray(self.line, dtype=np.int64),
        )


_MISSING_TIMES = frozenset({"", "unknown", "none", "n/a", "nan", "nat"})


def parse_time(text: str) -> float:
    """Seconds since the epoch from ISO-8601 (``T`` or space, optional offset) or a number.

    Returns NaN for the placeholders Slurm and pandas write for "no time" (``Unknown``,
    ``None``, empty); raises ``ValueError`` for anything else that is not a time.
    """
    s = text.strip()
    if s.lower() in _MISSING_TIMES:
        return math.nan
    try:
        return float(s)
    except ValueError:
        pass
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def parse_elapsed(text: str) -> float:
    """Slurm elapsed ``[D-]HH:MM:SS``, ``MM:SS`` (fractions allowed) or raw seconds."""
    s = text.strip()
    days = 0
    if "-" in s:
        day_text, s = s.split("-", 1)
        days = int(day_text)
    parts = [float(p) for p in s.split(":")]
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
        raise ValueError(f"bad elapsed time {text!r}")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60.0 + part
    return days * 86400.0 + seconds


_GPU_TRES = re.compile(r"gres/gpu(:[^=,]+)?=(\d+)")

# sacct field names (sacct --helpformat), lower case; columns outside this set are named.
SACCT_FIELDS = frozenset(
    f.lower()
    for f in """Account AdminComment AllocCPUS AllocNodes AllocTRES AssocID AveCPU AveCPUFreq
    AveDiskRead AveDiskWrite AvePages AveRSS AveVMSize BlockID Cluster Comment Constraints Container
    ConsumedEnergy ConsumedEnergyRaw CPUTime CPUTimeRAW DBIndex DerivedExitCode Elapsed ElapsedRaw
    Eligible End ExitCode Extra FailedNode Flags GID Group JobID JobIDRaw JobName Layout Licenses
    MaxDiskRead MaxDiskReadNode MaxDiskReadTask MaxDiskWrite MaxDiskWriteNode MaxDiskWriteTask
    MaxPages MaxPagesNode MaxPagesTask MaxRSS MaxRSSNode MaxRSSTask MaxVMSize MaxVMSizeNode
    MaxVMSizeTask McsLabel MinCPU MinCPUNode MinCPUTask NCPUS NNodes NodeList NTasks Partition
    Planned PlannedCPU PlannedCPURAW Priority QOS QOSRAW Reason ReqCPUFreq ReqCPUFreqGov
    ReqCPUFreqMax ReqCPUFreqMin ReqCPUS ReqMem ReqNodes ReqTRES Reservation ReservationId Start
    State StdErr StdIn StdOut Submit SubmitLine Suspended SystemComment SystemCPU Timelimit
    TimelimitRaw TotalCPU TRESUsageInAve TRESUsageInMax TRESUsageInMaxNode TRESUsageInMaxTask
    TRESUsageInMin TRESUsageInMinNode TRESUsageInMinTask TRESUsageInTot TRESUsageOutAve
    TRESUsageOutMax TRESUsageOutMaxNode TRESUsageOutMaxTask TRESUsageOutMin TRESUsageOutMinNode
    TRESUsageOutMinTask TRESUsageOutTot UID User UserCPU WCKey WCKeyID WorkDir""".split()
)
_SACCT_REASON_COLUMNS = ("reason", "comment", "admincomment", "systemcomment", "failednode")
_RUNNING_STATES = frozenset({"RUNNING", "PENDING", "REQUEUED", "RESIZING", "SUSPENDED"})


def _exit_code(text: str) -> tuple[int, int]:
    """``"1:9"`` -> (1, 9); empty -> (0, 0)."""
    s = text.strip()
    if not s:
        return 0, 0
    code, _, sig = s.partition(":")
    return int(code), int(sig or 0)


def _gpus_from_tres(text: str) -> int | None:
    untyped = None
    typed = 0
    for match in _GPU_TRES.finditer(text):
        if match.group(1) is None:
            untyped = int(match.group(2))
        else:
            typed = max(typed, int(match.group(2)))
    if untyped is not None:
        return untyped
    return typed if typed else None


def read_sacct(path: str | Path, gpus_per_node: int = 8) -> tuple[JobTable, IngestReport]:
    """Read ``sacct --parsable2`` output (see the module docstring)."""
    p = Path(path)
    log = ProblemLog(str(p), "sacct")
    cols = _Columns()
    with open(p, encoding="utf-8", errors="replace", newline="") as fh:
        header_line = fh.readline().rstrip("\r\n")
        header = [h.strip() for h in header_line.split("|")]
        index = {h.lower(): i for i, h in enumerate(header)}
        unknown = [h for h in header if h.lower() not in SACCT_FIELDS]
        log.unknown_columns = tuple(unknown)

        def need(*names: str) -> int:
            for name in names:
                if name in index:
                    return index[name]
            raise SpotpipeError(
                f"{p}: sacct header has no {' or '.join(names)} column (header: {header_line[:200]!r})"
            )

        i_id = need("jobid", "jobidraw")
        i_state = need("state")
        i_nodes = need("nnodes", "allocnodes")
        i_start = index.get("start")
        i_end = index.get("end")
        i_elapsed = index.get("elapsedraw", index.get("elapsed"))
        if (i_start is None or i_end is None) and i_elapsed is None:
            raise SpotpipeError(f"{p}: sacct header needs Start and End, or Elapsed/ElapsedRaw")
        i_submit = index.get("submit")
        i_exit = index.get("exitcode")
        i_tres = index.get("alloctres", index.get("reqtres"))
        i_reasons = [index[c] for c in _SACCT_REASON_COLUMNS if c in index]
        width = len(header)
        for number, raw in enumerate(fh, 2):
            text = raw.rstrip("\r\n")
            if not text:
                continue
            log.rows += 1
            f = text.split("|")
            if len(f) != width:
                log.bad(number, f"{len(f)} fields, header has {width}")
                continue
            job_id = f[i_id].strip()
            if "." in job_id:
                log.skipped["job steps (JobID with '.')"] += 1
                continue
            state = f[i_state].strip().split(" ", 1)[0].upper()
            try:
                start = parse_time(f[i_start]) if i_start is not None else math.nan
                end = parse_time(f[i_end]) if i_end is not None else math.nan
                if i_elapsed is not None:
                    if i_start is None:  # only Elapsed: durations without dates
                        start, end = 0.0, parse_elapsed(f[i_elapsed])
                    elif math.isnan(end) and not math.isnan(start) and state not in _RUNNING_STATES:
                        end = start + parse_elapsed(f[i_elapsed])
                submit = parse_time(f[i_submit]) if i_submit is not None else math.nan
                nodes = int(f[i_nodes])
                code, sig = _exit_code(f[i_exit]) if i_exit is not None else (0, 0)
            except ValueError as exc:
                log.bad(number, f"job {job_id}: {exc}")
                continue
            if state in _RUNNING_STATES or math.isnan(end):
                if math.isnan(start):
                    log.skipped["never started"] += 1
                else:
                    log.skipped["not finished (no End)"] += 1
                continue
            if math.isnan(start):
                log.skipped["never started"] += 1
                continue
            if end < start:
                log.bad(number, f"job {job_id}: End is before Start")
                continue
            if nodes < 0:
                log.bad(number, f"job {job_id}: negative node count {nodes}")
                continue
            gpus = _gpus_from_tres(f[i_tres]) if i_tres is not None else None
            if gpus is None:
                gpus = nodes * gpus_per_node
            reason = " ".join(f[i].strip() for i in i_reasons if f[i].strip())
            cols.add(job_id, nodes, gpus, submit, start, end, state, code, sig, reason, number)
            log.used += 1
    if i_tres is None:
        log.notes.append(f"no AllocTRES/ReqTRES column: GPUs taken as nodes x {gpus_per_node}")
    return cols.table(), log.report()


ACME_COLUMNS = (
    "job_id", "user", "node_num", "gpu_num", "cpu_num", "type", "state",
    "submit_time", "start_time", "end_time", "duration", "queue", "gpu_time",
)
ACME_KALOS_COLUMNS = ("mem_per_pod_GB", "shared_mem_per_pod", "fail_time", "stop_time")
_ACME_REQUIRED = ("job_id", "node_num", "gpu_num", "state", "start_time", "end_time")


def read_acme(path: str | Path) -> tuple[JobTable, IngestReport]:
    """Read an AcmeTrace job CSV (``trace_seren.csv`` / ``trace_kalos.csv`` schema)."""
    p = Path(path)
    log = ProblemLog(str(p), "acme")
    cols = _Columns()
    with open(p, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SpotpipeError(f"{p}: empty file") from None
        index = {h: i for i, h in enumerate(header)}
        missing = [c for c in _ACME_REQUIRED if c not in index]
        if missing:
            raise SpotpipeError(f"{p}: AcmeTrace CSV lacks columns {', '.join(missing)}")
        known = set(ACME_COLUMNS) | set(ACME_KALOS_COLUMNS)
        log.unknown_columns = tuple(h for h in header if h not in known)
        i_id, i_nodes, i_gpus = index["job_id"], index["node_num"], index["gpu_num"]
        i_state, i_start, i_end = index["state"], index["start_time"], index["end_time"]
        i_submit = index.get("submit_time")
        i_fail = index.get("fail_time")
        width = len(header)
        for row in reader:
            number = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            log.rows += 1
            if len(row) != width:
                log.bad(number, f"{len(row)} fields, header has {width}")
                continue
            job_id = row[i_id].strip()
            state = row[i_state].strip().upper()
            try:
                start = parse_time(row[i_start])
                end = parse_time(row[i_end])
                submit = parse_time(row[i_submit]) if i_submit is not None else math.nan
                nodes = int(float(row[i_nodes] or 0))
                gpus = int(float(row[i_gpus] or 0))
            except ValueError as exc:
                log.bad(number, f"job {job_id}: {exc}")
                continue
            if math.isnan(start):
                log.skipped["never started"] += 1
                continue
            if math.isnan(end):
                log.skipped["not finished (no end_time)"] += 1
                continue
            if end < start:
                log.bad(number, f"job {job_id}: end_time is before start_time")
                continue
            if nodes < 0 or gpus < 0:
                log.bad(number, f"job {job_id}: negative node_num or gpu_num")
                continue
            reason = "fail_time set" if i_fail is not None and row[i_fail].strip() else ""
            cols.add(job_id, nodes, gpus, submit, start, end, state, 0, 0, reason, number)
            log.used += 1
    return cols.table(), log.report()


_BAMBOO_LINE = re.compile(r"^\s*\d+\s*,\s*(add|remove)\s*,", re.IGNORECASE)


def detect_format(path: str | Path) -> str:
    """Tell a trace's format from its name and first line; one line of error if unknown."""
    p = Path(path)
    if not p.is_file():
        raise SpotpipeError(f"trace {p} does not exist")
    with open(p, encoding="utf-8", errors="replace") as fh:
        first = ""
        for line in fh:
            if line.strip():
                first = line.strip()
                break
    if not first:
        raise SpotpipeError(f"trace {p} is empty")
    lower = first.lower()
    if p.suffix == ".jsonl" or first.startswith("{"):
        return "events"
    if "|" in first and "jobid" in lower:
        return "sacct"
    if "job_id" in lower and "state" in lower:
        return "acme"
    if "prob started" in lower:
        return "lanl"
    if _BAMBOO_LINE.match(first):
        return "bamboo"
    raise SpotpipeError(
        f"cannot tell the format of {p} from its first line {first[:80]!r}; "
        f"pass --format {'|'.join(FORMATS)}"
    )
