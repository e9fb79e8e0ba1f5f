"""A worker's two mirror roles: owner of its own stage's mirror, holder of the next stage's.

With ``ft.strategy`` ``auto`` or ``mirror`` every stage's state has a copy in the host memory of the
previous stage's worker (:func:`spotpipe.ft.policy.mirror_holder`; checkpointless peer replication,
SageMaker HyperPod 2025). :class:`MirrorLink` keeps both sides, peer to peer over each
generation's host group (:mod:`spotpipe.runtime.worker.mirror`):

- **owner**: sends its full state once per generation; with ``ft.mirror_every = 1`` (``replay``)
  its gradient, clip coefficient and learning rate every step, before it votes on the commit;
  with ``mirror_every = N > 1`` (``periodic``) its full state every N committed steps;
- **holder**: :class:`~spotpipe.runtime.worker.mirror.MirrorHolder` keeps the copy of the next
  stage current in background threads; a recovery by ``mirror`` sends it
  (:mod:`spotpipe.runtime.worker.strategies.copy`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from spotpipe.config import JobConfig
from spotpipe.ft.policy import mirror_holder
from spotpipe.runtime.control.job import mirrors_wanted
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.worker.mirror import KIND_GRADIENT, KIND_SKIPPED, KIND_STATE, MirrorHolder, MirrorSender

MirrorMode = Literal["replay", "periodic", ""]


def mirror_mode(cfg: JobConfig) -> MirrorMode:
    """``replay`` (``ft.mirror_every = 1``), ``periodic`` (every N steps) or ``""`` (no mirrors:
    another strategy, ``mirror_every = 0``, or a single stage).

    Args:
        cfg: The job (``ft.strategy``, ``ft.mirror_every``, ``pipeline.stages``).

    Returns:
        The mode.
    """
    if not mirrors_wanted(cfg):
        return ""
    return "replay" if cfg.ft.mirror_every == 1 else "periodic"


class MirrorLink:
    """Owner and holder side of one worker's mirrors.

    Args:
        cfg: The job config.
        stage: This worker's pipeline stage.
        replica: Its replica.
        state: This worker's stage state (what the owner side sends).
    """

    def __init__(self, cfg: JobConfig, stage: int, replica: int, state: StageState) -> None:
        self.cfg = cfg
        self.stage = stage
        self.replica = replica
        self.state = state
        self.mode = mirror_mode(cfg)
        self.holder: MirrorHolder | None = None  # the copy of the next stage this worker keeps
        self.sender: MirrorSender | None = None  # to the holder of this stage's copy, this generation
        self._generation = 0
        self._sent_before = 0  # bytes the senders of earlier generations sent

    @property
    def bytes_sent(self) -> int:
        """Bytes this worker sent to its mirror holder so far (peer to peer)."""
        return self._sent_before + (0 if self.sender is None else self.sender.bytes_sent)

    def start_holder(self, owner_state: StageState) -> None:
        """Start keeping the next stage's copy.

        Args:
            owner_state: A fresh state shaped like the next stage's.
        """
        if not self.mode:
            return
        owner = (self.stage + 1) % self.cfg.pipeline.stages
        self.holder = MirrorHolder(owner, self.replica, owner_state, replay=self.mode == "replay")
        self.holder.start()

    def generation_started(self, gen: Any, step: int) -> None:
        """Before step ``step`` in ``gen``: once per generation, start following the owner of the
        next stage and send this stage's full state to its holder (the copy starts from it).

        Args:
            gen: The generation this worker is in (``None``: none yet; nothing happens).
            step: The step about to run, 0-based.
        """
        if not self.mode or gen is None or self._generation == gen.number:
            return
        self._generation = gen.number
        plan = gen.plan
        S = self.cfg.pipeline.stages
        if self.holder is not None:
            self.holder.generation_started(gen, plan.world_rank((self.stage + 1) % S, self.replica))
        if self.sender is not None:
            self.sender.drain()
            self._sent_before += self.sender.bytes_sent
        self.sender = MirrorSender(gen, plan.world_rank(*mirror_holder(self.stage, self.replica, S)), self.cfg.run.timeout_s)
        self.sender.send(KIND_STATE, step - 1, self.state.flat(), owned=True)

    def gradient(self, step: int, flat_grad: torch.Tensor, coef: float, lr: float, apply: bool = True) -> None:
        """Owner, ``replay``: send the step's gradient before voting on its commit (``apply``
        False: the step is skipped, ``train.nonfinite = "skip"``, and the holder skips it too).

        Args:
            step: The step, 0-based.
            flat_grad: The stage's flat gradient buffer (model dtype); ``coef`` goes with it.
            coef: The step's clip coefficient.
            lr: The step's base learning rate.
            apply: Whether the step's update is applied.
        """
        if self.mode == "replay" and self.sender is not None:
            if apply:
                self.sender.send(KIND_GRADIENT, step, flat_grad, coef, lr)
            else:
                self.sender.send(KIND_SKIPPED, step, None)

    def flush(self) -> None:
        """Owner: wait until what was sent has left (the holder has the step's gradient)."""
        if self.sender is not None:
            self.sender.drain()

    def committed(self, generation: int, step: int) -> None:
        """After committed ``step``: the holder may replay it; the owner sends its full state if due
        (``periodic``). The owner does not wait for its gradient to arrive here: the transfer runs
        on while the next step computes, and the next send waits for it (one in flight).

        Args:
            generation: The generation the step was committed in.
            step: The committed step, 0-based.
        """
        if self.holder is not None:
            self.holder.committed(generation, step)
        if self.mode == "periodic" and (step + 1) % self.cfg.ft.mirror_every == 0 and self.sender is not None:
            self.sender.send(KIND_STATE, step, self.state.flat(), owned=True)

    def halt(self) -> None:
        """Stop the holder's threads."""
        if self.holder is not None:
            self.holder.halt()
