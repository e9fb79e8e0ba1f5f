"""Optimizer state in host memory: the same updates as ChunkAdamW, and the accounting of what left the device."""

from __future__ import annotations

import pytest
import torch

from spotpipe.config import TrainConfig
from spotpipe.runtime.pipeline.meter import moment_tensors
from spotpipe.runtime.state.offload import OffloadedAdamW
from spotpipe.runtime.state.optimizer import ChunkAdamW
from spotpipe.runtime.state.pick import build_chunk_optimizer

pytestmark = pytest.mark.timeout(30)


def _chunks(seed: int) -> dict[int, torch.nn.Module]:
    torch.manual_seed(seed)
    return {0: torch.nn.Linear(8, 8), 3: torch.nn.Linear(8, 4)}


def _grads(chunks: dict[int, torch.nn.Module], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for c in chunks.values():
        for p in c.parameters():
            p.grad = torch.randn(p.shape, generator=gen)


def test_updates_equal_chunk_adamw_and_moments_leave_the_device() -> None:
    a, b = _chunks(0), _chunks(0)
    plain, away = ChunkAdamW(a, TrainConfig()), OffloadedAdamW(b, TrainConfig(), offloaded=[3])
    for step in range(3):
        _grads(a, step)
        _grads(b, step)
        plain.step(1e-2, {0: 1.0, 3: 1.1})
        away.step(1e-2, {0: 1.0, 3: 1.1})
    for s in (0, 3):
        for p, q in zip(a[s].parameters(), b[s].parameters()):
            assert torch.equal(p, q)
            pm, qm = plain.moments(s, p), away.moments(s, q)
            assert pm is not None and qm is not None
            assert torch.equal(pm[0], qm[0]) and torch.equal(pm[1], qm[1]) and pm[2] == qm[2] == 3.0
    assert away.device_resident(0) and not away.device_resident(3)
    # the accounting counts only chunk 0's moments on the device; chunk 3's came for its update
    on_device = moment_tensors(away, b)
    assert sum(t.numel() for t in on_device) == 2 * (8 * 8 + 8)
    assert away.streamed_by_chunk == {3: 2 * (8 * 4 + 4) * 4} and away.streamed_peak == 2 * 36 * 4


def test_builder_picks_it() -> None:
    chunks = _chunks(1)
    assert isinstance(build_chunk_optimizer(chunks, TrainConfig(), offload=True), OffloadedAdamW)
    assert isinstance(build_chunk_optimizer(chunks, TrainConfig()), ChunkAdamW)
