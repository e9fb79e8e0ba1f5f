"""A whole simulated training job: steps, checkpoints, failures, detection and recovery.

:func:`prepare` turns a :class:`~spotpipe.config.JobConfig` into what the simulation needs (the
lowered schedule the runtime plays, from the same builder :func:`spotpipe.schedule.build.job_schedule`,
CheckFree+ swapped paths included; a cost model; the cluster). :func:`simulate_job` then
runs ``train.steps`` steps on the discrete-event :class:`~spotpipe.sim.engine.Engine`:

* a step lasts one played iteration (:func:`~spotpipe.sim.player.play_iteration`, replayed only
  when the placement changes the cluster: a node in another location or of another speed);
* every ``train.checkpoint_every`` steps the job writes a checkpoint for ``sim.checkpoint_write_s``;
* a node failure interrupts the running step (steps are atomic: DESIGN.md), the detector of
  :mod:`spotpipe.sim.recovery` finds it, the recovery policy decides, lost positions take idle
  nodes (spares, replacements arriving ``sim.replace_s`` after a failure, or trace ``add``
  nodes), the job restarts and replays from the step the policy chose.

Losses are grouped into recoveries by the controller's own rules of :mod:`spotpipe.ft.confirm`,
so the simulator measures the confirmation that ships, not an idealised one: a confirmed loss
starts a recovery or joins the one in progress by its phase (:func:`~spotpipe.ft.confirm.loss_action`;
``collect`` until planned, ``replace`` while lost positions wait for nodes, ``install`` while the
job restarts), and a collecting recovery is planned only once the grouping window
(:data:`~spotpipe.ft.confirm.GROUPING_WINDOW_S`) after its last loss has closed and no dead member
is still unconfirmed (:func:`~spotpipe.ft.confirm.collect_step`). So two losses confirmed 0.1 s
apart are one recovery, as in the runtime, and every recovery starts at least the window after
its last loss. Survivors are taken to report the step they aborted at once.

It writes the same events as the runtime (:mod:`spotpipe.events`) with ``t`` in virtual seconds
since the start, and reports the effective training time ratio (ETTR: time spent in steps that
count / wall time; Kokolis et al. 2025).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spotpipe import events as ev
from spotpipe.config import JobConfig
from spotpipe.cost import CostModel, analytic_cost, fit_scale_and_overhead, read_profile
from spotpipe.events import EventLog
from spotpipe.ft.confirm import (
    CollectStep,
    Failure,
    FailureKind,
    LossAction,
    RecoveryPhase,
    better_explanation,
    collect_step,
    loss_action,
    plan_at,
    starts_recovery,
)
from spotpipe.ft.detector import detect as ft_detect
from spotpipe.schedule.build import job_schedule
from spotpipe.schedule.ir import Placement, Schedule
from spotpipe.sim.cluster import JOIN, Cluster, NodeEvent, PoissonFailures, build_cluster, parse_failures, read_preemption_trace
from spotpipe.sim.engine import Engine, Timer
from spotpipe.fsutil import resolve_path
from spotpipe.network import Network, build_network
from spotpipe.sim.player import IterationResult, play_iteration
from spotpipe.sim.recovery import Detector, FailureContext, RecoveryDecision, RecoveryPolicy, build_policy, detection_time


@dataclass(frozen=True)
class SimSetup:
    """Everything a simulation of one job needs."""

    config: JobConfig
    schedule: Schedule
    cost: CostModel
    cluster: Cluster
    base_dir: str | None = None


def profiled_cost(cfg: JobConfig, events_paths: Sequence[str | Path]) -> CostModel:
    """Analytic costs scaled, plus a fixed per-step overhead, so that simulating the profiled runs
    gives their measured step times (:func:`spotpipe.cost.fit_scale_and_overhead`). The overhead
    is the runtime's measured time outside the compute phase (``step_time - compute_s``) when its
    events carry ``compute_s``, else fitted from 2+ runs that differ in work, else 0.

    Each profiled run's own config (from its ``run_start`` event) is simulated with this job's
    ``[sim]`` section (device, ``host_cores``, ``delay_collectives``) and its own ``[network]``.

    Args:
        cfg: The job to simulate (its ``[sim]`` section is applied to each profiled run).
        events_paths: ``events.jsonl`` files of ``spotpipe train`` runs (``sim.profile``).

    Returns:
        The analytic cost model of ``cfg`` with its compute times scaled and the per-step
        overhead (seconds) set.

    Raises:
        SpotpipeError: for a missing events file, or one without a config or steps.
    """
    profiles = [read_profile(p) for p in events_paths]
    runs = []
    for prof in profiles:
        pcfg = replace(prof.config, sim=cfg.sim)
        p = pcfg.pipeline
        net = build_network(pcfg.network, p.stages, p.stages * p.replicas)
        runs.append((job_schedule(pcfg), analytic_cost(pcfg).with_overhead(0.0), net, Placement.dense(p.stages, p.replicas)))

    def simulate(factor: float) -> list[float]:
        return [
            play_iteration(
                sched, base.scaled(factor), net, placement,
                collectives=cfg.sim.delay_collectives, host_cores=cfg.sim.host_cores,
            ).iteration_s
            for sched, base, net, placement in runs
        ]

    measured_overheads = [prof.overhead_s for prof in profiles]
    known = None if any(o is None for o in measured_overheads) else sum(o or 0.0 for o in measured_overheads) / len(profiles)
    factor, overhead = fit_scale_and_overhead([prof.step_time for prof in profiles], simulate, known)
    names = ",".join(str(p) for p in events_paths)
    return analytic_cost(cfg).scaled(factor, source=f"profiled:{names}").with_overhead(overhead)


def prepare(cfg: JobConfig, base_dir: str | Path | None = None) -> SimSetup:
    """Schedule, cost model and cluster of a job config (errors are one-line ConfigErrors).

    Args:
        cfg: A validated job config.
        base_dir: Folder that relative paths (``sim.profile``, traces, matrices) are read from;
            ``None``: the current one.

    Returns:
        A :class:`SimSetup` for :func:`simulate_job`.

    Raises:
        ConfigError: for a setting the schedule builder, the cost model or the cluster refuses.
    """
    schedule = job_schedule(cfg)
    if cfg.sim.profile:
        cost = profiled_cost(cfg, [resolve_path(p, base_dir) for p in cfg.sim.profile])
    else:
        cost = analytic_cost(cfg)
    cluster = build_cluster(cfg, base_dir)
    return SimSetup(cfg, schedule, cost, cluster, None if base_dir is None else str(base_dir))


@dataclass(frozen=True)
class JobResult:
    """Outcome of a simulated job (times in virtual seconds).

    Attributes:
        status: ``finished``, ``failed`` (the policy stopped it) or ``interrupted`` (time limit).
        steps: Steps committed at the end.
        wall_s: Virtual time at the end.
        step_time_s: Iteration time of the initial (healthy) placement.
        iteration: The initial placement's played iteration.
        failures: Worker failures detected.
        spare_failures: Failures of idle nodes (no effect on training).
        restarts: Recoveries completed.
        replayed_steps: Committed steps thrown away by rollbacks.
        checkpoints: Checkpoints written.
        productive_s: Time spent in steps that were committed and kept.
        ettr: ``productive_s / wall_s``.
        generations: Membership generations (1 + restarts).
    """

    status: str
    steps: int
    wall_s: float
    step_time_s: float
    iteration: IterationResult
    failures: int = 0
    spare_failures: int = 0
    restarts: int = 0
    replayed_steps: int = 0
    checkpoints: int = 0
    productive_s: float = 0.0
    ettr: float = 1.0
    generations: int = 1


class _Job:
    """The job's state machine on the engine (internal; see :func:`simulate_job`)."""

    def __init__(
        self,
        setup: SimSetup,
        log: EventLog | None,
        policy: RecoveryPolicy,
        detector: Detector,
        record: bool,
    ) -> None:
        self.setup = setup
        self.cfg = setup.config
        self.log = log
        self.policy = policy
        self.detector = detector
        self.record = record
        c = setup.cluster
        self.ranks, self.replicas = c.ranks, c.replicas
        self.engine = Engine()
        net = c.network
        self.locations: list[str] = list(net.node_locations) if net.node_locations else ["local"] * net.num_nodes
        self.speeds: list[float] = list(c.speeds)
        self.generic: set[int] = set()  # joined nodes: take the location/speed of what they replace
        self.slots: list[int] = list(range(c.workers))  # slot = replica * ranks + rank -> node
        self.slot_of: dict[int, int] = {n: w for w, n in enumerate(self.slots)}
        self.pool: deque[int] = deque(c.spares)
        self.dead: set[int] = set()
        self.lost: dict[int, tuple[int, float]] = {}  # slot -> (dead node, failed_at)
        self.undetected: set[int] = set()
        self.decision: RecoveryDecision | None = None
        self.recovery: RecoveryPhase | None = None  # the phase of the recovery in progress, as the controller's
        self.last_loss_at = 0.0  # when the recovery's last loss was confirmed
        self.failure: Failure | None = None  # why the job stopped, if it did (the best explanation)
        self.cache: dict[tuple[Any, ...], IterationResult] = {}
        self.step = 0
        self.checkpoint_step: int | None = None
        self.generation = 0
        self.phase = "running"
        self.timer: Timer | None = None
        self.step_started = 0.0
        self.kept: list[float] = []  # duration of every committed step, in order (for rollbacks)
        self.counts = {"failures": 0, "spare_failures": 0, "restarts": 0, "replayed": 0, "checkpoints": 0}
        self.trace_mode = bool(self.cfg.sim.failure_trace)
        self.poisson = PoissonFailures(self.cfg.sim.failure_rate, self.cfg.sim.seed) if self.cfg.sim.failure_rate > 0 else None
        self.status = "finished"
        self.first: IterationResult | None = None
        tokens = self.cfg.train.batch_size * self.cfg.model.context
        self.tokens_per_step = tokens

    # -- helpers -----------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.write(event, t=self.engine.now, **fields)

    def position(self, slot: int) -> tuple[int, int]:
        return slot % self.ranks, slot // self.ranks

    def iteration(self) -> IterationResult:
        """The iteration of the current placement (cached by per-slot location and speed)."""
        locs = tuple(self.locations[n] for n in self.slots)
        speeds = tuple(self.speeds[n] for n in self.slots)
        key = (locs, speeds)
        result = self.cache.get(key)
        if result is None:
            base = self.setup.cluster.network
            net = Network(len(self.slots), base.local, base.matrix, locs if base.matrix is not None else ())
            placement = Placement.dense(self.ranks, self.replicas)
            record = self.record and self.first is None
            result = play_iteration(
                self.setup.schedule, self.setup.cost, net, placement, speeds, record=record,
                collectives=self.cfg.sim.delay_collectives, host_cores=self.cfg.sim.host_cores,
            )
            self.cache[key] = result
        if self.first is None:
            self.first = result
        return result

    def new_node(self) -> int:
        node = len(self.locations)
        self.locations.append("?")
        self.speeds.append(1.0)
        self.generic.add(node)
        return node

    def schedule_poisson(self, node: int) -> None:
        if self.poisson is not None:
            t = self.poisson.next_failure(self.engine.now)
            if math.isfinite(t):
                self.engine.at(t, self.fail, node)

    # -- steps and checkpoints ---------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        self.emit(ev.RUN_START, name=cfg.run.name or "sim", config=dataclasses.asdict(cfg), world=len(self.slots), mode="sim")
        for w, node in enumerate(self.slots):
            rank, replica = self.position(w)
            self.emit(ev.WORKER_START, worker=node, stage=rank, replica=replica, pid=None, generation=0, host=self.locations[node])
        self.emit(ev.GENERATION, generation=0, workers=list(self.slots), reason="start")
        for node in range(len(self.locations)):
            self.schedule_poisson(node)
        self.begin_step()

    def begin_step(self) -> None:
        self.phase = "running"
        self.step_started = self.engine.now
        self.timer = self.engine.after(self.iteration().iteration_s, self.end_step, cancellable=True)

    def end_step(self) -> None:
        duration = self.engine.now - self.step_started
        self.step += 1
        del self.kept[self.step - 1 :]
        self.kept.append(duration)
        # Step indices in events are 0-based, as the runtime writes them.
        self.emit(ev.STEP, step=self.step - 1, tokens=self.tokens_per_step, step_time=duration, wall=self.engine.now, generation=self.generation)
        every = self.cfg.train.checkpoint_every
        if self.step >= self.cfg.train.steps:
            self.finish("finished")
        elif every and self.step % every == 0:
            self.phase = "checkpoint"
            self.timer = self.engine.after(self.cfg.sim.checkpoint_write_s, self.end_checkpoint, cancellable=True)
        else:
            self.begin_step()

    def end_checkpoint(self) -> None:
        self.checkpoint_step = self.step
        self.counts["checkpoints"] += 1
        self.emit(ev.CHECKPOINT, step=self.step - 1, path="(simulated)", seconds=self.cfg.sim.checkpoint_write_s)
        self.begin_step()

    def finish(self, status: str) -> None:
        self.status = status
        self.phase = "done"
        reason = self.failure.reason if status == "failed" and self.failure is not None else None
        self.emit(ev.RUN_END, steps=self.step, wall=self.engine.now, status=status, reason=reason)
        self.engine.stop()

    # -- failures and recovery ---------------------------------------------------------------

    def node_event(self, event: NodeEvent, alias: dict[int, int]) -> None:
        if event.kind == JOIN:
            alias[event.node] = self.new_node()
            self.join(alias[event.node])
        else:
            self.fail(alias.get(event.node, event.node))

    def fail(self, node: int) -> None:
        if self.phase == "done" or node in self.dead or node >= len(self.locations):
            return
        self.dead.add(node)
        now = self.engine.now
        if not self.trace_mode and math.isfinite(self.cfg.sim.replace_s):
            self.engine.after(self.cfg.sim.replace_s, self.replacement_arrives)
        if node not in self.slot_of:
            if node in self.pool:
                self.pool.remove(node)
            self.counts["spare_failures"] += 1
            return
        slot = self.slot_of[node]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # A checkpoint being written is lost with the step: checkpoint_step stays.
        self.phase = "down"
        self.lost[slot] = (node, now)
        self.undetected.add(node)
        alive = {n: 0.0 for n in self.slots if n not in self.dead}
        when, reason = detection_time(node, now, alive, self.cfg.run.heartbeat_s, self.cfg.ft, self.detector,
                                      run_timeout_s=self.cfg.run.timeout_s)
        self.engine.at(when, self.detected, node, reason)

    def detected(self, node: int, reason: str) -> None:
        """The loss of ``node`` is confirmed: it starts a recovery or joins the one in progress
        (:func:`spotpipe.ft.confirm.loss_action`), as the controller's supervisor does.

        Args:
            node: The dead node, still in its slot.
            reason: The detector's reason, for the events.
        """
        if self.phase == "done":
            return
        now = self.engine.now
        self.undetected.discard(node)
        rank, replica = self.position(self.slot_of[node])
        self.counts["failures"] += 1
        self.emit(ev.FAILURE_SUSPECTED, worker=node, stage=rank, replica=replica, reason=reason)
        self.emit(ev.FAILURE_CONFIRMED, worker=node, stage=rank, replica=replica, reason=reason)
        failure = Failure(node, reason, FailureKind.SILENCE, now)  # a dead node falls silent
        if not starts_recovery(failure):  # pragma: no cover - silence always starts one
            self.stop(failure)
            return
        action = loss_action(self.recovery, already_lost=False)
        if action is LossAction.IGNORE:  # pragma: no cover - every node is confirmed once
            return
        self.last_loss_at = now
        if action is LossAction.REPLAN:  # lost positions were waiting for nodes: plan again at once
            self.plan(replanned=True)
            return
        # START, JOIN, or RESTART (the restart was cancelled when the node died): collect until
        # the grouping window after this loss has closed.
        self.recovery = "collect"
        self.engine.at(plan_at(now), self.collect)

    def collect(self) -> None:
        """Plan the collecting recovery if :func:`spotpipe.ft.confirm.collect_step` says so; a
        later loss or a pending confirmation schedules its own check."""
        if self.phase == "done" or self.recovery != "collect":
            return
        if collect_step(self.last_loss_at, self.engine.now, outstanding=bool(self.undetected)) is CollectStep.PLAN:
            self.plan(replanned=False)

    def plan(self, replanned: bool) -> None:
        """Ask the policy about every lost position (one ``recovery_started`` each, as the
        controller writes one per plan), then give them nodes, or stop the job.

        Args:
            replanned: A loss arrived while the positions waited for nodes (the controller's
                ``replace`` phase): the decision is taken again with it.
        """
        first_failed = min(t for _, t in self.lost.values())
        ctx = FailureContext(
            now=self.engine.now,
            failed_at=first_failed,
            lost=tuple(self.position(s) for s in sorted(self.lost)),
            lost_nodes=tuple(n for n, _ in (self.lost[s] for s in sorted(self.lost))),
            step=self.step,
            checkpoint_step=self.checkpoint_step,
            free_nodes=len(self.pool),
            config=self.cfg,
            locations=tuple(self.locations[n] for n in self.slots),
        )
        decision = self.policy.decide(ctx)
        if self.decision is not None:  # an earlier failure of the same outage: the deeper rollback wins
            decision = replace(decision, resume_step=min(decision.resume_step, self.decision.resume_step))
        self.decision = decision
        for rank, replica in ctx.lost:
            self.emit(ev.RECOVERY_STARTED, stage=rank, replica=replica, strategy=decision.strategy, why=decision.why,
                      resume_step=decision.resume_step, replanned=replanned)
        if decision.stop:
            self.stop(Failure(None, f"cannot recover: {decision.why}", FailureKind.WORKER_ERROR, self.engine.now))
            return
        self.recovery = "replace"
        self.try_restart()

    def stop(self, failure: Failure) -> None:
        """End the job as failed; of the failures seen the best explanation is its reason
        (:func:`spotpipe.ft.confirm.better_explanation`, as the controller reports it).

        Args:
            failure: Why, e.g. the policy's reason that nothing can be rebuilt.
        """
        self.failure = better_explanation(self.failure, failure)
        self.finish("failed")

    def replacement_arrives(self) -> None:
        node = self.new_node()
        self.join(node)

    def join(self, node: int) -> None:
        self.pool.append(node)
        self.schedule_poisson(node)
        if self.phase == "waiting":
            self.try_restart()

    def try_restart(self) -> None:
        """Give every lost position a node and restart, or wait for nodes (``replace``)."""
        if self.phase == "done" or self.undetected or self.decision is None or self.recovery != "replace":
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        vacant = [s for s in sorted(self.lost) if self.slots[s] in self.dead]
        if len(self.pool) < len(vacant):
            self.phase = "waiting"
            return
        for s in vacant:
            old = self.slots[s]
            node = self.pool.popleft()
            if node in self.generic:
                self.locations[node] = self.locations[old]
                self.speeds[node] = self.speeds[old]
                self.generic.discard(node)
            del self.slot_of[old]
            self.slots[s] = node
            self.slot_of[node] = s
        self.phase = "restarting"
        self.recovery = "install"
        self.timer = self.engine.after(self.decision.restart_s, self.restarted, cancellable=True)

    def restarted(self) -> None:
        assert self.decision is not None
        decision = self.decision
        self.generation += 1
        self.counts["restarts"] += 1
        self.emit(ev.GENERATION, generation=self.generation, workers=list(self.slots), reason=f"recovery ({decision.strategy})")
        own = {(w.stage, w.replica): w for w in decision.workers}
        for s in sorted(self.lost):
            node, failed_at = self.lost[s]
            rank, replica = self.position(s)
            new = self.slots[s]
            self.emit(ev.WORKER_START, worker=new, stage=rank, replica=replica, pid=None, generation=self.generation, host=self.locations[new])
            w = own.get((rank, replica))
            self.emit(
                ev.RECOVERY_FINISHED, stage=rank, replica=replica, strategy=w.strategy if w else decision.strategy,
                why=w.why if w else decision.why, bytes=w.bytes if w else 0, seconds=self.engine.now - failed_at,
                worker=new, generation=self.generation, exact=w.exact if w else False,
            )
        resume = min(decision.resume_step, self.step)
        for k in range(resume, min(self.step + 1, self.cfg.train.steps)):  # 0-based, the interrupted one too
            self.emit(ev.STEP_REPLAYED, step=k, generation=self.generation)
        self.counts["replayed"] += self.step - resume
        self.step = resume
        del self.kept[resume:]
        self.lost.clear()
        self.decision = None
        self.recovery = None
        self.begin_step()

    def run(self, horizon_s: float) -> JobResult:
        alias: dict[int, int] = {}
        initial = len(self.locations)
        self.engine.at(0.0, self.start)  # before any failure at t = 0
        for e in parse_failures(self.cfg.sim.failures, initial):
            self.engine.at(e.time, self.fail, e.node)
        if self.trace_mode:
            for e in read_preemption_trace(self.cfg.sim.failure_trace, initial, self.setup.base_dir):
                self.engine.at(e.time, self.node_event, e, alias)
        self.engine.run(until=horizon_s)
        if self.phase != "done":
            self.finish("interrupted")
        first = self.first if self.first is not None else self.iteration()
        wall = self.engine.now
        productive = sum(self.kept)
        return JobResult(
            status=self.status,
            steps=self.step,
            wall_s=wall,
            step_time_s=first.iteration_s,
            iteration=first,
            failures=self.counts["failures"],
            spare_failures=self.counts["spare_failures"],
            restarts=self.counts["restarts"],
            replayed_steps=self.counts["replayed"],
            checkpoints=self.counts["checkpoints"],
            productive_s=productive,
            ettr=productive / wall if wall > 0 else 1.0,
            generations=self.generation + 1,
        )


def simulate_job(
    setup: SimSetup,
    log: EventLog | None = None,
    policy: RecoveryPolicy | None = None,
    detector: Detector = ft_detect,
    record: bool = False,
    horizon_s: float | None = None,
) -> JobResult:
    """Run ``train.steps`` steps of the job with its failures.

    Args:
        setup: From :func:`prepare`.
        log: Where to write events (virtual time); None writes nothing.
        policy: Recovery policy (default from ``sim.recovery``).
        detector: ``detect(now, last_heartbeat, config)``; default the runtime's detector.
        record: Keep every action of the first iteration (for a Chrome trace).
        horizon_s: Give up (status ``interrupted``) at this virtual time; default 1000 x the
            failure-free job time plus a day.

    Returns:
        The :class:`JobResult` (status, times in virtual seconds, failures, restarts, ETTR).
    """
    job = _Job(setup, log, policy or build_policy(setup.config, setup.cluster.network), detector, record)
    if horizon_s is None:
        horizon_s = 1000.0 * job.iteration().iteration_s * setup.config.train.steps + 86400.0
    return job.run(horizon_s)

