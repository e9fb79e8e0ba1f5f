"""The optimizer of a worker's chunks, behind one small interface.

:class:`~spotpipe.runtime.state.stage_state.StageState` never touches an optimizer's internals: it
steps it, reads and writes the moments of one parameter, clears a chunk's state and saves or loads
it, through :class:`StageOptimizer`. :class:`ChunkAdamW` is the one implementation today (one
``torch.optim.AdamW`` per chunk, built by :func:`spotpipe.runtime.state.optim.build_stage_optimizer`);
:class:`~spotpipe.runtime.state.offload.OffloadedAdamW` keeps the moments in host memory and brings
them to the device for the update (ChronosPipe's offload; Lin et al. 2025), and
:class:`~spotpipe.runtime.state.master.MasterWeightOptimizer` runs either over float32 master
weights of a 16-bit model; :func:`spotpipe.runtime.state.pick.build_chunk_optimizer` picks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from spotpipe.config import TrainConfig
from spotpipe.runtime.state.optim import build_stage_optimizer, set_lr


class Moments(Protocol):
    """AdamW's per-parameter state as :class:`StageOptimizer` hands it out."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: float


class StageOptimizer(Protocol):
    """What a stage's state needs from its optimizer (all chunks of one worker, or of a mirror)."""

    def step(self, lr: float, lr_scale: Mapping[int, float]) -> None:
        """One update of every chunk at base learning rate ``lr`` times the chunk's ``lr_scale``
        (for the groups that are scaled; the embedding / norm / head keep ``lr``).

        Args:
            lr: Base learning rate of this step.
            lr_scale: Global chunk index -> its factor.
        """
        ...

    def moments(self, chunk: int, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(exp_avg, exp_avg_sq, step)`` of ``param`` of ``chunk``, or None before its first update.

        Args:
            chunk: Global chunk index.
            param: A parameter of that chunk.

        Returns:
            The two moments (shaped as ``param``) and AdamW's step count, or None.
        """
        ...

    def set_moments(self, chunk: int, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float) -> None:
        """Install the moments of ``param`` (same shape; moved to the optimizer's device).

        Args:
            chunk: Global chunk index.
            param: A parameter of that chunk.
            exp_avg: First moment, shaped as ``param``.
            exp_avg_sq: Second moment, shaped as ``param``.
            step: AdamW's step count for bias correction.
        """
        ...

    def clear(self, chunk: int, param: torch.Tensor | None = None) -> None:
        """Forget the state of ``param`` (or of every parameter of ``chunk``): fresh AdamW.

        Args:
            chunk: Global chunk index.
            param: One parameter of that chunk, or ``None`` for all of them.
        """
        ...

    def state_dict(self) -> dict[int, Any]:
        """Chunk -> a picklable state (for checkpoints)."""
        ...

    def load_state_dict(self, state: Mapping[int, Any]) -> None:
        """Inverse of :meth:`state_dict`.

        Args:
            state: Chunk -> state, as :meth:`state_dict` returned it.
        """
        ...

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` right after each update (fault injection in the optimizer phase).

        Args:
            hook: Called with no arguments.
        """
        ...

    def master(self, chunk: int, param: torch.Tensor) -> torch.Tensor | None:
        """The float32 master copy of ``param`` that the update applies to, or None when the
        parameter is its own master (float32 models; see :mod:`spotpipe.runtime.state.master`).

        Args:
            chunk: Global chunk index.
            param: A parameter of that chunk.

        Returns:
            The float32 master tensor, or None.
        """
        ...


class ChunkAdamW:
    """One ``torch.optim.AdamW`` per chunk (decoupled weight decay on matrices; the embedding, final
    norm and head in unscaled groups, see :func:`~spotpipe.runtime.state.optim.build_optimizer`).

    Args:
        chunks: Chunk index -> module.
        train: The ``[train]`` section (lr, betas, weight decay).
    """

    def __init__(self, chunks: Mapping[int, torch.nn.Module], train: TrainConfig) -> None:
        self.by_chunk: dict[int, torch.optim.AdamW] = {s: build_stage_optimizer(chunks[s], train) for s in sorted(chunks)}

    def step(self, lr: float, lr_scale: Mapping[int, float]) -> None:
        for s in sorted(self.by_chunk):
            set_lr(self.by_chunk[s], lr, lr_scale[s])
            self.by_chunk[s].step()

    def moments(self, chunk: int, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        st = self.by_chunk[chunk].state.get(param) or {}
        a, b = st.get("exp_avg"), st.get("exp_avg_sq")
        if a is None or b is None:
            return None
        step = st.get("step", 0.0)
        return a, b, float(step.item() if isinstance(step, torch.Tensor) else step)

    def set_moments(self, chunk: int, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float) -> None:
        self.by_chunk[chunk].state[param] = {
            "step": torch.tensor(step, dtype=torch.float32, device=param.device),  # fused AdamW: on the device
            "exp_avg": exp_avg.to(param.device, param.dtype).clone(),
            "exp_avg_sq": exp_avg_sq.to(param.device, param.dtype).clone(),
        }

    def clear(self, chunk: int, param: torch.Tensor | None = None) -> None:
        if param is None:
            self.by_chunk[chunk].state.clear()
        else:
            self.by_chunk[chunk].state.pop(param, None)

    def state_dict(self) -> dict[int, Any]:
        return {s: opt.state_dict() for s, opt in self.by_chunk.items()}

    def load_state_dict(self, state: Mapping[int, Any]) -> None:
        for s, opt in self.by_chunk.items():
            opt.load_state_dict(state[s])

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        first = min(self.by_chunk)
        self.by_chunk[first].register_step_post_hook(lambda *_: hook())

    def master(self, chunk: int, param: torch.Tensor) -> torch.Tensor | None:
        return None
