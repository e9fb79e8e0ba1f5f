"""``checkfree+``: rebuild a lost edge stage by copying its swap partner; middle stages by CheckFree.

CheckFree+ (Blagoev, Ersoy, Chen 2025, "All is Not Lost: LLM Recovery without Checkpoints",
section 3.2): the swap schedule (:func:`spotpipe.schedule.swap.swap_edges`) runs half of the
microbatches with stages 0 <-> 1 and S-1 <-> S-2 exchanged, so each edge stage's blocks learn to
do its partner's job, and the partners keep in-sync copies of the embedding (stage 1) and of the
final norm and LM head (stage S-2). A lost edge stage is then rebuilt by copying its partner's
blocks and optimizer state, and the embedding, resp. final norm and head, from the partner's
copy. Approximate for the blocks, exact for the embedding and head.

It covers the edge stages only and needs at least 4 stages (else the partners overlap), the swap
schedule on (``ft.swap_edges``; choosing ``ft.strategy = checkfree+`` turns it on) and a source
replica of the partner. Chosen by name it includes CheckFree
(:mod:`spotpipe.ft.strategies.checkfree`) for the middle stages.

Bytes moved: the partner sends the full state of the lost stage's size, weights + 2 AdamW
moments (:meth:`~spotpipe.ft.strategies.base.StageBytes.full`, 12 bytes per parameter in
float32).

Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from spotpipe.config import StrategyName
from spotpipe.ft.strategies.base import Payload, RecoveryPlan, StageBytes, Survivors, Worker, is_edge

NAME: Final = "checkfree+"


def swap_partner(stage: int, num_stages: int) -> int | None:
    """The CheckFree+ swap partner of an edge stage.

    Args:
        stage: Pipeline stage, ``0 <= stage < num_stages``.
        num_stages: Pipeline stages S.

    Returns:
        1 for stage 0, S-2 for stage S-1, ``None`` for a middle stage or when S < 4.
    """
    if num_stages < 4:
        return None
    if stage == 0:
        return 1
    if stage == num_stages - 1:
        return num_stages - 2
    return None


@dataclass(frozen=True)
class CheckFreePlus:
    """The ``checkfree+`` strategy (see the module docstring); stateless, use :data:`STRATEGY`."""

    name: StrategyName = NAME
    exact: bool = False
    lr_scale: float = 1.0
    payload: Payload = "full_state"
    rebuilds: bool = True
    includes: tuple[StrategyName, ...] = ("checkfree",)
    needs_mirrors: bool = False
    needs_swap_schedule: bool = True

    def covers(self, stage: int, num_stages: int) -> bool:
        """The first and the last stage only."""
        return is_edge(stage, num_stages)

    def scope_reason(self, stage: int, num_stages: int) -> str:
        """Why a middle stage is out of reach (CheckFree rebuilds those)."""
        return "CheckFree+ copies only edge stages (ft.strategy = checkfree rebuilds middle ones)"

    def plan(self, worker: Worker, survivors: Survivors) -> RecoveryPlan | None:
        """Copy the swap partner of a lost edge stage.

        Args:
            worker: The lost ``(stage, replica)``.
            survivors: ``swap_edges`` must be on and a replica of the partner among ``sources``.

        Returns:
            A plan with the partner (same replica preferred) as the one source, not exact;
            ``None`` for a middle stage, fewer than 4 stages, the swap schedule off, or no source.
        """
        stage, replica = worker
        partner = swap_partner(stage, survivors.num_stages)
        if partner is None or not survivors.swap_edges:
            return None
        src = survivors.source_of(partner, replica)
        if src is None:
            return None
        part = "embedding" if stage == 0 else "final norm and LM head"
        return RecoveryPlan(
            stage, replica, NAME,
            f"edge stage {stage} replica {replica}: copy blocks and optimizer state of swap partner stage {partner}, "
            f"{part} from its in-sync copy (CheckFree+)",
            sources=(src,), lr_scale=self.lr_scale,
        )

    def why_not(self, worker: Worker, survivors: Survivors) -> str:
        """Too few stages, the swap schedule off, or the partner lost too."""
        stage, _ = worker
        partner = swap_partner(stage, survivors.num_stages)
        if partner is None:
            return f"CheckFree+ needs >= 4 stages, the job has {survivors.num_stages}"
        if not survivors.swap_edges:
            return "the CheckFree+ swap schedule is off (ft.swap_edges = false)"
        return f"its swap partner stage {partner} is lost too"

    def source_bytes(self, plan: RecoveryPlan, sizes: StageBytes) -> tuple[int, ...]:
        """The partner sends blocks + embedding or head and two AdamW moments, the lost stage's
        full state."""
        return tuple(sizes.full(plan.stage) for _ in plan.sources)


STRATEGY: Final = CheckFreePlus()
