"""Elastic reshape policy: shrink, grow, floors and fallbacks, with moves and bytes worked out by hand."""

from __future__ import annotations

import pytest

from spotpipe.config import JobConfig, load_config
from spotpipe.errors import ConfigError
from spotpipe.ft.elastic import (
    ElasticCost,
    Move,
    Shape,
    ShapeLimits,
    deal_microbatches,
    elastic_cost,
    initial_shape,
    next_shape,
    peak_memory,
    step_seconds,
)
from spotpipe.model.partition import block_params, model_shapes

pytestmark = pytest.mark.timeout(60)

# Round numbers: a block is 100 parameters, the embedding 50, the head 70; 12 bytes move per
# parameter (float32 weights + two AdamW moments), so a block moves 1200 bytes.
COST = ElasticCost(layer_s=1.0, microbatches=4, layer_params=100, embedding_params=50, head_params=70,
                   move_bytes_per_param=12, memory_bytes_per_param=16)
BLOCK = 1200


def test_shrink_four_to_three_stages_repartitions_contiguously_and_names_the_moves() -> None:
    shape = initial_shape(8, 4, 1)  # workers 0..3 hold [0,2) [2,4) [4,6) [6,8)
    d = next_shape(shape, [2], [], COST)
    assert d.kind == "shrink"
    assert d.to_shape.layers == ((0, 3), (3, 6), (6, 8))
    assert d.to_shape.workers == ((0, 1, 3),)
    # worker 0 takes block 2 from worker 1; worker 1 takes blocks 4-5 of the lost stage 2, rebuilt
    # first by the recovery strategy (no live sender); worker 3 keeps its blocks.
    assert set(d.moves) == {
        Move((2, 3), 1, 1, 0, 0, BLOCK),
        Move((4, 6), 2, None, 1, 1, 2 * BLOCK),
    }
    assert d.bytes == 3 * BLOCK
    # 1F1B: (m + S - 1) x the slowest stage: (4 + 3) x 2 before, (4 + 2) x 3 after.
    assert (d.before_s, d.after_s) == (14.0, 18.0)
    assert "4x1 -> 3x1" in d.why and "\n" not in d.why


def test_the_embedding_and_the_head_move_with_the_first_and_last_blocks() -> None:
    shape = initial_shape(8, 4, 1)
    first = next_shape(shape, [0], [], COST)  # new stages: worker 1 [0,3), worker 2 [3,6), worker 3 [6,8)
    assert set(first.moves) == {
        Move((0, 2), 0, None, 0, 1, 2 * BLOCK + 50 * 12),
        Move((3, 4), 1, 1, 1, 2, BLOCK),
    }
    last = next_shape(shape, [3], [], COST)  # worker 0 [0,3), worker 1 [3,6), worker 2 [6,8)
    assert set(last.moves) == {
        Move((2, 3), 1, 1, 0, 0, BLOCK),
        Move((4, 6), 2, 2, 1, 1, 2 * BLOCK),
        Move((6, 8), 3, None, 2, 2, 2 * BLOCK + 70 * 12),
    }


def test_losses_at_one_moment_are_one_reshape() -> None:
    d = next_shape(initial_shape(8, 4, 1), [1, 2], [], COST)
    assert d.to_shape.layers == ((0, 4), (4, 8)) and d.to_shape.workers == ((0, 3),)
    assert d.bytes == 4 * BLOCK  # blocks 2-3 to worker 0, 4-5 to worker 3, all rebuilt
    assert all(m.from_worker is None for m in d.moves)


def test_replica_loss_drops_the_replica_group_and_keeps_the_global_batch() -> None:
    cost = ElasticCost(layer_s=1.0, microbatches=12, layer_params=100)  # 3 replicas x 4 microbatches
    shape = initial_shape(8, 4, 3)  # replica r: workers 4r .. 4r+3
    d = next_shape(shape, [5], [], cost)
    assert d.kind == "shrink" and d.moves == ()
    assert d.to_shape.workers == ((0, 1, 2, 3), (8, 9, 10, 11))
    assert d.to_shape.standby == (4, 6, 7)  # replica 1's survivors stand by
    assert d.to_shape.layers == shape.layers
    # the 12 microbatches go to 2 replicas: 6 each, (6 + 3) x 2 blocks; before (4 + 3) x 2
    assert (d.before_s, d.after_s) == (14.0, 18.0)
    dealt = deal_microbatches(12, 2)
    assert dealt == (tuple(range(6)), tuple(range(6, 12)))
    uneven = deal_microbatches(8, 3)
    assert [i for part in uneven for i in part] == list(range(8)) and max(map(len, uneven)) == 3
    with pytest.raises(ValueError, match=r"replicas must be in \[1, 8\]"):
        deal_microbatches(8, 9)


