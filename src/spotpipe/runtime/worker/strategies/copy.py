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
"""

from __future__ import annotations

import torch

from spotpipe.ft.strategies import checkfree_plus, mirror, replica
from spotpipe.runtime.worker.strategies.base import RecoveryPlanView, WorkerView


class FullStateCopy:
    """The source sends :meth:`StageState.flat`; the target installs it whole."""

    def __init__(self, name: str, message: str) -> None:
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


class MirrorCopy(FullStateCopy):
    """The holder sends the copy it keeps instead of its own state."""

    def __init__(self) -> None:
        super().__init__(mirror.NAME, "")

    def send(self, worker: WorkerView, plan: RecoveryPlanView, source_index: int) -> torch.Tensor:
        mirror = worker.mirror
        if mirror is None or mirror.step is None:
            raise RuntimeError(f"asked to send the mirror of stage {plan.stage}, but this worker holds none")
        return mirror.tensor()  # type: ignore[no-any-return]


REPLICA = FullStateCopy(replica.NAME, "")
CHECKFREE_PLUS = FullStateCopy(checkfree_plus.NAME, "rebuilt by CheckFree+ from the swap partner's blocks and in-sync copies")
MIRROR = MirrorCopy()
