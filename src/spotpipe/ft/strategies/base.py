"""What every recovery strategy is made of: the plan it returns, what it may read, its interface.

A recovery strategy rebuilds the state of one lost worker ``(stage, replica)`` from what survives
(live workers, host-memory mirrors) or, for the checkpoint, rolls the whole job back. Each
strategy is one module of this package holding its rules as a :class:`Strategy`:

- whether it covers the lost worker's position at all (:meth:`Strategy.covers`), and if not, why
  (:meth:`Strategy.scope_reason`);
- its plan for the worker, naming the live workers it reads (:meth:`Strategy.plan`), or why it
  cannot rebuild the worker now (:meth:`Strategy.why_not`);
- the bytes each of those sources sends (:meth:`Strategy.source_bytes`, from :class:`StageBytes`);
- whether the rebuilt state is exact, its learning-rate factor, and what each source sends
  (:data:`Payload`).

:func:`spotpipe.ft.policy.plan_recovery` tries the strategies in the order of
:data:`spotpipe.ft.strategies.REGISTRY`; the simulator prices the plans with
:meth:`Strategy.source_bytes`; the runtime reads the plan's ``lr_scale`` and the strategy's
payload. Pure Python: no torch, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from spotpipe.config import StrategyName
from spotpipe.model.partition import ADAMW_MOMENTS

Worker = tuple[int, int]  # (stage, replica)


Payload = Literal["full_state", "mirror", "blocks", "none"]
"""What each source of a plan sends to the rebuilt worker:

