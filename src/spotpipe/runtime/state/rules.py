"""The CheckFree tensor rules: the neighbour weights and the weighted average of their blocks.

Pure tensor math over state dicts, called by
:meth:`~spotpipe.runtime.state.stage_state.StageState.install_checkfree`, which both the
multi-process runtime and the in-process convergence mode use to rebuild a stage, so a stage is
rebuilt by the same code in both. Every other recovery (a replica, a mirror, a CheckFree+ swap
partner, a checkpoint) copies a stage's state in its one flat form
(:meth:`~spotpipe.runtime.state.stage_state.StageState.flat`); nothing here serialises state.
Blocks are numbered locally inside a chunk (``blocks.0.`` ...), so chunks with the same number of
blocks have identical block keys (see :mod:`spotpipe.model.stages`).

The rule (Blagoev, Ersoy, Chen 2025, "All is Not Lost: LLM Recovery without Checkpoints",
section 3.1): a lost middle stage ``i`` becomes
``(w_{i-1} W_{i-1} + w_{i+1} W_{i+1}) / (w_{i-1} + w_{i+1})`` over its transformer blocks, with
fresh optimizer state and the learning rate x1.1 (the CheckFree strategy's factor in
:mod:`spotpipe.ft.strategies.checkfree`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from spotpipe.errors import SpotpipeError

BLOCK_PREFIX = "blocks."


class RecoveryError(SpotpipeError):
    """A recovery rule cannot be applied to the given states (mismatched blocks, missing keys)."""


def _model(state: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    return state["model"] if "model" in state and isinstance(state["model"], Mapping) else state


def block_keys(state: Mapping[str, Any]) -> list[str]:
    """The transformer-block keys of a state dict (or of ``{"model": state dict}``), sorted.

    Args:
        state: A chunk's state dict, or a dict holding it under ``"model"``.

    Returns:
        The keys that start with ``blocks.``.
    """
    return sorted(k for k in _model(state) if k.startswith(BLOCK_PREFIX))


def checkfree_weights(omega_prev: float, omega_next: float) -> tuple[float, float]:
    """Normalised CheckFree coefficients ``(w_prev, w_next)`` that sum to 1.

    Which omega: the neighbours' gradient norms of the last step **before clipping**
    (:meth:`spotpipe.runtime.inprocess.local.LocalTrainer.last_grad_norms`). Reasons:

    1. spotpipe clips by the *global* norm over all stages (the lowering contract of :mod:`spotpipe.schedule.passes`), which
       multiplies every stage's norm by the same coefficient, so the ratio, and with it the
       average, is the same before and after global clipping: taking the pre-clip norm loses
       nothing and needs no knowledge of the clip coefficient.
    2. Any per-stage clipping (a worker clipping its own part, or omega taken as
       ``min(norm, grad_clip)``) maps both norms to ``grad_clip`` whenever both exceed it, and
       the "gradient-norm weighting" of the paper silently degenerates to a plain average.

    Measured (``bench/convergence_under_failures.py``, ``omega`` in its JSON; 6 stages of one
    block, tinyshakespeare, ``grad_clip = 1``): global clipping was active in 14% of the first
    200 steps, but only 3% of per-stage norms exceeded 1, so here the per-stage-clipped weights
    were almost the pre-clip ones (mean |w - 0.5| 0.237 vs 0.239) and far from uniform: the
    flattening only bites where per-stage norms exceed the clip (larger or less stable models).
    The same run shows the per-stage norm is dominated by the embedding (stage 0) and LM-head
    (stage S-1) gradients, so stages 1 and S-2 are rebuilt mostly from the edge neighbour
    (w ~ 0.9 / 0.1); right after the rebuild that was worse than a plain average for stage 1
    (val 2.304 vs 2.277 at step 200) and better for stage S-2 (2.251 vs 2.269).

    Non-finite or all-zero norms (a step that diverged, or no step yet) fall back to the plain
    average rather than to a NaN state.

    Args:
        omega_prev: Gradient norm of the previous stage's last step (before clipping).
        omega_next: Gradient norm of the next stage's last step (before clipping).

    Returns:
        ``(omega_prev, omega_next) / (omega_prev + omega_next)``, or ``(0.5, 0.5)`` on a negative,
        non-finite or all-zero norm.
    """
    a, b = float(omega_prev), float(omega_next)
    if not (math.isfinite(a) and math.isfinite(b)) or a < 0 or b < 0 or a + b <= 0:
        return 0.5, 0.5
    return a / (a + b), b / (a + b)


def checkfree_rebuild(prev_state: Mapping[str, Any], next_state: Mapping[str, Any],
                      w_prev: float, w_next: float) -> dict[str, torch.Tensor]:
    """CheckFree: the lost stage's blocks as the weighted average of its neighbours' blocks.

    ``(w_prev * W_prev + w_next * W_next) / (w_prev + w_next)`` for every block tensor (computed
    in float64, returned in the neighbours' dtype). Stage-specific modules (embedding, final
    norm, LM head) are not touched: a middle stage has none, and the copies CheckFree+ keeps on
    stages 1 and S-2 are restored from their in-sync originals by the caller.

    Args:
        prev_state: State dict (or ``{"model": state dict}``) of stage ``i-1``.
        next_state: The same of stage ``i+1``.
        w_prev: Omega of stage ``i-1`` (see :func:`checkfree_weights` for which norm).
        w_next: Omega of stage ``i+1``.

    Returns:
        New tensors for the block keys only. Train them with fresh optimizer state and
        ``lr x CHECKFREE_LR_SCALE``.

    Raises:
        RecoveryError: if the neighbours' blocks differ in keys or shapes (unequal chunk sizes).
    """
    prev, nxt = _model(prev_state), _model(next_state)
    kp, kn = block_keys(prev), block_keys(nxt)
    if kp != kn or not kp:
        raise RecoveryError(
            f"CheckFree needs neighbours with identical blocks: {len(kp)} vs {len(kn)} block tensors "
            "(give every stage the same number of layers: model.layers divisible by the chunks)"
        )
    a, b = checkfree_weights(w_prev, w_next)
    out: dict[str, torch.Tensor] = {}
    for k in kp:
        x, y = prev[k], nxt[k]
        if x.shape != y.shape:
            raise RecoveryError(f"CheckFree: block key {k} has shapes {tuple(x.shape)} and {tuple(y.shape)}")
        out[k] = (a * x.detach().double() + b * y.detach().double()).to(x.dtype)
    return out


def complete_state(template: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Check that ``state`` gives every key of ``template`` (a stage's state dict) with its shape,
    and nothing else, so no rebuilt stage ever trains with a left-over initial tensor.

    Args:
        template: The stage's state dict (or ``{"model": state dict}``).
        state: The rebuilt state dict (or ``{"model": state dict}``).

    Raises:
        RecoveryError: naming the missing or unexpected keys, or a key whose shape differs.
    """
    want = _model(template)
    have = _model(state)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise RecoveryError(f"rebuilt stage state is incomplete: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in want.items():
        if tuple(v.shape) != tuple(have[k].shape):
            raise RecoveryError(f"rebuilt stage key {k}: shape {tuple(have[k].shape)}, expected {tuple(v.shape)}")
