"""Single-process training of the chunked model: the correctness reference for pipeline training.

:class:`LocalTrainer` trains the same chunks the pipeline workers hold (built by
:func:`~spotpipe.model.stages.build_stage`), with one AdamW per chunk, the same learning-rate
schedule, global-norm clipping over all chunks, the same sampler and the same data slicing and
loss scaling (``notes/LOWERING.md``, "Loss" and "Data per step"), but runs every replica's every
microbatch one after the other in this process. The multi-process runtime must reproduce its
per-step losses (within 1e-5 relative). It also exposes the hooks the in-process failure mode
uses: per-chunk gradient norms (CheckFree's weighting, Blagoev et al. 2025), per-chunk learning
rate scales, and replacing a chunk.

Gradient accumulation follows the pipeline exactly: each microbatch loss is scaled by
``1 / (replicas x microbatches)`` before backward; with several replicas each replica's gradient
is accumulated on its own and the replicas' gradients are then summed in replica order, as an
all-reduce (SUM) would.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from spotpipe.config import JobConfig
from spotpipe.data.sampler import SequenceSampler, microbatch_ids
from spotpipe.errors import SpotpipeError
from spotpipe.model.stages import StageModule, build_stage
from spotpipe.runtime.state.optim import (build_stage_optimizer, clip_coefficient, grad_sq_norm, lr_at, nonfinite_reason,
                                          nonfinite_step_error, set_lr)
from spotpipe.schedule.generators import model_chunks


@dataclass(frozen=True)
class StepResult:
    """What one committed training step produced.

    Attributes:
        step: 0-based index of the step just taken (the ``step`` passed to ``lr_at``).
        loss: Mean of the unscaled microbatch losses over all replicas and microbatches.
        tokens: Target tokens trained on in the step (``batch_size x context``).
        grad_norm: Global L2 norm of the gradient over all chunks, before clipping.
        lr: Base learning rate of the step (chunks may scale it, see ``lr_scale``).
        sampler_state: Sampler state AFTER the step: restoring it continues with the next step.
        skipped: Why the step's update was not applied (a non-finite gradient norm or loss with
            ``train.nonfinite = "skip"``), or "".
    """

    step: int
    loss: float
    tokens: int
    grad_norm: float
    lr: float
    sampler_state: dict[str, int]
    skipped: str = ""


def default_num_chunks(cfg: JobConfig) -> int:
    """Chunks of a job: ``pipeline.stages``, times ``virtual_stages`` for a chunked schedule
    (interleaved; :func:`spotpipe.schedule.generators.model_chunks`)."""
    p = cfg.pipeline
    return model_chunks(p.schedule, p.stages, p.virtual_stages)


def fit_vocab(cfg: JobConfig, token_file: Any) -> JobConfig:
    """``cfg`` with ``model.vocab_size`` set to the token file's vocabulary (unchanged if equal)."""
    if cfg.model.vocab_size == token_file.vocab_size:
        return cfg
    return replace(cfg, model=replace(cfg.model, vocab_size=token_file.vocab_size))


