"""Recovery policy: which strategy rebuilds each lost worker, and why (pure, no torch).

Given the lost workers ``(stage, replica)`` and what survives, :func:`plan_recovery` returns one
:class:`RecoveryPlan` per lost worker: the strategy, the peers whose state it reads, and a
one-line ``why`` for the ``recovery_started`` event. It reads no clock and no tensors, so the
runtime, the in-process convergence mode and the simulator all run the same decision.

Strategies (``ft.strategy``), from most to least exact:

- ``replica``: copy weights and optimizer state from a live data-parallel replica of the same
  stage (checkpointless peer replication, SageMaker HyperPod 2025). Exact.
- ``mirror``: copy the host-memory mirror that the previous stage's worker keeps of this stage
  (worker ``(s-1) mod S`` mirrors ``s``, same replica; HyperPod-style peer replication). Exact
  when the mirror is refreshed every step (``ft.mirror_every = 1``), else a few steps behind.
- ``checkfree``: a lost *middle* stage becomes the gradient-norm-weighted average of its two
  neighbours, learning rate x1.1, fresh optimizer state (CheckFree; Blagoev, Ersoy, Chen 2025,
  "All is Not Lost: LLM Recovery without Checkpoints", section 3). Approximate.
- ``checkfree+``: with the swap schedule on (:func:`spotpipe.schedule.swap.swap_edges`), a lost
  *edge* stage (first or last) is copied from its swap partner (stage 1, resp. S-2), which also
  holds a copy of the embedding, resp. final norm and LM head; middle stages use CheckFree
  (CheckFree+, same paper, section 3.2). Approximate for the blocks, exact for embedding/head.
- ``checkpoint``: the whole job rolls back to the last periodic checkpoint. The baseline, and
  the only way out when two adjacent stages are lost with no replica or mirror.
- ``auto``: replica, then mirror, then checkfree+ (edges, swap schedule on) / checkfree (middle),
  then checkpoint.
- ``none``: no recovery; a loss stops the job.

Rules that keep garbage weights out of training:

- A source is a live worker or one recovered *exactly* (replica, mirror) in this same decision;
  a stage rebuilt approximately (CheckFree) never serves as the source of another rebuild. A
  mirror counts only if its holder survived: a rebuilt holder lost the mirror it kept.
  Exact strategies are resolved first, so a lost stage whose neighbour is recovered exactly
  from a mirror can still be rebuilt by CheckFree.
- If any lost worker cannot be rebuilt, the whole job rolls back to the checkpoint (every lost
  worker's plan says ``checkpoint`` and why); with no checkpoint, every plan says ``stop``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from spotpipe.config import FT_STRATEGIES, FTConfig
from spotpipe.errors import SpotpipeError

Worker = tuple[int, int]  # (stage, replica)

REPLICA = "replica"
MIRROR = "mirror"
CHECKFREE = "checkfree"
CHECKFREE_PLUS = "checkfree+"
CHECKPOINT = "checkpoint"
STOP = "stop"
EXACT_STRATEGIES = (REPLICA, MIRROR)
CHECKFREE_LR_SCALE = 1.1  # CheckFree (Blagoev et al. 2025): the rebuilt stage trains at 1.1x lr


class PolicyError(SpotpipeError):
    """Inconsistent input to the recovery policy (a worker out of range, lost and alive at once)."""


@dataclass(frozen=True)
class RecoveryPlan:
    """How one lost worker is rebuilt.

    Attributes:
        stage: Lost worker's pipeline stage.
        replica: Lost worker's data-parallel replica.
        strategy: ``replica``, ``mirror``, ``checkfree``, ``checkfree+``, ``checkpoint`` or ``stop``.
        why: One line for the event log.
        sources: Workers whose state is read, in the order the recovery function takes them:
            replica -> (the replica,), mirror -> (the mirror holder,), checkfree -> (previous
            stage, next stage), checkfree+ on an edge -> (the swap partner,).
        exact: The rebuilt state equals the lost state (replica, or a mirror 0 steps behind).
        lr_scale: Learning-rate multiplier the rebuilt worker trains with from now on.
        checkpoint_step: For ``checkpoint``, the step the whole job rolls back to.
    """

    stage: int
    replica: int
    strategy: str
    why: str
    sources: tuple[Worker, ...] = ()
    exact: bool = False
    lr_scale: float = 1.0
    checkpoint_step: int | None = None

    @property
    def worker(self) -> Worker:
        return (self.stage, self.replica)


def mirror_holder(stage: int, replica: int, num_stages: int) -> Worker:
    """The worker that keeps the host-memory mirror of ``(stage, replica)``: the previous stage
    of the same replica, wrapping around (the last stage mirrors stage 0)."""
    return ((stage - 1) % num_stages, replica)


def swap_partner(stage: int, num_stages: int) -> int | None:
    """CheckFree+ swap partner of an edge stage (0 <-> 1, S-1 <-> S-2); ``None`` for the others."""
    if num_stages < 4:
        return None
    if stage == 0:
        return 1
    if stage == num_stages - 1:
        return num_stages - 2
    return None


def swap_schedule_on(ft: FTConfig) -> bool:
    """Whether the job runs the CheckFree+ swap schedule (``ft.swap_edges``, always on with
    ``ft.strategy = "checkfree+"``)."""
    return ft.swap_edges or ft.strategy == CHECKFREE_PLUS


def job_outcome(plans: Iterable[RecoveryPlan]) -> str:
    """``"stop"``, ``"rollback"`` (to a checkpoint) or ``"continue"`` for a set of plans."""
    strategies = {p.strategy for p in plans}
    if STOP in strategies:
        return "stop"
    if CHECKPOINT in strategies:
        return "rollback"
    return "continue"


def plan_recovery(
    lost: Iterable[Worker],
    num_stages: int,
    *,
    replicas: int = 1,
    strategy: str | FTConfig = "auto",
    alive: Iterable[Worker] | None = None,
    mirrors: Mapping[Worker, Worker] | None = None,
    mirror_lag: Mapping[Worker, int] | None = None,
    checkpoint_step: int | None = None,
    swap_edges: bool = False,
) -> tuple[RecoveryPlan, ...]:
    """Decide how to rebuild every lost worker.

    Args:
        lost: Lost workers ``(stage, replica)``, lost together (one failure event).
        num_stages: Pipeline stages (model chunks) S.
        replicas: Data-parallel replicas of every stage.
        strategy: ``ft.strategy`` (one of :data:`spotpipe.config.FT_STRATEGIES`) or the ``[ft]``
            section itself.
        alive: Workers with valid state; default every worker not in ``lost``.
        mirrors: For a worker whose state is mirrored, the worker holding the mirror (usually
            :func:`mirror_holder`). Only mirrors that are complete (a finished refresh) belong
            here; the policy uses one only if its holder is alive.
        mirror_lag: Steps each mirror is behind (0 = refreshed after the last committed step);
            missing means 0.
        checkpoint_step: Step of the newest complete checkpoint, ``None`` if there is none.
        swap_edges: Whether the CheckFree+ swap schedule is on (edge stages have copies).

    Returns:
        One plan per lost worker, in ``(stage, replica)`` order.

    Raises:
        PolicyError: if a worker is out of range, or lost and alive at once.
    """
    name = strategy.strategy if isinstance(strategy, FTConfig) else strategy
    if name not in FT_STRATEGIES:
        raise PolicyError(f"ft.strategy must be one of {', '.join(FT_STRATEGIES)}, got {name!r}")
    if num_stages < 1 or replicas < 1:
        raise PolicyError(f"need num_stages >= 1 and replicas >= 1, got {num_stages} and {replicas}")
    lost_set = set(lost)
    everyone = {(s, r) for s in range(num_stages) for r in range(replicas)}
    for w in lost_set:
        if w not in everyone:
            raise PolicyError(f"lost worker {w} is not a (stage, replica) of a {num_stages}-stage, {replicas}-replica job")
    live = (everyone - lost_set) if alive is None else set(alive)
    if live & lost_set:
        raise PolicyError(f"workers {sorted(live & lost_set)} are both lost and alive")
    if not lost_set:
        return ()
    mirrors = dict(mirrors or {})
    lags = dict(mirror_lag or {})

    if name == "none":
        return tuple(
            RecoveryPlan(s, r, STOP, f"stage {s} replica {r} lost and ft.strategy = none: stopping the job")
            for s, r in sorted(lost_set)
        )
    if name == CHECKPOINT:
        return _rollback(sorted(lost_set), checkpoint_step, "ft.strategy = checkpoint")

    order = {
        "auto": (REPLICA, MIRROR, CHECKFREE_PLUS, CHECKFREE),
        REPLICA: (REPLICA,),
        MIRROR: (MIRROR,),
        CHECKFREE: (CHECKFREE,),
        CHECKFREE_PLUS: (CHECKFREE_PLUS, CHECKFREE),
    }[name]
    exact_sources = set(live)  # live workers and exactly recovered ones
    pending = sorted(lost_set)
    plans: dict[Worker, RecoveryPlan] = {}
    progress = True
    while pending and progress:
        progress = False
        for strat in order:
            for w in pending:
                plan = _try(strat, w, num_stages, replicas, exact_sources, live, mirrors, lags, swap_edges)
                if plan is not None:
                    plans[w] = plan
                    pending.remove(w)
                    if plan.exact:
                        exact_sources.add(w)
                    progress = True
                    break
            if progress:
                break  # restart from the most exact strategy: a new source may enable it
    if not pending:
        return tuple(plans[w] for w in sorted(plans))
    causes = [_why_not(w, name, order, num_stages, replicas, lost_set, exact_sources, mirrors, swap_edges) for w in pending]
    return _rollback(sorted(lost_set), checkpoint_step, "; ".join(causes))


def _try(
    strat: str,
    w: Worker,
    num_stages: int,
    replicas: int,
    sources: set[Worker],
    live: set[Worker],
    mirrors: Mapping[Worker, Worker],
    lags: Mapping[Worker, int],
    swap_edges: bool,
) -> RecoveryPlan | None:
    s, r = w
    if strat == REPLICA:
        for other in sorted(range(replicas), key=lambda x: (x == r, x)):
            if other != r and (s, other) in sources:
                return RecoveryPlan(
                    s, r, REPLICA, f"stage {s} replica {r}: copy weights and optimizer state from live replica {other} (exact)",
                    sources=((s, other),), exact=True,
                )
        return None
    if strat == MIRROR:
        holder = mirrors.get(w)
        if holder is None or holder not in live:  # a rebuilt holder lost the mirror it kept
            return None
        lag = int(lags.get(w, 0))
        behind = "exact" if lag == 0 else f"{lag} step{'s' if lag != 1 else ''} behind"
        return RecoveryPlan(
            s, r, MIRROR,
            f"stage {s} replica {r}: copy the host-memory mirror held by stage {holder[0]} replica {holder[1]} ({behind})",
            sources=(holder,), exact=lag == 0,
        )
    if strat == CHECKFREE:
        if s == 0 or s == num_stages - 1:
            return None
        prev, nxt = _neighbour(s - 1, r, replicas, sources), _neighbour(s + 1, r, replicas, sources)
        if prev is None or nxt is None:
            return None
        return RecoveryPlan(
            s, r, CHECKFREE,
            f"stage {s} replica {r}: gradient-norm-weighted average of stages {s - 1} and {s + 1}, "
            f"fresh optimizer state, lr x{CHECKFREE_LR_SCALE:g} (CheckFree)",
            sources=(prev, nxt), lr_scale=CHECKFREE_LR_SCALE,
        )
    if strat == CHECKFREE_PLUS:
        partner = swap_partner(s, num_stages)
        if partner is None or not swap_edges:
            return None
        src = _neighbour(partner, r, replicas, sources)
        if src is None:
            return None
        part = "embedding" if s == 0 else "final norm and LM head"
        return RecoveryPlan(
            s, r, CHECKFREE_PLUS,
            f"edge stage {s} replica {r}: copy blocks and optimizer state of swap partner stage {partner}, "
            f"{part} from its in-sync copy (CheckFree+)",
            sources=(src,),
        )
    raise AssertionError(strat)  # pragma: no cover


def _neighbour(stage: int, replica: int, replicas: int, sources: set[Worker]) -> Worker | None:
    """A source worker of ``stage``, preferring the same replica."""
    for other in sorted(range(replicas), key=lambda x: (x != replica, x)):
        if (stage, other) in sources:
            return (stage, other)
    return None


def _why_not(
    w: Worker,
    name: str,
    order: tuple[str, ...],
    num_stages: int,
    replicas: int,
    lost: set[Worker],
    sources: set[Worker],
    mirrors: Mapping[Worker, Worker],
    swap_edges: bool,
) -> str:
    s, r = w
    parts: list[str] = []
    if REPLICA in order:
        parts.append("no live replica" if replicas > 1 else "no replicas (pipeline.replicas = 1)")
    if MIRROR in order:
        holder = mirrors.get(w)
        parts.append("no fresh mirror" if holder is None else f"its mirror holder (stage {holder[0]} replica {holder[1]}) is lost too")
    edge = s == 0 or s == num_stages - 1
    if CHECKFREE in order or CHECKFREE_PLUS in order:
        if edge:
            partner = swap_partner(s, num_stages)
            if CHECKFREE_PLUS not in order:
                parts.append("CheckFree cannot rebuild an edge stage (ft.strategy = checkfree+ can)")
            elif partner is None:
                parts.append(f"CheckFree+ needs >= 4 stages, the job has {num_stages}")
            elif not swap_edges:
                parts.append("the CheckFree+ swap schedule is off (ft.swap_edges = false)")
            else:
                parts.append(f"its swap partner stage {partner} is lost too")
        else:
            gone = [n for n in (s - 1, s + 1) if _neighbour(n, r, replicas, sources) is None]
            parts.append(f"adjacent stage{'s' if len(gone) > 1 else ''} {' and '.join(map(str, gone))} lost together with it, "
                         "so CheckFree has no two neighbours")
    return f"stage {s} replica {r} cannot be rebuilt by ft.strategy = {name} ({', '.join(parts)})"


def _rollback(lost: list[Worker], checkpoint_step: int | None, cause: str) -> tuple[RecoveryPlan, ...]:
    if checkpoint_step is None:
        return tuple(
            RecoveryPlan(s, r, STOP, f"stopping the job: {cause}; and there is no checkpoint to roll back to "
                                     "(train.checkpoint_every = 0 or none written yet)")
            for s, r in lost
        )
    return tuple(
        RecoveryPlan(s, r, CHECKPOINT, f"whole job rolls back to the checkpoint of step {checkpoint_step}: {cause}",
                     checkpoint_step=checkpoint_step)
        for s, r in lost
    )
