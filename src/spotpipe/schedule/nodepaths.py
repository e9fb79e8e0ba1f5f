"""Per-microbatch node paths in the schedule IR, and the SkipPipe invariants the validator adds.

A SkipPipe plan (:mod:`spotpipe.schedule.skippipe`) names nodes, not a (stage, replica) grid. In
the IR every node is one rank, and every node's copy of its model stage is one schedule stage:
schedule stage ``n`` is node ``n``'s chunk, and schedule stage ``N + i`` is the head (final
norm, LM head and loss) of the ``i``-th stage-0 node, on that node's rank. A microbatch's path is
``origin, n1, ..., n_{k-1}, head(origin)``, so the existing lowering
(:func:`spotpipe.schedule.passes.lower`) adds the sends and receives of every hop, the return to
the origin included, and the existing validator and player check matching and deadlocks.
``Schedule.chunk_stage`` says which model stage each schedule stage holds (``S`` = the head).

:func:`check_node_schedule` adds the rules of SkipPipe (Blagoev, Chen, Ersoy 2025, arXiv
2502.19913): a path visits a model stage at most once and returns to its origin; every
non-first stage gets the same number of visits; no node holds more than ``node_memory``
activations (walking its action list: a chunk forward adds one, its backward frees one). Each
problem marks its actions on the rank x step grid (:func:`spotpipe.schedule.validate.format_problem`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError
from spotpipe.schedule.pathtime import FORWARD, HEAD
from spotpipe.schedule.skippipe import SkipPlan
from spotpipe.schedule.validate import Position, Problem, check_schedule, format_problem


def head_stage(num_nodes: int, groups: Sequence[Sequence[int]], origin: int) -> int:
    """Schedule stage of the head that ``origin`` (a stage-0 node) runs.

    Args:
        num_nodes: Nodes N (schedule stages ``0..N-1`` are the nodes' stages).
        groups: Node ids per stage group; ``groups[0]`` are the stage-0 nodes.
        origin: A node of ``groups[0]``.

    Returns:
        ``N + position of origin in groups[0]``.

    Raises:
        ValueError: if ``origin`` is not in ``groups[0]``.
    """
    return num_nodes + list(groups[0]).index(origin)


def plan_schedule(plan: SkipPlan, num_nodes: int | None = None,
                  placement: Sequence[Sequence[int]] | None = None) -> Schedule:
    """The compute-only IR schedule of a plan, in the order its played timing ran the tasks.

    Args:
        plan: A played :class:`~spotpipe.schedule.skippipe.SkipPlan`.
        num_nodes: Ranks (default: every node of ``plan.groups``).
        placement: The nodes per stage the job started with, when ``plan.groups`` is what is
            left of them after losses: every node keeps its schedule stage and every stage-0
            node its head's, so the live nodes' chunks keep their numbers (a lost node's rank
            has no actions). Default: ``plan.groups``.

    Returns:
        A :class:`Schedule` with one rank per node, ``paths`` over schedule stages and
        ``chunk_stage`` set; lower it with :func:`spotpipe.schedule.passes.lower`.
    """
    groups = plan.groups if placement is None else placement
    n = num_nodes if num_nodes is not None else 1 + max(x for g in groups for x in g)
    s = len(groups)
    stage_of = {x: st for st, g in enumerate(groups) for x in g}
    chunk_stage = tuple(stage_of.get(x, 0) for x in range(n)) + (s,) * len(groups[0])
    stage_to_rank = tuple(range(n)) + tuple(groups[0])
    paths = tuple((p.origin, *p.nodes, head_stage(n, groups, p.origin)) for p in plan.paths)
    ranks: list[list[Action]] = [[] for _ in range(n)]
    for node, tasks in enumerate(plan.timing.node_tasks):
        for t in tasks:
            if t.kind == HEAD:
                h = head_stage(n, groups, node)
                ranks[node] += [Action(h, Op.F, t.microbatch), Action(h, Op.B, t.microbatch)]
            else:
                ranks[node].append(Action(node, Op.F if t.kind == FORWARD else Op.B, t.microbatch))
    return Schedule(
        ranks=tuple(tuple(r) for r in ranks),
        num_stages=len(stage_to_rank),
        num_microbatches=len(plan.paths),
        stage_to_rank=stage_to_rank,
        paths=paths,
        name=f"skippipe:{plan.variant}",
        chunk_stage=chunk_stage,
    )


def _path_problems(schedule: Schedule, where: dict[Action, Position]) -> list[Problem]:
    assert schedule.chunk_stage is not None
    chunks = schedule.chunk_stage
    head = max(chunks)
    out: list[Problem] = []
    for m in range(schedule.num_microbatches):
        path = schedule.path(m)
        marks = tuple(where[a] for a in (Action(path[0], Op.F, m),) if a in where)
        body = [chunks[x] for x in path if chunks[x] != head]
        if len(set(body)) != len(body):
            out.append(Problem(f"the path of microbatch {m} visits model stage "
                               f"{next(s for s in body if body.count(s) > 1)} twice: model stages {body}", marks))
        last = path[-1]
        if chunks[last] != head or schedule.stage_to_rank[last] != schedule.stage_to_rank[path[0]]:
            out.append(Problem(f"the path of microbatch {m} does not return to its origin rank "
                               f"{schedule.stage_to_rank[path[0]]}: it ends at stage {last} on rank "
                               f"{schedule.stage_to_rank[last]}", marks))
    return out


def _balance_problems(schedule: Schedule, where: dict[Action, Position]) -> list[Problem]:
    assert schedule.chunk_stage is not None
    chunks = schedule.chunk_stage
    head = max(chunks)
    visits: dict[int, list[tuple[int, int]]] = {s: [] for s in set(chunks) if s not in (0, head)}
    for m in range(schedule.num_microbatches):
        for x in schedule.path(m):
            if chunks[x] in visits:
                visits[chunks[x]].append((x, m))
    counts = {s: len(v) for s, v in visits.items()}
    if len(set(counts.values())) <= 1:
        return []
    low, high = min(counts.values()), max(counts, key=lambda s: counts[s])
    extra = visits[high][low:]
    marks = tuple(where[a] for x, m in extra for a in (Action(x, Op.F, m),) if a in where)
    listed = ", ".join(f"stage {s}: {counts[s]}" for s in sorted(counts))
    return [Problem(f"unbalanced visits per non-first model stage ({listed}); every stage needs the same count", marks)]


def _memory_problems(schedule: Schedule, node_memory: int) -> list[Problem]:
    assert schedule.chunk_stage is not None
    head = max(schedule.chunk_stage)
    out: list[Problem] = []
    for r, acts in enumerate(schedule.ranks):
        held = 0
        for i, a in enumerate(acts):
            if a.op.is_comm or schedule.chunk_stage[a.stage] == head:
                continue
            held += 1 if a.op is Op.F else -1
            if held > node_memory:
                out.append(Problem(f"rank {r} step {i}: {a} holds {held} activations, over pipeline.node_memory = "
                                   f"{node_memory}", ((r, i),)))
                break
    return out


def check_node_schedule(schedule: Schedule, node_memory: int) -> list[Problem]:
    """Every problem of a node schedule: the SkipPipe rules, then :func:`check_schedule`
    (missing actions, order, unmatched send/recv, deadlocks). Empty when valid.

    Args:
        schedule: A lowered node schedule (one rank per node, ``chunk_stage`` set).
        node_memory: Most microbatch activations a node may hold at once.

    Returns:
        Every :class:`Problem`, SkipPipe rules first (Blagoev, Chen, Ersoy 2025).

    Raises:
        ScheduleError: when ``schedule.chunk_stage`` is not set (not a node schedule).
    """
    if schedule.chunk_stage is None:
        raise ScheduleError(f"schedule {schedule.name}: not a node schedule (chunk_stage is not set)")
    where: dict[Action, Position] = {}
    for r, acts in enumerate(schedule.ranks):
        for i, a in enumerate(acts):
            where.setdefault(a, (r, i))
    problems = _path_problems(schedule, where) + _balance_problems(schedule, where)
    problems += _memory_problems(schedule, node_memory)
    return problems + check_schedule(schedule)


def validate_node_schedule(schedule: Schedule, node_memory: int) -> Schedule:
    """Raise :class:`ScheduleError` for the first problem (one line, then the marked grid).

    Args:
        schedule: A lowered node schedule.
        node_memory: Most microbatch activations a node may hold at once.

    Returns:
        ``schedule``, so calls chain.

    Raises:
        ScheduleError: for the first problem of :func:`check_node_schedule`.
    """
    problems = check_node_schedule(schedule, node_memory)
    if problems:
        raise ScheduleError(format_problem(schedule, problems[0], len(problems) - 1))
    return schedule


def stage_visits(schedule: Schedule) -> tuple[int, ...]:
    """How many microbatches visit each model stage in one iteration of a node schedule.

    Args:
        schedule: A node schedule (``chunk_stage`` set).

    Returns:
        Visits per model stage ``0..S-1`` (the head, ``S``, is left out: every microbatch visits it).

    Raises:
        ScheduleError: when ``schedule.chunk_stage`` is not set.
    """
    if schedule.chunk_stage is None:
        raise ScheduleError(f"schedule {schedule.name}: not a node schedule (chunk_stage is not set)")
    head = max(schedule.chunk_stage)
    counts = [0] * head
    for m in range(schedule.num_microbatches):
        for x in schedule.path(m):
            if schedule.chunk_stage[x] != head:
                counts[schedule.chunk_stage[x]] += 1
    return tuple(counts)


def node_groups(schedule: Schedule) -> tuple[tuple[int, ...], ...]:
    """The nodes (ranks) of each model stage of a node schedule, stage 0 first, in rank order.

    Args:
        schedule: A node schedule (``chunk_stage`` set).

    Returns:
        One tuple of ranks per model stage ``0..S-1`` (a rank whose chunk no path visits still counts).

    Raises:
        ScheduleError: when ``schedule.chunk_stage`` is not set.
    """
    if schedule.chunk_stage is None:
        raise ScheduleError(f"schedule {schedule.name}: not a node schedule (chunk_stage is not set)")
    head = max(schedule.chunk_stage)
    groups: list[list[int]] = [[] for _ in range(head)]
    for x in range(schedule.num_ranks):
        if schedule.chunk_stage[x] != head:
            groups[schedule.chunk_stage[x]].append(schedule.stage_to_rank[x])
    return tuple(tuple(sorted(g)) for g in groups)


@dataclass(frozen=True)
class NodePlan:
    """What the workers of a SkipPipe run play: the placement and two lowered node schedules.

    Attributes:
        groups: Nodes per model stage, stage 0 first (a stage's gradient all-reduce group).
        train: The schedule of an ordinary iteration (the chosen variant's paths).
        full: Full paths on the same placement: evaluation passes and every
            ``pipeline.full_every``-th iteration.
        variant: The chosen variant (``pipeline.paths``) or ``plan file NAME``.
        predicted_s: The simulator's iteration time per schedule (``train``, ``full``), seconds.
        placement: The nodes per stage the job started with (``groups`` once nodes were lost;
            the schedules number chunks by it); ``()`` = ``groups``.
    """

    groups: tuple[tuple[int, ...], ...]
    train: Schedule
    full: Schedule
    variant: str
    predicted_s: dict[str, float]
    placement: tuple[tuple[int, ...], ...] = ()

    @property
    def start_groups(self) -> tuple[tuple[int, ...], ...]:
        """The nodes per stage the job started with (:attr:`placement`, else :attr:`groups`)."""
        return self.placement or self.groups

    def to_json(self) -> str:
        """The plan as JSON text (schedules as their CSV).

        Returns:
            JSON text for :meth:`from_json`.
        """
        return json.dumps({"groups": [list(g) for g in self.groups], "train": self.train.to_csv(),
                           "full": self.full.to_csv(), "variant": self.variant, "predicted_s": self.predicted_s,
                           "placement": [list(g) for g in self.placement]})

    @staticmethod
    def from_json(text: str) -> NodePlan:
        """Inverse of :meth:`to_json`.

        Args:
            text: JSON text as :meth:`to_json` writes it.

        Returns:
            The plan.

        Raises:
            ScheduleError: for a schedule that does not parse.
        """
        d = json.loads(text)
        return NodePlan(tuple(tuple(int(x) for x in g) for g in d["groups"]),
                        Schedule.from_csv(d["train"], "the node plan's train schedule"),
                        Schedule.from_csv(d["full"], "the node plan's full schedule"),
                        str(d["variant"]), {k: float(v) for k, v in d["predicted_s"].items()},
                        tuple(tuple(int(x) for x in g) for g in d.get("placement", ())))


def paths_of_step(step: int, full_every: int) -> str:
    """Which schedule of a :class:`NodePlan` iteration ``step`` plays: ``full`` every
    ``full_every``-th iteration (steps ``n-1, 2n-1, ...``, as SkipPipe's training loop does every
    10th), else ``train``.

    Args:
        step: The step, 0-based.
        full_every: ``pipeline.full_every`` (0: never full).

    Returns:
        ``"train"`` or ``"full"``.
    """
    return "full" if full_every > 0 and (step + 1) % full_every == 0 else "train"


def gradient_scales(schedule: Schedule) -> tuple[float, ...]:
    """Per model stage, the factor on its summed gradient: ``M / V_s``, the iteration's
    microbatches over those that visited the stage, so every stage's update is the mean over the
    microbatches that trained it (the rule of :mod:`spotpipe.runtime.worker.nodes`).

    Args:
        schedule: A node schedule (``chunk_stage`` set).

    Returns:
        One factor per model stage ``0..S-1`` (1.0 for a stage no path visits, and without skips).

    Raises:
        ScheduleError: when ``schedule.chunk_stage`` is not set.
    """
    m = schedule.num_microbatches
    return tuple(m / v if v else 1.0 for v in stage_visits(schedule))
