"""Point-to-point transport: the seam between the executor and torch.distributed.

The executor moves activations and gradients through a :class:`Transport` it is given (it never
builds one), so wrappers slot in between: ``runtime/linkdelay.py`` adds latency + bytes/bandwidth
per link to play a geo-distributed cluster on one machine. Message identity is the tag of the
schedule action (``Action.tag``), identical on both ends; the transport never invents one.

Every wait has a timeout (``Handle.wait(timeout_s)``). A wait that runs out raises
:class:`PeerTimeout`; a broken connection (the peer died, or aborted its generation) raises
:class:`PeerLost`; a wait on a transport whose generation was aborted raises
:class:`GenerationAborted`. All three are :class:`CommError` and name the peer worker; the
executor adds the action and the step, so a worker that gives up says exactly what it waited for.

Implementations:

* :class:`ProcessGroupTransport`: torch.distributed P2P over one generation's world process group
  (gloo on CPU, NCCL on CUDA). ``abort()`` runs the generation's abort hook (see
  :mod:`spotpipe.runtime.comm.groups`), which wakes every pending wait of that generation on this
  worker and on its peers.
* :class:`LocalHub` / :class:`QueueTransport`: in-process transport between threads, for tests of
  the executor and for an in-process player; same semantics, no sockets.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from spotpipe.errors import SpotpipeError


class CommError(SpotpipeError):
    """A send, receive or collective that did not complete.

    Attributes:
        peer: World rank of the peer worker (``None`` for a collective).
        peer_name: How to name the peer to a user, e.g. ``worker 3 (stage 1, replica 1)``.
        action: What was waited for (``1RECV_F3 of step 17``, ``gradient all-reduce``), filled in
            by the caller that knows it.
        waited_s: How long the wait lasted before it failed.
        detail: The underlying error text, shortened.
    """

    kind = "error"

    def __init__(
        self,
        *,
        peer: int | None,
        peer_name: str,
        action: str = "",
        waited_s: float = 0.0,
        detail: str = "",
    ) -> None:
        """Keep the fields (see the class's attributes) and build the message from them.

        Args:
            peer: World rank of the peer, or ``None`` for a collective.
            peer_name: How to name the peer to a user.
            action: What was waited for.
            waited_s: Seconds the wait lasted.
            detail: The underlying error text.
        """
        self.peer = peer
        self.peer_name = peer_name
        self.action = action
        self.waited_s = waited_s
        self.detail = detail
        super().__init__(self._message())

    def _what(self) -> str:
        return f" in {self.action}" if self.action else ""

    def _message(self) -> str:  # pragma: no cover - overridden
        return f"communication with {self.peer_name} failed{self._what()}: {self.detail}"

    def with_action(self, action: str) -> CommError:
        """A copy of this error that names ``action`` (what the caller was waiting for).

        Args:
            action: What the caller was waiting for.

        Returns:
            A new error of the same type.
        """
        return type(self)(
            peer=self.peer, peer_name=self.peer_name, action=action, waited_s=self.waited_s, detail=self.detail
        )


class PeerTimeout(CommError):
    """A wait on a peer ran past its timeout (``run.timeout_s``)."""

    kind = "timeout"

    def _message(self) -> str:
        return f"timed out after {self.waited_s:.1f} s waiting for {self.peer_name}{self._what()} (run.timeout_s)"


class PeerLost(CommError):
    """The connection to a peer broke while waiting (the peer died or aborted its generation)."""

    def _message(self) -> str:
        text = f"lost the connection to {self.peer_name}{self._what()} after {self.waited_s:.2f} s"
        return text + (f": {self.detail}" if self.detail else "")


class GenerationAborted(CommError):
    """This worker aborted the generation's communication while the wait was pending."""

    kind = "aborted"

    def _message(self) -> str:
        return f"communication with {self.peer_name}{self._what()} was aborted ({self.detail or 'generation aborted'})"


class Handle(Protocol):
    """A pending send or receive."""

    def wait(self, timeout_s: float) -> None:
        """Block until the message has gone (send) or arrived (receive).

        Args:
            timeout_s: Seconds to wait at most.

        Raises:
            PeerTimeout: after ``timeout_s`` seconds.
            PeerLost: when the connection to the peer broke.
            GenerationAborted: when the transport was aborted.
        """
        ...


class Transport(Protocol):
    """Non-blocking point-to-point messages between the workers of one generation.

    ``peer`` is the peer's world rank in the current generation; ``tag`` comes from
    ``Action.tag(num_microbatches)``. A sent tensor must not be modified until its handle's wait
    returned; a receive buffer must be preallocated with the right shape and dtype.
    """

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        """Start sending ``tensor`` to ``peer``.

        Args:
            tensor: The message; unchanged until the handle's wait returned.
            peer: Receiving world rank.
            tag: Message tag.

        Returns:
            The send's handle.
        """
        ...

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        """Start receiving ``peer``'s message ``tag`` into ``tensor``.

        Args:
            tensor: Preallocated buffer of the message's shape and dtype.
            peer: Sending world rank.
            tag: Message tag.

        Returns:
            The receive's handle; the buffer holds the message once its wait returned.
        """
        ...

    def abort(self) -> None:
        """Make every pending and future wait of this transport fail at once."""
        ...

    def close(self) -> None:
        """Free what the transport itself holds (threads of a wrapper); the caller is done with it."""
        ...


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    # Drop the C++ source location gloo prefixes to its messages.
    if text.startswith("[") and "] " in text[:200]:
        text = text.split("] ", 1)[1]
    text = text.split(". This is typically caused by", 1)[0]  # gloo's advice, not ours
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify_comm_error(
    exc: BaseException, *, peer: int | None, peer_name: str, waited_s: float, aborted: bool, timeout_s: float
) -> CommError:
    """Turn a torch.distributed exception into :class:`PeerTimeout`, :class:`PeerLost` or
    :class:`GenerationAborted`.

    Args:
        exc: The exception torch raised.
        peer: World rank of the peer, or ``None`` for a collective.
        peer_name: How to name the peer.
        waited_s: Seconds the wait lasted.
        aborted: The transport or generation was aborted (wins over the text).
        timeout_s: The wait's limit; a timeout reports at least this.

    Returns:
        :class:`GenerationAborted` when aborted, :class:`PeerTimeout` when the text says the wait
        timed out, else :class:`PeerLost`.
    """
    text = str(exc)
    if aborted:
        return GenerationAborted(peer=peer, peer_name=peer_name, waited_s=waited_s, detail=_short(exc))
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return PeerTimeout(peer=peer, peer_name=peer_name, waited_s=max(waited_s, timeout_s), detail=_short(exc))
    return PeerLost(peer=peer, peer_name=peer_name, waited_s=waited_s, detail=_short(exc))


class _WorkHandle:
    """A torch.distributed ``Work`` with a deadline on its wait."""

    __slots__ = ("_work", "_peer", "_owner", "_done", "_host", "_device")

    def __init__(self, work: Any, peer: int, owner: ProcessGroupTransport, host: torch.Tensor | None = None,
                 device: torch.Tensor | None = None) -> None:
        self._work = work
        self._peer = peer
        self._owner = owner
        self._done = False
        self._host = host  # a host copy staged for gloo (kept alive until the wait)
        self._device = device  # a received host copy goes here once complete

    def wait(self, timeout_s: float) -> None:
        if self._done:
            return
        owner = self._owner
        if owner.aborted:
            raise GenerationAborted(peer=self._peer, peer_name=owner.peer_name(self._peer), detail="generation aborted")
        start = time.monotonic()
        try:
            if owner.poll_completion:
                # NCCL: completion is asynchronous on the device; poll so the wait has a deadline.
                deadline = start + timeout_s
                while not self._work.is_completed():
                    if owner.aborted or time.monotonic() > deadline:
                        raise TimeoutError("timed out" if not owner.aborted else "aborted")
                    time.sleep(0.0002)
                self._work.wait()
            else:
                self._work.wait(datetime.timedelta(seconds=timeout_s))
        except Exception as exc:  # torch raises RuntimeError / DistError subclasses
            raise classify_comm_error(
                exc,
                peer=self._peer,
                peer_name=owner.peer_name(self._peer),
                waited_s=time.monotonic() - start,
                aborted=owner.aborted,
                timeout_s=timeout_s,
            ) from None
        if self._device is not None and self._host is not None:
            self._device.copy_(self._host)
        self._host = self._device = None
        self._done = True


class ProcessGroupTransport:
    """Transport over a torch.distributed process group (one generation's world group).

    Args:
        group: The process group (``ProcessGroupGloo`` or ``ProcessGroupNCCL``) of the generation.
        peer_names: World rank -> how to name that worker in errors.
        on_abort: Called once by :meth:`abort`; it aborts the generation's groups (see
            :class:`spotpipe.runtime.comm.groups.Generation`).
        poll_completion: Wait by polling ``is_completed`` (NCCL) instead of a timed ``wait`` (gloo).
        stage_through_host: Send and receive device tensors through host copies (gloo with CUDA
            compute, :mod:`spotpipe.runtime.devices`: gloo's point-to-point takes host tensors).
    """

    def __init__(
        self,
        group: Any,
        peer_names: Mapping[int, str],
        on_abort: Callable[[], None] | None = None,
        poll_completion: bool = False,
        stage_through_host: bool = False,
    ) -> None:
        self._group = group
        self._names = dict(peer_names)
        self._on_abort = on_abort
        self._abort_lock = threading.Lock()
        self.aborted = False
        self.poll_completion = poll_completion
        self.stage_through_host = stage_through_host

    def peer_name(self, peer: int) -> str:
        """How errors name world rank ``peer``.

        Args:
            peer: World rank.

        Returns:
            The name given at construction, else ``world rank <peer>``.
        """
        return self._names.get(peer, f"world rank {peer}")

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        if self.aborted:
            raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer), detail="generation aborted")
        host = tensor.detach().cpu() if self.stage_through_host and tensor.device.type != "cpu" else None
        try:
            work = self._group.send([tensor if host is None else host], peer, tag)
        except Exception as exc:
            raise classify_comm_error(
                exc, peer=peer, peer_name=self.peer_name(peer), waited_s=0.0, aborted=self.aborted, timeout_s=0.0
            ) from None
        return _WorkHandle(work, peer, self, host=host)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        if self.aborted:
            raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer), detail="generation aborted")
        staged = self.stage_through_host and tensor.device.type != "cpu"
        host = torch.empty(tensor.shape, dtype=tensor.dtype) if staged else None
        try:
            work = self._group.recv([tensor if host is None else host], peer, tag)
        except Exception as exc:
            raise classify_comm_error(
                exc, peer=peer, peer_name=self.peer_name(peer), waited_s=0.0, aborted=self.aborted, timeout_s=0.0
            ) from None
        return _WorkHandle(work, peer, self, host=host, device=tensor if staged else None)

    def abort(self) -> None:
        with self._abort_lock:
            if self.aborted:
                return
            self.aborted = True
        if self._on_abort is not None:
            self._on_abort()

    def close(self) -> None:
        """Nothing of its own to free: the generation owns the process group."""

    def detach(self) -> None:
        """Forget the process group (its generation is released); only valid once aborted, when
        every send and receive fails before it reaches the group."""
        self.aborted = True
        self._group = None


