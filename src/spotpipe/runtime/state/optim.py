"""Optimiser, learning-rate schedule and gradient clipping shared by every training mode.

The pipeline workers, the single-process reference and the in-process convergence mode all call
these, so their updates are identical given identical gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from spotpipe.config import TrainConfig
from spotpipe.errors import SpotpipeError


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig,
                    unscaled: Iterable[torch.nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only (norm gains and biases are not decayed).

    ``unscaled`` parameters go into their own groups, which :func:`set_lr` never scales: a
    chunk's learning-rate factor (CheckFree's x1.1) is for its rebuilt *blocks*, while an
    embedding or LM head that CheckFree+ keeps in two places must train at the same rate in both.

    The update is torch's fused AdamW kernel (one pass over each parameter's weights, gradient
    and moments, on CPU and CUDA): on this project's CPU benchmarks it is about 4.5 times faster
    than the per-tensor loop at 6 M parameters per stage, which matters twice with mirrors, where
    the holder replays every update (``bench/mirror_scaling.py``). Every worker, mirror and the
    single-process reference build their optimizer here, so their updates stay bit for bit equal.

    Args:
        params: The parameters to train (those without ``requires_grad`` are left out).
        train: The ``[train]`` section: ``lr``, ``beta1``, ``beta2``, ``weight_decay``.
        unscaled: Parameters whose groups keep the base learning rate.

    Returns:
        The optimizer (eps 1e-8); each group carries ``lr_scaled``.
    """
    fixed = {id(p) for p in unscaled}
    params = [p for p in params if p.requires_grad]
    groups = []
    for scaled in (True, False):
        part = [p for p in params if (id(p) not in fixed) == scaled]
        decay = [p for p in part if p.dim() >= 2]
        no_decay = [p for p in part if p.dim() < 2]
        if scaled or decay:
            groups.append({"params": decay, "weight_decay": train.weight_decay, "lr_scaled": scaled})
        if scaled or no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scaled": scaled})
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8, fused=True)


