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
* one replica group per stage (its ``replicas`` workers), for the gradient all-reduce.

Abort: :meth:`Generation.abort` makes every pending wait of the generation fail at once, here and
on the peers. NCCL has a real ``abort``. Gloo's ``abort`` does not wake a blocked wait, so for
gloo this module records the sockets the generation's groups opened while they were built and
shuts them down: the local waits and the peers' waits then fail with "connection closed", exactly
as when a process dies, and the peers abort in turn. Sockets are identified by inode, so an fd
number reused later is never touched.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from spotpipe.errors import SpotpipeError
from spotpipe.runtime.comm.transport import CommError, ProcessGroupTransport, classify_comm_error


@dataclass(frozen=True)
class Member:
    """One worker's role in a generation."""

    worker: int
    stage: int
    replica: int
    host: str = ""
    pid: int = 0

    def name(self) -> str:
        """``worker 3 (stage 1, replica 1)``: how errors and events name a worker."""
        return f"worker {self.worker} (stage {self.stage}, replica {self.replica})"


@dataclass(frozen=True)
class GenerationPlan:
    """Membership of one generation: ``members[world_rank]``, world rank = replica * stages + stage."""

    generation: int
    stages: int
    replicas: int
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        if len(self.members) != self.stages * self.replicas:
            raise SpotpipeError(
                f"generation {self.generation}: {len(self.members)} members for {self.stages} stages x {self.replicas} replicas"
            )
        for rank, m in enumerate(self.members):
            if self.world_rank(m.stage, m.replica) != rank:
                raise SpotpipeError(f"generation {self.generation}: {m.name()} sits at world rank {rank}")

    @property
    def world_size(self) -> int:
        return len(self.members)

    def world_rank(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    def rank_of_worker(self, worker: int) -> int:
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
            }
        )

    @staticmethod
    def from_json(text: str | bytes) -> GenerationPlan:
        d = json.loads(text)
        members = tuple(Member(int(w), int(s), int(r), str(h), int(p)) for w, s, r, h, p in d["members"])
        return GenerationPlan(int(d["generation"]), int(d["stages"]), int(d["replicas"]), members)


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


# Aborted generations are kept here until the process exits: destroying a gloo group whose
# connections were cut can block or abort in its destructor, and a worker never needs them again.
# Workers leave with os._exit, which skips those destructors.
_RETIRED: list[Generation] = []


def resolve_backend(backend: str) -> str:
    """``run.backend``: ``auto`` is NCCL when CUDA is available, else gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise SpotpipeError("run.backend=nccl needs CUDA, which this machine does not have; use run.backend=gloo or auto")
    return backend


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
    ) -> None:
        from torch.distributed import PrefixStore

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
        timeout = datetime.timedelta(seconds=timeout_s)
        prefix = f"gen/{self.number}/"
        before = _socket_inodes()
        try:
            self.world = self._make_group(PrefixStore(prefix + "world/", store), world_rank, plan.world_size, timeout, listen_host)
            self.replica_group: Any | None = None
            if plan.replicas > 1:
                stage = self.member.stage
                self.replica_group = self._make_group(
                    PrefixStore(prefix + f"replica{stage}/", store), self.member.replica, plan.replicas, timeout, listen_host
                )
        except Exception as exc:  # rendezvous timeout or a peer that vanished while connecting
            raise SpotpipeError(
                f"{self.member.name()}: could not build the process groups of generation {self.number} "
                f"within run.timeout_s={timeout_s:g} s: {' '.join(str(exc).split())[:200]}"
            ) from None
        after = _socket_inodes()
        self._sockets = _connected_only({fd: ino for fd, ino in after.items() if before.get(fd) != ino})
        names = {rank: m.name() for rank, m in enumerate(plan.members)}
        self.transport = ProcessGroupTransport(self.world, names, on_abort=self.abort, poll_completion=backend == "nccl")

    def _make_group(self, store: Any, rank: int, size: int, timeout: datetime.timedelta, listen_host: str) -> Any:
        if self.backend == "nccl":
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

        Raises:
            CommError: naming ``what`` and the group, on timeout, a lost peer, or abort.
        """
        pg = self.world if group == "world" else self.replica_group
        if pg is None:
            return
        start = time.monotonic()
        name = f"the {group} group of generation {self.number}"
        if self.aborted:
            raise classify_comm_error(RuntimeError(self.abort_reason or "aborted"), peer=None, peer_name=name,
                                      waited_s=0.0, aborted=True, timeout_s=self.timeout_s).with_action(what)
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

        Safe to call from any thread, more than once. The groups are kept (not destroyed) so that
        no destructor blocks; they are dropped with the generation object.
        """
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
            self.abort_reason = reason
        _RETIRED.append(self)  # never destroyed while the process runs (see _RETIRED)
        self.transport.aborted = True
        for pg in (self.world, self.replica_group):
            if pg is None:
                continue
            try:
                pg.abort()
            except Exception:
                pass
        if self.backend != "nccl":
            _shutdown_sockets(self._sockets)
