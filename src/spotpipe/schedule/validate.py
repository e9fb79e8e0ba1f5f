"""Schedule invariants and the dependency player that finds deadlocks before anything runs.

:func:`check_schedule` lists every :class:`Problem` of a schedule (compute-only or lowered);
:func:`validate_schedule` raises a :class:`~spotpipe.schedule.ir.ScheduleError` whose message is
one line saying what is wrong followed by the rank x step grid with the faulty actions marked
(``[1F3]``).

:func:`simulate_schedule` plays all ranks with the semantics of the lowering contract (:mod:`spotpipe.schedule.passes`): every rank
walks its list in order; a compute action occupies its rank for ``duration(action)``; a SEND is
non-blocking (its message arrives ``duration(send)`` later); a RECV only posts the receive and the
compute action that consumes the data waits for the message. With ``blocking_recv=True`` a RECV
blocks its rank until the message has arrived (the stricter model of transports that wait at the
receive). In a compute-only schedule a cross-rank dependency blocks like a zero-cost message.
Dependencies are those of pipeline training (GPipe, Huang et al. 2019; 1F1B, Narayanan et al.
2021): ``F`` of stage ``n`` for microbatch ``m`` needs ``F`` of ``n``'s predecessor on
``schedule.path(m)``; ``B`` of ``n`` needs ``F`` of ``n`` and ``B`` of its successor; a recompute
``R`` sits on ``n``'s rank between ``F`` and ``B`` of ``n`` and waits for nothing else. The same
player gives the unit-time grid and the bubble (:mod:`spotpipe.schedule.render`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError

#: Seconds (or any unit) an action takes; SEND = transfer time, RECV = time to post.
Duration = Callable[[Action], float]
#: (direction "F"/"B", sending stage, receiving stage, microbatch): identity of one message.
MessageKey = tuple[str, int, int, int]
#: (rank, index in that rank's action list).
Position = tuple[int, int]

_GRID_MAX_COLUMNS = 40
_GRID_CONTEXT = 6


def unit_duration(action: Action) -> float:
    """The ideal-time model: every compute action takes 1 unit, communication takes 0.

    Args:
        action: Any action.

    Returns:
        1.0 for compute, 0.0 for communication.
    """
    return 1.0 if action.op.is_compute else 0.0


def message_key(action: Action) -> MessageKey:
    """Identity of the message a SEND or RECV moves; equal on both ends.

    Args:
        action: A SEND or RECV.

    Returns:
        ``(direction F or B, sending stage, receiving stage, microbatch)``.

    Raises:
        ScheduleError: for a compute action.
    """
    if action.op.is_compute:
        raise ScheduleError(f"action {action}: compute actions carry no message")
    peer = action.peer
    assert peer is not None
    direction = "F" if action.op in (Op.SEND_F, Op.RECV_F) else "B"
    if action.op.is_send:
        return (direction, action.stage, peer, action.microbatch)
    return (direction, peer, action.stage, action.microbatch)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a schedule: a one-line ``message`` and the positions to mark."""

    message: str
    marks: tuple[Position, ...] = ()

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ActionTiming:
    """When one action ran: for a SEND, ``end`` is when its message arrives."""

    rank: int
    index: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """Start and end of every action of a schedule, per rank, in list order."""

    schedule: Schedule
    timings: tuple[tuple[ActionTiming, ...], ...]

    @property
    def makespan(self) -> float:
        """End of the last compute action (the step's length)."""
        return max((t.end for row in self.timings for t in row if t.action.op.is_compute), default=0.0)

    def busy(self, rank: int) -> float:
        """Time ``rank`` spends computing.

        Args:
            rank: Pipeline rank.

        Returns:
            Summed compute duration, in the timeline's units.
        """
        return sum(t.end - t.start for t in self.timings[rank] if t.action.op.is_compute)

    def bubble_fraction(self) -> float:
        """Idle share of ``ranks x makespan``; ``(S-1)/(M+S-1)`` for GPipe and 1F1B in unit time
        (Huang et al. 2019; Narayanan et al. 2021)."""
        span = self.makespan
        if span <= 0:
            return 0.0
        busy = sum(self.busy(r) for r in range(len(self.timings)))
        return 1.0 - busy / (len(self.timings) * span)


