"""A small discrete-event engine: a virtual clock and a time-ordered queue of callbacks.

Events run in order of time; events at the same time run in the order they were scheduled
(a sequence number breaks ties), so a simulation is deterministic. A scheduled event can be
cancelled through the :class:`Timer` it returns. This is the classic event-list scheme of
discrete-event simulation (Fishman 2001, "Discrete-Event Simulation", ch. 5). Pure Python.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

from spotpipe.errors import SpotpipeError


class SimulationError(SpotpipeError):
    """The simulation cannot go on (a deadlock, an event scheduled in the past, ...)."""


class Timer:
    """Handle of a scheduled event; :meth:`cancel` makes it a no-op."""

    __slots__ = ("time", "cancelled")

    def __init__(self, time: float) -> None:
        """

        Args:
            time: Virtual time of the event, in seconds.
        """
        self.time = time
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the event."""
        self.cancelled = True


class Engine:
    """Virtual clock plus event queue.

    Attributes:
        now: The current virtual time in seconds.
        processed: Number of events run so far.
    """

    def __init__(self, start: float = 0.0) -> None:
        """

        Args:
            start: Virtual time of the clock at the start, in seconds.
        """
        self.now = start
        self.processed = 0
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...], Timer | None]] = []
        self._seq = 0
        self._stopped = False

    def at(self, time: float, callback: Callable[..., Any], *args: Any, cancellable: bool = False) -> Timer | None:
        """Run ``callback(*args)`` at virtual ``time`` (>= now).

        Args:
            time: Virtual time in seconds, ``>= now``.
            callback: Called with ``*args`` at ``time``.
            *args: Positional arguments of ``callback``.
            cancellable: Return a :class:`Timer` that can cancel the event.

        Returns:
            A :class:`Timer` when ``cancellable`` (slightly slower), else None.

        Raises:
            SimulationError: for a time in the past or NaN.
        """
        if time < self.now:
            raise SimulationError(f"event at t={time:.9g} s scheduled in the past (now {self.now:.9g} s)")
        if math.isnan(time):
            raise SimulationError("event scheduled at t=NaN")
        timer = Timer(time) if cancellable else None
        self._seq += 1
        heapq.heappush(self._queue, (time, self._seq, callback, args, timer))
        return timer

    def after(self, delay: float, callback: Callable[..., Any], *args: Any, cancellable: bool = False) -> Timer | None:
        """Run ``callback(*args)`` ``delay`` seconds from now.

        Args:
            delay: Seconds from now (>= 0).
            callback: Called with ``*args`` then.
            *args: Positional arguments of ``callback``.
            cancellable: Return a :class:`Timer` that can cancel the event.

        Returns:
            A :class:`Timer` when ``cancellable``, else None.

        Raises:
            SimulationError: for a negative or NaN delay.
        """
        return self.at(self.now + delay, callback, *args, cancellable=cancellable)

    def next_time(self) -> float:
        """Time of the earliest pending event (``inf`` when none)."""
        return self._queue[0][0] if self._queue else math.inf

    def pending(self) -> int:
        """Number of queued events (cancelled ones included until they are popped)."""
        return len(self._queue)

    def stop(self) -> None:
        """Make :meth:`run` return after the current event."""
        self._stopped = True

    def run(self, until: float = math.inf) -> float:
        """Run events in time order until the queue is empty, :meth:`stop`, or ``until``.

        Args:
            until: Last virtual time to run to, in seconds (events after it stay queued).

        Returns:
            The virtual time reached.
        """
        self._stopped = False
        queue = self._queue
        pop = heapq.heappop
        while queue and not self._stopped:
            if queue[0][0] > until:
                self.now = until
                break
            time, _seq, callback, args, timer = pop(queue)
            if timer is not None and timer.cancelled:
                continue
            self.now = time
            self.processed += 1
            callback(*args)
        return self.now
