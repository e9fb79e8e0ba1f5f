"""The ``chronos`` schedule: V-shaped chunk placement, one repeating pattern with short activation lifetimes.

ChronosPipe (Lin et al. 2025, "Enhancing Memory Efficiency in Large Language Model Training
Through Chronos-aware Pipeline Parallelism", arXiv 2503.03182) treats device memory as a cache and
shortens how long each activation stays resident. The paper publishes neither code nor the exact
order, so this schedule is built from its principle:

* **V-shaped placement** (as ZB-V, Qi et al. 2024, "Zero Bubble Pipeline Parallelism", and
  DualPipeV): the model is cut into ``2S`` chunks over ``S`` ranks; rank ``r`` holds the shallow
  chunk ``r`` and the deep chunk ``2S-1-r``. A microbatch goes down the ranks through the shallow
  chunks and back up through the deep ones, so the turnaround (chunks ``S-1`` and ``S`` on the last
  rank) and every deep chunk's forward-to-backward gap are short, and rank 0 runs the first and the
  last chunk.
* **One repeating pattern.** Every microbatch follows the same timeline, shifted by one
  *period* of ``2 (f + b)`` (the work one microbatch puts on one rank), found by modulo
  scheduling (Rau 1994): each action of the microbatch's chain (forwards down the V, backwards
  back up) starts as early as its predecessor allows, delayed only where its rank's slot in the
  period is taken. So a microbatch's backward follows its forward after one round trip and never
  later (the "bring the backward forward" rule of Chronos-Pipe), ranks are never idle in the
  steady state, and the step is as long as 1F1B's when the pattern needs no delays.

Why the lifetimes are shorter. In 1F1B rank ``r`` holds ``S - r`` activations of ``1/S`` of the
model, all of rank 0's a full round trip long. In the V, rank ``r``'s shallow chunk lives about
``6S - 3r`` units and its deep chunk about ``3r + 2``: their sum is one round trip on every rank,
so with chunks of ``1/(2S)`` of the model each rank holds about ``(S + 1) / (2S)`` of 1F1B's rank-0
peak (0.63-0.8 for ``S >= 4``; the V-Half point of Qi et al. 2024, "Pipeline Parallelism with
Controllable Memory"), evenly over ranks. :mod:`spotpipe.schedule.memory` shows it on the IR, and
the tests check it.

Every rank's list is its actions sorted by their time in one dependency-respecting timeline, so
under the lowering contract (non-blocking sends, receives that only post) it cannot deadlock; the
validator's player checks it in the tests. Pure: imports :mod:`spotpipe.schedule.ir` only.
"""

from __future__ import annotations

from collections.abc import Sequence

from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError

#: Unit-time costs the list schedule uses (backward = input + weight gradient, twice a forward).
FORWARD_UNITS = 1
BACKWARD_UNITS = 2


def v_stage_to_rank(ranks: int) -> tuple[int, ...]:
    """Rank of each of the ``2 * ranks`` chunks in the V placement.

    Args:
        ranks: pipeline ranks ``S`` (>= 1).

    Returns:
        ``stage_to_rank`` with chunk ``s`` on rank ``s`` for ``s < S`` and on ``2S-1-s`` otherwise
        (ZB-V placement, Qi et al. 2024).
    """
    return tuple(s if s < ranks else 2 * ranks - 1 - s for s in range(2 * ranks))


def _chain(ranks: int) -> list[tuple[Op, int]]:
    """One microbatch's compute actions in dependency order: forwards down the V, backwards up."""
    chunks = 2 * ranks
    return [(Op.F, s) for s in range(chunks)] + [(Op.B, s) for s in reversed(range(chunks))]


def _units(op: Op) -> int:
    return FORWARD_UNITS if op is Op.F else BACKWARD_UNITS


