"""A SkipPipe plan of a job config: placement, paths per variant, lowered and played.

:func:`skip_setting` turns the config into the planner's inputs: ``sum(pipeline.stage_nodes)``
nodes with locations from ``[network]`` (:func:`spotpipe.network.build_network`), compute speeds
from ``sim.speed_factors``, the forward time of one microbatch on one stage
(``sim.layer_forward_s`` x layers per stage x sequences per microbatch, as SkipPipe's simulator
measures it; or the analytic cost model of :mod:`spotpipe.cost`), and the hand-off time of one
microbatch's hidden state over every link (latency + bytes / bandwidth +
``sim.message_overhead_s``). :func:`plan_job` places the nodes (DT-FM objective,
:mod:`spotpipe.schedule.placement`), plans every path variant
(:mod:`spotpipe.schedule.skippipe`), builds and lowers each node schedule
(:mod:`spotpipe.schedule.nodepaths`), validates it and plays it with the per-stage all-reduce
(:mod:`spotpipe.sim.skipplay`). Pure Python: no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotpipe.config import JobConfig
from spotpipe.cost import analytic_cost, sequences_per_microbatch
from spotpipe.errors import ConfigError
from spotpipe.network import Network, build_network, ring_allreduce_s
from spotpipe.schedule.ir import Schedule, ScheduleError
from spotpipe.schedule.nodepaths import plan_schedule, validate_node_schedule
from spotpipe.schedule.passes import lower
from spotpipe.schedule.pathtime import PathCosts
from spotpipe.schedule.placement import NodePlacement, PlacementProblem, place_nodes, random_placement
from spotpipe.schedule.skippipe import VARIANTS, SkipPlan, check_paths, path_stages, plan_paths
from spotpipe.sim.skipplay import SkipPlayResult, play_node_schedule

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PLACEMENT_EVALUATIONS = 4000  # partitions the placement's local search scores (about 1 s for 20 nodes)


@dataclass(frozen=True)
class SkipSetting:
    """The planner's inputs for one job.

    Attributes:
        network: Links between the ``N`` nodes.
        sizes: Nodes per stage group.
        costs: Compute and hand-off seconds per node (stage-independent until placement: every
            node could hold any stage, and all stages have the same layers).
        message_bytes: Bytes of one microbatch's hidden state.
        grad_bytes: Per stage, gradient bytes all-reduced.
        k: Stages per path, stage 0 included.
    """

    network: Network
    sizes: tuple[int, ...]
    costs: PathCosts
    message_bytes: int
    grad_bytes: tuple[int, ...]
    k: int


@dataclass(frozen=True)
class VariantResult:
    """One variant's plan, its lowered schedule and its played iteration."""

    plan: SkipPlan
    schedule: Schedule
    played: SkipPlayResult


@dataclass(frozen=True)
class JobPlan:
    """Everything ``spotpipe schedule plan`` reports."""

    setting: SkipSetting
    placement: NodePlacement
    random_placement: NodePlacement
    variants: dict[str, VariantResult]
    planner_s: float


def skip_setting(cfg: JobConfig, base_dir: str | Path | None = None) -> SkipSetting:
    """The planner's inputs from a validated config (see the module docstring).

    Args:
        cfg: A validated job config with ``pipeline.stage_nodes``.
        base_dir: Folder that relative paths of ``[network]`` are read from; ``None``: the current one.

    Returns:
        The :class:`SkipSetting` (network, nodes per stage group, costs in seconds, message and
        gradient bytes, ``k``).

    Raises:
        ConfigError: ``pipeline.stage_nodes`` not set, a ``sim.speed_factors`` list of the wrong
            length, or a matrix or location problem (:func:`spotpipe.network.build_network`).
    """
    p, s = cfg.pipeline, cfg.sim
    if not p.stage_nodes:
        raise ConfigError("pipeline.stage_nodes is empty: a SkipPipe plan needs the nodes per stage group, "
                          "e.g. stage_nodes = [5, 3, 3, 3, 3, 3]")
    sizes = tuple(p.stage_nodes)
    n = sum(sizes)
    network = build_network(cfg.network, p.stages, n, base_dir)
    if s.speed_factors and len(s.speed_factors) not in (n, p.stages):
        raise ConfigError(f"sim.speed_factors has {len(s.speed_factors)} entries; expected {n} (one per node) "
                          f"or {p.stages} (one per stage group, node i taking entry i mod {p.stages})")
    speed = [1.0] * n if not s.speed_factors else [s.speed_factors[i % len(s.speed_factors)] for i in range(n)]
    seqs = cfg.train.batch_size // (sizes[0] * p.microbatches)
    analytic = analytic_cost(cfg)
    if s.layer_forward_s > 0:
        layers = cfg.model.layers / p.stages
        stage_forward = s.layer_forward_s * layers * seqs
    else:
        stage_forward = max(analytic.forward_s) * seqs / sequences_per_microbatch(cfg)
    nbytes = _DTYPE_BYTES[cfg.model.dtype] * cfg.model.d_model * cfg.model.context * seqs
    message = tuple(
        tuple(0.0 if a == b else network.link(a, b).send_s(nbytes) + s.message_overhead_s for b in range(n))
        for a in range(n)
    )
    costs = PathCosts(tuple(stage_forward / x for x in speed), message, s.backward_ratio, s.head_ratio, s.compute_gap_s)
    return SkipSetting(network, sizes, costs, nbytes, tuple(analytic.grad_bytes), path_stages(p.stages, p.skip_ratio))


