"""DT-FM placement: the objective's parts against brute force, known answers, determinism."""

from __future__ import annotations

import itertools
import random

import pytest

from spotpipe.errors import ConfigError
from spotpipe.schedule.placement import (
    PlacementProblem,
    count_partitions,
    held_karp,
    place_nodes,
    random_placement,
)


def _two_sites(per_site: tuple[int, int], near: float = 0.1, far: float = 5.0) -> tuple[list[list[float]], list[str]]:
    sites = ["A"] * per_site[0] + ["B"] * per_site[1]
    n = len(sites)
    return [[0.0 if i == j else (near if sites[i] == sites[j] else far) for j in range(n)] for i in range(n)], sites


def _random_matrix(n: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[0.0 if i == j else rng.uniform(0.1, 3.0) for j in range(n)] for i in range(n)]


def test_held_karp_matches_brute_force() -> None:
    rng = random.Random(3)
    for s in (2, 3, 5, 6):
        edge = [[rng.uniform(0, 10) for _ in range(s)] for _ in range(s)]
        cost, order = held_karp(edge)
        brute = min(
            sum(edge[a][b] for a, b in zip((0, *p), (*p, 0)))
            for p in itertools.permutations(range(1, s))
        )
        assert cost == pytest.approx(brute)
        assert order[0] == 0 and sorted(order) == list(range(s))
        assert sum(edge[a][b] for a, b in zip(order, (*order[1:], 0))) == pytest.approx(cost)


def test_bottleneck_matches_brute_force_over_injective_matchings() -> None:
    m = _random_matrix(9, 1)
    compute = [0.5 * i for i in range(9)]
    problem = PlacementProblem(m, compute, [3, 2, 4])
    for src, dst in (((0, 1, 2), (3, 4)), ((3, 4), (5, 6, 7, 8)), ((5, 6, 7), (0, 1, 2))):
        small, large = (src, dst) if len(src) <= len(dst) else (dst, src)
        best = min(
            max((compute[a] + m[a][b]) if small is src else (compute[b] + m[b][a]) for a, b in zip(small, image))
            for image in itertools.permutations(large, len(small))
        )
        assert problem.bottleneck(src, dst) == pytest.approx(best)


def test_two_far_sites_never_split_a_stage_when_avoidable() -> None:
    m, sites = _two_sites((3, 3))
    result = place_nodes(PlacementProblem(m, [1.0] * 6, [3, 3]))
    assert result.method == "exact"
    for group in result.groups:
        assert len({sites[n] for n in group}) == 1, result.groups
    # the local search finds the same on a larger case it cannot enumerate
    m, sites = _two_sites((8, 4))
    result = place_nodes(PlacementProblem(m, [1.0] * 12, [4, 4, 4]), seed=2, exact_limit=0, max_evaluations=3000)
    assert result.method == "local-search"
    for group in result.groups:
        assert len({sites[n] for n in group}) == 1, result.groups
    assert result.dp_cost == pytest.approx(0.1)


def test_exact_is_optimal_and_local_search_reaches_it_and_beats_random() -> None:
    m = _random_matrix(8, 7)
    problem = PlacementProblem(m, [1.0] * 8, [2, 2, 2, 2])
    exact = place_nodes(problem)
    assert exact.method == "exact" and exact.evaluations == count_partitions([2, 2, 2, 2]) == 2520 // 6  # 8!/(2!)^4, the last three groups unordered
    # every labelled partition scores at least the exact optimum
    for perm in itertools.islice(itertools.permutations(range(8)), 0, 40320, 97):
        groups = [perm[0:2], perm[2:4], perm[4:6], perm[6:8]]
        assert problem.score(groups)[0] >= exact.objective - 1e-9
    local = place_nodes(problem, seed=1, exact_limit=0, restarts=6, max_evaluations=3000)
    assert local.objective == pytest.approx(exact.objective)
    assert all(random_placement(problem, seed).objective >= exact.objective - 1e-9 for seed in range(20))
    assert exact.objective == pytest.approx(exact.dp_cost + 2 * exact.pp_cost)


def test_placement_is_deterministic_for_a_seed() -> None:
    problem = PlacementProblem(_random_matrix(14, 5), [1.0] * 14, [4, 2, 2, 2, 2, 2])
    a = place_nodes(problem, seed=3, exact_limit=0, max_evaluations=600)
    b = place_nodes(problem, seed=3, exact_limit=0, max_evaluations=600)
    assert a.groups == b.groups and a.objective == b.objective
    assert sorted(n for g in a.groups for n in g) == list(range(14))
    assert [len(g) for g in a.groups] == [4, 2, 2, 2, 2, 2]


def test_bad_sizes_name_the_key() -> None:
    m = _random_matrix(5, 0)
    with pytest.raises(ConfigError, match=r"pipeline.stage_nodes \[2, 2\] holds 4 nodes, but there are 5"):
        PlacementProblem(m, [1.0] * 5, [2, 2])
    with pytest.raises(ConfigError, match="pipeline.stage_nodes must list >= 1"):
        PlacementProblem(m, [1.0] * 5, [5, 0])


def test_unequal_stage_groups_keep_their_sizes_per_stage() -> None:
    """pipeline.stage_nodes is per stage: the tour may only swap groups of equal size."""
    import random as _random

    rng = _random.Random(3)
    n = 7
    message = [[0.0 if a == b else rng.uniform(0.01, 0.2) for b in range(n)] for a in range(n)]
    sizes = (2, 1, 2, 2)
    problem = PlacementProblem(message, [0.05] * n, sizes)
    exact = place_nodes(problem, exact_limit=10**6)
    search = place_nodes(problem, exact_limit=0, max_evaluations=300)
    assert tuple(map(len, exact.groups)) == sizes and tuple(map(len, search.groups)) == sizes
    edge = [[0.0, 1.0, 9.0], [9.0, 0.0, 1.0], [1.0, 9.0, 0.0]]
    assert held_karp(edge)[1] == (0, 1, 2)
    assert held_karp(edge, lambda position, j: j != position)[1] == (0, 2, 1)  # 1 may not sit at position 1
