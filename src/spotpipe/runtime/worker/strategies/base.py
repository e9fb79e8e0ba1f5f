"""What a recovery strategy does on the workers: what each source sends, what the replacement installs.

The pure half of a strategy (whether it applies, its sources, the bytes it moves) lives in
:mod:`spotpipe.ft.policy` and the strategy modules of :mod:`spotpipe.ft`; this is the half that
touches tensors. A :class:`StateTransfer` is looked up by the plan's strategy name in
:data:`spotpipe.runtime.worker.strategies.REGISTRY`; :class:`~spotpipe.runtime.worker.recovery.
RecoveryAgent` posts the sends and receives it asks for over the new generation's world group and
then calls :meth:`StateTransfer.install`.

The same transfer also says how its plan is carried out when every stage lives in one process
(:meth:`StateTransfer.install_in_process`, given an :class:`InProcessRun`): the in-process
convergence mode (:mod:`spotpipe.runtime.inprocess.convergence`) looks the transfer up by name as
the workers do, so a new strategy needs no branch there. The in-process install reads what the
sources would send (the same :class:`~spotpipe.runtime.state.stage_state.StageState` views) and
installs it with the same operations, so both modes rebuild the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from spotpipe.ft.strategies.base import RecoveryPlan
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
        """Read one entry of ``record["plans"]`` (JSON).

        Args:
            plan: ``{"worker", "stage", "sources", "strategy", "lr_scale"}``.

        Returns:
            The view.

        Raises:
            KeyError, ValueError, TypeError: on a missing or malformed field.
        """
        return cls(int(plan["worker"]), int(plan["stage"]), tuple(int(w) for w in plan["sources"]), str(plan["strategy"]),
                   float(plan["lr_scale"]))


def nbytes(flat: torch.Tensor) -> int:
    """Bytes a tensor holds (what sending it moves).

    Args:
        flat: Any tensor, e.g. a flat state.

    Returns:
        ``numel x element size``.
    """
    return flat.numel() * flat.element_size()


class WorkerView(Protocol):
    """What a strategy sees of the worker it runs on."""

    state: StageState
    mirror: Any  # the copy of the next stage this worker holds (MirrorKeeper / MirrorReplayer), or None
    last_grad_norm: float  # this rank's pre-clip gradient norm of the last step (CheckFree's omega)
    swap: bool  # the CheckFree+ swap schedule is on
    num_stages: int

    def log(self, text: str) -> None:
        """A line in the worker's log.

        Args:
            text: The line, without a newline.
        """
        ...


class StateTransfer(Protocol):
    """The runtime half of one recovery strategy."""

    name: str

    def send(self, worker: WorkerView, plan: RecoveryPlanView, source_index: int) -> torch.Tensor:
        """What source number ``source_index`` of ``plan`` (this worker) sends to the target.

        Args:
            worker: This worker.
            plan: The recovery plan.
            source_index: Position of this worker in ``plan.sources``.

        Returns:
            A 1-D tensor, of the length :meth:`receive_sizes` gives for that source.
        """
        ...

    def receive_sizes(self, worker: WorkerView, plan: RecoveryPlanView) -> list[int]:
        """The length of each source's tensor, as the target (this worker) expects it.

        Args:
            worker: This worker (the target).
            plan: The recovery plan.

        Returns:
            One element count per source, in ``plan.sources`` order.
        """
        ...

    def install(self, worker: WorkerView, plan: RecoveryPlanView, received: list[torch.Tensor]) -> None:
        """Install what the sources sent (the target only).

        Args:
            worker: This worker (the target).
            plan: The recovery plan.
            received: One 1-D tensor per source, in ``plan.sources`` order.
        """
        ...

    def install_in_process(self, run: InProcessRun, plan: RecoveryPlan) -> int:
        """Rebuild ``plan.stage`` when every stage lives in one process (the convergence mode).

        Args:
            run: The in-process run: its one stage state over every chunk, and the copies it keeps.
            plan: The pure plan (:func:`spotpipe.ft.policy.plan_recovery`), sources as
                ``(stage, replica)``.

        Returns:
            The bytes read from the sources: what they would send over the network.
        """
        ...


class InProcessRun(Protocol):
    """What a strategy sees of an in-process run, where every stage is one chunk of one
    :class:`~spotpipe.runtime.state.stage_state.StageState` (every replica of a stage is the same
    chunk) and the copies a worker would hold are kept in their flat form."""

    @property
    def state(self) -> StageState:
        """The stage state over every chunk (a lost stage's chunk has been wiped)."""
        ...

    def live_copy(self, stage: int) -> torch.Tensor:
        """Chunk ``stage``'s flat state as it was before the wipe: what a live replica of the stage
        sends (:meth:`StageState.flat`).

        Args:
            stage: Chunk index.

        Returns:
            A float32 tensor.
        """
        ...

    def mirror(self, stage: int) -> torch.Tensor:
        """The flat mirror of ``stage`` that its holder keeps (weights, moments, lr scale).

        Args:
            stage: Chunk index.

        Returns:
            A float32 tensor.

        Raises:
            KeyError: If no mirror of ``stage`` is kept.
        """
        ...

    def tied_copy(self, stage: int) -> torch.Tensor:
        """The in-sync copy of edge chunk ``stage``'s tied part (:meth:`StageState.tied_flat`) that
        its CheckFree+ swap partner holds (chunk 1 holds chunk 0's, chunk S-2 chunk S-1's).

        Args:
            stage: Chunk index of an edge chunk.

        Returns:
            A float32 tensor.

        Raises:
            KeyError: If ``stage`` is not an edge chunk or the swap schedule is off.
        """
        ...

    def omega(self, stage: int) -> float:
        """CheckFree's weight of chunk ``stage``'s blocks: its last gradient norm, before clipping.

        Args:
            stage: Chunk index.

        Returns:
            The L2 norm.
        """
        ...

    def set_lr_scale(self, stage: int, scale: float) -> None:
        """Train chunk ``stage``'s blocks with ``scale`` x the learning rate from now on.

        Args:
            stage: Chunk index.
            scale: The factor (CheckFree's 1.1 after a rebuild; 1.0 otherwise).
        """
        ...
