"""``mirror``: copy the host-memory mirror that a neighbouring worker keeps of the lost worker.

Checkpointless peer replication (SageMaker HyperPod, 2025) without data-parallel replicas: the
worker of the previous stage of the same replica, ``(s - 1) mod S`` (:func:`mirror_holder`; the
last stage mirrors stage 0), keeps a copy of stage ``s``'s weights and AdamW moments in host
memory. With ``ft.mirror_every = 1`` the holder replays every committed step's update, so the
copy is exact; with ``N > 1`` it receives the full state every N steps and is up to ``N - 1``
steps behind (the plan says by how many, and is not exact then).

A mirror counts only if it is complete (a finished refresh) and its holder is *live*: a holder
that was itself lost, even if rebuilt earlier in the same decision, lost the mirror it kept.

Bytes moved: the holder sends the mirrored full state, weights + 2 AdamW moments
(:meth:`~spotpipe.ft.strategies.base.StageBytes.full`, 12 bytes per parameter in float32).

Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from spotpipe.config import StrategyName
from spotpipe.ft.strategies.base import Payload, RecoveryPlan, StageBytes, Survivors, Worker

NAME: Final = "mirror"


def mirror_holder(stage: int, replica: int, num_stages: int) -> Worker:
    """The worker that keeps the host-memory mirror of ``(stage, replica)``.

    Args:
        stage: Mirrored stage, ``0 <= stage < num_stages``.
        replica: Its data-parallel replica.
        num_stages: Pipeline stages S.

    Returns:
        ``((stage - 1) mod S, replica)``: the previous stage of the same replica, wrapping
        around (the last stage mirrors stage 0); with S = 1, the worker itself (no mirror).
    """
    return ((stage - 1) % num_stages, replica)


@dataclass(frozen=True)
class Mirror:
    """The ``mirror`` strategy (see the module docstring); stateless, use :data:`STRATEGY`."""

    name: StrategyName = NAME
    exact: bool = True
    lr_scale: float = 1.0
    payload: Payload = "mirror"
    rebuilds: bool = True
    includes: tuple[StrategyName, ...] = ()
    needs_mirrors: bool = True
    needs_swap_schedule: bool = False

    def covers(self, stage: int, num_stages: int) -> bool:
        """Every stage is mirrored by its predecessor (when mirrors are kept)."""
        return True

    def scope_reason(self, stage: int, num_stages: int) -> str:
        """Never asked: mirrors cover every stage."""
        return f"stage {stage} has no mirror"

    def plan(self, worker: Worker, survivors: Survivors) -> RecoveryPlan | None:
        """Copy the mirror of ``worker`` if it has one and its holder is live.

        Args:
            worker: The lost ``(stage, replica)``.
            survivors: ``mirrors`` and ``mirror_lag`` name the worker's mirror and its age.

        Returns:
            A plan with the holder as the one source, exact when the mirror is 0 steps behind;
            ``None`` without a complete mirror or with a lost holder.
        """
        stage, replica = worker
        holder = survivors.mirrors.get(worker)
        if holder is None or holder not in survivors.live:  # a rebuilt holder lost the mirror it kept
            return None
        lag = int(survivors.mirror_lag.get(worker, 0))
        behind = "exact" if lag == 0 else f"{lag} step{'s' if lag != 1 else ''} behind"
        return RecoveryPlan(
            stage, replica, NAME,
            f"stage {stage} replica {replica}: copy the host-memory mirror held by stage {holder[0]} replica {holder[1]} ({behind})",
            sources=(holder,), exact=lag == 0, lr_scale=self.lr_scale,
        )

    def why_not(self, worker: Worker, survivors: Survivors) -> str:
        """``no fresh mirror``, or that the mirror's holder is lost too."""
        holder = survivors.mirrors.get(worker)
        if holder is None:
            return "no fresh mirror"
        return f"its mirror holder (stage {holder[0]} replica {holder[1]}) is lost too"

    def source_bytes(self, plan: RecoveryPlan, sizes: StageBytes) -> tuple[int, ...]:
        """The holder sends the mirrored weights and two AdamW moments of the lost stage."""
        return tuple(sizes.full(plan.stage) for _ in plan.sources)


STRATEGY: Final = Mirror()
