"""Per-generation process groups: membership plans, group construction, and abort.

A *generation* is one membership of the job: which worker holds each role (pipeline stage,
replica). The controller numbers them (1, 2, ...) and publishes each plan in the store; it bumps
the number whenever membership changes. Every worker builds its process groups for generation
``g`` from a :class:`~torch.distributed.PrefixStore` whose prefix names ``g``, so the rendezvous
keys, the gloo connections and the NCCL communicators of ``g`` and ``g + 1`` are disjoint: a dead
peer of ``g`` can never block or corrupt ``g + 1`` (DESIGN.md, "Control plane"). This follows
the communicator re-initialisation of checkpointless training (SageMaker HyperPod, 2025): only
the groups are rebuilt, the processes and their state stay.

Groups of one generation:

* the world group (all workers; world rank = ``replica * stages + stage``), used for pipeline P2P
  and for the step's world all-reduce (gradient norm, loss, stop flag);
* one gradient group per pipeline rank (its ``replicas`` workers), or per model stage in a SkipPipe
  run (the nodes of the stage, :attr:`GenerationPlan.groups`), for the gradient all-reduce;
* the host group (all workers, always gloo, host-memory tensors): the data plane beside the
  device group (DESIGN.md, "Control plane and data plane"). Mirror updates
  (:mod:`spotpipe.runtime.worker.mirror`) and recovery state transfers
  (:mod:`spotpipe.runtime.comm.transfer`) go over it, owner to holder and source to target, from
  background threads too, without touching the pipeline's group or its tags. On CUDA the world
  group is NCCL, which takes device tensors only; this one takes host tensors.

Building. Every member first says it arrived (``gen/<g>/arrived/<rank>``) and waits until all
have, then builds the groups in a helper thread over its own store connection. Both waits watch
``cancelled`` (the worker passes "the controller aborted generation g, or the job stops"), so a
member lost before or while the groups are built never holds the others for ``run.timeout_s``:
they raise :class:`GenerationCancelled` at once and take part in the next recovery (a second
loss during a recovery is recovered, never waited out). A member that never arrives is named
when the wait runs out.

Abort: :meth:`Generation.abort` makes every pending wait of the generation fail at once, here and
on the peers. NCCL has a real ``abort``. Gloo's ``abort`` does not wake a blocked wait, so for
gloo this module records the sockets the generation's groups opened while they were built and
shuts them down: the local waits and the peers' waits then fail with "connection closed", exactly
as when a process dies, and the peers abort in turn. Sockets are identified by inode, so an fd
number reused later is never touched.

Release: an aborted generation is *retired*. Once the worker has entered the next generation (it
no longer waits on the old one), :func:`release_retired` drops the retired groups in a short-lived
thread: their listening and connected sockets, their gloo threads and their store connection are
freed, so a survivor of hundreds of recoveries holds the descriptors and threads of one
generation and never reaches ``ulimit -n``. The groups are dropped, not destroyed in place,
because a gloo group's destructor joins its threads (0.1-0.5 s), which must not delay the
recovery.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spotpipe.errors import SpotpipeError
from spotpipe.runtime.comm.transport import CommError, GenerationAborted, ProcessGroupTransport, classify_comm_error

POLL_S = 0.005
"""How often a member looks for the others' arrival and for a cancellation (seconds)."""


@dataclass(frozen=True)
class Member:
    """One worker's role in a generation."""

    worker: int
    stage: int
    replica: int
    host: str = ""
    pid: int = 0
    node: bool = False  # a SkipPipe node run: ``stage`` is the node id

    def name(self) -> str:
        """``worker 3 (stage 1, replica 1)``, or ``worker 3 (node 3)`` in a SkipPipe node run: how
        errors and events name a worker."""
        if self.node:
            return f"worker {self.worker} (node {self.stage})"
        return f"worker {self.worker} (stage {self.stage}, replica {self.replica})"


