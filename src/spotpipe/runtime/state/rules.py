"""Recovery rules over stage state: CheckFree, CheckFree+, replica and mirror copies.

Both the in-process convergence mode (:mod:`spotpipe.runtime.inprocess.convergence`) and the multi-process
runtime call these functions, so a stage is rebuilt by the same code in both. They work on a
portable *named state*::

    {"model": {state-dict key: tensor}, "optim": {parameter name: {"step", "exp_avg", "exp_avg_sq"}}}

keyed by names rather than by the optimizer's parameter positions, so a state can move between
chunks whose parameter lists differ (chunk 0 has an embedding that chunk 1 lacks) and between
processes. :func:`export_state` / :func:`import_state` convert from and to a module and its
AdamW. Blocks are numbered locally inside a chunk (``blocks.0.`` ...), so chunks with the same
number of blocks have identical block keys (see :mod:`spotpipe.model.stages`).

The rules (Blagoev, Ersoy, Chen 2025, "All is Not Lost: LLM Recovery without Checkpoints"):

- CheckFree (section 3.1): a lost middle stage ``i`` becomes
  ``(w_{i-1} W_{i-1} + w_{i+1} W_{i+1}) / (w_{i-1} + w_{i+1})`` over its transformer blocks, with
  fresh optimizer state and the learning rate x1.1 (:data:`~spotpipe.ft.policy.CHECKFREE_LR_SCALE`).
- CheckFree+ (section 3.2): with the swap schedule, a lost edge stage copies its swap partner.
- Replica / mirror (SageMaker HyperPod's checkpointless training, 2025): exact copies.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from spotpipe.errors import SpotpipeError

BLOCK_PREFIX = "blocks."
NamedState = dict[str, Any]


class RecoveryError(SpotpipeError):
    """A recovery rule cannot be applied to the given states (mismatched blocks, missing keys)."""


# ----------------------------------------------------------------------------------------------
# Named state: export, import, size


def _clone(value: Any, device: torch.device | str | None = None) -> Any:
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        return out if device is None else out.to(device)
    return copy.deepcopy(value)


def export_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str | None = "cpu") -> NamedState:
    """Copy ``module``'s state dict and its parameters' optimizer state, keyed by name.

    Args:
        module: A stage (any module).
        optimizer: The optimizer over its parameters; ``None`` exports no optimizer state.
        device: Where the copies go (``"cpu"`` = host memory; ``None`` = where they are).
    """
    model = {k: _clone(v, device) for k, v in module.state_dict().items()}
    optim: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        for name, p in module.named_parameters():
            st = optimizer.state.get(p)
            if st:
                optim[name] = {k: _clone(v, device if k != "step" else None) for k, v in st.items()}
    return {"model": model, "optim": optim}


def import_state(module: nn.Module, optimizer: torch.optim.Optimizer | None, state: NamedState) -> None:
    """Load a named state into ``module`` (all keys required) and ``optimizer``.

    Parameters without an entry in ``state["optim"]`` start with fresh optimizer state.

    Raises:
        RecoveryError: if keys are missing or unexpected, or shapes differ.
    """
    model = state["model"]
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(model)), sorted(set(model) - set(own))
    if missing or extra:
        raise RecoveryError(f"state does not fit the stage: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in model.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise RecoveryError(f"state key {k}: shape {tuple(v.shape)} does not fit {tuple(own[k].shape)}")
    module.load_state_dict(model)
    if optimizer is None:
        return
    for name, p in module.named_parameters():
        optimizer.state.pop(p, None)
        entry = state.get("optim", {}).get(name)
        if entry:
            optimizer.state[p] = {k: (v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) and k != "step"
                                      else _clone(v)) for k, v in entry.items()}


def state_nbytes(state: Mapping[str, Any]) -> int:
    """Bytes of every tensor in a (nested) state."""
    total = 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, Mapping):
            total += state_nbytes(value)
    return total


def clone_state(state: NamedState) -> NamedState:
    """A deep copy of a named state (tensors cloned; an optional ``"meta"`` dict is copied too,
    e.g. the stage's learning-rate scale)."""
    out: NamedState = {"model": {k: _clone(v) for k, v in state["model"].items()},
                       "optim": {n: {k: _clone(v) for k, v in e.items()} for n, e in state.get("optim", {}).items()}}
    if "meta" in state:
        out["meta"] = copy.deepcopy(state["meta"])
    return out


def _model(state: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    return state["model"] if "model" in state and isinstance(state["model"], Mapping) else state


def block_keys(state: Mapping[str, Any]) -> list[str]:
    """The transformer-block keys of a (named or plain) state dict, sorted."""
    return sorted(k for k in _model(state) if k.startswith(BLOCK_PREFIX))


def select(state: NamedState, prefixes: Iterable[str]) -> NamedState:
    """The part of a named state whose keys start with one of ``prefixes`` (e.g. ``"embed."``)."""
    pre = tuple(prefixes)
    return {"model": {k: v for k, v in state["model"].items() if k.startswith(pre)},
            "optim": {k: v for k, v in state.get("optim", {}).items() if k.startswith(pre)}}


def merge(*parts: NamedState) -> NamedState:
    """Union of named states; a key given twice is an error (nothing is silently overwritten)."""
    out: NamedState = {"model": {}, "optim": {}}
    for part in parts:
        for section in ("model", "optim"):
            for k, v in part.get(section, {}).items():
                if k in out[section]:
                    raise RecoveryError(f"key {k} is given by two parts of a rebuilt state")
                out[section][k] = v
    return out


# ----------------------------------------------------------------------------------------------
# The rules


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
        prev_state: State (named or plain) of stage ``i-1``.
        next_state: State of stage ``i+1``.
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


def checkfree_plus_copy(partner_state: NamedState, extras: NamedState | None = None) -> NamedState:
    """CheckFree+: a lost edge stage takes its swap partner's blocks and their optimizer state.

    The partner (stage 1 for stage 0, stage S-2 for stage S-1) ran half of every step's
    microbatches in the lost stage's position, so its blocks already do the lost stage's job.
    The optimizer moments are copied with the blocks (they belong to exactly those weights), and
    the learning rate stays x1.0: the copy is a trained stage, not an average. ``extras`` is the
    in-sync copy of the embedding (stage 0) or the final norm and LM head (stage S-1) that the
    partner keeps; with it the rebuilt stage is complete.
    """
    blocks = select(clone_state(partner_state), (BLOCK_PREFIX,))
    if not blocks["model"]:
        raise RecoveryError("CheckFree+: the partner state has no blocks")
    return blocks if extras is None else merge(blocks, clone_state(extras))


def copy_from_replica(replica_state: NamedState) -> NamedState:
    """Replica recovery: weights and optimizer state of a live data-parallel replica (exact)."""
    return clone_state(replica_state)


def complete_state(template: Mapping[str, Any], state: NamedState) -> NamedState:
    """Check that ``state`` gives every key of ``template`` (a fresh stage's state dict) with its
    shape, and nothing else, so no rebuilt stage ever trains with a left-over initial tensor.

    Raises:
        RecoveryError: naming the missing or unexpected keys.
    """
    want = _model(template)
    have = state["model"]
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise RecoveryError(f"rebuilt stage state is incomplete: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in want.items():
        if tuple(v.shape) != tuple(have[k].shape):
            raise RecoveryError(f"rebuilt stage key {k}: shape {tuple(have[k].shape)}, expected {tuple(v.shape)}")
    return state


# ----------------------------------------------------------------------------------------------
# Mirror


class Mirror:
    """A host-memory copy of the next stage's weights and optimizer state (peer replication).

    The worker of stage ``s - 1`` keeps the mirror of stage ``s`` (the last stage keeps stage
    0's), refreshed every ``ft.mirror_every`` committed steps off the critical path. Recovery
    copies it (:func:`copy_from_mirror`). Its memory cost is :attr:`nbytes` of host RAM per
    worker; its bandwidth cost is :attr:`nbytes` per refresh.

    Attributes:
        stage: The mirrored stage.
        step: Committed steps the mirrored state has seen (``None`` before the first refresh).
        refreshes: How many refreshes so far.
        bytes_sent: Total bytes copied into the mirror.
    """

    def __init__(self, stage: int) -> None:
        self.stage = stage
        self.step: int | None = None
        self.refreshes = 0
        self.bytes_sent = 0
        self._state: NamedState | None = None

    def refresh(self, state: NamedState, step: int) -> None:
        """Replace the copy with ``state`` (copied to host memory) as of committed ``step``."""
        self._state = {"model": {k: _clone(v, "cpu") for k, v in state["model"].items()},
                       "optim": {n: {k: _clone(v, "cpu" if k != "step" else None) for k, v in e.items()}
                                 for n, e in state.get("optim", {}).items()},
                       "meta": copy.deepcopy(state.get("meta", {}))}
        self.step = step
        self.refreshes += 1
        self.bytes_sent += self.nbytes

    def capture(self, module: nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
                meta: Mapping[str, Any] | None = None) -> None:
        """Refresh from a live module and its optimizer (``meta``: e.g. ``{"lr_scale": 1.1}``)."""
        state = export_state(module, optimizer, device="cpu")
        state["meta"] = dict(meta or {})
        self.refresh(state, step)

    @property
    def ready(self) -> bool:
        return self._state is not None

    @property
    def nbytes(self) -> int:
        """Host bytes held (weights + optimizer moments)."""
        return 0 if self._state is None else state_nbytes(self._state)

    def lag(self, step: int) -> int:
        """Steps the mirror is behind committed ``step`` (``step`` - mirrored step)."""
        if self.step is None:
            raise RecoveryError(f"mirror of stage {self.stage} was never filled")
        return step - self.step

    def state(self) -> NamedState:
        """A copy of the mirrored state."""
        if self._state is None:
            raise RecoveryError(f"mirror of stage {self.stage} was never filled")
        return clone_state(self._state)


def copy_from_mirror(mirror: Mirror) -> NamedState:
    """Mirror recovery: the state the previous stage's worker keeps in host memory."""
    return mirror.state()
