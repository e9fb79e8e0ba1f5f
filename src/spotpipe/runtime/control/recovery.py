"""Controller side of stage recovery without restarts.

:class:`RecoverySupervisor` is owned by :class:`spotpipe.runtime.control.controller.Controller`. When a worker
is confirmed lost (its process died, or it was silent for ``run.timeout_s``) and
``ft.strategy`` is not ``none``, the controller does not stop the job; it runs a recovery:

1. **Collect.** It aborts the generation (``gen/<g>/abort``) and waits until every surviving
   member has posted ``gen/<g>/survivor/<worker>`` (the step it aborted, its sampler position,
   the step of the mirror it holds). Workers lost within :data:`~spotpipe.ft.confirm.GROUPING_WINDOW_S` of each other are one failure
   (two adjacent stages killed together): the plan waits until the window after the last loss has
   closed and every survivor has reported (:func:`spotpipe.ft.confirm.collect_step`, the rule the
   simulator plays too). Survivors agree on the step to resume at, ``r``: the
   commit protocol (``gen/<g>/step/<k>/decide``, see :meth:`Worker.decide`) lets either every
   survivor apply a step or none. A step decided ``commit`` whose lost worker never reported is
   committed now from the survivors' reports.
2. **Decide.** With ``ft.elastic`` and no spare for a lost worker (after ``ft.replace_wait_s``),
   the job shrinks instead (:meth:`RecoverySupervisor._reshape`: the shape of
   :func:`spotpipe.ft.elastic.next_shape`, the blocks moved peer to peer by the next generation,
   :mod:`spotpipe.runtime.control.reshape`); warm spares later grow it at a step boundary. In a
   SkipPipe node run whose every stage keeps a node, the paths are planned
   again over the nodes left (:func:`spotpipe.runtime.control.nodeplan.replan_without`, strategy
   ``replan``): the lost roles leave the job, nothing is installed and no process starts; the next
   generation replays step ``r`` on the new paths. Otherwise
   :func:`spotpipe.ft.policy.plan_recovery` picks a strategy per lost worker
   (replica, mirror with its lag, checkfree, or a rollback to the last checkpoint; ``stop`` ends
   the job with one line). ``recovery_started`` events say which and why.
3. **Replace.** The lost roles become free; the controller starts one local worker process per
   lost role (a remote worker that joins may take it instead). When every role is held it
   writes ``gen/<g+1>/recovery`` and then publishes generation ``g + 1``.
4. **Install.** Every member of ``g + 1`` does its part (:meth:`RecoveryAgent.recover`: sources send,
   replacements receive, or all load the checkpoint) and posts ``gen/<g+1>/recovered/<w>``;
   then ``recovery_finished`` (bytes, seconds since the failure was confirmed) and
   ``step_replayed`` are written, one line is printed, and training replays step ``r`` with the
   same data. Survivors keep their processes throughout.

Another loss during a recovery (:func:`spotpipe.ft.confirm.loss_action` says which case applies).
While the recovery collects, the loss joins it and the grouping window starts again. While replacements join (step 3) the lost worker is added and
the decision is taken again with the survivors that are left (``recovery_started`` with
``replanned``); a mirror or a CheckFree neighbour that was lost is no longer a source. While the
new generation installs its state (step 4) that generation is aborted and recovered in turn,
from the survivors' statuses in it; a replacement that had not installed its state is killed
and counted as lost too (its weights are void). Either way the resume step stays the same.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from spotpipe import events as ev
from spotpipe.ft.confirm import CollectStep, Failure, FailureKind, LossAction, RecoveryPhase, collect_step, loss_action
from spotpipe.ft.policy import rebuilds, recovery_enabled, uses_mirrors
from spotpipe.runtime import protocol
from spotpipe.runtime.comm.groups import GenerationPlan, Member
from spotpipe.runtime.control.context import ControlContext
from spotpipe.runtime.control.membership import Membership, WorkerState
from spotpipe.runtime.state.checkpoint import Manifest
from spotpipe.schedule.nodepaths import NodePlan


@dataclass
class Recovery:
    """One recovery in progress."""

    generation: int  # the aborted generation
    started: float  # the supervisor's clock (monotonic seconds) at the first confirmation
    wall_started: float
    lost: dict[int, tuple[int, int]] = field(default_factory=dict)  # worker -> (stage, replica)
    last_loss_at: float = 0.0
    phase: RecoveryPhase = "collect"
    plans: list[Any] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    new_workers: dict[tuple[int, int], int] = field(default_factory=dict)
    new_generation: int = 0
    resume_step: int = 0
    outcome: str = "continue"
    reason: str = ""
    status: dict[int, Any] = field(default_factory=dict)  # survivor -> its posted status
    replaced: set[tuple[int, int]] = field(default_factory=set)  # lost roles a replacement was asked for
    waiting_since: float = 0.0  # the clock at the last loss: each wait has run.timeout_s from it
    joined: tuple[int, int] | None = None  # a SkipPipe node taken back by a spare (a grow, no loss)
    grown: NodePlan | None = None  # the paths over the nodes with it
    peer: int = -1  # a live node of its stage, whose state it copies
    grow: bool = False  # ft.elastic: spares or joiners make the job bigger (no loss)
    decision: Any = None  # ft.elastic: the reshape under way (spotpipe.ft.elastic.ShapeDecision)
    no_shrink: str = ""  # ft.elastic: why no smaller shape runs (the job waits for replacements)


class RecoveryHost(Protocol):
    """What :class:`RecoverySupervisor` needs from the controller: the generation and step counters
    it moves, the commit log it completes, and a way to stop the job."""

    plan: GenerationPlan | None
    generation: int
    next_step: int
    last_checkpoint: int | None
    last_manifest: Manifest | None
    stop_reason: str
    local_count: int
    node_plan: NodePlan | None
    shape: Any  # ft.elastic: the spotpipe.ft.elastic.Shape in force (None: the configured one, not elastic)

    def poll_commits(self) -> None:
        """Write the ``step`` events of steps every member committed."""
        ...

    def commit(self, step: int, members: list[Member] | None = None) -> None:
        """Write step ``step``'s event from ``members``' reports (the survivors of a decided step).

        Args:
            step: The step, 0-based.
            members: The members whose reports count; ``None``: every member.
        """
        ...

    def publish_generation(self, reason: str) -> None:
        """Publish the next generation from the current role table.

        Args:
            reason: Why, for the event log.
        """
        ...

    def restart_step_clock(self) -> None:
        """The next step's time starts now (not at the failure)."""
        ...

    def steady_step_s(self) -> float | None:
        """The median of the recent steps at the shape in force (what an elastic reshape prices shapes by).

        Returns:
            Seconds, or None before any.
        """
        ...

    def fail(self, failure: Failure) -> None:
        """Stop the job with ``failure`` as (a candidate for) its reason.

        Args:
            failure: What went wrong.
        """
        ...


