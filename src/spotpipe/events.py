"""Event records shared by the runtime and the simulator (one JSON object per line).

The runtime writes them with wall-clock time, the simulator with its virtual clock; both use the
same names and fields, so ``spotpipe.reliability`` compares predictions and reality with one
reader. Every record has ``event`` (a name below) and ``t`` (seconds since the epoch, or since
the start of a simulation).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import output_error, read_text

# Event names. Fields each one carries are listed beside it.
RUN_START = "run_start"  # name, config (dict), world (workers), mode ("runtime" | "sim")
WORKER_START = "worker_start"  # worker, stage, replica, pid, generation, host
JOIN_REFUSED = "join_refused"  # host, pid, reason (a worker without the job's token, or a full job)
STEP = "step"  # step, loss, tokens, step_time, wall, sampler (position dict), lr, generation[, skipped: why (non-finite)][, paths: train | full (SkipPipe runs)]
#   [, peak_bytes, activation_bytes (per pipeline rank, measured)[, cuda_max_allocated]]
EVAL = "eval"  # step, val_loss
CHECKPOINT = "checkpoint"  # step, path, seconds
GENERATION = "generation"  # generation, workers, reason
FAILURE_SUSPECTED = "failure_suspected"  # worker, stage, replica, reason
SUSPICION_CLEARED = "suspicion_cleared"  # worker, stage, replica, silent_s (it beat again: no failure)
FAILURE_CONFIRMED = "failure_confirmed"  # worker, stage, replica, reason (in a SkipPipe node run, stage = the node)
RECOVERY_STARTED = "recovery_started"  # stage, replica, strategy, why (node runs: stage = the node; strategy replan)
RECOVERY_FINISHED = "recovery_finished"  # stage, replica, strategy, bytes, seconds
STEP_REPLAYED = "step_replayed"  # step, generation
RESHAPE = "reshape"  # kind (shrink, grow, replace: standbys took lost positions, wait), from, to ("SxR"), why, bytes, seconds, lost (ft.elastic: spotpipe.ft.elastic); a SkipPipe node taken back: kind "grow", node, nodes, groups
FAULT_INJECTED = "fault_injected"  # step, stage, replica, worker, pid, kind ("kill" | "stall"), spec
RUN_END = "run_end"  # steps, wall, status ("finished" | "interrupted" | "failed")


class EventLog:
    """Append-only JSONL writer; each record is flushed so nothing is lost on a crash.

    A log that cannot be opened or written (read-only or full file system) raises one
    :class:`SpotpipeError` line naming the file and the reason.
    """

    def __init__(self, path: str | Path, clock: Any = time.time) -> None:
        """Open ``path`` for appending (its parent folders are created).

        Args:
            path: The JSONL file.
            clock: Zero-argument callable giving the default ``t`` of a record, seconds (wall clock by
                default).

        Raises:
            SpotpipeError: if the file cannot be opened.
        """
        self.path = Path(path)
        self._clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise output_error(self.path, "event log", exc.strerror or str(exc)) from None

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record; ``t`` defaults to the log's clock.

        Args:
            event: The record's ``event`` name.
            **fields: Other fields, JSON values (numpy and torch scalars, sets, tuples and paths are
                converted); ``t`` (seconds) overrides the clock.

        Returns:
            The record as written.

        Raises:
            SpotpipeError: if the file cannot be written.
            TypeError: on a field value that cannot be converted to JSON.
        """
        record: dict[str, Any] = {"event": event, "t": fields.pop("t", None)}
        if record["t"] is None:
            record["t"] = self._clock()
        record.update(fields)
        try:
            self._file.write(json.dumps(record, separators=(",", ":"), default=_jsonable) + "\n")
            self._file.flush()
        except OSError as exc:
            raise output_error(self.path, "event log", exc.strerror or str(exc)) from None
        return record

    def sync(self) -> None:
        """Force records to disk (fsync)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass  # the failed write already raised

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def iter_events(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield records of a JSONL event file; a bad line raises naming file and line number.

    A truncated last line (a crash mid-write) is skipped, as it never committed anything.

    Args:
        path: A JSONL event file.

    Yields:
        Each record, a dict with at least ``event``, in file order.

    Raises:
        SpotpipeError: if the file is missing, unreadable or not UTF-8, or a line (but a truncated
            last one) is not a JSON object with an ``event`` field.
    """
    p = Path(path)
    if not p.is_file():
        raise SpotpipeError(f"event log {p} does not exist")
    lines = io.StringIO(read_text(p, "event log"), newline=None).readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                return
            raise SpotpipeError(f"{p}:{number}: not a JSON event record") from None
        if not isinstance(record, dict) or "event" not in record:
            raise SpotpipeError(f"{p}:{number}: record has no 'event' field")
        yield record


def read_events(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """All records of a file, optionally only those named ``event``.

    Args:
        path: A JSONL event file.
        event: Keep only records of this ``event`` name; ``None`` keeps all.

    Returns:
        The records in file order.

    Raises:
        SpotpipeError: as :func:`iter_events`.
    """
    return [r for r in iter_events(path) if event is None or r["event"] == event]
