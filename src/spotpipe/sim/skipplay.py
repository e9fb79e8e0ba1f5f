"""Plays a lowered SkipPipe node schedule on the modelled network, then the per-stage all-reduce.

The schedule comes from :func:`spotpipe.schedule.nodepaths.plan_schedule` and
:func:`spotpipe.schedule.passes.lower`: one rank per node, every hop of every microbatch's path a
SEND/RECV pair. It is played by :func:`spotpipe.schedule.validate.simulate_schedule` (the IR's
player: each rank walks its list in order, one compute at a time, so two microbatches wanting one
node collide and queue; a SEND's message arrives after its duration) with SkipPipe's cost
constants (:class:`spotpipe.schedule.pathtime.PathCosts`; Blagoev, Chen, Ersoy 2025, code
``schedulers/com_sym.py``):

* a chunk forward takes the node's ``forward_s``, its backward ``backward_ratio`` x that; the
  head (loss and its backward) ``head_ratio`` x the origin's forward, all on its forward action;
* after every compute the rank stays busy ``gap_s`` more, and a message takes
  ``message_s[a][b]`` from the end of the compute that produced it (played as a send of
  ``message_s - gap_s`` posted after the gap, exact while every message takes at least
  ``gap_s``, as with the reference constants).

When the pipeline is done, the nodes of every stage all-reduce that stage's gradients with a ring
(``2 (g-1)`` steps of ``bytes / g`` over the ring's slowest link, plus its latency each step;
Patarasuk and Yuan 2009). Stages reduce in parallel, each from the end of its last backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spotpipe.schedule.ir import Action, Op, Schedule
from spotpipe.schedule.pathtime import PathCosts
from spotpipe.schedule.validate import Duration, Timeline, simulate_schedule


@dataclass(frozen=True)
class SkipPlayResult:
    """One played iteration.

    Attributes:
        pipeline_s: End of the last backward (the reference simulator's iteration time).
        allreduce_s: Per stage, ring all-reduce seconds.
        iteration_s: Pipeline plus the slowest stage's all-reduce after its last backward.
        busy_s: Per node, compute seconds.
        timeline: Every action's start and end (for the Chrome trace).
    """

    pipeline_s: float
    allreduce_s: tuple[float, ...]
    iteration_s: float
    busy_s: tuple[float, ...]
    timeline: Timeline


def node_duration(schedule: Schedule, costs: PathCosts) -> Duration:
    """Seconds of every action of a lowered node schedule under ``costs`` (see the module docstring).

    Args:
        schedule: A lowered node schedule (``chunk_stage`` set, one rank per node).
        costs: SkipPipe's cost constants (seconds per forward per node, hop seconds, ratios).

    Returns:
        A function from an action to its seconds: a forward, a backward (0 on the head chunk),
        or a send's hop time less the gap; 0 for a receive.
    """
    assert schedule.chunk_stage is not None
    chunks = schedule.chunk_stage
    head = max(chunks)
    s2r = schedule.stage_to_rank
    gap = costs.gap_s

    def duration(a: Action) -> float:
        node = s2r[a.stage]
        if a.op is Op.F:
            return gap + (costs.head_ratio * costs.forward_s[node] if chunks[a.stage] == head else costs.forward_s[node])
        if a.op is Op.B:
            return 0.0 if chunks[a.stage] == head else gap + costs.backward_ratio * costs.forward_s[node]
        if a.op.is_send:
            assert a.peer is not None
            return max(0.0, costs.hop(node, s2r[a.peer]) - gap)
        return 0.0

    return duration


def play_node_schedule(
    schedule: Schedule,
    costs: PathCosts,
    groups: Sequence[Sequence[int]],
    allreduce_s: Sequence[float],
) -> SkipPlayResult:
    """Play a lowered node schedule and the per-stage all-reduce.

    Args:
        schedule: Lowered, with ``chunk_stage`` (:func:`spotpipe.schedule.nodepaths.plan_schedule`).
        costs: Compute and message seconds per node.
        groups: Nodes per stage, stage 0 first.
        allreduce_s: Per stage, its all-reduce seconds (:func:`spotpipe.network.ring_allreduce_s`).

    Returns:
        The :class:`SkipPlayResult`.

    Raises:
        ScheduleError: when the schedule is invalid or deadlocks (with the marked grid).
    """
    timeline = simulate_schedule(schedule, node_duration(schedule, costs))
    gap = costs.gap_s
    last_b = [0.0] * schedule.num_ranks
    busy = [0.0] * schedule.num_ranks
    for row in timeline.timings:
        for t in row:
            if t.action.op.is_compute and t.end > t.start:
                last_b[t.rank] = max(last_b[t.rank], t.end - gap)
                busy[t.rank] += t.end - t.start - gap
    pipeline = max(last_b, default=0.0)
    done = [max((last_b[n] for n in g), default=0.0) + allreduce_s[s] for s, g in enumerate(groups)]
    return SkipPlayResult(pipeline, tuple(allreduce_s), max([pipeline, *done]), tuple(busy), timeline)
