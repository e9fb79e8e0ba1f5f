"""Forward and backward of the model chunks one worker holds, one microbatch at a time.

The executor calls :meth:`StageRunner.forward` and :meth:`StageRunner.backward` for the actions
of its schedule; the runner keeps what autograd needs between them, per (stage, microbatch), and
frees it after the backward. The last chunk returns the mean token cross-entropy; its backward
starts from ``loss * loss_scale``, where ``loss_scale = 1 / (microbatches x replicas)``, so the
gradients summed over microbatches and replicas (all-reduce SUM) are the gradient of the mean loss
of the whole step (the lowering contract of :mod:`spotpipe.schedule.passes`; the same accumulation as GPipe, Huang et al. 2019, and
Megatron-LM's pipeline, Narayanan et al. 2021).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from spotpipe.errors import SpotpipeError
from spotpipe.runtime.pipeline.meter import SavedTensorMeter


class RunnerError(SpotpipeError):
    """An action the runner cannot execute (e.g. a backward without its forward)."""


class StageRunner:
    """Runs the chunks (``stage -> module``) one worker holds.

    Args:
        chunks: The model chunks of this worker by stage index; chunk modules follow the
            ``StageModule`` contract (first chunk takes token ids, last chunk returns the loss when
            given targets).
        loss_scale: Factor applied to each microbatch's loss before backward.
        device: Where activations live.
    """

    def __init__(self, chunks: Mapping[int, nn.Module], loss_scale: float, device: torch.device | str = "cpu") -> None:
        self.chunks = dict(chunks)
        self.loss_scale = float(loss_scale)
        self.device = torch.device(device)
        self._inputs: Mapping[int, torch.Tensor] | Sequence[torch.Tensor] = ()
        self._targets: Mapping[int, torch.Tensor] | Sequence[torch.Tensor] = ()
        self._saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._dropped: dict[tuple[int, int], torch.Tensor] = {}  # inputs kept for a recompute
        self._train = True
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self.hook: Callable[[str], None] | None = None  # called with "forward" / "backward" (phase faults)
        self.meter: SavedTensorMeter | None = None  # counts what autograd saves (measured memory)

    # -- step boundaries ---------------------------------------------------------------------

    def begin(self, inputs: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
              targets: Mapping[int, torch.Tensor] | Sequence[torch.Tensor], train: bool = True) -> None:
        """Start a step (or an evaluation pass) with per-microbatch token ids and targets.

        Workers that hold neither the first nor the last chunk may pass empty sequences.

        Args:
            inputs: Token ids ``[b, T]`` (int64) by microbatch index (a list, or a mapping of the
                microbatches whose path starts here).
            targets: Next-token ids ``[b, T]`` (int64) by microbatch index, likewise.
            train: A training step (autograd, chunks in train mode), else an evaluation pass.
        """
        self._inputs = inputs
        self._targets = targets
        self._train = train
        self._saved.clear()
        self._dropped.clear()
        self._loss_sum = None
        self._loss_count = 0
        for chunk in self.chunks.values():
            chunk.train(train)

    def loss(self) -> tuple[float, int]:
        """(sum of unscaled microbatch losses computed on this worker, how many)."""
        total = 0.0 if self._loss_sum is None else float(self._loss_sum)
        return total, self._loss_count

    def discard(self) -> None:
        """Drop every saved activation (an aborted step)."""
        self._saved.clear()
        self._dropped.clear()
        self._loss_sum = None
        self._loss_count = 0

    @property
    def pending(self) -> int:
        """How many (stage, microbatch) activations (or inputs kept for a recompute) are held for a backward."""
        return len(self._saved) + len(self._dropped)

    # -- actions -----------------------------------------------------------------------------

    def forward(self, stage: int, microbatch: int, x: torch.Tensor | None, ends_path: bool | None = None,
                keep: bool = True) -> torch.Tensor | None:
        """Forward of ``stage`` for ``microbatch``.

        Args:
            stage: Stage (model chunk), global index; a chunk this worker holds.
            microbatch: Microbatch index.
            x: The input activation (received or handed over locally); ``None`` on the first stage
                of the path, which reads the microbatch's token ids.
            ends_path: The stage is the last of the microbatch's path (it computes the loss).
                Default: the chunk is the model's last one (``is_last``).
            keep: Keep what the backward needs. ``False`` (a recompute follows): run without
                autograd and keep only the input, for :meth:`recompute`.

        Returns:
            The output activation, or ``None`` where the path ends (its loss is accumulated).
        """
        if self.hook is not None and self._train:
            self.hook("forward")
        chunk = self.chunks[stage]
        if x is None:
            x = self._inputs[microbatch]
        if self._train and not keep:
            self._dropped[(stage, microbatch)] = x
            with torch.no_grad():
                return self._run(chunk, stage, microbatch, x, ends_path, count_loss=True)
        if self._train and x.is_floating_point():
            x.requires_grad_(True)
        if getattr(chunk, "is_last", False) if ends_path is None else ends_path:
            if self._train:
                with self._saving():
                    out = chunk(x, self._targets[microbatch], finish=True)
                self._saved[(stage, microbatch)] = (x if x.is_floating_point() else None, out)
            else:
                with torch.no_grad():
                    out = chunk(x, self._targets[microbatch], finish=True)
            detached = out.detach()
            self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
            self._loss_count += 1
            return None
        if self._train:
            with self._saving():
                out = chunk(x, finish=False)
            self._saved[(stage, microbatch)] = (x if x.is_floating_point() else None, out)
            return out
        with torch.no_grad():
            return chunk(x, finish=False)

    def _run(self, chunk: nn.Module, stage: int, microbatch: int, x: torch.Tensor, ends_path: bool | None,
             count_loss: bool) -> torch.Tensor | None:
        """The chunk on ``x`` in the current autograd mode; the loss where the path ends (added
        to the step's losses when ``count_loss``), else the output activation."""
        if getattr(chunk, "is_last", False) if ends_path is None else ends_path:
            out: torch.Tensor = chunk(x, self._targets[microbatch], finish=True)
            if count_loss:
                detached = out.detach()
                self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
                self._loss_count += 1
                return None
            return out
        hidden: torch.Tensor = chunk(x, finish=False)
        return hidden

    def recompute(self, stage: int, microbatch: int, ends_path: bool | None = None) -> None:
        """Run the forward of ``stage`` for ``microbatch`` again, with autograd, from the input
        its forward kept (``keep=False``), and keep what the backward needs.

        Same inputs, same weights (they change only at the optimizer step) and no randomness in
        the model, so the recomputed activations equal the dropped ones and the gradients are
        exactly those without recompute (Chen et al. 2016, "Training Deep Nets with Sublinear
        Memory Cost").

        Args:
            stage: Stage (model chunk), global index.
            microbatch: Microbatch index.
            ends_path: As for :meth:`forward`.

        Raises:
            RunnerError: no forward of that stage and microbatch kept its input.
        """
        try:
            x = self._dropped.pop((stage, microbatch))
        except KeyError:
            raise RunnerError(f"recompute {stage}R{microbatch} without a forward that kept its input") from None
        if x.is_floating_point():
            x.requires_grad_(True)
        with self._saving():
            out = self._run(self.chunks[stage], stage, microbatch, x, ends_path, count_loss=False)
        assert out is not None
        self._saved[(stage, microbatch)] = (x if x.is_floating_point() else None, out)

    def _saving(self) -> contextlib.AbstractContextManager[None]:
        """The meter's counting context, or nothing without a meter."""
        return contextlib.nullcontext() if self.meter is None else self.meter.saving()

    def backward(self, stage: int, microbatch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward of ``stage`` for ``microbatch``.

        Args:
            stage: Stage (model chunk), global index; a chunk this worker holds.
            microbatch: Microbatch index.
            grad: Gradient of the loss with respect to this stage's output; ``None`` on the last
                chunk, whose output is the loss.

        Returns:
            The gradient with respect to the stage's input activation, or ``None`` on the first
            chunk (its input is token ids).

        Raises:
            RunnerError: no forward of that stage and microbatch is waiting for its backward.
        """
        if self.hook is not None:
            self.hook("backward")
        try:
            x, out = self._saved.pop((stage, microbatch))
        except KeyError:
            raise RunnerError(f"backward {stage}B{microbatch} before its forward") from None
        if grad is None:
            (out * self.loss_scale).backward()
        else:
            torch.autograd.backward(out, grad)
        if x is None:
            return None
        return x.grad
