"""float32 master weights of a 16-bit model: updates too small for bf16 still train, and the flat
state (checkpoints, mirrors, recovery) carries the masters so a rebuilt stage continues exactly."""

from __future__ import annotations

import pytest
import torch

from spotpipe.config import ModelConfig, TrainConfig
from spotpipe.model.stages import build_stage
from spotpipe.runtime.pipeline.meter import moment_tensors
from spotpipe.runtime.state.master import MasterWeightOptimizer
from spotpipe.runtime.state.optimizer import ChunkAdamW
from spotpipe.runtime.state.pick import build_chunk_optimizer
from spotpipe.runtime.state.stage_state import StageState

pytestmark = pytest.mark.timeout(60)

MODEL = ModelConfig(layers=4, d_model=32, heads=2, context=16, dtype="bfloat16")


def _state(master: bool = True) -> StageState:
    chunks = {1: build_stage(MODEL, seed=3, chunk=1, num_chunks=4)}
    opt = build_chunk_optimizer(chunks, TrainConfig(weight_decay=0.0)) if master else ChunkAdamW(chunks, TrainConfig(weight_decay=0.0))
    return StageState(chunks, opt)


def _train(state: StageState, steps: int, lr: float, seed: int = 0) -> None:
    flat, params = state.attach_flat_gradient()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        flat.copy_(torch.randn(flat.numel(), generator=gen).to(flat.dtype))
        state.apply_update(flat, 1.0, lr)


def test_a_16_bit_model_gets_float32_masters_and_a_float32_one_does_not() -> None:
    state = _state()
    assert isinstance(state.optimizer, MasterWeightOptimizer)
    p = next(state.chunks[1].parameters())
    m = state.optimizer.master(1, p)
    assert p.dtype == torch.bfloat16 and m is not None and m.dtype == torch.float32
    assert torch.equal(m.to(torch.bfloat16), p)
    fp32 = {0: build_stage(ModelConfig(layers=4, d_model=32, heads=2, context=16), seed=3, chunk=0, num_chunks=4)}
    assert isinstance(build_chunk_optimizer(fp32, TrainConfig()), ChunkAdamW)


def _moved(state: StageState, before: list[torch.Tensor], masters: bool = False) -> float:
    """Fraction of the chunk's weight elements that differ from ``before`` (bf16 weights, or
    their float32 masters)."""
    now = [state.optimizer.master(1, p) if masters else p for p in state.chunks[1].parameters()]
    return sum(int((a != b.to(a.dtype)).sum()) for a, b in zip(now, before)) / sum(b.numel() for b in before)


def test_updates_below_bf16_resolution_accumulate_in_the_masters() -> None:
    # AdamW's first steps move every weight by about lr = 1e-5: less than half a bf16 ulp (2**-9
    # relative) of any weight above about 0.005, so applied to bf16 weights most updates round away.
    plain, mixed = _state(master=False), _state(master=True)
    before = [p.detach().clone() for p in mixed.chunks[1].parameters()]
    _train(plain, 1, 1e-5)
    _train(mixed, 1, 1e-5)
    assert _moved(plain, before) < 0.5
    assert _moved(mixed, before, masters=True) == 1.0  # every master moved
    # more small steps: pure bf16 stays stuck, the masters carry them into the bf16 weights
    _train(plain, 40, 1e-5, seed=1)
    _train(mixed, 40, 1e-5, seed=1)
    assert _moved(mixed, before) > _moved(plain, before) + 0.3
    for p in mixed.chunks[1].parameters():
        m = mixed.optimizer.master(1, p)
        assert m is not None and torch.equal(m.to(torch.bfloat16), p)


def test_the_flat_state_carries_the_masters_and_a_rebuilt_copy_continues_bit_for_bit() -> None:
    owner, copy = _state(), _state()
    _train(owner, 5, 1e-3)
    flat = owner.flat()
    copy.load_flat(flat)
    assert torch.equal(copy.flat(), flat)
    # the masters differ from their bf16 roundings, and the copy holds the masters, not the roundings
    p = next(owner.chunks[1].parameters())
    m_owner = owner.optimizer.master(1, p)
    m_copy = copy.optimizer.master(1, next(copy.chunks[1].parameters()))
    assert m_owner is not None and m_copy is not None
    assert not torch.equal(m_owner, p.float()) and torch.equal(m_copy, m_owner)
    _train(owner, 3, 1e-3, seed=7)
    _train(copy, 3, 1e-3, seed=7)
    assert torch.equal(copy.flat(), owner.flat())
    for a, b in zip(owner.chunks[1].parameters(), copy.chunks[1].parameters()):
        assert torch.equal(a, b)


def test_checkfree_rebuild_and_memory_accounting_see_the_masters() -> None:
    state, prev, nxt = _state(), _state(), _state()
    _train(prev, 2, 1e-3, seed=1)
    _train(nxt, 2, 1e-3, seed=2)
    state.install_checkfree(prev.blocks_flat(1.0), nxt.blocks_flat(1.0), 1.1)
    for p in state.chunks[1].blocks.parameters():
        m = state.optimizer.master(1, p)
        assert m is not None and torch.equal(m.to(torch.bfloat16), p)
    # the accounting counts moments and masters: 4 + 4 + 4 bytes per parameter after one update
    _train(state, 1, 1e-3)
    n = sum(p.numel() for p in state.chunks[1].parameters())
    assert sum(t.numel() * t.element_size() for t in moment_tensors(state.optimizer, state.chunks)) == 12 * n
