"""Node paths in the IR: lowering, the SkipPipe validator rules with marked grids, CSV round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest

from spotpipe.schedule.ir import Op, Schedule, ScheduleError
from spotpipe.schedule.nodepaths import check_node_schedule, plan_schedule, validate_node_schedule
from spotpipe.schedule.passes import lower
from spotpipe.schedule.pathtime import PathCosts, play_paths
from spotpipe.schedule.skippipe import MicrobatchPath, SkipPlan, plan_paths
from spotpipe.schedule.validate import validate_schedule
from spotpipe.sim.skipplay import play_node_schedule


def _costs(n: int) -> PathCosts:
    return PathCosts(tuple(1.0 + 0.2 * i for i in range(n)),
                     tuple(tuple(0.0 if a == b else 0.3 + 0.1 * ((a + 2 * b) % 4) for b in range(n)) for a in range(n)),
                     gap_s=0.05)


def _hand_plan(groups: tuple[tuple[int, ...], ...], paths: list[MicrobatchPath], memory: int = 4) -> SkipPlan:
    costs = _costs(1 + max(n for g in groups for n in g))
    timing = play_paths([p.origin for p in paths], [p.nodes for p in paths], costs, memory)
    return SkipPlan("custom", groups, tuple(paths), len(paths[0].stages) + 1, timing)


def _messages(problems: list[object]) -> str:
    return "\n".join(str(p) for p in problems)


def test_planned_schedules_lower_validate_and_replay_the_planned_time() -> None:
    groups = ((0, 1), (2, 3), (4, 5), (6, 7))
    costs = _costs(8)
    for variant in ("full", "random", "skippipe"):
        plan = plan_paths(variant, groups, costs, microbatches=3, k=3, max_swaps=1, node_memory=2, seed=2, budget=150)
        schedule = lower(plan_schedule(plan))
        assert check_node_schedule(schedule, 2) == []
        validate_schedule(schedule, blocking_recv=False)
        played = play_node_schedule(schedule, costs, groups, [0.0, 0.0, 0.0, 100.0])
        assert played.pipeline_s == pytest.approx(plan.timing.makespan_s)
        # the last stage reduces after its own last backward, which ends by the pipeline's end
        assert 100.0 < played.iteration_s <= played.pipeline_s + 100.0 + 1e-9
        # every path is origin, its nodes, then the origin's head, on the origin's rank
        for m, p in enumerate(plan.paths):
            path = schedule.path(m)
            assert path[: len(p.nodes) + 1] == (p.origin, *p.nodes)
            assert schedule.stage_to_rank[path[-1]] == p.origin
        sends = sum(1 for acts in schedule.ranks for a in acts if a.op is Op.SEND_F)
        assert sends == sum(len(p.nodes) + 1 for p in plan.paths)


def test_csv_round_trip_keeps_the_chunk_stages() -> None:
    groups = ((0,), (1,), (2,))
    plan = _hand_plan(groups, [MicrobatchPath(0, (1, 2), (1, 2)), MicrobatchPath(0, (2, 1), (2, 1))])
    schedule = lower(plan_schedule(plan))
    again = Schedule.from_csv(schedule.to_csv())
    assert again.chunk_stage == schedule.chunk_stage == (0, 1, 2, 3)
    assert again.paths == schedule.paths and again.ranks == schedule.ranks


def test_validator_rejects_a_path_that_revisits_a_stage() -> None:
    groups = ((0,), (1, 2), (3,))
    plan = _hand_plan(groups, [MicrobatchPath(0, (1, 1), (1, 2))])
    schedule = lower(plan_schedule(plan))
    with pytest.raises(ScheduleError) as err:
        validate_node_schedule(schedule, 4)
    text = str(err.value)
    assert "the path of microbatch 0 visits model stage 1 twice" in text.splitlines()[0]
    assert "[0F0]" in text  # the grid marks the path's first action


def test_validator_rejects_a_path_that_does_not_return_to_its_origin() -> None:
    groups = ((0, 1), (2,), (3,))
    plan = _hand_plan(groups, [MicrobatchPath(0, (1, 2), (2, 3)), MicrobatchPath(1, (1, 2), (2, 3))])
    schedule = lower(plan_schedule(plan))
    paths = list(schedule.paths or ())
    paths[0] = (*paths[0][:-1], paths[1][-1])  # microbatch 0 ends at node 1's head
    problems = check_node_schedule(replace(schedule, paths=tuple(paths)), 4)
    assert "does not return to its origin rank 0: it ends at stage 5 on rank 1" in str(problems[0])
    assert problems[0].marks


def test_validator_rejects_unbalanced_visits() -> None:
    groups = ((0,), (1,), (2,))
    plan = _hand_plan(groups, [MicrobatchPath(0, (1, 2), (1, 2)), MicrobatchPath(0, (1,), (1,))])
    problems = check_node_schedule(lower(plan_schedule(plan)), 4)
    assert "unbalanced visits per non-first model stage (stage 1: 2, stage 2: 1)" in str(problems[0])
    assert problems[0].marks  # the extra visit's forward


def test_validator_rejects_a_node_over_its_memory() -> None:
    groups = ((0,), (1,), (2,))
    plan = _hand_plan(groups, [MicrobatchPath(0, (1,), (1,)), MicrobatchPath(0, (2,), (2,)),
                               MicrobatchPath(0, (1,), (1,)), MicrobatchPath(0, (2,), (2,))], memory=3)
    schedule = lower(plan_schedule(plan))
    assert check_node_schedule(schedule, 3) == []
    with pytest.raises(ScheduleError) as err:
        validate_node_schedule(schedule, 1)
    first = str(err.value).splitlines()[0]
    assert "holds 2 activations, over pipeline.node_memory = 1" in first
    assert "[" in str(err.value).split("\n", 2)[2]  # the grid with the marked forward


def test_validator_rejects_an_unmatched_send() -> None:
    groups = ((0,), (1,), (2,))
    plan = _hand_plan(groups, [MicrobatchPath(0, (1, 2), (1, 2))])
    schedule = lower(plan_schedule(plan))
    ranks = [list(r) for r in schedule.ranks]
    ranks[2] = [a for a in ranks[2] if a.op is not Op.RECV_F]  # node 2 never posts its receive
    problems = check_node_schedule(schedule.with_ranks(ranks), 4)
    assert any("has no matching" in str(p) and p.marks for p in problems), _messages(problems)
