"""The block spans an elastic reshape moves (spotpipe.runtime.worker.reshape.span_state): the
weights, AdamW moments and step counts of blocks, with the embedding and the head where they
belong, land in a stage of another cut unchanged, and a whole model moved span by span from 4
stages into 3 is the same model."""

from __future__ import annotations

import pytest
import torch

from spotpipe.config import JobConfig, apply_overrides
from spotpipe.model.partition import partition_layers
from spotpipe.model.stages import build_stage
from spotpipe.runtime.state.pick import build_chunk_optimizer
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.ft.elastic import overlap
from spotpipe.runtime.worker.reshape import span_state

SETS = ["model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=4"]


def stage(cfg: JobConfig, index: int, stages: int, trained: bool) -> StageState:
    chunk = build_stage(cfg.model, cfg.train.seed, index, stages)
    state = StageState({index: chunk}, build_chunk_optimizer({index: chunk}, cfg.train))
    if trained:  # moments and step counts that a fresh stage lacks
        for k in range(index + 2):
            for p in chunk.parameters():
                p.grad = torch.randn_like(p)
            state.step(1e-2)
    return state


def named(state: StageState) -> dict[str, torch.Tensor]:
    (chunk,) = state.chunks.values()
    lo = chunk.layer_range[0]
    out = {}
    for name, t in chunk.state_dict().items():
        if name.startswith("blocks."):
            i, rest = name.split(".", 2)[1:]
            name = f"block{lo + int(i)}.{rest}"
        out[name] = t
    return out


def test_a_model_moved_span_by_span_from_four_stages_into_three_is_the_same_model() -> None:
    cfg = apply_overrides(JobConfig(), SETS).validate()
    L = cfg.model.layers
    old = [stage(cfg, s, 4, trained=True) for s in range(4)]
    new = [stage(cfg, s, 3, trained=False) for s in range(3)]
    for j, target in enumerate(new):
        for k, source in enumerate(old):
            part = overlap(partition_layers(L, 3)[j], partition_layers(L, 4)[k])
            if part is not None:
                span_state(target, part, L).load_flat(span_state(source, part, L).flat())
    before = {k: v for s in old for k, v in named(s).items()}
    after = {k: v for s in new for k, v in named(s).items()}
    assert before.keys() == after.keys() and {"embed.weight", "head.weight", "norm.weight"} <= after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    moments = lambda states: [m for s in states for (key, c) in s.chunks.items() for p in c.parameters()
                              for m in [s.optimizer.moments(key, p)]]
    got, want = moments(new), moments(old)
    assert len(got) == len(want) and all(m is not None for m in got)
    for a, b in zip(got, want):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_a_span_view_refuses_blocks_its_stage_does_not_hold() -> None:
    cfg = apply_overrides(JobConfig(), SETS).validate()
    s1 = stage(cfg, 1, 4, trained=False)  # blocks 2..3
    with pytest.raises(ValueError, match=r"not all in chunk 1's blocks \(2, 4\)"):
        span_state(s1, (1, 3), cfg.model.layers)
    assert span_state(s1, (2, 3), cfg.model.layers).numel() < span_state(s1, (2, 4), cfg.model.layers).numel()