@dataclass(frozen=True)
class GenerationPlan:
    """Membership of one generation: ``members[world_rank]``, world rank = replica * stages + stage.

    Attributes:
        generation: The generation's number.
        stages: Pipeline ranks; in a SkipPipe run the live nodes, whose ``stage`` is their node id
            (world ranks follow the members' order, not ``replica * stages + stage``).
        replicas: Data-parallel replicas.
        members: The worker at each world rank.
        groups: World ranks of each gradient all-reduce group, where they are not the replicas of
            one pipeline rank (a SkipPipe run: the nodes of each model stage); ``()`` = by replica.
    """

    generation: int
    stages: int
    replicas: int
    members: tuple[Member, ...]
    groups: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.members) != self.stages * self.replicas:
            raise SpotpipeError(
                f"generation {self.generation}: {len(self.members)} members for {self.stages} stages x {self.replicas} replicas"
            )
        for rank, m in enumerate(self.members):
            if not self.groups and self.world_rank(m.stage, m.replica) != rank:
                raise SpotpipeError(f"generation {self.generation}: {m.name()} sits at world rank {rank}")

    @property
    def world_size(self) -> int:
        return len(self.members)

    def world_rank(self, stage: int, replica: int) -> int:
        """The world rank of the worker playing ``stage`` in ``replica``: ``replica * stages + stage``.

        Args:
            stage: Pipeline rank (stage), 0-based.
            replica: Data-parallel replica, 0-based.

        Returns:
            The world rank (not checked against the plan).
        """
        return replica * self.stages + stage

    def gradient_group(self, world_rank: int) -> tuple[int, ...]:
        """The world ranks whose gradients ``world_rank``'s are summed with, itself included: the
        replicas of its pipeline rank, or its group of :attr:`groups`. The first one leads it (it
        counts the group's gradient once in the global norm).

        Args:
            world_rank: A member's world rank.

        Returns:
            The group's world ranks in ring order.

        Raises:
            SpotpipeError: if :attr:`groups` is set but no group holds ``world_rank``.
        """
        if not self.groups:
            stage = world_rank % self.stages
            return tuple(self.world_rank(stage, r) for r in range(self.replicas))
        for group in self.groups:
            if world_rank in group:
                return group
        raise SpotpipeError(f"generation {self.generation}: world rank {world_rank} is in no gradient group")

    def rank_of_worker(self, worker: int) -> int:
        """The world rank of worker id ``worker`` in this generation.

        Args:
            worker: Worker id (as the controller numbers workers).

        Returns:
            Its world rank.

        Raises:
            SpotpipeError: if the worker is not a member.
        """
        for rank, m in enumerate(self.members):
            if m.worker == worker:
                return rank
        raise SpotpipeError(f"worker {worker} is not a member of generation {self.generation}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "generation": self.generation,
                "stages": self.stages,
                "replicas": self.replicas,
                "members": [[m.worker, m.stage, m.replica, m.host, m.pid] for m in self.members],
                "groups": [list(x) for x in self.groups],
            }
        )

    @staticmethod
    def from_json(text: str | bytes) -> GenerationPlan:
        """Parse a plan from its JSON form: ``generation``, ``stages``, ``replicas``, ``members`` (a
        list of ``[worker, stage, replica, host, pid]``) and ``groups`` (optional).

        Args:
            text: The JSON text.

        Returns:
            The plan.

        Raises:
            SpotpipeError: if the members do not fit ``stages x replicas`` or sit at the wrong rank.
            ValueError, KeyError: on text that is not JSON or lacks a field.
        """
        d = json.loads(text)
        groups = tuple(tuple(int(x) for x in group) for group in d.get("groups", ()))
        members = tuple(Member(int(w), int(s), int(r), str(h), int(p), bool(groups)) for w, s, r, h, p in d["members"])
        return GenerationPlan(int(d["generation"]), int(d["stages"]), int(d["replicas"]), members, groups)


def _socket_inodes() -> dict[int, str]:
    """fd -> ``socket:[inode]`` of this process's sockets (Linux; empty elsewhere)."""
    out: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out[int(name)] = target
    return out