# ----------------------------------------------------------------------------------------------
# In-process transport (threads), for executor tests and in-process players


class _Mailbox:
    """One FIFO per (src, dst, tag)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[tuple[int, int, int], queue.Queue[torch.Tensor | None]] = {}

    def get(self, key: tuple[int, int, int]) -> queue.Queue[torch.Tensor | None]:
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = queue.Queue()
            return q


class LocalHub:
    """Connects :class:`QueueTransport` endpoints that live in one process (one per thread)."""

    def __init__(self, world_size: int) -> None:
        """An empty hub.

        Args:
            world_size: Number of ranks.
        """
        self.world_size = world_size
        self._mail = _Mailbox()
        self._transports: list[QueueTransport] = []

    def transport(self, rank: int, peer_names: Mapping[int, str] | None = None) -> QueueTransport:
        """The endpoint of ``rank``.

        Args:
            rank: Rank in the hub.
            peer_names: Rank -> how errors name it.

        Returns:
            A new endpoint, kept by the hub (for :meth:`abort_all`).
        """
        t = QueueTransport(self, rank, peer_names or {})
        self._transports.append(t)
        return t

    def abort_all(self) -> None:
        for t in self._transports:
            t.abort()


class _DoneHandle:
    __slots__ = ()

    def wait(self, timeout_s: float) -> None:
        return None


class _QueueRecvHandle:
    __slots__ = ("_q", "_buf", "_peer", "_owner", "_done")

    def __init__(self, q: queue.Queue[torch.Tensor | None], buf: torch.Tensor, peer: int, owner: QueueTransport) -> None:
        self._q, self._buf, self._peer, self._owner, self._done = q, buf, peer, owner, False

    def wait(self, timeout_s: float) -> None:
        if self._done:
            return
        start = time.monotonic()
        name = self._owner.peer_name(self._peer)
        deadline = start + timeout_s
        while True:
            if self._owner.aborted:
                raise GenerationAborted(peer=self._peer, peer_name=name, waited_s=time.monotonic() - start)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerTimeout(peer=self._peer, peer_name=name, waited_s=timeout_s)
            try:
                item = self._q.get(timeout=min(remaining, 0.05))
            except queue.Empty:
                continue
            if item is None:
                raise PeerLost(peer=self._peer, peer_name=name, waited_s=time.monotonic() - start, detail="peer aborted")
            self._buf.copy_(item)
            self._done = True
            return


class QueueTransport:
    """In-process :class:`Transport`: messages are tensors put in per-(src, dst, tag) queues.

    The receiver copies the message into its buffer, like a real transport.
    """

    def __init__(self, hub: LocalHub, rank: int, peer_names: Mapping[int, str]) -> None:
        """An endpoint of ``hub``.

        Args:
            hub: The hub that holds the queues.
            rank: This endpoint's rank.
            peer_names: Rank -> how errors name it.
        """
        self._hub = hub
        self.rank = rank
        self._names = dict(peer_names)
        self.aborted = False

    def peer_name(self, peer: int) -> str:
        """How errors name ``peer``.

        Args:
            peer: Rank in the hub.

        Returns:
            The name given at construction, else ``rank <peer>``.
        """
        return self._names.get(peer, f"rank {peer}")

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        if self.aborted:
            raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer))
        self._hub._mail.get((self.rank, peer, tag)).put(tensor.detach().clone())
        return _DoneHandle()

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        if self.aborted:
            raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer))
        return _QueueRecvHandle(self._hub._mail.get((peer, self.rank, tag)), tensor, peer, self)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        """Nothing to free (the hub owns the queues)."""
