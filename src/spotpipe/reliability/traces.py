"""Job traces: Slurm ``sacct --parsable2`` output and the AcmeTrace job CSV, as columns.

A trace becomes a :class:`JobTable` (one numpy column per field, one row per job allocation)
and an :class:`IngestReport` that says what was read: rows used, rows skipped and why (job
steps, jobs that never started or are still running), malformed rows with their line numbers,
and columns spotpipe does not know. Nothing is dropped silently.

Formats:
    * ``sacct --parsable2``: ``|``-separated with a header (``sacct -P -o JobID,State,...``).
      Needs ``JobID``, ``State``, ``Start`` + ``End`` (or ``Elapsed``/``ElapsedRaw``) and
      ``NNodes`` or ``AllocNodes``; GPUs come from ``AllocTRES``/``ReqTRES`` (``gres/gpu=N``)
      or nodes x ``gpus_per_node``. Job steps (``123.batch``, ``123.0``) are skipped. A record
      with an End (or, without an End column, an Elapsed and a state that has ended) is a
      finished run whatever its state, so the earlier runs of a requeued job
      (``sacct --duplicates``: state ``REQUEUED``, ``PREEMPTED``, ``NODE_FAIL``, ... with one
      JobID) are all used.
    * AcmeTrace (Hu et al., "Characterization of Large Language Model Development in the
      Datacenter", NSDI 2024): ``job_id, user, node_num, gpu_num, cpu_num, type, state,
      submit_time, start_time, end_time, duration, queue, gpu_time`` (Kalos adds
      ``mem_per_pod_GB, shared_mem_per_pod, fail_time, stop_time``).

Naive timestamps are read as UTC; only differences matter here. Submit times are not read
(queueing is outside what these metrics measure), so they are not checked either.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import read_text
from spotpipe.reliability.columns import (
    MISSING_TIMES,
    int_column,
    map_column,
    no_gc,
    strip_column,
    time_column,
)

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
        """Count a malformed row (and keep its message if fewer than the limit are kept).

        Args:
            line: 1-based line number in the file.
            message: What is wrong with it.
        """
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


def _obj(values: Sequence[str]) -> NDArray[Any]:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def _split_columns(
    text: str, sep: str, width: int, log: ProblemLog
) -> tuple[list[Sequence[str]], NDArray[np.int64]]:
    """Columns of the data lines after the header, with their 1-based line numbers.

    Lines with the wrong number of fields are reported as malformed and left out. The good
    lines are joined and split once, then sliced into columns, which is several times faster
    than splitting each line into its own list.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    del text
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    body = lines[1:]
    counts = np.fromiter(map(str.count, body, [sep] * len(body)), dtype=np.int64, count=len(body))
    good = counts == width - 1
    numbers = np.arange(2, len(body) + 2, dtype=np.int64)
    if not good.all():
        blank = np.fromiter((not line.strip() for line in body), dtype=bool, count=len(body))
        wrong = ~good & ~blank
        for i in np.flatnonzero(wrong).tolist():
            log.bad(i + 2, f"{counts[i] + 1} fields, header has {width}")
        log.rows += int(wrong.sum())
        keep = np.flatnonzero(good).tolist()
        body = [body[i] for i in keep]
        numbers = numbers[good]
    log.rows += len(body)
    if not body:
        return [() for _ in range(width)], numbers
    flat = sep.join(body).split(sep)
    del body
    return [flat[i::width] for i in range(width)], numbers


def _require_rows(path: Path, log: ProblemLog) -> None:
    """A job trace with a header and no rows is refused (there is nothing to measure)."""
    if log.rows == 0:
        raise SpotpipeError(f"{path}: a header and no job rows: nothing to measure")


class _Problems:
    """Malformed cells found column by column, merged into line order at the end."""

    def __init__(self, n: int) -> None:
        self.bad = np.zeros(n, dtype=bool)
        self.messages: dict[int, str] = {}

    def mark(self, mask: NDArray[np.bool_], message: Callable[[int], str]) -> None:
        """Mark rows; ``message(i)`` names the problem of row ``i`` (the first problem wins)."""
        for i in np.flatnonzero(mask & ~self.bad)[:MAX_LISTED_PROBLEMS].tolist():
            self.messages[i] = message(i)
        self.bad |= mask

    def flush(self, log: ProblemLog, numbers: NDArray[np.int64]) -> None:
        idx = np.flatnonzero(self.bad)
        log.malformed_count += int(idx.size)
        for i in idx[:MAX_LISTED_PROBLEMS].tolist():
            if len(log.malformed) < MAX_LISTED_PROBLEMS:
                log.malformed.append(RowProblem(int(numbers[i]), self.messages.get(i, "malformed")))
        log.malformed.sort(key=lambda p: p.line)


