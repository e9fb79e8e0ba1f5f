"""The worker's heartbeat thread: beats, and watches the store for stop and abort requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from spotpipe.runtime import protocol



class Heartbeat(threading.Thread):
    """Worker thread: beat every ``interval_s``, watch for stop and abort requests.

    It uses its own store connection (``store.clone()``), so it never contends with the main
    thread's. When the controller becomes unreachable the worker has no job any more: after
    ``give_up_s`` of failures it calls ``on_orphaned`` (which exits the process).

    Args:
        store: A store client; it is cloned.
        worker: This worker's id.
        interval_s: ``run.heartbeat_s``.
        on_stop: Called once when ``ctl/stop`` appears.
        on_abort: Called with (generation, reason) when the current generation's abort key appears.
        on_orphaned: Called when the controller is gone.
        give_up_s: How long store failures are tolerated.
    """

    def __init__(
        self,
        store: Any,
        worker: int,
        interval_s: float,
        on_stop: Callable[[], None],
        on_abort: Callable[[int, str], None],
        on_orphaned: Callable[[str], None],
        give_up_s: float = 5.0,
    ) -> None:
        super().__init__(name=f"spotpipe-heartbeat-{worker}", daemon=True)
        self._store = store.clone()
        self._worker = worker
        self._interval = interval_s
        self._on_stop = on_stop
        self._on_abort = on_abort
        self._on_orphaned = on_orphaned
        self._give_up_s = give_up_s
        self._halt = threading.Event()
        self._stopped = False
        self.generation = 0  # set by the worker when it enters a generation
        self._aborted: set[int] = set()

    def run(self) -> None:
        key = protocol.heartbeat_key(self._worker)
        failing_since: float | None = None
        while not self._halt.is_set():
            try:
                self._store.add(key, 1)
                if not self._stopped and self._store.check([protocol.STOP]):
                    self._stopped = True
                    self._on_stop()
                g = self.generation
                if g and g not in self._aborted and self._store.check([protocol.abort_key(g)]):
                    self._aborted.add(g)
                    self._on_abort(g, self._store.get(protocol.abort_key(g)).decode())
                failing_since = None
            except Exception as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self._give_up_s:
                    self._on_orphaned(" ".join(str(exc).split())[:120])
                    return
            self._halt.wait(self._interval)

    def halt(self) -> None:
        self._halt.set()
