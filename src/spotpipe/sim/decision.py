"""The seam between a simulated job and its recovery policy: what a policy knows and decides.

A :class:`RecoveryPolicy` turns a :class:`FailureContext` (who was lost, the committed step, the
newest checkpoint, free nodes) into a :class:`RecoveryDecision`: which step training resumes
from, how long the restart takes once every lost position has a node, whether lost positions
need replacement nodes, and per lost worker a :class:`WorkerRecovery` (its strategy, reason,
bytes moved). The job simulation (:mod:`spotpipe.sim.job`) calls a policy through this seam; the
policies are :class:`spotpipe.sim.recovery.CheckpointRestart` (restart from the last checkpoint,
the baseline of Kokolis et al. 2025, s. 4) and :class:`spotpipe.sim.ftpolicy.PlannedRecovery`
(the shipped policy, :func:`spotpipe.ft.policy.plan_recovery`, priced on the cluster).

These types import nothing else of the simulator, so both policies depend on them and not on
each other. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from spotpipe.config import JobConfig

Worker = tuple[int, int]  # (pipeline rank, replica)


@dataclass(frozen=True)
class FailureContext:
    """What a policy knows when it decides.

    Attributes:
        now: Virtual time of the decision (the grouping window after the last confirmed loss).
        failed_at: Virtual time the first of the lost nodes died.
        lost: Lost worker positions ``(rank, replica)``.
        lost_nodes: Their node ids.
        step: Steps committed so far.
        checkpoint_step: Step of the newest complete checkpoint (``None``: none yet).
        free_nodes: Idle nodes (spares, replacements) ready now.
        config: The job.
        locations: Location of the node of every worker slot (``replica x ranks + rank``; a lost
            slot: its dead node's); empty: unknown (the initial placement's is used).
    """

    now: float
    failed_at: float
    lost: tuple[Worker, ...]
    lost_nodes: tuple[int, ...]
    step: int
    checkpoint_step: int | None
    free_nodes: int
    config: JobConfig
    locations: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerRecovery:
    """How one lost worker is rebuilt (for its ``recovery_finished`` event).

    Attributes:
        stage: Pipeline rank.
        replica: Data-parallel replica.
        strategy: Its own strategy (``mirror``, ``checkfree``, ``checkpoint``, ...).
        why: One line from the policy.
        bytes: State bytes moved to the new node.
        exact: The rebuilt state equals the lost state.
    """

    stage: int
    replica: int
    strategy: str
    why: str
    bytes: int = 0
    exact: bool = False


@dataclass(frozen=True)
class RecoveryDecision:
    """What the job does about a failure.

    Attributes:
        strategy: Name for the ``recovery_started`` event (``checkpoint``, ``stop``, ...).
        resume_step: Training continues after this many committed steps (steps after it are
            replayed).
        restart_s: Seconds from the moment every lost position has a node until training runs.
        replace_lost: Lost positions take idle nodes (spares or replacements).
        why: One line for the event log.
        stop: The job ends instead.
        bytes: State bytes moved to the new nodes (0: none, or a checkpoint load).
        workers: Per lost worker, its own strategy, reason and bytes (empty: the decision's).
    """

    strategy: str
    resume_step: int
    restart_s: float
    replace_lost: bool
    why: str
    stop: bool = False
    bytes: int = 0
    workers: tuple[WorkerRecovery, ...] = ()


class RecoveryPolicy(Protocol):
    """Decides what a detected failure costs."""

    @property
    def name(self) -> str:
        """The ``sim.recovery`` value that selects this policy."""
        ...

    def decide(self, ctx: FailureContext) -> RecoveryDecision:
        """The decision for one detected failure.

        Args:
            ctx: Who was lost, the committed step, the newest checkpoint and the free nodes.

        Returns:
            Which step training resumes from, the restart time in seconds, whether replacements are
            needed, and one :class:`WorkerRecovery` per lost worker.
        """
        ...