def _finish(
    log: ProblemLog,
    problems: _Problems,
    numbers: NDArray[np.int64],
    steps: NDArray[np.bool_] | None,
    skip: list[tuple[str, NDArray[np.bool_]]],
    job_id: list[str],
    start: NDArray[np.float64],
    end: NDArray[np.float64],
    columns: dict[str, Any],
    start_name: str,
) -> JobTable:
    """Apply, in order: job steps skipped (never called malformed), malformed rows, the other
    skip rules, the end >= start check; build the table of the rows kept."""
    n = numbers.size
    taken = np.zeros(n, dtype=bool)
    if steps is not None and steps.any():
        log.skipped["job steps (JobID with '.')"] += int(steps.sum())
        taken |= steps
    problems.bad &= ~taken
    taken |= problems.bad
    for reason, mask in skip:
        hit = mask & ~taken
        if hit.any():
            log.skipped[reason] += int(hit.sum())
        taken |= hit
    with np.errstate(invalid="ignore"):
        backwards = ~taken & (end < start)
    problems.mark(backwards, lambda i: f"job {job_id[i]}: end is before {start_name}")
    taken |= backwards
    problems.flush(log, numbers)
    keep = np.flatnonzero(~taken)
    log.used += int(keep.size)
    return JobTable(
        job_id=_obj(job_id)[keep],
        nodes=columns["nodes"][keep],
        gpus=columns["gpus"][keep],
        start=start[keep],
        end=end[keep],
        state=_obj(columns["state"])[keep],
        exit_code=columns["exit_code"][keep],
        signal=columns["signal"][keep],
        reason=_obj(columns["reason"])[keep],
        line=numbers[keep],
    )


def parse_elapsed(text: str) -> float:
    """Slurm elapsed ``[D-]HH:MM:SS``, ``MM:SS`` (fractions allowed) or raw seconds.

    Args:
        text: One ``Elapsed`` cell.

    Returns:
        Seconds.

    Raises:
        ValueError: for text that is not such a duration.
    """
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
# Every job state Slurm documents (squeue(1) and sacct(1) "JOB STATE CODES"). A record is a
# finished run when it has an End, whatever its state: ``sacct --duplicates`` lists the earlier
# runs of a requeued job as REQUEUED (or PREEMPTED, NODE_FAIL, ...) with a real Start and End.
SLURM_JOB_STATES = (
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED",
    "NODE_FAIL", "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD",
    "REQUEUE_FED", "REQUEUE_HOLD", "REQUEUED", "RESIZING", "REVOKED", "SIGNALING", "SPECIAL_EXIT",
    "STAGE_OUT", "STOPPED", "SUSPENDED", "TIMEOUT",
)
# States of a record that may still be under way: only for these does a missing End stay
# missing when Elapsed is known (Elapsed of a live job is the time so far, not its run time).
_ACTIVE_STATES = frozenset({
    "CONFIGURING", "COMPLETING", "PENDING", "RUNNING", "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SUSPENDED",
})


def _gpus_from_tres(text: str) -> int | None:
    """GPUs in a TRES string (``gres/gpu=8``; typed ``gres/gpu:a100=8`` if untyped is absent)."""
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


def _gpus_or_minus_one(text: str) -> int:
    gpus = _gpus_from_tres(text)
    return -1 if gpus is None else gpus


