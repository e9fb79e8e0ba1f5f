"""SkipPipe paths: partial, reordered, collision-aware microbatch paths over nodes.

SkipPipe (Blagoev, Chen, Ersoy 2025, "SkipPipe: Partial and Reordered Pipelining Framework for
Training LLMs in Heterogeneous Networks", arXiv 2502.19913) lets each microbatch visit only
``k`` of the ``S`` stages (skip ratio ``1 - k/S``), sometimes with two adjacent stages swapped,
on nodes chosen with every link in view. The rules a plan obeys (checked by :func:`check_paths`):

* every path starts at a stage-0 node (its origin) and ends there (head and loss), visits
  exactly ``k`` stages counting stage 0, each at most once, and no other stage-0 node;
* its stage order has at most ``max_swaps`` inversions (= adjacent swaps away from ascending);
* every non-first stage gets the same number of visits per iteration (equal training signal,
  the paper's TC1); the visits of a stage spread over its nodes round-robin by path, and every
  search move keeps each node's count;
* no node holds more than ``node_memory`` activations at once (the players enforce it by
  waiting; the search prefers plans that do not wait).

Variants, on the same placement: ``full`` (DT-FM full pipelines: every stage in order, nodes
chosen network-aware), ``random`` (the same constraints and search, blind to the network: every
node and link looks alike), ``skippipe-nca``
(network-aware: least sum of each microbatch's round trip alone, collisions ignored) and
``skippipe`` (the nca plan improved by a local search whose objective is the simulated iteration
time of :func:`spotpipe.schedule.pathtime.play_paths`, collisions included; the paper uses
conflict-based search over time-windowed A*). All moves keep stage and node visit counts, so
every candidate satisfies the balance rule. Searches are budgeted in evaluations, so a seed gives
one plan.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

from spotpipe.errors import ConfigError
from spotpipe.schedule.pathtime import PathCosts, PathTiming, play_paths

Variant = Literal["full", "random", "skippipe-nca", "skippipe"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
ANNEAL_FRACTION = 0.01  # starting temperature of the simulated search, as a share of the first plan's time


@dataclass(frozen=True)
class MicrobatchPath:
    """One microbatch: its origin, the non-first stages it visits in order, and their nodes."""

    origin: int
    stages: tuple[int, ...]
    nodes: tuple[int, ...]


@dataclass(frozen=True)
class SkipPlan:
    """Paths of every microbatch of one iteration.

    Attributes:
        variant: One of :data:`VARIANTS`.
        groups: Nodes per stage (stage 0 first), from the placement.
        paths: Microbatch ``j``'s path; microbatches of one origin are in injection order.
        k: Stages each path visits, stage 0 included.
        timing: The played plan (makespan, per-node order).
        evaluations: Candidate plans scored by the search.
        seconds: Wall time of the search.
    """

    variant: str
    groups: tuple[tuple[int, ...], ...]
    paths: tuple[MicrobatchPath, ...]
    k: int
    timing: PathTiming
    evaluations: int = 0
    seconds: float = 0.0

    def stage_visits(self) -> list[int]:
        """Visits per stage (stage 0: one per microbatch)."""
        counts = [0] * len(self.groups)
        for p in self.paths:
            counts[0] += 1
            for s in p.stages:
                counts[s] += 1
        return counts

    def node_visits(self) -> dict[int, int]:
        """Microbatches per node over the iteration (origins count their own)."""
        counts = {n: 0 for g in self.groups for n in g}
        for p in self.paths:
            counts[p.origin] += 1
            for n in p.nodes:
                counts[n] += 1
        return counts


def path_stages(num_stages: int, skip_ratio: float) -> int:
    """``k``, the stages each path visits: ``S - round(skip_ratio x S)``, at least 1.

    Args:
        num_stages: Stages S.
        skip_ratio: ``pipeline.skip_ratio``, in [0, 1).

    Returns:
        ``k``, in ``[1, S]``.

    Raises:
        ConfigError: naming ``pipeline.skip_ratio`` when it is outside [0, 1).
    """
    if not 0 <= skip_ratio < 1:
        raise ConfigError(f"pipeline.skip_ratio must be in [0, 1), got {skip_ratio}")
    return max(1, num_stages - round(skip_ratio * num_stages))


def inversions(stages: Sequence[int]) -> int:
    """Adjacent swaps between ``stages`` and their ascending order (its inversion count).

    Args:
        stages: Stage indices in path order.

    Returns:
        Pairs ``i < j`` with ``stages[i] > stages[j]``.
    """
    return sum(1 for i in range(len(stages)) for j in range(i + 1, len(stages)) if stages[i] > stages[j])


def check_sizes(groups: Sequence[Sequence[int]], microbatches: int, k: int, node_memory: int) -> None:
    """Reject settings no plan can meet, naming the keys.

    Args:
        groups: Node ids per stage group.
        microbatches: Microbatches per stage-0 node.
        k: Stages per path, stage 0 included.
        node_memory: Most microbatch activations a node may hold.

    Raises:
        ConfigError: ``k > S``, fewer than 1 microbatch or memory slot, or visit counts that cannot
            be balanced (``stage-0 nodes x microbatches x (k - 1)`` not a multiple of ``S - 1``).
    """
    s = len(groups)
    if k > s:
        raise ConfigError(f"pipeline.skip_ratio leaves k = {k} stages per path, but there are {s} stages (allowed: 1..{s})")
    if microbatches < 1:
        raise ConfigError(f"pipeline.microbatches must be >= 1, got {microbatches}")
    if node_memory < 1:
        raise ConfigError(f"pipeline.node_memory must be >= 1, got {node_memory}")
    if s > 1 and k < 2:
        raise ConfigError(
            f"pipeline.skip_ratio leaves k = {k} stage per path (stage 0 alone): no other stage would train; "
            f"with {s} stages use pipeline.skip_ratio <= {(s - 2) / s:.3f} (k >= 2)"
        )
    total = len(groups[0]) * microbatches
    if s > 1 and (total * (k - 1)) % (s - 1) != 0:
        raise ConfigError(
            f"{len(groups[0])} stage-0 nodes x pipeline.microbatches {microbatches} x {k - 1} visited stages = "
            f"{total * (k - 1)} visits cannot split evenly over the {s - 1} non-first stages; choose "
            "pipeline.microbatches or pipeline.skip_ratio so that it divides"
        )
    per_stage = total * (k - 1) // (s - 1) if s > 1 else total
    for i, group in enumerate(groups[1:], start=1):
        if per_stage < len(group):
            raise ConfigError(
                f"stage {i} has {len(group)} nodes (pipeline.stage_nodes[{i}]) but gets only {per_stage} microbatch "
                f"visit{'s' if per_stage != 1 else ''} per iteration, so a node would hold nothing; raise pipeline.microbatches or lower "
                "pipeline.skip_ratio, or give the stage fewer nodes"
            )


def _initial(groups: Sequence[Sequence[int]], agents: int, k: int) -> list[MicrobatchPath]:
    """A balanced plan of ``agents`` paths per origin: agent ``j`` (interleaved over origins)
    visits the ``k - 1`` stages after position ``j (k - 1)`` of the cyclic order 1..S-1, in
    ascending order; the ``r``-th visit of stage ``s`` goes to its ``r mod |group|``-th node."""
    s = len(groups)
    origins = groups[0]
    per_stage = [0] * s
    out: list[MicrobatchPath | None] = [None] * (len(origins) * agents)
    j = 0
    for a in range(agents):
        for oi, origin in enumerate(origins):
            stages = tuple(sorted(((j * (k - 1) + i) % (s - 1)) + 1 for i in range(k - 1))) if s > 1 else ()
            nodes = []
            for st in stages:
                nodes.append(groups[st][per_stage[st] % len(groups[st])])
                per_stage[st] += 1
            out[oi * agents + a] = MicrobatchPath(origin, stages, tuple(nodes))
            j += 1
    return [p for p in out if p is not None]


def agent_counts(groups: Sequence[Sequence[int]], microbatches: int, k: int) -> list[int]:
    """Paths per origin the search may use (SkipPipe's coarsening: the microbatches of an origin
    share ``c`` distinct paths, taken in turn): the divisors ``c`` of ``microbatches`` for which
    ``stage-0 nodes x c x (k - 1)`` visits split evenly over the non-first stages.

    Args:
        groups: Node ids per stage group.
        microbatches: Microbatches per origin.
        k: Stages per path, stage 0 included.

    Returns:
        The allowed ``c``, increasing (SkipPipe: Blagoev, Chen, Ersoy 2025).
    """
    s = len(groups)
    return [c for c in range(1, microbatches + 1)
            if microbatches % c == 0 and (s == 1 or (len(groups[0]) * c * (k - 1)) % (s - 1) == 0)]


def expand(agents: Sequence[MicrobatchPath], origins: Sequence[int], microbatches: int) -> list[MicrobatchPath]:
    """Microbatch paths from agent paths: microbatch ``q`` of an origin takes its agent ``q mod c``.

    Args:
        agents: Agent paths; an origin's agents are in turn order.
        origins: Stage-0 nodes, in microbatch order.
        microbatches: Microbatches per origin.

    Returns:
        ``len(origins) x microbatches`` paths, origin by origin.

    Raises:
        KeyError: for an origin without an agent path.
    """
    per_origin: dict[int, list[MicrobatchPath]] = {}
    for a in agents:
        per_origin.setdefault(a.origin, []).append(a)
    out: list[MicrobatchPath] = []
    for o in origins:
        mine = per_origin[o]
        out.extend(mine[q % len(mine)] for q in range(microbatches))
    return out


class _Search:
    """Balance-preserving random moves over a plan (see the module docstring)."""

    def __init__(self, groups: Sequence[Sequence[int]], max_swaps: int, rng: random.Random) -> None:
        self.max_swaps = max_swaps
        self.rng = rng

    def move(self, plan: list[MicrobatchPath]) -> tuple[int, int, MicrobatchPath, MicrobatchPath] | None:
        """A random neighbour: (i, j, new path i, new path j), or None when the draw is invalid."""
        rng = self.rng
        i, j = rng.randrange(len(plan)), rng.randrange(len(plan))
        a, b = plan[i], plan[j]
        kind = rng.randrange(4)
        if kind == 0 and a.stages:  # reorder: swap two adjacent stages of one path
            if len(a.stages) < 2:
                return None
            p = rng.randrange(len(a.stages) - 1)
            st, nd = list(a.stages), list(a.nodes)
            st[p], st[p + 1] = st[p + 1], st[p]
            nd[p], nd[p + 1] = nd[p + 1], nd[p]
            if inversions(st) > self.max_swaps:
                return None
            return i, i, MicrobatchPath(a.origin, tuple(st), tuple(nd)), MicrobatchPath(a.origin, tuple(st), tuple(nd))
        if i == j:
            return None
        if kind == 1:  # exchange the nodes of one stage both visit
            common = [s for s in a.stages if s in b.stages]
            if not common:
                return None
            s = rng.choice(common)
            pa, pb = a.stages.index(s), b.stages.index(s)
            if a.nodes[pa] == b.nodes[pb]:
                return None
            na, nb = list(a.nodes), list(b.nodes)
            na[pa], nb[pb] = b.nodes[pb], a.nodes[pa]
            return i, j, replace(a, nodes=tuple(na)), replace(b, nodes=tuple(nb))
        if kind == 2:  # a visits s, b visits t instead: trade them (with their nodes)
            only_a = [s for s in a.stages if s not in b.stages]
            only_b = [t for t in b.stages if t not in a.stages]
            if not only_a or not only_b:
                return None
            s, t = rng.choice(only_a), rng.choice(only_b)
            pa, pb = a.stages.index(s), b.stages.index(t)
            sa, na, sb, nb = list(a.stages), list(a.nodes), list(b.stages), list(b.nodes)
            sa[pa], sb[pb] = t, s
            na[pa], nb[pb] = b.nodes[pb], a.nodes[pa]
            if inversions(sa) > self.max_swaps or inversions(sb) > self.max_swaps:
                return None
            return i, j, MicrobatchPath(a.origin, tuple(sa), tuple(na)), MicrobatchPath(b.origin, tuple(sb), tuple(nb))
        # exchange whole paths (stages and nodes) between two microbatches
        if a.stages == b.stages and a.nodes == b.nodes:
            return None
        return i, j, MicrobatchPath(a.origin, b.stages, b.nodes), MicrobatchPath(b.origin, a.stages, a.nodes)


def _improve(
    plan: list[MicrobatchPath],
    score: Callable[[list[MicrobatchPath]], float],
    search: _Search,
    budget: int,
    temperature: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[MicrobatchPath], float, int]:
    """Random-move local search: equal scores are accepted (plateaus are crossed); with
    ``temperature`` > 0, simulated annealing (Kirkpatrick et al. 1983): a worse plan is accepted
    with probability ``exp(-increase / T)``, ``T`` falling linearly from ``temperature`` to 0.
    Returns the best plan seen, its score and the plans scored."""
    current = score(plan)
    best, best_score = list(plan), current
    evals = 1
    rng = search.rng
    for it in range(budget):
        mv = search.move(plan)
        if mv is None:
            continue
        i, j, pi, pj = mv
        old_i, old_j = plan[i], plan[j]
        plan[i], plan[j] = pi, pj
        new = score(plan)
        evals += 1
        t = temperature * (1.0 - it / budget)
        if new <= current or (t > 0 and not math.isinf(new) and rng.random() < math.exp((current - new) / t)):
            current = new
            if new < best_score:
                best, best_score = list(plan), new
        else:
            plan[i], plan[j] = old_i, old_j
        if progress is not None and it % 50 == 0:
            progress(it)
    return best, best_score, evals


def _play(plan: Sequence[MicrobatchPath], costs: PathCosts, node_memory: int) -> PathTiming:
    return play_paths([p.origin for p in plan], [p.nodes for p in plan], costs, node_memory)


def _sim_score(costs: PathCosts, node_memory: int) -> Callable[[list[MicrobatchPath]], float]:
    def score(plan: list[MicrobatchPath]) -> float:
        t = _play(plan, costs, node_memory)
        if math.isinf(t.makespan_s):
            return math.inf
        # makespan first; the mean finish breaks ties so the search can move on plateaus
        return t.makespan_s + 1e-3 * sum(t.finish_s) / max(1, len(t.finish_s))
    return score


def plan_paths(
    variant: str,
    groups: Sequence[Sequence[int]],
    costs: PathCosts,
    *,
    microbatches: int,
    k: int,
    max_swaps: int,
    node_memory: int,
    seed: int = 0,
    budget: int = 3000,
    progress: Callable[[int, int], None] | None = None,
) -> SkipPlan:
    """Paths of one variant (see the module docstring).

    The searches work on *agents*, paths shared by ``microbatches / c`` microbatches of one
    origin (as SkipPipe's code coarsens its agents), for every admissible ``c`` (:func:`agent_counts`), and
    keep the best: ``full`` and ``skippipe`` by simulated iteration time, ``skippipe-nca`` by the
    sum of isolated round trips (collisions ignored). ``random`` runs the ``skippipe`` search on
    :func:`uniform_costs` (half the budget): balanced and collision-aware as far as a network-blind
    planner can be, like SkipPipe's own random baseline (its conflict-based search on a unit-cost
    graph); among the many plans equal to it, the seed picks one.

    Args:
        variant: ``full``, ``random``, ``skippipe-nca`` or ``skippipe``.
        groups: Nodes per stage, stage 0 first (:class:`~spotpipe.schedule.placement.NodePlacement`).
        costs: Compute and hand-off seconds per node (:class:`~spotpipe.schedule.pathtime.PathCosts`).
        microbatches: Microbatches per stage-0 node per iteration.
        k: Stages per path, stage 0 included (``full`` uses all ``S``).
        max_swaps: Most adjacent swaps per path (``full`` uses 0).
        node_memory: Most activations a node holds at once.
        seed: Seed of every random choice.
        budget: Simulated plans the ``skippipe`` search scores in all (the static searches try
            10 x this many moves on their cheap objective).
        progress: Called with (plans scored, budget) during the simulated search.

    Returns:
        The :class:`SkipPlan`, played with :func:`~spotpipe.schedule.pathtime.play_paths`.

    Raises:
        ConfigError: an unknown variant, settings no plan can meet (:func:`check_sizes`), or no
            candidate that finishes within ``node_memory`` (all deadlock).
    """
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    t0 = time.perf_counter()
    if variant == "full":
        k, max_swaps = len(groups), 0
    check_sizes(groups, microbatches, k, node_memory)
    rng = random.Random(seed)
    search = _Search(groups, max_swaps, rng)
    origins = list(groups[0])
    # random: the same search, blind to the network (every node and link the mean one)
    seen = uniform_costs(costs) if variant == "random" else costs
    sim = _sim_score(seen, node_memory)
    sim_budget = budget // 2 if variant == "random" else budget

    def shuffle(p: list[MicrobatchPath]) -> list[MicrobatchPath]:
        """A random walk of balance-keeping moves (every move accepted; ``p`` is changed in place)."""
        _improve(p, lambda _p: 0.0, search, 20 * len(p))
        return p

    def isolated(p: list[MicrobatchPath]) -> float:
        return sum(seen.isolated_s(x.origin, x.nodes) for x in p)

    counts = agent_counts(groups, microbatches, k)
    evals = 0
    best: tuple[float, list[MicrobatchPath]] | None = None
    stuck = ""
    done = 0
    for c in counts:
        agents = shuffle(_initial(groups, c, k))
        agents, static, more = _improve(agents, isolated, search, 10 * budget // len(counts))
        evals += more
        if variant in ("skippipe", "random"):
            def expanded(a: list[MicrobatchPath]) -> float:
                return sim(expand(a, origins, microbatches))
            base, share = done, sim_budget // len(counts)
            agents, _, more = _improve(
                agents, expanded, search, share, temperature=ANNEAL_FRACTION * expanded(agents),
                progress=None if progress is None else (lambda i: progress(base + i, sim_budget)))
            evals += more
            done += share
        plan = expand(agents, origins, microbatches)
        played = _play(plan, costs, node_memory)
        if math.isinf(played.makespan_s) and variant == "skippipe-nca":
            # collisions are ignored, but a plan that deadlocks is no plan: walk until one finishes
            def finishes(a: list[MicrobatchPath]) -> float:
                return 0.0 if not math.isinf(_play(expand(a, origins, microbatches), costs, node_memory).makespan_s) else 1.0
            agents, _, more = _improve(agents, finishes, search, max(1, budget // len(counts)))
            evals += more
            plan = expand(agents, origins, microbatches)
            played = _play(plan, costs, node_memory)
            static = isolated(agents)
        if math.isinf(played.makespan_s):  # nodes would wait on each other's memory forever
            stuck = played.stuck
            continue
        key = static / len(agents) if variant == "skippipe-nca" else sim(plan)
        if best is None or key < best[0] - 1e-9 or (variant == "skippipe-nca" and key <= best[0] + 1e-9):
            best = (key, plan)
    if best is None:
        raise ConfigError(
            f"no {variant} plan fits pipeline.node_memory = {node_memory}: every candidate deadlocks ({stuck}); "
            "raise pipeline.node_memory or lower pipeline.max_swaps"
        )
    plan = best[1]
    timing = _play(plan, costs, node_memory)
    return SkipPlan(variant, tuple(tuple(g) for g in groups), tuple(plan), k, timing, evals, time.perf_counter() - t0)


def uniform_costs(costs: PathCosts) -> PathCosts:
    """The same cluster seen without its network: every node the mean compute time, every link
    the mean message time (what a network-oblivious planner assumes).

    Args:
        costs: The real per-node and per-link seconds.

    Returns:
        A :class:`PathCosts` with the same ratios and gap, all nodes and links equal.
    """
    n = costs.num_nodes
    fwd = sum(costs.forward_s) / n
    pairs = [costs.message_s[a][b] for a in range(n) for b in range(n) if a != b]
    hop = sum(pairs) / len(pairs) if pairs else 0.0
    return PathCosts(tuple([fwd] * n), tuple(tuple(0.0 if a == b else hop for b in range(n)) for a in range(n)),
                     costs.backward_ratio, costs.head_ratio, costs.gap_s)


def check_paths(plan: SkipPlan, max_swaps: int) -> list[str]:
    """Every broken path rule of ``plan`` (empty when it is valid), one line each.

    Args:
        plan: The plan.
        max_swaps: Most inversions a path's stage order may have (``pipeline.max_swaps``).

    Returns:
        One message per broken rule, naming the microbatch and its origin.
    """
    out: list[str] = []
    stage_of = {n: s for s, g in enumerate(plan.groups) for n in g}
    for j, p in enumerate(plan.paths):
        where = f"microbatch {j} (origin node {p.origin})"
        if stage_of.get(p.origin) != 0:
            out.append(f"{where}: the origin is not a stage-0 node")
        if len(p.stages) != len(p.nodes):
            out.append(f"{where}: {len(p.stages)} stages but {len(p.nodes)} nodes")
            continue
        if len(set(p.stages)) != len(p.stages) or 0 in p.stages:
            out.append(f"{where}: visits a stage twice: stages 0 {' '.join(map(str, p.stages))}")
        if len(p.stages) + 1 != plan.k:
            out.append(f"{where}: visits {len(p.stages) + 1} stages, k = {plan.k}")
        for s, n in zip(p.stages, p.nodes):
            if stage_of.get(n) != s:
                out.append(f"{where}: node {n} does not hold stage {s}")
        if inversions(p.stages) > max_swaps:
            out.append(f"{where}: {inversions(p.stages)} swaps, pipeline.max_swaps = {max_swaps}")
    visits = plan.stage_visits()[1:]
    if visits and len(set(visits)) > 1:
        out.append(f"unbalanced visits per non-first stage: {visits}")
    return out
