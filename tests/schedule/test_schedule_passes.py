"""Lowering passes: send/recv placement per the contract in schedule/passes.py, for default,
reordered and partial paths."""

from __future__ import annotations

import pytest

from spotpipe.schedule.generators import interleaved_schedule, one_f_one_b_schedule
from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError, actions_text
from spotpipe.schedule.passes import add_communication, lower, post_receives_early
from spotpipe.schedule.validate import check_schedule, validate_schedule

pytestmark = pytest.mark.timeout(30)


def rank_texts(schedule: Schedule) -> list[str]:
    return [actions_text(acts) for acts in schedule.ranks]


def test_add_communication_1f1b_two_stages() -> None:
    lowered = add_communication(one_f_one_b_schedule(2, 2))
    # SEND right after the producer, RECV right before the consumer
    assert rank_texts(lowered) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1",
        "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1",
    ]
    assert lowered.is_lowered()
    assert lowered.stage_to_rank == (0, 1) and lowered.name == "1f1b"
    validate_schedule(lowered)


def test_peers_and_tags_match_on_both_ends() -> None:
    lowered = add_communication(one_f_one_b_schedule(3, 4))
    on_rank = {a: r for r, acts in enumerate(lowered.ranks) for a in acts}
    comms = [a for a in on_rank if a.op.is_comm]
    assert len(comms) == 2 * 2 * 2 * 4  # 2 edges x (F, B) x (send, recv) x 4 microbatches
    for a in comms:
        match = a.matching()
        assert match in on_rank
        assert on_rank[match] == lowered.stage_to_rank[a.peer]  # type: ignore[index]
        assert a.tag(4) == match.tag(4)
    assert len({a.tag(4) for a in comms if a.op.is_send}) == len(comms) // 2


def test_interleaved_wraps_from_last_rank_to_first() -> None:
    lowered = add_communication(interleaved_schedule(2, 2, 2))
    assert rank_texts(lowered) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 2RECV_F0 2F0 2SEND_F0 2RECV_F1 2F1 2SEND_F1 "
        "2RECV_B0 2B0 2SEND_B0 2RECV_B1 2B1 2SEND_B1 0RECV_B0 0B0 0RECV_B1 0B1",
        "1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 3RECV_F0 3F0 3RECV_F1 3F1 "
        "3B0 3SEND_B0 3B1 3SEND_B1 1RECV_B0 1B0 1SEND_B0 1RECV_B1 1B1 1SEND_B1",
    ]
    validate_schedule(lowered)


def test_stages_on_one_rank_hand_over_locally() -> None:
    single = interleaved_schedule(1, 3, 2)  # three chunks, all on rank 0
    lowered = add_communication(single)
    assert lowered.ranks == single.ranks
    assert not lowered.is_lowered()


def test_reordered_path() -> None:
    # microbatch 0 visits 0 -> 2 -> 1 -> 3 (e.g. a CheckFree+ swap), microbatch 1 the default order
    texts = ["0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1", "2F0 2F1 2B0 2B1", "3F0 3F1 3B0 3B1"]
    s = Schedule.from_rank_texts(texts, paths=[(0, 2, 1, 3), (0, 1, 2, 3)])
    lowered = add_communication(s)
    assert rank_texts(lowered) == [
        "0F0 0SEND_F0>2 0F1 0SEND_F1 0RECV_B0>2 0B0 0RECV_B1 0B1",
        "1RECV_F0>2 1F0 1SEND_F0>3 1RECV_F1 1F1 1SEND_F1 1RECV_B0>3 1B0 1SEND_B0>2 1RECV_B1 1B1 1SEND_B1",
        "2RECV_F0>0 2F0 2SEND_F0>1 2RECV_F1 2F1 2SEND_F1 2RECV_B0>1 2B0 2SEND_B0>0 2RECV_B1 2B1 2SEND_B1",
        "3RECV_F0>1 3F0 3RECV_F1 3F1 3B0 3SEND_B0>1 3B1 3SEND_B1",
    ]
    assert check_schedule(lowered) == []
    assert check_schedule(lowered, blocking_recv=True) == []


def test_partial_path_skips_a_stage() -> None:
    # SkipPipe-style: microbatch 1 skips stage 1
    s = Schedule.from_rank_texts(["0F0 0F1 0B0 0B1", "1F0 1B0", "2F0 2F1 2B0 2B1"], paths=[(0, 1, 2), (0, 2)])
    lowered = add_communication(s)
    assert rank_texts(lowered) == [
        "0F0 0SEND_F0 0F1 0SEND_F1>2 0RECV_B0 0B0 0RECV_B1>2 0B1",
        "1RECV_F0 1F0 1SEND_F0 1RECV_B0 1B0 1SEND_B0",
        "2RECV_F0 2F0 2RECV_F1>0 2F1 2B0 2SEND_B0 2B1 2SEND_B1>0",
    ]
    validate_schedule(lowered)


def test_add_communication_rejects_lowered_and_off_path_input() -> None:
    lowered = add_communication(one_f_one_b_schedule(2, 2))
    with pytest.raises(ScheduleError, match="already has communication action"):
        add_communication(lowered)
    off_path = Schedule.from_rank_texts(["0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1"], paths=[(0, 1), (0,)])
    with pytest.raises(ScheduleError, match=r"cannot lower 1F1: the path of microbatch 1 \[0\] does not visit stage 1"):
        add_communication(off_path)


def test_lower_is_add_communication_by_default() -> None:
    s = one_f_one_b_schedule(4, 8)
    assert lower(s) == add_communication(s)
    assert s.ranks == one_f_one_b_schedule(4, 8).ranks  # input untouched


def test_post_receives_early() -> None:
    early = post_receives_early(add_communication(one_f_one_b_schedule(2, 2)), lookahead=1)
    assert rank_texts(early) == [
        "0F0 0SEND_F0 0RECV_B0 0F1 0SEND_F1 0RECV_B1 0B0 0B1",
        "1RECV_F0 1F0 1RECV_F1 1B0 1SEND_B0 1F1 1B1 1SEND_B1",
    ]
    assert post_receives_early(add_communication(one_f_one_b_schedule(2, 2)), 0) == add_communication(
        one_f_one_b_schedule(2, 2)
    )
    # valid when the consumer waits (the lowering contract in schedule/passes.py) ...
    assert check_schedule(early) == []
    # ... but a transport whose receive blocks would deadlock: this is why lower() leaves it off
    problems = check_schedule(early, blocking_recv=True)
    assert len(problems) == 1 and problems[0].message.startswith("deadlock:")
    assert lower(one_f_one_b_schedule(2, 2), early_receives=1) == early
    with pytest.raises(ScheduleError, match="lookahead must be >= 0"):
        post_receives_early(early, -1)


def test_post_receives_early_keeps_every_action_and_the_compute_order() -> None:
    base = add_communication(interleaved_schedule(3, 2, 6))
    for lookahead in (1, 2, 5):
        early = post_receives_early(base, lookahead)
        for before, after in zip(base.ranks, early.ranks):
            assert sorted(before) == sorted(after)
            assert [a for a in before if a.op is not Op.RECV_F and a.op is not Op.RECV_B] == [
                a for a in after if not a.op.is_recv
            ]
            # every RECV still precedes its consumer
            for i, a in enumerate(after):
                if a.op.is_recv:
                    consumer = Action(a.stage, Op.F if a.op is Op.RECV_F else Op.B, a.microbatch)
                    assert after.index(consumer) > i
        assert check_schedule(early) == []