def _to_tensor(batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.from_numpy(batch).to(device)
    return data[:, :-1], data[:, 1:]


class LocalTrainer:
    """Train the stage-chained model in one process, step by step.

    Args:
        cfg: The job (validated).
        token_file: The :class:`~spotpipe.data.tokens.TokenFile` to train on.
        num_chunks: Chunks to cut the model into; ``None`` = as the pipeline does
            (:func:`default_num_chunks`).
        device: Where the chunks live (default CPU).

    Raises:
        SpotpipeError: if the token file's vocabulary does not fit ``model.vocab_size``, or a
            split is too small for ``model.context``.
    """

    def __init__(
        self,
        cfg: JobConfig,
        token_file: Any,
        num_chunks: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if token_file.vocab_size > cfg.model.vocab_size:
            raise SpotpipeError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of {getattr(token_file, 'dir', 'the token file')} "
                f"({token_file.vocab_size}); set model.vocab_size={token_file.vocab_size}"
            )
        self.cfg = cfg
        self.token_file = token_file
        self.num_chunks = default_num_chunks(cfg) if num_chunks is None else num_chunks
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunks: list[StageModule] = [
            build_stage(cfg.model, cfg.train.seed, i, self.num_chunks, device=self.device) for i in range(self.num_chunks)
        ]
        self.optimizers: list[torch.optim.Optimizer] = [build_stage_optimizer(c, cfg.train) for c in self.chunks]
        self.lr_scale: list[float] = [1.0] * self.num_chunks
        name = str(getattr(token_file, "dir", "the token file"))
        self.sampler = SequenceSampler(token_file.num_tokens, cfg.model.context, cfg.train.seed, "train", cfg.data.val_fraction, name=name)
        self.val_sampler = SequenceSampler(token_file.num_tokens, cfg.model.context, cfg.train.seed, "val", cfg.data.val_fraction, name=name)
        self.step = 0  # steps completed
        self._grad_norms: list[float] = [0.0] * self.num_chunks
        self.last_skipped = ""  # why the last step's update was not applied (non-finite), or ""

    # ------------------------------------------------------------------------------------------
    # Training

    def forward_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of one microbatch, chaining every chunk."""
        x = tokens
        for chunk in self.chunks[:-1]:
            x = chunk(x)
        return self.chunks[-1](x, targets)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for c in self.chunks for p in c.parameters()]

    def compute_gradients(self, step_ids: Sequence[int]) -> list[float]:
        """Forward and backward every microbatch of the step; return the unscaled microbatch losses.

        Gradients (scaled by 1/(R M), summed per replica, then over replicas) are left in the
        chunks' ``.grad``; nothing is clipped or stepped.
        """
        p = self.cfg.pipeline
        replicas, microbatches = p.replicas, p.microbatches
        scale = 1.0 / (replicas * microbatches)
        params = self._params()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        losses: list[float] = []
        total: list[torch.Tensor | None] | None = None
        for r in range(replicas):
            for m in range(microbatches):
                ids = microbatch_ids(step_ids, replicas, microbatches, r, m)
                tokens, targets = _to_tensor(self.sampler.batch(self.token_file, ids), self.device)
                loss = self.forward_loss(tokens, targets)
                (loss * scale).backward()
                losses.append(float(loss.detach()))
            if replicas > 1:  # keep each replica's sum apart, then add in replica order (all-reduce)
                grads = [q.grad for q in params]
                if total is None:
                    total = grads
                else:
                    total = [a if b is None else (b if a is None else a + b) for a, b in zip(total, grads)]
                for q in params:
                    q.grad = None
        if total is not None:
            for q, g in zip(params, total):
                q.grad = g
        return losses

    def clip_and_step(self, loss: float = 0.0) -> tuple[float, float]:
        """Global-norm clip over all chunks, set the scheduled lr, step every optimizer; a step whose
        gradient norm or ``loss`` is not finite is never applied (``train.nonfinite``, as on the
        pipeline workers: :func:`~spotpipe.runtime.state.optim.nonfinite_reason`).

        Returns:
            ``(grad_norm before clipping, base lr)``.

        Raises:
            NonfiniteStep: The step is not finite and ``train.nonfinite = "stop"``.
        """
        sq = [grad_sq_norm(c.parameters()) for c in self.chunks]
        self._grad_norms = [math.sqrt(s) for s in sq]
        total_norm = math.sqrt(sum(sq))
        lr = lr_at(self.step, self.cfg.train)
        self.last_skipped = nonfinite_reason(total_norm, loss)
        if self.last_skipped:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            if self.cfg.train.nonfinite == "stop":
                raise nonfinite_step_error(self.step, self.cfg.train.steps, self.last_skipped)
            return total_norm, lr
        coef = clip_coefficient(total_norm, self.cfg.train.grad_clip)
        if coef < 1.0:
            with torch.no_grad():
                for q in self._params():
                    if q.grad is not None:
                        q.grad.mul_(coef)
        for opt, chunk_scale in zip(self.optimizers, self.lr_scale):
            set_lr(opt, lr, chunk_scale)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total_norm, lr

    def train_step(self) -> StepResult:
        """Take one optimiser step on the next ``train.batch_size`` samples."""
        step_ids = self.sampler.next_ids(self.cfg.train.batch_size)
        losses = self.compute_gradients(step_ids)
        loss = sum(losses) / len(losses)
        grad_norm, lr = self.clip_and_step(loss)
        result = StepResult(
            step=self.step,
            loss=loss,
            tokens=self.cfg.train.batch_size * self.cfg.model.context,
            grad_norm=grad_norm,
            lr=lr,
            sampler_state=self.sampler.state_dict(),
            skipped=self.last_skipped,
        )
        self.step += 1
        return result

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:
        """Mean validation loss over the first ``batches x train.batch_size`` windows of the val split.

        Deterministic: always the same windows, in id order (fewer if the split is smaller).
        ``None`` = ``train.eval_batches``.
        """
        batches = self.cfg.train.eval_batches if batches is None else batches
        size = self.cfg.train.batch_size
        n = min(batches * size, self.val_sampler.num_windows)
        weighted, rows = 0.0, 0
        for start in range(0, n, size):
            ids = list(range(start, min(start + size, n)))
            tokens, targets = _to_tensor(self.val_sampler.batch(self.token_file, ids), self.device)
            weighted += float(self.forward_loss(tokens, targets)) * len(ids)
            rows += len(ids)
        return weighted / rows

    # ------------------------------------------------------------------------------------------
    # State and hooks

    def last_grad_norms(self) -> list[float]:
        """Per-chunk L2 gradient norms of the last step, before clipping."""
        return list(self._grad_norms)

    def chunk_state(self, i: int) -> dict[str, Any]:
        """A deep copy of chunk ``i``'s ``{"model": state_dict, "optimizer": state_dict}``."""
        return copy.deepcopy({"model": self.chunks[i].state_dict(), "optimizer": self.optimizers[i].state_dict()})

    def load_chunk_state(self, i: int, state: dict[str, Any]) -> None:
        """Restore chunk ``i`` from :meth:`chunk_state` output (tensors are copied in)."""
        self.chunks[i].load_state_dict(state["model"])
        self.optimizers[i].load_state_dict(copy.deepcopy(state["optimizer"]))

    def replace_chunk(self, i: int, module: StageModule, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Put ``module`` in place of chunk ``i``; with no ``optimizer``, a fresh AdamW is built for it."""
        if module.index != i or module.num_chunks != self.num_chunks:
            raise ValueError(f"module is chunk {module.index} of {module.num_chunks}, expected chunk {i} of {self.num_chunks}")
        self.chunks[i] = module
        self.optimizers[i] = optimizer if optimizer is not None else build_stage_optimizer(module, self.cfg.train)

    def set_lr_scale(self, i: int, scale: float) -> None:
        """Multiply the learning rate of chunk ``i``'s blocks by ``scale`` from the next step on (CheckFree
        uses 1.1; the embedding, final norm and head keep the base rate, see ``build_optimizer``)."""
        self.lr_scale[i] = scale

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, sampler, lr scales and every chunk's state (deep copies)."""
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "lr_scale": list(self.lr_scale),
            "chunks": [self.chunk_state(i) for i in range(self.num_chunks)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; the following steps equal the original run's."""
        if len(state["chunks"]) != self.num_chunks:
            raise SpotpipeError(f"saved state has {len(state['chunks'])} chunks, this trainer has {self.num_chunks}")
        for i, chunk_state in enumerate(state["chunks"]):
            self.load_chunk_state(i, chunk_state)
        self.sampler.load_state_dict(state["sampler"])
        self.lr_scale = [float(s) for s in state.get("lr_scale", [1.0] * self.num_chunks)]
        self.step = int(state["step"])
