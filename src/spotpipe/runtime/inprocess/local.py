"""Single-process training of the chunked model: the correctness reference for pipeline training.

:class:`LocalTrainer` trains the same chunks the pipeline workers hold (built by
:func:`~spotpipe.model.stages.build_stage`), in the same
:class:`~spotpipe.runtime.state.stage_state.StageState` a worker holds (here over every chunk: the
optimizer of :func:`~spotpipe.runtime.state.pick.build_chunk_optimizer`, one AdamW per
chunk, and per-chunk learning-rate scales), with the same learning-rate schedule, global-norm
clipping over all chunks, the same sampler and the same data slicing and loss scaling (the
lowering contract of :mod:`spotpipe.schedule.passes`, "Loss" and "Data per step"), but runs every
replica's every microbatch one after the other in this process. The multi-process runtime must
reproduce its per-step losses (within 1e-5 relative). It also exposes the hooks the in-process
failure mode uses: per-chunk gradient norms (CheckFree's weighting, Blagoev et al. 2025), per-chunk
learning rate scales, a chunk's state in the stage state's one flat form
(:meth:`LocalTrainer.chunk_state`, the form checkpoints, mirrors and recovery transfers share),
and replacing a chunk. :meth:`LocalTrainer.replica_losses` is the one place that
decides how a replica's microbatches are computed: here one after the other through every chunk;
the in-process player (:mod:`spotpipe.runtime.inprocess.player`) plays the lowered schedule on the
pipeline executor instead.

Gradient accumulation follows the pipeline exactly: each microbatch loss is scaled by
``1 / (replicas x microbatches)`` before backward; with several replicas each replica's gradient
is accumulated on its own and the replicas' gradients are then summed in replica order, as an
all-reduce (SUM) would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from spotpipe.config import JobConfig
from spotpipe.data.sampler import SequenceSampler, microbatch_ids
from spotpipe.errors import SpotpipeError
from spotpipe.model.skipping import forward_skipping
from spotpipe.model.stages import StageModule, build_stage
from spotpipe.runtime.state.optim import clip_coefficient, grad_sq_norm, lr_at, nonfinite_reason, nonfinite_step_error
from spotpipe.runtime.state.pick import build_chunk_optimizer
from spotpipe.runtime.state.stage_state import StageState
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
    (interleaved; :func:`spotpipe.schedule.generators.model_chunks`).

    Args:
        cfg: The job.

    Returns:
        The number of model chunks.
    """
    p = cfg.pipeline
    return model_chunks(p.schedule, p.stages, p.virtual_stages)


