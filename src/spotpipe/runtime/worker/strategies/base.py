"""What a recovery strategy does on the workers: what each source sends, what the replacement installs.

The pure half of a strategy (whether it applies, its sources, the bytes it moves) lives in
:mod:`spotpipe.ft.policy` and the strategy modules of :mod:`spotpipe.ft`; this is the half that
touches tensors. A :class:`StateTransfer` is looked up by the plan's strategy name in
:data:`spotpipe.runtime.worker.strategies.REGISTRY`; :class:`~spotpipe.runtime.worker.recovery.
RecoveryAgent` posts the sends and receives it asks for over the new generation's world group and
then calls :meth:`StateTransfer.install`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from spotpipe.runtime.state.stage_state import StageState


@dataclass(frozen=True)
class RecoveryPlanView:
    """One plan of the controller's recovery record, as a worker reads it.

    Attributes:
        target: The worker id that receives the state.
        stage: Its pipeline stage.
        sources: Worker ids that send, in the order the strategy takes them.
        strategy: The strategy name (a key of the registry).
        lr_scale: The learning-rate factor the rebuilt chunks train with.
    """

    target: int
    stage: int
    sources: tuple[int, ...]
    strategy: str
    lr_scale: float

    @classmethod
    def from_record(cls, plan: dict[str, Any]) -> RecoveryPlanView:
        """Read one entry of ``record["plans"]`` (JSON)."""
        return cls(int(plan["worker"]), int(plan["stage"]), tuple(int(w) for w in plan["sources"]), str(plan["strategy"]),
                   float(plan["lr_scale"]))


class WorkerView(Protocol):
    """What a strategy sees of the worker it runs on."""

    state: StageState
    mirror: Any  # the copy of the next stage this worker holds (MirrorKeeper / MirrorReplayer), or None
    last_grad_norm: float  # this rank's pre-clip gradient norm of the last step (CheckFree's omega)
    swap: bool  # the CheckFree+ swap schedule is on
    num_stages: int

    def log(self, text: str) -> None:
        """A line in the worker's log."""
        ...


class StateTransfer(Protocol):
    """The runtime half of one recovery strategy."""

    name: str

    def send(self, worker: WorkerView, plan: RecoveryPlanView, source_index: int) -> torch.Tensor:
        """What source number ``source_index`` of ``plan`` (this worker) sends to the target."""
        ...

    def receive_sizes(self, worker: WorkerView, plan: RecoveryPlanView) -> list[int]:
        """The length of each source's tensor, as the target (this worker) expects it."""
        ...

    def install(self, worker: WorkerView, plan: RecoveryPlanView, received: list[torch.Tensor]) -> None:
        """Install what the sources sent (the target only)."""
        ...
