"""Copy strategies: a live replica's state (``replica``), the CheckFree+ swap partner's state
(``checkfree+``), or the mirror a neighbour keeps in host memory (``mirror``).

- ``replica``: the live data-parallel replica of the same stage sends its whole state; exact
  (checkpointless peer replication, SageMaker HyperPod 2025).
- ``checkfree+``: a lost edge stage gets its swap partner's whole state: under the swap schedule
  the partner's blocks have seen the edge stage's position for half the microbatches, and its
  embedding or norm + head copy is in sync with the lost original (CheckFree+; Blagoev, Ersoy,
  Chen 2025, section 3.2).
- ``mirror``: the previous stage's worker sends the copy of the lost stage it keeps
  (:mod:`spotpipe.runtime.worker.mirror`); exact when it replays every update.

In one process (the convergence mode) the same copies are made from what the run keeps: a live
replica is the lost stage's own chunk before the wipe, the mirror the flat copy kept for the
stage, and CheckFree+ copies the partner chunk's blocks and the snapshot of the in-sync copy.
"""

from __future__ import annotations

import torch

from spotpipe.ft.strategies import checkfree_plus, mirror, replica
from spotpipe.ft.strategies.base import RecoveryPlan
from spotpipe.runtime.worker.strategies.base import InProcessRun, RecoveryPlanView, WorkerView, nbytes


class FullStateCopy:
    """The source sends :meth:`StageState.flat`; the target installs it whole."""

    def __init__(self, name: str, message: str) -> None:
        """A strategy that copies a whole stage state from one source.

        Args:
            name: The strategy's registry name.
            message: What the target logs when it installs the copy.
        """
        self.name = name
        self._message = message

    def send(self, worker: WorkerView, plan: RecoveryPlanView, source_index: int) -> torch.Tensor:
        return worker.state.flat()

    def receive_sizes(self, worker: WorkerView, plan: RecoveryPlanView) -> list[int]:
        return [worker.state.numel()]

    def install(self, worker: WorkerView, plan: RecoveryPlanView, received: list[torch.Tensor]) -> None:
        worker.state.load_flat(received[0])
        if self._message:
            worker.log(self._message)

    def install_in_process(self, run: InProcessRun, plan: RecoveryPlan) -> int:
        """Load the source's whole flat state as it was before the loss (a live replica: in one
        process, the lost stage's own chunk, weights, moments and its learning-rate scale)."""
        flat = run.live_copy(plan.sources[0][0])
        run.state.view([plan.stage]).load_flat(flat)
        return nbytes(flat)


class MirrorCopy(FullStateCopy):
    """The holder sends the copy it keeps instead of its own state."""

    def __init__(self) -> None:
        super().__init__(mirror.NAME, "")

    def send(self, worker: WorkerView, plan: RecoveryPlanView, source_index: int) -> torch.Tensor:
        """The holder sends its mirror of the lost stage (:meth:`StageState.flat` layout).

        Args:
            worker: This worker, the mirror's holder.
            plan: The recovery plan.
            source_index: Ignored (one source).

        Returns:
            The mirror as a float32 tensor.

        Raises:
            RuntimeError: if this worker holds no mirror.
        """
        mirror = worker.mirror
        if mirror is None or mirror.step is None:
            raise RuntimeError(f"asked to send the mirror of stage {plan.stage}, but this worker holds none")
        return mirror.tensor()  # type: ignore[no-any-return]

    def install_in_process(self, run: InProcessRun, plan: RecoveryPlan) -> int:
        """Load the mirror kept of the lost stage (as of the step it was last refreshed).

        Args:
            run: The in-process run.
            plan: The recovery plan.

        Returns:
            Bytes installed.

        Raises:
            KeyError: if no mirror of the stage is kept.
        """
        flat = run.mirror(plan.stage)
        run.state.view([plan.stage]).load_flat(flat)
        return nbytes(flat)


class PartnerCopy(FullStateCopy):
    """CheckFree+: across processes the swap partner sends its whole state, whose blocks and
    in-sync copy (embedding, resp. final norm and head) the lost edge stage installs."""

    def __init__(self) -> None:
        super().__init__(checkfree_plus.NAME, "rebuilt by CheckFree+ from the swap partner's blocks and in-sync copies")

    def install_in_process(self, run: InProcessRun, plan: RecoveryPlan) -> int:
        """In one process the partner chunk holds no copy (the copies are the originals): the lost
        edge chunk gets the partner's blocks with their moments and the snapshot of its copy, what
        the partner worker's whole state holds (Blagoev, Ersoy, Chen 2025, section 3.2), and the
        plan's learning-rate factor (a trained stage: 1.0).

        Args:
            run: The in-process run.
            plan: The recovery plan (its first source is the partner chunk).

        Returns:
            Bytes installed.
        """
        s = plan.stage
        blocks = run.state.view([plan.sources[0][0]], part="blocks").flat()
        run.state.view([s], part="blocks").load_flat(blocks)
        copy = run.tied_copy(s)
        run.state.view([s]).install_tied(copy)
        run.set_lr_scale(s, plan.lr_scale)
        return nbytes(blocks) + nbytes(copy)


REPLICA = FullStateCopy(replica.NAME, "")
CHECKFREE_PLUS = PartnerCopy()
MIRROR = MirrorCopy()
