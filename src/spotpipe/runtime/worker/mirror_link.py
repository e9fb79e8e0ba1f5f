"""A worker's two mirror roles: owner of its own stage's mirror, holder of the next stage's.

With ``ft.strategy`` ``auto`` or ``mirror`` every stage's state has a copy in the host memory of the
previous stage's worker (:func:`spotpipe.ft.policy.mirror_holder`; checkpointless peer replication,
SageMaker HyperPod 2025). :class:`MirrorLink` keeps both sides:

- **owner**: with ``ft.mirror_every = 1`` (``replay``) it publishes its full state once per
  generation and its gradient, clip coefficient and learning rate every step, before it votes on
  the commit; with ``mirror_every = N > 1`` (``periodic``) its full state every N committed steps;
- **holder**: a background thread (:class:`~spotpipe.runtime.worker.mirror.MirrorReplayer` or
  :class:`~spotpipe.runtime.worker.mirror.MirrorKeeper`) keeps the copy of the next stage current;
  a recovery by ``mirror`` sends it (:mod:`spotpipe.runtime.worker.strategies.copy`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from spotpipe.config import JobConfig
from spotpipe.runtime.control.job import mirror_fits_store, mirrors_wanted
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.worker.mirror import MirrorKeeper, MirrorReplayer, publish_gradient, publish_mirror

MirrorMode = Literal["replay", "periodic", ""]


def mirror_mode(cfg: JobConfig) -> MirrorMode:
    """``replay`` (``ft.mirror_every = 1``), ``periodic`` (every N steps) or ``""`` (no mirrors:
    another strategy, ``mirror_every = 0``, a single stage, or a stage whose state does not fit in
    one store value, :func:`~spotpipe.runtime.control.job.mirror_fits_store`: mirrors still travel
    through the controller's store)."""
    if not mirrors_wanted(cfg) or not mirror_fits_store(cfg):
        return ""
    return "replay" if cfg.ft.mirror_every == 1 else "periodic"


class MirrorLink:
    """Owner and holder side of one worker's mirrors.

    Args:
        store: The worker's store client.
        cfg: The job config.
        stage: This worker's pipeline stage.
        replica: Its replica.
        state: This worker's stage state (what the owner side publishes).
    """

    def __init__(self, store: Any, cfg: JobConfig, stage: int, replica: int, state: StageState) -> None:
        self.store = store
        self.cfg = cfg
        self.stage = stage
        self.replica = replica
        self.state = state
        self.mode = mirror_mode(cfg)
        self.holder: MirrorKeeper | MirrorReplayer | None = None  # the copy of the next stage this worker keeps
        self._published_generation = 0

    def start_holder(self, owner_state: StageState | None) -> None:
        """Start the background keeper of the next stage's copy.

        Args:
            owner_state: A fresh state shaped like the next stage's (``replay`` mode needs it).
        """
        owner = (self.stage + 1) % self.cfg.pipeline.stages
        if self.mode == "replay":
            assert owner_state is not None
            self.holder = MirrorReplayer(self.store, owner, self.replica, owner_state, self.cfg.run.timeout_s)
        elif self.mode == "periodic":
            self.holder = MirrorKeeper(self.store, owner, self.replica)
        if self.holder is not None:
            self.holder.start()

    def generation_started(self, generation: int, step: int) -> None:
        """Owner, ``replay``: publish the full state once per generation, before its first step
        ``step`` (the holder's copy starts from it)."""
        if self.mode != "replay" or not generation or self._published_generation == generation:
            return
        publish_mirror(self.store, self.stage, self.replica, step - 1, self.state.flat(), generation)
        self._published_generation = generation

    def gradient(self, generation: int, step: int, flat_grad: torch.Tensor, coef: float, lr: float, apply: bool = True) -> None:
        """Owner, ``replay``: publish the step's gradient before voting on its commit (``apply``
        False: the step is skipped, ``train.nonfinite = "skip"``, and the holder skips it too)."""
        if self.mode == "replay" and generation:
            publish_gradient(self.store, generation, self.stage, self.replica, step, flat_grad, coef, lr, apply)

    def committed(self, generation: int, step: int) -> None:
        """After committed ``step``: the holder replays it (``replay``) or the owner publishes its
        full state if due (``periodic``)."""
        if self.holder is not None:
            self.holder.committed(generation, step)
        if self.mode == "periodic" and (step + 1) % self.cfg.ft.mirror_every == 0:
            publish_mirror(self.store, self.stage, self.replica, step, self.state.flat(), generation)

    def halt(self) -> None:
        """Stop the holder's thread."""
        if self.holder is not None:
            self.holder.halt()
