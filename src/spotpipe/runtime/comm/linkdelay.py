"""Link-delay emulation: a Transport wrapper that makes one machine play a geo-distributed cluster.

Every message sent through :class:`LinkDelayTransport` reaches the inner transport (and so its
receiver) ``latency + bytes / bandwidth`` after it was sent, with the latency and bandwidth of the
link between the two workers from :func:`spotpipe.network.build_network` -- the same code and
the same numbers the simulator uses (``network.matrix`` + ``network.locations``, or the uniform
``network.latency_ms`` / ``network.bandwidth_gbps``). Messages on one directed link are
serialised in send order: a message starts when the previous one has left (its bytes /
bandwidth), and arrives ``latency`` after its last byte left -- the simulator's link model
(:mod:`spotpipe.sim.player`), so simulated and emulated runs can be compared one to one.

A single delivery thread per wrapper hands due messages to the inner transport in order of due
time. Receives pass straight through (the receiver simply sees the message later). Only
point-to-point messages are delayed; collectives run on the process groups directly and are not,
except that a SkipPipe node waits out its stage all-reduce's emulated time
(:func:`collective_delay`).

World rank ``replica * stages + stage`` (:class:`spotpipe.runtime.comm.groups.GenerationPlan`) is node
``replica * stages + stage`` of the network, as in the simulator's placement.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from spotpipe.config import JobConfig
from spotpipe.runtime.comm.transport import GenerationAborted, Handle, PeerTimeout, Transport
from spotpipe.network import Network, build_network, ring_allreduce_s


class _DelayedSend:
    """Handle of a send that the delivery thread has not handed to the inner transport yet."""

    __slots__ = ("peer", "_owner", "_ready", "_inner", "_error")

    def __init__(self, peer: int, owner: LinkDelayTransport) -> None:
        self.peer = peer
        self._owner = owner
        self._ready = threading.Event()
        self._inner: Handle | None = None
        self._error: BaseException | None = None

    def _deliver(self, handle: Handle | None, error: BaseException | None) -> None:
        self._inner, self._error = handle, error
        self._ready.set()

    def wait(self, timeout_s: float) -> None:
        start = time.monotonic()
        if not self._ready.wait(timeout_s):
            raise PeerTimeout(peer=self.peer, peer_name=self._owner.peer_name(self.peer), waited_s=timeout_s,
                              detail="delayed send not delivered (link-delay emulation)")
        if self._error is not None:
            raise self._error
        assert self._inner is not None
        self._inner.wait(max(0.0, timeout_s - (time.monotonic() - start)))


class LinkDelayTransport:
    """Delays every ``isend`` by its link's latency + bytes / bandwidth (see the module docstring).

    Args:
        inner: The real transport.
        network: Links between nodes.
        self_node: This worker's node.
        node_of: World rank of a peer -> its node (default: the same number).
        clock: Monotonic seconds (tests may pass a fake).
    """

    def __init__(
        self,
        inner: Transport,
        network: Network,
        self_node: int,
        node_of: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.network = network
        self.self_node = self_node
        self._node_of = node_of or (lambda peer: peer)
        self._clock = clock
        self._free_at: dict[int, float] = {}
        self._queue: list[tuple[float, int, Any, int, int, _DelayedSend]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.aborted = False
        self.delayed_messages = 0
        self.delayed_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="spotpipe-linkdelay", daemon=True)
        self._thread.start()

    def peer_name(self, peer: int) -> str:
        """How errors name world rank ``peer``: the inner transport's name, else ``world rank <peer>``.

        Args:
            peer: World rank.

        Returns:
            The name.
        """
        name = getattr(self.inner, "peer_name", None)
        return str(name(peer)) if callable(name) else f"world rank {peer}"

    def delay_of(self, peer: int, nbytes: int, now: float) -> float:
        """Due time of a message of ``nbytes`` to ``peer`` sent at ``now``; books the link.

        Args:
            peer: Receiving world rank.
            nbytes: Message size in bytes.
            now: Send time, seconds on the transport's monotonic clock.

        Returns:
            The arrival time, seconds on the same clock: the link's queue is served in order, then
            serialisation (bytes / bandwidth) and latency.
        """
        link = self.network.link(self.self_node, self._node_of(peer))
        start = max(now, self._free_at.get(peer, 0.0))
        ser = link.serialization_s(nbytes)
        self._free_at[peer] = start + ser
        return start + ser + link.latency_s

    def isend(self, tensor: Any, peer: int, tag: int) -> Handle:
        if self.aborted:
            raise GenerationAborted(peer=peer, peer_name=self.peer_name(peer), detail="generation aborted")
        nbytes = int(tensor.numel()) * int(tensor.element_size())
        now = self._clock()
        with self._cv:
            due = self.delay_of(peer, nbytes, now)
            if due <= now:
                return self.inner.isend(tensor, peer, tag)
            handle = _DelayedSend(peer, self)
            heapq.heappush(self._queue, (due, next(self._seq), tensor, peer, tag, handle))
            self.delayed_messages += 1
            self.delayed_seconds += due - now
            self._cv.notify()
        return handle

    def irecv(self, tensor: Any, peer: int, tag: int) -> Handle:
        return self.inner.irecv(tensor, peer, tag)

    def abort(self) -> None:
        self.aborted = True
        self._fail_pending("generation aborted")
        self.inner.abort()

    def close(self) -> None:
        """Stop the delivery thread (pending sends fail) and close the inner transport."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._fail_pending("transport closed")
        self.inner.close()

    def _fail_pending(self, why: str) -> None:
        with self._cv:
            pending, self._queue = self._queue, []
            self._cv.notify()
        for _due, _seq, _tensor, peer, _tag, handle in pending:
            handle._deliver(None, GenerationAborted(peer=peer, peer_name=self.peer_name(peer), detail=why))

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._queue or self._queue[0][0] > self._clock()):
                    timeout = None if not self._queue else max(0.0, self._queue[0][0] - self._clock())
                    self._cv.wait(timeout)
                if self._closed:
                    return
                _due, _seq, tensor, peer, tag, handle = heapq.heappop(self._queue)
            try:
                inner = self.inner.isend(tensor, peer, tag)
            except BaseException as exc:  # handed to the waiter, who raises it with context
                handle._deliver(None, exc)
            else:
                handle._deliver(inner, None)


