"""Pipeline player: one training iteration of a lowered Schedule on a modelled cluster.

Every worker (pipeline rank ``r`` of replica ``p``, one node of the cluster) walks its rank's
action list in order, exactly as the runtime executor does (the lowering contract of :mod:`spotpipe.schedule.passes`):

* ``F`` / ``B`` / ``R`` (recompute, priced as one more forward) occupy the worker for
  :meth:`CostModel.duration` divided by the node's speed
  factor. A compute action that consumes a message (a ``RECV`` of the same stage and microbatch
  was posted before it on this rank) starts no earlier than that message's arrival.
* ``SEND`` is non-blocking: the worker goes on at once. The message occupies the directed link
  ``(sender node, receiver node)`` for ``bytes / bandwidth`` (messages on one link are sent one
  after another, in the order they were issued) and arrives ``latency`` after its last byte left
  (the alpha-beta link model; Hockney 1994).
* ``RECV`` only posts the receive; it costs no time.

The walk runs on the discrete-event :class:`~spotpipe.sim.engine.Engine`, so all actions of the
whole cluster happen in global time order. After the last backward of a rank in every replica,
the rank's gradients are all-reduced across its replicas with a ring all-reduce
(``2 (R-1)`` steps of ``bytes / R`` over the slowest link of the ring; Patarasuk and Yuan 2009,
"Bandwidth optimal all-reduce algorithms for clusters of workstations"), then the optimizer
steps. Before the optimizer, every step ends with a barrier: the runtime's world all-reduce of a
few scalars (global gradient norm, loss), a ring over all workers in world-rank order whose
``2 (W-1)`` latency-bound steps cost the mean latency of the ring's links each. With
``collectives=False`` both collectives cost nothing on the links (the runtime's link-delay
emulation delays only point-to-point messages). Replicas are simulated separately, action by
action, even when they are identical.

Reported per iteration: iteration time, pipeline time (first action to last backward), bubble
fraction per rank ``1 - busy / pipeline time`` (the definition under which GPipe and 1F1B with
equal stage times give ``(S-1)/(M+S-1)``; Huang et al. 2019), peak resident activations per
worker, busy time and bytes per directed link, and optionally every action's start and end.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from spotpipe.cost import CostModel
from spotpipe.schedule.ir import Action, Op, Placement, Schedule, ScheduleError
from spotpipe.schedule.passes import recomputed
from spotpipe.sim.engine import Engine, SimulationError
from spotpipe.network import Network

_COMPUTE, _SEND = 0, 1


@dataclass(frozen=True)
class LinkUsage:
    """Traffic of one directed link during one iteration."""

    src: int
    dst: int
    busy_s: float
    bytes: int
    messages: int


@dataclass(frozen=True)
class TimedAction:
    """One action as played: worker slot ``(rank, replica)``, node, and its interval.

    For a SEND, ``start``/``end`` are when its first byte leaves and when it arrives.
    """

    rank: int
    replica: int
    node: int
    index: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class IterationResult:
    """What one simulated iteration measured (seconds of virtual time from its start).

    Attributes:
        iteration_s: Until the last optimizer step ends (pipeline, all-reduce, optimizer, overhead).
        pipeline_s: Until the last compute action of any worker ends.
        busy_s: ``busy_s[rank][replica]``: compute time of that worker.
        bubble: ``bubble[rank][replica]``: ``1 - busy / pipeline_s``.
        peak_activations: ``[rank][replica]``: most (stage, microbatch) activations held at once.
        peak_activation_bytes: ``[rank][replica]``: most activation bytes held at once (a
            recomputed forward holds only its input until its ``R``).
        allreduce_s: Per rank, the gradient all-reduce time across replicas (0 with 1 replica).
        barrier_s: The step barrier (world all-reduce of scalars) after the all-reduces.
        links: Traffic per directed link that carried data, pipeline messages and all-reduce.
        actions: Every action's interval when the player was asked to record them, else empty.
        events: Discrete events the engine ran.
    """

    iteration_s: float
    pipeline_s: float
    busy_s: tuple[tuple[float, ...], ...]
    bubble: tuple[tuple[float, ...], ...]
    peak_activations: tuple[tuple[int, ...], ...]
    peak_activation_bytes: tuple[tuple[int, ...], ...]
    allreduce_s: tuple[float, ...]
    barrier_s: float
    links: tuple[LinkUsage, ...]
    actions: tuple[TimedAction, ...] = field(default=(), repr=False)
    events: int = 0

    def rank_bubble(self) -> tuple[float, ...]:
        """Bubble fraction per rank, averaged over replicas."""
        return tuple(sum(b) / len(b) for b in self.bubble)

    def rank_busy(self) -> tuple[float, ...]:
        """Compute time per rank, averaged over replicas."""
        return tuple(sum(b) / len(b) for b in self.busy_s)


def _compile(schedule: Schedule, cost: CostModel) -> list[list[tuple[object, ...]]]:
    """Per rank, the actions as tuples the hot loop reads; checks every input has a RECV.

    Compute: ``(_COMPUTE, need_tag, duration, +1/-1 activation, activation bytes, action, index)``;
    a forward whose chunk is recomputed (``R`` later on the rank) holds only its input's bytes, and
    the ``R`` costs one more forward and brings back the rest (0 in the count).
    Send: ``(_SEND, tag, bytes, destination rank, action, index)``. RECVs are dropped after
    matching. ``index`` is the action's position in the rank's list.
    """
    m_count = schedule.num_microbatches
    s2r = schedule.stage_to_rank
    programs: list[list[tuple[object, ...]]] = []
    dropped = recomputed(schedule)

    def boundary(stage: int) -> int:
        """Bytes a recomputed forward keeps: its input (token ids count as nothing)."""
        path_first = stage == 0
        return 0 if path_first else min(cost.boundary_bytes[stage - 1], cost.activation_bytes[stage])

    for rank, acts in enumerate(schedule.ranks):
        posted: dict[tuple[int, Op, int], int] = {}
        prog: list[tuple[object, ...]] = []
        for index, a in enumerate(acts):
            if a.stage >= schedule.num_stages:
                raise ScheduleError(f"rank {rank}: action {a} names stage {a.stage} of a {schedule.num_stages}-stage schedule")
            if a.op.is_recv:
                consumer = Op.F if a.op is Op.RECV_F else Op.B
                posted[(a.stage, consumer, a.microbatch)] = a.tag(m_count)
            elif a.op.is_send:
                assert a.peer is not None
                if not 0 <= a.peer < schedule.num_stages:
                    raise ScheduleError(f"rank {rank}: action {a} sends to stage {a.peer}, which does not exist")
                prog.append((_SEND, a.tag(m_count), cost.message_bytes(a), s2r[a.peer], a, index))
            else:
                need = -1 if a.op is Op.R else posted.pop((a.stage, a.op, a.microbatch), -1)
                if need < 0 and a.op is not Op.R:
                    path = schedule.path(a.microbatch)
                    i = path.index(a.stage) if a.stage in path else -1
                    other = (path[i - 1] if i > 0 else None) if a.op is Op.F else (path[i + 1] if 0 <= i < len(path) - 1 else None)
                    if other is not None and s2r[other] != rank:
                        recv = Action(a.stage, Op.RECV_F if a.op is Op.F else Op.RECV_B, a.microbatch, other)
                        raise ScheduleError(
                            f"rank {rank}: {a} needs data from stage {other} on rank {s2r[other]} but no {recv} "
                            "precedes it; play a lowered schedule (spotpipe.schedule.passes.lower)"
                        )
                if a.op is Op.F and (a.stage, a.microbatch) in dropped:  # keeps its input only
                    prog.append((_COMPUTE, need, cost.forward_s[a.stage], 1, boundary(a.stage), a, index))
                elif a.op is Op.F:
                    prog.append((_COMPUTE, need, cost.forward_s[a.stage], 1, cost.activation_bytes[a.stage], a, index))
                elif a.op is Op.R:  # the forward again, and the rest of its activations come back
                    extra = cost.activation_bytes[a.stage] - boundary(a.stage)
                    prog.append((_COMPUTE, -1, cost.forward_s[a.stage], 0, extra, a, index))
                else:
                    prog.append((_COMPUTE, need, cost.backward_s[a.stage], -1, -cost.activation_bytes[a.stage], a, index))
        programs.append(prog)
    return programs


class _Play:
    """State of one iteration being played (internal; see :func:`play_iteration`)."""

    def __init__(
        self,
        schedule: Schedule,
        placement: Placement,
        cost: CostModel,
        network: Network,
        speeds: Sequence[float],
        record: bool,
        collectives: bool = True,
        host_cores: int = 0,
    ) -> None:
        ranks = schedule.num_ranks
        if placement.num_ranks != ranks:
            raise SimulationError(f"placement has {placement.num_ranks} ranks, schedule {schedule.name} has {ranks}")
        replicas = {len(ws) for ws in placement.workers}
        if len(replicas) != 1:
            raise SimulationError(f"every rank needs the same number of replicas, got {sorted(replicas)}")
        self.replicas = replicas.pop()
        self.ranks = ranks
        self.schedule = schedule
        self.cost = cost
        self.network = network
        self.programs = _compile(schedule, cost)
        self.record = record
        self.collectives = collectives
        n = ranks * self.replicas
        # Worker slot w = replica * ranks + rank.
        self.node = [placement.workers[w % ranks][w // ranks] for w in range(n)]
        for node in self.node:
            if not 0 <= node < network.num_nodes:
                raise SimulationError(f"placement names node {node}; the cluster has {network.num_nodes} nodes")
        self.speed = [float(speeds[node]) for node in self.node]
        self.tags = 2 * schedule.num_stages * schedule.num_microbatches
        self.pc = [0] * n
        self.busy = [0.0] * n
        self.last_compute = [0.0] * n
        self.live = [0] * n
        self.peak = [0] * n
        self.live_bytes = [0] * n
        self.peak_bytes = [0] * n
        self.arrival = [-1.0] * (self.tags * self.replicas)
        self.waiting: dict[int, int] = {}
        # Directed link state: key src * num_nodes + dst -> [free_at, busy, bytes, messages, lat, bw]
        self.links: dict[int, list[float]] = {}
        self.timed: list[TimedAction] = []
        self.engine = Engine()
        # Processor sharing of one host's cores (host_cores > 0): every running compute action
        # progresses at min(1, cores / running); `_ps_work` is the work each has received so far.
        self.host_cores = host_cores
        self._ps_work = 0.0
        self._ps_time = 0.0
        self._ps_heap: list[tuple[float, int, int, float, tuple[object, ...]]] = []
        self._ps_version = 0

    def _link(self, src: int, dst: int) -> list[float]:
        key = src * self.network.num_nodes + dst
        state = self.links.get(key)
        if state is None:
            link = self.network.link(src, dst)
            state = [0.0, 0.0, 0.0, 0.0, link.latency_s, link.bandwidth_Bps]
            self.links[key] = state
        return state

    def resume(self, w: int) -> None:
        """Run worker slot ``w`` from its program counter until it blocks or finishes."""
        engine = self.engine
        t = engine.now
        ranks = self.ranks
        rank = w % ranks
        base = (w // ranks) * self.tags
        prog = self.programs[rank]
        n = len(prog)
        i = self.pc[w]
        arrival = self.arrival
        speed = self.speed[w]
        while i < n:
            ins = prog[i]
            if ins[0] == _COMPUTE:
                need = ins[1]
                if need >= 0:  # type: ignore[operator]
                    a = arrival[base + need]  # type: ignore[operator]
                    if a < 0:
                        self.waiting[base + need] = w  # type: ignore[operator]
                        self.pc[w] = i
                        return
                    if a > t:
                        self.pc[w] = i
                        engine.at(a, self.resume, w)
                        return
                d = ins[2] / speed  # type: ignore[operator]
                if self.host_cores:
                    self._shared_start(w, ins, d, t)  # the worker resumes when the host has done the work
                    self.pc[w] = i + 1
                    return
                end = t + d
                self.busy[w] += d
                self.last_compute[w] = end
                self._hold(w, ins)
                if self.record:
                    self.timed.append(TimedAction(rank, w // ranks, self.node[w], ins[6], ins[5], t, end))  # type: ignore[arg-type]
                i += 1
                if end <= engine.next_time():
                    t = end  # nothing else happens before: keep going without a queue round trip
                    continue
                self.pc[w] = i
                engine.at(end, self.resume, w)
                return
            # SEND
            tag, nbytes, dst_rank = ins[1], ins[2], ins[3]
            dst = w - rank + dst_rank  # type: ignore[operator]
            link = self._link(self.node[w], self.node[dst])
            start = t if t > link[0] else link[0]
            bw = link[5]
            ser = 0.0 if bw == math.inf else nbytes / bw  # type: ignore[operator]
            link[0] = start + ser
            link[1] += ser
            link[2] += nbytes  # type: ignore[operator]
            link[3] += 1
            arrive = start + ser + link[4]
            key = base + tag  # type: ignore[operator]
            arrival[key] = arrive
            if self.record:
                self.timed.append(TimedAction(rank, w // ranks, self.node[w], ins[5], ins[4], start, arrive))  # type: ignore[arg-type]
            waiter = self.waiting.pop(key, None)
            if waiter is not None:
                engine.at(arrive, self.resume, waiter)
            i += 1
        self.pc[w] = n

    def run(self) -> IterationResult:
        n = self.ranks * self.replicas
        for w in range(n):
            self.engine.at(0.0, self.resume, w)
        self.engine.run()
        blocked = []
        for w in range(n):
            prog = self.programs[w % self.ranks]
            if self.pc[w] < len(prog):
                blocked.append(f"rank {w % self.ranks} (replica {w // self.ranks}) at {prog[self.pc[w]][-2]}")
        if blocked:
            more = f" and {len(blocked) - 4} more" if len(blocked) > 4 else ""
            raise SimulationError(
                "deadlock: waiting for messages that are never sent: " + ", ".join(blocked[:4]) + more
            )
        return self._finish()

    def _allreduce(self, rank: int, nbytes: int) -> float:
        """Ring all-reduce time of ``nbytes`` across the replicas of ``rank``; updates link use."""
        r = self.replicas
        if r == 1 or nbytes == 0 or not self.collectives:
            return 0.0
        chunk = nbytes / r
        steps = 2 * (r - 1)
        worst = 0.0
        for p in range(r):
            src = self.node[p * self.ranks + rank]
            dst = self.node[((p + 1) % r) * self.ranks + rank]
            link = self._link(src, dst)
            ser = 0.0 if link[5] == math.inf else chunk / link[5]
            worst = max(worst, link[4] + ser)
            link[1] += steps * ser
            link[2] += steps * chunk
            link[3] += steps
        return steps * worst

    # -- processor sharing (one host plays the whole cluster) -----------------------------------

    def _ps_rate(self) -> float:
        running = len(self._ps_heap)
        return 1.0 if running <= self.host_cores else self.host_cores / running

    def _ps_advance(self, t: float) -> None:
        if self._ps_heap:
            self._ps_work += (t - self._ps_time) * self._ps_rate()
        self._ps_time = t

    def _ps_reschedule(self, t: float) -> None:
        self._ps_version += 1
        if self._ps_heap:
            due = t + max(0.0, self._ps_heap[0][0] - self._ps_work) / self._ps_rate()
            self.engine.at(due, self._ps_complete, self._ps_version)

    def _hold(self, w: int, ins: tuple[object, ...]) -> None:
        """Count the activations (``ins[3]``: +1, -1 or 0) and bytes (``ins[4]``) a compute action
        leaves resident on worker slot ``w``, and the peaks of both."""
        live = self.live[w] + ins[3]  # type: ignore[operator]
        self.live[w] = live
        if live > self.peak[w]:
            self.peak[w] = live
        held = self.live_bytes[w] + ins[4]  # type: ignore[operator]
        self.live_bytes[w] = held
        if held > self.peak_bytes[w]:
            self.peak_bytes[w] = held

    def _shared_start(self, w: int, ins: tuple[object, ...], work: float, t: float) -> None:
        """Start a compute action of ``work`` seconds (at full speed) on the shared host."""
        self._hold(w, ins)
        self._ps_advance(t)
        heapq.heappush(self._ps_heap, (self._ps_work + work, w, w, t, ins))
        self._ps_reschedule(t)

    def _ps_complete(self, version: int) -> None:
        if version != self._ps_version:
            return  # the set of running actions changed since this was scheduled
        t = self.engine.now
        self._ps_advance(t)
        done = []
        while self._ps_heap and self._ps_heap[0][0] <= self._ps_work + 1e-12 * max(1.0, self._ps_work):
            done.append(heapq.heappop(self._ps_heap))
        self._ps_reschedule(t)
        for _due, _seq, w, start, ins in done:
            self.busy[w] += t - start
            self.last_compute[w] = t
            if self.record:
                rank = w % self.ranks
                self.timed.append(TimedAction(rank, w // self.ranks, self.node[w], ins[6], ins[5], start, t))  # type: ignore[arg-type]
            self.resume(w)

    def _barrier(self) -> float:
        """Latency-bound ring all-reduce of a few scalars over every worker (world-rank order)."""
        n = len(self.node)
        if n == 1 or not self.collectives:
            return 0.0
        total = 0.0
        for w in range(n):
            total += self._link(self.node[w], self.node[(w + 1) % n])[4]
        return 2 * (n - 1) * total / n

    def _finish(self) -> IterationResult:
        ranks, reps = self.ranks, self.replicas
        pipeline_s = max(self.last_compute) if self.last_compute else 0.0
        grad = [0] * ranks
        for stage, rank in enumerate(self.schedule.stage_to_rank):
            grad[rank] += self.cost.grad_bytes[stage]
        reduced = 0.0
        allreduce: list[float] = []
        for rank in range(ranks):
            slots = [p * ranks + rank for p in range(reps)]
            start = max(self.last_compute[w] for w in slots)
            ar = self._allreduce(rank, grad[rank])
            allreduce.append(ar)
            reduced = max(reduced, start + ar)
        barrier = self._barrier()
        slowest = min(self.speed)
        iteration_s = reduced + barrier + self.cost.optimizer_s / slowest + self.cost.overhead_s

        def grid(values: Sequence[float] | Sequence[int]) -> tuple[tuple[float, ...], ...]:
            return tuple(tuple(values[p * ranks + r] for p in range(reps)) for r in range(ranks))

        bubble = [1.0 - b / pipeline_s if pipeline_s > 0 else 0.0 for b in self.busy]
        nn = self.network.num_nodes
        links = tuple(
            LinkUsage(key // nn, key % nn, s[1], int(s[2]), int(s[3]))
            for key, s in sorted(self.links.items())
            if s[3] > 0
        )
        return IterationResult(
            iteration_s=iteration_s,
            pipeline_s=pipeline_s,
            busy_s=grid(self.busy),
            bubble=grid(bubble),
            peak_activations=tuple(tuple(int(x) for x in row) for row in grid(self.peak)),
            peak_activation_bytes=tuple(tuple(int(x) for x in row) for row in grid(self.peak_bytes)),
            allreduce_s=tuple(allreduce),
            barrier_s=barrier,
            links=links,
            actions=tuple(sorted(self.timed, key=lambda a: (a.start, a.rank, a.replica))),
            events=self.engine.processed,
        )


def play_iteration(
    schedule: Schedule,
    cost: CostModel,
    network: Network,
    placement: Placement | None = None,
    speeds: Sequence[float] | None = None,
    record: bool = False,
    collectives: bool = True,
    host_cores: int = 0,
) -> IterationResult:
    """Play one iteration of a lowered ``schedule``.

    Args:
        schedule: A lowered schedule (communication actions present where ranks differ).
        cost: Seconds and bytes per action (:mod:`spotpipe.cost`).
        network: Links between nodes (:mod:`spotpipe.network`).
        placement: Which node runs each (rank, replica); default one replica on nodes 0..S-1.
        speeds: Relative speed per node (default 1.0 everywhere).
        record: Keep every action's interval (for traces); costs time and memory at scale.
        collectives: Charge the gradient all-reduce and the step barrier to the links.
        host_cores: 0 = every worker has its own device; N > 0 = all workers are processes on one
            host with N cores: running compute actions share them equally (processor sharing),
            as when one machine emulates the cluster.

    Returns:
        The :class:`IterationResult` (seconds of virtual time from the iteration's start).

    Raises:
        ScheduleError: an input of a compute action has no RECV before it.
        SimulationError: a deadlock, or placement / cluster sizes that do not fit.
    """
    if cost.num_stages != schedule.num_stages:
        raise SimulationError(
            f"cost model has {cost.num_stages} stages, schedule {schedule.name} has {schedule.num_stages}"
        )
    if placement is None:
        placement = Placement.dense(schedule.num_ranks, 1)
    if speeds is None:
        speeds = [1.0] * network.num_nodes
    return _Play(schedule, placement, cost, network, speeds, record, collectives, host_cores).run()