def _connected_only(sockets: dict[int, str]) -> dict[int, str]:
    """The sockets that are connected to a peer (not listeners: shutting down gloo's listener
    makes its accept loop abort the process)."""
    out: dict[int, str] = {}
    for fd, inode in sockets.items():
        try:
            dup = os.dup(fd)
        except OSError:
            continue
        s = socket.socket(fileno=dup)
        try:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            s.getpeername()
            out[fd] = inode
        except OSError:
            continue
        finally:
            s.close()
    return out


def _shutdown_sockets(sockets: dict[int, str]) -> int:
    """Shut down (both directions) the sockets still open under the same fd and inode."""
    done = 0
    for fd, inode in sockets.items():
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != inode:
                continue  # closed and reused: not ours any more
            dup = os.dup(fd)
        except OSError:
            continue
        s = socket.socket(fileno=dup)
        try:
            s.shutdown(socket.SHUT_RDWR)
            done += 1
        except OSError:
            pass
        finally:
            s.close()  # closes the duplicate only
    return done


class GenerationCancelled(GenerationAborted):
    """A generation was aborted (or the job stops) before this worker had built its groups.

    Attributes:
        generation: The generation's number: the worker reports itself a survivor of it.
    """

    def __init__(self, generation: int, reason: str, waited_s: float = 0.0) -> None:
        """Name the generation and why it was cancelled.

        Args:
            generation: The generation's number.
            reason: Why (shown as the error's detail).
            waited_s: Seconds spent waiting before the cancellation.
        """
        self.generation = generation
        super().__init__(peer=None, peer_name=f"the members of generation {generation}",
                         action=f"building the process groups of generation {generation}", waited_s=waited_s,
                         detail=reason)

    def _message(self) -> str:
        return f"generation {self.generation} was aborted before its process groups were built ({self.detail})"

    def with_action(self, action: str) -> CommError:
        """This error itself: it already says what was being built.

        Args:
            action: Ignored.

        Returns:
            ``self``.
        """
        return self


# Aborted generations whose groups are not released yet (see release_retired).
_RETIRED: list[Generation] = []
_RETIRED_LOCK = threading.Lock()


def release_retired(keep: Generation | None = None) -> int:
    """Free the process groups of every aborted generation except ``keep``.

    Call it only when this process no longer waits on those generations (the worker calls it
    right after it entered the next one). The groups are dropped in a short-lived thread, since a
    gloo group's destructor joins its threads.

    Args:
        keep: A generation to keep even if it is aborted (the one the caller is in).

    Returns:
        How many generations were released.
    """
    with _RETIRED_LOCK:
        gone = [g for g in _RETIRED if g is not keep]
        _RETIRED[:] = [g for g in _RETIRED if g is keep]
    handles: list[Any] = []
    for gen in gone:
        handles += gen.detach()
    if handles:
        threading.Thread(target=handles.clear, name="spotpipe-release-groups", daemon=True).start()
    return len(gone)


def retired_count() -> int:
    """How many aborted generations still hold their groups (for tests and logs)."""
    with _RETIRED_LOCK:
        return len(_RETIRED)


