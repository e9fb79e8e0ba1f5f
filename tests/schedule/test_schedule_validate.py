"""The validator: a sweep over every generator, and deliberately broken schedules."""

from __future__ import annotations

import pytest

from spotpipe.schedule.generators import gpipe_schedule, interleaved_schedule, one_f_one_b_schedule
from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError
from spotpipe.schedule.passes import add_communication, lower
from spotpipe.schedule.validate import (
    check_message_order,
    check_schedule,
    simulate_schedule,
    validate_schedule,
)


def all_generated() -> list[Schedule]:
    out: list[Schedule] = []
    for stages in range(1, 7):
        for microbatches in range(1, 13):
            out.append(gpipe_schedule(stages, microbatches))
            out.append(one_f_one_b_schedule(stages, microbatches))
            if microbatches % stages == 0:
                out.extend(interleaved_schedule(stages, v, microbatches) for v in range(1, 4))
    return out


@pytest.mark.timeout(60)
def test_sweep_every_generated_schedule_is_valid_lowered_and_not() -> None:
    schedules = all_generated()
    assert len(schedules) == 2 * 72 + 3 * 29
    for s in schedules:
        where = f"{s.name} ranks={s.num_ranks} stages={s.num_stages} M={s.num_microbatches}"
        assert check_schedule(s) == [], where
        lowered = lower(s)
        assert check_schedule(lowered) == [], where
        # the plain lowering also survives receives that block, and keeps per-pair FIFO order
        assert check_schedule(lowered, blocking_recv=True, message_order=True) == [], where
        # receives posted early stay valid under schedule/passes.py's contract (the consumer waits)
        assert check_schedule(lower(s, early_receives=2)) == [], where


def swap(schedule: Schedule, rank: int, i: int, j: int) -> Schedule:
    ranks = [list(acts) for acts in schedule.ranks]
    ranks[rank][i], ranks[rank][j] = ranks[rank][j], ranks[rank][i]
    return schedule.with_ranks(ranks)


def remove(schedule: Schedule, action: Action) -> Schedule:
    return schedule.with_ranks([[a for a in acts if a != action] for acts in schedule.ranks])


def error_of(schedule: Schedule, **kwargs: bool) -> str:
    with pytest.raises(ScheduleError) as info:
        validate_schedule(schedule, **kwargs)
    return str(info.value)


