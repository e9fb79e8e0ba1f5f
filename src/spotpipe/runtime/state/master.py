"""float32 master weights for a model that computes in bfloat16 or float16.

With ``model.dtype = "bfloat16"`` the chunks' weights, activations and gradients are 16-bit, which
halves the bytes of compute, memory and every send; but an AdamW update ``lr * m / sqrt(v)`` is
often smaller than half a unit in the last place of a bf16 weight (8 bits of mantissa: about
0.4% of the weight), so applied to the bf16 weight directly most updates round away and training
stalls. Mixed-precision training keeps a float32 *master* copy of every weight and the AdamW
moments in float32, applies the update there and rounds the result into the 16-bit weight the next
forward uses (Micikevicius et al., "Mixed Precision Training", ICLR 2018, section 3.1; the same
layout as Megatron-LM's ``Float16OptimizerWithFloat16Params`` and DeepSpeed's bf16 optimizer).

:class:`MasterWeightOptimizer` is a :class:`~spotpipe.runtime.state.optimizer.StageOptimizer` by
composition: it holds float32 copies of the chunks (:attr:`masters`) and an inner optimizer built
over them (:class:`~spotpipe.runtime.state.optimizer.ChunkAdamW`, or the offloaded one), and maps
every question about a 16-bit parameter to its master. :class:`~spotpipe.runtime.state.stage_state.
StageState` reads and writes weights through :meth:`master`, so checkpoints, mirrors and recovery
transfers carry the float32 masters and a rebuilt stage continues bit for bit.

Per parameter a worker then holds 2 (weight) + 2 (gradient) + 4 (master) + 8 (moments) = 16 bytes,
as many as in float32 (4 + 4 + 8): the saving is in activations and in the bytes sent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch

from spotpipe.runtime.state.optimizer import StageOptimizer


class MasterWeightOptimizer:
    """An optimizer over float32 master copies of 16-bit chunks.

    Args:
        chunks: Chunk index -> module whose parameters are bfloat16 or float16 (on any device).
        build_inner: Builds the optimizer of the master chunks (same shapes, float32, same device).

    Attributes:
        masters: Chunk index -> the float32 copy of that chunk (its parameters are the masters).
    """

    def __init__(self, chunks: Mapping[int, torch.nn.Module],
                 build_inner: Callable[[Mapping[int, torch.nn.Module]], StageOptimizer]) -> None:
        self.masters: dict[int, torch.nn.Module] = {}
        self._pairs: dict[int, list[tuple[torch.nn.Parameter, torch.nn.Parameter]]] = {}
        self._master_of: dict[int, torch.nn.Parameter] = {}
        for s in sorted(chunks):
            master = copy.deepcopy(chunks[s]).float()
            for q in master.parameters():
                q.grad = None
            pairs = list(zip(chunks[s].parameters(), master.parameters(), strict=True))
            self.masters[s] = master
            self._pairs[s] = pairs
            self._master_of.update((id(p), q) for p, q in pairs)
        self.inner = build_inner(self.masters)
        self._hooks: list[Callable[[], None]] = []

    def _to_master(self, param: torch.Tensor) -> torch.nn.Parameter:
        """The master of ``param`` (``param`` itself when it is a master)."""
        return self._master_of.get(id(param), param)  # type: ignore[return-value]

    # -- the extra question StageState asks -----------------------------------------------------

    def master(self, chunk: int, param: torch.Tensor) -> torch.Tensor | None:
        """The float32 master of ``param`` of ``chunk`` (None for a tensor that has none: a buffer)."""
        return self._master_of.get(id(param))

    def device_resident(self, chunk: int) -> bool:
        """Whether ``chunk``'s moments stay on the compute device between updates (the inner
        optimizer's answer; the masters always do).

        Args:
            chunk: Global chunk index.

        Returns:
            True when the moments stay on the device (also when the inner optimizer cannot say).
        """
        resident = getattr(self.inner, "device_resident", None)
        return True if resident is None else bool(resident(chunk))

    # -- StageOptimizer --------------------------------------------------------------------------

    def step(self, lr: float, lr_scale: Mapping[int, float]) -> None:
        """Bring the 16-bit gradients to the masters (in float32), update the masters with the inner
        optimizer, and round the new masters into the 16-bit weights."""
        for pairs in self._pairs.values():
            for p, q in pairs:
                if p.grad is None:
                    q.grad = None
                elif q.grad is None:
                    q.grad = p.grad.float()
                else:
                    q.grad.copy_(p.grad)
        self.inner.step(lr, lr_scale)
        with torch.no_grad():
            for pairs in self._pairs.values():
                for p, q in pairs:
                    p.copy_(q)
        for hook in self._hooks:
            hook()

    def moments(self, chunk: int, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return self.inner.moments(chunk, self._to_master(param))

    def set_moments(self, chunk: int, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float) -> None:
        self.inner.set_moments(chunk, self._to_master(param), exp_avg, exp_avg_sq, step)

    def clear(self, chunk: int, param: torch.Tensor | None = None) -> None:
        self.inner.clear(chunk, None if param is None else self._to_master(param))

    def state_dict(self) -> dict[int, Any]:
        inner = self.inner.state_dict()
        return {s: {"optimizer": inner[s], "master": self.masters[s].state_dict()} for s in self.masters}

    def load_state_dict(self, state: Mapping[int, Any]) -> None:
        self.inner.load_state_dict({s: state[s]["optimizer"] for s in self.masters})
        with torch.no_grad():
            for s, master in self.masters.items():
                master.load_state_dict(state[s]["master"])
                for p, q in self._pairs[s]:
                    p.copy_(q)

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after each update, once the 16-bit weights hold the new values."""
        self._hooks.append(hook)
