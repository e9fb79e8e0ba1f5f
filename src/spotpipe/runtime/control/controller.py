"""The controller: one per job, inside the ``spotpipe train`` process.

It owns the job's ``torch.distributed.TCPStore`` (the control plane, see
:mod:`spotpipe.runtime.protocol`), starts the local worker processes, hands out roles to workers
that present the job token, publishes generations, watches heartbeats and worker processes,
commits steps, and writes the run directory: ``events.jsonl``, ``config.toml``, checkpoint
manifests, ``loss.png``.

Generations. Generation ``g`` is published (``gen/<g>/plan``, then ``gen/current = g``) when every
role (stage, replica) has a worker; a ``generation`` event records it. Any membership change (a
worker lost, a replacement joined) gets a new number, and workers build fresh process groups
under the ``gen/<g>/`` prefix. To stop a generation's communication at once the controller sets
``gen/<g>/abort``; every worker's heartbeat thread sees it and aborts its groups.

Step commit. A worker reports step ``k`` after its optimizer step; the last worker to report
sets ``step/<k>/commit`` (the store's counter says who is last). Only then does the controller
write the ``step`` event: a step is in the log only when every worker finished it.

Failures. Heartbeats feed :func:`spotpipe.ft.detector.detect` (the same pure function the
simulator calls); a suspect becomes a ``failure_suspected`` event, and a dead process, a
worker's error report, silence past ``ft.detect_timeout_s`` while the other members aborted
their step, or silence of ``run.timeout_s`` confirms it
(:mod:`spotpipe.runtime.control.membership`). A lost worker (dead process or
silence) starts a stage recovery (:mod:`spotpipe.runtime.control.recovery`) unless ``ft.strategy =
none``; a worker's own error, or a recovery that cannot proceed, stops the job with one line that
names the worker, the step and, when there is one, the checkpoint to resume from. Faults in
``ft.faults`` are injected as real signals (:mod:`spotpipe.runtime.control.inject`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from spotpipe import events as ev
from spotpipe.config import JobConfig, config_to_toml
from spotpipe.errors import SpotpipeError
from spotpipe.runtime import protocol
from spotpipe.runtime.state.checkpoint import Manifest, checkpoint_dir, write_manifest
from spotpipe.runtime.comm.groups import GenerationPlan, Member
from spotpipe.runtime.control.launch import LocalWorkers
from spotpipe.runtime.control.progress import Progress, format_duration
from spotpipe.runtime.control.job import eval_due
from spotpipe.runtime.control.membership import MembershipMixin, WorkerState
from spotpipe.runtime.control.recovery import Recovery, RecoveryMixin

POLL_S = 0.05


@dataclass
class RunResult:
    """How ``spotpipe train`` ended.

    Attributes:
        status: ``finished``, ``interrupted`` or ``failed``.
        run_dir: The run directory.
        last_step: 0-based index of the last committed step (-1: none).
        train_loss: Loss of the last committed step.
        val_loss: Last validation loss.
        wall_s: Seconds this invocation ran.
        message: One line for the user (the failure's cause for ``failed``).
        checkpoint: The last complete checkpoint's step, or None.
    """

    status: str
    run_dir: Path
    last_step: int = -1
    train_loss: float | None = None
    val_loss: float | None = None
    wall_s: float = 0.0
    message: str = ""
    checkpoint: int | None = None
    first_loss: float | None = None
    failures: int = 0
    ettr: float | None = None
    lost_s: float = 0.0


@dataclass
class _Failure:
    worker: int | None
    reason: str
    priority: int  # 0 = a process died, 1 = a worker's own error, 2 = timeout / silence, 3 = lost peer
    at: float = field(default_factory=time.time)


class Controller(MembershipMixin, RecoveryMixin):
    """Runs one job.

    Args:
        cfg: The resolved, validated job (``model.vocab_size`` fitted to the data).
        run_dir: Where the run's files go.
        token_dir: The token directory every worker opens (same path for local workers).
        token_sha256: Its checksum, so remote workers can check they prepared the same data.
        resume: The checkpoint to continue from, if any.
        out: Where progress and messages go.
    """

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: Path,
        token_dir: str,
        token_sha256: str,
        resume: Manifest | None = None,
        out: TextIO | None = None,
        layout: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.token_dir = token_dir
        self.token_sha256 = token_sha256
        self.resume = resume
        self.out = out or sys.stdout
        self.layout = layout or {}
        p = cfg.pipeline
        self.roles = [(stage, replica) for replica in range(p.replicas) for stage in range(p.stages)]
        self.world_size = len(self.roles)
        self.local_count = self.world_size if cfg.run.local_workers < 0 else cfg.run.local_workers
        self.workers: dict[int, WorkerState] = {}
        self.role_of: dict[tuple[int, int], int] = {}
        self.plan: GenerationPlan | None = None
        self.generation = 0
        self.next_step = 0 if resume is None else resume.step + 1
        self.start_step = self.next_step
        self.pending_evals: list[int] = []
        self.failure: _Failure | None = None
        self.stop_reason = ""
        self.interrupts = 0
        self.token = protocol.new_token()
        self.job_id = protocol.new_token()[:16]
        self.result = RunResult("failed", run_dir)
        self.last_checkpoint: int | None = None if resume is None else resume.step
        self._store: Any = None
        self._locals: LocalWorkers | None = None
        self._log: ev.EventLog | None = None
        self._progress = Progress(cfg.train.steps, self.out, enabled=cfg.run.progress)
        self._t0 = time.time()
        self._last_commit = time.monotonic()
        self._gen_started = time.monotonic()
        self._first_loss: float | None = None
        self._first_step_of_gen = -1
        self._old_handlers: dict[int, Any] = {}
        self._next_worker_id = 0
        self._confirmed: set[int] = set()
        self._transport_reports: list[Any] = []
        self.recovering: Recovery | None = None
        self.spares: list[WorkerState] = []  # warm standby workers without a role
        self.spare_count = cfg.ft.spares if cfg.ft.strategy != "none" and self.local_count > 0 else 0
        self.recoveries: list[dict[str, Any]] = []
        self.last_manifest: Manifest | None = resume
        self._failure_cls = _Failure
        from spotpipe.runtime.control.inject import FaultInjector

        self._injector = FaultInjector(cfg, self._holder_pid, self._fault_fired)

    # ------------------------------------------------------------------------------------------
    # Entry

    def run(self) -> RunResult:
        """Run the job to its end; always leaves no local worker running."""
        self._install_signals()
        status = "failed"
        try:
            self._start()
            status = self._loop()
        finally:
            self._finish(status)
            self._restore_signals()
        return self.result

    # ------------------------------------------------------------------------------------------
    # Start-up

    def _start(self) -> None:
        from torch.distributed import TCPStore

        cfg = self.cfg
        host = cfg.run.host
        try:
            self._store = TCPStore(host, cfg.run.port, None, True, datetime.timedelta(seconds=cfg.run.timeout_s), wait_for_workers=False)
        except Exception as exc:
            text = str(exc)
            why = "address already in use" if "EADDRINUSE" in text or "already in use" in text else " ".join(text.split())[:120]
            raise SpotpipeError(
                f"cannot listen on {host}:{cfg.run.port} (run.host, run.port): {why}; choose another run.port, or 0 for a free one"
            ) from None
        self.port = int(self._store.port)
        self._store.set(protocol.JOB_ID, self.job_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        self._log = ev.EventLog(self.run_dir / "events.jsonl")
        self._t0 = time.time()
        self._log.write(
            ev.RUN_START,
            name=self.run_dir.name,
            config=dataclasses.asdict(cfg),
            world=self.world_size,
            mode="runtime",
            start_step=self.start_step,
            resumed_from=None if self.resume is None else self.resume.step,
            address=f"{host}:{self.port}",
        )
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        address = f"{connect_host}:{self.port}"
        remote = self.world_size - self.local_count
        what = f"{cfg.pipeline.stages} stages x {cfg.pipeline.replicas} replica{'s' if cfg.pipeline.replicas > 1 else ''}"
        self._progress.message(
            f"spotpipe train: {what}, schedule {cfg.pipeline.schedule}, {cfg.train.steps} steps"
            + (f" (resuming after step {self.resume.step})" if self.resume else "")
            + f"; run dir {self.run_dir}"
        )
        if remote > 0:
            shown = socket.gethostname() if host in ("0.0.0.0", "", "::") else host
            token_path = self.run_dir / "job.token"
            protocol.write_private_file(token_path, self.token)
            self._progress.message(
                f"waiting for {remote} remote worker{'s' if remote > 1 else ''}; on each host run:\n"
                f"  SPOTPIPE_TOKEN={self.token} spotpipe worker --join {shown}:{self.port}\n"
                f"  (or copy {token_path} there and pass --token-file)"
            )
            if host in ("127.0.0.1", "localhost"):
                self._progress.message("note: run.host is 127.0.0.1, which other machines cannot reach; set run.host=0.0.0.0")
        cpus = os.cpu_count() or 1
        threads = max(1, cpus // max(1, self.local_count)) if self.local_count else 0
        self._locals = LocalWorkers(address, self.token, self.run_dir / "logs", threads=threads)
        self._threads = threads
        self._locals.start(self.local_count)

    # ------------------------------------------------------------------------------------------
    # Main loop

    def _loop(self) -> str:
        assert self._store is not None
        next_health = 0.0
        join_timeout = max(60.0, self.cfg.run.timeout_s)
        join_deadline = time.monotonic() + join_timeout if self.local_count == self.world_size else math.inf
        while True:
            now = time.monotonic()
            if self.interrupts >= 2:
                return "interrupted"
            if self.interrupts and not self.stop_reason:
                self._request_stop("interrupt")
                self._progress.message("stopping after the current step (Ctrl-C again to kill the workers now)")
            if self.interrupts and self.plan is None:
                return "interrupted"
            self._accept_joins()
            if self.recovering is not None and self.failure is None:
                self._drive_recovery()
            elif self.plan is None and len(self.role_of) == self.world_size:
                self._publish_generation("initial membership" if self.generation == 0 else "membership changed")
            if self.plan is not None and self.recovering is None:
                self._poll_commits()
                self._poll_evals()
            self._injector.poll(time.monotonic())
            if now >= next_health:
                self._check_health(now)
                next_health = now + min(self.cfg.run.heartbeat_s, 0.5) / 2
            if self.failure is not None:
                return "failed"
            if self.recovering is not None and self.stop_reason and all(
                self.workers[w].bye or self.workers[w].exit_code is not None
                for w in self.role_of.values() if w not in self.recovering.lost
            ):
                return "interrupted" if self.stop_reason == "interrupt" else "finished"
            if self.plan is not None and self.recovering is None and all(self.workers[w].bye for w in self.role_of.values()):
                self._poll_commits()
                self._poll_evals()
                return "interrupted" if self.stop_reason == "interrupt" else "finished"
            if self.plan is None and self.generation == 0 and now > join_deadline:
                self.failure = _Failure(None, f"only {len(self.role_of)} of {self.world_size} workers joined within {join_timeout:.0f} s", 2)
                return "failed"
            limit = self.cfg.train.max_minutes
            if limit > 0 and not self.stop_reason and time.time() - self._t0 > limit * 60:
                self._request_stop("time")
                self._progress.message(f"train.max_minutes={limit:g} reached: stopping after the current step")
            self._wait_a_little()

    def _wait_a_little(self) -> None:
        # Polling with check(): a store wait() that times out logs a C++ warning every time.
        time.sleep(POLL_S)

    # -- joins and generations -----------------------------------------------------------------

    def _publish_generation(self, reason: str) -> None:
        assert self._log is not None
        self.generation += 1
        members = tuple(self.workers[self.role_of[role]].member() for role in self.roles)
        plan = GenerationPlan(self.generation, self.cfg.pipeline.stages, self.cfg.pipeline.replicas, members)
        self._store.set(protocol.plan_key(self.generation), plan.to_json())
        self._store.set(protocol.GEN_CURRENT, str(self.generation))
        self.plan = plan
        self._gen_started = time.monotonic()
        self._last_commit = self._gen_started
        self._first_step_of_gen = self.next_step
        self._log.write(ev.GENERATION, generation=self.generation, workers=[m.worker for m in members], reason=reason)
        self._injector.step_started(self.next_step, time.monotonic())
        if self.generation == 1 and self.spare_count and self._locals is not None:
            self._locals.start(self.spare_count)  # warm standbys, once every role is held

    # -- steps -----------------------------------------------------------------------------------

    def _poll_commits(self) -> None:
        while self.next_step < self.cfg.train.steps and self._store.check([protocol.step_commit_key(self.next_step)]):
            self._commit(self.next_step)
            self.next_step += 1

    def _commit(self, step: int, members: list[Member] | None = None) -> None:
        """Write the ``step`` event (from every member's report, or from ``members`` only: the
        survivors of a step that was decided ``commit`` before a worker was lost)."""
        assert self.plan is not None and self._log is not None
        keys = [protocol.step_report_key(step, m.worker) for m in (members if members is not None else self.plan.members)]
        reports = [json.loads(raw) for raw in self._store.multi_get(keys)]
        head = reports[0]
        now = time.monotonic()
        step_time = now - self._last_commit
        self._last_commit = now
        t = self.cfg.train
        loss = float(head["loss"])
        self._log.write(
            ev.STEP,
            step=step,
            loss=loss,
            tokens=int(head["tokens"]),
            step_time=step_time,
            wall=time.time() - self._t0,
            sampler=head["sampler"],
            lr=float(head["lr"]),
            generation=self.generation,
            grad_norm=float(head["grad_norm"]),
            compute_s=max(float(r.get("compute_s", 0.0)) for r in reports),
        )
        if self._first_loss is None:
            self._first_loss = loss
        self.result.last_step = step
        self.result.train_loss = loss
        ckpts = {int(r["checkpoint"]["rank"]): r["checkpoint"] for r in reports if r.get("checkpoint")}
        if ckpts:
            self._write_manifest(step, ckpts)
        if eval_due(step, t, bool(head.get("stop")), self.stop_reason):
            self.pending_evals.append(step)
        # The first step after a generation starts includes building the groups: not a rate.
        self._progress.step(step, loss, 0.0 if step == self._first_step_of_gen else step_time, int(head["tokens"]))
        self._injector.step_committed(step_time, step == self._first_step_of_gen)
        if members is None:
            self._injector.step_started(step + 1, now)
        scoped = [protocol.step_ready_key(self.generation, step), protocol.step_decide_key(self.generation, step)]
        for key in keys + [protocol.step_done_key(step), protocol.step_commit_key(step)] + scoped:
            try:
                self._store.delete_key(key)
            except Exception:
                pass

    def _write_manifest(self, step: int, ckpts: dict[int, dict[str, Any]]) -> None:
        assert self._log is not None
        if len(ckpts) != self.cfg.pipeline.stages:
            self._progress.message(f"warning: checkpoint of step {step} is incomplete ({len(ckpts)} of {self.cfg.pipeline.stages} ranks)")
            return
        directory = checkpoint_dir(self.run_dir, step)
        files = {rank: (str(c["file"]), str(c["sha256"])) for rank, c in ckpts.items()}
        self.last_manifest = write_manifest(directory, step, files, self.layout)
        seconds = max(float(c.get("seconds", 0.0)) for c in ckpts.values())
        self.last_checkpoint = step
        self._log.write(ev.CHECKPOINT, step=step, path=str(directory), seconds=seconds)

    def _poll_evals(self) -> None:
        assert self._log is not None
        while self.pending_evals and self._store.check([f"eval/{self.pending_evals[0]}"]):
            step = self.pending_evals.pop(0)
            body = json.loads(self._store.get(f"eval/{step}"))
            val = body.get("val_loss")
            self._log.write(ev.EVAL, step=step, val_loss=val)
            if val is not None:
                self.result.val_loss = float(val)
                self._progress.message(f"step {step + 1}: validation loss {float(val):.4f}")

    def _request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        if self._store is not None:
            try:
                self._store.set(protocol.STOP, reason)
            except Exception:
                pass

    # -- health ----------------------------------------------------------------------------------

    def _fail(self, w: WorkerState, reason: str, priority: int, at: float | None = None, confirm: bool = True) -> None:
        """Record a failure; the job stops. The best explanation (lowest priority: 0 a process
        died, 1 a worker's own error, 2 a timeout or silence, 3 a lost peer) is the one reported."""
        assert self._log is not None
        failure = _Failure(w.worker, reason, priority, at or time.time())
        if confirm and w.worker not in self._confirmed:
            self._confirmed.add(w.worker)
            self._log.write(ev.FAILURE_CONFIRMED, worker=w.worker, stage=w.stage, replica=w.replica, reason=reason)
        if self.recovering is not None and w.worker in self.recovering.lost:
            return  # already being replaced: its exit or last words change nothing
        if confirm and priority in (0, 2) and self.failure is None and (self.recovering is not None or self._recovery_enabled()):
            rec = self.recovering
            member = self.plan is not None and any(m.worker == w.worker for m in self.plan.members)
            waiting = rec is not None and w.worker in rec.status  # a survivor between generations
            if member or waiting:
                self._start_recovery(w, reason)
                return
            if rec is not None and self.role_of.get((w.stage, w.replica)) == w.worker:
                # a replacement died before the new generation started: free its role, start another
                del self.role_of[(w.stage, w.replica)]
                if self._locals is not None and self.local_count > 0:
                    self._locals.start(1)
                return
        if self.failure is None or (failure.priority, failure.at) < (self.failure.priority, self.failure.at):
            self.failure = failure
        if self.plan is not None:
            try:
                self._store.set(protocol.abort_key(self.generation), reason)
            except Exception:
                pass
        self._request_stop("failure")

    # ------------------------------------------------------------------------------------------
    # Shutdown

    def _finish(self, status: str) -> None:
        """Stop every local worker, close the log, write run_end and the plot."""
        if self.interrupts >= 2:
            status = "interrupted"
        if status != "finished" and not self.stop_reason:
            self._request_stop("interrupt" if status == "interrupted" else "failure")
        self._injector.cancel()
        if self._store is not None:
            try:
                self._store.set(protocol.END, status)
            except Exception:
                pass
        if self._locals is not None:
            if status == "failed":
                # Survivors see the abort and report why they stopped; give them a moment, then
                # read every report and exit status, so the message names the root cause.
                self._locals.wait_all(3.0)
                try:
                    self._check_health(time.monotonic())
                except Exception:
                    pass
            elif status == "interrupted" and self.interrupts < 2:
                self._locals.wait_all(10.0)
            else:
                self._locals.wait_all(5.0)
            self._locals.stop_all(grace_s=2.0)
        wall = time.time() - self._t0
        self.result.status = status
        self.result.wall_s = wall
        self.result.checkpoint = self.last_checkpoint
        self.result.first_loss = self._first_loss
        if status == "failed":
            self.result.message = self._failure_message()
        if self._log is not None:
            self._log.write(ev.RUN_END, steps=self.result.last_step + 1, wall=wall, status=status,
                            reason=self.result.message or self.stop_reason or None)
            self._log.close()
            self._summarise()
            if self.cfg.run.plot and self.result.last_step >= 0:
                try:
                    from spotpipe.runtime.control.plots import plot_loss_curve

                    plot_loss_curve(self.run_dir / "events.jsonl", self.run_dir / "loss.png", title=self.run_dir.name)
                except SpotpipeError as exc:
                    self._progress.message(f"warning: {exc}")
        self._progress.close()
        token_path = self.run_dir / "job.token"
        if token_path.exists():
            token_path.unlink()
        if self._store is not None:
            del self._store
            self._store = None

    def _holder_pid(self, stage: int, replica: int) -> tuple[int, int] | None:
        wid = self.role_of.get((stage, replica))
        if wid is None or self.recovering is not None:
            return None
        return wid, self.workers[wid].pid

    def _fault_fired(self, fault: Any, worker: int, pid: int) -> None:
        assert self._log is not None
        self._log.write(ev.FAULT_INJECTED, step=fault.step, stage=fault.stage, replica=fault.replica, worker=worker, pid=pid,
                        kind=fault.kind, spec=fault.spec, at_fraction=fault.at_fraction)
        self._progress.message(f"fault injected: {fault.kind} worker {worker} (stage {fault.stage}, replica {fault.replica}, "
                               f"pid {pid}) during step {fault.step + 1} ({fault.spec})")

    def _summarise(self) -> None:
        """ETTR and time lost to failures, from the event log (spotpipe.reliability.runs)."""
        try:
            from spotpipe.reliability.runs import read_runs

            runs, _ = read_runs(self.run_dir / "events.jsonl")
        except Exception:
            return
        if runs:
            last = runs[-1]
            self.result.failures = last.failures
            self.result.ettr = last.ettr
            self.result.lost_s = last.lost_s

    def _failure_message(self) -> str:
        f = self.failure
        text = f.reason if f is not None else "the run failed"
        where = f" after step {self.result.last_step}" if self.result.last_step >= 0 else " before the first step"
        text += f"; the job stopped{where}"
        if f is not None and f.worker is not None and self.cfg.ft.strategy == "none":
            text += " (ft.strategy = none: no stage recovery)"
        if self.last_checkpoint is not None:
            text += f"; resume from the checkpoint of step {self.last_checkpoint} with: spotpipe train --resume {self.run_dir}"
        return text

    # ------------------------------------------------------------------------------------------
    # Signals

    def _install_signals(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.interrupts += 1

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()


def format_result(result: RunResult) -> str:
    """The last line ``spotpipe train`` prints."""
    parts = [f"{result.status}: {result.last_step + 1} steps in {format_duration(result.wall_s)}"]
    if result.train_loss is not None:
        parts.append(f"train loss {result.train_loss:.4f}")
    if result.val_loss is not None:
        parts.append(f"val loss {result.val_loss:.4f}")
    if result.failures and result.ettr is not None:
        parts.append(f"ETTR {result.ettr:.3f} ({format_duration(result.lost_s)} lost, {result.failures} "
                     f"failure{'s' if result.failures > 1 else ''})")
    parts.append(f"run dir {result.run_dir}")
    return ", ".join(parts)