# -- grid formatting ----------------------------------------------------------------------------


def format_grid(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    marks: Iterable[Position] = (),
    label: str = "step",
    max_columns: int | None = _GRID_MAX_COLUMNS,
) -> str:
    """Aligned table: one row per rank, one column per step; marked cells print as ``[1F3]``.

    Tables wider than ``max_columns`` keep only the columns near marked cells (``...`` stands for
    the rest); ``None`` keeps every column.

    Args:
        header: Column titles.
        rows: Cell texts per rank.
        marks: ``(rank, column)`` cells to mark.
        label: Name printed left of the column titles (the header row's first cell).
        max_columns: Widest table printed in full; ``None``: no limit.

    Returns:
        The table, lines joined by newlines.
    """
    marked = set(marks)
    ncols = max([len(header)] + [len(r) for r in rows])
    keep = list(range(ncols))
    if max_columns is not None and ncols > max_columns:
        if marked:
            cols = {c for _, c in marked}
            keep = sorted({c for col in cols for c in range(col - _GRID_CONTEXT, col + _GRID_CONTEXT + 1) if 0 <= c < ncols})
        else:
            keep = list(range(max_columns))

    def cell(r: int, c: int) -> str:
        text = rows[r][c] if c < len(rows[r]) else ""
        return f"[{text}]" if (r, c) in marked else f" {text} "

    width = max([len(h) for h in header] + [len(cell(r, c)) for r in range(len(rows)) for c in keep] + [1])
    names = [label] + [f"rank {r}" for r in range(len(rows))]
    name_w = max(len(n) for n in names)
    lines: list[str] = []
    for row_i, name in enumerate(names):
        parts = [name.ljust(name_w)]
        prev = -1
        for c in keep:
            if c != prev + 1:
                parts.append("...")
            text = (header[c] if c < len(header) else "") if row_i == 0 else cell(row_i - 1, c)
            parts.append(text.center(width) if row_i == 0 else text.ljust(width))
            prev = c
        if prev != ncols - 1:
            parts.append("...")
        lines.append(" ".join(parts).rstrip())
    return "\n".join(lines)


def step_grid(schedule: Schedule, marks: Iterable[Position] = ()) -> str:
    """The rank x step grid of a schedule (step = index in the rank's action list).

    Args:
        schedule: Any schedule.
        marks: ``(rank, index)`` cells to mark.

    Returns:
        The grid text (see :func:`format_grid`).
    """
    ncols = max((len(acts) for acts in schedule.ranks), default=0)
    rows = [[str(a) for a in acts] for acts in schedule.ranks]
    return format_grid([str(i) for i in range(ncols)], rows, marks)


def describe(schedule: Schedule) -> str:
    """``schedule 1f1b: 4 ranks, 4 stages, 8 microbatches, compute-only``.

    Args:
        schedule: Any schedule.

    Returns:
        One line: name, ranks, stages, microbatches, lowered or not.
    """
    kind = "lowered" if schedule.is_lowered() else "compute-only"
    return (
        f"schedule {schedule.name}: {schedule.num_ranks} ranks, {schedule.num_stages} stages, "
        f"{schedule.num_microbatches} microbatches, {kind}"
    )


def format_problem(schedule: Schedule, problem: Problem, more: int = 0) -> str:
    """One line saying what is wrong, then the grid with the faulty actions marked.

    Args:
        schedule: The schedule the problem is in.
        problem: The problem to show.
        more: How many further problems there are (said in the first line).

    Returns:
        The message, then :func:`describe` and the marked grid (just the message for an empty schedule).
    """
    head = problem.message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
    if not any(schedule.ranks):
        return head  # no grid to show
    return f"{head}\n{describe(schedule)}\n{step_grid(schedule, problem.marks)}"