def steady_peak(ranks: int, period: int, offsets: Sequence[int]) -> int:
    """Most chunk activations one rank holds in the steady state of a modulo pattern.

    A chunk's activation of microbatch ``m`` is resident from its forward's start to its
    backward's start (the backward frees it), both shifted by ``period * m``; the peak comes right
    after a forward, so it is the largest count over the forwards' start times.

    Args:
        ranks: pipeline ranks ``S``.
        period: units between microbatches.
        offsets: ``4S`` start times in :func:`_chain` order.

    Returns:
        The peak over ranks, in chunk activations (multiply by one chunk's bytes).
    """
    chain = _chain(ranks)
    start = {(op, stage): o for (op, stage), o in zip(chain, offsets)}
    rank_of = v_stage_to_rank(ranks)
    peak = 0
    for r in range(ranks):
        own = [s for s in range(2 * ranks) if rank_of[s] == r]
        for tau in (start[(Op.F, s)] for s in own):
            held = sum((tau - start[(Op.F, s)]) // period - (tau - start[(Op.B, s)]) // period for s in own)
            peak = max(peak, held)
    return peak


def modulo_offsets(ranks: int, period: int, budget: int = 20_000) -> tuple[int, ...] | None:
    """Start times of one microbatch's actions in a repeating pattern of length ``period``.

    Microbatch ``m`` runs action ``k`` of :func:`_chain` at ``offsets[k] + period * m``. The
    offsets respect the chain (each action starts after the one before it ends) and no two actions
    of one rank overlap modulo ``period`` (modulo scheduling, Rau 1994, "Iterative Modulo
    Scheduling"), so every microbatch follows the same timeline and ranks never conflict. A
    depth-first search tries the smallest delays first; among the patterns with the earliest end
    (the shortest round trip, so the shortest step) it keeps the one whose :func:`steady_peak` is
    lowest.

    Args:
        ranks: pipeline ranks ``S``.
        period: units between consecutive microbatches (>= ``2 (f + b)``, the work one
            microbatch puts on each rank).
        budget: most search nodes to visit.

    Returns:
        ``4S`` offsets in units, or ``None`` when no pattern of this period was found.
    """
    chain = _chain(ranks)
    rank_of = v_stage_to_rank(ranks)
    used = [[False] * period for _ in range(ranks)]
    rest = [sum(_units(op) for op, _ in chain[k:]) for k in range(len(chain) + 1)]
    best: list[int] = []
    best_key = [(1 << 60, 1 << 60)]  # (end, steady peak)
    offsets: list[int] = []
    visits = [0]

    def place(k: int, earliest: int) -> None:
        if visits[0] >= budget:
            return
        visits[0] += 1
        if k == len(chain):
            key = (earliest, steady_peak(ranks, period, offsets))
            if key < best_key[0]:
                best_key[0] = key
                best[:] = offsets
            return
        op, stage = chain[k]
        units = _units(op)
        row = used[rank_of[stage]]
        for delay in range(period):
            start = earliest + delay
            if start + rest[k] > best_key[0][0]:
                return
            slots = [(start + u) % period for u in range(units)]
            if any(row[x] for x in slots):
                continue
            for x in slots:
                row[x] = True
            offsets.append(start)
            place(k + 1, start + units)
            offsets.pop()
            for x in slots:
                row[x] = False

    place(0, 0)
    return tuple(best) if best else None


def chronos_schedule(stages: int, microbatches: int, virtual_stages: int = 2, period: int | None = None) -> Schedule:
    """The ``chronos`` schedule: V placement, one microbatch per ``period``, one repeating pattern.

    Microbatch ``m`` runs its ``4S`` chunk actions at ``modulo_offsets(S, period)`` shifted by
    ``period * m``; each rank's list is its actions sorted by that time. With the default period,
    ``2 (f + b)`` units (exactly the work one microbatch puts on a rank), a rank is never idle in
    the steady state, the step takes ``period (M - 1)`` plus one round trip (1F1B's length when the
    pattern needs no delays), and every activation lives for at most one round trip, which bounds
    what each rank holds (module docstring). When no pattern of the default period exists the
    period grows by one unit until one does.

    Args:
        stages: pipeline ranks ``S`` (>= 1).
        microbatches: microbatches ``M`` per step (>= 1).
        virtual_stages: chunks per rank; the V placement needs exactly 2 (the config's
            ``pipeline.virtual_stages``).
        period: units between microbatches (>= ``2 (f + b)``); default the smallest with a pattern.

    Returns:
        A compute-only schedule with ``2S`` stages on ``S`` ranks, named ``chronos``.

    Raises:
        ScheduleError: an argument below 1, ``virtual_stages != 2``, or a period below
            ``2 (f + b)`` units or without a pattern.
    """
    for name, value in (("stages", stages), ("microbatches", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be an integer >= 1, got {value!r}")
    if virtual_stages != 2:
        raise ScheduleError(
            f"the chronos schedule places 2 chunks per rank (V shape): pipeline.virtual_stages must be 2, got {virtual_stages}"
        )
    work = 2 * (FORWARD_UNITS + BACKWARD_UNITS)
    if period is not None and period < work:
        raise ScheduleError(f"chronos schedule: period must be >= {work} units (one microbatch's work per rank), got {period}")
    gap = work if period is None else period
    offsets = modulo_offsets(stages, gap)
    while offsets is None and period is None and gap < 2 * work:
        gap += 1
        offsets = modulo_offsets(stages, gap)
    if offsets is None:
        raise ScheduleError(f"chronos schedule: no repeating pattern of period {gap} for {stages} ranks")
    s2r = v_stage_to_rank(stages)
    timed: list[list[tuple[int, Action]]] = [[] for _ in range(stages)]
    for m in range(microbatches):
        for (op, stage), offset in zip(_chain(stages), offsets):
            timed[s2r[stage]].append((offset + gap * m, Action(stage, op, m)))
    return Schedule(
        ranks=tuple(tuple(a for _, a in sorted(row)) for row in timed),
        num_stages=2 * stages,
        num_microbatches=microbatches,
        stage_to_rank=s2r,
        name="chronos",
    )