MAX_PLAN_NODES = 1024
"""The most nodes ``schedule plan`` takes (beyond, the link table alone takes minutes to build)."""


def plan_job(
    cfg: JobConfig,
    base_dir: str | Path | None = None,
    *,
    variants: tuple[str, ...] = VARIANTS,
    budget: int | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> JobPlan:
    """Place the nodes, plan, lower, validate and play every variant.

    Args:
        cfg: A validated config with ``pipeline.stage_nodes`` set.
        base_dir: Folder of the config file (a relative ``network.matrix``).
        variants: Which of :data:`~spotpipe.schedule.skippipe.VARIANTS` to plan.
        budget: Simulated plans the collision-aware search scores (default ``pipeline.plan_budget``).
        progress: Called with (what, share done in [0, 1]) while searching.

    Returns:
        The :class:`JobPlan`.

    Raises:
        ConfigError: as :func:`skip_setting`, or settings no plan can meet
            (:func:`spotpipe.schedule.skippipe.check_sizes`).
        ScheduleError: a plan that breaks a rule (a bug; the planner builds valid plans only).
    """
    t0 = time.perf_counter()
    p = cfg.pipeline
    nodes = sum(p.stage_nodes)
    if nodes > MAX_PLAN_NODES:
        raise ConfigError(
            f"pipeline.stage_nodes: {nodes} nodes; the planner takes at most {MAX_PLAN_NODES} (its link table grows "
            "with the square of the nodes and its search with their number: 600 nodes take about 11 minutes on 2 cores)"
        )
    setting = skip_setting(cfg, base_dir)
    costs = setting.costs
    problem = PlacementProblem(costs.message_s, costs.forward_s, setting.sizes)
    note: Callable[[str, float], None] = progress or (lambda _w, _f: None)
    placement = place_nodes(problem, cfg.train.seed, max_evaluations=PLACEMENT_EVALUATIONS,
                            progress=lambda d, t: note("placement", d / max(1, t)))
    baseline = random_placement(problem, cfg.train.seed)
    groups = placement.groups
    ar = tuple(
        ring_allreduce_s(setting.network, g, setting.grad_bytes[st]) if cfg.sim.delay_collectives else 0.0
        for st, g in enumerate(groups)
    )
    results: dict[str, VariantResult] = {}
    for v in variants:
        def variant_progress(done: int, total: int, what: str = v) -> None:
            note(what, done / max(1, total))

        plan = plan_paths(v, groups, costs, microbatches=p.microbatches, k=setting.k, max_swaps=p.max_swaps,
                          node_memory=p.node_memory, seed=cfg.train.seed, budget=budget or p.plan_budget,
                          progress=variant_progress)
        broken = check_paths(plan, 0 if v == "full" else p.max_swaps)
        if broken:  # the planner builds valid plans only: this is a bug, said plainly
            raise ScheduleError(f"planner bug: the {v} plan breaks a path rule: {broken[0]}")
        schedule = validate_node_schedule(lower(plan_schedule(plan, problem.n)), p.node_memory)
        results[v] = VariantResult(plan, schedule, play_node_schedule(schedule, costs, groups, ar))
    return JobPlan(setting, placement, baseline, results, time.perf_counter() - t0)


def plan_report(job: JobPlan) -> dict[str, Any]:
    """The plan as plain data (``schedule plan --json``, the bench).

    Args:
        job: A planned job.

    Returns:
        JSON-ready dict: ``placement`` (objective in seconds), ``k``, ``message_bytes``,
        ``planner_seconds`` and per variant its times in seconds and visits.
    """
    pl = job.placement
    out: dict[str, Any] = {
        "placement": {
            "groups": [list(g) for g in pl.groups],
            "locations": [[job.setting.network.location(x) for x in g] for g in pl.groups],
            "objective_s": pl.objective, "dp_s": pl.dp_cost, "pp_s": pl.pp_cost,
            "method": pl.method, "evaluations": pl.evaluations, "seconds": pl.seconds,
            "random_objective_s": job.random_placement.objective,
        },
        "k": job.setting.k,
        "message_bytes": job.setting.message_bytes,
        "planner_seconds": job.planner_s,
        "variants": {},
    }
    for v, r in job.variants.items():
        out["variants"][v] = {
            "pipeline_s": r.played.pipeline_s,
            "iteration_s": r.played.iteration_s,
            "allreduce_s": list(r.played.allreduce_s),
            "stage_visits": r.plan.stage_visits(),
            "node_visits": {str(n): c for n, c in sorted(r.plan.node_visits().items())},
            "search_seconds": r.plan.seconds,
            "evaluations": r.plan.evaluations,
            "paths": [{"origin": x.origin, "stages": list(x.stages), "nodes": list(x.nodes)} for x in r.plan.paths],
        }
    return out