# -- structure ----------------------------------------------------------------------------------


def _neighbours(schedule: Schedule) -> tuple[list[dict[int, int]], list[dict[int, int]]]:
    """Per microbatch: stage -> path predecessor, stage -> path successor."""
    preds: list[dict[int, int]] = []
    succs: list[dict[int, int]] = []
    for m in range(schedule.num_microbatches):
        path = schedule.path(m)
        preds.append({path[i + 1]: path[i] for i in range(len(path) - 1)})
        succs.append({path[i]: path[i + 1] for i in range(len(path) - 1)})
    return preds, succs


def _metadata_problems(schedule: Schedule) -> list[Problem]:
    out: list[Problem] = []
    n_ranks, n_stages = schedule.num_ranks, schedule.num_stages
    if not any(schedule.ranks):
        return [Problem("the schedule has no actions: it needs at least one rank with a forward and a backward "
                        "of every microbatch")]
    # With explicit paths a rank whose stages no path visits may be idle (a lost SkipPipe node).
    visited = None if schedule.paths is None else {s for path in schedule.paths for s in path}
    for r, acts in enumerate(schedule.ranks):
        if not acts and (visited is None or any(s in visited for s in schedule.stages_of_rank(r))):
            out.append(Problem(f"rank {r} has no actions (ranks are 0..{n_ranks - 1}; every rank holds at least one stage)"))
    for s, r in enumerate(schedule.stage_to_rank):
        if not 0 <= r < n_ranks:
            out.append(Problem(f"stage {s} is placed on rank {r}, but the schedule has ranks 0..{n_ranks - 1}"))
    for m in range(schedule.num_microbatches):
        path = schedule.path(m)
        if not path:
            out.append(Problem(f"microbatch {m} has an empty path"))
        elif len(set(path)) != len(path):
            out.append(Problem(f"the path of microbatch {m} visits a stage twice: {list(path)}"))
        elif any(not 0 <= s < n_stages for s in path):
            out.append(Problem(f"the path of microbatch {m} names a stage outside 0..{n_stages - 1}: {list(path)}"))
    return out


def _action_problems(schedule: Schedule, where: dict[Action, Position]) -> list[Problem]:
    """Range, placement and duplicate checks; fills ``where`` with each action's position."""
    out: list[Problem] = []
    n_stages, n_mb = schedule.num_stages, schedule.num_microbatches
    for r, acts in enumerate(schedule.ranks):
        for i, a in enumerate(acts):
            at = f"rank {r} step {i}: {a}"
            if a.stage >= n_stages:
                out.append(Problem(f"{at} names stage {a.stage}, the schedule has stages 0..{n_stages - 1}", ((r, i),)))
            elif a.microbatch >= n_mb:
                out.append(Problem(f"{at} names microbatch {a.microbatch}, the schedule has 0..{n_mb - 1}", ((r, i),)))
            elif schedule.stage_to_rank[a.stage] != r:
                owner = schedule.stage_to_rank[a.stage]
                out.append(Problem(f"{at} is on rank {r}, but stage {a.stage} lives on rank {owner}", ((r, i),)))
            elif a.op.is_comm and a.peer is not None and not 0 <= a.peer < n_stages:
                out.append(Problem(f"{at} names peer stage {a.peer}, the schedule has stages 0..{n_stages - 1}", ((r, i),)))
            elif a in where:
                first = where[a]
                out.append(Problem(f"duplicate {a} on rank {r} (first at rank {first[0]} step {first[1]})", ((r, i),)))
            else:
                where[a] = (r, i)
    return out


