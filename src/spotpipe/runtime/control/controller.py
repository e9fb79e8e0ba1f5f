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
(:mod:`spotpipe.runtime.control.membership`, with the pure rules of :mod:`spotpipe.ft.confirm`). A lost worker (dead process or
silence) starts a stage recovery (:mod:`spotpipe.runtime.control.recovery`) unless ``ft.strategy =
none``; a worker's own error, or a recovery that cannot proceed, stops the job with one line that
names the worker, the step and, when there is one, the checkpoint to resume from. Faults in
``ft.faults`` are injected as real signals (:mod:`spotpipe.runtime.control.inject`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import os
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from spotpipe import events as ev
from spotpipe.config import JobConfig, config_to_toml
from spotpipe.errors import SpotpipeError
from spotpipe.runtime import protocol
from spotpipe.runtime.state.checkpoint import Manifest, checkpoint_dir, write_manifest
from spotpipe.runtime.comm.groups import GenerationPlan, Member
from spotpipe.runtime.control.launch import LocalWorkers
from spotpipe.runtime.control.progress import Progress, RunResult
from spotpipe.runtime.control.job import checkpoint_due, eval_due, mirrors_wanted
from spotpipe.runtime.control.sizes import format_sizes, job_sizes, mfu
from spotpipe.ft.policy import recovery_enabled
from spotpipe.ft.confirm import Failure, FailureKind, better_explanation, starts_recovery
from spotpipe.runtime.control.context import ControlContext
from spotpipe.runtime.control.launch import LocalProcess
from spotpipe.runtime.control.membership import Membership, WorkerState
from spotpipe.runtime.control.recovery import RecoverySupervisor
from spotpipe.schedule.nodepaths import NodePlan

POLL_S = 0.05
STOPS_THAT_END_CLEANLY = ("time", "interrupt")
"""Stop reasons after which a lost member ends the job at its last committed step instead of
failing it (``train.max_minutes``, Ctrl-C); see :meth:`Controller._lost_while_stopping`."""
NONFINITE_SKIP_LIMIT = 5
"""Consecutive skipped (non-finite) steps after which ``train.nonfinite = skip`` stops the job."""


class Controller:
    """Runs one job: owns the store, the event log and the step commits; its parts are the job's
    :class:`Membership` (joins, spares, health) and :class:`RecoverySupervisor` (stage recovery),
    which reach the controller only through :class:`ControlContext` and the small host interfaces
    they declare (``MembershipHost``, ``RecoveryHost``).

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
        node_plan: NodePlan | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.token_dir = token_dir
        self.token_sha256 = token_sha256
        self.resume = resume
        self.out = out or sys.stdout
        self.layout = layout or {}
        self.node_plan = node_plan
        self.shape: Any = None  # ft.elastic: the spotpipe.ft.elastic.Shape in force, from the first generation
        p = cfg.pipeline
        self.world_size = p.ranks * p.replicas
        self.local_count = self.world_size if cfg.run.local_workers < 0 else cfg.run.local_workers
        self.plan: GenerationPlan | None = None
        self.generation = 0
        self.next_step = 0 if resume is None else resume.step + 1
        self.start_step = self.next_step
        self.pending_evals: list[int] = []
        self.failure: Failure | None = None
        self.stop_reason = ""
        self.lost_while_stopping: set[int] = set()  # members lost after a time limit or Ctrl-C asked the job to stop
        self.interrupts = 0
        self.token = protocol.new_token()
        self.job_id = protocol.new_token()[:16]
        self.result = RunResult("failed", run_dir)
        self.last_checkpoint: int | None = None if resume is None else resume.step
        self._progress = Progress(cfg.train.steps, self.out, enabled=cfg.run.progress)
        self.ctx = ControlContext(cfg, self._progress)
        self._t0 = time.time()
        self._last_commit = time.time()  # wall clock: step times come from the workers' report times
        self._gen_started = time.monotonic()
        self._first_loss: float | None = None
        self._skipped_in_a_row = 0
        self._first_step_of_gen = -1
        self._gen_first_step = 0
        self._steady: collections.deque[float] = collections.deque(maxlen=20)  # recent step times at the shape in force
        self._said_no_checkpoint = ""  # ft.elastic: the reshaped shape whose skipped checkpoints were said
        self._steady_shape = (p.ranks, p.replicas)  # the shape _steady's step times are of
        self._old_handlers: dict[int, Any] = {}
        spare_count = cfg.ft.spares if recovery_enabled(cfg.ft) and self.local_count > 0 else 0
        self.spare_count = spare_count
        self.last_manifest: Manifest | None = resume
        self._threads = 0
        self.members = Membership(self.ctx, self, self.token, self.job_id, spare_count)
        self.supervisor = RecoverySupervisor(self.ctx, self.members, self)
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
            self.ctx.store = protocol.GuardedStore(
                TCPStore(host, cfg.run.port, None, True, datetime.timedelta(seconds=cfg.run.timeout_s), wait_for_workers=False)
            )
        except Exception as exc:
            text = str(exc)
            why = "address already in use" if "EADDRINUSE" in text or "already in use" in text else " ".join(text.split())[:120]
            raise SpotpipeError(
                f"cannot listen on {host}:{cfg.run.port} (run.host, run.port): {why}; choose another run.port, or 0 for a free one"
            ) from None
        self.port = int(self.ctx.store.port)
        self.ctx.store.set(protocol.JOB_ID, self.job_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        self.ctx.log = ev.EventLog(self.run_dir / "events.jsonl")
        self._t0 = time.time()
        self.ctx.log.write(
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
        if self.node_plan is not None:
            what = (f"{cfg.pipeline.stages} stages on {self.world_size} nodes {list(cfg.pipeline.stage_nodes)}, "
                    f"{self.node_plan.variant} paths" + (f", full paths every {cfg.pipeline.full_every} steps"
                                                         if cfg.pipeline.full_every else ""))
        self._progress.message(
            f"spotpipe train: {what}, " + ("" if self.node_plan else f"schedule {cfg.pipeline.schedule}, ")
            + f"{cfg.train.steps} steps"
            + (f" (resuming after step {self.resume.step})" if self.resume else "")
            + f"; run dir {self.run_dir}"
        )
        self.sizes = job_sizes(cfg, mirrors_wanted(cfg))
        self._progress.message(format_sizes(self.sizes))
        shown = socket.gethostname() if host in ("0.0.0.0", "", "::") else host
        token_path = self.run_dir / "job.token"
        if remote > 0 or cfg.ft.elastic:  # an elastic job grows with workers that join
            protocol.write_private_file(token_path, self.token)
        if remote > 0:
            self._progress.message(
                f"waiting for {remote} remote worker{'s' if remote > 1 else ''}; on each host run:\n"
                f"  SPOTPIPE_TOKEN={self.token} spotpipe worker --join {shown}:{self.port}\n"
                f"  (or copy {token_path} there and pass --token-file)"
            )
            if host in ("127.0.0.1", "localhost"):
                self._progress.message("note: run.host is 127.0.0.1, which other machines cannot reach; set run.host=0.0.0.0")
        cpus = os.cpu_count() or 1
        threads = max(1, cpus // max(1, self.local_count)) if self.local_count else 0
        self.ctx.locals = LocalWorkers(address, self.token, self.run_dir / "logs", threads=threads)
        self._threads = threads
        # An all-local job starts its warm spares with its workers, so their start-up (importing
        # torch, building a stage) overlaps the workers' and never the training steps; where remote
        # workers are awaited they start once every role is held, so none takes a remote's role.
        early_spares = self.spare_count if self.local_count == self.world_size else 0
        self.ctx.locals.start(self.local_count + early_spares)

    # ------------------------------------------------------------------------------------------
    # Main loop

    def _loop(self) -> str:
        assert self.ctx.store is not None
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
            self.members.accept_joins()
            if self.supervisor.recovering is not None and self.failure is None:
                self.supervisor.drive()
            elif self.plan is None and len(self.members.role_of) == self.world_size:
                self.publish_generation("initial membership" if self.generation == 0 else "membership changed")
            if self.plan is not None and self.supervisor.recovering is None:
                self.poll_commits()
                self._poll_evals()
                if (self.node_plan is not None or self.shape is not None) and not self.stop_reason and self.next_step > self._gen_first_step:
                    self.supervisor.grow()  # a spare or a joiner takes a node planned around back, or grows an elastic job
            self._injector.poll(time.monotonic())
            if now >= next_health:
                self.members.check_health(now)
                next_health = now + min(self.cfg.run.heartbeat_s, 0.5) / 2
            if self.failure is not None:
                return "failed"
            if self.supervisor.recovering is not None and self.stop_reason and all(
                self.members.workers[w].bye or self.members.workers[w].exit_code is not None
                for w in self.members.role_of.values() if w not in self.supervisor.recovering.lost
            ):
                return "interrupted" if self.stop_reason == "interrupt" else "finished"
            if self.plan is not None and self.supervisor.recovering is None and (
                self.lost_while_stopping or all(self.members.workers[w].bye for w in self.members.role_of.values())
            ):
                self.poll_commits()
                self._poll_evals()
                return "interrupted" if self.stop_reason == "interrupt" else "finished"
            if self.plan is None and self.generation == 0 and now > join_deadline:
                self.fail(Failure(None, f"only {len(self.members.role_of)} of {self.world_size} workers joined within {join_timeout:.0f} s",
                                  FailureKind.SILENCE, time.time()))
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

    def publish_generation(self, reason: str) -> None:
        """Publish the next generation from the current role table: its plan and number in the store,

        a ``generation`` event, and (the first time) the spare workers.

        Args:
            reason: Why the generation starts, for the event log.
        """
        assert self.ctx.log is not None
        self.generation += 1
        members = self.members.members()
        if self.node_plan is None:
            if self.shape is None and self.cfg.ft.elastic:  # the configured shape, its workers by role
                from spotpipe.ft.elastic import Shape
                from spotpipe.model.partition import partition_layers

                p = self.cfg.pipeline
                rows = tuple(tuple(self.members.role_of[(s, r)] for s in range(p.stages)) for r in range(p.replicas))
                self.shape = Shape(tuple(partition_layers(self.cfg.model.layers, p.stages)), rows)
            stages, replicas = (self.cfg.pipeline.ranks, self.cfg.pipeline.replicas) if self.shape is None else (self.shape.stages, self.shape.replicas)
            plan = GenerationPlan(self.generation, stages, replicas, members)
        else:  # one member per live node; gradient groups by world rank
            rank = {m.stage: r for r, m in enumerate(members)}
            groups = tuple(tuple(rank[n] for n in g) for g in self.node_plan.groups)
            plan = GenerationPlan(self.generation, len(members), 1, members, groups)
            text = self.node_plan.to_json()
            self.ctx.store.set(protocol.node_plan_key(self.generation), text)
            (self.run_dir / "node_plan.json").write_text(text)  # what `spotpipe eval` restores the run by
        self.ctx.store.set(protocol.plan_key(self.generation), plan.to_json())
        self.ctx.store.set(protocol.GEN_CURRENT, str(self.generation))
        self.plan = plan
        self._gen_started = time.monotonic()
        self._last_commit = time.time()
        self._first_step_of_gen = self.next_step
        self._gen_first_step = self.next_step  # a grow waits until this generation has committed a step
        if (plan.stages, plan.replicas) != self._steady_shape:
            self._steady.clear()  # step times of another shape
            self._steady_shape = (plan.stages, plan.replicas)
        self.ctx.log.write(ev.GENERATION, generation=self.generation, workers=[m.worker for m in members], reason=reason)
        self._injector.step_started(self.next_step, time.monotonic())
        if self.generation == 1 and self.spare_count and self.local_count < self.world_size and self.ctx.locals is not None:
            self.ctx.locals.start(self.spare_count)  # warm standbys, once every role is held

    # -- steps -----------------------------------------------------------------------------------

    def poll_commits(self) -> None:
        while self.next_step < self.cfg.train.steps and self.ctx.store.check([protocol.step_commit_key(self.next_step)]):
            self.commit(self.next_step)
            self.next_step += 1

    def commit(self, step: int, members: list[Member] | None = None) -> None:
        """Write the ``step`` event (from every member's report, or from ``members`` only: the
        survivors of a step that was decided ``commit`` before a worker was lost).

        Args:
            step: The committed step, 0-based.
            members: The members whose reports count; ``None``: every member of the current plan.
        """
        assert self.plan is not None and self.ctx.log is not None
        keys = [protocol.step_report_key(step, m.worker) for m in (members if members is not None else self.plan.members)]
        reports = [json.loads(raw) for raw in self.ctx.store.multi_get(keys)]
        head = reports[0]
        now = time.monotonic()
        # The step committed when its last worker reported (its own clock: the controller only
        # notices every POLL_S, which would quantise short steps).
        committed_at = max([float(r["t"]) for r in reports if "t" in r] or [time.time()])
        step_time = max(0.0, committed_at - self._last_commit)
        self._last_commit = committed_at
        t = self.cfg.train
        loss = float(head["loss"])
        self.ctx.log.write(
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
            store_bytes=sum(int(r.get("store_bytes", 0)) for r in reports),
            mirror_bytes=sum(int(r.get("mirror_bytes", 0)) for r in reports),
            **({"skipped": str(head["skipped"])} if head.get("skipped") else {}),
            **({"paths": str(head.get("schedule", "train"))} if self.node_plan is not None else {}),
            **({"shape": self.shape.label} if self.shape is not None else {}),
            **self._step_memory(reports),
        )
        if head.get("skipped"):  # train.nonfinite = "skip": counted, data order kept, nothing updated
            self.result.skipped += 1
            self._skipped_in_a_row += 1
            self._progress.message(f"step {step + 1}: {head['skipped']}: update skipped (train.nonfinite = skip)")
            if self._skipped_in_a_row >= NONFINITE_SKIP_LIMIT:  # skipping cannot help a model that diverged
                self.fail(Failure(None, f"step {step + 1}/{t.steps}: {NONFINITE_SKIP_LIMIT} steps in a row were not finite "
                                        "(train.nonfinite = skip): the model diverged; lower train.lr or resume from an "
                                        "earlier checkpoint", FailureKind.WORKER_ERROR, time.time()))
        else:
            self._skipped_in_a_row = 0
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
        if step != self._first_step_of_gen:
            self._steady.append(step_time)
        p = self.cfg.pipeline
        if (self.shape is not None and (self.shape.stages, self.shape.replicas) != (p.stages, p.replicas)
                and checkpoint_due(step, t, bool(head.get("stop"))) and self._said_no_checkpoint != self.shape.label):
            self._said_no_checkpoint = self.shape.label
            self._progress.message(f"elastic: no checkpoint while the job runs at {self.shape.label} (from step {step + 1}; "
                                   f"a checkpoint restores the configured {p.stages}x{p.replicas}); the last is of step "
                                   f"{self.last_checkpoint + 1 if self.last_checkpoint is not None else 'none'}")
        self._injector.step_committed(step_time, step == self._first_step_of_gen)
        if members is None:
            self._injector.step_started(step + 1, now)
        scoped = [protocol.step_ready_key(self.generation, step), protocol.step_decide_key(self.generation, step)]
        for key in keys + [protocol.step_done_key(step), protocol.step_commit_key(step)] + scoped:
            try:
                self.ctx.store.delete_key(key)
            except Exception:
                pass

    def _write_manifest(self, step: int, ckpts: dict[int, dict[str, Any]]) -> None:
        assert self.ctx.log is not None
        ranks = self.cfg.pipeline.ranks if self.plan is None or self.node_plan is None else len(self.plan.members)
        if len(ckpts) != ranks:  # (a SkipPipe run's nodes planned around write none)
            self._progress.message(f"warning: checkpoint of step {step} is incomplete ({len(ckpts)} of {ranks} ranks)")
            return
        directory = checkpoint_dir(self.run_dir, step)
        files = {rank: (str(c["file"]), str(c["sha256"])) for rank, c in ckpts.items()}
        self.last_manifest = write_manifest(directory, step, files, self.layout)
        seconds = max(float(c.get("seconds", 0.0)) for c in ckpts.values())
        self.last_checkpoint = step
        self.ctx.log.write(ev.CHECKPOINT, step=step, path=str(directory), seconds=seconds)

    def _poll_evals(self) -> None:
        assert self.ctx.log is not None
        while self.pending_evals and self.ctx.store.check([f"eval/{self.pending_evals[0]}"]):
            step = self.pending_evals.pop(0)
            body = json.loads(self.ctx.store.get(f"eval/{step}"))
            val = body.get("val_loss")
            self.ctx.log.write(ev.EVAL, step=step, val_loss=val)
            if val is not None:
                self.result.val_loss = float(val)
                self._progress.message(f"step {step + 1}: validation loss {float(val):.4f}")

    def _request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        if self.ctx.store is not None:
            try:
                self.ctx.store.set(protocol.STOP, reason)
            except Exception:
                pass

    # -- health ----------------------------------------------------------------------------------

    def fail(self, failure: Failure) -> None:
        """Stop the job; of all failures seen the best explanation is reported
        (:func:`spotpipe.ft.confirm.better_explanation`).

        Args:
            failure: What went wrong (its reason is also published as the generation's abort).
        """
        self.failure = better_explanation(self.failure, failure)
        if self.plan is not None:
            self._abort_generation(failure.reason)
        self._request_stop("failure")

    def _abort_generation(self, reason: str) -> None:
        """Publish the current generation's abort, so every member blocked on a peer wakes at once
        (best effort: a store that is gone has no one left to wake).

        Args:
            reason: Why, as the members will report it.
        """
        try:
            self.ctx.store.set(protocol.abort_key(self.generation), reason)
        except Exception:
            pass

    def on_failure(self, w: WorkerState | None, failure: Failure, confirm: bool) -> None:
        """A failure observed by the health checks (``confirm``: a confirmed loss of ``w``).

        A confirmed loss that :func:`spotpipe.ft.confirm.starts_recovery` of a member (or of a
        survivor waiting between generations) starts or extends a stage recovery; a replacement
        that died before its generation started is replaced again; anything else stops the job.
        """
        if w is None:
            self.failure = better_explanation(self.failure, failure)
            return
        if confirm and w.worker not in self.members.confirmed:
            self.members.confirmed.add(w.worker)
            self.ctx.event(ev.FAILURE_CONFIRMED, worker=w.worker, stage=w.stage, replica=w.replica, reason=failure.reason)
        rec = self.supervisor.recovering
        if rec is not None and w.worker in rec.lost:
            return  # already being replaced: its exit or last words change nothing
        if confirm and rec is None and self.stop_reason in STOPS_THAT_END_CLEANLY and self._is_member(w.worker):
            self._lost_while_stopping(w, failure)
            return
        if confirm and starts_recovery(failure) and self.failure is None and (rec is not None or self.supervisor.enabled()):
            member = self._is_member(w.worker)
            waiting = rec is not None and w.worker in rec.status  # a survivor between generations
            if member or waiting:
                self.supervisor.start(w, failure.reason)
                return
            if rec is not None and self.members.role_of.get((w.stage, w.replica)) == w.worker:
                # a replacement died before the new generation started: free its role, start another
                self.members.free_role(w.worker, (w.stage, w.replica))
                if self.ctx.locals is not None and self.local_count > 0:
                    self.ctx.locals.start(1)
                return
        self.fail(failure)

    def _is_member(self, worker: int) -> bool:
        return self.plan is not None and any(m.worker == worker for m in self.plan.members)

    def _lost_while_stopping(self, w: WorkerState, failure: Failure) -> None:
        """A member lost after ``train.max_minutes`` or Ctrl-C asked the job to stop: a job that is
        ending is not rebuilt, nor failed. The survivors are woken (the generation is aborted, so
        none waits ``run.timeout_s`` on the lost peer) and the job ends at its last committed step.
        The stop's own checkpoint needs every rank, so a resume starts from the last complete one,
        which the line names (or says there is none).

        Args:
            w: The lost member.
            failure: Why it is lost (its exit, its silence).
        """
        self.lost_while_stopping.add(w.worker)
        self._abort_generation(failure.reason)
        resume = (f"resume from the checkpoint of step {self.last_checkpoint} with: spotpipe train --resume {self.run_dir}"
                  if self.last_checkpoint is not None else
                  "no checkpoint was written (train.checkpoint_every), so it cannot be resumed")
        self._progress.message(f"{failure.reason} while the job was stopping: it is not rebuilt; the job ends at its "
                               f"last committed step, and {resume}")

    def on_exit(self, w: WorkerState) -> None:
        """A local worker exited: a worker that killed itself for a phase fault left a note; log it."""
        key = protocol.fault_key(w.worker)
        try:
            if not self.ctx.store.check([key]):
                return
            body = json.loads(self.ctx.store.get(key))
        except Exception:
            return
        fault = self._injector.phase_fault_fired(w.stage, w.replica, int(body["step"]), str(body["phase"]))
        if fault is not None:
            self.ctx.event(ev.FAULT_INJECTED, step=fault.step, stage=fault.stage, replica=fault.replica, worker=w.worker,
                           pid=w.pid, kind=fault.kind, spec=fault.spec, at_fraction=fault.at_fraction, phase=fault.phase)
            self._progress.message(f"fault injected: worker {w.worker} (stage {w.stage}, replica {w.replica}, pid {w.pid}) "
                                   f"killed itself in the {fault.phase} phase of step {fault.step + 1} ({fault.spec})")

    def vacancies(self) -> int:
        """Nodes of a SkipPipe run that were lost and planned around, or (``ft.elastic``) the
        workers a shrink went without: joiners are kept as spares for them.

        Returns:
            Their number (0 in a job that never shrank).
        """
        from spotpipe.runtime.control.nodeplan import absent_nodes

        if self.shape is not None:  # ft.elastic: the workers a shrink went without
            return max(0, self.world_size - len(self.shape.active))
        return 0 if self.node_plan is None else len(absent_nodes(self.node_plan))

    def make_grant(self, worker: int, stage: int, replica: int, local: LocalProcess | None) -> dict[str, Any]:
        """What a worker is told when it joins (or a spare when it takes a role)."""
        return {
            "worker": worker,
            "stage": stage,
            "replica": replica,
            "config": config_to_toml(self.cfg),
            "run_dir": str(self.run_dir.resolve()),
            "token_dir": self.token_dir,
            "token_sha256": self.token_sha256,
            "resume": None if self.resume is None or self.supervisor.recovering is not None else self.resume.to_grant(),
            "replacement": self.supervisor.recovering is not None,
            "threads": self._threads if local is not None else 0,
            "local_index": local.index if local is not None else 0,
            "generation": self.generation + 1,
            "phase_faults": self._injector.phase_faults_for(stage, replica),
            "node_plan": None if self.node_plan is None else self.node_plan.to_json(),
        }

    def steady_step_s(self) -> float | None:
        """The median of the recent steps at the shape in force (not the first of a generation).

        Returns:
            Seconds, or None before any.
        """
        return statistics.median(self._steady) if self._steady else None

    def restart_step_clock(self) -> None:
        """The next committed step's time is measured from now (after a recovery: the groups are
        built, so the replayed step's time is a real step time, shown as a rate)."""
        self._last_commit = time.time()
        self._first_step_of_gen = -1

    # ------------------------------------------------------------------------------------------
    # Shutdown

    def _mfu(self) -> float | None:
        """Model FLOPs utilisation over the steady steps, where the device's peak is known (all
        workers on this machine's GPUs; :func:`~spotpipe.runtime.control.sizes.mfu`)."""
        steps = self._injector.step_times
        if not steps or self.local_count < self.world_size or not torch.cuda.is_available():
            return None
        devices = min(self.world_size, torch.cuda.device_count())
        return mfu(self.sizes, statistics.median(steps), torch.cuda.get_device_name(0), self.cfg.model.dtype, devices)

    def _finish(self, status: str) -> None:
        """Stop every local worker, close the log, write run_end and the plot."""
        if self.interrupts >= 2:
            status = "interrupted"
        if status != "finished" and not self.stop_reason:
            self._request_stop("interrupt" if status == "interrupted" else "failure")
        self._injector.cancel()
        if self.ctx.store is not None:
            try:
                self.ctx.store.set(protocol.END, status)
            except Exception:
                pass
        if self.ctx.locals is not None:
            # Processes without a role (warm spares, replacements still starting) hold nothing:
            # stop them now rather than wait for them to notice the end.
            role_pids = {w.pid for w in self.members.workers.values()}
            self.ctx.locals.terminate(p.pid for p in self.ctx.locals.procs if p.pid not in role_pids)

            def killed() -> bool:  # a second Ctrl-C: no more waiting
                return self.interrupts >= 2

            if status == "failed":
                # Survivors see the abort and report why they stopped; give them a moment, then
                # read every report and exit status, so the message names the root cause.
                self.ctx.locals.wait_all(3.0, killed)
                try:
                    self.members.check_health(time.monotonic())
                except Exception:
                    pass
            elif status == "interrupted":
                self.ctx.locals.wait_all(10.0, killed)
            else:
                self.ctx.locals.wait_all(5.0, killed)
            self.ctx.locals.stop_all(grace_s=0.0 if killed() else 2.0)
        wall = time.time() - self._t0
        self.result.status = status
        self.result.wall_s = wall
        self.result.checkpoint = self.last_checkpoint
        self.result.first_loss = self._first_loss
        self.result.suspicions_cleared = self.members.suspicions_cleared
        self.result.mfu = self._mfu()
        if self._injector.step_times:  # steady steps: the first of each generation includes start-up
            self.result.step_s = statistics.median(self._injector.step_times)
            self.result.tokens_per_s = self.cfg.train.batch_size * self.cfg.model.context / self.result.step_s
        if status == "failed":
            self.result.message = self._failure_message()
        if self.ctx.log is not None:
            self.ctx.log.write(ev.RUN_END, steps=self.result.last_step + 1, wall=wall, status=status,
                            reason=self.result.message or self.stop_reason or None)
            self.ctx.log.close()
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
        self.ctx.store = None  # drop the store server: its port is free again

    def _holder_pid(self, stage: int, replica: int) -> tuple[int, int] | None:
        wid = self.members.role_of.get((stage, replica))
        if wid is None or self.supervisor.recovering is not None:
            return None
        return wid, self.members.workers[wid].pid

    def _fault_fired(self, fault: Any, worker: int, pid: int) -> None:
        assert self.ctx.log is not None
        self.ctx.log.write(ev.FAULT_INJECTED, step=fault.step, stage=fault.stage, replica=fault.replica, worker=worker, pid=pid,
                        kind=fault.kind, spec=fault.spec, at_fraction=fault.at_fraction)
        where = f"node {fault.stage}" if self.node_plan is not None else f"stage {fault.stage}, replica {fault.replica}"
        self._progress.message(f"fault injected: {fault.kind} worker {worker} ({where}, pid {pid}) during step "
                               f"{fault.step + 1} ({fault.spec})")

    def _step_memory(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``step`` event's measured memory from the workers' reports: per pipeline rank (the
        most over its replicas), ``peak_bytes`` = parameters + gradients + optimizer state on the
        device + the peak of the bytes autograd held for backward, and ``activation_bytes`` that
        peak alone; on CUDA ``cuda_max_allocated`` too. The run keeps the most per rank."""
        p = self.cfg.pipeline
        ranks = p.ranks if self.shape is None else self.shape.stages
        configured = self.shape is None or (self.shape.stages, self.shape.replicas) == (p.stages, p.replicas)
        peak, acts, cuda = [0] * ranks, [0] * ranks, [0] * ranks
        seen = False
        for r in reports:
            mem = r.get("memory")
            if not mem or not 0 <= int(mem.get("rank", -1)) < ranks:
                continue
            seen = True
            k = int(mem["rank"])
            peak[k] = max(peak[k], int(mem["peak"]))
            acts[k] = max(acts[k], int(mem["activations"]))
            cuda[k] = max(cuda[k], int(mem.get("cuda_max_allocated", 0)))
        if not seen:
            return {}
        if configured:  # the summary's memory per rank is the configured shape's (ft.elastic may reshape)
            self.result.peak_bytes = [max(a, b) for a, b in zip(self.result.peak_bytes or [0] * ranks, peak)]
        out: dict[str, Any] = {"peak_bytes": peak, "activation_bytes": acts}
        if any(cuda):
            out["cuda_max_allocated"] = cuda
        return out

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
        if self.shape is not None:  # ft.elastic: time at each shape, throughput lost to shrinking
            from spotpipe.events import iter_events
            from spotpipe.reliability.shapes import shape_times

            records = list(iter_events(self.run_dir / "events.jsonl"))
            starts = [i for i, r in enumerate(records) if r.get("event") == "run_start"]
            self.result.shapes = shape_times(records[starts[-1] if starts else 0:], f"{self.cfg.pipeline.stages}x{self.cfg.pipeline.replicas}")

    def _failure_message(self) -> str:
        f = self.failure
        text = f.reason if f is not None else "the run failed"
        where = (f" after step {self.result.last_step + 1}/{self.cfg.train.steps}" if self.result.last_step >= 0
                 else " before the first step")
        text += f"; the job stopped{where}"
        if f is not None and f.worker is not None and not recovery_enabled(self.cfg.ft):
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
