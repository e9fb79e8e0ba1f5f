"""Replay a preemption trace under three answers to a lost worker: elastic, wait, checkpoint.

:func:`simulate_elastic` plays a job over node events (a Bamboo-format trace read by the
simulator's one parser, :func:`spotpipe.sim.cluster.read_preemption_trace`, time-compressed by
:func:`trace_events`) and asks the shipped policy, :func:`spotpipe.ft.elastic.next_shape`, what
to do at every loss and join (DESIGN.md: the simulator plays the policy that ships). The modes
differ only in the policy's limits and in what a restart costs:

* ``elastic``: a lost worker waits ``ft.replace_wait_s`` for a standby or a joiner; then the job
  shrinks (drops a replica group, or re-partitions the layers over fewer stages) and grows again
  when workers join, up to its configured size (HyperPod elastic training 2025; Oobleck SOSP'23;
  Parcae NSDI'24). A reshape costs ``sim.regroup_s`` plus the state moves, the slowest receiving
  worker's bytes over the ``[network]`` link (``latency + bytes / bandwidth``, Hockney 1994).
* ``wait``: the job keeps its shape (``ft.min_workers`` = all workers) and stops until every
  lost position has a node; the lost state is rebuilt without rollback (mirror, CheckFree: the
  ``sim.recovery = "policy"`` path), costing ``sim.regroup_s`` plus the transfer.
* ``checkpoint``: as ``wait``, but the job restarts from its newest checkpoint after
  ``sim.restart_s`` (Varuna, torchrun; the baseline of Kokolis et al. 2025, s. 4), writing one
  every ``train.checkpoint_every`` steps for ``sim.checkpoint_write_s``; the steps since it are
  lost. The other modes never roll back and write no checkpoint.

Nodes come from the trace's ``add`` lines (idle nodes joining the pool) and, for every worker
the job loses, a replacement ``sim.replace_s`` after the loss (the provider's on-demand
fallback, in every mode; make it large to play the trace alone). A loss is noticed
``ft.detect_timeout_s`` after it happens. Steps are atomic (DESIGN.md): the step in flight when a
worker is lost or a reshape starts is discarded, so a grow stalls training by at most one step
plus the reshape. Simplifications: losses at one moment are decided together, but the 0.3 s
grouping window of :mod:`spotpipe.ft.confirm` is not played; every receiving worker of a reshape
gets its bytes over its own link, in parallel; a reshape's pause is not overlapped with training.

Measures: useful samples per second (committed, never rolled back steps x ``train.batch_size``:
every shape keeps the global batch) and the ETTR of Kokolis et al. 2025 as
:class:`spotpipe.reliability.runs.RunSummary` computes it (time in committed steps that count /
wall time); a step at a shrunk shape is slower but counts, so ETTR alone hides the throughput a
shrink gives up, which useful samples per second shows. The step time of a shape is the
policy's own model (:func:`spotpipe.ft.elastic.step_seconds`) unless a ``step_time`` is given,
such as :func:`played_step_time`: the lowered schedule played by the simulator's player.

Pure Python.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from spotpipe import events as ev
from spotpipe.config import JobConfig
from spotpipe.cost import analytic_cost, sequences_per_microbatch
from spotpipe.errors import ConfigError
from spotpipe.ft.elastic import (
    ElasticCost,
    Move,
    Shape,
    ShapeDecision,
    ShapeLimits,
    elastic_cost,
    initial_shape,
    limits_from,
    next_shape,
    step_seconds,
)
from spotpipe.events import EventLog
from spotpipe.network import Network, uniform_link
from spotpipe.schedule.build import job_schedule
from spotpipe.schedule.ir import Placement
from spotpipe.sim.cluster import FAIL, NodeEvent, read_preemption_trace
from spotpipe.sim.player import play_iteration

ElasticMode = Literal["elastic", "wait", "checkpoint"]
"""How the job answers a lost worker (module docstring)."""
ELASTIC_MODES: tuple[ElasticMode, ...] = get_args(ElasticMode)
REPLACEMENT_IDS = 10**9  # replacement nodes (sim.replace_s) get ids from here, apart from the trace's
EPS = 1e-9  # steps that end within this of an event count as done (float rounding)


@dataclass(frozen=True)
class ReshapeEvent:
    """One change of shape (the ``reshape`` event).

    Attributes:
        time: Virtual seconds when it was decided.
        kind: The decision's kind (``shrink``, ``grow``, ``replace``).
        from_shape: ``"SxR"`` before.
        to_shape: ``"SxR"`` after.
        why: The policy's one line.
        bytes: State moved.
        seconds: Pause until the first step at the new shape.
    """

    time: float
    kind: str
    from_shape: str
    to_shape: str
    why: str
    bytes: int
    seconds: float


@dataclass(frozen=True)
class ElasticResult:
    """Outcome of one replay (virtual seconds).

    Attributes:
        mode: The mode played.
        wall_s: The replay's length (the horizon).
        steps: Committed steps that count (rolled-back ones excluded).
        samples: ``steps x train.batch_size``.
        samples_per_s: ``samples / wall_s``: useful throughput.
        productive_s: Time in the steps that count.
        ettr: ``productive_s / wall_s``.
        time_at_shape: ``(label, seconds)`` the job ran at each shape, in order of first use.
        shrink_lost_s: Throughput lost to shrinking, in seconds: over the steps that count, their
            step time minus the configured shape's (a slower shape's extra time).
        down_s: Time not running (detection, waits, reshapes, restarts).
        reshapes: Every change of shape, in order.
        failures: Active workers lost.
        joins: Nodes that joined (trace adds and replacements).
    """

    mode: str
    wall_s: float
    steps: int
    samples: int
    samples_per_s: float
    productive_s: float
    ettr: float
    time_at_shape: tuple[tuple[str, float], ...]
    shrink_lost_s: float
    down_s: float
    reshapes: tuple[ReshapeEvent, ...]
    failures: int
    joins: int


def trace_events(cfg: JobConfig, path: str | Path, compress: float = 1.0, base_dir: str | Path | None = None) -> list[NodeEvent]:
    """A Bamboo-format preemption trace as node events, ``compress`` times faster.

    The first ``stages x replicas + sim.spares`` names are the job's nodes
    (:func:`spotpipe.sim.cluster.parse_preemption_trace`).

    Args:
        cfg: The job (its node count).
        path: The trace file.
        compress: Time compression, > 0: event times are divided by it.
        base_dir: Folder a relative ``path`` is read from.

    Returns:
        The events, times in compressed virtual seconds.

    Raises:
        ConfigError: for a bad trace (names the line) or ``compress <= 0``.
    """
    if not (compress > 0 and math.isfinite(compress)):
        raise ConfigError(f"trace time compression must be a finite number > 0, got {compress}")
    p = cfg.pipeline
    events = read_preemption_trace(path, p.stages * p.replicas + cfg.sim.spares, base_dir)
    return [replace(e, time=e.time / compress) for e in events]


def checkpointed_progress(elapsed: float, step_s: float, every: int, write_s: float) -> tuple[int, int]:
    """Steps done in ``elapsed`` seconds of running, and how many of them a checkpoint holds.

    A checkpoint of ``write_s`` seconds follows every ``every`` steps (0: never); a step or a
    write cut short by the end of ``elapsed`` does not count.

    Args:
        elapsed: Seconds since the job (re)started from a checkpoint, >= 0.
        step_s: Seconds per step, > 0.
        every: ``train.checkpoint_every``; 0: no checkpoints.
        write_s: ``sim.checkpoint_write_s``.

    Returns:
        ``(steps done, steps saved by the newest checkpoint)``.
    """
    if every <= 0:
        return int(math.floor(elapsed / step_s + EPS)), 0
    cycle = every * step_s + write_s
    full = int(math.floor(elapsed / cycle + EPS))
    rest = elapsed - full * cycle
    return full * every + min(every, int(math.floor(rest / step_s + EPS))), full * every


def move_seconds(moves: Sequence[Move], cfg: JobConfig) -> float:
    """Seconds to move reshape state: receivers in parallel, the slowest one's bytes on the link.

    Args:
        moves: The decision's moves.
        cfg: The job (``network.latency_ms``, ``network.bandwidth_gbps``).

    Returns:
        ``max`` over receiving workers of ``latency + bytes / bandwidth``; 0 when nothing moves.
    """
    link = uniform_link(cfg.network.latency_ms, cfg.network.bandwidth_gbps)
    per_worker: dict[int, int] = {}
    for m in moves:
        per_worker[m.to_worker] = per_worker.get(m.to_worker, 0) + m.bytes
    return max((link.send_s(b) for b in per_worker.values()), default=0.0)


def played_step_time(cfg: JobConfig) -> Callable[[Shape], float]:
    """Step seconds of a shape from the simulator's player instead of the policy's formula.

    The job is rebuilt at the shape's stages and replicas, each replica running ``ceil(N / R)``
    microbatches of the same size (the global batch kept), and its lowered schedule from the one
    builder (:func:`spotpipe.schedule.build.job_schedule`) is played with the analytic cost
    (compute from ``sim.device_tflops``) on the uniform ``[network]`` link
    (:func:`spotpipe.sim.player.play_iteration`, as :func:`spotpipe.planner.step_time` does):
    bubbles, the head's cost, messages and the all-reduce included. Every shape the policy makes
    has the balanced blocks the builder cuts (:func:`spotpipe.model.partition.partition_layers`).

    Args:
        cfg: The failure-free job.

    Returns:
        ``shape -> seconds``, cached per ``(stages, replicas)``.

    Raises:
        ConfigError: (when called) for a shape the job's schedule cannot be built at.
    """
    p = cfg.pipeline
    total, seqs = p.replicas * p.microbatches, sequences_per_microbatch(cfg)
    link = uniform_link(cfg.network.latency_ms, cfg.network.bandwidth_gbps)
    cache: dict[tuple[int, int], float] = {}

    def seconds(shape: Shape) -> float:
        key = (shape.stages, shape.replicas)
        if key not in cache:
            m = math.ceil(total / shape.replicas)
            job = replace(cfg, pipeline=replace(p, stages=shape.stages, replicas=shape.replicas, microbatches=m),
                          train=replace(cfg.train, batch_size=shape.replicas * m * seqs))
            network = Network(shape.stages * shape.replicas, link)
            cache[key] = play_iteration(job_schedule(job), analytic_cost(job), network,
                                        Placement.dense(shape.stages, shape.replicas),
                                        collectives=cfg.sim.delay_collectives).iteration_s
        return cache[key]

    return seconds


def mode_limits(cfg: JobConfig, mode: ElasticMode) -> ShapeLimits:
    """The policy's limits in a mode: the job's own for ``elastic``; all workers, always, else.

    Args:
        cfg: The job.
        mode: The mode.

    Returns:
        The limits: ``wait`` and ``checkpoint`` set ``min_workers`` to the whole job.
    """
    limits = limits_from(cfg)
    if mode == "elastic":
        return limits
    return replace(limits, min_workers=limits.max_workers)


class _Replay:
    """The replay's state machine (internal; see :func:`simulate_elastic`)."""

    def __init__(self, cfg: JobConfig, mode: ElasticMode, cost: ElasticCost, step_time: Callable[[Shape], float],
                 log: EventLog | None) -> None:
        p = cfg.pipeline
        self.cfg, self.mode, self.cost, self.step_time, self.log = cfg, mode, cost, step_time, log
        self.committed = 0  # the next step's number (rolled back with a checkpoint restart)
        self.generation = 0
        self.limits = mode_limits(cfg, mode)
        self.shape = initial_shape(cfg.model.layers, p.stages, p.replicas, cfg.sim.spares)
        self.full_step = step_time(self.shape)
        self.shrink_lost = 0.0
        self.queue: list[tuple[float, int, str, int]] = []
        self.seq = 0
        self.epoch = 0  # bumped when a pending pause or decision is superseded
        self.running = False
        self.run_start = 0.0
        self.run_step = 0.0
        self.pending: list[int] = []  # lost active workers not yet resolved
        self.lost_at = 0.0
        self.steps = 0
        self.productive = 0.0
        self.time_at: dict[str, float] = {}
        self.reshapes: list[ReshapeEvent] = []
        self.failures = 0
        self.joins = 0
        self.replacements = 0

    def emit(self, event: str, t: float, **fields: Any) -> None:
        if self.log is not None:
            self.log.write(event, t=t, **fields)

    def emit_steps(self, done: int, saved: int, every: int) -> None:
        """``step`` (and ``checkpoint``) events of the segment that just ended, at their end times."""
        write_s = self.cfg.sim.checkpoint_write_s
        tokens = self.cfg.train.batch_size * self.cfg.model.context
        for k in range(done):
            end = self.run_start + (k + 1) * self.run_step + (k // every if every else 0) * write_s
            self.emit(ev.STEP, end, step=self.committed + k, tokens=tokens, step_time=self.run_step, wall=end,
                      generation=self.generation)
            if every and (k + 1) % every == 0 and k < saved:
                self.emit(ev.CHECKPOINT, end + write_s, step=self.committed + k, path="(simulated)", seconds=write_s)

    def push(self, t: float, kind: str, node: int) -> None:
        heapq.heappush(self.queue, (t, self.seq, kind, node))
        self.seq += 1

    def start(self, t: float) -> None:
        self.running, self.run_start, self.run_step = True, t, self.step_time(self.shape)

    def stop(self, t: float, failed: bool) -> None:
        """End the running segment at ``t``; with ``failed`` a checkpointed job rolls back."""
        if not self.running:
            return
        self.running = False
        elapsed = t - self.run_start
        label = self.shape.label
        self.time_at[label] = self.time_at.get(label, 0.0) + elapsed
        every = self.cfg.train.checkpoint_every if self.mode == "checkpoint" else 0
        done, saved = checkpointed_progress(elapsed, self.run_step, every, self.cfg.sim.checkpoint_write_s)
        counted = saved if (failed and self.mode == "checkpoint") else done
        self.steps += counted
        self.productive += counted * self.run_step
        self.shrink_lost += counted * max(0.0, self.run_step - self.full_step)
        if self.log is not None:
            self.emit_steps(done, saved, every)
        self.committed += counted

    def apply(self, t: float, decision: ShapeDecision, noticed: bool) -> None:
        """Install a decision's shape; training resumes after the pause it costs."""
        if decision.kind in ("keep", "wait"):
            self.shape = decision.to_shape
            return
        self.stop(t, failed=False)
        self.shape = decision.to_shape
        self.pending = []
        if self.mode == "checkpoint" and noticed:
            pause = self.cfg.sim.restart_s
        else:
            pause = self.cfg.sim.regroup_s + move_seconds(decision.moves, self.cfg)
        self.reshapes.append(ReshapeEvent(t, decision.kind, decision.from_shape.label, decision.to_shape.label,
                                          decision.why, decision.bytes, pause))
        self.generation += 1
        self.emit(ev.RESHAPE, t, kind=decision.kind, why=decision.why, bytes=decision.bytes, seconds=pause,
                  **{"from": decision.from_shape.label, "to": decision.to_shape.label})
        self.emit(ev.GENERATION, t, generation=self.generation, workers=list(self.shape.active), reason=f"reshape ({decision.kind})")
        self.epoch += 1
        self.push(t + pause, "ready", self.epoch)

    def fail(self, t: float, node: int) -> None:
        if node in self.shape.standby:
            self.shape = replace(self.shape, standby=tuple(w for w in self.shape.standby if w != node))
            return
        if node not in self.shape.active or node in self.pending:
            return
        self.failures += 1
        self.stop(t, failed=True)
        stage, replica = self.shape.position(node) or (-1, -1)
        self.emit(ev.FAILURE_CONFIRMED, t, worker=node, stage=stage, replica=replica, reason="preempted (trace)")
        self.epoch += 1  # a reshape or restart in progress is void
        if not self.pending:
            self.lost_at = t
        self.pending.append(node)
        if math.isfinite(self.cfg.sim.replace_s):
            self.push(t + self.cfg.sim.replace_s, "join", REPLACEMENT_IDS + self.replacements)
            self.replacements += 1
        self.push(max(t, self.lost_at + self.cfg.ft.detect_timeout_s), "decide", self.epoch)

    def decide(self, t: float) -> None:
        """Resolve the pending losses, or keep waiting (elastic: until ``ft.replace_wait_s``)."""
        if not self.pending or t < self.lost_at + self.cfg.ft.detect_timeout_s - EPS:
            return
        deadline = self.lost_at + self.cfg.ft.replace_wait_s
        if self.mode == "elastic" and t < deadline - EPS and len(self.shape.standby) < len(self.pending):
            self.push(deadline, "decide", self.epoch)
            return
        self.apply(t, next_shape(self.shape, self.pending, [], self.cost, self.limits), noticed=True)

    def join(self, t: float, nodes: list[int]) -> None:
        self.joins += len(nodes)
        if self.pending:  # wait for the decision with the new nodes on standby
            self.shape = replace(self.shape, standby=self.shape.standby + tuple(nodes))
            self.decide(t)
            return
        self.apply(t, next_shape(self.shape, [], nodes, self.cost, self.limits), noticed=False)

    def run(self, events: Sequence[NodeEvent], horizon_s: float) -> None:
        self.emit(ev.RUN_START, 0.0, name=f"elastic-{self.mode}", config=dataclasses.asdict(self.cfg),
                  world=len(self.shape.active), mode="sim")
        for e in events:
            if e.time <= horizon_s:
                self.push(e.time, e.kind, e.node)
        self.start(0.0)
        while self.queue and self.queue[0][0] <= horizon_s:
            t = self.queue[0][0]
            joined: list[int] = []
            while self.queue and self.queue[0][0] == t:
                _, _, kind, value = heapq.heappop(self.queue)
                if kind == FAIL:
                    self.fail(t, value)
                elif kind == "decide" and value == self.epoch:
                    self.decide(t)
                elif kind == "ready" and value == self.epoch and not self.pending:
                    self.start(t)
                elif kind not in (FAIL, "decide", "ready"):
                    joined.append(value)
            if joined:
                self.join(t, joined)
        self.stop(horizon_s, failed=False)
        self.emit(ev.RUN_END, horizon_s, steps=self.committed, wall=horizon_s, status="interrupted")


def simulate_elastic(
    cfg: JobConfig,
    events: Sequence[NodeEvent],
    mode: ElasticMode,
    horizon_s: float | None = None,
    step_time: Callable[[Shape], float] | None = None,
    log: EventLog | None = None,
) -> ElasticResult:
    """Play ``events`` on the job in one mode and measure useful throughput (module docstring).

    Args:
        cfg: The job (``[pipeline]``, ``[model]``, ``train.batch_size``, ``train.checkpoint_every``,
            ``[ft]``: ``detect_timeout_s``, ``replace_wait_s``, ``min_workers``; ``[sim]``:
            ``spares``, ``replace_s``, ``regroup_s``, ``restart_s``, ``checkpoint_write_s``).
        events: Node failures and joins (:func:`trace_events`), node ids as the trace parser gives.
        mode: ``elastic``, ``wait`` or ``checkpoint``.
        horizon_s: Length of the replay; default the last event's time.
        step_time: Seconds per step of a shape; default :func:`spotpipe.ft.elastic.step_seconds`
            of the job's :func:`spotpipe.ft.elastic.elastic_cost`.
        log: Where to write the run's events (``step``, ``checkpoint``, ``failure_confirmed``,
            ``reshape``, ``generation``; ``t`` in virtual seconds), which
            :func:`spotpipe.reliability.runs.read_runs` reads; ``None``: none.

    Returns:
        The :class:`ElasticResult`.

    Raises:
        ConfigError: for an unknown mode, or no horizon (no events and no ``horizon_s``).
    """
    if mode not in ELASTIC_MODES:
        raise ConfigError(f"elastic replay mode must be one of {', '.join(ELASTIC_MODES)}, got {mode!r}")
    horizon = horizon_s if horizon_s is not None else max((e.time for e in events), default=0.0)
    if not horizon > 0:
        raise ConfigError(f"elastic replay: nothing to replay: the horizon is {horizon:g} s (the trace needs an event "
                          "after time 0, or give horizon_s > 0)")
    cost = elastic_cost(cfg)
    replay = _Replay(cfg, mode, cost, step_time or (lambda shape: step_seconds(shape, cost)), log)
    replay.run(events, horizon)
    samples = replay.steps * cfg.train.batch_size
    running = sum(replay.time_at.values())
    return ElasticResult(
        mode=mode,
        wall_s=horizon,
        steps=replay.steps,
        samples=samples,
        samples_per_s=samples / horizon,
        productive_s=replay.productive,
        ettr=replay.productive / horizon,
        time_at_shape=tuple(replay.time_at.items()),
        shrink_lost_s=replay.shrink_lost,
        down_s=horizon - running,
        reshapes=tuple(replay.reshapes),
        failures=replay.failures,
        joins=replay.joins,
    )