def _elapsed_column(values: Sequence[str]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    out = np.full(len(values), np.nan)
    bad = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v.strip().lower() in MISSING_TIMES:
            continue
        try:
            out[i] = parse_elapsed(v)
        except ValueError:
            bad[i] = True
    return out, bad


def _named(job_id: list[str], column: str, values: Sequence[str]) -> Callable[[int], str]:
    """A message naming the job, the column and the bad value of row ``i``."""
    return lambda i: f"job {job_id[i]}: {column} {values[i]!r} is not valid"


def read_sacct(path: str | Path, gpus_per_node: int = 8) -> tuple[JobTable, IngestReport]:
    """Read ``sacct --parsable2`` output (see the module docstring); vectorised by column.

    Args:
        path: The ``sacct -P`` output.
        gpus_per_node: GPUs per node, for rows that give nodes but no GPU count.

    Returns:
        The job table (times in seconds) and the ingest report.

    Raises:
        SpotpipeError: for a missing or empty file, or a header without the required columns.
    """
    with no_gc():
        return _read_sacct(path, gpus_per_node)


def _read_sacct(path: str | Path, gpus_per_node: int) -> tuple[JobTable, IngestReport]:
    p = Path(path)
    log = ProblemLog(str(p), "sacct")
    text = read_text(p, "trace")
    header_line = text.split("\n", 1)[0].rstrip("\r")
    header = [h.strip() for h in header_line.split("|")]
    index = {h.lower(): i for i, h in enumerate(header)}
    log.unknown_columns = tuple(h for h in header if h.lower() not in SACCT_FIELDS)

    def need(*names: str) -> int:
        for name in names:
            if name.lower() in index:
                return index[name.lower()]
        raise SpotpipeError(
            f"{p}: sacct header has no {' or '.join(names)} column (header: {header_line[:200]!r})"
        )

    i_id = need("JobID", "JobIDRaw")
    i_state = need("State")
    i_nodes = need("NNodes", "AllocNodes")
    i_start, i_end = index.get("start"), index.get("end")
    i_elapsed = index.get("elapsedraw", index.get("elapsed"))
    if (i_start is None or i_end is None) and i_elapsed is None:
        raise SpotpipeError(f"{p}: sacct header needs Start and End, or Elapsed/ElapsedRaw")
    i_exit = index.get("exitcode")
    i_tres = index.get("alloctres", index.get("reqtres"))
    i_reasons = [index[c] for c in _SACCT_REASON_COLUMNS if c in index]

    width = len(header)
    cols, numbers = _split_columns(text, "|", width, log)
    del text
    _require_rows(p, log)
    n = int(numbers.size)
    problems = _Problems(n)
    job_id = strip_column(cols[i_id])
    state = list(map_column(cols[i_state], lambda v: v.strip().split(" ", 1)[0].upper()))

    nodes, bad = int_column(cols[i_nodes])
    problems.mark(bad | (nodes < 0), _named(job_id, header[i_nodes], cols[i_nodes]))
    start = np.full(n, np.nan)
    end = np.full(n, np.nan)
    if i_start is not None and i_end is not None:
        start, bad = time_column(cols[i_start])
        problems.mark(bad, _named(job_id, "Start", cols[i_start]))
        end, bad = time_column(cols[i_end])
        problems.mark(bad, _named(job_id, "End", cols[i_end]))
    if i_elapsed is not None:
        elapsed, bad = _elapsed_column(cols[i_elapsed])
        problems.mark(bad, _named(job_id, header[i_elapsed], cols[i_elapsed]))
        active = np.fromiter(map_column(state, _ACTIVE_STATES.__contains__), dtype=bool, count=n)
        if i_start is None or i_end is None:  # only Elapsed: durations without dates
            start, end = np.where(np.isnan(elapsed), np.nan, 0.0), np.where(active, np.nan, elapsed)
        else:
            fill = np.isnan(end) & ~np.isnan(start) & ~active
            end = np.where(fill, start + elapsed, end)
    exit_code = np.zeros(n, dtype=np.int64)
    signal = np.zeros(n, dtype=np.int64)
    if i_exit is not None:
        exit_code, bad1 = int_column(list(map_column(cols[i_exit], lambda v: v.strip().partition(":")[0] or "0")))
        signal, bad2 = int_column(list(map_column(cols[i_exit], lambda v: v.strip().partition(":")[2] or "0")))
        problems.mark(bad1 | bad2, _named(job_id, "ExitCode", cols[i_exit]))
    gpus = nodes * gpus_per_node
    if i_tres is not None:
        found = np.fromiter(
            map_column(cols[i_tres], _gpus_or_minus_one), dtype=np.int64, count=n
        )
        gpus = np.where(found >= 0, found, gpus)
    else:
        log.notes.append(f"no AllocTRES/ReqTRES column: GPUs taken as nodes x {gpus_per_node}")
    if len(i_reasons) == 1:
        reason = list(map_column(cols[i_reasons[0]], str.strip))
    elif i_reasons:
        reason = [" ".join(c.strip() for c in cells if c.strip()) for cells in zip(*(cols[i] for i in i_reasons))]
    else:
        reason = [""] * n
    never = np.isnan(start)
    steps = np.array(["." in j for j in job_id], dtype=bool)
    skip = [
        ("never started", never),
        ("not finished (no End)", ~never & np.isnan(end)),
    ]
    columns = {"nodes": nodes, "gpus": gpus, "state": state,
               "exit_code": exit_code, "signal": signal, "reason": reason}
    table = _finish(log, problems, numbers, steps, skip, job_id, start, end, columns, "Start")
    return table, log.report()


ACME_COLUMNS = (
    "job_id", "user", "node_num", "gpu_num", "cpu_num", "type", "state",
    "submit_time", "start_time", "end_time", "duration", "queue", "gpu_time",
)
ACME_KALOS_COLUMNS = ("mem_per_pod_GB", "shared_mem_per_pod", "fail_time", "stop_time")
_ACME_REQUIRED = ("job_id", "node_num", "gpu_num", "state", "start_time", "end_time")


def read_acme(path: str | Path) -> tuple[JobTable, IngestReport]:
    """Read an AcmeTrace job CSV (``trace_seren.csv`` / ``trace_kalos.csv`` schema).

    Args:
        path: The AcmeTrace CSV.

    Returns:
        The job table (times in seconds) and the ingest report.

    Raises:
        SpotpipeError: for a missing or empty file, or a header without the required columns.
    """
    with no_gc():
        return _read_acme(path)


def _read_acme(path: str | Path) -> tuple[JobTable, IngestReport]:
    p = Path(path)
    log = ProblemLog(str(p), "acme")
    text = read_text(p, "trace")
    first_line = text.split("\n", 1)[0]
    if not first_line.strip():
        raise SpotpipeError(f"{p}: empty file or empty header line")
    header = [h.strip() for h in next(csv.reader([first_line]))]
    index = {h: i for i, h in enumerate(header)}
    missing = [c for c in _ACME_REQUIRED if c not in index]
    if missing:
        raise SpotpipeError(f"{p}: AcmeTrace CSV lacks columns {', '.join(missing)}")
    known = set(ACME_COLUMNS) | set(ACME_KALOS_COLUMNS)
    log.unknown_columns = tuple(h for h in header if h not in known)
    width = len(header)
    cols: Sequence[Sequence[str]]
    if '"' not in text:  # no quoting: split the whole file at once
        cols, numbers = _split_columns(text, ",", width, log)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        next(reader)
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
        log.rows = len(rows)
        for num, r in rows:
            if len(r) != width:
                log.bad(num, f"{len(r)} fields, header has {width}")
        ok = [(num, r) for num, r in rows if len(r) == width]
        numbers = np.asarray([num for num, _ in ok], dtype=np.int64)
        cols = list(zip(*(r for _, r in ok))) if ok else [()] * width
    del text
    _require_rows(p, log)
    n = int(numbers.size)
    problems = _Problems(n)
    job_id = strip_column(cols[index["job_id"]])
    state = list(map_column(cols[index["state"]], lambda v: v.strip().upper()))

    def check_int(column: str) -> NDArray[np.int64]:
        values, bad = int_column(cols[index[column]])
        problems.mark(bad | (values < 0), _named(job_id, column, cols[index[column]]))
        return values

    def check_time(column: str) -> NDArray[np.float64]:
        values, bad = time_column(cols[index[column]])
        problems.mark(bad, _named(job_id, column, cols[index[column]]))
        return values

    nodes = check_int("node_num")
    gpus = check_int("gpu_num")
    start = check_time("start_time")
    end = check_time("end_time")
    if "fail_time" in index:
        reason = ["fail_time set" if v.strip() else "" for v in cols[index["fail_time"]]]
    else:
        reason = [""] * n
    never = np.isnan(start)
    skip = [("never started", never), ("not finished (no end_time)", ~never & np.isnan(end))]
    zeros = np.zeros(n, dtype=np.int64)
    columns = {"nodes": nodes, "gpus": gpus, "state": state,
               "exit_code": zeros, "signal": zeros, "reason": reason}
    table = _finish(log, problems, numbers, None, skip, job_id, start, end, columns, "start_time")
    return table, log.report()


_BAMBOO_LINE = re.compile(r"^\s*\d+\s*,\s*(add|remove)\s*,", re.IGNORECASE)


def detect_format(path: str | Path) -> str:
    """Tell a trace's format from its name and first line; one line of error if unknown.

    Args:
        path: The trace file.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        SpotpipeError: for a missing or empty file, or a format it cannot tell.
    """
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
