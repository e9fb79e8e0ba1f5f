"""Peer mirrors (runtime/worker/mirror.py): owner and holder over a real two-rank gloo group."""

from __future__ import annotations

import datetime
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from spotpipe.config import load_config
from spotpipe.model.stages import build_stage
from spotpipe.runtime.state.optimizer import ChunkAdamW
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.worker.mirror import KIND_GRADIENT, KIND_SKIPPED, KIND_STATE, MirrorHolder, MirrorSender

CFG = load_config(None, ["model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=4",
                         "train.grad_clip=1.0"])


@pytest.fixture()
def store() -> Any:
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=10), wait_for_workers=False)


def _generation(store: Any, number: int) -> tuple[Any, Any]:
    """Generation ``number`` as the holder (rank 0) and the owner (rank 1) see it: a real gloo
    host group of two ranks (both built in this process, so each in its own thread)."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    groups: dict[int, Any] = {}

    def build(rank: int) -> None:
        opts = ProcessGroupGloo._Options()
        opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        opts._timeout = datetime.timedelta(seconds=10)
        groups[rank] = ProcessGroupGloo(PrefixStore(f"gen/{number}/host/", store.clone()), rank, 2, opts)

    threads = [threading.Thread(target=build, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return SimpleNamespace(number=number, host=groups[0]), SimpleNamespace(number=number, host=groups[1])


def _state(stage: int, seed: int, scale: float = 1.0) -> StageState:
    chunks = {stage: build_stage(CFG.model, seed, stage, 4)}
    return StageState(chunks, ChunkAdamW(chunks, CFG.train), {stage: scale})


def _owner(stage: int) -> tuple[StageState, torch.Tensor]:
    state = _state(stage, CFG.train.seed, 1.25)  # lr factors travel as float32 (install_checkfree rounds)
    flat, _ = state.attach_flat_gradient()
    return state, flat


def _holder(stage: int, replay: bool = True) -> MirrorHolder:
    holder = MirrorHolder(stage, 0, _state(stage, 7), replay=replay)
    holder.start()
    return holder


@pytest.mark.timeout(120)
def test_replaying_mirror_equals_its_owner_bit_for_bit(store: Any) -> None:
    """The holder replays the owner's gradients, sent peer to peer, with the owner's update rule:
    after every committed step its copy (weights, moments, step, lr factor) is the owner's exactly;
    a step that was sent but never committed is never applied."""
    owner, flat = _owner(2)
    owner.chunks[2].blocks[0].attn_norm.weight.data.mul_(1.5)  # the owner's state is not a fresh build
    holder_gen, owner_gen = _generation(store, 1)
    mirror = _holder(2)
    try:
        mirror.generation_started(holder_gen, owner_rank=1)
        sender = MirrorSender(owner_gen, holder_rank=0, timeout_s=10)
        sender.send(KIND_STATE, 9, owner.flat())  # the state after step 9
        gen = torch.Generator().manual_seed(0)
        for step in range(10, 14):
            flat.copy_(torch.randn(flat.shape, generator=gen) * (3.0 if step == 11 else 0.1))
            coef, lr = (0.25 if step == 11 else 1.0), 1e-3 * step
            sender.send(KIND_GRADIENT, step, flat, coef, lr)
            owner.apply_update(flat, coef, lr)  # scales flat in place: the sender sent a copy
            mirror.committed(1, step)
        sender.send(KIND_GRADIENT, 14, torch.ones_like(flat), 1.0, 1.0)  # sent, never committed
        assert sender.drain() == ""
        mirror.settle(60.0)  # the generation is over: returns once every committed step is replayed
        assert mirror.error == "" and mirror.step == 13
        assert torch.equal(mirror.tensor(), owner.flat())
        assert mirror.nbytes == 3 * 4 * flat.numel() + 4 * (mirror.state_numel - 3 * flat.numel())
    finally:
        mirror.halt()


@pytest.mark.timeout(120)
def test_a_bf16_gradient_travels_in_bf16_into_reused_buffers_and_replays_exactly(store: Any) -> None:
    """A 16-bit model's gradient is sent in its dtype (half the bytes), received into a few reused
    buffers (no allocation per step), and applied from there onto the float32 masters."""
    from spotpipe.runtime.state.pick import build_chunk_optimizer

    model = load_config(None, ["model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16",
                               "model.dtype=bfloat16"]).model

    def state(seed: int) -> StageState:
        chunks = {1: build_stage(model, seed, 1, 4)}
        return StageState(chunks, build_chunk_optimizer(chunks, CFG.train))

    owner = state(CFG.train.seed)
    flat, _ = owner.attach_flat_gradient()
    assert flat.dtype == torch.bfloat16
    holder_gen, owner_gen = _generation(store, 1)
    mirror = MirrorHolder(1, 0, state(7), replay=True)
    mirror.start()
    buffers: list[torch.Tensor] = []  # kept alive, so a new allocation cannot reuse an address
    received = mirror.receive_buffer
    mirror.receive_buffer = lambda kind: _seen(received(kind), buffers, kind)  # type: ignore[method-assign]
    try:
        mirror.generation_started(holder_gen, owner_rank=1)
        sender = MirrorSender(owner_gen, holder_rank=0, timeout_s=10)
        sender.send(KIND_STATE, -1, owner.flat(), owned=True)
        gen = torch.Generator().manual_seed(1)
        sent = []
        for step in range(12):
            flat.copy_(torch.randn(flat.shape, generator=gen) * 0.1)
            sent.append(sender.send(KIND_GRADIENT, step, flat, 1.0, 1e-3))
            owner.apply_update(flat, 1.0, 1e-3)
            mirror.committed(1, step)
            deadline = time.monotonic() + 30
            while mirror.step != step and time.monotonic() < deadline:  # applied: its buffer is free again
                time.sleep(0.005)
        assert sender.drain() == "" and mirror.error == "" and mirror.step == 11
        assert set(sent) == {4 * 8 + 2 * flat.numel()}  # header + bf16 payload
        assert torch.equal(mirror.tensor(), owner.flat())
        distinct = {b.data_ptr() for b in buffers}
        assert len(buffers) == 12 and len(distinct) <= 2, len(distinct)  # the holder's buffer and at most one more
    finally:
        mirror.halt()


def _seen(buf: torch.Tensor | None, seen: list[torch.Tensor], kind: int) -> torch.Tensor | None:
    if buf is not None and kind == KIND_GRADIENT:
        seen.append(buf)
    return buf


@pytest.mark.timeout(120)
def test_replaying_mirror_refuses_a_gap(store: Any) -> None:
    """A copy that would skip a step is marked unusable (step None), never silently wrong."""
    owner, flat = _owner(1)
    holder_gen, owner_gen = _generation(store, 3)
    mirror = _holder(1)
    try:
        mirror.generation_started(holder_gen, owner_rank=1)
        sender = MirrorSender(owner_gen, holder_rank=0, timeout_s=10)
        sender.send(KIND_STATE, 4, owner.flat())
        sender.send(KIND_GRADIENT, 6, flat, 1.0, 1e-3)
        mirror.committed(3, 6)
        sender.drain()
        mirror.settle(60.0)
        assert mirror.step is None and "cannot replay step 6" in mirror.error
    finally:
        mirror.halt()


@pytest.mark.timeout(60)
def test_replaying_mirror_skips_a_step_its_owner_skipped(store: Any) -> None:
    """Issue 10, section 6: a non-finite step skipped with train.nonfinite = "skip" is sent as a
    skipped step (no payload); the holder counts it without touching its copy."""
    owner, flat = _owner(2)
    holder_gen, owner_gen = _generation(store, 1)
    mirror = _holder(2)
    try:
        mirror.generation_started(holder_gen, owner_rank=1)
        sender = MirrorSender(owner_gen, holder_rank=0, timeout_s=10)
        sender.send(KIND_STATE, 4, owner.flat())
        flat.fill_(0.1)
        sender.send(KIND_GRADIENT, 5, flat, 1.0, 1e-3)
        owner.apply_update(flat, 1.0, 1e-3)
        mirror.committed(1, 5)
        sender.send(KIND_SKIPPED, 6, None)
        mirror.committed(1, 6)  # the owner skipped step 6: no update
        flat.fill_(-0.2)
        sender.send(KIND_GRADIENT, 7, flat, 1.0, 1e-3)
        owner.apply_update(flat, 1.0, 1e-3)
        mirror.committed(1, 7)
        sender.drain()
        mirror.settle(30.0)
        assert mirror.error == "" and mirror.step == 7
        copy = mirror.tensor()
        assert torch.isfinite(copy).all() and torch.equal(copy, owner.flat())
    finally:
        mirror.halt()


@pytest.mark.timeout(120)
def test_periodic_mirror_follows_full_states_across_generations_and_a_rollback(store: Any) -> None:
    """``mirror_every > 1``: each full state the owner sends replaces the copy; a new generation
    (new groups) is followed; a rollback voids the copy until a state of a later generation comes."""
    owner, _ = _owner(3)
    mirror = _holder(3, replay=False)
    try:
        for number, steps in ((1, (4, 9)), (2, (12,))):
            holder_gen, owner_gen = _generation(store, number)
            mirror.generation_started(holder_gen, owner_rank=1)
            sender = MirrorSender(owner_gen, holder_rank=0, timeout_s=10)
            for step in steps:
                owner.chunks[3].blocks[0].attn_norm.weight.data.add_(0.5)
                sender.send(KIND_STATE, step, owner.flat())
            assert sender.drain() == ""
            deadline = time.monotonic() + 30
            while mirror.step != steps[-1] and time.monotonic() < deadline:  # the last state is in flight
                time.sleep(0.01)
            assert mirror.step == steps[-1] and torch.equal(mirror.tensor(), owner.flat())
        mirror.reset(min_generation=4)
        assert mirror.step is None and mirror.nbytes == 0
    finally:
        mirror.halt()


@pytest.mark.timeout(60)
def test_a_holder_gone_mid_generation_does_not_stop_its_owner(store: Any) -> None:
    """The holder's group fails (its process died): the owner's sends report the error once and
    every later send returns at once, so the owner trains on and the recovery handles the loss."""
    owner, flat = _owner(1)
    holder_gen, owner_gen = _generation(store, 1)
    sender = MirrorSender(owner_gen, holder_rank=0, timeout_s=5)
    sender.send(KIND_GRADIENT, 1, flat, 1.0, 1e-3)  # nobody will receive it
    del holder_gen  # the holder's end of the group goes away
    import gc

    gc.collect()
    assert sender.drain() != ""
    assert sender.send(KIND_GRADIENT, 2, flat, 1.0, 1e-3) == 0


@pytest.mark.parametrize("sets", [[], ["pipeline.stages=2"], ["ft.strategy=checkfree+"]])
def test_mirror_size_estimate_covers_the_real_flat_state(sets: list[str]) -> None:
    """The run summary's mirror memory per stage reads mirror_state_bytes: it must not underestimate
    the flat state a rank really sends (weights + 2 moments + tail), nor overshoot it by more than 64 KiB."""
    from spotpipe.ft.policy import swap_schedule_on
    from spotpipe.runtime.control.sizes import mirror_state_bytes

    cfg = load_config(None, sets)
    swap = swap_schedule_on(cfg.ft)
    real = 0
    for rank in range(cfg.pipeline.stages):
        chunks = {rank: build_stage(cfg.model, 0, rank, cfg.pipeline.stages, edge_copies=swap)}
        real = max(real, 4 * StageState(chunks, ChunkAdamW(chunks, cfg.train)).numel())
    est = mirror_state_bytes(cfg)
    assert real <= est <= real + 64 * 2**10
