"""``replica``: copy the lost worker's state from a live data-parallel replica of its stage.

Checkpointless peer replication (SageMaker HyperPod, 2025): every data-parallel replica of a
stage holds the same weights and optimizer state after each committed step (the gradients are
all-reduced before the update), so a live replica's state *is* the lost worker's state. The
replacement receives the replica's weights and both AdamW moments and trains on at the base
learning rate. Exact; covers every stage, but needs ``pipeline.replicas >= 2`` and a replica of
the same stage that survived (or was itself rebuilt exactly in the same decision).

Bytes moved: one source sends the stage's full state, weights + 2 AdamW moments
(:meth:`~spotpipe.ft.strategies.base.StageBytes.full`, 12 bytes per parameter in float32).

Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from spotpipe.config import StrategyName
from spotpipe.ft.strategies.base import Payload, RecoveryPlan, StageBytes, Survivors, Worker

NAME: Final = "replica"


@dataclass(frozen=True)
class Replica:
    """The ``replica`` strategy (see the module docstring); stateless, use :data:`STRATEGY`."""

    name: StrategyName = NAME
    exact: bool = True
    lr_scale: float = 1.0
    payload: Payload = "full_state"
    rebuilds: bool = True
    includes: tuple[StrategyName, ...] = ()
    needs_mirrors: bool = False
    needs_swap_schedule: bool = False

    def covers(self, stage: int, num_stages: int) -> bool:
        """Every stage has replicas when ``pipeline.replicas >= 2``."""
        return True

    def scope_reason(self, stage: int, num_stages: int) -> str:
        """Never asked: replication covers every stage."""
        return f"stage {stage} has no replicas"

    def plan(self, worker: Worker, survivors: Survivors) -> RecoveryPlan | None:
        """Copy from the lowest-numbered other replica of the stage that can serve as a source.

        Args:
            worker: The lost ``(stage, replica)``.
            survivors: Live workers and exactly rebuilt ones.

        Returns:
            An exact plan with one source, or ``None`` if no other replica of the stage serves.
        """
        stage, replica = worker
        for other in sorted(range(survivors.replicas), key=lambda x: (x == replica, x)):
            if other != replica and (stage, other) in survivors.sources:
                return RecoveryPlan(
                    stage, replica, NAME,
                    f"stage {stage} replica {replica}: copy weights and optimizer state from live replica {other} (exact)",
                    sources=((stage, other),), exact=True, lr_scale=self.lr_scale,
                )
        return None

    def why_not(self, worker: Worker, survivors: Survivors) -> str:
        """``no live replica``, or ``no replicas (pipeline.replicas = 1)``."""
        return "no live replica" if survivors.replicas > 1 else "no replicas (pipeline.replicas = 1)"

    def source_bytes(self, plan: RecoveryPlan, sizes: StageBytes) -> tuple[int, ...]:
        """The replica sends the stage's weights and two AdamW moments."""
        return tuple(sizes.full(plan.stage) for _ in plan.sources)


STRATEGY: Final = Replica()
