"""Peer mirrors (runtime/mirror.py): the periodic keeper and the replaying mirror, over a real TCPStore."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
import torch

from spotpipe.config import load_config
from spotpipe.model.stages import build_stage
from spotpipe.runtime.worker.mirror import MirrorKeeper, MirrorReplayer, publish_gradient, publish_mirror
from spotpipe.runtime.state.optim import apply_update, build_stage_optimizer
from spotpipe.runtime.state.flat import flatten_rank

CFG = load_config(None, ["model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=4",
                         "train.grad_clip=1.0"])


@pytest.fixture()
def store() -> Any:
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=10), wait_for_workers=False)


def test_mirror_keeper_holds_the_newest_published_state(store: Any) -> None:
    keeper = MirrorKeeper(store, 2, 0, poll_s=0.01)
    keeper.fetch()
    assert keeper.step is None
    for step in (4, 5):
        publish_mirror(store, 2, 0, step, torch.full((10,), float(step)))
    keeper.settle(1.0)  # fetches at once (no wait on the background thread)
    assert keeper.step == 5 and torch.equal(keeper.tensor(), torch.full((10,), 5.0)) and keeper.nbytes == 40
    # A rollback to an earlier checkpoint voids the held state and anything published before it.
    keeper.reset(min_generation=2)
    keeper.fetch()
    assert keeper.step is None and keeper.nbytes == 0
    publish_mirror(store, 2, 0, 3, torch.full((10,), 3.0), generation=2)
    keeper.fetch()
    assert keeper.step == 3 and torch.equal(keeper.tensor(), torch.full((10,), 3.0))


@pytest.mark.timeout(120)
def test_mirror_keeper_thread_picks_up_the_newest_state(store: Any) -> None:
    """The background thread, not a call: wait for the event (the newest step held), with a
    generous deadline, never a fixed sleep."""
    keeper = MirrorKeeper(store, 1, 0, poll_s=0.01)
    keeper.start()
    try:
        for step in (7, 8):
            publish_mirror(store, 1, 0, step, torch.full((4,), float(step)))
        deadline = time.monotonic() + 60
        while keeper.step != 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert keeper.step == 8 and torch.equal(keeper.tensor(), torch.full((4,), 8.0))
    finally:
        keeper.halt()
    keeper.join(60)
    assert not keeper.is_alive()


def _owner(stage: int) -> tuple[dict[int, Any], dict[int, Any], dict[int, float], torch.Tensor]:
    chunks = {stage: build_stage(CFG.model, CFG.train.seed, stage, 4)}
    opts = {stage: build_stage_optimizer(chunks[stage], CFG.train)}
    params = list(chunks[stage].parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    off = 0
    for p in params:
        p.grad = flat[off : off + p.numel()].view_as(p)
        off += p.numel()
    return chunks, opts, {stage: 1.25}, flat  # lr factors travel as float32 (recover.install_checkfree rounds)


@pytest.mark.timeout(180)
def test_replaying_mirror_equals_its_owner_bit_for_bit(store: Any) -> None:
    """The holder replays the owner's published gradients with the owner's update rule: after
    every committed step its copy (weights, moments, step, lr factor) is the owner's exactly;
    steps that were never committed are never applied."""
    chunks, opts, scale, flat = _owner(2)
    chunks[2].blocks[0].attn_norm.weight.data.mul_(1.5)  # the owner's state is not a fresh build
    holder_chunks = {2: build_stage(CFG.model, 7, 2, 4)}
    mirror = MirrorReplayer(store, 2, 0, holder_chunks, {2: build_stage_optimizer(holder_chunks[2], CFG.train)}, timeout_s=10)
    mirror.start()
    try:
        publish_mirror(store, 2, 0, 9, flatten_rank(chunks, opts, scale), generation=1)  # state after step 9
        gen = torch.Generator().manual_seed(0)
        for step in range(10, 14):
            flat.copy_(torch.randn(flat.shape, generator=gen) * (3.0 if step == 11 else 0.1))
            coef, lr = (0.25 if step == 11 else 1.0), 1e-3 * step
            publish_gradient(store, 1, 2, 0, step, flat, coef, lr)
            apply_update(flat, opts, scale, coef, lr)
            mirror.committed(1, step)
        publish_gradient(store, 1, 2, 0, 14, torch.ones_like(flat), 1.0, 1.0)  # published, never committed
        mirror.settle(120.0)  # returns as soon as every committed step is replayed
        assert mirror.error == "" and mirror.step == 13
        assert torch.equal(mirror.tensor(), flatten_rank(chunks, opts, scale))
        assert mirror.nbytes == 3 * 4 * flat.numel()
    finally:
        mirror.halt()


@pytest.mark.timeout(180)
def test_replaying_mirror_refuses_a_gap(store: Any) -> None:
    """A copy that would skip a step is marked unusable (step None), never silently wrong."""
    chunks, opts, scale, flat = _owner(1)
    holder_chunks = {1: build_stage(CFG.model, 7, 1, 4)}
    mirror = MirrorReplayer(store, 1, 0, holder_chunks, {1: build_stage_optimizer(holder_chunks[1], CFG.train)}, timeout_s=5)
    mirror.start()
    try:
        publish_mirror(store, 1, 0, 4, flatten_rank(chunks, opts, scale), generation=3)
        publish_gradient(store, 3, 1, 0, 6, flat, 1.0, 1e-3)
        mirror.committed(3, 6)
        mirror.settle(120.0)  # returns as soon as the replayer is idle
        assert mirror.step is None and "cannot replay step 6" in mirror.error
    finally:
        mirror.halt()