def build_stage_optimizer(chunk: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """:func:`build_optimizer` for a model chunk: everything but its transformer blocks (embedding,
    final norm, LM head) is ``unscaled``.

    Args:
        chunk: A model chunk (:class:`~spotpipe.model.stages.StageModule`, or any module; one
            without ``blocks`` has everything unscaled).
        train: The ``[train]`` section.

    Returns:
        The optimizer.
    """
    blocks = getattr(chunk, "blocks", None)
    inside = {id(p) for p in blocks.parameters()} if blocks is not None else set()
    return build_optimizer(chunk.parameters(), train, unscaled=[p for p in chunk.parameters() if id(p) not in inside])


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of optimiser step ``step``: linear warmup, then cosine decay to the floor.

    With peak ``lr``, floor ``lr * min_lr_ratio``, ``W = warmup_steps`` and ``T = steps`` (the
    steps are ``0 .. T-1``):

    * warmup, ``step < W``: ``lr * (step + 1) / W``, so the peak is reached once, at step
      ``W - 1`` (at step 0 when ``W = 0``);
    * decay, from the peak step ``p = max(W - 1, 0)`` to the last step ``T - 1``:
      ``floor + (lr - floor) * (1 + cos(pi * (step - p) / (T - 1 - p))) / 2``, the cosine
      annealing of Loshchilov and Hutter ("SGDR: Stochastic Gradient Descent with Warm
      Restarts", ICLR 2017, eq. 5) over one period without restarts, so the last step that runs
      is at exactly ``lr * min_lr_ratio``.

    When the warmup covers every step (``W >= T``) there is nothing to decay over; steps past
    ``T - 1`` (none run) stay at the floor.

    Args:
        step: 0-based optimiser step (the first update uses ``lr_at(0)``).
        train: ``lr``, ``min_lr_ratio``, ``warmup_steps`` and ``steps``.

    Returns:
        The learning rate, before any per-chunk scale (CheckFree's x1.1).
    """
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return train.lr * ((step + 1) / train.warmup_steps)  # exactly lr at the last warmup step
    peak = max(train.warmup_steps - 1, 0)
    span = train.steps - 1 - peak
    floor = train.lr * train.min_lr_ratio
    if span <= 0:
        return train.lr if step <= peak else floor
    progress = min(1.0, (step - peak) / span)
    if progress >= 1.0:
        return floor
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, scale: float = 1.0) -> None:
    """Set every group's learning rate to ``lr``, times ``scale`` where the group is scaled.

    Args:
        optimizer: An optimizer from :func:`build_optimizer` (a group without ``lr_scaled`` counts as
            scaled).
        lr: Base learning rate.
        scale: The chunk's factor (CheckFree's x1.1 after a rebuild; 1.0 otherwise).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * scale if group.get("lr_scaled", True) else lr


def apply_update(flat_grad: torch.Tensor, optimizers: dict[int, torch.optim.Optimizer], lr_scale: dict[int, float],
                 coef: float, lr: float) -> None:
    """Clip (``coef``, see :func:`clip_coefficient`), set the learning rates and step every chunk's
    optimizer. The one update rule of a pipeline worker and of the mirror that replays it, so the
    two stay bit for bit equal.

    Args:
        flat_grad: The flat buffer every ``.grad`` of these optimizers views; scaled in place.
        optimizers: Global chunk index -> its optimizer.
        lr_scale: Global chunk index -> its learning-rate factor.
        coef: The clip coefficient (< 1 scales the gradients).
        lr: Base learning rate of this step.
    """
    if coef < 1.0:
        flat_grad.mul_(coef)
    for s in sorted(optimizers):
        set_lr(optimizers[s], lr, lr_scale[s])
        optimizers[s].step()


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Scale factor for gradients whose global L2 norm is ``total_norm`` (1.0 = unchanged).

    Pipeline workers each hold part of the model: they all-reduce the squared norms of their parts
    and apply this same coefficient, which equals ``torch.nn.utils.clip_grad_norm_`` on the whole.

    Args:
        total_norm: Global L2 norm of the gradients (all stages).
        max_norm: ``train.grad_clip``; <= 0 turns clipping off.

    Returns:
        ``min(1, max_norm / (total_norm + 1e-6))``; 1.0 without clipping or for a non-finite norm.
    """
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def nonfinite_reason(grad_norm: float, loss: float) -> str:
    """Why a step's update must not be applied: ``"the gradient norm is nan"``, or ``""`` if both the
    global gradient norm and the loss are finite.

    Every worker knows both after the step's world all-reduce, so every worker decides the same.
    ``torch.nn.utils.clip_grad_norm_`` would scale a non-finite gradient by 1.0 and let it through
    (it has ``error_if_nonfinite`` for this); a NaN update poisons every later step.

    Args:
        grad_norm: Global L2 norm of the step's gradients.
        loss: The step's mean loss.

    Returns:
        The reason, or ``""``.
    """
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    return ""


class NonfiniteStep(SpotpipeError):
    """A step's gradient norm or loss was not finite and ``train.nonfinite = "stop"``."""


def nonfinite_step_error(step: int, steps: int, reason: str) -> NonfiniteStep:
    """The one line that stops a job at a non-finite step (``step`` 0-based, shown as the progress
    line counts it).

    Args:
        step: 0-based index of the step.
        steps: Steps of the job (``train.steps``).
        reason: From :func:`nonfinite_reason`.

    Returns:
        The error to raise.
    """
    return NonfiniteStep(f"step {step + 1}/{steps}: {reason}; its update was not applied and the job stops "
                         f"(train.nonfinite = stop; \"skip\" would skip such steps; lower train.lr or raise "
                         f"train.warmup_steps)")


def grad_sq_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Sum of squared gradient entries of ``params`` (float64 for reproducible sums).

    Args:
        params: Parameters; those without a gradient count 0.

    Returns:
        The sum of squares (a Python float).
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum()
    return float(total)
