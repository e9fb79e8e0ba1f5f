"""Controller side of an elastic reshape (``ft.elastic``): from the role table to a new shape.

The decision is :func:`spotpipe.ft.elastic.next_shape`, the same pure policy the simulator plays
(:mod:`spotpipe.sim.elastic`). This module puts the runtime's facts into it and its answer into
the recovery record the workers carry out (:mod:`spotpipe.runtime.worker.reshape`):

- :func:`shape_now`: the shape of the job as the role table has it, lost workers still in their
  positions, the waiting spares (and workers a shrink left standing by) as standbys;
- :func:`block_sources`: who sends each move's blocks. A move from a live worker is sent by it; a
  lost worker's blocks come from the worker that holds its stage's mirror (``((s - 1) mod S, r)``,
  :func:`spotpipe.ft.strategies.mirror.mirror_holder`), only if that mirror is of the step the
  job resumes at, so the new shape continues exactly (without a current mirror there is nothing
  exact to move, and the job waits for a replacement instead);
- :func:`reshape_record`: the ``outcome = "reshape"`` record, with each replica's microbatches of
  the global batch (:func:`spotpipe.ft.elastic.deal_microbatches`), so every shape trains on the
  same samples in the same order.

Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spotpipe.config import JobConfig
from spotpipe.errors import SpotpipeError
from spotpipe.ft.elastic import Shape, ShapeDecision, deal_microbatches
from spotpipe.ft.strategies.mirror import mirror_holder


def shape_now(layers: Sequence[tuple[int, int]], replicas: int, role_of: Mapping[tuple[int, int], int],
              lost: Mapping[int, tuple[int, int]], standby: Sequence[int]) -> Shape:
    """The job's shape from its role table.

    Args:
        layers: Per stage, its ``[start, end)`` blocks (the shape in force).
        replicas: Replicas of the shape in force.
        role_of: ``(stage, replica)`` -> worker id, for the positions held.
        lost: Lost worker id -> its ``(stage, replica)``: the position keeps it (a spare that took
            the role holds no state yet: it is a standby).
        standby: Live spares, and spares that took a lost role.

    Returns:
        The shape.

    Raises:
        ValueError: a position has neither a holder nor a lost worker.
    """
    by_role = {role: w for w, role in lost.items()}
    rows = []
    for r in range(replicas):
        row = []
        for s in range(len(layers)):
            w = by_role.get((s, r), role_of.get((s, r)))  # a spare that took a lost role is no holder yet
            if w is None:
                raise ValueError(f"position (stage {s}, replica {r}) has no worker, live or lost")
            row.append(w)
        rows.append(tuple(row))
    active = {w for row in rows for w in row}
    return Shape(tuple(layers), tuple(rows), tuple(w for w in standby if w not in active))


def block_sources(decision: ShapeDecision, lost: Sequence[int], mirror_steps: Mapping[int, int | None],
                  resume_step: int, mirrors: bool) -> tuple[list[dict[str, Any]] | None, str]:
    """The sender of every move of ``decision`` (module docstring).

    Args:
        decision: A shrink or grow of :func:`spotpipe.ft.elastic.next_shape`.
        lost: Workers lost now.
        mirror_steps: Per live worker, the step of the mirror it holds (None: none).
        resume_step: The step the new shape replays first, 0-based.
        mirrors: Whether the job keeps mirrors (``ft.strategy`` ``auto`` or ``mirror``).

    Returns:
        ``(moves, "")`` with one ``{"layers", "from", "mirror", "to"}`` per move, or ``(None, why)``
        when a lost worker's blocks have no exact copy.
    """
    old, new = decision.from_shape, decision.to_shape
    staying = set(new.active)
    out: list[dict[str, Any]] = []
    for m in decision.moves:
        source, from_mirror = m.from_worker, False
        if source is not None and source not in staying:  # it stands by now: another holder of that stage sends
            source = next((row[m.from_stage] for row in old.workers if row[m.from_stage] in staying), None)
        if source is None:
            if not mirrors:
                return None, f"blocks {m.layers[0]}..{m.layers[1] - 1} of the lost stage {m.from_stage} have no mirror (ft.strategy keeps none)"
            for r, row in enumerate(old.workers):
                hs, hr = mirror_holder(m.from_stage, r, old.stages)
                holder = old.workers[hr][hs]
                if holder in lost or holder not in staying or holder == row[m.from_stage]:
                    continue
                if mirror_steps.get(holder) == resume_step - 1:
                    source, from_mirror = holder, True
                    break
            if source is None:
                return None, (f"blocks {m.layers[0]}..{m.layers[1] - 1} of the lost stage {m.from_stage} have no current "
                              f"mirror (its holder was lost too, or its copy is not of step {resume_step})")
        out.append({"layers": list(m.layers), "from": source, "mirror": from_mirror, "to": m.to_worker})
    return out, ""


def reshape_record(decision: ShapeDecision, moves: list[dict[str, Any]], resume_step: int, sampler: Any,
                   total_microbatches: int, lost: Sequence[int]) -> dict[str, Any]:
    """The recovery record of a reshape generation.

    Args:
        decision: The shrink or grow.
        moves: :func:`block_sources`' moves.
        resume_step: The step the new shape replays first.
        sampler: A survivor's sampler state (the data position of ``resume_step``).
        total_microbatches: Microbatches of the global batch (configured replicas x microbatches).
        lost: Workers lost now.

    Returns:
        ``{"outcome": "reshape", "resume_step", "sampler", "plans": [], "new_workers", "shape": {layers,
        deal, old_layers, moves, parked}}``.
    """
    old, new = decision.from_shape, decision.to_shape
    old_layers = {str(w): list(old.layers[s]) for row in old.workers for s, w in enumerate(row) if w not in lost}
    parked = [w for w in old.active if w not in lost and w not in new.active]
    return {
        "outcome": "reshape",
        "resume_step": resume_step,
        "sampler": sampler,
        "plans": [],
        "new_workers": [w for w in new.active if w not in old.active],
        "shape": {
            "layers": [list(span) for span in new.layers],
            "deal": [list(row) for row in deal_microbatches(total_microbatches, new.replicas)],
            "old_layers": old_layers,
            "moves": moves,
            "parked": parked,
        },
    }


def elastic_floor_note(cfg: JobConfig) -> str:
    """What an elastic job can shrink to, said before it starts: the policy
    (:func:`spotpipe.ft.elastic.next_shape`) is played losing one worker after another, and the
    last shape it takes is the floor.

    Args:
        cfg: The job (``ft.elastic``, ``ft.min_workers``, ``pipeline.memory_budget_gb``).

    Returns:
        One line (empty without ``ft.elastic``).

    Raises:
        SpotpipeError: the configured shape itself is over ``pipeline.memory_budget_gb``.
    """
    from spotpipe.ft.elastic import elastic_cost, initial_shape, limits_from, next_shape, peak_memory

    if not cfg.ft.elastic:
        return ""
    p = cfg.pipeline
    cost, limits = elastic_cost(cfg), limits_from(cfg)
    shape = initial_shape(cfg.model.layers, p.stages, p.replicas)
    need, stage = peak_memory(shape, cost)
    if limits.memory_bytes > 0 and need > limits.memory_bytes:
        raise SpotpipeError(f"pipeline.memory_budget_gb = {p.memory_budget_gb:g}: the configured shape {shape.label} needs "
                            f"{need / 1e9:.3g} GB on stage {stage} (ft.elastic checks every shape against it)")
    from spotpipe.ft.policy import uses_mirrors

    if p.replicas == 1 and not uses_mirrors(cfg.ft):
        return (f"ft.elastic: with one replica a shrink moves the lost stage's blocks from its mirror, which "
                f"ft.strategy = {cfg.ft.strategy} does not keep: a lost worker waits for a replacement (use auto or mirror)")
    floor = ""
    while len(shape.active) > 1:
        decision = next_shape(shape, [shape.active[-1]], [], cost, limits)
        if decision.kind == "wait":
            floor = " (ft.min_workers or pipeline.memory_budget_gb rule out fewer: then it waits for a replacement)"
            break
        shape = decision.to_shape
    n = len(shape.active)
    if n == p.stages * p.replicas:
        return f"ft.elastic: ft.min_workers = {cfg.ft.min_workers} leaves no smaller shape: a lost worker waits for a replacement"
    return (f"ft.elastic: a lost worker with no spare shrinks the job, down to {shape.label} ({n} worker{'s' if n > 1 else ''})"
            f"{floor}; workers that join grow it back")
