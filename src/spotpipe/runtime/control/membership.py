"""Who is in the job: joins, warm spares, role grants, heartbeats and exits (controller side).

:class:`Membership` is owned by :class:`spotpipe.runtime.control.controller.Controller`; it holds the
workers, the role table and the spares, and tells its owner about failures through callbacks.

- **Joins.** A worker pushes a join request on the store's queue with a proof of the job token;
  the controller answers with a role (stage, replica), keeps it as a warm spare when every role
  is held and ``ft.spares`` asks for standbys, or refuses it with a ``join_refused`` event.
- **Spares.** A lost role is handed to a waiting spare first (:meth:`Membership.take_spare`); the spare
  already imported torch and built a model once, so it starts faster than a new process.
- **Health.** Heartbeat counters in the store feed :func:`spotpipe.ft.detector.detect` (the pure
  function the simulator calls too); a suspect becomes a ``failure_suspected`` event, and a
  suspect that beats again a ``suspicion_cleared`` event, counted for the run summary (a late
  heartbeat on a busy machine is no failure, but the user sees that it happened). A dead local
  process, a worker's error report, or silence of ``run.timeout_s`` confirms a failure
  (the rules of :mod:`spotpipe.ft.confirm`, reported to the owner's ``on_failure``). A worker silent for ``ft.detect_timeout_s`` while the other members
  aborted their step is confirmed at once (:meth:`_step_failed_without`): how a remote worker's
  death is confirmed without waiting for ``run.timeout_s``.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from spotpipe import events as ev
from spotpipe.runtime import protocol
from spotpipe.runtime.comm.groups import Member
from spotpipe.ft.confirm import Failure, FailureKind, classify_report, confirm_silence
from spotpipe.ft.policy import recovery_enabled
from spotpipe.runtime.comm.groups import GenerationPlan
from spotpipe.runtime.control.context import ControlContext
from spotpipe.runtime.control.launch import LocalProcess, describe_exit


@dataclass
class WorkerState:
    """What the controller knows about one worker."""

    worker: int
    stage: int
    replica: int
    host: str
    pid: int
    local: LocalProcess | None
    beats: int = 0
    last_beat: float = 0.0
    bye: bool = False
    exit_code: int | None = None
    suspected: bool = False
    reported: bool = False  # its error report was read
    node: bool = False  # a SkipPipe node run: ``stage`` is the node id

    def member(self) -> Member:
        return Member(self.worker, self.stage, self.replica, self.host, self.pid, self.node)

    def name(self) -> str:
        return self.member().name()


def _log_field(local: LocalProcess | None) -> dict[str, str]:
    """``{"log": "logs/worker-<i>.log"}`` for a local process (its log is named by start order, not
    by worker id), else nothing."""
    return {} if local is None else {"log": f"{local.log_path.parent.name}/{local.log_path.name}"}


class MembershipHost(Protocol):
    """What :class:`Membership` needs from its owner."""

    generation: int
    plan: GenerationPlan | None
    stop_reason: str

    def vacancies(self) -> int:
        """Roles the job left behind and would take a worker back for (SkipPipe nodes planned around).

        Returns:
            Their number (0 in a job over stages).
        """
        ...

    def make_grant(self, worker: int, stage: int, replica: int, local: LocalProcess | None) -> dict[str, Any]:
        """The grant a worker receives (config, run dir, resume, phase faults, ...).

        Args:
            worker: The worker id.
            stage: Its stage.
            replica: Its replica.
            local: Its local process, or None for a worker started elsewhere.

        Returns:
            The grant, JSON values.
        """
        ...

    def on_failure(self, w: WorkerState | None, failure: Failure, confirm: bool) -> None:
        """A failure was observed (``confirm``: it is a confirmed loss of ``w``).

        Args:
            w: The worker the failure is about, or None.
            failure: What was observed.
            confirm: The loss of ``w`` is confirmed.
        """
        ...

    def on_exit(self, w: WorkerState) -> None:
        """A local worker process exited (read what it left behind, e.g. a phase-fault note).

        Args:
            w: The worker whose process exited.
        """
        ...


OnFailure = Callable[[WorkerState | None, Failure, bool], None]


MAX_ROLELESS_REPLACEMENTS = 8
"""How many spares or starting replacements lost to a signal a job replaces before it stops."""


class Membership:
    """Joins, spares, role grants and health checks (see the module docstring).

    Args:
        ctx: The controller's store, event log, progress and local processes.
        host: The owner (grants, failures, the current generation).
        token: The job token a join must prove.
        job_id: The job id in the proof.
        spare_count: How many warm spares to keep.
    """

    def __init__(self, ctx: ControlContext, host: MembershipHost, token: str, job_id: str, spare_count: int) -> None:
        self.ctx = ctx
        self.host = host
        self.token = token
        self.job_id = job_id
        p = ctx.cfg.pipeline
        self.roles = [(stage, replica) for replica in range(p.replicas) for stage in range(p.ranks)]
        self.nodes = bool(p.stage_nodes)  # roles are SkipPipe nodes
        self.world_size = len(self.roles)
        self.spare_count = spare_count
        self.workers: dict[int, WorkerState] = {}
        self.role_of: dict[tuple[int, int], int] = {}
        self.spares: list[WorkerState] = []  # warm standby workers without a role
        self.confirmed: set[int] = set()  # lost and dealt with: no longer health-checked
        self.roleless_lost: set[int] = set()  # pids of spares / starting replacements lost to a signal, replaced
        self.suspicions_cleared = 0  # suspects that beat again: shown in the run summary
        self.transport_reports: list[Any] = []
        self._next_worker_id = 0

    def full(self) -> bool:
        """Whether every role has a worker."""
        return len(self.role_of) == self.world_size

    def members(self) -> tuple[Member, ...]:
        """The members of a new generation, in role order (stage fastest, then replica)."""
        return tuple(self.workers[self.role_of[role]].member() for role in self.roles)

    def drop_roles(self, roles: list[tuple[int, int]]) -> None:
        """Remove ``roles`` from the job (a SkipPipe node lost and planned around): later
        generations have no member for them and no replacement is sought.

        Args:
            roles: ``(stage, replica)`` roles; any already gone is ignored.
        """
        for role in roles:
            if role in self.roles:
                self.roles.remove(role)
            self.role_of.pop(role, None)
        self.world_size = len(self.roles)

    def add_role(self, role: tuple[int, int]) -> None:
        """Take ``role`` back into the job (a SkipPipe node that joins again), in role order.

        Args:
            role: ``(stage, replica)``.
        """
        if role not in self.roles:
            self.roles = sorted([*self.roles, role], key=lambda r: (r[1], r[0]))
        self.world_size = len(self.roles)

    def reshape(self, shape: Any, lost: Mapping[int, tuple[int, int]]) -> None:
        """Take the roles of ``shape`` (``ft.elastic``): its positions become the role table, spares
        it places are handed their role, workers it leaves out stand by as spares (a grow can take
        them back), lost workers leave the table.

        Args:
            shape: The new :class:`spotpipe.ft.elastic.Shape`.
            lost: The workers lost now (id -> old role).
        """
        self.roles = [(s, r) for r in range(shape.replicas) for s in range(shape.stages)]
        self.world_size = len(self.roles)
        placed = {w: (s, r) for r, row in enumerate(shape.workers) for s, w in enumerate(row)}
        for wid, w in list(self.workers.items()):
            if wid in lost or wid in placed or wid in self.confirmed:
                continue
            if w.stage >= 0 and (w.local is None or w.local.returncode() is None):
                w.stage, w.replica = -1, -1  # stands by: its process waits for a role (entry.py)
                del self.workers[wid]
                self.spares.append(w)
        self.role_of = {}
        for wid, (s, r) in placed.items():
            if wid in self.workers:
                self.workers[wid].stage, self.workers[wid].replica = s, r
                self.role_of[(s, r)] = wid
            else:
                self.take_spare(s, r, worker=wid)

    def live_spares(self) -> int:
        """Spares waiting for a role whose process (where local) still runs.

        Returns:
            Their number.
        """
        return sum(1 for w in self.spares if w.local is None or w.local.returncode() is None)

    def free_role(self, worker: int, role: tuple[int, int]) -> None:
        """Take ``role`` away from ``worker`` (lost) so another worker can take it.

        Args:
            worker: The worker id.
            role: ``(stage, replica)``; freed only if ``worker`` still holds it.
        """
        if self.role_of.get(role) == worker:
            del self.role_of[role]

    def holder(self, role: tuple[int, int]) -> WorkerState | None:
        """The worker holding ``role``, if any.

        Args:
            role: ``(stage, replica)``.

        Returns:
            The holder, or None for a vacant role.
        """
        wid = self.role_of.get(role)
        return None if wid is None else self.workers[wid]

    def accept_joins(self) -> None:
        from torch.distributed import QueueEmptyError

        while True:
            try:
                raw = self.ctx.store.queue_pop(protocol.JOIN_QUEUE, block=False)
            except QueueEmptyError:
                return
            except Exception:
                return
            try:
                req = json.loads(raw)
                nonce = str(req["nonce"])
            except (ValueError, KeyError, TypeError):
                continue
            self._answer_join(req, nonce)

    def _answer_join(self, req: dict[str, Any], nonce: str) -> None:
        assert self.ctx.locals is not None
        host, pid = str(req.get("host", "?")), int(req.get("pid", 0) or 0)
        proof = str(req.get("proof", ""))
        reason = ""
        if not proof:
            reason = "missing job token (set SPOTPIPE_TOKEN or pass --token-file)"
        elif not protocol.check_proof(self.token, self.job_id, nonce, proof):
            reason = "wrong job token"
        free = [r for r in self.roles if r not in self.role_of]
        wanted = self.spare_count + self.host.vacancies()  # a SkipPipe node planned around takes a joiner back
        if not reason and not free and not self.host.stop_reason and len(self.spares) < wanted:
            self._accept_spare(req, nonce, host, pid)
            return
        if not reason and (not free or self.host.stop_reason):
            reason = "the job is stopping" if self.host.stop_reason else "the job has no free role"
        if reason:
            self.ctx.event(ev.JOIN_REFUSED, host=host, pid=pid, reason=reason)
            self.ctx.progress.message(f"refused a worker from {host} (pid {pid}): {reason}")
            self.ctx.store.set(protocol.join_response_key(nonce), json.dumps({"refused": reason}))
            return
        stage, replica = free[0]
        wid = self._next_worker_id
        self._next_worker_id += 1
        local = self.ctx.locals.by_pid(pid) if host == socket.gethostname() else None
        state = WorkerState(wid, stage, replica, host, pid, local, last_beat=time.monotonic(), node=self.nodes)
        self.workers[wid] = state
        self.role_of[(stage, replica)] = wid
        grant = self.host.make_grant(wid, stage, replica, local)
        self.ctx.store.set(protocol.join_response_key(nonce), json.dumps(grant))
        self.ctx.event(ev.WORKER_START, worker=wid, stage=stage, replica=replica, pid=pid, host=host,
                        generation=self.host.generation + 1, local=local is not None, **_log_field(local))

    def _accept_spare(self, req: dict[str, Any], nonce: str, host: str, pid: int) -> None:
        """A worker joined while every role is held: keep it warm as a spare."""
        assert self.ctx.locals is not None
        wid = self._next_worker_id
        self._next_worker_id += 1
        local = self.ctx.locals.by_pid(pid) if host == socket.gethostname() else None
        self.spares.append(WorkerState(wid, -1, -1, host, pid, local, last_beat=time.monotonic(), node=self.nodes))
        grant = self.host.make_grant(wid, -1, -1, local)
        grant["spare"] = True
        self.ctx.store.set(protocol.join_response_key(nonce), json.dumps(grant))

    def take_spare(self, stage: int, replica: int, worker: int | None = None) -> bool:
        """Hand a free role to a waiting spare (True if one was alive).

        Args:
            stage: The free role's stage.
            replica: The free role's replica.
            worker: That spare (an elastic reshape places spares by id); None: the first alive.

        Returns:
            True if a spare took the role; spares whose process has exited are dropped.
        """
        while self.spares:
            pick = next((i for i, x in enumerate(self.spares) if x.worker == worker), -1) if worker is not None else 0
            if pick < 0:
                return False
            w = self.spares.pop(pick)
            if w.local is not None and w.local.returncode() is not None:
                continue
            w.stage, w.replica, w.last_beat = stage, replica, time.monotonic()
            self.workers[w.worker] = w
            self.role_of[(stage, replica)] = w.worker
            self.ctx.store.set(protocol.spare_key(w.worker), json.dumps(self.host.make_grant(w.worker, stage, replica, w.local)))
            self.ctx.event(ev.WORKER_START, worker=w.worker, stage=stage, replica=replica, pid=w.pid, host=w.host,
                            generation=self.host.generation + 1, local=w.local is not None, spare=True, **_log_field(w.local))
            return True
        return False

    def check_health(self, now: float) -> None:
        """Read every worker's heartbeat counter and goodbye key and act on silence: suspect, confirm

        (:func:`spotpipe.ft.detector.detect`) or clear.

        Args:
            now: Monotonic seconds.
        """
        from spotpipe.ft.detector import detect

        alive: dict[int, float] = {}
        for w in list(self.workers.values()):
            if w.bye and (w.local is None or w.local.returncode() is not None):
                continue
            if w.worker in self.confirmed:  # lost and dealt with: its later exit or silence is old news
                continue
            try:
                beats = int(self.ctx.store.add(protocol.heartbeat_key(w.worker), 0))
            except Exception:
                beats = w.beats
            if beats != w.beats:
                if w.suspected:  # a late heartbeat, not a failure (a busy machine, a stall)
                    w.suspected = False
                    self.suspicions_cleared += 1
                    self.ctx.event(ev.SUSPICION_CLEARED, worker=w.worker, stage=w.stage, replica=w.replica,
                                   silent_s=round(now - w.last_beat, 3))
                w.beats, w.last_beat = beats, now
            if not w.bye and self.ctx.store.check([protocol.bye_key(w.worker)]):
                w.bye = True
            if not w.reported and self.ctx.store.check([protocol.error_key(w.worker)]):
                self._read_error_report(w, now)
            if w.local is not None and w.exit_code is None:
                code = w.local.returncode()
                if code is not None:
                    w.exit_code = code
                    self.host.on_exit(w)
                    if (code != 0 or not w.bye) and not w.reported and not self.ctx.store.check([protocol.error_key(w.worker)]):
                        said = w.local.last_log_line()
                        reason = f"{w.name()} died ({describe_exit(code)})" + (f": {said}" if said and code > 0 else "")
                        self.host.on_failure(w, Failure(w.worker, reason, FailureKind.PROCESS_DIED, time.time()), True)
                        continue
                    if not w.reported and self.ctx.store.check([protocol.error_key(w.worker)]):
                        self._read_error_report(w, now)
            if w.reported or w.exit_code is not None:
                continue
            if not w.bye:
                alive[w.worker] = w.last_beat
        if self.ctx.locals is not None and not self.host.stop_reason:
            self._check_roleless(self.ctx.locals.procs)
        detection = detect(now, alive, self.ctx.cfg.ft, self.transport_reports)
        for wid in detection.suspects:
            w = self.workers[wid]
            if not w.suspected:
                w.suspected = True
                self.ctx.event(ev.FAILURE_SUSPECTED, worker=wid, stage=w.stage, replica=w.replica, reason=detection.reasons[wid])
            silence = max(0.0, now - w.last_beat)
            why = confirm_silence(silence, wid in detection.silent,
                                  wid in detection.silent and self._step_failed_without(wid), self.ctx.cfg.run.timeout_s)
            if why is not None:
                self.host.on_failure(w, Failure(w.worker, f"{w.name()} {why}", FailureKind.SILENCE, time.time()), True)
        if self.transport_reports and len(self.transport_reports) > 100:
            del self.transport_reports[:-100]

    def _check_roleless(self, procs: list[LocalProcess]) -> None:
        """Local processes without a role (a warm spare, a replacement still starting) that exited.

        One killed by a signal is a lost machine, not a fault of the job: it held no state, so it
        is replaced by a new local process (at most :data:`MAX_ROLELESS_REPLACEMENTS` times) and the
        job goes on. One that exited with an error (a bug, bad input, no memory) would fail again:
        it stops the job, named. Not checked while the job stops: a replacement that arrives after
        the stop is refused and exits, which is no failure.

        Args:
            procs: Every local process the controller started.
        """
        role_pids = {w.pid for w in self.workers.values()}
        for w in [w for w in self.spares if w.local is not None and w.local.returncode() is not None]:
            self.spares.remove(w)  # a spare that died: never hand it a role
        for p in procs:
            code = p.returncode()
            if code is None or p.pid in role_pids or p.pid in self.roleless_lost:
                continue
            said = p.last_log_line()
            if code < 0 and recovery_enabled(self.ctx.cfg.ft) and len(self.roleless_lost) < MAX_ROLELESS_REPLACEMENTS:
                self.roleless_lost.add(p.pid)
                self.ctx.progress.message(f"local worker {p.index} (pid {p.pid}) was lost before it held a role "
                                          f"({describe_exit(code)}); starting another")
                assert self.ctx.locals is not None
                self.ctx.locals.start(1)
                continue
            reason = f"local worker {p.index} (pid {p.pid}) exited before it held a role ({describe_exit(code)})" + (f": {said}" if said else "")
            self.host.on_failure(None, Failure(None, reason, FailureKind.PROCESS_DIED, time.time()), False)

    def _read_error_report(self, w: WorkerState, now: float) -> None:
        """A worker said why it gave up: its own fault, or (kind "comm") a peer it lost."""
        from spotpipe.ft.detector import TransportReport

        try:
            body = json.loads(self.ctx.store.get(protocol.error_key(w.worker)))
        except Exception:
            return
        w.reported = True
        at = float(body.get("time", time.time()))
        message = str(body.get("message", "failed"))
        kind, confirmed = classify_report(body.get("kind"), body.get("peer") is not None)
        if body.get("kind") in ("error", "timeout") and body.get("peer") is not None:
            # Evidence against the peer for the detector; the reporter itself is a survivor.
            at_mono = now - max(0.0, time.time() - at)
            self.transport_reports.append(
                TransportReport(w.worker, int(body["peer"]), str(body["kind"]), at_mono, message[:200])
            )
        self.host.on_failure(w, Failure(w.worker, message, kind, at), confirmed)

    def _step_failed_without(self, wid: int) -> bool:
        """Whether members of the current generation aborted their step (``gen/<g>/survivor/<id>``,
        posted by :meth:`RecoveryAgent.on_failure`) while ``wid`` did not. Together with heartbeat silence
        this confirms a remote worker's loss within ``ft.detect_timeout_s``: its peers lost their
        connections to it (in a collective they cannot say to whom). A stalled worker, whose peers
        are still waiting on it, keeps its role until ``run.timeout_s``. A grow's planned abort is no
        exception: its members post their status at once, so one that does not and is silent is
        lost (a worker killed while the job grows is found within ``ft.detect_timeout_s``)."""
        plan = self.host.plan
        if plan is None:
            return False
        try:
            if self.ctx.store.check([protocol.survivor_key(plan.generation, wid)]):
                return False
            return any(self.ctx.store.check([protocol.survivor_key(plan.generation, m.worker)]) for m in plan.members if m.worker != wid)
        except Exception:
            return False
