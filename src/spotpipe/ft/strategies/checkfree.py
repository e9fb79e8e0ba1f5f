"""``checkfree``: rebuild a lost middle stage as the weighted average of its two neighbours.

CheckFree (Blagoev, Ersoy, Chen 2025, "All is Not Lost: LLM Recovery without Checkpoints",
section 3.1): consecutive transformer stages learn similar functions, so a lost stage ``s``
with ``0 < s < S - 1`` is re-initialised as the average of stages ``s - 1`` and ``s + 1``,
each weighted by its last gradient norm, with fresh optimizer state; the rebuilt stage then
trains at :data:`CHECKFREE_LR_SCALE` (1.1) times the learning rate so it catches up. Approximate.

It needs both neighbours as sources: live, or rebuilt *exactly* in the same decision (a
neighbour rebuilt by CheckFree is itself an approximation and never serves). It cannot rebuild
the first or the last stage, which have one neighbour; CheckFree+
(:mod:`spotpipe.ft.strategies.checkfree_plus`) covers those.

Bytes moved: each neighbour sends its transformer-block weights (and its gradient norm, a few
bytes, not counted): ``StageBytes.blocks`` of the neighbour's rank; no optimizer state.

Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from spotpipe.config import StrategyName
from spotpipe.ft.strategies.base import Payload, RecoveryPlan, StageBytes, Survivors, Worker, is_edge

NAME: Final = "checkfree"
CHECKFREE_LR_SCALE: Final = 1.1  # CheckFree (Blagoev et al. 2025, s. 3.1): the rebuilt stage trains at 1.1x lr


@dataclass(frozen=True)
class CheckFree:
    """The ``checkfree`` strategy (see the module docstring); stateless, use :data:`STRATEGY`."""

    name: StrategyName = NAME
    exact: bool = False
    lr_scale: float = CHECKFREE_LR_SCALE
    payload: Payload = "blocks"
    rebuilds: bool = True
    includes: tuple[StrategyName, ...] = ()
    needs_mirrors: bool = False
    needs_swap_schedule: bool = False

    def covers(self, stage: int, num_stages: int) -> bool:
        """Middle stages only: the first and the last stage have a single neighbour."""
        return not is_edge(stage, num_stages)

    def scope_reason(self, stage: int, num_stages: int) -> str:
        """Why an edge stage is out of reach, and which strategy reaches it."""
        return "CheckFree cannot rebuild an edge stage (ft.strategy = checkfree+ can)"

    def plan(self, worker: Worker, survivors: Survivors) -> RecoveryPlan | None:
        """Average the two neighbours of a middle stage, preferring the same replica's.

        Args:
            worker: The lost ``(stage, replica)``.
            survivors: The neighbours must be among ``survivors.sources``.

        Returns:
            A plan with sources ``(previous stage, next stage)``, ``lr_scale`` 1.1, not exact;
            ``None`` for an edge stage or when a neighbouring stage has no source.
        """
        stage, replica = worker
        if not self.covers(stage, survivors.num_stages):
            return None
        prev, nxt = survivors.source_of(stage - 1, replica), survivors.source_of(stage + 1, replica)
        if prev is None or nxt is None:
            return None
        return RecoveryPlan(
            stage, replica, NAME,
            f"stage {stage} replica {replica}: gradient-norm-weighted average of stages {stage - 1} and {stage + 1}, "
            f"fresh optimizer state, lr x{self.lr_scale:g} (CheckFree)",
            sources=(prev, nxt), lr_scale=self.lr_scale,
        )

    def why_not(self, worker: Worker, survivors: Survivors) -> str:
        """Which adjacent stages were lost with it (no replica of them can serve)."""
        stage, replica = worker
        gone = [n for n in (stage - 1, stage + 1) if survivors.source_of(n, replica) is None]
        return (f"adjacent stage{'s' if len(gone) > 1 else ''} {' and '.join(map(str, gone))} lost together with it, "
                "so CheckFree has no two neighbours")

    def source_bytes(self, plan: RecoveryPlan, sizes: StageBytes) -> tuple[int, ...]:
        """Each neighbour sends its own transformer-block weights."""
        return tuple(sizes.blocks[src_stage] for src_stage, _ in plan.sources)


STRATEGY: Final = CheckFree()
