"""CheckFree+ swap schedule: odd microbatches swap stages 0<->1 and S-2<->S-1 (pure, no torch).

CheckFree+ (Blagoev, Ersoy, Chen 2025, "All is Not Lost: LLM Recovery without Checkpoints",
section 3.2) sends half of the microbatches through the pipeline with the first two and the last
two stages swapped (the paper's 1<->2 and S-1<->S, 1-indexed). Each edge stage thereby learns to
do its partner's job too, so a lost first or last stage is rebuilt by copying its partner. For
this the embedding also lives on stage 1 and the final norm + LM head also on stage S-2 (copies
kept identical by summing their gradients before every optimizer step, like tied weights): the
first stage *of a microbatch's path* embeds the tokens, the last one computes the loss.

:func:`swap_edges` takes a compute-only schedule from any generator (GPipe, 1F1B, interleaved)
and returns the same schedule with ``paths`` set: even microbatches take ``0, 1, ..., S-1``, odd
ones ``1, 0, 2, ..., S-3, S-1, S-2``. Lowering (``add_communication``) then follows the paths.

Re-ordering. The input schedule is played once with unit costs (F = 1, B = 2) to get every
action's start time. An odd microbatch's action at path position ``k`` moves to the rank of the
stage that now holds position ``k`` and keeps the start time the original had there. Two orders
are then built from this and the shorter (under unit costs) is returned:

1. *Time order*: each rank runs its actions in start-time order. Every data dependency of the
   swapped schedule is a dependency of the original between the same positions, so it goes
   strictly forward in time, and per-rank orders sorted by time cannot wait on each other in a
   cycle: this order never deadlocks, but the edge ranks serialise work that the original did
   on two ranks at once, so it is slow.
2. *List schedule*: the schedule is played again; whenever a rank is idle it starts the ready
   action with the best priority (forwards first, then original start time), never holding more
   forward activations than the original rank did (the two ranks of a swapped pair share the
   larger of their two limits), so 1F1B keeps its memory bound. An order that comes out of a
   completed play is deadlock-free by construction.

Cost measured with unit costs (``tests/schedule/test_schedule_swap.py`` prints it): free for
GPipe and for 4 stages; for 1F1B with 6-8 stages and 12-32 microbatches the swapped schedule is
about 20-27% longer, because each edge pair must interleave two microbatches whose dependency
chains run in opposite directions while 1F1B's activation limit leaves little slack.
"""

from __future__ import annotations

from collections.abc import Mapping

from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError

UNIT_COST: dict[Op, float] = {Op.F: 1.0, Op.B: 2.0}


def swap_permutation(num_stages: int) -> tuple[int, ...]:
    """Stage at each path position of a swapped microbatch: 0<->1 and S-2<->S-1 exchanged.

    Args:
        num_stages: Stages S (>= 4).

    Returns:
        ``(1, 0, 2, ..., S-3, S-1, S-2)``.

    Raises:
        ScheduleError: for fewer than 4 stages (the two swaps would overlap).
    """
    if num_stages < 4:
        raise ScheduleError(
            f"the CheckFree+ swap schedule needs >= 4 stages (it swaps 0<->1 and S-2<->S-1), got {num_stages}"
        )
    perm = list(range(num_stages))
    perm[0], perm[1] = 1, 0
    perm[-2], perm[-1] = num_stages - 1, num_stages - 2
    return tuple(perm)


def swapped_paths(num_stages: int, num_microbatches: int) -> tuple[tuple[int, ...], ...]:
    """Per-microbatch paths: even microbatches in order, odd ones swapped.

    Args:
        num_stages: Stages S (>= 4).
        num_microbatches: Microbatches per step.

    Returns:
        One stage path per microbatch.

    Raises:
        ScheduleError: for fewer than 4 stages.
    """
    normal = tuple(range(num_stages))
    swapped = swap_permutation(num_stages)
    return tuple(normal if m % 2 == 0 else swapped for m in range(num_microbatches))