class RecoverySupervisor:
    """The recovery state machine (see the module docstring).

    Args:
        ctx: The controller's store, event log, progress and local processes.
        members: The job's membership (workers, role table, spares).
        host: The controller's generation and step counters (:class:`RecoveryHost`).
        clock: Monotonic seconds (default :func:`time.monotonic`); every wait of the state machine
            (the grouping window, the timeouts, the recovery time) reads it, so a unit test can
            play a recovery on a clock it moves itself.
    """

    def __init__(self, ctx: ControlContext, members: Membership, host: RecoveryHost,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.members = members
        self.host = host
        self.clock = clock
        self.recovering: Recovery | None = None
        self.recoveries: list[dict[str, Any]] = []
        self._unplaceable: set[Any] = set()  # absent node sets (elastic: shapes and spares) no grow could plan for

    # -- entry -----------------------------------------------------------------------------------

    def enabled(self) -> bool:
        return recovery_enabled(self.ctx.cfg.ft) and self.host.plan is not None and not self.host.stop_reason

    def start(self, w: WorkerState, reason: str) -> None:
        """A member of the current generation is lost: begin (or extend) the recovery, as
        :func:`spotpipe.ft.confirm.loss_action` says for the phase it is in.

        Args:
            w: The lost worker.
            reason: Why it is taken as lost (published as the generation's abort).
        """
        rec = self.recovering
        action = loss_action(None if rec is None else rec.phase, rec is not None and w.worker in rec.lost)
        if action is LossAction.IGNORE:
            return
        if action is LossAction.START:
            rec = self.recovering = Recovery(self.host.generation, self.clock(), time.time())
            try:
                self.ctx.store.set(protocol.abort_key(self.host.generation), reason)
            except Exception:
                pass
        assert rec is not None
        if rec.decision is not None and action in (LossAction.RESTART, LossAction.REPLAN):
            self.host.fail(Failure(w.worker, f"{w.name()} was lost while the job reshapes {rec.decision.from_shape.label} -> "
                                             f"{rec.decision.to_shape.label} (its blocks were moving): a loss in the move "
                                             "is not recovered; resume from a checkpoint", FailureKind.PROCESS_DIED, time.time()))
            return
        if action is LossAction.RESTART:
            # Lost while the new generation installs its state: abort that generation and recover
            # it in turn; replacements that had not installed their state are lost with it.
            self._restart_recovery(rec, w, reason)
            return
        self._add_lost(rec, w, reason)
        if action is LossAction.REPLAN:  # lost while replacements join: plan again with one more loss
            if self.members.role_of.get((w.stage, w.replica)) == w.worker:
                del self.members.role_of[(w.stage, w.replica)]
            self._recovery_plan(rec)

    def _add_lost(self, rec: Recovery, w: WorkerState, reason: str) -> None:
        """Count ``w`` as lost in ``rec``; a local process of it that still runs is killed, and the
        health checks stop looking at it (its exit, silence or last words are no new failure)."""
        self.members.confirmed.add(w.worker)
        if rec.lost:  # another loss extends the recovery: its waits start again
            rec.waiting_since = self.clock()
        rec.lost[w.worker] = (w.stage, w.replica)
        rec.last_loss_at = self.clock()
        rec.reason = reason if not rec.reason else rec.reason + "; " + reason
        if w.local is not None and w.local.returncode() is None:
            try:  # silent but alive (stalled), or a replacement whose state is void: it must not come back
                os.kill(w.local.pid, signal.SIGKILL)
            except OSError:
                pass

    def _restart_recovery(self, rec: Recovery, w: WorkerState, reason: str) -> None:
        """A member of the generation being installed was lost: start a recovery of that generation."""
        keys = [protocol.recovered_key(rec.new_generation, m.worker) for m in self.host.plan.members]
        done = {m.worker for m, k in zip(self.host.plan.members, keys) if self.ctx.store.check([k])}
        self.ctx.progress.message(f"lost {self.members.workers[w.worker].name()} during the recovery of generation {rec.generation}: recovering again")
        self.recovering = Recovery(self.host.generation, rec.started, rec.wall_started, waiting_since=self.clock())
        try:
            self.ctx.store.set(protocol.abort_key(self.host.generation), reason)
        except Exception:
            pass
        self._add_lost(self.recovering, w, reason)
        for role, wid in rec.new_workers.items():
            if wid not in done and wid != w.worker:
                self._add_lost(self.recovering, self.members.workers[wid], f"{self.members.workers[wid].name()} had not installed its state")

    # -- the state machine -----------------------------------------------------------------------

    def drive(self) -> None:
        rec = self.recovering
        assert rec is not None
        if rec.phase == "collect":
            self._recovery_collect(rec)
        elif rec.phase == "replace":
            self._recovery_replace(rec)
        elif rec.phase == "install":
            self._recovery_install(rec)

    def _install_failed_without_a_loss(self, rec: Recovery) -> bool:
        """Stop at once (True) when every member of the generation being installed aborted it
        (``gen/<g+1>/survivor/<w>``) though none was lost: no one will install the state, and
        nothing the controller waits for can change. A lost member would not have posted."""
        plan = self.host.plan
        assert plan is not None
        keys = [protocol.survivor_key(rec.new_generation, m.worker) for m in plan.members]
        if not self.ctx.store.check(keys):
            return False
        errors = [str(json.loads(raw).get("error", "")) for raw in self.ctx.store.multi_get(keys)]
        why = next((e for e in errors if e), "no reason given")
        stages = sorted({p.stage for p in rec.plans})
        what = f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}"
        self.host.fail(Failure(None, f"cannot rebuild {what}: every member of generation {rec.new_generation} aborted "
                                     f"the recovery though no worker was lost ({' '.join(why.split())[:200]})",
                               FailureKind.WORKER_ERROR, time.time()))
        return True

    def _new_worker_silent(self, rec: Recovery) -> bool:
        """A reshape's new worker (a joiner or a spare it placed) that has been silent for
        ``ft.detect_timeout_s`` while the new generation installs: it is lost, and the blocks
        moving to it with it; stop at once with one line (True) rather than after ``run.timeout_s``."""
        if rec.decision is None:
            return False
        limit = self.ctx.cfg.ft.detect_timeout_s
        for wid in rec.new_workers.values():
            w = self.members.workers.get(wid)
            if w is not None and self.clock() - w.last_beat > limit and not self.ctx.store.check(
                    [protocol.recovered_key(rec.new_generation, wid)]):
                d = rec.decision
                self.host.fail(Failure(wid, f"{w.name()} joined and was lost (silent for {limit:g} s, ft.detect_timeout_s) "
                                            f"while the job reshaped {d.from_shape.label} -> {d.to_shape.label}: a loss in the "
                                            "move is not recovered", FailureKind.SILENCE, time.time()))
                return True
        return False

    def _timed_out(self, rec: Recovery, what: str) -> bool:
        """Stop the job if ``what`` has been awaited for ``run.timeout_s`` since the recovery
        started or, for a recovery extended by another loss, since that loss (each loss starts
        new processes, which get the whole timeout)."""
        if self.clock() - max(rec.started, rec.waiting_since) > self.ctx.cfg.run.timeout_s:
            self.host.fail(Failure(None, f"recovery of generation {rec.generation} timed out ({what} within run.timeout_s="
                                             f"{self.ctx.cfg.run.timeout_s:g} s)", FailureKind(2), time.time()))
            return True
        return False

    def _recovery_collect(self, rec: Recovery) -> None:
        """Plan the recovery once :func:`spotpipe.ft.confirm.collect_step` says so: the grouping
        window after the last loss has closed and every survivor has posted the step it aborted."""
        survivors = [m for m in self.host.plan.members if m.worker not in rec.lost]
        keys = [protocol.survivor_key(rec.generation, m.worker) for m in survivors]
        outstanding = bool(survivors) and not self.ctx.store.check(keys)
        if rec.grow and not rec.lost and outstanding and any(self.ctx.store.check([k]) for k in keys):
            self.ctx.store.set(protocol.abort_key(rec.generation), rec.reason)  # one is left in a step: free it
        step = collect_step(rec.last_loss_at, self.clock(), outstanding=outstanding)
        if step is CollectStep.WINDOW:
            return
        if step is CollectStep.MEMBERS:
            self._timed_out(rec, "survivors to abort their step")
            return
        status = {m.worker: json.loads(raw) for m, raw in zip(survivors, self.ctx.store.multi_get(keys))} if survivors else {}
        steps = sorted({int(s["step"]) for s in status.values()})
        if len(steps) > 1:
            self.host.fail(Failure(None, f"survivors of generation {rec.generation} disagree on the step to resume at ({steps}); "
                                             "this is a bug in the commit protocol", FailureKind(1), time.time()))
            return
        resume = steps[0] if steps else self.host.next_step
        self.host.poll_commits()
        while self.host.next_step < resume:  # decided "commit" but the lost worker never reported
            self.host.commit(self.host.next_step, [m for m in survivors])
            self.host.next_step += 1
        rec.status = status
        rec.record = {"resume_step": resume}
        self._recovery_plan(rec)

    def _recovery_plan(self, rec: Recovery) -> None:
        """Decide (again, when another worker is lost while replacements join) and ask for a
        replacement for every lost role that has none yet."""
        resume = int(rec.record["resume_step"])
        status = {w: st for w, st in rec.status.items() if w not in rec.lost}
        if rec.joined is not None and not rec.lost:
            self._take_back(rec, resume, status)
            return
        rec.joined = None  # a loss during a grow: recover it; the spare stays for a later grow
        if self.host.node_plan is None:
            if rec.grow and not rec.lost:
                if not self._reshape(rec, resume, status):
                    self._nothing_to_do(rec, resume, status)
                return
            rec.grow = False  # a loss during a grow: recover it; the spares wait for a later grow
            # At a reshaped shape the per-role strategies (a copy into a replacement, a rollback)
            # would rebuild the configured shape's roles and blocks: only a reshape applies there,
            # at once (a standby takes a lost position; a joiner grows the job back later).
            reshaped = self._reshaped()
            if self._elastic() and (reshaped or (self.ctx.cfg.ft.replace_wait_s <= 0
                                                 and self.members.live_spares() < len(rec.lost))):
                if self._reshape(rec, resume, status):
                    return
                if reshaped:
                    p = self.ctx.cfg.pipeline
                    self.host.fail(Failure(None, f"elastic: {rec.no_shrink}; the job runs at shape {self.host.shape.label}, "
                                           f"and a replacement by copy or a rollback rebuilds only the configured shape "
                                           f"{p.stages}x{p.replicas}", FailureKind(1), time.time()))
                    return
            self._finish_plan(rec, self._policy_plans(rec, resume, status), resume, status)
            return
        # SkipPipe: plan the paths around the lost nodes if every stage has one left; else copy,
        # CheckFree or the checkpoint, per lost node.
        from spotpipe.runtime.control.nodeplan import absent_nodes, replan_without, stage_loss_plans

        nodes = sorted(role[0] for role in rec.lost.values())
        new_plan, no_replan = replan_without(self.ctx.cfg, self.host.node_plan, absent_nodes(self.host.node_plan) | set(nodes))
        if new_plan is not None:
            self._replan(rec, new_plan, nodes, resume, status)
            return
        plans = stage_loss_plans(self.ctx.cfg, self.host.node_plan, nodes, self.host.last_checkpoint)
        self._finish_plan(rec, [replace(p, why=f"paths not re-planned: {no_replan}; {p.why}") for p in plans], resume, status)

    def _policy_plans(self, rec: Recovery, resume: int, status: dict[int, Any]) -> list[Any]:
        """:func:`spotpipe.ft.policy.plan_recovery` for the lost roles, with the mirrors the survivors hold."""
        from spotpipe.ft.policy import mirror_holder, plan_recovery, swap_schedule_on

        S, R = self.ctx.cfg.pipeline.ranks, self.ctx.cfg.pipeline.replicas
        mirrors: dict[tuple[int, int], tuple[int, int]] = {}
        lags: dict[tuple[int, int], int] = {}
        by_role = {(self.members.workers[w].stage, self.members.workers[w].replica): w for w in status}
        if uses_mirrors(self.ctx.cfg.ft):
            for role in rec.lost.values():
                holder = mirror_holder(role[0], role[1], S)
                hw = by_role.get(holder)
                if hw is None or holder == role:
                    continue
                mstep = status[hw].get("mirror_step")
                if mstep is not None:
                    mirrors[role] = holder
                    lags[role] = max(0, (resume - 1) - int(mstep))
        return list(plan_recovery(
            sorted(rec.lost.values()), S, replicas=R, strategy=self.ctx.cfg.ft, mirrors=mirrors, mirror_lag=lags,
            checkpoint_step=self.host.last_checkpoint, swap_edges=swap_schedule_on(self.ctx.cfg.ft),
        ))

    # -- elastic reshapes (ft.elastic) -----------------------------------------------------------

    def _elastic(self) -> bool:
        return self.ctx.cfg.ft.elastic and self.host.node_plan is None and self.host.shape is not None

    def _reshaped(self) -> bool:
        """ft.elastic: whether the shape in force is not the configured one (other stages, blocks
        or replicas), where only a reshape can recover a loss."""
        if not self._elastic():
            return False
        from spotpipe.model.partition import partition_layers

        p, shape = self.ctx.cfg.pipeline, self.host.shape
        configured = tuple(tuple(span) for span in partition_layers(self.ctx.cfg.model.layers, p.stages))
        return shape.replicas != p.replicas or tuple(tuple(span) for span in shape.layers) != configured

    def _cost(self) -> Any:
        """The policy's cost model (:func:`spotpipe.ft.elastic.elastic_cost`), its time per block
        scaled so that the shape in force costs its measured median step: the decisions compare
        shapes by their predicted steps, and the lines print seconds a user can check."""
        from spotpipe.ft.elastic import elastic_cost, step_seconds

        cost = elastic_cost(self.ctx.cfg)
        measured, shape = self.host.steady_step_s(), self.host.shape
        predicted = step_seconds(shape, cost) if shape is not None else 0.0
        return replace(cost, layer_s=cost.layer_s * measured / predicted) if measured and predicted > 0 else cost

    def _live_spares(self, warm: bool = False) -> list[int]:
        """Spares whose process (where local) still runs; with ``warm``, only those that said they
        are warm (:func:`spotpipe.runtime.protocol.spare_warm_key`)."""
        live = [w.worker for w in self.members.spares if w.local is None or w.local.returncode() is None]
        return [w for w in live if self.ctx.store.check([protocol.spare_warm_key(w)])] if warm else live

    def _shape_now(self, rec: Recovery, spares: bool = True) -> Any:
        """The shape in force with ``rec``'s lost workers in their positions; spares that already
        took a lost role, and (``spares``) the live spares, stand by."""
        from spotpipe.runtime.control.reshape import shape_now

        shape = self.host.shape
        lost_roles = set(rec.lost.values())
        took = [w for role, w in self.members.role_of.items() if role in lost_roles and w not in rec.lost]
        return shape_now(shape.layers, shape.replicas, self.members.role_of, rec.lost,
                         (self._live_spares() if spares else []) + took)

    def _reshape(self, rec: Recovery, resume: int, status: dict[int, Any]) -> bool:
        """Shrink after a loss, or grow with the spares (``rec.grow``), as
        :func:`spotpipe.ft.elastic.next_shape` decides; False (and ``rec.no_shrink`` says why) when
        no other shape runs, or a lost worker's blocks have no exact copy.

        The new shape's roles replace the role table (workers it leaves out stand by as spares),
        and the next generation carries out the record of
        :func:`spotpipe.runtime.control.reshape.reshape_record`: the blocks move peer to peer and
        step ``resume`` replays with the same data."""
        from spotpipe.ft.elastic import limits_from, next_shape
        from spotpipe.ft.policy import uses_mirrors
        from spotpipe.runtime.control.reshape import block_sources, reshape_record

        cfg = self.ctx.cfg
        current = self._shape_now(rec, spares=not rec.grow)
        joined = self._live_spares(warm=True) if rec.grow else []  # a grow names them as workers that joined
        decision = next_shape(current, sorted(rec.lost), joined, self._cost(), limits_from(cfg))
        moves: list[dict[str, Any]] | None = None
        why = decision.why
        if decision.kind in ("shrink", "replace", "grow") and (decision.kind == "grow") == rec.grow:
            steps = {w: st.get("mirror_step") for w, st in status.items()}
            moves, no_copy = block_sources(decision, sorted(rec.lost), steps, resume, uses_mirrors(cfg.ft))
            why = f"{why}; {no_copy}" if moves is None else why
        if moves is None:
            rec.no_shrink = why
            if not rec.grow:
                self.ctx.event(ev.RESHAPE, kind="wait", why=why, generation=rec.generation + 1, resume_step=resume,
                               **{"from": current.label, "to": current.label})
                self.ctx.progress.message(f"elastic: {why}")
            return False
        sampler = next(iter(status.values()))["sampler"] if status else None
        p = cfg.pipeline
        rec.record = reshape_record(decision, moves, resume, sampler, p.replicas * p.microbatches, sorted(rec.lost))
        rec.decision, rec.plans, rec.outcome, rec.resume_step = decision, [], "continue", resume
        if rec.lost:
            self.ctx.event(ev.RECOVERY_STARTED, stage=-1, replica=-1, strategy="reshape", why=decision.why,
                           generation=rec.generation + 1, resume_step=resume, exact=True, replanned=rec.phase == "replace")
        self.members.reshape(decision.to_shape, rec.lost)
        self.host.shape = decision.to_shape
        self.host.plan = None
        rec.phase = "replace"
        self.ctx.progress.message(f"elastic: {decision.why}; {len(moves)} block move(s)")
        return True

    def _nothing_to_do(self, rec: Recovery, resume: int, status: dict[int, Any]) -> None:
        """A grow that found no better shape after its generation was aborted: the same roles play
        the next generation, which replays step ``resume``."""
        sampler = next(iter(status.values()))["sampler"] if status else None
        rec.record = {"outcome": "continue", "resume_step": resume, "sampler": sampler, "plans": []}
        rec.plans, rec.resume_step, rec.grow = [], resume, False
        self.host.plan = None
        rec.phase = "replace"

    def _finish_plan(self, rec: Recovery, plans: list[Any], resume: int, status: dict[int, Any]) -> None:
        """Record the decision, free the lost roles and ask for a replacement of each."""
        from spotpipe.ft.policy import job_outcome

        rec.plans = list(plans)
        rec.outcome = job_outcome(plans)
        for p in plans:
            self.ctx.event(ev.RECOVERY_STARTED, stage=p.stage, replica=p.replica, strategy=p.strategy, why=p.why,
                         generation=rec.generation + 1, resume_step=resume, exact=p.exact, replanned=rec.phase == "replace")
        if rec.outcome == "stop":
            self.host.fail(Failure(None, f"cannot recover: {plans[0].why}", FailureKind(1), time.time()))
            return
        sampler = next(iter(status.values()))["sampler"] if status else None
        rec.record = {"outcome": rec.outcome, "resume_step": resume, "sampler": sampler}
        rec.resume_step = resume
        if rec.outcome == "rollback":
            rec.record["checkpoint"] = self.host.last_manifest.to_grant()
            rec.resume_step = self.host.last_manifest.step + 1
        for wid, role in rec.lost.items():
            if self.members.role_of.get(role) == wid:
                del self.members.role_of[role]
        self.host.plan = None
        rec.phase = "replace"
        new_roles = sorted(set(rec.lost.values()) - rec.replaced)
        rec.replaced |= set(new_roles)
        taken = sum(1 for role in new_roles if self.members.take_spare(*role))
        # ft.elastic: a lost role that no spare covers waits ft.replace_wait_s for a joiner, then
        # the job shrinks; only when no smaller shape runs is a replacement started here.
        starts = len(new_roles) if not self._elastic() or rec.no_shrink else taken
        if self.ctx.locals is not None and self.host.local_count > 0 and starts:
            self.ctx.locals.start(starts)  # the replacements that no spare covered, or new spares
        self.ctx.progress.message(
            f"lost {', '.join(self.members.workers[w].name() for w in sorted(rec.lost))}: "
            f"{'rolling back to the checkpoint of step ' + str(self.host.last_manifest.step) if rec.outcome == 'rollback' else 'recovering by ' + '/'.join(sorted({p.strategy for p in plans}))}"
            f"; {taken} spare{'s' if taken != 1 else ''} took over, starting {starts} new process{'es' if starts != 1 else ''}"
            + (f"; a role left waits ft.replace_wait_s = {self.ctx.cfg.ft.replace_wait_s:g} s for a worker to join, then "
               "the job shrinks" if taken + starts < len(new_roles) else "")
        )

    def _replan(self, rec: Recovery, plan: NodePlan, nodes: list[int], resume: int, status: dict[int, Any]) -> None:
        """Go on without the lost SkipPipe nodes: their roles leave the job, the next generation
        plays ``plan`` (paths over the nodes left) and replays step ``resume`` with the same data;
        no state moves and no process starts (:func:`spotpipe.runtime.control.nodeplan.replan_without`)."""
        from spotpipe.ft.strategies.base import RecoveryPlan

        start = plan.start_groups
        stage_of = {n: s for s, g in enumerate(start) for n in g}
        rec.plans = [RecoveryPlan(n, 0, "replan", f"node {n} of stage {stage_of[n]} lost; stage {stage_of[n]} keeps "
                                  f"{len(plan.groups[stage_of[n]])} node(s): paths planned again over the {sum(map(len, plan.groups))} "
                                  f"nodes left, same microbatches, no rollback") for n in nodes]
        rec.outcome = "continue"
        for p in rec.plans:
            self.ctx.event(ev.RECOVERY_STARTED, stage=p.stage, replica=p.replica, strategy=p.strategy, why=p.why,
                           generation=rec.generation + 1, resume_step=resume, exact=False, replanned=rec.phase == "replace")
        sampler = next(iter(status.values()))["sampler"] if status else None
        rec.record = {"outcome": "continue", "resume_step": resume, "sampler": sampler, "plans": []}
        rec.resume_step = resume
        self.members.drop_roles([(n, 0) for n in nodes])
        self.host.node_plan = plan
        self.host.plan = None
        rec.phase = "replace"
        self.ctx.progress.message(
            f"lost {', '.join(self.members.workers[w].name() for w in sorted(rec.lost))}: paths planned again over "
            f"{sum(map(len, plan.groups))} nodes (simulated {plan.predicted_s['train']:.3g} s per iteration); no process started")

    def grow(self) -> bool:
        """Take a SkipPipe node that was planned around back with a waiting spare (or a worker that
        joined): the node whose stage has the fewest nodes now; its paths are planned again over
        the nodes with it; the generation is aborted at once (the step in flight replays), and the
        next one copies the state of a live node of its stage into the spare (``replica``: the
        nodes of a stage hold the same state). Nothing is done without a spare, an absent node,
        or a plan that takes it.

        Returns:
            True when a grow started.
        """
        from spotpipe.runtime.control.nodeplan import absent_nodes, replan_without

        if self._elastic():
            return self._elastic_grow()
        plan = self.host.node_plan
        if plan is None or self.recovering is not None or not self.members.live_spares():
            return False
        absent = absent_nodes(plan)
        if not absent or tuple(sorted(absent)) in self._unplaceable:
            return False
        stage_of = {n: s for s, g in enumerate(plan.start_groups) for n in g}
        node = min(absent, key=lambda n: (len(plan.groups[stage_of[n]]), n))
        grown, why = replan_without(self.ctx.cfg, plan, absent - {node})
        if grown is None:
            self._unplaceable.add(tuple(sorted(absent)))
            self.ctx.progress.message(f"a spare waits, but node {node} cannot be taken back: {why}")
            return False
        rec = self.recovering = Recovery(self.host.generation, self.clock(), time.time())
        rec.joined, rec.grown, rec.peer = (node, 0), grown, plan.groups[stage_of[node]][0]
        rec.reason = f"node {node} (stage {stage_of[node]}) joins again"
        self.ctx.store.set(protocol.abort_key(self.host.generation), rec.reason)
        return True

    def _elastic_grow(self) -> bool:
        """``ft.elastic``: when warm spares wait (joiners, or workers a shrink left standing by) and
        :func:`spotpipe.ft.elastic.next_shape` finds a faster shape with them, end the generation at
        a step boundary (``gen/<g>/leave``: no step in flight is lost) and reshape (:meth:`_reshape`).
        A shape that was found no faster is not tried again until the spares or the shape change.

        Returns:
            True when a grow started.
        """
        from spotpipe.ft.elastic import limits_from, next_shape

        if self.recovering is not None or not self.members.live_spares():
            return False
        probe = Recovery(self.host.generation, self.clock(), time.time())
        current, spares = self._shape_now(probe, spares=False), self._live_spares(warm=True)
        key = (current.workers, tuple(spares))
        if not spares or key in self._unplaceable or len(current.active) >= self.ctx.cfg.pipeline.stages * self.ctx.cfg.pipeline.replicas:  # grown back in full
            return False
        decision = next_shape(current, [], spares, self._cost(), limits_from(self.ctx.cfg))
        if decision.kind != "grow":
            self._unplaceable.add(key)
            self.ctx.progress.message(f"elastic: the job stays {current.label}: {decision.why}")
            return False
        probe.grow, probe.reason = True, f"{decision.why.split(':')[0]}: grow {current.label} -> {decision.to_shape.label}"
        self.recovering = probe
        # At a step boundary, not in the middle of a step: every member has committed the step
        # before next_step + 1 when it starts next_step + 2, so each reads the key before that
        # step and none is left computing (:meth:`_recovery_collect` aborts one that is).
        self.ctx.store.set(protocol.leave_key(self.host.generation), str(self.host.next_step + 2))
        return True

    def _take_back(self, rec: Recovery, resume: int, status: dict[int, Any]) -> None:
        """The decision of a grow (:meth:`grow`): the spare takes the node's role and copies its
        stage's state from ``rec.peer``; the next generation plays the grown plan."""
        from spotpipe.ft.strategies.base import RecoveryPlan

        assert rec.joined is not None and rec.grown is not None
        node = rec.joined[0]
        old = self.host.node_plan
        self.members.add_role(rec.joined)
        self.host.node_plan = rec.grown  # the spare's grant carries it
        if not self.members.take_spare(*rec.joined):  # the spare is gone: go on as before
            self.members.drop_roles([rec.joined])
            self.host.node_plan = old
            rec.plans, rec.joined = [], None
        else:
            stage = next(s for s, g in enumerate(rec.grown.groups) if node in g)
            rec.plans = [RecoveryPlan(node, 0, "replica", f"node {node} of stage {stage} joins again: it copies node "
                                      f"{rec.peer}'s state (same stage); paths planned again over "
                                      f"{sum(map(len, rec.grown.groups))} nodes", sources=((rec.peer, 0),), exact=True)]
            if self.ctx.locals is not None and self.host.local_count > 0 and self.members.spare_count:
                self.ctx.locals.start(1)  # keep a warm spare
        sampler = next(iter(status.values()))["sampler"] if status else None
        rec.record = {"outcome": "continue", "resume_step": resume, "sampler": sampler}
        rec.resume_step = resume
        self.host.plan = None
        rec.phase = "replace"

    def _recovery_replace(self, rec: Recovery) -> None:
        if len(self.members.role_of) < self.members.world_size:
            waited = self.clock() - max(rec.started, rec.waiting_since)
            if (self._elastic() and rec.decision is None and not rec.no_shrink and rec.lost
                    and waited >= self.ctx.cfg.ft.replace_wait_s):
                resume = int(rec.record["resume_step"])
                if self._reshape(rec, resume, {w: st for w, st in rec.status.items() if w not in rec.lost}):
                    return
                if self.ctx.locals is not None and self.host.local_count > 0:  # no smaller shape runs: replace
                    self.ctx.locals.start(self.members.world_size - len(self.members.role_of))
            self._timed_out(rec, "replacement workers to join")
            return
        lost_roles = (set(rec.lost.values()) | ({rec.joined} if rec.joined else set())) & set(self.members.roles)  # a re-planned node's role left the job
        rec.new_workers = {role: self.members.role_of[role] for role in lost_roles}
        if rec.decision is not None:  # a reshape: its new workers are the spares and joiners it placed
            joined = set(rec.record["new_workers"])
            rec.new_workers = {role: w for role, w in self.members.role_of.items() if w in joined}
        plans = []
        for p in rec.plans:
            if not rebuilds(p):
                continue
            plans.append({"worker": rec.new_workers[p.worker], "stage": p.stage, "replica": p.replica, "strategy": p.strategy,
                          "sources": [self.members.role_of[src] for src in p.sources], "lr_scale": p.lr_scale})
        rec.record["plans"] = plans
        rec.record["new_workers"] = sorted(rec.new_workers.values())
        self.ctx.store.set(protocol.recovery_key(self.host.generation + 1), json.dumps(rec.record))
        self.host.next_step = rec.resume_step
        self.host.publish_generation("recovery: " + rec.reason[:200])
        rec.new_generation = self.host.generation
        rec.phase = "install"

    def _reshape_done(self, rec: Recovery, done: dict[int, Any], seconds: float) -> None:
        """Every member installed the new shape: the ``reshape`` event, the replayed step, one line."""
        d = rec.decision
        moved = sum(int(x.get("bytes", 0)) for x in done.values())
        transfer_s = max([float(x.get("transfer_s", 0.0)) for x in done.values()] or [0.0])
        self.ctx.event(ev.RESHAPE, kind=d.kind, why=d.why, bytes=moved, seconds=seconds, transfer_s=transfer_s,
                       generation=rec.new_generation, resume_step=rec.resume_step, workers=len(d.to_shape.active),
                       predicted_step_s=d.after_s, lost=sorted(rec.lost), **{"from": d.from_shape.label, "to": d.to_shape.label})
        if rec.resume_step < self.ctx.cfg.train.steps:
            self.ctx.event(ev.STEP_REPLAYED, step=rec.resume_step, generation=rec.new_generation)
        self.ctx.progress.message(f"{ {'shrink': 'shrank', 'grow': 'grew'}.get(d.kind, 'standbys took the lost positions:')} {d.from_shape.label} -> {d.to_shape.label} "
                                  f"in {seconds:.2f} s ({moved / 1e6:.2f} MB of blocks moved); generation "
                                  f"{rec.new_generation} replays step {rec.resume_step + 1}")
        if rec.lost:
            self.recoveries.append({"strategy": "reshape", "seconds": seconds, "bytes": moved, "resume_step": rec.resume_step})
        self.host.restart_step_clock()
        self.recovering = None

    def _recovery_install(self, rec: Recovery) -> None:
        keys = [protocol.recovered_key(rec.new_generation, m.worker) for m in self.host.plan.members]
        if not self.ctx.store.check(keys):
            if not (self._install_failed_without_a_loss(rec) or self._new_worker_silent(rec)):
                self._timed_out(rec, "the new generation to install the recovered state")
            return
        done = {m.worker: json.loads(raw) for m, raw in zip(self.host.plan.members, self.ctx.store.multi_get(keys))}
        seconds = self.clock() - rec.started
        moved = sum(int(d.get("bytes", 0)) for w, d in done.items() if w in rec.new_workers.values())
        if rec.decision is not None:
            self._reshape_done(rec, done, seconds)
            return
        for p in rec.plans:
            target = rec.new_workers.get(p.worker)
            got = int(done.get(target, {}).get("bytes", 0)) if target is not None else 0
            transfer_s = float(done.get(target, {}).get("transfer_s", 0.0)) if target is not None else 0.0
            if rec.joined is not None:  # a grow is no recovery from a failure
                assert rec.grown is not None
                self.ctx.event(ev.RESHAPE, kind="grow", node=p.stage, why=p.why, bytes=got, seconds=seconds,
                               transfer_s=transfer_s, worker=target, generation=rec.new_generation,
                               nodes=sum(map(len, rec.grown.groups)), groups=[list(g) for g in rec.grown.groups])
                continue
            self.ctx.event(ev.RECOVERY_FINISHED, stage=p.stage, replica=p.replica, strategy=p.strategy, why=p.why, bytes=got,
                         seconds=seconds, transfer_s=transfer_s, worker=target, generation=rec.new_generation, exact=p.exact)
        replayed = list(range(rec.resume_step, rec.record["resume_step"] + 1))
        for step in replayed:
            if step < self.ctx.cfg.train.steps:
                self.ctx.event(ev.STEP_REPLAYED, step=step, generation=rec.new_generation)
        what = "/".join(sorted({p.strategy for p in rec.plans}))
        if rec.joined is not None or not rec.lost:  # a grow: no failure
            self.ctx.progress.message(
                f"{rec.reason}: {'its state copied' if rec.plans else 'no spare took it'} in {seconds:.2f} s "
                f"({moved / 1e6:.2f} MB moved); generation {rec.new_generation} replays step {rec.resume_step + 1}")
        else:
            self.ctx.progress.message(
                f"recovered {len(rec.lost)} lost worker{'s' if len(rec.lost) > 1 else ''} by {what} in {seconds:.2f} s "
                f"({moved / 1e6:.2f} MB moved); generation {rec.new_generation} replays step {rec.resume_step + 1}"
            )
            self.recoveries.append({"strategy": what, "seconds": seconds, "bytes": moved, "resume_step": rec.resume_step})
        self.host.restart_step_clock()  # the replayed step's time starts now, not at the failure
        self.recovering = None
