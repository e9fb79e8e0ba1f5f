"""``checkpoint``: roll the whole job back to the newest periodic checkpoint.

The baseline of large training clusters (Kokolis et al. 2025, "Revisiting Reliability in
Large-Scale Machine Learning Research Clusters", s. 4: restart from the last checkpoint after a
failure): every worker, lost or not, reloads the checkpoint of step ``k`` and the steps after it
are replayed with the same data. It rebuilds no single worker from its peers, so it is not tried
per worker; it is what the policy falls back to when some lost worker cannot be rebuilt (e.g.
two adjacent stages with no replica or mirror), and what ``ft.strategy = checkpoint`` always
does. With no checkpoint written (``train.checkpoint_every = 0`` or none yet) the job stops
instead: :func:`rollback` then returns ``stop`` plans.

Bytes moved peer to peer: none (the state comes from the checkpoint files).

Pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from spotpipe.config import StrategyName
from spotpipe.ft.strategies.base import Payload, RecoveryPlan, StageBytes, Survivors, Worker

NAME: Final = "checkpoint"
STOP: Final = "stop"  # the plan of a lost worker when the job ends instead (not a strategy)


@dataclass(frozen=True)
class Checkpoint:
    """The ``checkpoint`` strategy (see the module docstring); stateless, use :data:`STRATEGY`."""

    name: StrategyName = NAME
    exact: bool = False
    lr_scale: float = 1.0
    payload: Payload = "none"
    rebuilds: bool = False
    includes: tuple[StrategyName, ...] = ()
    needs_mirrors: bool = False
    needs_swap_schedule: bool = False

    def covers(self, stage: int, num_stages: int) -> bool:
        """No single stage: a rollback concerns the whole job."""
        return False

    def scope_reason(self, stage: int, num_stages: int) -> str:
        """Why it rebuilds no single worker."""
        return "ft.strategy = checkpoint rolls the whole job back instead of rebuilding a stage"

    def plan(self, worker: Worker, survivors: Survivors) -> RecoveryPlan | None:
        """Never a per-worker plan; see :func:`rollback`."""
        return None

    def why_not(self, worker: Worker, survivors: Survivors) -> str:
        """Never asked (it covers no stage)."""
        return self.scope_reason(worker[0], survivors.num_stages)

    def source_bytes(self, plan: RecoveryPlan, sizes: StageBytes) -> tuple[int, ...]:
        """Nothing moves between workers."""
        return ()


def rollback(lost: Iterable[Worker], checkpoint_step: int | None, cause: str) -> tuple[RecoveryPlan, ...]:
    """Plans that roll the whole job back to the checkpoint, or stop it when there is none.

    Args:
        lost: Lost workers ``(stage, replica)``, in the order the plans should have.
        checkpoint_step: Step of the newest complete checkpoint; ``None``: there is none.
        cause: Why the job cannot continue without it (becomes part of every plan's ``why``).

    Returns:
        One ``checkpoint`` plan per lost worker carrying ``checkpoint_step``, or one ``stop``
        plan per lost worker when there is no checkpoint.
    """
    if checkpoint_step is None:
        return tuple(
            RecoveryPlan(s, r, STOP, f"stopping the job: {cause}; and there is no checkpoint to roll back to "
                                     "(train.checkpoint_every = 0 or none written yet)")
            for s, r in lost
        )
    return tuple(
        RecoveryPlan(s, r, NAME, f"whole job rolls back to the checkpoint of step {checkpoint_step}: {cause}",
                     checkpoint_step=checkpoint_step)
        for s, r in lost
    )


STRATEGY: Final = Checkpoint()