def embedding_stages(num_stages: int) -> tuple[int, int]:
    """Stages that hold a copy of the token embedding under the swap schedule.

    Args:
        num_stages: Stages S (>= 4).

    Returns:
        ``(0, 1)``.

    Raises:
        ScheduleError: for fewer than 4 stages.
    """
    swap_permutation(num_stages)
    return (0, 1)


def head_stages(num_stages: int) -> tuple[int, int]:
    """Stages that hold a copy of the final norm and LM head under the swap schedule.

    Args:
        num_stages: Stages S (>= 4).

    Returns:
        ``(S - 2, S - 1)``.

    Raises:
        ScheduleError: for fewer than 4 stages.
    """
    swap_permutation(num_stages)
    return (num_stages - 2, num_stages - 1)


def start_times(schedule: Schedule, cost: Mapping[Op, float] = UNIT_COST) -> dict[Action, float]:
    """Start time of every compute action when ``schedule`` is played with ``cost`` per op.

    Each rank runs its list in order; an action starts when its rank is free and its inputs
    exist (the forward of the previous stage on the microbatch's path; for a backward, its own
    forward and the backward of the next stage on the path).

    Args:
        schedule: A compute-only schedule (``paths`` honoured).
        cost: Time units per op (``F``, ``B``).

    Returns:
        Start time of each compute action, in the units of ``cost``.

    Raises:
        ScheduleError: if the schedule is lowered, or deadlocks (naming the stuck actions).
    """
    if schedule.is_lowered():
        raise ScheduleError(f"schedule {schedule.name}: expected a compute-only schedule, got communication actions")
    done: dict[tuple[int, Op, int], float] = {}
    start: dict[Action, float] = {}
    free = [0.0] * schedule.num_ranks
    pos = [0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(schedule.ranks):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                deps = _dependencies(schedule, a)
                if any(d not in done for d in deps):
                    break
                t = max([free[r], *(done[d] for d in deps)])
                start[a] = t
                free[r] = t + cost[a.op]
                done[(a.stage, a.op, a.microbatch)] = free[r]
                pos[r] += 1
                progress = True
    stuck = [str(acts[pos[r]]) for r, acts in enumerate(schedule.ranks) if pos[r] < len(acts)]
    if stuck:
        raise ScheduleError(f"schedule {schedule.name} deadlocks: ranks wait at {', '.join(stuck)}")
    return start


def _dependencies(schedule: Schedule, a: Action) -> list[tuple[int, Op, int]]:
    path = schedule.path(a.microbatch)
    if a.stage not in path:
        raise ScheduleError(f"action {a}: stage {a.stage} is not on the path {path} of microbatch {a.microbatch}")
    k = path.index(a.stage)
    if a.op == Op.F:
        return [(path[k - 1], Op.F, a.microbatch)] if k > 0 else []
    deps = [(a.stage, Op.F, a.microbatch)]
    if k + 1 < len(path):
        deps.append((path[k + 1], Op.B, a.microbatch))
    return deps


def peak_in_flight(schedule: Schedule) -> tuple[int, ...]:
    """Most forward activations each rank holds at once (forwards minus backwards so far).

    Args:
        schedule: Any schedule (only ``F`` and ``B`` count).

    Returns:
        One count per rank.
    """
    peaks = []
    for acts in schedule.ranks:
        live = peak = 0
        for a in acts:
            live += 1 if a.op == Op.F else -1 if a.op == Op.B else 0
            peak = max(peak, live)
        peaks.append(peak)
    return tuple(peaks)


def makespan(schedule: Schedule, cost: Mapping[Op, float] = UNIT_COST) -> float:
    """Length of one step of a compute-only schedule under ``cost``.

    Args:
        schedule: A compute-only schedule.
        cost: Time units per op.

    Returns:
        The last compute's end, in the units of ``cost`` (0.0 for no actions).

    Raises:
        ScheduleError: as :func:`start_times`.
    """
    times = start_times(schedule, cost)
    return max((t + cost[a.op] for a, t in times.items()), default=0.0)


def _list_schedule(draft: Schedule, priority: Mapping[Action, tuple[float, ...]], caps: list[int]) -> Schedule | None:
    """Play ``draft`` greedily (unit costs): an idle rank starts its best ready action, within
    its forward-activation cap. Returns the order played, or ``None`` if it got stuck."""
    pending = [sorted(acts, key=lambda a: priority[a]) for acts in draft.ranks]
    done: dict[tuple[int, Op, int], float] = {}
    free = [0.0] * draft.num_ranks
    live = [0] * draft.num_ranks
    order: list[list[Action]] = [[] for _ in pending]
    now, remaining = 0.0, sum(len(p) for p in pending)
    while remaining:
        for r, acts in enumerate(pending):
            if free[r] > now:
                continue
            for a in acts:
                if a.op == Op.F and live[r] >= caps[r]:
                    continue
                deps = _dependencies(draft, a)
                if all(d in done and done[d] <= now for d in deps):
                    acts.remove(a)
                    order[r].append(a)
                    live[r] += 1 if a.op == Op.F else -1
                    free[r] = now + UNIT_COST[a.op]
                    done[(a.stage, a.op, a.microbatch)] = free[r]
                    remaining -= 1
                    break
        later = [t for t in (*free, *done.values()) if t > now]
        if remaining and not later:
            return None
        now = min(later) if later else now
    return draft.with_ranks(order)


def swap_edges(schedule: Schedule) -> Schedule:
    """The CheckFree+ version of a compute-only schedule (see the module docstring).

    Args:
        schedule: Compute-only schedule whose microbatches all take the default path.

    Returns:
        A schedule with the same stages, ranks and microbatches, ``paths`` from
        :func:`swapped_paths`, and per-rank action lists re-ordered so nothing deadlocks.

    Raises:
        ScheduleError: fewer than 4 stages, a lowered schedule, custom paths, or a schedule that
            deadlocks already.
    """
    perm = swap_permutation(schedule.num_stages)
    default = tuple(range(schedule.num_stages))
    if any(schedule.path(m) != default for m in range(schedule.num_microbatches)):
        raise ScheduleError(f"schedule {schedule.name}: swap_edges needs the default path for every microbatch")
    times = start_times(schedule)
    keyed: list[list[tuple[float, int, int, Action]]] = [[] for _ in range(schedule.num_ranks)]
    for r, acts in enumerate(schedule.ranks):
        for i, a in enumerate(acts):
            stage = perm[a.stage] if a.microbatch % 2 == 1 else a.stage
            moved = Action(stage, a.op, a.microbatch)
            keyed[schedule.stage_to_rank[stage]].append((times[a], r, i, moved))
    by_time = Schedule(
        ranks=tuple(tuple(a for *_, a in sorted(k, key=lambda x: x[:3])) for k in keyed),
        num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches,
        stage_to_rank=schedule.stage_to_rank,
        paths=swapped_paths(schedule.num_stages, schedule.num_microbatches),
        name=f"{schedule.name}+swap",
    )
    caps = list(peak_in_flight(schedule))
    s2r = schedule.stage_to_rank
    for lo, hi in ((0, 1), (schedule.num_stages - 2, schedule.num_stages - 1)):
        caps[s2r[lo]] = caps[s2r[hi]] = max(caps[s2r[lo]], caps[s2r[hi]])
    priority = {a: (float(a.op != Op.F), t, float(r), float(i)) for k in keyed for t, r, i, a in k}
    candidates = [by_time]
    listed = _list_schedule(by_time, priority, caps)
    if listed is not None:
        candidates.append(listed)
    return min(candidates, key=lambda c: (makespan(c), sum(peak_in_flight(c)), candidates.index(c)))