- ``full_state``: its own weights and optimizer state (weights + 2 AdamW moments);
- ``mirror``: the host-memory copy it keeps of the lost worker (weights + 2 AdamW moments);
- ``blocks``: its own transformer-block weights and its gradient norm (CheckFree's average);
- ``none``: nothing moves peer to peer (a rollback reads the checkpoint files).
"""


@dataclass(frozen=True)
class RecoveryPlan:
    """How one lost worker is rebuilt.

    Attributes:
        stage: Lost worker's pipeline stage.
        replica: Lost worker's data-parallel replica.
        strategy: A name of :data:`spotpipe.ft.strategies.REGISTRY` (``replica``, ``mirror``,
            ``checkfree``, ``checkfree+``, ``checkpoint``) or ``stop``.
        why: One line for the event log.
        sources: Workers whose state is read, in the order the recovery function takes them:
            replica -> (the replica,), mirror -> (the mirror holder,), checkfree -> (previous
            stage, next stage), checkfree+ on an edge -> (the swap partner,).
        exact: The rebuilt state equals the lost state (replica, or a mirror 0 steps behind).
        lr_scale: The strategy's learning-rate factor (:attr:`Strategy.lr_scale`): the
            multiplier a worker rebuilt from fresh state trains with from now on (CheckFree:
            1.1). Strategies that copy a peer's state (replica, mirror, CheckFree+) say 1.0; the
            copied state carries its own factor, which the runtime keeps.
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
        """``(stage, replica)`` of the lost worker."""
        return (self.stage, self.replica)


@dataclass(frozen=True)
class StageBytes:
    """Bytes of each pipeline rank's state, from the model shapes.

    Attributes:
        weights: Per rank, the parameter bytes of every chunk it holds, in ``model.dtype``.
        blocks: Per rank, the part of ``weights`` in transformer blocks (what CheckFree averages).
    """

    weights: tuple[int, ...]
    blocks: tuple[int, ...]

    def full(self, rank: int) -> int:
        """Weights plus the two AdamW moments (same dtype) of ``rank``: 3 x its parameter bytes,
        e.g. 12 bytes per parameter in float32.

        Args:
            rank: Pipeline rank, ``0 <= rank < len(weights)``.

        Returns:
            Bytes of weights and optimizer state of ``rank``.

        Raises:
            IndexError: if ``rank`` is out of range.
        """
        return (1 + ADAMW_MOMENTS) * self.weights[rank]


@dataclass(frozen=True)
class Survivors:
    """What a strategy may read when it plans one lost worker (one failure event).

    Attributes:
        num_stages: Pipeline stages S.
        replicas: Data-parallel replicas R of every stage.
        live: Workers that survived with valid state.
        sources: Workers that may serve as a source: the live ones plus those rebuilt *exactly*
            earlier in the same decision (an approximate rebuild never serves as a source).
        mirrors: For a lost worker whose state is mirrored, the worker holding a complete mirror.
        mirror_lag: Steps each mirror is behind (missing: 0).
        swap_edges: The CheckFree+ swap schedule is on (edge stages have in-sync copies).
    """

    num_stages: int
    replicas: int
    live: frozenset[Worker]
    sources: frozenset[Worker]
    mirrors: Mapping[Worker, Worker]
    mirror_lag: Mapping[Worker, int]
    swap_edges: bool

    def with_source(self, worker: Worker) -> Survivors:
        """The same survivors with ``worker`` (just rebuilt exactly) added to the sources.

        Args:
            worker: The rebuilt ``(stage, replica)``.

        Returns:
            A copy whose ``sources`` include ``worker``.
        """
        return replace(self, sources=self.sources | {worker})

    def source_of(self, stage: int, replica: int) -> Worker | None:
        """A source worker of ``stage``, preferring ``replica``, then the lowest other replica;
        ``None`` when no replica of that stage can serve.

        Args:
            stage: Pipeline stage wanted.
            replica: Preferred replica (the lost worker's).

        Returns:
            A ``(stage, replica)`` in ``sources``, or ``None``.
        """
        for other in sorted(range(self.replicas), key=lambda x: (x != replica, x)):
            if (stage, other) in self.sources:
                return (stage, other)
        return None


def is_edge(stage: int, num_stages: int) -> bool:
    """Whether ``stage`` is the first or the last of ``num_stages`` pipeline stages.

    Args:
        stage: Pipeline stage, ``0 <= stage < num_stages``.
        num_stages: Pipeline stages S.

    Returns:
        True for stage 0 and stage S - 1.
    """
    return stage == 0 or stage == num_stages - 1


class Strategy(Protocol):
    """One recovery strategy's rules (each module of :mod:`spotpipe.ft.strategies` has one).

    Attributes:
        name: Its ``ft.strategy`` value and the ``strategy`` of its plans.
        exact: Its rebuilt state equals the lost state whenever its source is current (replica;
            a mirror refreshed after the last committed step). The plan's own ``exact`` says
            whether this one is.
        lr_scale: Learning-rate factor of a worker it rebuilds from fresh state (CheckFree:
            1.1); 1.0 for strategies that copy a peer's state with the factor it carries.
        payload: What each source sends (:data:`Payload`).
        rebuilds: It rebuilds one worker from live peers; False: it rolls the whole job back.
        includes: Further strategies its rule relies on for positions it does not cover, tried
            after it when it is chosen by name (CheckFree+ -> CheckFree for middle stages).
        needs_mirrors: Workers must keep host-memory mirrors of their successors for it.
        needs_swap_schedule: Choosing it by name turns the CheckFree+ swap schedule on.
    """

    @property
    def name(self) -> StrategyName: ...

    @property
    def exact(self) -> bool: ...

    @property
    def lr_scale(self) -> float: ...

    @property
    def payload(self) -> Payload: ...

    @property
    def rebuilds(self) -> bool: ...

    @property
    def includes(self) -> tuple[StrategyName, ...]: ...

    @property
    def needs_mirrors(self) -> bool: ...

    @property
    def needs_swap_schedule(self) -> bool: ...

    def covers(self, stage: int, num_stages: int) -> bool:
        """Whether its rule is about ``stage`` at all (CheckFree: middle stages only).

        Args:
            stage: Lost worker's stage, ``0 <= stage < num_stages``.
            num_stages: Pipeline stages S.

        Returns:
            True if the strategy's rule applies to ``stage`` (maybe not now: see :meth:`plan`).
        """
        ...

    def scope_reason(self, stage: int, num_stages: int) -> str:
        """Why it can never rebuild ``stage`` (asked when no strategy tried covers ``stage``).

        Args:
            stage: Lost worker's stage, ``0 <= stage < num_stages``.
            num_stages: Pipeline stages S.

        Returns:
            One sentence for the rollback's reason, e.g. ``"stage 2 has no mirror"``.
        """
        ...

    def plan(self, worker: Worker, survivors: Survivors) -> RecoveryPlan | None:
        """Its plan for the lost ``worker`` given ``survivors``, or ``None`` if it cannot now.

        Args:
            worker: The lost ``(stage, replica)``.
            survivors: What is left to read from.

        Returns:
            A plan whose ``strategy`` is :attr:`name`, with its sources, exactness, ``lr_scale`` and a one-line ``why``; ``None`` otherwise.
        """
        ...

    def why_not(self, worker: Worker, survivors: Survivors) -> str:
        """Why :meth:`plan` returned ``None`` for a covered ``worker`` (a short clause, e.g.
        ``"no live replica"``), for the rollback's reason.

        Args:
            worker: The lost ``(stage, replica)``.
            survivors: What is left to read from.

        Returns:
            A short clause, e.g. ``"no live replica"``.
        """
        ...

    def source_bytes(self, plan: RecoveryPlan, sizes: StageBytes) -> tuple[int, ...]:
        """Bytes each of ``plan.sources`` sends to the rebuilt worker, in that order.

        Args:
            plan: One of its own plans.
            sizes: Per-rank state bytes of the job.

        Returns:
            One byte count per source (empty: nothing moves peer to peer).
        """
        ...
