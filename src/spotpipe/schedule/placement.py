"""Nodes to stages: the DT-FM placement objective and its search (exact, or local search).

N nodes are split into S stage groups of given sizes (SkipPipe's example: 20 nodes as
``[5, 3, 3, 3, 3, 3]``); the nodes of one group hold the same layers and all-reduce their
gradients, and group 0 holds the data, the embedding and the head. The objective is the one of
DT-FM (Yuan et al., "Decentralized Training of Foundation Models in Heterogeneous Environments",
NeurIPS 2022), as SkipPipe's scheduler evaluates it (Blagoev, Chen, Ersoy 2025, arXiv
2502.19913)::

    cost = DP + 2 x PP
    DP   = max over groups of the slowest message between two nodes of the group
    PP   = shortest closed tour 0 -> g1 -> ... -> g_{S-1} -> 0 over the groups, where the edge
           between two groups is their bottleneck matching: match every node of the smaller group
           to a distinct node of the larger one so that the largest (compute + message) time of a
           matched pair is least.

The tour gives the stage order; the groups come back in that order (``groups[0]`` is stage 0).
:func:`place_nodes` enumerates every partition when there are at most ``exact_limit`` of them and
otherwise runs a seeded local search (pairwise node swaps) with restarts, which replaces the
reference's genetic search. Pure Python, deterministic for a seed.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spotpipe.errors import ConfigError

PP_WEIGHT = 2.0  # DT-FM / SkipPipe: cost = DP + 2 x PP
EXACT_LIMIT = 20_000  # partitions enumerated exactly at most (about 10 s of pure Python)


@dataclass(frozen=True)
class NodePlacement:
    """Which nodes hold each stage, and what that costs.

    Attributes:
        groups: ``groups[s]`` lists the nodes of stage ``s`` (stage 0 first, then tour order).
        objective: ``dp_cost + 2 x pp_cost`` in seconds.
        dp_cost: Slowest intra-group message, seconds.
        pp_cost: Bottleneck-matching tour over the groups, seconds.
        method: ``exact``, ``local-search`` or ``random``.
        evaluations: Partitions scored.
        seconds: Wall time of the search.
    """

    groups: tuple[tuple[int, ...], ...]
    objective: float
    dp_cost: float
    pp_cost: float
    method: str
    evaluations: int
    seconds: float

    def stage_of(self) -> dict[int, int]:
        """Node -> stage."""
        return {n: s for s, g in enumerate(self.groups) for n in g}


class PlacementProblem:
    """The cost inputs of a placement: message times and compute times per node.

    Args:
        message_s: ``N x N`` seconds to send one microbatch's activation from node ``i`` to ``j``
            (latency + bytes / bandwidth + overhead; the diagonal is ignored).
        compute_s: ``N`` forward seconds of one microbatch on each node.
        group_sizes: Nodes per stage group; ``sum == N``, each ``>= 1``.

    Raises:
        ConfigError: sizes that do not add up to N, a non-square matrix, or a negative time.
    """

    def __init__(self, message_s: Sequence[Sequence[float]], compute_s: Sequence[float], group_sizes: Sequence[int]) -> None:
        n = len(message_s)
        if any(len(row) != n for row in message_s):
            raise ConfigError(f"placement: the message-time matrix must be {n} x {n}")
        if len(compute_s) != n:
            raise ConfigError(f"placement: {len(compute_s)} compute times for {n} nodes")
        if any(x < 0 or math.isnan(x) for row in message_s for x in row) or any(c < 0 for c in compute_s):
            raise ConfigError("placement: message and compute times must be >= 0")
        if not group_sizes or any(g < 1 for g in group_sizes):
            raise ConfigError(f"pipeline.stage_nodes must list >= 1 node per stage, got {list(group_sizes)}")
        if sum(group_sizes) != n:
            raise ConfigError(
                f"pipeline.stage_nodes {list(group_sizes)} holds {sum(group_sizes)} nodes, but there are {n} nodes: "
                "the stage groups must add up to the node count"
            )
        self.n = n
        self.message_s = [list(map(float, row)) for row in message_s]
        self.compute_s = [float(c) for c in compute_s]
        self.sizes = tuple(int(g) for g in group_sizes)
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}

    def dp_cost(self, group: Sequence[int]) -> float:
        """Slowest message between two nodes of one group (0 for a group of one).

        Args:
            group: Node ids of one stage group.

        Returns:
            Seconds (DT-FM's data-parallel cost of the group).
        """
        m = self.message_s
        return max((m[a][b] for a in group for b in group if a != b), default=0.0)

    def bottleneck(self, src: Sequence[int], dst: Sequence[int]) -> float:
        """Least possible largest ``compute_s[a] + message_s[a][b]`` over matchings that pair each
        node of the smaller group with a distinct node of the larger one (DT-FM's edge cost).

        Args:
            src: Node ids of one group.
            dst: Node ids of the next group on the tour.

        Returns:
            Seconds (cached per pair of sorted groups).
        """
        key = (tuple(sorted(src)), tuple(sorted(dst)))
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 500_000:
                self._cache.clear()
            hit = self._cache[key] = self._bottleneck(key[0], key[1])
        return hit

    def _bottleneck(self, src: Sequence[int], dst: Sequence[int]) -> float:
        edges = sorted({self.compute_s[a] + self.message_s[a][b] for a in src for b in dst})
        lo, hi = 0, len(edges) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if _saturates(src, dst, lambda a, b: self.compute_s[a] + self.message_s[a][b] <= edges[mid]):
                hi = mid
            else:
                lo = mid + 1
        return edges[lo]

    def tour(self, groups: Sequence[Sequence[int]]) -> tuple[float, tuple[int, ...]]:
        """Shortest closed tour from group 0 through all groups and back (Held-Karp), with
        bottleneck edges, each group at a stage of its size (``pipeline.stage_nodes`` is per
        stage: only groups of equal size trade places); returns (cost, group order starting with 0).

        Args:
            groups: Node ids per stage group.

        Returns:
            ``(cost in seconds, group order starting with 0)``.
        """
        s = len(groups)
        edge = [[0.0 if i == j else self.bottleneck(groups[i], groups[j]) for j in range(s)] for i in range(s)]
        return held_karp(edge, lambda position, j: len(groups[j]) == self.sizes[position])

    def score(self, groups: Sequence[Sequence[int]]) -> tuple[float, float, float, tuple[int, ...]]:
        """(objective, dp, pp, stage order) of a partition (``groups[0]`` is the stage-0 group).

        Args:
            groups: Node ids per stage group.

        Returns:
            ``(dp + PP_WEIGHT x pp, dp, pp, stage order)``, times in seconds (DT-FM objective).
        """
        dp = max(self.dp_cost(g) for g in groups)
        pp, order = self.tour(groups)
        return dp + PP_WEIGHT * pp, dp, pp, order


def _saturates(src: Sequence[int], dst: Sequence[int], ok: Callable[[int, int], bool]) -> bool:
    """True when every node of the smaller side can be matched over ``ok`` edges (Kuhn's
    augmenting paths)."""
    left, right = (src, dst) if len(src) <= len(dst) else (dst, src)
    flip = left is not src
    owner: dict[int, int] = {}

    def edge(a: int, b: int) -> bool:
        return ok(b, a) if flip else ok(a, b)

    def augment(a: int, seen: set[int]) -> bool:
        for b in right:
            if b in seen or not edge(a, b):
                continue
            seen.add(b)
            if b not in owner or augment(owner[b], seen):
                owner[b] = a
                return True
        return False

    return all(augment(a, set()) for a in left)


def held_karp(edge: Sequence[Sequence[float]],
              fits: Callable[[int, int], bool] | None = None) -> tuple[float, tuple[int, ...]]:
    """Shortest closed tour through ``0..S-1`` starting and ending at 0 (Held and Karp 1962).

    Args:
        edge: ``S x S`` directed edge costs.
        fits: ``fits(position, j)``: whether ``j`` may be the ``position``-th visited (1-based
            after 0); None: anywhere. The identity order must fit.

    Returns:
        (tour cost, visiting order starting with 0).
    """
    s = len(edge)
    if s == 1:
        return 0.0, (0,)

    def step(i: int, j: int, position: int) -> float:
        return edge[i][j] if fits is None or fits(position, j) else math.inf

    best: dict[tuple[int, int], tuple[float, int]] = {}
    for j in range(1, s):
        best[(1 << j, j)] = (step(0, j, 1), 0)
    for size in range(2, s):
        for subset in itertools.combinations(range(1, s), size):
            mask = sum(1 << j for j in subset)
            for j in subset:
                prev_mask = mask & ~(1 << j)
                best[(mask, j)] = min((best[(prev_mask, i)][0] + step(i, j, size), i) for i in subset if i != j)
    full = sum(1 << j for j in range(1, s))
    cost, last = min((best[(full, j)][0] + edge[j][0], j) for j in range(1, s))
    order = [last]
    mask = full
    while len(order) < s - 1:
        prev = best[(mask, order[-1])][1]
        mask &= ~(1 << order[-1])
        order.append(prev)
    return cost, (0, *reversed(order))


def count_partitions(sizes: Sequence[int]) -> int:
    """Distinct partitions the exact search scores: the multinomial over the group sizes, divided
    by the orderings of equal-sized non-first groups (their order is the tour's job).

    Args:
        sizes: Nodes per stage group.

    Returns:
        The count, an exact int.
    """
    total = math.factorial(sum(sizes))
    for g in sizes:
        total //= math.factorial(g)
    for _size, same in itertools.groupby(sorted(sizes[1:])):
        total //= math.factorial(len(list(same)))
    return total


def _partitions(nodes: list[int], sizes: Sequence[int]) -> list[list[tuple[int, ...]]]:
    """Every partition of ``nodes`` into groups of ``sizes`` (group 0 labelled; equal-sized later
    groups unordered: each such group's smallest node exceeds the previous one's)."""
    out: list[list[tuple[int, ...]]] = []

    def rec(rest: list[int], i: int, acc: list[tuple[int, ...]]) -> None:
        if i == len(sizes):
            out.append(list(acc))
            return
        for combo in itertools.combinations(rest, sizes[i]):
            if i >= 2 and sizes[i] == sizes[i - 1] and combo[0] < acc[-1][0]:
                continue
            left = [x for x in rest if x not in combo]
            acc.append(combo)
            rec(left, i + 1, acc)
            acc.pop()

    rec(nodes, 0, [])
    return out


def _result(problem: PlacementProblem, groups: Sequence[Sequence[int]], method: str, evals: int, t0: float) -> NodePlacement:
    obj, dp, pp, order = problem.score(groups)
    ordered = tuple(tuple(sorted(groups[g])) for g in order)
    return NodePlacement(ordered, obj, dp, pp, method, evals, time.perf_counter() - t0)


def random_placement(problem: PlacementProblem, seed: int = 0) -> NodePlacement:
    """A random partition in random stage order (the baseline the search is compared with).

    Args:
        problem: The placement's costs and group sizes.
        seed: Seed of the shuffle.

    Returns:
        A :class:`NodePlacement` (method ``random``) scored on the random ring order.
    """
    t0 = time.perf_counter()
    rng = random.Random(seed)
    nodes = list(range(problem.n))
    rng.shuffle(nodes)
    groups = _cut(nodes, problem.sizes)
    obj = max(problem.dp_cost(g) for g in groups)
    pp = sum(problem.bottleneck(groups[i], groups[(i + 1) % len(groups)]) for i in range(len(groups)))
    dp = obj
    return NodePlacement(tuple(tuple(sorted(g)) for g in groups), dp + PP_WEIGHT * pp, dp, pp, "random", 1,
                         time.perf_counter() - t0)


def _cut(nodes: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    at = 0
    for g in sizes:
        out.append(list(nodes[at:at + g]))
        at += g
    return out


def place_nodes(
    problem: PlacementProblem,
    seed: int = 0,
    *,
    exact_limit: int = EXACT_LIMIT,
    restarts: int = 8,
    max_evaluations: int = 4000,
    progress: Callable[[int, int], None] | None = None,
) -> NodePlacement:
    """The placement of least DT-FM cost found (see the module docstring for the objective).

    Exact (every partition, every tour) when :func:`count_partitions` is at most
    ``exact_limit``; otherwise ``restarts`` seeded local searches, each from a random partition
    (the first from the nodes in index order), moving to the first improving swap of two nodes in
    different groups, until no swap of a sampled neighbourhood improves or the evaluation budget
    is spent. The budget is counted in scored partitions, not seconds, so a seed gives one answer.

    Args:
        problem: Message and compute times, group sizes.
        seed: Seed of the restarts and of the swap order.
        exact_limit: Most partitions to enumerate.
        restarts: Local searches.
        max_evaluations: Partitions scored in all local searches together.
        progress: Called with (evaluations done, budget).

    Returns:
        The best :class:`NodePlacement` (groups in stage order).
    """
    t0 = time.perf_counter()
    if count_partitions(problem.sizes) <= exact_limit:
        best: tuple[float, list[tuple[int, ...]]] | None = None
        parts = _partitions(list(range(problem.n)), problem.sizes)
        for i, groups in enumerate(parts):
            obj = problem.score(groups)[0]
            if best is None or obj < best[0] - 1e-12:
                best = (obj, groups)
            if progress is not None and i % 256 == 0:
                progress(i, len(parts))
        assert best is not None
        return _result(problem, best[1], "exact", len(parts), t0)
    rng = random.Random(seed)
    evals = 0
    best_obj = math.inf
    best_groups: list[list[int]] = _cut(list(range(problem.n)), problem.sizes)
    per_restart = max(1, max_evaluations // max(1, restarts))
    for restart in range(max(1, restarts)):
        nodes = list(range(problem.n))
        if restart > 0:
            rng.shuffle(nodes)
        cur = _cut(nodes, problem.sizes)
        current = problem.score(cur)[0]
        evals += 1
        budget = per_restart
        improved = True
        while improved and budget > 0:
            improved = False
            pairs = [(a, b) for a in range(problem.n) for b in range(a + 1, problem.n)]
            rng.shuffle(pairs)
            where = {n: gi for gi, g in enumerate(cur) for n in g}
            for a, b in pairs:
                ga, gb = where[a], where[b]
                if ga == gb:
                    continue
                if budget <= 0:
                    break
                trial = [list(g) for g in cur]
                trial[ga][trial[ga].index(a)] = b
                trial[gb][trial[gb].index(b)] = a
                obj = problem.score(trial)[0]
                evals += 1
                budget -= 1
                if progress is not None and evals % 64 == 0:
                    progress(evals, max_evaluations)
                if obj < current - 1e-12:
                    cur, current, improved = trial, obj, True
                    break
        if current < best_obj - 1e-12:
            best_obj, best_groups = current, cur
    return _result(problem, best_groups, "local-search", evals, t0)