def test_a_standby_takes_the_next_loss_and_a_joiner_rebuilds_the_replica() -> None:
    cost = ElasticCost(layer_s=1.0, microbatches=8, layer_params=100, move_bytes_per_param=12)
    shrunk = next_shape(initial_shape(8, 4, 2), [5], [], cost).to_shape  # 4x1, standby 4, 6, 7
    replaced = next_shape(shrunk, [2], [], cost)
    assert replaced.kind == "replace"
    assert replaced.to_shape.workers == ((0, 1, 4, 3),)
    assert replaced.moves == (Move((4, 6), 2, None, 2, 4, 2 * BLOCK),)
    grown = next_shape(shrunk, [], [9], cost)
    assert grown.kind == "grow" and grown.to_shape.label == "4x2"
    assert grown.to_shape.workers[0] == (0, 1, 2, 3) and sorted(grown.to_shape.workers[1]) == [4, 6, 7, 9]
    # every new replica worker receives its whole stage from replica 0
    assert sorted((m.layers, m.from_worker) for m in grown.moves) == [((0, 2), 0), ((2, 4), 1), ((4, 6), 2), ((6, 8), 3)]
    assert grown.after_s < grown.before_s


def test_min_workers_is_a_floor() -> None:
    limits = ShapeLimits(min_workers=3)
    three = next_shape(initial_shape(8, 4, 1), [1], [], COST, limits)
    assert three.kind == "shrink" and three.to_shape.label == "3x1"
    two = next_shape(three.to_shape, [0], [], COST, limits)
    assert two.kind == "wait" and two.to_shape == three.to_shape and two.moves == ()
    assert "ft.min_workers = 3" in two.why and two.after_s == float("inf")


def test_grow_three_to_four_splits_the_most_loaded_stage() -> None:
    shape = Shape(((0, 2), (2, 6), (6, 8)), ((10, 11, 12),))
    d = next_shape(shape, [], [13], COST)
    assert d.kind == "grow"
    assert d.to_shape.layers == ((0, 2), (2, 4), (4, 6), (6, 8))
    # the joiner sits next to stage 1 (4 blocks) and takes half of it: one move, from worker 11 only
    chain = d.to_shape.workers[0]
    assert chain in ((10, 11, 13, 12), (10, 13, 11, 12))
    (move,) = d.moves
    assert (move.from_stage, move.from_worker, move.to_worker, move.bytes) == (1, 11, 13, 2 * BLOCK)
    assert move.layers == d.to_shape.layers[chain.index(13)] and move.layers in ((2, 4), (4, 6))
    assert (d.before_s, d.after_s) == ((4 + 2) * 4.0, (4 + 3) * 2.0)


def test_grow_that_does_not_help_leaves_the_worker_on_standby() -> None:
    # 8 blocks on 4 stages (2 each): 5 stages still have a 2-block stage and a longer bubble
    d = next_shape(initial_shape(8, 4, 1), [], [7], COST, ShapeLimits(max_workers=5))
    assert d.kind == "keep" and d.to_shape.standby == (7,) and d.to_shape.workers == ((0, 1, 2, 3),)
    assert "would not shorten the step" in d.why


def test_layer_count_caps_the_pipeline_with_a_why() -> None:
    d = next_shape(initial_shape(4, 3, 1), [], [7, 8, 9], COST)
    assert d.kind == "grow" and d.to_shape.label == "4x1" and d.to_shape.standby == (8, 9)
    assert "6 stages need more blocks than model.layers = 4" in d.why
    full = next_shape(initial_shape(4, 4, 1), [], [7, 8], COST)
    assert full.kind == "keep" and "model.layers = 4" in full.why


def test_memory_limit_falls_back_to_the_next_shape_that_fits() -> None:
    cost = ElasticCost(layer_s=1.0, microbatches=4, layer_params=100, embedding_params=50, head_params=70,
                       move_bytes_per_param=12, memory_bytes_per_param=16, layer_activation_bytes=10_000)
    # 3x1: stage 0 holds 3 blocks + embedding (350 params x 16) and 3 in-flight microbatches of
    # 3 blocks (9 x 10000) = 95600 bytes. 2x1: stage 0, 450 x 16 + 2 x 4 x 10000 = 87200 bytes.
    assert peak_memory(Shape(((0, 3), (3, 6), (6, 8)), ((0, 1, 3),)), cost) == (95_600.0, 0)
    d = next_shape(initial_shape(8, 4, 1), [2], [], cost, ShapeLimits(memory_bytes=90_000))
    assert d.kind == "shrink" and d.to_shape.layers == ((0, 4), (4, 8))
    assert "3x1 needs" in d.why and "over the" in d.why
    none = next_shape(initial_shape(8, 4, 1), [2], [], cost, ShapeLimits(memory_bytes=50_000))
    assert none.kind == "wait" and "no shape runs without a replacement" in none.why


def test_bad_shapes_and_joiners_are_refused() -> None:
    with pytest.raises(ValueError, match="not contiguous"):
        Shape(((0, 2), (3, 4)), ((0, 1),))
    with pytest.raises(ValueError, match="one worker per stage"):
        Shape(((0, 2), (2, 4)), ((0,),))
    with pytest.raises(ValueError, match="already in the shape"):
        next_shape(initial_shape(8, 4, 1), [], [3], COST)


