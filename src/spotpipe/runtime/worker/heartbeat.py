"""The worker's link to its controller: the heartbeat thread, and what happens when the controller is gone.

:class:`Heartbeat` beats every ``run.heartbeat_s`` and watches the store for stop and abort
requests. :class:`ControllerLost` ends the process when the controller is unreachable (its
process was killed, its machine is gone): whichever thread meets the dead store first (the
heartbeat, the step loop, a recovery wait, a spare waiting for a role) prints one line naming the
controller's address and exits with :data:`EXIT_ORPHANED`; no traceback, no second line, so
nothing is left running and the user knows what happened. The run directory keeps the last
checkpoint: ``spotpipe train --resume``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from spotpipe.runtime import protocol

EXIT_ORPHANED = 4
"""Exit code of a worker that lost its controller."""


class ControllerLost:
    """Ends this worker process when its controller is gone (see the module docstring).

    Args:
        who: How the worker names itself, e.g. ``worker 2 (stage 2, replica 0)``.
        address: The controller's ``HOST:PORT``.
    """

    def __init__(self, who: str, address: str) -> None:
        self.who = who
        self.address = address
        self._once = threading.Lock()

    def __call__(self, why: str) -> NoReturn:
        """Print the one line and exit; a second thread that gets here waits for the exit."""
        self._once.acquire()  # never released: the process ends below
        sys.stdout.flush()
        print(f"spotpipe worker: error: {self.who}: lost the controller at {self.address} ({why}); exiting",
              file=sys.stderr, flush=True)
        os._exit(EXIT_ORPHANED)

    def check(self, store: Any) -> None:
        """Exit as above if ``store`` (a client of the controller's store) no longer answers;
        return if it does (the caller's error has another cause).

        Args:
            store: A client of the controller's store.
        """
        try:
            store.check([protocol.JOB_ID])
        except Exception as exc:
            self(protocol.describe_store_error(exc))



class Heartbeat(threading.Thread):
    """Worker thread: beat every ``interval_s``, watch for stop and abort requests.

    It uses its own store connection (``store.clone()``, made in the thread: when the controller
    died a moment ago, connecting blocks, and the main thread must not wait on it), so it never
    contends with the main thread's. When the controller becomes unreachable the worker has no job any more: after
    ``give_up_s`` of failures it calls ``on_orphaned`` (which exits the process).

    Args:
        store: A store client; it is cloned.
        worker: This worker's id.
        interval_s: ``run.heartbeat_s``.
        on_stop: Called once when ``ctl/stop`` appears.
        on_abort: Called with (generation, reason) when the current generation's abort key appears.
        on_orphaned: Called with a reason when the controller is gone (:class:`ControllerLost`).
        give_up_s: How long store failures are tolerated (seconds).
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
        self._parent_store = store
        self._store: Any = None  # cloned in the thread: a clone of a dead controller's store blocks for run.timeout_s
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
                if self._store is None:
                    self._store = self._parent_store.clone()
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
                    self._on_orphaned(protocol.describe_store_error(exc))
                    return
            self._halt.wait(self._interval)

    def halt(self) -> None:
        self._halt.set()
