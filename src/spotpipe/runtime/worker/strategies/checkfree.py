"""``checkfree``: rebuild a lost middle stage from its two neighbours (CheckFree; Blagoev, Ersoy,
Chen 2025, section 3.1).

Both neighbours send their blocks and their last pre-clip gradient norm omega
(:meth:`~spotpipe.runtime.state.stage_state.StageState.blocks_flat`); the replacement installs the
omega-weighted average with fresh optimizer state and the plan's learning-rate factor. Under the
CheckFree+ swap schedule a chunk that holds a copy (1: the embedding, S-2: the norm and head) also
receives that copy's exact state, weights and moments, from its edge neighbour, so the two copies
never drift apart. In one process (the convergence mode) the copies are the originals, so only the
blocks are averaged there.
"""

from __future__ import annotations

import torch

from spotpipe.ft.strategies import checkfree
from spotpipe.ft.strategies.base import RecoveryPlan
from spotpipe.runtime.worker.strategies.base import InProcessRun, RecoveryPlanView, WorkerView, nbytes


def tied_source(worker: WorkerView, plan: RecoveryPlanView) -> int | None:
    """Which source (0: previous stage, 1: next) also sends the in-sync copy, or None.

    Args:
        worker: The target worker (its ``swap`` and ``num_stages``).
        plan: The recovery plan.

    Returns:
        0 or 1 for stage 1 or S-2 under the CheckFree+ swap schedule, else None.
    """
    if not worker.swap:
        return None
    return {1: 0, worker.num_stages - 2: 1}.get(plan.stage)


class CheckFreeRebuild:
    """The neighbours send blocks (+ the copy where one is held); the target averages them."""

    name = checkfree.NAME

    def send(self, worker: WorkerView, plan: RecoveryPlanView, source_index: int) -> torch.Tensor:
        blocks = worker.state.blocks_flat(worker.last_grad_norm)
        if source_index == tied_source(worker, plan):
            return torch.cat([blocks, worker.state.tied_flat()])
        return blocks

    def receive_sizes(self, worker: WorkerView, plan: RecoveryPlanView) -> list[int]:
        n = worker.state.numel(blocks_only=True)
        extra = tied_source(worker, plan)
        return [n + (worker.state.tied_numel() if j == extra else 0) for j in range(len(plan.sources))]

    def install(self, worker: WorkerView, plan: RecoveryPlanView, received: list[torch.Tensor]) -> None:
        n = worker.state.numel(blocks_only=True)
        w = worker.state.install_checkfree(received[0][:n], received[1][:n], plan.lr_scale)
        extra = tied_source(worker, plan)
        if extra is not None:
            worker.state.install_tied(received[extra][n:])
        worker.log(f"rebuilt by CheckFree from the neighbours (omega {w[0]:.4g}, {w[1]:.4g}), lr x{plan.lr_scale:g}")

    def install_in_process(self, run: InProcessRun, plan: RecoveryPlan) -> int:
        """Average the two neighbour chunks' blocks, each weighted by its omega, into the lost chunk,
        with fresh optimizer state and the plan's learning-rate factor (CheckFree, section 3.1)."""
        prev, nxt = plan.sources[0][0], plan.sources[1][0]
        a = run.state.view([prev]).blocks_flat(run.omega(prev))
        b = run.state.view([nxt]).blocks_flat(run.omega(nxt))
        run.state.view([plan.stage]).install_checkfree(a, b, plan.lr_scale)
        return nbytes(a) + nbytes(b)


CHECKFREE = CheckFreeRebuild()