def _compute_problems(schedule: Schedule, where: dict[Action, Position]) -> list[Problem]:
    out: list[Problem] = []
    preds, succs = _neighbours(schedule)
    s2r = schedule.stage_to_rank
    for m in range(schedule.num_microbatches):
        for s in schedule.path(m):
            for op in (Op.F, Op.B):
                if Action(s, op, m) not in where:
                    kind = "forward" if op is Op.F else "backward"
                    out.append(Problem(f"missing {Action(s, op, m)}: stage {s} (rank {s2r[s]}) never runs the {kind} of microbatch {m}"))
    for a, (r, i) in where.items():
        if not a.op.is_compute:
            continue
        m = a.microbatch
        if a.stage not in schedule.path(m):
            out.append(Problem(f"{a} on rank {r}: the path of microbatch {m} {list(schedule.path(m))} does not visit stage {a.stage}", ((r, i),)))
            continue
        if a.op is Op.R:  # a recompute sits between its forward and its backward, on their rank
            fwd, bwd = where.get(Action(a.stage, Op.F, m)), where.get(Action(a.stage, Op.B, m))
            if fwd is None or fwd[0] != r or fwd[1] > i:
                out.append(Problem(f"{a} on rank {r} does not follow its forward {Action(a.stage, Op.F, m)} on that rank", ((r, i),)))
            if bwd is None or bwd[0] != r or bwd[1] < i:
                out.append(Problem(f"{a} on rank {r} does not precede its backward {Action(a.stage, Op.B, m)} on that rank", ((r, i),)))
            continue
        if a.op is Op.B:
            fwd = where.get(Action(a.stage, Op.F, m))
            if fwd is not None and fwd[1] > i:
                out.append(Problem(f"{a} runs before its forward {Action(a.stage, Op.F, m)} on rank {r}", ((r, i), fwd)))
            dep = succs[m].get(a.stage)
        else:
            dep = preds[m].get(a.stage)
        if dep is not None and s2r[dep] == r:
            other = where.get(Action(dep, a.op, m))
            if other is not None and other[1] > i:
                role = "forward of its path predecessor" if a.op is Op.F else "backward of its path successor"
                out.append(Problem(f"{a} runs before {Action(dep, a.op, m)}, the {role} stage {dep}, on rank {r}", ((r, i), other)))
    return out


def _comm_problems(schedule: Schedule, where: dict[Action, Position]) -> list[Problem]:
    """Every cross-rank path edge has SEND/RECV in both directions, in the right places."""
    out: list[Problem] = []
    preds, succs = _neighbours(schedule)
    s2r = schedule.stage_to_rank
    for a, (r, i) in where.items():
        if a.op.is_compute:
            continue
        assert a.peer is not None
        m, peer = a.microbatch, a.peer
        # The path edge this action serves, and the compute action that produces or consumes it.
        if a.op in (Op.SEND_F, Op.RECV_B):
            expected, role = succs[m].get(a.stage), "successor"
        else:
            expected, role = preds[m].get(a.stage), "predecessor"
        if expected != peer:
            has = f"is stage {expected}" if expected is not None else "does not exist"
            out.append(Problem(f"{a} on rank {r} talks to stage {peer}, but the path {role} of stage {a.stage} for microbatch {m} {has}", ((r, i),)))
            continue
        if s2r[peer] == r:
            out.append(Problem(f"{a} on rank {r}: stages {a.stage} and {peer} share rank {r}, the handoff is local and needs no communication", ((r, i),)))
            continue
        compute = Action(a.stage, Op.F if a.op in (Op.SEND_F, Op.RECV_F) else Op.B, m)
        cpos = where.get(compute)
        if cpos is not None:
            if a.op.is_send and cpos[1] > i:
                out.append(Problem(f"{a} on rank {r} comes before {compute}, whose output it sends", ((r, i), cpos)))
            if a.op.is_recv and cpos[1] < i:
                out.append(Problem(f"{a} on rank {r} comes after {compute}, which consumes it", ((r, i), cpos)))
        match = a.matching()
        if match not in where:
            out.append(Problem(f"{a} on rank {r} has no matching {match} on rank {s2r[peer]}", ((r, i),)))
    for m in range(schedule.num_microbatches):
        for src, dst in succs[m].items():
            if s2r[src] == s2r[dst]:
                continue
            for send, recv, consumer in (
                (Action(src, Op.SEND_F, m, dst), Action(dst, Op.RECV_F, m, src), Action(dst, Op.F, m)),
                (Action(dst, Op.SEND_B, m, src), Action(src, Op.RECV_B, m, dst), Action(src, Op.B, m)),
            ):
                if send not in where and recv not in where:
                    pos = where.get(consumer)
                    out.append(Problem(
                        f"{consumer} on rank {s2r[consumer.stage]} gets no data: neither {send} nor {recv} is in the schedule",
                        () if pos is None else (pos,),
                    ))
    return out