def test_cost_of_a_job_uses_the_model_shapes() -> None:
    cfg = load_config(None, ["sim.layer_forward_s=0.01"])
    cost = elastic_cost(cfg)
    whole = model_shapes(cfg.model, 1)[0].params
    assert cost.layer_params == block_params(cfg.model)
    assert cost.span_bytes((0, cfg.model.layers), cfg.model.layers) == whole * (4 + 8)
    seqs = cfg.train.batch_size // cfg.pipeline.microbatches
    assert cost.layer_s == pytest.approx(0.01 * seqs * (1 + cfg.sim.backward_ratio))
    assert step_seconds(initial_shape(8, 4, 1), cost) == pytest.approx((4 + 3) * 2 * cost.layer_s)
    half = elastic_cost(load_config(None, ["model.dtype=bfloat16"]))
    assert half.move_bytes_per_param == 2 + 12  # bf16 weights, fp32 master + two moments


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("ft.min_workers=5", "ft.min_workers must be in [1, pipeline.stages x pipeline.replicas = 4], got 5"),
        ("ft.min_workers=0", "ft.min_workers must be in [1, pipeline.stages x pipeline.replicas = 4], got 0"),
        ("ft.replace_wait_s=-1", "ft.replace_wait_s must be in [0, 1e+06] seconds, got -1"),
        ("ft.elastic=maybe", "ft.elastic: expected true or false"),
    ],
)
def test_bad_elastic_config_is_one_line_naming_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_elastic_config_defaults() -> None:
    ft = JobConfig().ft
    assert (ft.elastic, ft.min_workers, ft.replace_wait_s) == (False, 1, 0.0)


def _check_moves_complete(d, lost: set[int]) -> None:
    """After the moves, every worker of the new shape holds exactly its new blocks, and every block
    comes from a live worker that held it (or is rebuilt: ``from_worker`` None)."""
    old, new = d.from_shape, d.to_shape
    for row in new.workers:
        for s, worker in enumerate(row):
            pos = old.position(worker)
            held = set(range(*old.layers[pos[0]])) if pos is not None else set()
            got = [m for m in d.moves if m.to_worker == worker]
            moved = [i for m in got for i in range(*m.layers)]
            assert len(moved) == len(set(moved)) and not set(moved) & held
            assert (held & set(range(*new.layers[s]))) | set(moved) == set(range(*new.layers[s]))
            for m in got:
                assert m.to_stage == s and set(range(*m.layers)) <= set(range(*old.layers[m.from_stage]))
                if m.from_worker is None:
                    assert all(r[m.from_stage] in lost for r in old.workers)
                else:
                    assert m.from_worker not in lost and old.position(m.from_worker)[0] == m.from_stage
                assert m.bytes == COST.span_bytes(m.layers, new.num_layers)


@pytest.mark.parametrize("replicas", [1, 2])
def test_walk_four_three_two_three_four_and_every_move_is_complete(replicas: int) -> None:
    shape = initial_shape(8, 4, replicas)
    start = shape
    labels = []
    walk = [([shape.workers[-1][1]], []), (None, []), ([], [20]), ([], [21])]
    for lost, joined in walk:
        if lost is None:  # lose the second stage's worker of the first replica
            lost = [shape.workers[0][1]]
        d = next_shape(shape, lost, joined, COST)
        _check_moves_complete(d, set(lost))
        shape = d.to_shape
        labels.append(shape.label)
    if replicas == 1:
        assert labels == ["3x1", "2x1", "3x1", "4x1"]
        assert shape.layers == start.layers  # back to the job's own cut
    else:  # a replica group goes; its standbys take the next loss; the second joiner completes a replica
        assert labels == ["4x1", "4x1", "4x1", "4x2"]
        assert shape.layers == start.layers


def test_random_losses_and_joins_keep_every_block_owned_once() -> None:
    import random

    rng = random.Random(7)
    for _ in range(200):
        shape = initial_shape(8, rng.choice([2, 4, 8]), rng.choice([1, 2, 3]), rng.choice([0, 1]))
        fresh = 100
        for _ in range(6):
            everyone = list(shape.active) + list(shape.standby)
            lost = rng.sample(everyone, rng.randint(0, min(3, len(everyone) - 1)))
            joined = list(range(fresh, fresh + rng.randint(0, 2)))
            fresh += 3
            d = next_shape(shape, lost, joined, COST, ShapeLimits(min_workers=1, max_workers=12))
            if d.kind == "wait":
                break
            _check_moves_complete(d, set(lost))
            assert not set(d.to_shape.active) & set(lost) and not set(d.to_shape.standby) & set(lost)
            assert d.kind != "grow" or len(d.to_shape.active) <= 12
            shape = d.to_shape


def test_a_lost_standby_changes_nothing_else() -> None:
    d = next_shape(initial_shape(8, 4, 1, spares=2), [5], [], COST)
    assert d.kind == "keep" and d.to_shape.standby == (4,) and d.moves == ()