@pytest.mark.timeout(10)
def test_swapped_order_deadlock_compute_only() -> None:
    # rank 1 runs microbatch 1 first while rank 0 waits for microbatch 0's gradient
    s = Schedule.from_rank_texts(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"])
    msg = error_of(s)
    first, *rest = msg.splitlines()
    assert first == "deadlock: rank 0 waits at 0B0 for 1B0 on rank 1; rank 1 waits at 1F1 for 0F1 on rank 0"
    grid = "\n".join(rest)
    assert "[0B0]" in grid and "[1F1]" in grid
    assert "rank 0" in grid and "rank 1" in grid
    assert grid.count("[") == 2


@pytest.mark.timeout(10)
def test_swapped_order_deadlock_in_1f1b() -> None:
    # rank 1 of 1F1B (S=3, M=4) runs 1F3 where 1B0 belongs: rank 0 waits at 0B0 for 1B0, which
    # now comes after 1F3, which needs 0F3, which comes after 0B0
    s = one_f_one_b_schedule(3, 4)
    assert [str(a) for a in s.ranks[1]] == ["1F0", "1F1", "1B0", "1F2", "1B1", "1F3", "1B2", "1B3"]
    broken = swap(s, 1, 2, 5)
    msg = error_of(broken)
    assert msg.splitlines()[0] == (
        "deadlock: rank 0 waits at 0B0 for 1B0 on rank 1; rank 1 waits at 1F3 for 0F3 on rank 0; "
        "rank 2 waits at 2F2 for 1F2 on rank 1"
    )
    assert "[0B0]" in msg and "[1F3]" in msg and "[2F2]" in msg and msg.count("[") == 3
    # the same schedule lowered: ranks now wait for messages
    msg = error_of(add_communication(broken))
    assert msg.splitlines()[0] == (
        "deadlock: rank 0 waits at 0B0 for 1SEND_B0 from rank 1; rank 1 waits at 1F3 for 0SEND_F3 from rank 0; "
        "rank 2 waits at 2F2 for 1SEND_F2 from rank 1"
    )
    assert "[0B0]" in msg and "[1F3]" in msg and "[2F2]" in msg
    # B before F on one rank is named as such, not as a deadlock
    msg = error_of(swap(s, 2, 0, 1))
    assert msg.splitlines()[0].startswith("2B0 runs before its forward 2F0 on rank 2")
    assert "[2B0]" in msg and "[2F0]" in msg


@pytest.mark.timeout(10)
def test_missing_recv() -> None:
    lowered = add_communication(one_f_one_b_schedule(2, 2))
    msg = error_of(remove(lowered, Action(1, Op.RECV_F, 1)))
    assert msg.splitlines()[0] == "0SEND_F1 on rank 0 has no matching 1RECV_F1 on rank 1"
    assert "[0SEND_F1]" in msg


@pytest.mark.timeout(10)
def test_missing_send_and_both_missing() -> None:
    lowered = add_communication(one_f_one_b_schedule(2, 2))
    msg = error_of(remove(lowered, Action(1, Op.SEND_B, 0)))
    assert msg.splitlines()[0] == "0RECV_B0 on rank 0 has no matching 1SEND_B0 on rank 1"
    both = remove(remove(lowered, Action(1, Op.SEND_B, 0)), Action(0, Op.RECV_B, 0))
    msg = error_of(both)
    assert msg.splitlines()[0] == "0B0 on rank 0 gets no data: neither 1SEND_B0 nor 0RECV_B0 is in the schedule"
    assert "[0B0]" in msg


@pytest.mark.timeout(10)
def test_b_before_f() -> None:
    s = Schedule.from_rank_texts(["0B0 0F0", "1F0 1B0"])
    msg = error_of(s)
    assert msg.splitlines()[0] == "0B0 runs before its forward 0F0 on rank 0"
    assert "[0B0]" in msg.splitlines()[3]  # row of rank 0 (after message, description, header)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("texts", "kwargs", "first_line"),
    [
        (["0F0 0F0 0B0", "1F0 1B0"], {}, "duplicate 0F0 on rank 0 (first at rank 0 step 0)"),
        (["0F0 0B0", "1F0"], {}, "missing 1B0: stage 1 (rank 1) never runs the backward of microbatch 0"),
        (["0F0 0B0 1F0", "1F0 1B0"], {"stage_to_rank": (0, 1)}, "rank 0 step 2: 1F0 is on rank 0, but stage 1 lives on rank 1"),
        (["0F0 0B0", "1F0 1B0 1F1"], {"num_microbatches": 1, "stage_to_rank": (0, 1)},
         "rank 1 step 2: 1F1 names microbatch 1, the schedule has 0..0"),
        (["0F0 1F0 1B0 0B0"], {}, ""),  # both stages on one rank, right order: valid
        (["1F0 0F0 0B0 1B0"], {"stage_to_rank": (0, 0)},
         "1F0 runs before 0F0, the forward of its path predecessor stage 0, on rank 0"),
        (["0F0 1F0 0B0 1B0"], {"stage_to_rank": (0, 0)},
         "0B0 runs before 1B0, the backward of its path successor stage 1, on rank 0"),
    ],
)
def test_structural_errors(texts: list[str], kwargs: dict[str, object], first_line: str) -> None:
    s = Schedule.from_rank_texts(texts, **kwargs)  # type: ignore[arg-type]
    if not first_line:
        assert check_schedule(s) == []
        return
    assert error_of(s).splitlines()[0].startswith(first_line)


@pytest.mark.timeout(10)
def test_bad_paths_and_placement() -> None:
    s = Schedule.from_rank_texts(["0F0 0B0", "1F0 1B0"], paths=[(0, 1, 0)])
    assert error_of(s).splitlines()[0] == "the path of microbatch 0 visits a stage twice: [0, 1, 0]"
    s = Schedule.from_rank_texts(["0F0 0B0", "1F0 1B0"], stage_to_rank=(0, 2))
    assert "stage 1 is placed on rank 2, but the schedule has ranks 0..1" in error_of(s)
    s = Schedule.from_rank_texts(["0F0 0B0", "1F0 1B0"], paths=[(0,)])
    assert error_of(s).splitlines()[0].startswith("1F0 on rank 1: the path of microbatch 0 [0] does not visit stage 1")


