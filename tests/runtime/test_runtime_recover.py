"""Worker-side recovery pieces: the stage state's flat form, CheckFree install, tied-copy state, the commit decision."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
import torch

from spotpipe.config import load_config
from spotpipe.runtime.state.rules import checkfree_weights
from spotpipe.model.stages import build_stage
from spotpipe.runtime import protocol
from spotpipe.runtime.state.optimizer import ChunkAdamW
from spotpipe.runtime.state.stage_state import StageState

CFG = load_config(None, ["model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=4"])


def _rank(stage: int, seed: int, steps: int) -> StageState:
    chunk = build_stage(CFG.model, seed, stage, 4)
    state = StageState({stage: chunk}, ChunkAdamW({stage: chunk}, CFG.train), {stage: 1.0 if steps else 1.1})
    for _ in range(steps):
        for p in chunk.parameters():
            p.grad = torch.randn_like(p)
        state.optimizer.step(CFG.train.lr, state.lr_scale)
    return state


def _adam(state: StageState, stage: int) -> Any:
    return state.optimizer.by_chunk[stage]  # type: ignore[attr-defined]


def test_flat_state_round_trip_is_exact() -> None:
    src = _rank(1, 0, 3)
    dst = _rank(1, 7, 0)
    flat = src.flat()
    assert flat.numel() == dst.numel()
    dst.load_flat(flat)
    for (k, a), (_, b) in zip(src.chunks[1].state_dict().items(), dst.chunks[1].state_dict().items()):
        assert torch.equal(a, b), k
    for pa, pb in zip(src.chunks[1].parameters(), dst.chunks[1].parameters()):
        sa, sb = _adam(src, 1).state[pa], _adam(dst, 1).state[pb]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"]) == 3.0
    assert dst.lr_scale[1] == 1.0
    # One more identical optimizer step on both keeps them identical (the moments moved too).
    for state in (src, dst):
        for p in state.chunks[1].parameters():
            p.grad = torch.ones_like(p)
        state.optimizer.step(CFG.train.lr, state.lr_scale)
    assert all(torch.equal(a, b) for a, b in zip(src.chunks[1].parameters(), dst.chunks[1].parameters()))
    with pytest.raises(ValueError, match="numbers"):
        dst.load_flat(flat[:-1])


def test_checkpoint_form_round_trips_and_names_the_file() -> None:
    src, dst = _rank(2, 0, 2), _rank(2, 5, 0)
    dst.load_checkpoint(src.to_checkpoint(), "ckpt/rank-2.pt")
    assert torch.equal(dst.flat(), src.flat())
    with pytest.raises(ValueError, match="ckpt/rank-1.pt holds chunks"):
        _rank(1, 0, 0).load_checkpoint(src.to_checkpoint(), "ckpt/rank-1.pt")


def test_checkfree_install_is_the_weighted_average_with_fresh_state() -> None:
    prev, nxt, tgt = _rank(1, 1, 1), _rank(3, 2, 1), _rank(2, 3, 2)
    a = prev.blocks_flat(3.0)
    b = nxt.blocks_flat(1.0)
    assert a.numel() == tgt.numel(blocks_only=True)
    w = tgt.install_checkfree(a, b, 1.1)
    assert w == (3.0, 1.0)
    wa, wb = checkfree_weights(3.0, 1.0)
    sp, sn, st = prev.chunks[1].state_dict(), nxt.chunks[3].state_dict(), tgt.chunks[2].state_dict()
    for k in st:
        assert torch.allclose(st[k], (wa * sp[k].double() + wb * sn[k].double()).float(), atol=1e-6), k
    assert not _adam(tgt, 2).state and tgt.lr_scale[2] == pytest.approx(1.1, rel=1e-7)  # float32, as the flat state carries it


@pytest.fixture()
def store() -> Any:
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=10), wait_for_workers=False)


def test_commit_decision_has_one_winner(store: Any) -> None:
    """Racing commit and abort writers: everyone reads the same value, whoever came first."""
    key = protocol.step_decide_key(1, 3)
    seen: list[bytes] = []
    lock = threading.Lock()

    def writer(value: str) -> None:
        got = store.clone().compare_set(key, "", value)
        with lock:
            seen.append(bytes(got))

    threads = [threading.Thread(target=writer, args=("commit" if i % 2 else "abort",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and seen[0] in (b"commit", b"abort")
    assert bytes(store.get(key)) == seen[0]


def test_tied_copy_state_round_trips_weights_and_moments() -> None:
    """CheckFree of chunk 1 under CheckFree+ also installs the exact embedding copy from chunk 0."""
    src_chunk = build_stage(CFG.model, 0, 0, 4, edge_copies=True)
    src = StageState({0: src_chunk}, ChunkAdamW({0: src_chunk}, CFG.train))
    for _ in range(2):
        for p in src_chunk.parameters():
            p.grad = torch.randn_like(p)
        src.optimizer.step(CFG.train.lr, src.lr_scale)
    dst_chunk = build_stage(CFG.model, 9, 1, 4, edge_copies=True)
    dst = StageState({1: dst_chunk}, ChunkAdamW({1: dst_chunk}, CFG.train))
    flat = src.tied_flat()
    assert flat.numel() == dst.tied_numel()
    dst.install_tied(flat)
    assert torch.equal(dst_chunk.embed.weight, src_chunk.embed.weight)
    got, want = _adam(dst, 1).state[dst_chunk.embed.weight], _adam(src, 0).state[src_chunk.embed.weight]
    assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])
    assert float(got["step"]) == 2.0
    with pytest.raises(ValueError, match="numbers"):
        dst.install_tied(flat[:-3])


def test_flat_ranges_of_tied_and_counted_parameters() -> None:
    """Chunk 1 under CheckFree+: the embedding copy is its first range; the norm leaves it out."""
    from spotpipe.runtime.worker.tied import flat_ranges

    chunk = build_stage(CFG.model, 0, 1, 4, edge_copies=True)
    params = list(chunk.parameters())
    n_embed = chunk.embed.weight.numel()
    total = sum(p.numel() for p in params)
    assert flat_ranges(params, {id(p) for p in chunk.tied_parameters()}) == [(0, n_embed)]
    copies = {id(p) for p in chunk.copy_parameters()}
    assert flat_ranges(params, {id(p) for p in params} - copies) == [(n_embed, total - n_embed)]
    assert flat_ranges(params, set()) == []


def test_flat_state_keeps_each_parameters_own_step() -> None:
    """A CheckFree-rebuilt chunk 1 under CheckFree+ has fresh moments for its blocks but the exact,
    older moments of its embedding copy: both step counts survive the flat form (a mirror or a
    replica of it must keep AdamW's bias correction of each)."""
    src_chunk = build_stage(CFG.model, 0, 1, 4, edge_copies=True)
    src = StageState({1: src_chunk}, ChunkAdamW({1: src_chunk}, CFG.train))
    for _ in range(3):
        for p in src_chunk.parameters():
            p.grad = torch.randn_like(p)
        src.optimizer.step(CFG.train.lr, src.lr_scale)
    embed = src_chunk.embed.weight
    moments = src.optimizer.moments(1, embed)
    assert moments is not None
    src.optimizer.clear(1)  # fresh AdamW for every parameter (as after CheckFree) ...
    src.optimizer.set_moments(1, embed, moments[0], moments[1], 9.0)  # ... but the copy keeps its own
    for p in src_chunk.parameters():
        p.grad = torch.ones_like(p)
    src.optimizer.step(CFG.train.lr, src.lr_scale)
    dst_chunk = build_stage(CFG.model, 5, 1, 4, edge_copies=True)
    dst = StageState({1: dst_chunk}, ChunkAdamW({1: dst_chunk}, CFG.train))
    dst.load_flat(src.flat())
    got = {name: dst.optimizer.moments(1, p) for name, p in dst_chunk.named_parameters()}
    assert got["embed.weight"] is not None and got["embed.weight"][2] == 10.0
    assert {m[2] for name, m in got.items() if m is not None and name != "embed.weight"} == {1.0}


def test_view_shares_modules_optimizer_and_scales() -> None:
    """A view over some chunks (or their blocks) flattens and loads exactly their part of the state."""
    chunks = {s: build_stage(CFG.model, 0, s, 4) for s in range(4)}
    state = StageState(chunks, ChunkAdamW(chunks, CFG.train))
    for _ in range(2):
        for c in chunks.values():
            for p in c.parameters():
                p.grad = torch.randn_like(p)
        state.step(CFG.train.lr)
    one = state.view([2])
    assert one.chunks[2] is chunks[2] and one.optimizer is state.optimizer and one.lr_scale is state.lr_scale
    alone = _rank(2, 3, 0)  # a worker that holds chunk 2 alone, with other weights
    alone.load_flat(one.flat())
    assert torch.equal(alone.flat(), one.flat())
    # loading into the view lands in the whole state: weights, moments and the lr scale
    src = _rank(2, 4, 3)
    src.lr_scale[2] = float(torch.tensor(1.1, dtype=torch.float32))
    one.load_flat(src.flat())
    assert torch.equal(state.view([2]).flat(), src.flat()) and state.lr_scale[2] == src.lr_scale[2]
    assert all(torch.equal(a, b) for a, b in zip(chunks[2].parameters(), src.chunks[2].parameters()))
    for p, q in zip(chunks[2].parameters(), src.chunks[2].parameters()):
        mp, mq = state.optimizer.moments(2, p), src.optimizer.moments(2, q)
        assert torch.equal(mp[0], mq[0]) and torch.equal(mp[1], mq[1]) and mp[2] == mq[2] == 3.0
    # the blocks part: chunk 1's blocks and their moments into chunk 0, whose embedding stays
    embed = chunks[0].embed.weight.detach().clone()
    embed_avg = state.optimizer.moments(0, chunks[0].embed.weight)[0].clone()
    state.view([0], part="blocks").load_flat(state.view([1], part="blocks").flat())
    for p, q in zip(chunks[0].blocks.parameters(), chunks[1].blocks.parameters()):
        assert torch.equal(p, q)
        mp, mq = state.optimizer.moments(0, p), state.optimizer.moments(1, q)
        assert torch.equal(mp[0], mq[0]) and torch.equal(mp[1], mq[1]) and mp[2] == mq[2] == 2.0
    assert torch.equal(chunks[0].embed.weight, embed) and torch.equal(state.optimizer.moments(0, chunks[0].embed.weight)[0], embed_avg)
    # a state made from a chunk of another shape does not fit
    with pytest.raises(ValueError, match="numbers"):
        state.view([0]).load_flat(state.view([1]).flat())
    with pytest.raises(KeyError):
        state.view([7])
