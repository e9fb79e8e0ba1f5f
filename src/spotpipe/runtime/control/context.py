"""The handles the controller's parts share, set once at start-up.

The controller (:mod:`spotpipe.runtime.control.controller`) owns the job's store, event log,
progress display and local worker processes; its parts (:class:`~spotpipe.runtime.control.
membership.Membership`, :class:`~spotpipe.runtime.control.recovery.RecoverySupervisor`) get them
through this one small object instead of reaching into the controller's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spotpipe import events as ev
from spotpipe.config import JobConfig
from spotpipe.runtime.control.launch import LocalWorkers
from spotpipe.runtime.control.progress import Progress


@dataclass
class ControlContext:
    """The controller's I/O handles.

    Attributes:
        cfg: The resolved job config.
        progress: The terminal / log-file progress display.
        store: The job's ``torch.distributed.TCPStore`` (server side), or any object with its
            ``set/get/check/multi_get/add/delete_key/queue_pop`` methods (a dict-backed fake in
            unit tests); None until the controller listens.
        log: The run's event log (``events.jsonl``), None until the run directory exists.
        locals: The local worker processes this controller starts, or None (none started yet).
    """

    cfg: JobConfig
    progress: Progress
    store: Any = None
    log: ev.EventLog | None = None
    locals: LocalWorkers | None = None

    def event(self, name: str, **fields: Any) -> None:
        """Write one event record (``name``, ``fields``) to the run's log.

        Args:
            name: The event name (a constant of :mod:`spotpipe.events`).
            **fields: The record's other fields, JSON values.

        Raises:
            RuntimeError: If the log is not open yet (the controller has not started).
        """
        if self.log is None:
            raise RuntimeError(f"event {name!r} written before the event log was opened")
        self.log.write(name, **fields)