def fit_vocab(cfg: JobConfig, token_file: Any) -> JobConfig:
    """``cfg`` with ``model.vocab_size`` set to the token file's vocabulary (unchanged if equal).

    Args:
        cfg: The job.
        token_file: A :class:`~spotpipe.data.tokens.TokenFile` (its ``vocab_size``).

    Returns:
        The job, possibly with a new vocabulary size (not validated again).
    """
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

    Attributes:
        state: The :class:`~spotpipe.runtime.state.stage_state.StageState` of every chunk: the
            chunks, their optimizer (behind its small interface) and learning-rate scales.

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
        chunks = {i: self.build_chunk(i) for i in range(self.num_chunks)}
        self.state = StageState(chunks, build_chunk_optimizer(chunks, cfg.train, cfg.pipeline.offload == "optimizer"))
        name = str(getattr(token_file, "dir", "the token file"))
        self.sampler = SequenceSampler(token_file.num_tokens, cfg.model.context, cfg.train.seed, "train", cfg.data.val_fraction, name=name)
        self.val_sampler = SequenceSampler(token_file.num_tokens, cfg.model.context, cfg.train.seed, "val", cfg.data.val_fraction, name=name)
        self.step = 0  # steps completed
        self._grad_norms: list[float] = [0.0] * self.num_chunks
        self.last_skipped = ""  # why the last step's update was not applied (non-finite), or ""

    def build_chunk(self, index: int) -> StageModule:
        """Chunk ``index`` as the pipeline worker that holds it builds it (subclasses may build it
        differently, with the same initial weights).

        Args:
            index: Chunk index, 0-based.

        Returns:
            The chunk, on this trainer's device.
        """
        return build_stage(self.cfg.model, self.cfg.train.seed, index, self.num_chunks, device=self.device)

    @property
    def chunks(self) -> list[StageModule]:
        """The chunks in order (those of :attr:`state`)."""
        return [self.state.chunks[i] for i in range(self.num_chunks)]

    @property
    def lr_scale(self) -> dict[int, float]:
        """Chunk -> its learning-rate factor (:attr:`state`'s; set it with :meth:`set_lr_scale`)."""
        return self.state.lr_scale

    # ------------------------------------------------------------------------------------------
    # Training

    def forward_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of one microbatch, chaining every chunk.

        Args:
            tokens: Token ids ``[rows, context]`` (int64).
            targets: Next-token ids ``[rows, context]`` (int64).

        Returns:
            A float32 scalar tensor, with autograd.
        """
        return forward_skipping(self.chunks, tokens, (), targets)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for c in self.chunks for p in c.parameters()]

    def compute_gradients(self, step_ids: Sequence[int]) -> list[float]:
        """Forward and backward every microbatch of the step; return the unscaled microbatch losses.

        Gradients (scaled by 1/(R M), summed per replica by :meth:`replica_losses`, then over
        replicas in replica order) are left in the chunks' ``.grad``; nothing is clipped or stepped.

        Returns:
            The microbatch losses, replica by replica, microbatch by microbatch.

        Args:
            step_ids: The step's ``train.batch_size`` sample ids.
        """
        replicas = self.cfg.pipeline.replicas
        params = self._params()
        for q in params:
            q.grad = None
        losses: list[float] = []
        total: list[torch.Tensor | None] | None = None
        for r in range(replicas):
            losses.extend(self.replica_losses(step_ids, r))
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

    def microbatch(self, step_ids: Sequence[int], replica: int, microbatch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and next-token targets (each ``[rows, context]``) of one microbatch of one replica.

        Args:
            step_ids: The step's sample ids.
            replica: The replica, 0-based.
            microbatch: The microbatch, 0-based.

        Returns:
            ``(tokens, targets)``, int64 on the trainer's device; ``rows = batch_size / (R M)``.
        """
        p = self.cfg.pipeline
        ids = microbatch_ids(step_ids, p.replicas, p.microbatches, replica, microbatch)
        return _to_tensor(self.sampler.batch(self.token_file, ids), self.device)

    def replica_losses(self, step_ids: Sequence[int], replica: int) -> list[float]:
        """Forward and backward of one replica's microbatches, one after the other through every chunk.

        Each loss is scaled by ``1 / (replicas x microbatches)`` before its backward; the gradients
        accumulate in the chunks' ``.grad``. Subclasses play the microbatches differently (the
        in-process player runs the pipeline executor) but must leave the same gradients.

        Returns:
            The unscaled loss of each microbatch, in microbatch order.

        Args:
            step_ids: The step's sample ids.
            replica: The replica, 0-based.
        """
        p = self.cfg.pipeline
        scale = 1.0 / (p.replicas * p.microbatches)
        losses: list[float] = []
        for m in range(p.microbatches):
            tokens, targets = self.microbatch(step_ids, replica, m)
            loss = self.forward_loss(tokens, targets)
            (loss * scale).backward()
            losses.append(float(loss.detach()))
        return losses

    def clip_and_step(self, loss: float = 0.0) -> tuple[float, float]:
        """Global-norm clip over all chunks, then one step of the stage state at the scheduled lr; a
        step whose gradient norm or ``loss`` is not finite is never applied (``train.nonfinite``, as
        on the pipeline workers: :func:`~spotpipe.runtime.state.optim.nonfinite_reason`).

        Returns:
            ``(grad_norm before clipping, base lr)``.

        Args:
            loss: The step's mean loss (checked for being finite with the gradient norm).

        Raises:
            NonfiniteStep: The step is not finite and ``train.nonfinite = "stop"``.
        """
        sq = [grad_sq_norm(c.parameters()) for c in self.chunks]
        self._grad_norms = [math.sqrt(s) for s in sq]
        total_norm = math.sqrt(sum(sq))
        lr = lr_at(self.step, self.cfg.train)
        self.last_skipped = nonfinite_reason(total_norm, loss)
        if self.last_skipped:
            for q in self._params():
                q.grad = None
            if self.cfg.train.nonfinite == "stop":
                raise nonfinite_step_error(self.step, self.cfg.train.steps, self.last_skipped)
            return total_norm, lr
        coef = clip_coefficient(total_norm, self.cfg.train.grad_clip)
        if coef < 1.0:
            with torch.no_grad():
                for q in self._params():
                    if q.grad is not None:
                        q.grad.mul_(coef)
        self.state.step(lr)
        for q in self._params():
            q.grad = None
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

        Args:
            batches: Batches of ``train.batch_size`` windows.

        Returns:
            The mean loss per window (nats per token), weighted by batch size.
        """
        batches = self.cfg.train.eval_batches if batches is None else batches
        return self.validation_loss(batches * self.cfg.train.batch_size)

    @torch.no_grad()
    def validation_loss(self, windows: int, skip: Collection[int] = (), progress: Callable[[int], None] | None = None) -> float:
        """Mean validation loss over the first ``windows`` windows of the val split (at most all of
        them), in id order, ``train.batch_size`` windows per forward, each batch weighted by its
        windows; with the chunks in ``skip`` left out (skipped-stage inference,
        :func:`~spotpipe.model.skipping.forward_skipping`).

        Args:
            windows: Validation windows of ``model.context`` tokens to read (>= 1).
            skip: Chunk indices to leave out (never the first or the last).
            progress: Called with the windows done so far after each batch.

        Returns:
            The mean loss per window (nats per token).
        """
        size = self.cfg.train.batch_size
        n = min(windows, self.val_sampler.num_windows)
        weighted, rows = 0.0, 0
        for start in range(0, n, size):
            ids = list(range(start, min(start + size, n)))
            tokens, targets = _to_tensor(self.val_sampler.batch(self.token_file, ids), self.device)
            weighted += float(forward_skipping(self.chunks, tokens, skip, targets)) * len(ids)
            rows += len(ids)
            if progress is not None:
                progress(rows)
        return weighted / rows

    # ------------------------------------------------------------------------------------------
    # State and hooks

    def last_grad_norms(self) -> list[float]:
        """Per-chunk L2 gradient norms of the last step, before clipping."""
        return list(self._grad_norms)

    def chunk_state(self, i: int) -> torch.Tensor:
        """Chunk ``i``'s weights, optimizer moments and learning-rate scale in the stage state's one
        flat form (:meth:`StageState.flat`, a float32 CPU tensor, a copy): what a worker of the
        chunk holds, sends and checkpoints.

        Args:
            i: Chunk index.

        Returns:
            A float32 CPU tensor ``[numel]``.
        """
        return self.state.view([i]).flat()

    def load_chunk_state(self, i: int, state: torch.Tensor) -> None:
        """Restore chunk ``i`` from :meth:`chunk_state` output (numbers copied in).

        Args:
            i: Chunk index.
            state: A float32 tensor from :meth:`chunk_state` of a same-shaped chunk.

        Raises:
            ValueError: If ``state`` was not made from a chunk of this shape.
        """
        self.state.view([i]).load_flat(state)

    def replace_chunk(self, i: int, module: StageModule, state: torch.Tensor | None = None) -> None:
        """Put ``module`` in place of chunk ``i``, with fresh optimizer state or, given ``state``
        (:meth:`chunk_state` output), that state. The optimizer is built again for the new chunk
        list (:func:`build_chunk_optimizer`); every other chunk keeps its moments and scale.

        Args:
            i: Chunk index.
            module: The new chunk (chunk ``i`` of this trainer's ``num_chunks``).
            state: Its flat state, or None for fresh optimizer state.

        Raises:
            ValueError: If ``module`` is not chunk ``i`` of this trainer's chunks, or ``state`` does
                not fit it.
        """
        if module.index != i or module.num_chunks != self.num_chunks:
            raise ValueError(f"module is chunk {module.index} of {module.num_chunks}, expected chunk {i} of {self.num_chunks}")
        kept = {s: self.chunk_state(s) for s in range(self.num_chunks) if s != i}
        scales = dict(self.state.lr_scale)
        chunks = {**self.state.chunks, i: module}
        self.state = StageState(chunks, build_chunk_optimizer(chunks, self.cfg.train, self.cfg.pipeline.offload == "optimizer"),
                                scales)
        for s, flat in kept.items():
            self.load_chunk_state(s, flat)
        self.state.lr_scale.update(scales)  # exactly as they were
        if state is not None:
            self.load_chunk_state(i, state)

    def set_lr_scale(self, i: int, scale: float) -> None:
        """Multiply the learning rate of chunk ``i``'s blocks by ``scale`` from the next step on (CheckFree
        uses 1.1; the embedding, final norm and head keep the base rate, see ``build_optimizer``).

        The scale is kept in float32, the precision the flat state carries it in, so a chunk saved
        and restored (:meth:`chunk_state`, :meth:`state_dict`) trains on exactly as before.

        Args:
            i: Chunk index.
            scale: The factor.
        """
        self.state.lr_scale[i] = float(torch.tensor(scale, dtype=torch.float32))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, sampler and every chunk's :meth:`chunk_state`."""
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "chunks": [self.chunk_state(i) for i in range(self.num_chunks)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; the following steps equal the original run's.

        Args:
            state: ``{"chunks", "sampler", "step"}`` as :meth:`state_dict` returned it.

        Raises:
            SpotpipeError: If the saved state has another number of chunks.
            ValueError: If a chunk's saved state does not fit its chunk.
        """
        if len(state["chunks"]) != self.num_chunks:
            raise SpotpipeError(f"saved state has {len(state['chunks'])} chunks, this trainer has {self.num_chunks}")
        for i, chunk_state in enumerate(state["chunks"]):
            self.load_chunk_state(i, chunk_state)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
