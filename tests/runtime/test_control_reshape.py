"""The controller's side of an elastic reshape (spotpipe.runtime.control.reshape): the shape from
the role table, who sends each block (a live owner, or the lost stage's current mirror), and the
record the workers carry out."""

from __future__ import annotations

from spotpipe.ft.elastic import ElasticCost, initial_shape, next_shape
from spotpipe.runtime.control.reshape import block_sources, reshape_record, shape_now

COST = ElasticCost(layer_s=1.0, microbatches=4, layer_params=10, move_bytes_per_param=12)


def test_the_shape_keeps_a_lost_worker_in_its_position_and_a_spare_that_took_it_stands_by() -> None:
    roles = {(0, 0): 0, (1, 0): 7, (2, 0): 2}  # spare 7 already took lost worker 1's role
    shape = shape_now(((0, 3), (3, 6), (6, 8)), 1, roles, {1: (1, 0)}, [9, 7])
    assert shape.workers == ((0, 1, 2),) and shape.standby == (9, 7)


def test_a_lost_stage_is_sent_from_its_current_mirror_and_nowhere_else() -> None:
    old = initial_shape(8, 4, 1)  # workers 0..3, blocks 2 each; worker 1 holds stage 2's mirror
    decision = next_shape(old, [2], [], COST)
    assert decision.kind == "shrink" and decision.to_shape.stages == 3
    moves, why = block_sources(decision, [2], {0: 9, 1: 9, 3: 9}, 10, mirrors=True)
    assert why == "" and moves is not None
    rebuilt = [m for m in moves if m["mirror"]]
    assert rebuilt and all(m["from"] == 1 for m in rebuilt)  # (2 - 1) mod 4 holds stage 2's copy
    assert {tuple(m["layers"]) for m in rebuilt} <= {(4, 5), (5, 6), (4, 6)}
    lagging, why = block_sources(decision, [2], {0: 9, 1: 8, 3: 9}, 10, mirrors=True)
    assert lagging is None and "no current mirror" in why and "step 10" in why
    none, why = block_sources(decision, [2], {}, 10, mirrors=False)
    assert none is None and "have no mirror" in why


def test_the_record_deals_the_global_batch_and_parks_the_dropped_group() -> None:
    old = initial_shape(8, 4, 2)  # replica 1 = workers 4..7
    decision = next_shape(old, [5], [], ElasticCost(layer_s=1.0, microbatches=8, layer_params=10))
    assert decision.to_shape.workers == ((0, 1, 2, 3),)
    record = reshape_record(decision, [], 3, {"pos": 1}, 8, [5])
    shape = record["shape"]
    assert record["outcome"] == "reshape" and record["resume_step"] == 3 and record["new_workers"] == []
    assert shape["deal"] == [list(range(8))] and shape["parked"] == [4, 6, 7]
    assert shape["old_layers"]["0"] == [0, 2] and "5" not in shape["old_layers"]
