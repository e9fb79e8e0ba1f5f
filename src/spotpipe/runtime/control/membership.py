"""Who is in the job: joins, warm spares, role grants, heartbeats and exits (controller side).

:class:`MembershipMixin` is part of :class:`spotpipe.runtime.control.controller.Controller`.

- **Joins.** A worker pushes a join request on the store's queue with a proof of the job token;
  the controller answers with a role (stage, replica), keeps it as a warm spare when every role
  is held and ``ft.spares`` asks for standbys, or refuses it with a ``join_refused`` event.
- **Spares.** A lost role is handed to a waiting spare first (:meth:`_take_spare`); the spare
  already imported torch and built a model once, so it starts faster than a new process.
- **Health.** Heartbeat counters in the store feed :func:`spotpipe.ft.detector.detect` (the pure
  function the simulator calls too); a suspect becomes a ``failure_suspected`` event. A dead local
  process, a worker's error report, or silence of ``run.timeout_s`` confirms a failure
  (:meth:`Controller._fail`). A worker silent for ``ft.detect_timeout_s`` while the other members
  aborted their step is confirmed at once (:meth:`_step_failed_without`): how a remote worker's
  death is confirmed without waiting for ``run.timeout_s``.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

from spotpipe import events as ev
from spotpipe.config import config_to_toml
from spotpipe.runtime import protocol
from spotpipe.runtime.comm.groups import Member
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

    def member(self) -> Member:
        return Member(self.worker, self.stage, self.replica, self.host, self.pid)

    def name(self) -> str:
        return self.member().name()


class MembershipMixin:
    """Joins, spares and health checks (see the module docstring). Mixed into the Controller."""

    # Attributes of the Controller this mixin uses (declared for readers and type checkers).
    cfg: Any
    workers: dict[int, Any]
    spares: list[Any]
    role_of: dict[tuple[int, int], int]

    def _accept_joins(self) -> None:
        from torch.distributed import QueueEmptyError

        while True:
            try:
                raw = self._store.queue_pop(protocol.JOIN_QUEUE, block=False)
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
        assert self._log is not None and self._locals is not None
        host, pid = str(req.get("host", "?")), int(req.get("pid", 0) or 0)
        proof = str(req.get("proof", ""))
        reason = ""
        if not proof:
            reason = "missing job token (set SPOTPIPE_TOKEN or pass --token-file)"
        elif not protocol.check_proof(self.token, self.job_id, nonce, proof):
            reason = "wrong job token"
        free = [r for r in self.roles if r not in self.role_of]
        if not reason and not free and not self.stop_reason and len(self.spares) < self.spare_count:
            self._accept_spare(req, nonce, host, pid)
            return
        if not reason and (not free or self.stop_reason):
            reason = "the job has no free role" if not free else "the job is stopping"
        if reason:
            self._log.write(ev.JOIN_REFUSED, host=host, pid=pid, reason=reason)
            self._progress.message(f"refused a worker from {host} (pid {pid}): {reason}")
            self._store.set(protocol.join_response_key(nonce), json.dumps({"refused": reason}))
            return
        stage, replica = free[0]
        wid = self._next_worker_id
        self._next_worker_id += 1
        local = self._locals.by_pid(pid) if host == socket.gethostname() else None
        state = WorkerState(wid, stage, replica, host, pid, local, last_beat=time.monotonic())
        self.workers[wid] = state
        self.role_of[(stage, replica)] = wid
        grant = self._grant(wid, stage, replica, local)
        self._store.set(protocol.join_response_key(nonce), json.dumps(grant))
        self._log.write(ev.WORKER_START, worker=wid, stage=stage, replica=replica, pid=pid, host=host,
                        generation=self.generation + 1, local=local is not None)

    def _grant(self, wid: int, stage: int, replica: int, local: LocalProcess | None) -> dict[str, Any]:
        return {
            "worker": wid,
            "stage": stage,
            "replica": replica,
            "config": config_to_toml(self.cfg),
            "run_dir": str(self.run_dir.resolve()),
            "token_dir": self.token_dir,
            "token_sha256": self.token_sha256,
            "resume": None if self.resume is None or self.recovering is not None else self.resume.to_grant(),
            "replacement": self.recovering is not None,
            "threads": self._threads if local is not None else 0,
            "local_index": local.index if local is not None else 0,
            "generation": self.generation + 1,
            "phase_faults": self._injector.phase_faults_for(stage, replica),
        }

    def _accept_spare(self, req: dict[str, Any], nonce: str, host: str, pid: int) -> None:
        """A worker joined while every role is held: keep it warm as a spare."""
        assert self._locals is not None
        wid = self._next_worker_id
        self._next_worker_id += 1
        local = self._locals.by_pid(pid) if host == socket.gethostname() else None
        self.spares.append(WorkerState(wid, -1, -1, host, pid, local, last_beat=time.monotonic()))
        grant = self._grant(wid, -1, -1, local)
        grant["spare"] = True
        self._store.set(protocol.join_response_key(nonce), json.dumps(grant))

    def _take_spare(self, stage: int, replica: int) -> bool:
        """Hand a free role to a waiting spare (True if one was alive)."""
        assert self._log is not None
        while self.spares:
            w = self.spares.pop(0)
            if w.local is not None and w.local.returncode() is not None:
                continue
            w.stage, w.replica, w.last_beat = stage, replica, time.monotonic()
            self.workers[w.worker] = w
            self.role_of[(stage, replica)] = w.worker
            self._store.set(protocol.spare_key(w.worker), json.dumps(self._grant(w.worker, stage, replica, w.local)))
            self._log.write(ev.WORKER_START, worker=w.worker, stage=stage, replica=replica, pid=w.pid, host=w.host,
                            generation=self.generation + 1, local=w.local is not None, spare=True)
            return True
        return False

    def _check_health(self, now: float) -> None:
        from spotpipe.ft.detector import detect

        assert self._log is not None
        alive: dict[int, float] = {}
        for w in list(self.workers.values()):
            if w.bye and (w.local is None or w.local.returncode() is not None):
                continue
            if w.worker in self._confirmed:  # lost and dealt with: its later exit or silence is old news
                continue
            try:
                beats = int(self._store.add(protocol.heartbeat_key(w.worker), 0))
            except Exception:
                beats = w.beats
            if beats != w.beats:
                w.beats, w.last_beat = beats, now
                if w.suspected:
                    w.suspected = False
            if not w.bye and self._store.check([protocol.bye_key(w.worker)]):
                w.bye = True
            if not w.reported and self._store.check([protocol.error_key(w.worker)]):
                self._read_error_report(w, now)
            if w.local is not None and w.exit_code is None:
                code = w.local.returncode()
                if code is not None:
                    w.exit_code = code
                    self._read_phase_fault(w)
                    if (code != 0 or not w.bye) and not w.reported and not self._store.check([protocol.error_key(w.worker)]):
                        said = w.local.last_log_line()
                        self._fail(w, f"{w.name()} died ({describe_exit(code)})" + (f": {said}" if said and code > 0 else ""), 0)
                        continue
                    if not w.reported and self._store.check([protocol.error_key(w.worker)]):
                        self._read_error_report(w, now)
            if w.reported or w.exit_code is not None:
                continue
            if not w.bye:
                alive[w.worker] = w.last_beat
        # Local processes that exited before they joined.
        if self._locals is not None:
            joined = {w.pid for w in self.workers.values()} | {w.pid for w in self.spares}
            for p in self._locals.procs:
                code = p.returncode()
                if code is not None and p.pid not in joined and self.failure is None:
                    said = p.last_log_line()
                    self.failure = self._failure_cls(None, f"local worker {p.index} (pid {p.pid}) exited before it joined ({describe_exit(code)})" + (f": {said}" if said else ""), 0)
        detection = detect(now, alive, self.cfg.ft, self._transport_reports)
        for wid in detection.suspects:
            w = self.workers[wid]
            if not w.suspected:
                w.suspected = True
                self._log.write(ev.FAILURE_SUSPECTED, worker=wid, stage=w.stage, replica=w.replica, reason=detection.reasons[wid])
            if now - w.last_beat >= self.cfg.run.timeout_s:
                self._fail(w, f"{w.name()} sent no heartbeat for {now - w.last_beat:.0f} s (run.timeout_s)", 2)
            elif wid in detection.silent and self._step_failed_without(wid):
                self._fail(w, f"{w.name()} sent no heartbeat for {now - w.last_beat:.1f} s while the others aborted "
                              "their step", 2)
        if self._transport_reports and len(self._transport_reports) > 100:
            del self._transport_reports[:-100]

    def _read_error_report(self, w: WorkerState, now: float) -> None:
        """A worker said why it gave up: its own fault, or (kind "comm") a peer it lost."""
        from spotpipe.ft.detector import TransportReport

        try:
            body = json.loads(self._store.get(protocol.error_key(w.worker)))
        except Exception:
            return
        w.reported = True
        at = float(body.get("time", time.time()))
        message = str(body.get("message", "failed"))
        if body.get("kind") in ("error", "timeout") and body.get("peer") is not None:
            # Evidence against the peer for the detector; the reporter itself is a survivor.
            at_mono = now - max(0.0, time.time() - at)
            self._transport_reports.append(
                TransportReport(w.worker, int(body["peer"]), str(body["kind"]), at_mono, message[:200])
            )
            self._fail(w, message, 3 if body["kind"] == "error" else 2, at, confirm=False)
        elif body.get("kind") in ("error", "timeout", "aborted"):
            self._fail(w, message, 3, at, confirm=False)
        else:
            self._fail(w, message, 1, at)


    def _read_phase_fault(self, w: WorkerState) -> None:
        """A worker that killed itself for a phase fault left a note: log the fault it fired."""
        key = protocol.fault_key(w.worker)
        try:
            if not self._store.check([key]):
                return
            body = json.loads(self._store.get(key))
        except Exception:
            return
        fault = self._injector.phase_fault_fired(w.stage, w.replica, int(body["step"]), str(body["phase"]))
        if fault is not None:
            self._log.write(ev.FAULT_INJECTED, step=fault.step, stage=fault.stage, replica=fault.replica, worker=w.worker,
                            pid=w.pid, kind=fault.kind, spec=fault.spec, at_fraction=fault.at_fraction, phase=fault.phase)
            self._progress.message(f"fault injected: worker {w.worker} (stage {w.stage}, replica {w.replica}, pid {w.pid}) "
                                   f"killed itself in the {fault.phase} phase of step {fault.step + 1} ({fault.spec})")

    def _step_failed_without(self, wid: int) -> bool:
        """Whether members of the current generation aborted their step (``gen/<g>/survivor/<id>``,
        posted by :meth:`Worker.on_failure`) while ``wid`` did not. Together with heartbeat silence
        this confirms a remote worker's loss within ``ft.detect_timeout_s``: its peers lost their
        connections to it (in a collective they cannot say to whom). A stalled worker, whose peers
        are still waiting on it, keeps its role until ``run.timeout_s``."""
        plan = getattr(self, "plan", None)
        if plan is None:
            return False
        try:
            if self._store.check([protocol.survivor_key(plan.generation, wid)]):
                return False
            return any(self._store.check([protocol.survivor_key(plan.generation, m.worker)]) for m in plan.members if m.worker != wid)
        except Exception:
            return False
