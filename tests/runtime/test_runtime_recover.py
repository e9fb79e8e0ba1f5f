"""Worker-side recovery pieces: flat rank state, CheckFree install, tied-copy state, the commit decision."""

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
from spotpipe.runtime.state import flat as rc
from spotpipe.runtime.state.optim import build_optimizer

CFG = load_config(None, ["model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=4"])


def _rank(stage: int, seed: int, steps: int) -> tuple[dict[int, Any], dict[int, Any], dict[int, float]]:
    chunk = build_stage(CFG.model, seed, stage, 4)
    opt = build_optimizer(chunk.parameters(), CFG.train)
    for _ in range(steps):
        for p in chunk.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return {stage: chunk}, {stage: opt}, {stage: 1.0 if steps else 1.1}


def test_flat_state_round_trip_is_exact() -> None:
    src = _rank(1, 0, 3)
    dst = _rank(1, 7, 0)
    flat = rc.flatten_rank(*src)
    assert flat.numel() == rc.rank_numel(dst[0])
    rc.unflatten_rank(flat, *dst)
    for (k, a), (_, b) in zip(src[0][1].state_dict().items(), dst[0][1].state_dict().items()):
        assert torch.equal(a, b), k
    for pa, pb in zip(src[0][1].parameters(), dst[0][1].parameters()):
        sa, sb = src[1][1].state[pa], dst[1][1].state[pb]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"]) == 3.0
    assert dst[2][1] == 1.0
    # One more identical optimizer step on both keeps them identical (the moments moved too).
    for o, c in ((src[1][1], src[0][1]), (dst[1][1], dst[0][1])):
        for p in c.parameters():
            p.grad = torch.ones_like(p)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(src[0][1].parameters(), dst[0][1].parameters()))


def test_checkfree_install_is_the_weighted_average_with_fresh_state() -> None:
    prev, nxt, tgt = _rank(1, 1, 1)[0], _rank(3, 2, 1)[0], _rank(2, 3, 2)
    a = rc.flatten_blocks(prev, 3.0)
    b = rc.flatten_blocks(nxt, 1.0)
    w = rc.install_checkfree(a, b, tgt[0], tgt[1], tgt[2], 1.1)
    assert w == (3.0, 1.0)
    wa, wb = checkfree_weights(3.0, 1.0)
    sp, sn, st = prev[1].state_dict(), nxt[3].state_dict(), tgt[0][2].state_dict()
    for k in st:
        assert torch.allclose(st[k], (wa * sp[k].double() + wb * sn[k].double()).float(), atol=1e-6), k
    assert not tgt[1][2].state and tgt[2][2] == pytest.approx(1.1, rel=1e-7)  # float32, as the flat state carries it


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
    src = build_stage(CFG.model, 0, 0, 4, edge_copies=True)
    opt = build_optimizer(src.parameters(), CFG.train)
    for _ in range(2):
        for p in src.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    dst = build_stage(CFG.model, 9, 1, 4, edge_copies=True)
    dst_opt = build_optimizer(dst.parameters(), CFG.train)
    flat = rc.flatten_params(src.tied_parameters(), opt)
    assert flat.numel() == rc.params_numel(dst.tied_parameters())
    rc.install_params(flat, dst.tied_parameters(), dst_opt)
    assert torch.equal(dst.embed.weight, src.embed.weight)
    got, want = dst_opt.state[dst.embed.weight], opt.state[src.embed.weight]
    assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])
    assert float(got["step"]) == 2.0
    with pytest.raises(ValueError, match="numbers"):
        rc.install_params(flat[:-3], dst.tied_parameters(), dst_opt)


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
