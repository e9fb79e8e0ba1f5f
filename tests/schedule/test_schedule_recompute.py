"""The recompute action: the pass, its validation, which chunks to pick, and its price in the simulator."""

from __future__ import annotations

import pytest

from spotpipe.cost import CostModel
from spotpipe.network import Link, Network
from spotpipe.schedule.chronos import chronos_schedule
from spotpipe.schedule.generators import one_f_one_b_schedule
from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError, parse_action
from spotpipe.schedule.passes import add_recompute, lower, recomputed
from spotpipe.schedule.recompute import chunk_lifetimes, chunks_by_lifetime, recompute_plan
from spotpipe.schedule.validate import check_schedule
from spotpipe.sim.player import play_iteration

pytestmark = pytest.mark.timeout(30)


def test_text_form() -> None:
    a = parse_action("3R7")
    assert a == Action(3, Op.R, 7) and str(a) == "3R7" and a.op.is_compute and a.peer is None
    assert parse_action("3RECV_F7") .op is Op.RECV_F  # R does not shadow RECV


def test_pass_puts_r_right_before_each_backward_of_the_chunks() -> None:
    s = add_recompute(lower(one_f_one_b_schedule(2, 2)), [0])
    assert s.to_text().splitlines()[0] == "rank 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0R0 0B0 0RECV_B1 0R1 0B1"
    assert "R" not in s.to_text().splitlines()[1].replace("RECV", "")
    assert recomputed(s) == {(0, 0), (0, 1)}
    assert check_schedule(s) == [] and check_schedule(s, blocking_recv=True) == []
    # before lowering too, and lowering keeps the R where it was
    c = add_recompute(one_f_one_b_schedule(2, 2), [1])
    assert c.ranks[1] == tuple(Action(1, op, m) for op, m in ((Op.F, 0), (Op.R, 0), (Op.B, 0), (Op.F, 1), (Op.R, 1), (Op.B, 1)))
    assert [a for a in lower(c).ranks[1] if a.op.is_compute] == list(c.ranks[1])


def test_pass_errors_name_the_chunk_and_range() -> None:
    with pytest.raises(ScheduleError, match=r"recompute of chunk\(s\) \[4\]: the 1f1b schedule has chunks 0..3"):
        add_recompute(one_f_one_b_schedule(4, 4), [4])
    with pytest.raises(ScheduleError, match="already has recompute action"):
        add_recompute(add_recompute(one_f_one_b_schedule(2, 2), [0]), [0])


def test_validator_rejects_a_misplaced_recompute() -> None:
    after = Schedule.from_rank_texts(["0F0 0B0 0R0"])
    assert any("does not precede its backward 0B0" in p.message for p in check_schedule(after))
    before = Schedule.from_rank_texts(["0R0 0F0 0B0"])
    assert any("does not follow its forward 0F0" in p.message for p in check_schedule(before))


def test_lifetimes_rank_the_shallow_chunks_of_the_v_first() -> None:
    s = chronos_schedule(4, 8)
    life = chunk_lifetimes(s)
    for r in range(4):  # each rank's shallow chunk r lives longer than its deep chunk 7 - r
        assert life[r] > life[7 - r]
    assert chunks_by_lifetime(s)[0] == 0  # the first chunk waits for the whole round trip
    # 1F1B: rank r keeps its stage S - r microbatches long, so the lifetime falls with the rank
    ref = chunk_lifetimes(one_f_one_b_schedule(4, 8))
    assert list(ref) == sorted(ref, reverse=True) and ref[0] > ref[3]


def test_plan_modes() -> None:
    s = chronos_schedule(4, 8)
    assert recompute_plan(s, "none") == ()
    assert recompute_plan(s, "all") == tuple(range(8))
    assert recompute_plan(s, "longest") == (0, 1, 2, 3)  # the shallow chunk of every rank
    assert recompute_plan(s, "none", [6, 5]) == (5, 6)
    assert recompute_plan(one_f_one_b_schedule(4, 4), "longest") == ()  # one chunk per rank: nothing to pick
    with pytest.raises(ScheduleError, match=r"pipeline.recompute_chunks names chunk\(s\) \[8\].*chunks 0..7"):
        recompute_plan(s, "none", [8])
    with pytest.raises(ScheduleError, match="pipeline.recompute must be one of none, all, longest"):
        recompute_plan(s, "some")


def _cost(stages: int) -> CostModel:
    return CostModel(forward_s=(1.0,) * stages, backward_s=(2.0,) * stages, boundary_bytes=(10,) * stages,
                     activation_bytes=(100,) * stages, grad_bytes=(0,) * stages, param_count=(0,) * stages)


def test_simulator_prices_the_recompute() -> None:
    # 1F1B on 2 ranks, 2 microbatches, F = 1 s, B = 2 s, free links:
    # rank 0: 0F0 [0,1] 0F1 [1,2] ... 0B0 [4,6] 0B1 [7,9]; rank 1: 1F0 [1,2] 1B0 [2,4] 1F1 [4,5] 1B1 [5,7].
    net = Network(2, Link(0.0, float("inf")))
    base = play_iteration(lower(one_f_one_b_schedule(2, 2)), _cost(2), net, collectives=False)
    assert base.pipeline_s == pytest.approx(9.0)
    # Recomputing chunk 1: each of its backwards waits for one more forward, on the critical path.
    last = play_iteration(add_recompute(lower(one_f_one_b_schedule(2, 2)), [1]), _cost(2), net, collectives=False)
    assert last.pipeline_s == pytest.approx(base.pipeline_s + 2.0)
    assert last.busy_s[1][0] == pytest.approx(base.busy_s[1][0] + 2.0)
    # Recomputing chunk 0: rank 0 recomputes while it waits for the gradients, so the step is as long.
    first = play_iteration(add_recompute(lower(one_f_one_b_schedule(2, 2)), [0]), _cost(2), net, collectives=False)
    assert first.pipeline_s == pytest.approx(base.pipeline_s)
    assert first.busy_s[0][0] == pytest.approx(base.busy_s[0][0] + 2.0)
    # rank 0 keeps the token ids (counted as nothing) instead of two activations of 100 B each;
    # one microbatch's activations come back at a time
    assert base.peak_activation_bytes[0][0] == 200
    assert first.peak_activation_bytes[0][0] == 100
    # chunk 1 keeps its 10-byte input until the R brings the other 90 B back
    assert last.peak_activation_bytes[1][0] == 100 and base.peak_activation_bytes[1][0] == 100
    assert first.peak_activations == base.peak_activations
