"""CheckFree+ swap schedule: paths, validity after lowering, and its cost under unit times."""

from __future__ import annotations

import pytest

from spotpipe.schedule.generators import build_schedule
from spotpipe.schedule.ir import Op, Schedule, ScheduleError
from spotpipe.schedule.passes import add_communication
from spotpipe.schedule.swap import (
    embedding_stages,
    head_stages,
    makespan,
    peak_in_flight,
    start_times,
    swap_edges,
    swap_permutation,
    swapped_paths,
)
from spotpipe.schedule.validate import check_schedule


def test_permutation_and_paths():
    assert swap_permutation(4) == (1, 0, 3, 2)
    assert swap_permutation(6) == (1, 0, 2, 3, 5, 4)
    assert swapped_paths(5, 3) == ((0, 1, 2, 3, 4), (1, 0, 2, 4, 3), (0, 1, 2, 3, 4))
    assert embedding_stages(6) == (0, 1) and head_stages(6) == (4, 5)
    with pytest.raises(ScheduleError, match=">= 4 stages"):
        swap_permutation(3)


CASES = [("gpipe", 4, 4, 1), ("1f1b", 4, 8, 1), ("1f1b", 6, 12, 1), ("gpipe", 6, 6, 1), ("1f1b", 8, 16, 1),
         ("1f1b", 5, 7, 1), ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2)]


@pytest.mark.parametrize("name, stages, microbatches, virtual", CASES)
def test_swapped_schedules_validate_before_and_after_lowering(name, stages, microbatches, virtual):
    base = build_schedule(name, stages, microbatches, virtual)
    swapped = swap_edges(base)
    s = base.num_stages
    perm = swap_permutation(s)
    assert swapped.paths is not None
    for m in range(microbatches):
        assert swapped.path(m) == (tuple(range(s)) if m % 2 == 0 else perm)
    # the same work, each compute action on the rank that owns its stage
    assert sorted(a for r in swapped.ranks for a in r) == sorted(a for r in base.ranks for a in r)
    for r, acts in enumerate(swapped.ranks):
        assert all(swapped.stage_to_rank[a.stage] == r for a in acts)
    assert check_schedule(swapped) == []
    lowered = add_communication(swapped)
    assert check_schedule(lowered) == []
    # a swapped microbatch's first forward on stage 1 sends to stage 0 (a non-default peer)
    sends = {(a.stage, a.microbatch): a.peer for r in lowered.ranks for a in r if a.op == Op.SEND_F}
    if swapped.stage_to_rank[0] != swapped.stage_to_rank[1]:
        assert sends[(1, 1)] == 0 and sends[(0, 1)] == perm[2]
    # 1F1B keeps its activation bound; the swapped pair shares the larger of its two limits
    before, after = peak_in_flight(base), peak_in_flight(swapped)
    for a, b in ((0, 1), (s - 2, s - 1)):
        ra, rb = base.stage_to_rank[a], base.stage_to_rank[b]
        before = tuple(max(before[ra], before[rb]) if r in (ra, rb) else x for r, x in enumerate(before))
    assert all(x <= y for x, y in zip(after, before)), (after, before)
    print(f"{name} S={stages} M={microbatches}: unit-cost step {makespan(base):g} -> {makespan(swapped):g}")


def test_refuses_lowered_custom_path_and_deadlocked_input():
    base = build_schedule("1f1b", 4, 4)
    with pytest.raises(ScheduleError, match="compute-only"):
        swap_edges(add_communication(base))
    with pytest.raises(ScheduleError, match="default path"):
        swap_edges(swap_edges(base))
    stuck = Schedule.from_rank_texts(["0B0 0F0", "1F0 1B0", "2F0 2B0", "3F0 3B0"])
    with pytest.raises(ScheduleError, match="deadlocks"):
        start_times(stuck)


def test_swap_is_not_slower_for_gpipe_and_four_stages():
    for name, s, m in (("gpipe", 6, 12), ("1f1b", 4, 8), ("gpipe", 8, 32)):
        base = build_schedule(name, s, m)
        assert makespan(swap_edges(base)) <= makespan(base) * 1.05
