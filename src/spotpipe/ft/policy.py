"""Recovery policy: which strategy rebuilds each lost worker, and why (pure, no torch).

Given the lost workers ``(stage, replica)`` and what survives, :func:`plan_recovery` returns one
:class:`RecoveryPlan` per lost worker: the strategy, the peers whose state it reads, and a
one-line ``why`` for the ``recovery_started`` event. It reads no clock and no tensors, so the
runtime, the in-process convergence mode and the simulator all run the same decision.

Strategies (``ft.strategy``), from most to least exact; each is one module of
:mod:`spotpipe.ft.strategies` holding its rules, and :data:`spotpipe.ft.strategies.REGISTRY` is
the only list of them (its order is ``auto``'s):

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
- ``auto`` (a policy mode): every strategy of the registry that rebuilds single workers, in the
  registry's order: replica, then mirror, then checkfree+ (edges, swap schedule on) / checkfree
  (middle); then the checkpoint.
- ``none`` (a policy mode): no recovery; a loss stops the job.

Rules that keep garbage weights out of training:

- A source is a live worker or one recovered *exactly* (replica, mirror) in this same decision;
  a stage rebuilt approximately (CheckFree) never serves as the source of another rebuild. A
  mirror counts only if its holder survived: a rebuilt holder lost the mirror it kept.
  Exact strategies are resolved first, so a lost stage whose neighbour is recovered exactly
  from a mirror can still be rebuilt by CheckFree.
- If any lost worker cannot be rebuilt, the whole job rolls back to the checkpoint (every lost
  worker's plan says ``checkpoint`` and why); with no checkpoint, every plan says ``stop``. The
  why names, for each strategy tried whose rule covers the worker's position, why it could not
  (:meth:`~spotpipe.ft.strategies.base.Strategy.why_not`); when none covers the position, why
  each is out of scope (:meth:`~spotpipe.ft.strategies.base.Strategy.scope_reason`).

Each plan carries the strategy's learning-rate factor (``lr_scale``: CheckFree's 1.1, else 1.0),
which the runtime applies to the rebuilt worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from spotpipe.config import FT_STRATEGIES, FTConfig
from spotpipe.errors import SpotpipeError
from spotpipe.ft.strategies import REGISTRY, get_strategy
from spotpipe.ft.strategies.base import RecoveryPlan as RecoveryPlan
from spotpipe.ft.strategies.base import Strategy, Survivors
from spotpipe.ft.strategies.base import Worker as Worker
from spotpipe.ft.strategies.checkfree import CHECKFREE_LR_SCALE as CHECKFREE_LR_SCALE
from spotpipe.ft.strategies.checkfree import NAME as CHECKFREE
from spotpipe.ft.strategies.checkfree_plus import NAME as CHECKFREE_PLUS
from spotpipe.ft.strategies.checkfree_plus import swap_partner as swap_partner
from spotpipe.ft.strategies.checkpoint import NAME as CHECKPOINT
from spotpipe.ft.strategies.checkpoint import STOP as STOP
from spotpipe.ft.strategies.checkpoint import rollback
from spotpipe.ft.strategies.mirror import NAME as MIRROR
from spotpipe.ft.strategies.mirror import mirror_holder as mirror_holder
from spotpipe.ft.strategies.replica import NAME as REPLICA

__all__ = [
    "AUTO", "CHECKFREE", "CHECKFREE_LR_SCALE", "CHECKFREE_PLUS", "CHECKPOINT", "EXACT_STRATEGIES", "MIRROR", "NONE",
    "REPLICA", "STOP", "PolicyError", "RecoveryPlan", "Worker", "job_outcome", "mirror_holder", "plan_recovery",
    "rebuilds", "recovery_enabled", "swap_partner", "swap_schedule_on", "tried_strategies", "uses_mirrors",
]

AUTO: Final = "auto"  # policy mode: the registry's strategies in priority order
NONE: Final = "none"  # policy mode: no recovery, a loss stops the job
EXACT_STRATEGIES: Final = tuple(name for name, s in REGISTRY.items() if s.exact)


class PolicyError(SpotpipeError):
    """Inconsistent input to the recovery policy (a worker out of range, lost and alive at once)."""


def _name(strategy: str | FTConfig) -> str:
    """The ``ft.strategy`` value of a name or an ``[ft]`` section, checked.

    Raises:
        PolicyError: if it is not one of :data:`spotpipe.config.FT_STRATEGIES`.
    """
    name = strategy.strategy if isinstance(strategy, FTConfig) else strategy
    if name not in FT_STRATEGIES:
        raise PolicyError(f"ft.strategy must be one of {', '.join(FT_STRATEGIES)}, got {name!r}")
    return name


def tried_strategies(strategy: str | FTConfig) -> tuple[Strategy, ...]:
    """The strategies that may rebuild a single lost worker under ``ft.strategy``, in the order
    :func:`plan_recovery` tries them.

    Args:
        strategy: ``ft.strategy`` or the ``[ft]`` section.

    Returns:
        ``auto``: every registered strategy that rebuilds single workers, in registry (priority)
        order; a strategy's name: it, then the strategies it includes (``checkfree+`` ->
        checkfree+, checkfree); ``none`` and ``checkpoint``: none.

    Raises:
        PolicyError: for a value that is not an ``ft.strategy``.
    """
    name = _name(strategy)
    if name == NONE:
        return ()
    if name == AUTO:
        return tuple(s for s in REGISTRY.values() if s.rebuilds)
    chosen = get_strategy(name)
    return tuple(s for s in (chosen, *(get_strategy(n) for n in chosen.includes)) if s.rebuilds)


def recovery_enabled(strategy: str | FTConfig) -> bool:
    """Whether a lost worker is recovered at all (False only for ``ft.strategy = none``, where a
    loss ends the job).

    Args:
        strategy: ``ft.strategy`` or the ``[ft]`` section.

    Returns:
        False for ``none``, True otherwise.

    Raises:
        PolicyError: for a value that is not an ``ft.strategy``.
    """
    return _name(strategy) != NONE


def uses_mirrors(strategy: str | FTConfig) -> bool:
    """Whether workers keep host-memory mirrors under ``ft.strategy`` (some strategy tried needs
    them: ``auto`` and ``mirror``). ``ft.mirror_every`` and the stage count are the caller's.

    Args:
        strategy: ``ft.strategy`` or the ``[ft]`` section.

    Returns:
        True if a strategy :func:`tried_strategies` returns needs mirrors.

    Raises:
        PolicyError: for a value that is not an ``ft.strategy``.
    """
    return any(s.needs_mirrors for s in tried_strategies(strategy))


def swap_schedule_on(ft: FTConfig) -> bool:
    """Whether the job runs the CheckFree+ swap schedule: ``ft.swap_edges``, or a strategy chosen
    by name that needs it (``ft.strategy = "checkfree+"``).

    Args:
        ft: The job's ``[ft]`` section (``swap_edges`` and ``strategy``).

    Returns:
        True if the swap schedule runs (CheckFree+: Blagoev, Ersoy, Chen 2025).
    """
    chosen = REGISTRY.get(ft.strategy)
    return ft.swap_edges or (chosen is not None and chosen.needs_swap_schedule)


def rebuilds(plan: RecoveryPlan) -> bool:
    """Whether ``plan`` rebuilds its worker from peers (state moves between workers), as opposed
    to a rollback to the checkpoint or a stop.

    Args:
        plan: A plan of :func:`plan_recovery`.

    Returns:
        True if its strategy is registered and rebuilds from peers; False for rollback and stop.
    """
    found = REGISTRY.get(plan.strategy)
    return found is not None and found.rebuilds


def job_outcome(plans: Iterable[RecoveryPlan]) -> str:
    """What the job does about one failure, given its plans.

    Args:
        plans: The plans of :func:`plan_recovery` for the lost workers.

    Returns:
        ``"stop"`` if any plan stops the job, else ``"rollback"`` (to the checkpoint) if any plan
        does not rebuild its worker from peers, else ``"continue"``.
    """
    plans = tuple(plans)
    if any(p.strategy == STOP for p in plans):
        return "stop"
    if not all(rebuilds(p) for p in plans):
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
        One plan per lost worker, in ``(stage, replica)`` order, each with its ``lr_scale``.

    Raises:
        PolicyError: if a worker is out of range, or lost and alive at once, or ``strategy`` is
            not an ``ft.strategy``.
    """
    name = _name(strategy)
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

    if name == NONE:
        return tuple(
            RecoveryPlan(s, r, STOP, f"stage {s} replica {r} lost and ft.strategy = none: stopping the job")
            for s, r in sorted(lost_set)
        )
    order = tried_strategies(name)
    if not order:  # a strategy that rebuilds no single worker: the checkpoint
        return rollback(sorted(lost_set), checkpoint_step, f"ft.strategy = {name}")

    view = Survivors(num_stages, replicas, frozenset(live), frozenset(live), dict(mirrors or {}),
                     dict(mirror_lag or {}), swap_edges)
    pending = sorted(lost_set)
    plans: dict[Worker, RecoveryPlan] = {}
    progress = True
    while pending and progress:
        progress = False
        for strat in order:
            for w in pending:
                plan = strat.plan(w, view)
                if plan is not None:
                    plans[w] = plan
                    pending.remove(w)
                    if plan.exact:
                        view = view.with_source(w)  # an exact rebuild may serve as a source
                    progress = True
                    break
            if progress:
                break  # restart from the most exact strategy: a new source may enable it
    if not pending:
        return tuple(plans[w] for w in sorted(plans))
    causes = [_why_not(w, name, order, view) for w in pending]
    return rollback(sorted(lost_set), checkpoint_step, "; ".join(causes))


def _why_not(w: Worker, name: str, order: tuple[Strategy, ...], view: Survivors) -> str:
    """Why no strategy of ``order`` rebuilt ``w``: each covering strategy's reason, or, when none
    covers the position, why each is out of scope."""
    s, r = w
    covering = [strat for strat in order if strat.covers(s, view.num_stages)]
    if covering:
        parts = [strat.why_not(w, view) for strat in covering]
    else:
        parts = [strat.scope_reason(s, view.num_stages) for strat in order]
    return f"stage {s} replica {r} cannot be rebuilt by ft.strategy = {name} ({', '.join(parts)})"
