"""Which model chunks recompute their activations: from the config, or from the lifetimes the IR shows.

Chronos-Recomp (Lin et al. 2025, arXiv 2503.03182, section 4) recomputes the activations with
poor temporal locality: those that stay resident longest between their forward and their
backward. :func:`chunk_lifetimes` reads those lifetimes off a compute-only schedule, played in
unit time (forward 1, backward 2 per chunk, the usual ratio; Narayanan et al. 2021), and
:func:`recompute_plan` turns ``pipeline.recompute`` / ``pipeline.recompute_chunks`` into the chunk
list that :func:`spotpipe.schedule.passes.add_recompute` inserts ``R`` actions for:

* ``none``: only the chunks listed in ``recompute_chunks``;
* ``all``: every chunk (full activation recomputation, Chen et al. 2016);
* ``longest``: on every rank that holds more than one chunk, the chunk whose activations live
  longest (the shallow chunk of a V; Chronos-Recomp), plus the listed ones. A rank with one
  chunk keeps it resident: recomputing there is ``all``.

Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError
from spotpipe.schedule.validate import simulate_schedule

RecomputeName = Literal["none", "all", "longest"]
"""``pipeline.recompute``: which chunks drop their activations after the forward and recompute them."""
RECOMPUTE_MODES: tuple[str, ...] = get_args(RecomputeName)


def _unit_cost(action: Action) -> float:
    if action.op is Op.F:
        return 1.0
    if action.op is Op.B:
        return 2.0
    return 0.0


def chunk_lifetimes(schedule: Schedule) -> tuple[float, ...]:
    """Mean time each chunk's activation stays resident, per chunk (stage).

    Args:
        schedule: compute-only or lowered, without ``R`` actions.

    Returns:
        Per stage, the mean over microbatches of (end of its ``B``) - (start of its ``F``), in units
        of one chunk forward (backward = 2).

    Raises:
        ScheduleError: the schedule is invalid or deadlocks.
    """
    timeline = simulate_schedule(schedule, _unit_cost)
    start: dict[tuple[int, int], float] = {}
    total = [0.0] * schedule.num_stages
    count = [0] * schedule.num_stages
    for row in timeline.timings:
        for t in row:
            if t.action.op is Op.F:
                start[(t.action.stage, t.action.microbatch)] = t.start
    for row in timeline.timings:
        for t in row:
            if t.action.op is Op.B:
                total[t.action.stage] += t.end - start[(t.action.stage, t.action.microbatch)]
                count[t.action.stage] += 1
    return tuple(total[s] / count[s] if count[s] else 0.0 for s in range(schedule.num_stages))


def chunks_by_lifetime(schedule: Schedule) -> list[int]:
    """Every chunk, the longest-lived activations first (ties: lower index first).

    Args:
        schedule: A compute-only or lowered schedule.

    Returns:
        Chunk (stage) indices, by decreasing activation lifetime.
    """
    life = chunk_lifetimes(schedule)
    return sorted(range(schedule.num_stages), key=lambda s: (-life[s], s))


def recompute_plan(schedule: Schedule, mode: str, chunks: Sequence[int] = ()) -> tuple[int, ...]:
    """The chunks to recompute for ``pipeline.recompute = mode`` and ``pipeline.recompute_chunks``.

    Args:
        schedule: the compute-only schedule the plan is for.
        mode: one of :data:`RECOMPUTE_MODES`.
        chunks: chunk indices to recompute in any mode.

    Returns:
        Sorted chunk indices (possibly empty).

    Raises:
        ScheduleError: an unknown mode, or a chunk the schedule does not have (naming the keys
            and the allowed values).
    """
    if mode not in RECOMPUTE_MODES:
        raise ScheduleError(f"pipeline.recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    bad = sorted(c for c in chunks if not 0 <= c < schedule.num_stages)
    if bad:
        raise ScheduleError(
            f"pipeline.recompute_chunks names chunk(s) {bad}, but the {schedule.name} schedule has chunks "
            f"0..{schedule.num_stages - 1}"
        )
    wanted = set(chunks)
    if mode == "all":
        wanted.update(range(schedule.num_stages))
    elif mode == "longest":
        life = chunk_lifetimes(schedule)
        for r in range(schedule.num_ranks):
            own = schedule.stages_of_rank(r)
            if len(own) > 1:
                wanted.add(max(own, key=lambda s: (life[s], -s)))
    return tuple(sorted(wanted))
