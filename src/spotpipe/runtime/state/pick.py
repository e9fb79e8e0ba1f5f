"""The one place that picks the optimizer class of a worker's (or a mirror's) chunks.

:class:`~spotpipe.runtime.state.optimizer.ChunkAdamW` by default; the offloading one with
``pipeline.offload = "optimizer"``; either over float32 master weights for a 16-bit model. A new
optimizer is one class with the :class:`~spotpipe.runtime.state.optimizer.StageOptimizer` methods
and one branch here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from spotpipe.config import TrainConfig
from spotpipe.runtime.state.master import MasterWeightOptimizer
from spotpipe.runtime.state.offload import OffloadedAdamW
from spotpipe.runtime.state.optimizer import ChunkAdamW, StageOptimizer


def build_chunk_optimizer(chunks: Mapping[int, torch.nn.Module], train: TrainConfig, offload: bool = False) -> StageOptimizer:
    """The optimizer of a worker's (or a mirror's) chunks: the one place that picks its class.

    Args:
        chunks: Chunk index -> module.
        train: The ``[train]`` section.
        offload: Keep the moments in host memory between updates (``pipeline.offload =
            "optimizer"``; :class:`~spotpipe.runtime.state.offload.OffloadedAdamW`).

    Returns:
        A :class:`StageOptimizer`: :class:`ChunkAdamW`, or OffloadedAdamW with ``offload``; for
        chunks whose parameters are not float32 (``model.dtype = "bfloat16"`` or ``"float16"``),
        that optimizer over float32 master copies
        (:class:`~spotpipe.runtime.state.master.MasterWeightOptimizer`; Micikevicius et al. 2018).
    """

    def build(over: Mapping[int, torch.nn.Module]) -> StageOptimizer:
        if offload:
            return OffloadedAdamW(over, train)
        return ChunkAdamW(over, train)

    dtypes = {p.dtype for c in chunks.values() for p in c.parameters()}
    if dtypes and dtypes != {torch.float32}:
        return MasterWeightOptimizer(chunks, build)
    return build(chunks)
