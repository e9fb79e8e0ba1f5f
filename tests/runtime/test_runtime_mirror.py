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
from spotpipe.runtime.state.optimizer import ChunkAdamW
from spotpipe.runtime.state.stage_state import StageState

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


def _state(stage: int, seed: int, scale: float = 1.0) -> StageState:
    chunks = {stage: build_stage(CFG.model, seed, stage, 4)}
    return StageState(chunks, ChunkAdamW(chunks, CFG.train), {stage: scale})


def _owner(stage: int) -> tuple[StageState, torch.Tensor]:
    state = _state(stage, CFG.train.seed, 1.25)  # lr factors travel as float32 (install_checkfree rounds)
    flat, _ = state.attach_flat_gradient()
    return state, flat


@pytest.mark.timeout(180)
def test_replaying_mirror_equals_its_owner_bit_for_bit(store: Any) -> None:
    """The holder replays the owner's published gradients with the owner's update rule: after
    every committed step its copy (weights, moments, step, lr factor) is the owner's exactly;
    steps that were never committed are never applied."""
    owner, flat = _owner(2)
    owner.chunks[2].blocks[0].attn_norm.weight.data.mul_(1.5)  # the owner's state is not a fresh build
    mirror = MirrorReplayer(store, 2, 0, _state(2, 7), timeout_s=10)
    mirror.start()
    try:
        publish_mirror(store, 2, 0, 9, owner.flat(), generation=1)  # state after step 9
        gen = torch.Generator().manual_seed(0)
        for step in range(10, 14):
            flat.copy_(torch.randn(flat.shape, generator=gen) * (3.0 if step == 11 else 0.1))
            coef, lr = (0.25 if step == 11 else 1.0), 1e-3 * step
            publish_gradient(store, 1, 2, 0, step, flat, coef, lr)
            owner.apply_update(flat, coef, lr)
            mirror.committed(1, step)
        publish_gradient(store, 1, 2, 0, 14, torch.ones_like(flat), 1.0, 1.0)  # published, never committed
        mirror.settle(120.0)  # returns as soon as every committed step is replayed
        assert mirror.error == "" and mirror.step == 13
        assert torch.equal(mirror.tensor(), owner.flat())
        assert mirror.nbytes == 3 * 4 * flat.numel()
    finally:
        mirror.halt()


@pytest.mark.timeout(180)
def test_replaying_mirror_refuses_a_gap(store: Any) -> None:
    """A copy that would skip a step is marked unusable (step None), never silently wrong."""
    owner, flat = _owner(1)
    mirror = MirrorReplayer(store, 1, 0, _state(1, 7), timeout_s=5)
    mirror.start()
    try:
        publish_mirror(store, 1, 0, 4, owner.flat(), generation=3)
        publish_gradient(store, 3, 1, 0, 6, flat, 1.0, 1e-3)
        mirror.committed(3, 6)
        mirror.settle(120.0)  # returns as soon as the replayer is idle
        assert mirror.step is None and "cannot replay step 6" in mirror.error
    finally:
        mirror.halt()


@pytest.mark.timeout(60)
def test_replaying_mirror_skips_a_step_its_owner_skipped(store: Any) -> None:
    """Issue 10, section 6: a non-finite step skipped with train.nonfinite = "skip" is published
    with apply=False; the holder counts it without touching its copy, so it still equals the owner."""
    owner, flat = _owner(2)
    mirror = MirrorReplayer(store, 2, 0, _state(2, 7), timeout_s=10)
    mirror.start()
    try:
        publish_mirror(store, 2, 0, 4, owner.flat(), generation=1)
        flat.fill_(0.1)
        publish_gradient(store, 1, 2, 0, 5, flat, 1.0, 1e-3)
        owner.apply_update(flat, 1.0, 1e-3)
        mirror.committed(1, 5)
        publish_gradient(store, 1, 2, 0, 6, torch.full_like(flat, float("nan")), 1.0, 1e-3, apply=False)
        mirror.committed(1, 6)  # the owner skipped step 6: no update
        flat.fill_(-0.2)
        publish_gradient(store, 1, 2, 0, 7, flat, 1.0, 1e-3)
        owner.apply_update(flat, 1.0, 1e-3)
        mirror.committed(1, 7)
        mirror.settle(10.0)
        assert mirror.error == "" and mirror.step == 7
        copy = mirror.tensor()
        assert torch.isfinite(copy).all() and torch.equal(copy, owner.flat())
    finally:
        mirror.halt()


@pytest.mark.parametrize("sets", [[], ["pipeline.stages=2"], ["ft.strategy=checkfree+"]])
def test_mirror_size_estimate_covers_the_real_flat_state(sets: list[str]) -> None:
    """The store-limit check reads mirror_state_bytes: it must not underestimate the flat state
    a rank really publishes (weights + 2 moments + tail), nor overshoot it by more than 64 KiB."""
    from spotpipe.ft.policy import swap_schedule_on
    from spotpipe.ft.strategies.mirror import mirror_state_bytes

    cfg = load_config(None, sets)
    swap = swap_schedule_on(cfg.ft)
    real = 0
    for rank in range(cfg.pipeline.stages):
        chunks = {rank: build_stage(cfg.model, 0, rank, cfg.pipeline.stages, edge_copies=swap)}
        real = max(real, 4 * StageState(chunks, ChunkAdamW(chunks, cfg.train)).numel())
    est = mirror_state_bytes(cfg)
    assert real <= est <= real + 64 * 2**10


def test_stages_too_big_for_the_store_keep_no_mirror() -> None:
    """Mirrors still travel through the controller's store (8 MiB a value): ft.strategy = mirror is
    refused up front with one line, auto runs without mirrors and says so."""
    from spotpipe.errors import SpotpipeError
    from spotpipe.runtime.control.job import check_mirror_size
    from spotpipe.runtime.worker.mirror_link import mirror_mode

    small = load_config(None, [])
    assert check_mirror_size(small) == "" and mirror_mode(small) == "replay"
    big = load_config(None, ["pipeline.stages=2"])
    assert mirror_mode(big) == "" and "no mirrors" in check_mirror_size(big)
    with pytest.raises(SpotpipeError, match="ft.strategy = mirror cannot run this model: .* 8 MiB"):
        check_mirror_size(load_config(None, ["pipeline.stages=2", "ft.strategy=mirror"]))