@pytest.mark.timeout(10)
def test_comm_placement_errors() -> None:
    lowered = add_communication(one_f_one_b_schedule(2, 1))
    assert [str(a) for a in lowered.ranks[0]] == ["0F0", "0SEND_F0", "0RECV_B0", "0B0"]
    # a send before its producer
    msg = error_of(swap(lowered, 0, 0, 1))
    assert msg.splitlines()[0] == "0SEND_F0 on rank 0 comes before 0F0, whose output it sends"
    # a receive after its consumer
    msg = error_of(swap(lowered, 0, 2, 3))
    assert msg.splitlines()[0] == "0RECV_B0 on rank 0 comes after 0B0, which consumes it"
    # communication between stages that share a rank
    local = Schedule.from_rank_texts(["0F0 0SEND_F0 1RECV_F0 1F0 1B0 0B0"], stage_to_rank=(0, 0))
    msg = error_of(local)
    assert msg.splitlines()[0].startswith(
        "0SEND_F0 on rank 0: stages 0 and 1 share rank 0, the handoff is local and needs no communication"
    )
    # a send to a stage that is not the path successor
    wrong = Schedule.from_rank_texts(
        ["0F0 0SEND_F0>2 0RECV_B0 0B0", "1RECV_F0 1F0 1SEND_F0 1RECV_B0 1B0 1SEND_B0", "2RECV_F0 2F0 2B0 2SEND_B0"]
    )
    assert error_of(wrong).splitlines()[0].startswith(
        "0SEND_F0>2 on rank 0 talks to stage 2, but the path successor of stage 0 for microbatch 0 is stage 1"
    )


@pytest.mark.timeout(10)
def test_blocking_recv_is_stricter() -> None:
    # posting the gradient receive before the activation send: fine when the consumer waits,
    # a deadlock when the receive blocks
    s = Schedule.from_rank_texts(["0F0 0RECV_B0 0SEND_F0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"])
    assert check_schedule(s) == []
    msg = error_of(s, blocking_recv=True)
    assert msg.splitlines()[0] == (
        "deadlock: rank 0 waits at 0RECV_B0 for 1SEND_B0 from rank 1; rank 1 waits at 1RECV_F0 for 0SEND_F0 from rank 0"
    )
    assert "[0RECV_B0]" in msg and "[1RECV_F0]" in msg


@pytest.mark.timeout(10)
def test_message_order_check() -> None:
    lowered = add_communication(one_f_one_b_schedule(2, 2))
    assert check_message_order(lowered) == []
    # rank 1 posts the receive of microbatch 1 before that of microbatch 0: legal, but not FIFO
    ranks = [list(acts) for acts in lowered.ranks]
    ranks[1].remove(Action(1, Op.RECV_F, 1))
    ranks[1].insert(0, Action(1, Op.RECV_F, 1))
    reordered = lowered.with_ranks(ranks)
    assert check_schedule(reordered) == []
    problems = check_message_order(reordered)
    assert len(problems) == 1
    assert "rank 0 sends 0SEND_F0 to rank 1 while rank 1 posts 1RECV_F1" in problems[0].message
    assert error_of(reordered, message_order=True).startswith("rank 0 sends 0SEND_F0")


@pytest.mark.timeout(10)
def test_wide_grid_is_cut_around_the_fault() -> None:
    s = one_f_one_b_schedule(2, 40)
    assert [str(a) for a in s.ranks[1][60:63]] == ["1F30", "1B30", "1F31"]
    msg = error_of(swap(s, 1, 60, 62))
    lines = msg.splitlines()
    assert lines[0] == "1B30 runs before its forward 1F30 on rank 1"
    assert lines[2].split()[:2] == ["step", "..."]  # columns far from the fault are left out
    assert "61" in lines[2].split() and "62" in lines[2].split()
    assert "[1B30]" in lines[4] and "[1F30]" in lines[4]
    assert all(len(line) < 200 for line in lines)


@pytest.mark.timeout(10)
def test_simulate_with_durations() -> None:
    # F = 2, B = 3, a message takes 0.5: 0F0 [0,2], 1F0 [2.5,4.5], 1B0 [4.5,7.5], 0B0 [8,11]
    def duration(a: Action) -> float:
        return {Op.F: 2.0, Op.B: 3.0}.get(a.op, 0.5 if a.op.is_send else 0.0)

    timeline = simulate_schedule(lower(one_f_one_b_schedule(2, 1)), duration)
    starts = {str(t.action): (t.start, t.end) for row in timeline.timings for t in row}
    assert starts["0F0"] == (0.0, 2.0)
    assert starts["0SEND_F0"] == (2.0, 2.5)
    assert starts["1F0"] == (2.5, 4.5)
    assert starts["1B0"] == (4.5, 7.5)
    assert starts["0B0"] == (8.0, 11.0)
    assert timeline.makespan == 11.0
    # compute-only: cross-rank dependencies cost nothing
    assert simulate_schedule(one_f_one_b_schedule(2, 1), duration).makespan == 10.0


@pytest.mark.timeout(10)
def test_simulate_refuses_invalid() -> None:
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate_schedule(Schedule.from_rank_texts(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"]))
