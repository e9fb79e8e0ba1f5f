"""SequenceSampler: determinism, no repeats within an epoch, exact resume, splits, step slicing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spotpipe.data.sampler import SequenceSampler, batch_for_step, microbatch_ids, microbatch_slice, split_bounds
from spotpipe.errors import SpotpipeError

N, C = 10_000, 15  # windows of 16 tokens: train 9500 // 16 = 593, val 500 // 16 = 31


def test_same_seed_same_ids_other_seed_other_ids() -> None:
    a, b, c = (SequenceSampler(N, C, seed) for seed in (3, 3, 4))
    ids_a = [a.next_ids(7) for _ in range(20)]
    assert ids_a == [b.next_ids(7) for _ in range(20)]
    assert ids_a != [c.next_ids(7) for _ in range(20)]


def test_each_epoch_is_a_permutation_without_repeats() -> None:
    s = SequenceSampler(N, C, seed=1)
    assert len(s) == 9500 // 16
    epoch0 = s.next_ids(len(s))
    assert sorted(epoch0) == list(range(len(s)))
    assert s.state_dict() == {"epoch": 1, "position": 0, "seed": 1}
    epoch1 = s.next_ids(len(s))
    assert sorted(epoch1) == list(range(len(s))) and epoch1 != epoch0
    # an odd batch size crossing the epoch boundary still never repeats within an epoch
    s2 = SequenceSampler(N, C, seed=1)
    stream = [i for _ in range(100) for i in s2.next_ids(13)]
    assert stream[: len(s)] == epoch0 and stream[len(s) : 2 * len(s)] == epoch1


@pytest.mark.parametrize("cut", [0, 5, 592, 593, 600, 1500])
def test_restored_state_gives_exactly_the_same_future(cut: int) -> None:
    s = SequenceSampler(N, C, seed=9)
    s.next_ids(cut)
    state = json.loads(json.dumps(s.state_dict()))  # survives a trip through JSON (events.jsonl)
    future = [s.next_ids(11) for _ in range(120)]
    fresh = SequenceSampler(N, C, seed=0)  # seed comes from the state
    fresh.load_state_dict(state)
    assert [fresh.next_ids(11) for _ in range(120)] == future


def test_bad_state_is_rejected() -> None:
    s = SequenceSampler(N, C, seed=0)
    with pytest.raises(SpotpipeError, match="position must be in"):
        s.load_state_dict({"epoch": 0, "position": 10_000, "seed": 0})
    with pytest.raises(SpotpipeError, match="integer epoch"):
        s.load_state_dict({"epoch": 0})


def test_splits_are_disjoint_and_batches_hold_the_right_tokens() -> None:
    tokens = np.arange(N, dtype=np.uint32)
    train = SequenceSampler(N, C, 0, "train", 0.05)
    val = SequenceSampler(N, C, 0, "val", 0.05)
    assert split_bounds(N, 0.05, "train") == (0, 9500) and split_bounds(N, 0.05, "val") == (9500, N)
    assert len(val) == 500 // 16
    tb = train.batch(tokens, train.next_ids(len(train)))
    vb = val.batch(tokens, list(range(len(val))))
    assert tb.dtype == np.int64 and tb.shape == (len(train), C + 1)
    assert tb.max() < 9500 and vb.min() >= 9500
    for row in np.concatenate([tb, vb]):  # each row is a contiguous window
        assert np.array_equal(row, np.arange(row[0], row[0] + C + 1))
    starts = np.sort(tb[:, 0])
    assert np.all(np.diff(starts) == C + 1)  # non-overlapping, tiling the split
    assert not np.array_equal(SequenceSampler(N, C, 0, "val").permutation(0), train.permutation(0)[: len(val)])


def test_too_small_split_is_an_error() -> None:
    with pytest.raises(SpotpipeError, match="val split .* holds no window of model.context \\+ 1 = 129"):
        SequenceSampler(1000, 128, 0, "val", 0.05, name="tok/")


@pytest.mark.parametrize("replicas,microbatches", [(1, 1), (1, 4), (2, 2), (4, 2)])
def test_step_slicing_follows_lowering_contract(replicas: int, microbatches: int) -> None:
    step_ids = list(range(100, 116))
    per_replica = 16 // replicas
    pieces = []
    for r in range(replicas):
        replica_ids = step_ids[r * per_replica : (r + 1) * per_replica]
        mbs = [microbatch_ids(step_ids, replicas, microbatches, r, m) for m in range(microbatches)]
        assert [i for mb in mbs for i in mb] == replica_ids
        assert all(len(mb) == 16 // (replicas * microbatches) for mb in mbs)
        pieces.extend(mbs)
    assert [i for p in pieces for i in p] == step_ids
    tokens = np.arange(N)
    s = SequenceSampler(N, C, 0)
    arrays = batch_for_step(s, tokens, s.next_ids(16), replicas, microbatches, replica=replicas - 1)
    assert len(arrays) == microbatches and arrays[0].shape == (16 // (replicas * microbatches), C + 1)
    with pytest.raises(SpotpipeError, match="multiple of"):
        microbatch_slice(10, 2, 3, 0, 0)