def network_for_job(cfg: JobConfig) -> Network:
    """The emulated network of a job: one node per worker (world rank).

    Args:
        cfg: The job (``[network]``, the pipeline ranks (stages, or nodes with
            ``pipeline.stage_nodes``), ``pipeline.replicas``).

    Returns:
        The network.

    Raises:
        ConfigError: on a bad ``[network]`` section (:func:`spotpipe.network.build_network`).
    """
    ranks, replicas = cfg.pipeline.ranks, cfg.pipeline.replicas
    return build_network(cfg.network, ranks, ranks * replicas)


def emulates_links(cfg: JobConfig) -> bool:
    """Whether ``[network]`` asks for any delay at all.

    Args:
        cfg: The job.

    Returns:
        True with a link matrix, a latency or a bandwidth limit.
    """
    n = cfg.network
    return bool(n.matrix) or n.latency_ms > 0 or n.bandwidth_gbps > 0


def wrap_for_job(inner: Transport, cfg: JobConfig, world_rank: int,
                 node_of: Callable[[int], int] | None = None) -> Transport:
    """``inner`` wrapped in link-delay emulation when the config asks for it, else ``inner``.

    Args:
        inner: The real transport.
        cfg: The job.
        world_rank: This worker's world rank.
        node_of: World rank -> network node (default: the same number; a SkipPipe run that lost
            nodes numbers its world ranks apart from its nodes).

    Returns:
        The transport to use.

    Raises:
        ConfigError: on a bad ``[network]`` section.
    """
    if not emulates_links(cfg):
        return inner
    node = node_of or (lambda rank: rank)
    return LinkDelayTransport(inner, network_for_job(cfg), node(world_rank), node)


def collective_delay(cfg: JobConfig, group: Sequence[int], nbytes: int) -> float:
    """Seconds a ring all-reduce of ``nbytes`` over ``group`` takes on the emulated network (the
    simulator's :func:`spotpipe.network.ring_allreduce_s`); 0 without link emulation.

    The worker waits this long (less what the real all-reduce took) after a SkipPipe stage's
    gradient all-reduce, so the emulated WAN slows collectives as the simulator assumes.

    Args:
        cfg: The job.
        group: Network nodes of the group, in ring order.
        nbytes: Bytes each member reduces.

    Returns:
        Seconds, >= 0.

    Raises:
        ConfigError: on a bad ``[network]`` section.
    """
    if not emulates_links(cfg) or len(group) < 2:
        return 0.0
    return ring_allreduce_s(network_for_job(cfg), group, nbytes)