class Generation:
    """This worker's process groups and transport for one generation.

    Args:
        store: The job's store (a client of the controller's TCPStore).
        plan: The generation's membership.
        world_rank: This worker's world rank in ``plan``.
        backend: ``gloo`` or ``nccl`` (resolved).
        timeout_s: Default timeout of the groups' operations (``run.timeout_s``).
        listen_host: Address the peers reach this worker on (gloo).
        device: The worker's device.
        cancelled: Polled while the groups are built: a non-empty reason means the generation
            will never be complete (the controller aborted it, the job stops).

    Raises:
        GenerationCancelled: ``cancelled`` gave a reason before the groups were built.
        SpotpipeError: A member did not arrive, or the groups could not be built, within
            ``timeout_s`` (naming the members that are missing).
    """

    def __init__(
        self,
        store: Any,
        plan: GenerationPlan,
        world_rank: int,
        backend: str,
        timeout_s: float,
        listen_host: str = "127.0.0.1",
        device: torch.device | None = None,
        cancelled: Callable[[], str] | None = None,
    ) -> None:
        self.plan = plan
        self.number = plan.generation
        self.world_rank = world_rank
        self.member = plan.members[world_rank]
        self.backend = backend
        self.timeout_s = timeout_s
        self.device = device or torch.device("cpu")
        self.aborted = False
        self.abort_reason = ""
        self._lock = threading.Lock()
        self._sockets: dict[int, str] = {}
        self._cancelled = cancelled or (lambda: "")
        start = time.monotonic()
        self._arrive(store, start)
        # The groups get their own store connection: the main one stays free to poll `cancelled`
        # while a gloo rendezvous blocks on its connection.
        self._store: Any = store.clone() if hasattr(store, "clone") else store
        before = _socket_inodes()
        groups = self._build(listen_host, start)
        self.world: Any = groups[0]
        self.replica_group: Any | None = groups[1]
        self.host: Any = groups[2]
        after = _socket_inodes()
        self._sockets = _connected_only({fd: ino for fd, ino in after.items() if before.get(fd) != ino})
        names = {rank: m.name() for rank, m in enumerate(plan.members)}
        self.transport = ProcessGroupTransport(self.world, names, on_abort=self.abort, poll_completion=backend == "nccl",
                                               stage_through_host=backend == "gloo" and self.device.type == "cuda")

    def _check_cancelled(self, start: float) -> None:
        why = self._cancelled()
        if why:
            raise GenerationCancelled(self.number, why, time.monotonic() - start)

    def _arrive(self, store: Any, start: float) -> None:
        """Say this member arrived and wait for every other one (or a cancellation)."""
        keys = [f"gen/{self.number}/arrived/{rank}" for rank in range(self.plan.world_size)]
        store.set(keys[self.world_rank], "1")
        deadline = start + self.timeout_s
        while not store.check(keys):
            self._check_cancelled(start)
            if time.monotonic() > deadline:
                missing = [m.name() for m, key in zip(self.plan.members, keys) if not store.check([key])]
                raise SpotpipeError(
                    f"{self.member.name()}: could not build the process groups of generation {self.number}: "
                    f"{', '.join(missing) or 'a member'} did not arrive within run.timeout_s={self.timeout_s:g} s"
                )
            time.sleep(POLL_S)

    def _build(self, listen_host: str, start: float) -> tuple[Any, Any | None, Any]:
        """Build the world group (the replica group) and the host group in a helper thread; return them.

        A gloo rendezvous blocks on the store until every peer has connected; the helper thread
        lets this one stop at once when the generation is cancelled. An abandoned helper drops
        what it built when it finishes (its peers are aborting too).
        """
        from torch.distributed import PrefixStore

        raw = getattr(self._store, "raw", self._store)  # the c10d object (a GuardedStore wraps it)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        prefix = f"gen/{self.number}/"
        box: dict[str, Any] = {}
        lock = threading.Lock()

        def build() -> None:
            try:
                world = self._make_group(PrefixStore(prefix + "world/", raw), self.world_rank,
                                         self.plan.world_size, timeout, listen_host)
                replica = None
                group = self.plan.gradient_group(self.world_rank)
                if len(group) > 1:
                    replica = self._make_group(PrefixStore(prefix + f"grad{group[0]}/", raw),
                                               group.index(self.world_rank), len(group), timeout, listen_host)
                host = self._make_group(PrefixStore(prefix + "host/", raw), self.world_rank, self.plan.world_size,
                                        timeout, listen_host, backend="gloo")
                result: Any = (world, replica, host)
            except Exception as exc:  # rendezvous timeout or a peer that vanished while connecting
                result = exc
            with lock:
                if not box.get("abandoned"):
                    box["result"] = result

        helper = threading.Thread(target=build, name=f"spotpipe-build-gen{self.number}", daemon=True)
        helper.start()
        while helper.is_alive():
            try:
                self._check_cancelled(start)
            except GenerationCancelled:
                with lock:
                    box["abandoned"] = True
                raise
            helper.join(POLL_S)
        result = box["result"]
        if isinstance(result, Exception):
            raise SpotpipeError(
                f"{self.member.name()}: could not build the process groups of generation {self.number} "
                f"within run.timeout_s={self.timeout_s:g} s: {' '.join(str(result).split())[:200]}"
            ) from None
        return result  # type: ignore[no-any-return]

    def _make_group(self, store: Any, rank: int, size: int, timeout: datetime.timedelta, listen_host: str,
                    backend: str = "") -> Any:
        if (backend or self.backend) == "nccl":
            from torch.distributed import ProcessGroupNCCL  # type: ignore[attr-defined]

            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            return ProcessGroupNCCL(store, rank, size, opts)
        from torch.distributed import ProcessGroupGloo

        opts = ProcessGroupGloo._Options()
        opts._devices = [ProcessGroupGloo.create_device(hostname=listen_host)]
        opts._timeout = timeout
        return ProcessGroupGloo(store, rank, size, opts)

    # -- collectives -------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, group: str, what: str) -> None:
        """SUM-all-reduce ``tensor`` in place over ``group`` (``"world"`` or ``"replica"``).

        Args:
            tensor: The tensor to sum, on the group's device; overwritten with the sum.
            group: ``"world"`` or ``"replica"`` (a no-op where this generation has no such group).
            what: What is reduced (``gradient all-reduce``), named in errors.

        Raises:
            CommError: naming ``what`` and the group, on timeout, a lost peer, or abort.
        """
        start = time.monotonic()
        name = f"the {group} group of generation {self.number}"
        if self.aborted:
            raise classify_comm_error(RuntimeError(self.abort_reason or "aborted"), peer=None, peer_name=name,
                                      waited_s=0.0, aborted=True, timeout_s=self.timeout_s).with_action(what)
        pg = self.world if group == "world" else self.replica_group
        if pg is None:
            return
        try:
            work = pg.allreduce([tensor])
            if self.backend == "nccl":
                deadline = start + self.timeout_s
                while not work.is_completed():
                    if self.aborted or time.monotonic() > deadline:
                        raise TimeoutError("aborted" if self.aborted else "timed out")
                    time.sleep(0.0002)
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:
            err: CommError = classify_comm_error(
                exc, peer=None, peer_name=name, waited_s=time.monotonic() - start, aborted=self.aborted,
                timeout_s=self.timeout_s,
            )
            raise err.with_action(what) from None

    # -- abort -------------------------------------------------------------------------------

    def abort(self, reason: str = "") -> None:
        """Make every pending and future operation of this generation fail, here and at the peers.

        Safe to call from any thread, more than once. The groups are kept until
        :func:`release_retired` drops them (a thread of this process may still be waiting on them).

        Args:
            reason: Why, reported by the operations that fail.
        """
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
            self.abort_reason = reason
        with _RETIRED_LOCK:
            _RETIRED.append(self)
        self.transport.aborted = True
        for pg in (self.world, self.replica_group, self.host):
            if pg is None:
                continue
            try:
                pg.abort()
            except Exception:
                pass
        _shutdown_sockets(self._sockets)  # the gloo groups' (NCCL's abort above ends its own)

    def detach(self) -> list[Any]:
        """Hand over this (aborted) generation's groups and store connection, and forget them.

        Returns:
            The handles to drop; once they are gone, the sockets and threads are freed.

        Raises:
            RuntimeError: If the generation was not aborted (its groups may still be in use).
        """
        if not self.aborted:
            raise RuntimeError(f"generation {self.number} cannot be released before it is aborted")
        handles = [h for h in (self.world, self.replica_group, self.host, self._store) if h is not None]
        self.world = self.replica_group = self.host = self._store = None
        self.transport.detach()
        self._sockets = {}
        return handles