def check_message_order(schedule: Schedule) -> list[Problem]:
    """Pairs of ranks whose SEND order differs from the peer's RECV order.

    Transports that match point-to-point messages by issue order and ignore tags (NCCL) need
    the same order on both ends; tag-matching transports (gloo) do not. Not part of
    :func:`check_schedule` unless asked for.

    Args:
        schedule: A lowered schedule.

    Returns:
        One :class:`Problem` per rank pair whose orders differ (empty when they agree).
    """
    s2r = schedule.stage_to_rank
    sends: dict[tuple[int, int], list[tuple[MessageKey, Position]]] = {}
    recvs: dict[tuple[int, int], list[tuple[MessageKey, Position]]] = {}
    for r, acts in enumerate(schedule.ranks):
        for i, a in enumerate(acts):
            if a.op.is_comm and a.peer is not None and a.peer < len(s2r):
                table = sends if a.op.is_send else recvs
                pair = (r, s2r[a.peer]) if a.op.is_send else (s2r[a.peer], r)
                table.setdefault(pair, []).append((message_key(a), (r, i)))
    out: list[Problem] = []
    for pair in sorted(set(sends) | set(recvs)):
        s_list, r_list = sends.get(pair, []), recvs.get(pair, [])
        for (sk, sp), (rk, rp) in zip(s_list, r_list):
            if sk != rk:
                out.append(Problem(
                    f"rank {pair[0]} sends {schedule.ranks[sp[0]][sp[1]]} to rank {pair[1]} while rank {pair[1]} posts "
                    f"{schedule.ranks[rp[0]][rp[1]]} in that place: an order-matching transport (NCCL) would mix them up",
                    (sp, rp),
                ))
                break
    return out


# -- the player ---------------------------------------------------------------------------------


def _play(schedule: Schedule, duration: Duration, blocking_recv: bool) -> tuple[Timeline, Problem | None]:
    """Play a structurally valid schedule; returns the timings so far and the deadlock, if any."""
    preds, succs = _neighbours(schedule)
    s2r = schedule.stage_to_rank
    lowered = schedule.is_lowered()
    finished: dict[Action | MessageKey, float] = {}  # compute action -> end; message -> arrival
    n_ranks = schedule.num_ranks
    pos = [0] * n_ranks
    clock = [0.0] * n_ranks
    out: list[list[ActionTiming]] = [[] for _ in range(n_ranks)]

    def needs(a: Action, r: int) -> Action | MessageKey | None:
        """The compute action or message that ``a`` waits for (None: nothing)."""
        m = a.microbatch
        if a.op.is_recv:
            return message_key(a) if blocking_recv else None
        if a.op.is_send or a.op is Op.R:  # a recompute follows its forward on the same rank
            return None
        dep = preds[m].get(a.stage) if a.op is Op.F else succs[m].get(a.stage)
        if dep is None:
            return Action(a.stage, Op.F, m) if a.op is Op.B else None
        if s2r[dep] == r or not lowered:
            return Action(dep, a.op, m)
        return (a.op.value, dep, a.stage, m)

    progress = True
    while progress:
        progress = False
        for r in range(n_ranks):
            acts = schedule.ranks[r]
            while pos[r] < len(acts):
                a = acts[pos[r]]
                need = needs(a, r)
                ready = 0.0 if need is None else finished.get(need)
                if ready is None:
                    break
                start = clock[r]
                if a.op.is_compute:
                    start = max(start, ready)
                    end = start + duration(a)
                    clock[r] = end
                    finished[a] = end
                elif a.op.is_send:
                    end = start + duration(a)
                    finished[message_key(a)] = end
                else:
                    end = max(start + duration(a), ready)
                    if blocking_recv:
                        clock[r] = end
                out[r].append(ActionTiming(r, pos[r], a, start, end))
                pos[r] += 1
                progress = True
    timeline = Timeline(schedule, tuple(tuple(row) for row in out))
    stuck = [r for r in range(n_ranks) if pos[r] < len(schedule.ranks[r])]
    if not stuck:
        return timeline, None
    waits: list[str] = []
    for r in stuck:
        a = schedule.ranks[r][pos[r]]
        need = needs(a, r)
        if isinstance(need, Action):
            waits.append(f"rank {r} waits at {a} for {need} on rank {s2r[need.stage]}")
        elif need is not None:
            direction, src, dst, m = need
            send = Action(src, Op.SEND_F if direction == "F" else Op.SEND_B, m, dst)
            waits.append(f"rank {r} waits at {a} for {send} from rank {s2r[src]}")
    problem = Problem("deadlock: " + "; ".join(waits), tuple((r, pos[r]) for r in stuck))
    return timeline, problem


