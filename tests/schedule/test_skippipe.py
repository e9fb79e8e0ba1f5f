"""SkipPipe paths: the rules every variant keeps, known answers, the cost model, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spotpipe.errors import ConfigError
from spotpipe.network import read_matrix
from spotpipe.schedule.pathtime import PathCosts, play_paths
from spotpipe.schedule.skippipe import (
    VARIANTS,
    check_paths,
    check_sizes,
    inversions,
    path_stages,
    plan_paths,
    uniform_costs,
)

LINKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "gcp-12-locations" / "links.csv"
GROUPS_20 = ((0, 3, 4, 10, 11), (15, 8, 14), (1, 9, 6), (16, 12, 13), (5, 18, 7), (17, 2, 19))


def _uniform(n: int, hop: float = 0.5, forward: float = 1.0, gap: float = 0.0) -> PathCosts:
    return PathCosts(tuple([forward] * n), tuple(tuple(0.0 if a == b else hop for b in range(n)) for a in range(n)),
                     gap_s=gap)


def _gcp_costs() -> PathCosts:
    """20 nodes round-robin over the 12 locations, 32 MiB messages + 0.35 s, 1.76 s forward."""
    if not LINKS.is_file():
        pytest.skip(f"{LINKS} not present")
    matrix = read_matrix(LINKS)
    locs = [matrix.locations[i % len(matrix.locations)] for i in range(20)]
    nbytes = 4 * 1024 * 1024 * 8

    def hop(a: int, b: int) -> float:
        if locs[a] == locs[b]:
            return 0.001 + nbytes / 2**31 + 0.35
        return matrix.link(locs[a], locs[b]).send_s(nbytes) + 0.35

    return PathCosts(tuple([1.76] * 20), tuple(tuple(0.0 if a == b else hop(a, b) for b in range(20)) for a in range(20)))


def test_path_stages_from_the_skip_ratio() -> None:
    assert path_stages(6, 0.33) == 4
    assert path_stages(6, 0.0) == 6
    assert path_stages(8, 0.5) == 4
    with pytest.raises(ConfigError, match=r"pipeline.skip_ratio must be in \[0, 1\)"):
        path_stages(6, -0.2)


def test_inversions_count_adjacent_swaps() -> None:
    assert inversions((1, 2, 3)) == 0
    assert inversions((2, 1, 3)) == 1
    assert inversions((3, 2, 1)) == 3


def test_skip_ratio_zero_without_swaps_gives_the_full_pipeline_paths() -> None:
    groups = ((0, 1), (2, 3), (4, 5), (6, 7))
    for variant in VARIANTS:
        plan = plan_paths(variant, groups, _uniform(8), microbatches=4, k=4, max_swaps=0, node_memory=2, budget=200)
        assert len(plan.paths) == 8
        for p in plan.paths:
            assert p.stages == (1, 2, 3), (variant, p)
        assert check_paths(plan, 0) == []


def test_uniform_network_every_variant_balanced_and_valid() -> None:
    groups = ((0, 1, 2), (3, 4), (5, 6), (7, 8), (9, 10))
    for variant in VARIANTS:
        plan = plan_paths(variant, groups, _uniform(11), microbatches=4, k=3, max_swaps=1, node_memory=2, seed=1,
                          budget=300)
        visits = plan.stage_visits()
        assert visits[0] == 12
        assert len(set(visits[1:])) == 1, (variant, visits)
        assert check_paths(plan, 0 if variant == "full" else 1) == []
        expected_k = 5 if variant == "full" else 3
        assert all(len(p.stages) + 1 == expected_k for p in plan.paths)
        assert not math.isinf(plan.timing.makespan_s)


def test_plans_are_deterministic_for_a_seed() -> None:
    groups = ((0, 1, 2), (3, 4), (5, 6), (7, 8), (9, 10))
    costs = PathCosts(tuple(1.0 + 0.1 * i for i in range(11)),
                      tuple(tuple(0.0 if a == b else 0.2 + ((a * 7 + b * 3) % 5) * 0.3 for b in range(11)) for a in range(11)))
    for variant in ("random", "skippipe"):
        a = plan_paths(variant, groups, costs, microbatches=4, k=3, max_swaps=1, node_memory=2, seed=4, budget=300)
        b = plan_paths(variant, groups, costs, microbatches=4, k=3, max_swaps=1, node_memory=2, seed=4, budget=300)
        assert a.paths == b.paths and a.timing.makespan_s == b.timing.makespan_s


def test_gcp_skippipe_beats_random_and_full_on_the_reference_setting() -> None:
    costs = _gcp_costs()
    plans = {v: plan_paths(v, GROUPS_20, costs, microbatches=6, k=4, max_swaps=1, node_memory=3, seed=0, budget=600)
             for v in VARIANTS}
    times = {v: p.timing.makespan_s for v, p in plans.items()}
    assert times["skippipe"] < 0.95 * times["random"]
    assert times["skippipe"] < 0.6 * times["full"]
    plan = plans["skippipe"]
    assert check_paths(plan, 1) == []
    assert all(n not in GROUPS_20[0] for p in plan.paths for n in p.nodes)


def test_bad_settings_name_the_keys() -> None:
    groups = ((0, 1), (2,), (3,))
    with pytest.raises(ConfigError, match="k = 4 stages per path, but there are 3 stages"):
        check_sizes(groups, 2, 4, 1)
    check_sizes(groups, 1, 2, 1)  # 2 origins x 1 microbatch x 1 stage = 2 visits over 2 stages: fine
    with pytest.raises(ConfigError, match="cannot split evenly over the 2 non-first stages"):
        check_sizes(((0,), (1,), (2,)), 1, 2, 1)  # 1 visit over 2 stages: not
    with pytest.raises(ConfigError, match="pipeline.node_memory must be >= 1"):
        check_sizes(groups, 2, 2, 0)
    with pytest.raises(ConfigError, match=r"k = 1 stage per path \(stage 0 alone\).*skip_ratio <= 0.333"):
        check_sizes(groups, 2, 1, 1)
    with pytest.raises(ConfigError, match=r"stage 1 has 3 nodes \(pipeline.stage_nodes\[1\]\) but gets only 1 microbatch visit per"):
        check_sizes(((0, 1), (2, 3, 4), (5, 6, 7)), 1, 2, 1)  # 1 visit per stage cannot reach 3 nodes
    with pytest.raises(ConfigError, match="variant must be one of full, random, skippipe-nca, skippipe"):
        plan_paths("fastest", groups, _uniform(4), microbatches=2, k=2, max_swaps=0, node_memory=1)


# -- the cost model ------------------------------------------------------------------------------


def test_one_microbatch_alone_takes_its_isolated_round_trip() -> None:
    costs = PathCosts((1.0, 2.0, 3.0), ((0, 0.5, 0.7), (0.5, 0, 0.2), (0.7, 0.2, 0)), backward_ratio=1.5,
                      head_ratio=0.25, gap_s=0.1)
    timing = play_paths([0], [(1, 2)], costs, node_memory=1)
    # F 1+2+3, head 0.25, B 1.5+3+4.5, hops 0.5+0.2+0.7 there and back
    assert timing.makespan_s == pytest.approx(6 + 0.25 + 9 + 2 * 1.4)
    assert timing.makespan_s == pytest.approx(costs.isolated_s(0, (1, 2)))


def test_node_memory_holds_back_the_next_forward() -> None:
    costs = _uniform(2, hop=0.5)
    free = play_paths([0, 0], [(1,), (1,)], costs, node_memory=2)
    tight = play_paths([0, 0], [(1,), (1,)], costs, node_memory=1)
    first_done = tight.finish_s[0]
    second_forward = [t for t in tight.node_tasks[0] if t.microbatch == 1 and t.kind == "F"][0]
    assert second_forward.start >= first_done - 1e-9
    assert tight.makespan_s > free.makespan_s


def test_a_node_computes_one_microbatch_at_a_time() -> None:
    costs = _uniform(4, hop=0.3, gap=0.05)
    timing = play_paths([0, 1, 0, 1], [(2, 3), (2, 3), (3, 2), (3, 2)], costs, node_memory=4)
    for tasks in timing.node_tasks:
        ordered = sorted(tasks, key=lambda t: t.start)
        for a, b in zip(ordered, ordered[1:]):
            assert b.start >= a.end + 0.05 - 1e-9
    assert timing.makespan_s > costs.isolated_s(0, (2, 3))  # they collided


def test_random_plans_depend_on_the_seed_and_ignore_the_network() -> None:
    groups = ((0, 1, 2), (3, 4), (5, 6), (7, 8), (9, 10))
    costs = PathCosts(tuple(1.0 + 0.1 * i for i in range(11)),
                      tuple(tuple(0.0 if a == b else 0.2 + ((a * 7 + b * 3) % 5) * 0.3 for b in range(11)) for a in range(11)))
    plans = [plan_paths("random", groups, costs, microbatches=4, k=3, max_swaps=1, node_memory=2, seed=s, budget=100).paths
             for s in range(4)]
    assert len(set(plans)) > 1  # the seed picks among the many network-blind plans
    flat = uniform_costs(costs)
    assert set(flat.forward_s) == {sum(costs.forward_s) / 11}
    assert len({x for a, row in enumerate(flat.message_s) for b, x in enumerate(row) if a != b}) == 1
    # a network-blind plan is the same for any cluster with the same mean node and link
    same_mean = PathCosts(tuple(reversed(costs.forward_s)), costs.message_s)
    a = plan_paths("random", groups, costs, microbatches=4, k=3, max_swaps=1, node_memory=2, seed=1, budget=100)
    b = plan_paths("random", groups, same_mean, microbatches=4, k=3, max_swaps=1, node_memory=2, seed=1, budget=100)
    assert a.paths == b.paths  # same mean compute and links: the planner cannot tell them apart


def test_crossing_paths_with_one_slot_deadlock_and_the_planner_says_so() -> None:
    # two origins whose microbatches cross 2 -> 3 and 3 -> 2: with one activation slot per node
    # each holds what the other needs next
    costs = _uniform(4, hop=0.1)
    timing = play_paths([0, 1], [(2, 3), (3, 2)], costs, node_memory=1)
    assert math.isinf(timing.makespan_s) and "waits forever" in timing.stuck
    assert not math.isinf(play_paths([0, 1], [(2, 3), (3, 2)], costs, node_memory=2).makespan_s)
    # the planner never hands out a plan that deadlocks: it finishes, or says why none does
    outcomes = set()
    for variant in VARIANTS:
        for seed in range(4):
            try:
                plan = plan_paths(variant, ((0, 1, 2, 3), (4,), (5,)), _uniform(6, hop=0.1), microbatches=1, k=3,
                                  max_swaps=1, node_memory=1, seed=seed, budget=30)
            except ConfigError as exc:
                assert "every candidate deadlocks" in str(exc) and "pipeline.node_memory = 1" in str(exc)
                outcomes.add("refused")
            else:
                assert not math.isinf(plan.timing.makespan_s)
                outcomes.add("planned")
    assert "planned" in outcomes
