"""In-process transport: the ranks of one pipeline take turns in one process.

The in-process convergence mode plays every rank's lowered action list on the real
:class:`~spotpipe.runtime.pipeline.executor.Executor`, all in one process. An executor's step is
one loop that blocks in ``Handle.wait`` until a message is there, so each rank runs in a thread
of its own; but the threads *take turns*: exactly one runs at a time, and it runs until it waits
for a message that has not been sent yet. It then hands the turn to the next rank, in rank order
(round robin), that can go on: one that is not waiting, or whose message has arrived. Every
operation therefore happens in an order fixed by the schedule alone, so a step computes the same
bits every time, and ranks may even share parameters (one tensor, one ``.grad``) without a race.

:class:`InProcessHub` holds the mailboxes (one FIFO per ``(source rank, destination rank, tag)``)
and the turn; :meth:`InProcessHub.play` runs one body per rank and returns their results.
:class:`InProcessTransport` is one rank's end. It follows the
:class:`~spotpipe.runtime.comm.transport.Transport` protocol the process-group transport follows:

* ``isend`` copies the tensor into the destination's mailbox and returns at once (the copy is
  what a wire does; the sender may reuse its tensor as soon as ``isend`` returned).
* ``irecv`` returns a handle; ``wait`` copies the message into the preallocated buffer, handing
  the turn on while the message has not arrived.
* A wait that can never complete, because every rank still playing waits for a message, fails at
  once with :class:`Deadlock` (a :class:`~spotpipe.runtime.comm.transport.PeerTimeout`, whose
  ``detail`` says what each rank waits for). Wall-clock timeouts are not applied: a waiting rank
  here waits for the *serialised* compute of the others, not for a peer that may be gone, so a
  clock would report healthy peers as lost; and a wait that cannot end is known without one.
* ``abort()`` aborts the whole hub, like the process-group transport aborts its generation:
  every pending and later wait and send of every rank raises
  :class:`~spotpipe.runtime.comm.transport.GenerationAborted`. A body that raises aborts the hub
  too, so its peers stop at their next message instead of waiting for it forever;
  :meth:`InProcessHub.play` then raises the first error that happened.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from spotpipe.runtime.comm.transport import GenerationAborted, Handle, PeerTimeout

T = TypeVar("T")
Key = tuple[int, int, int]  # (source rank, destination rank, tag)
IDLE_EXIT_S = 10.0  # a rank thread with nothing to play for this long ends
_HUBS: weakref.WeakSet[InProcessHub] = weakref.WeakSet()


@atexit.register
def _end_rank_threads() -> None:
    for hub in list(_HUBS):
        hub.end_idle_threads()


class Deadlock(PeerTimeout):
    """A receive that can never complete: every rank still playing waits for a message nobody sends.

    ``detail`` lists what each waiting rank waits for (peer and tag).
    """

    def _message(self) -> str:
        return (f"waiting for {self.peer_name}{self._what()} can never end: every rank still playing waits for a "
                f"message no rank will send ({self.detail})")


class _DoneHandle:
    """The handle of an in-process send: the message is in the mailbox already."""

    __slots__ = ()

    def wait(self, timeout_s: float) -> None:
        return None


class _RecvHandle:
    """A posted in-process receive; :meth:`wait` fills the buffer."""

    __slots__ = ("_hub", "_rank", "_peer", "_tag", "_buf", "_done")

    def __init__(self, hub: InProcessHub, rank: int, peer: int, tag: int, buf: torch.Tensor) -> None:
        self._hub, self._rank, self._peer, self._tag, self._buf = hub, rank, peer, tag, buf
        self._done = False

    def wait(self, timeout_s: float) -> None:
        """Block until the message is in the buffer (see the module docstring for ``timeout_s``).

        Raises:
            GenerationAborted: the hub was aborted.
            Deadlock: no rank can send the message any more.
        """
        if self._done:
            return
        self._hub._receive(self._rank, self._peer, self._tag, self._buf)
        self._done = True


class InProcessTransport:
    """One rank's end of an :class:`InProcessHub` (a :class:`~spotpipe.runtime.comm.transport.Transport`).

    Args:
        hub: The hub of the ranks that talk to each other.
        rank: This end's rank, ``0 <= rank < hub.world_size``.
    """

    def __init__(self, hub: InProcessHub, rank: int) -> None:
        self._hub = hub
        self.rank = rank

    @property
    def aborted(self) -> bool:
        """Whether the hub (and so this transport) was aborted."""
        return self._hub.aborted

    def peer_name(self, peer: int) -> str:
        """How errors name rank ``peer``.

        Args:
            peer: Rank in the hub.

        Returns:
            The name given to the hub, else ``rank <peer>``.
        """
        return self._hub.peer_name(peer)

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        """Put a copy of ``tensor`` in ``peer``'s mailbox for ``tag``; the handle is complete at once.

        Args:
            tensor: The message (copied).
            peer: Receiving rank in the hub.
            tag: Message tag (``Action.tag``).

        Returns:
            A handle whose wait returns at once.

        Raises:
            GenerationAborted: the hub was aborted.
            ValueError: ``peer`` is not a rank of the hub.
        """
        self._hub._send(self.rank, peer, tag, tensor)
        return _DoneHandle()

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        """Post a receive of ``peer``'s message ``tag`` into ``tensor`` (same shape and dtype).

        Args:
            tensor: Preallocated receive buffer.
            peer: Sending rank in the hub.
            tag: Message tag (``Action.tag``).

        Returns:
            A handle whose wait copies the message in.

        Raises:
            GenerationAborted: the hub was aborted.
            ValueError: ``peer`` is not a rank of the hub.
        """
        self._hub._check_peer(self.rank, peer)
        if self._hub.aborted:
            raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer), detail=self._hub.abort_reason)
        return _RecvHandle(self._hub, self.rank, peer, tag, tensor)

    def abort(self) -> None:
        """Abort the hub: every pending and later wait of every rank fails at once."""
        self._hub.abort(f"rank {self.rank} aborted")


class InProcessHub:
    """Mailboxes and the turn of ``world_size`` ranks that play in one process.

    Args:
        world_size: Number of ranks (>= 1).
        peer_names: Rank -> how errors name it (default ``rank R``).

    Raises:
        ValueError: ``world_size < 1``.
    """

    def __init__(self, world_size: int, peer_names: Mapping[int, str] | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"an in-process hub needs at least one rank, got world_size={world_size}")
        self.world_size = world_size
        self._names = dict(peer_names or {})
        self._lock = threading.Lock()
        self._wake = [threading.Condition(self._lock) for _ in range(world_size)]  # rank r waits on _wake[r]
        self._mail: dict[Key, deque[torch.Tensor]] = {}
        self._turn: int | None = None
        self._blocked: dict[int, Key] = {}
        self._done: set[int] = set()
        self._deadlocked = False
        self._playing = False
        self._finished = threading.Condition(self._lock)  # play() waits on it for the last rank
        self._threads: list[threading.Thread | None] = [None] * world_size
        self._round = 0
        self._bodies: list[Callable[[], Any]] = []
        self._results: list[Any] = []
        self._errors: list[BaseException] = []
        self._mode = (True, 1)  # grad mode and intra-op threads of the play under way
        self._closing = False
        self.aborted = False
        self.abort_reason = ""
        _HUBS.add(self)

    def end_idle_threads(self, timeout_s: float = 2.0) -> None:
        """End the rank threads now instead of after :data:`IDLE_EXIT_S` (at interpreter exit, so
        no thread that ran torch code outlives the interpreter: that can abort the process).

        Args:
            timeout_s: Seconds to wait for each thread to end.
        """
        with self._lock:
            if self._playing:
                return
            self._closing = True
            threads = [t for t in self._threads if t is not None]
            for wake in self._wake:
                wake.notify_all()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout_s)
        with self._lock:
            self._closing = False

    def transport(self, rank: int) -> InProcessTransport:
        """The transport of ``rank``.

        Args:
            rank: Rank in the hub, ``0 .. world_size - 1``.

        Returns:
            A new transport endpoint.

        Raises:
            ValueError: if ``rank`` is out of range.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in this in-process hub of {self.world_size} ranks")
        return InProcessTransport(self, rank)

    def peer_name(self, rank: int) -> str:
        """How errors name ``rank``.

        Args:
            rank: Rank in the hub.

        Returns:
            The name given to the hub, else ``rank <rank>``.
        """
        return self._names.get(rank, f"rank {rank}")

    def abort(self, reason: str = "generation aborted") -> None:
        """Make every pending and later send and wait fail with GenerationAborted (first reason kept).

        Args:
            reason: Why, reported by the operations that fail.
        """
        with self._lock:
            if not self.aborted:
                self.aborted = True
                self.abort_reason = reason

    def undelivered(self) -> list[Key]:
        """``(source rank, destination rank, tag)`` of every message sent and not received yet
        (none after a complete step of a valid schedule)."""
        with self._lock:
            return [key for key, box in sorted(self._mail.items()) for _ in box]

    # -- playing -------------------------------------------------------------------------------

    def play(self, bodies: Sequence[Callable[[], T]]) -> list[T]:
        """Run ``bodies[r]`` as rank ``r``, one rank at a time, starting with rank 0.

        Each rank has a thread of its own, kept between plays (a thread idle for
        :data:`IDLE_EXIT_S` ends, a later play starts a new one: page-faulting a fresh thread's
        stack and heap every step cost a small model a third of its step time). A body runs with
        the caller's grad mode and intra-op thread count (OpenMP keeps that count per thread: a
        new thread starts with one per core and spins them between operations, which doubled the
        CPU time of a small model) and keeps the turn until it waits for a message that is not
        there yet, or ends. Results come back in rank order.

        Args:
            bodies: One callable per rank (``len(bodies) == world_size``).

        Returns:
            What each body returned.

        Raises:
            BaseException: the first error a body raised (the hub is then aborted, so the other
                bodies end with GenerationAborted at their next message).
            RuntimeError: the hub is playing already.
            ValueError: not one body per rank.
        """
        if len(bodies) != self.world_size:
            raise ValueError(f"play needs one body per rank: {len(bodies)} bodies for {self.world_size} ranks")
        errors: list[BaseException] = []
        results: list[T | None] = [None] * self.world_size
        with self._lock:
            if self._playing:
                raise RuntimeError("this in-process hub is playing already")
            self._playing, self._turn, self._deadlocked = True, 0, False
            self._done.clear()
            self._blocked.clear()
            self._round += 1
            self._bodies, self._results, self._errors = list(bodies), results, errors
            self._mode = (torch.is_grad_enabled(), torch.get_num_threads())
            for r, t in enumerate(self._threads):
                if t is None:
                    t = self._threads[r] = threading.Thread(target=self._serve, args=(r,), daemon=True,
                                                            name=f"spotpipe-inprocess-rank-{r}")
                    t.start()
            self._wake[0].notify()
            try:
                try:
                    while len(self._done) < self.world_size:
                        self._finished.wait()
                except BaseException:  # e.g. Ctrl-C in the caller: stop the ranks at their next message
                    if not self.aborted:
                        self.aborted, self.abort_reason = True, "the in-process player was interrupted"
                    while len(self._done) < self.world_size:
                        self._finished.wait()
                    raise
            finally:
                self._playing, self._turn = False, None
                self._bodies, self._results, self._errors = [], [], []
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]  # every body returned

    def _serve(self, rank: int) -> None:
        """Rank ``rank``'s thread: play its body of every round, when it has the turn."""
        seen = self._round - 1  # started for the current round
        with self._lock:
            while True:
                while not (self._round > seen and self._turn == rank):
                    woken = self._wake[rank].wait(IDLE_EXIT_S)
                    if (self._closing or not woken) and not self._playing:
                        self._threads[rank] = None  # idle: end; the next play starts a new thread
                        return
                seen = self._round
                body, (grad, intra_op_threads) = self._bodies[rank], self._mode
                results, errors = self._results, self._errors
                self._lock.release()
                try:
                    torch.set_num_threads(intra_op_threads)  # sets this thread's own OpenMP and MKL counts too
                    with torch.set_grad_enabled(grad):
                        results[rank] = body()
                    error = None
                except BaseException as exc:  # noqa: BLE001 - handed to play(), which raises it
                    error = exc
                finally:
                    self._lock.acquire()
                if error is not None:
                    errors.append(error)
                    if not self.aborted:
                        self.aborted = True
                        self.abort_reason = f"{self.peer_name(rank)} failed: {type(error).__name__}: {error}"
                self._done.add(rank)
                self._blocked.pop(rank, None)
                self._pass_turn(rank)
                if len(self._done) == self.world_size:
                    self._finished.notify()

    def _pass_turn(self, after: int) -> None:
        """Give the turn to the next rank after ``after`` (round robin) that can go on; if none
        can but some have not ended, to the next of those, marked deadlocked (it raises); wake it."""
        n = self.world_size
        order = [(after + i) % n for i in range(1, n + 1)]
        live = [r for r in order if r not in self._done]
        for r in live:
            key = self._blocked.get(r)
            if key is None or self.aborted or self._mail.get(key):
                self._turn = r
                self._wake[r].notify()
                return
        self._turn = live[0] if live else None
        self._deadlocked = bool(live)
        if live:
            self._wake[live[0]].notify()

    # -- messages (called by the transports) ---------------------------------------------------

    def _check_peer(self, rank: int, peer: int) -> None:
        if not 0 <= peer < self.world_size:
            raise ValueError(f"rank {rank} addressed rank {peer}, which is not in this in-process hub of "
                             f"{self.world_size} ranks")

    def _send(self, rank: int, peer: int, tag: int, tensor: torch.Tensor) -> None:
        self._check_peer(rank, peer)
        message = tensor.detach().clone()
        with self._lock:
            if self.aborted:
                raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer), detail=self.abort_reason)
            self._mail.setdefault((rank, peer, tag), deque()).append(message)

    def _receive(self, rank: int, peer: int, tag: int, buf: torch.Tensor) -> None:
        key = (peer, rank, tag)
        start = time.monotonic()
        with self._lock:
            while True:
                if self.aborted:
                    raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer), waited_s=time.monotonic() - start,
                                            detail=self.abort_reason)
                box = self._mail.get(key)
                if box:
                    message = box.popleft()
                    break
                if self._deadlocked:
                    self._deadlocked = False
                    raise Deadlock(peer=peer, peer_name=self.peer_name(peer), waited_s=time.monotonic() - start,
                                   detail=self._describe_waits(rank, key))
                if not self._playing or self._turn != rank:
                    raise RuntimeError(f"rank {rank} waited for tag {tag} from rank {peer} outside its turn: "
                                       "in-process receives that must wait only work inside InProcessHub.play")
                self._blocked[rank] = key
                self._pass_turn(rank)
                while self._turn != rank:
                    self._wake[rank].wait()
                self._blocked.pop(rank, None)
        buf.copy_(message)

    def _describe_waits(self, rank: int, key: Key) -> str:
        waits = dict(self._blocked)
        waits[rank] = key
        return "; ".join(f"{self.peer_name(r)} waits for tag {t} from {self.peer_name(src)}"
                         for r, (src, _dst, t) in sorted(waits.items()))


__all__ = ["Deadlock", "InProcessHub", "InProcessTransport"]