def check_schedule(schedule: Schedule, *, blocking_recv: bool = False, message_order: bool = False) -> list[Problem]:
    """Every problem of ``schedule``; empty when it is valid.

    Structure first (placement, ranges, duplicates, missing compute, order on each rank,
    SEND/RECV matching for lowered schedules); when that is clean, the player looks for deadlocks.

    Args:
        schedule: compute-only or lowered.
        blocking_recv: play RECV as blocking its rank until the message arrived.
        message_order: also require per rank pair the same SEND and RECV order
            (:func:`check_message_order`).

    Returns:
        Every :class:`Problem` found.
    """
    problems = _metadata_problems(schedule)
    if problems:
        return problems
    where: dict[Action, Position] = {}
    problems = _action_problems(schedule, where)
    if problems:
        return problems
    problems = _compute_problems(schedule, where)
    if schedule.is_lowered():
        problems += _comm_problems(schedule, where)
    if message_order:
        problems += check_message_order(schedule)
    if problems:
        return problems
    _, deadlock = _play(schedule, unit_duration, blocking_recv)
    return [] if deadlock is None else [deadlock]


def validate_schedule(schedule: Schedule, *, blocking_recv: bool = False, message_order: bool = False) -> Schedule:
    """Raise :class:`ScheduleError` for the first problem (message: one line, then the grid).

    Args:
        schedule: Compute-only or lowered.
        blocking_recv: Play RECV as blocking (see :func:`check_schedule`).
        message_order: Also check SEND/RECV order per rank pair.

    Returns:
        ``schedule`` itself, so calls chain: ``validate_schedule(lower(s))``.

    Raises:
        ScheduleError: for the first problem of :func:`check_schedule`.
    """
    problems = check_schedule(schedule, blocking_recv=blocking_recv, message_order=message_order)
    if problems:
        raise ScheduleError(format_problem(schedule, problems[0], len(problems) - 1))
    return schedule


def simulate_schedule(schedule: Schedule, duration: Duration | None = None, *, blocking_recv: bool = False) -> Timeline:
    """Start and end of every action when each takes ``duration(action)`` (default: unit time).

    Args:
        schedule: Compute-only or lowered.
        duration: Time of each action (seconds, or units); ``None``: :func:`unit_duration`.
        blocking_recv: Play RECV as blocking its rank until the message arrived.

    Returns:
        The :class:`Timeline`: start and end of every action, per rank, in ``duration``'s units.

    Raises:
        ScheduleError: when the schedule is invalid or deadlocks (with the marked grid).
    """
    validate_schedule(schedule, blocking_recv=blocking_recv)
    timeline, deadlock = _play(schedule, duration or unit_duration, blocking_recv)
    if deadlock is not None:  # cannot happen after validation: deadlocks do not depend on durations
        raise ScheduleError(format_problem(schedule, deadlock))
    return timeline
