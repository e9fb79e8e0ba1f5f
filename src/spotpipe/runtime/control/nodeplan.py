"""The node plan of a SkipPipe run, made once by the controller before any worker starts.

With ``pipeline.stage_nodes`` every node is one worker. :func:`plan_nodes` places the nodes on
stages and plans the paths of ``pipeline.paths`` with the same planner as ``spotpipe schedule
plan`` (:func:`spotpipe.sim.skipjob.plan_job`: DT-FM placement, SkipPipe paths, lowered and
validated node schedules, their simulated iteration times), plus full paths on the same placement
for evaluation and for ``pipeline.full_every``. With ``pipeline.plan_file`` the train schedule is
read from a CSV that ``spotpipe schedule plan --csv`` wrote, checked against the config
(:func:`read_plan_file`) and validated with the SkipPipe rules. The workers get the result in
their grant (:class:`~spotpipe.schedule.nodepaths.NodePlan`), so they never plan themselves and
all play the same paths. When a node is lost and its stage has other nodes, :func:`replan_without`
plans the paths again over the nodes that are left, with the same microbatches per iteration
(and so the same samples), so the job goes on without a rollback or a new process. Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from spotpipe.config import JobConfig
from spotpipe.errors import ConfigError, SpotpipeError
from spotpipe.fsutil import read_text
from spotpipe.ft.strategies.base import RecoveryPlan
from spotpipe.schedule.ir import Schedule, ScheduleError
from spotpipe.schedule.nodepaths import NodePlan, node_groups, plan_schedule, validate_node_schedule
from spotpipe.schedule.passes import lower
from spotpipe.schedule.skippipe import check_sizes, path_stages, plan_paths


def plan_nodes(cfg: JobConfig, base_dir: str | Path | None = None) -> NodePlan:
    """Plan the node schedules of a SkipPipe run (see the module docstring).

    Args:
        cfg: A validated job config with ``pipeline.stage_nodes`` set.
        base_dir: Folder that a relative ``pipeline.plan_file`` or ``network.matrix`` is read from.

    Returns:
        The :class:`NodePlan` (placement groups, train and full schedules, predicted seconds).

    Raises:
        SpotpipeError: a setting no plan can meet, or a plan file that does not fit the config
            (one line naming the key or the file).
    """
    from spotpipe.sim.skipjob import plan_job, skip_setting

    p = cfg.pipeline
    # Check the sizes before any planning, in the config's order, so a message names the user's
    # pipeline.stage_nodes[i] (the planner checks its placement's groups, which keep the sizes).
    firsts = [sum(p.stage_nodes[:i]) for i in range(len(p.stage_nodes))]
    check_sizes([range(f, f + n) for f, n in zip(firsts, p.stage_nodes)], p.microbatches,
                path_stages(p.stages, p.skip_ratio), p.node_memory)
    if not p.plan_file:
        variants = (p.paths,) if p.paths == "full" else (p.paths, "full")
        job = plan_job(cfg, base_dir, variants=variants)
        chosen, full = job.variants[p.paths], job.variants["full"]
        return NodePlan(job.placement.groups, chosen.schedule, full.schedule, p.paths,
                        {"train": chosen.played.iteration_s, "full": full.played.iteration_s})
    train = read_plan_file(cfg, base_dir)
    groups = node_groups(train)
    setting = skip_setting(cfg, base_dir)
    full = _node_schedule(cfg, setting, groups, "full", len(groups), 0, p.microbatches, train.num_ranks, groups)
    return NodePlan(groups, train, full, f"plan file {Path(p.plan_file).name}",
                    _predicted(cfg, setting, groups, train, full))


def _node_schedule(cfg: JobConfig, setting: Any, groups: Sequence[Sequence[int]], variant: str, k: int,
                   max_swaps: int, microbatches: int, num_nodes: int,
                   placement: Sequence[Sequence[int]]) -> Schedule:
    """Plan ``variant``'s paths over ``groups`` and return the lowered, validated node schedule
    (chunks numbered by ``placement``, the nodes the job started with)."""
    p = cfg.pipeline
    paths = plan_paths(variant, groups, setting.costs, microbatches=microbatches, k=k, max_swaps=max_swaps,
                       node_memory=p.node_memory, seed=cfg.train.seed, budget=p.plan_budget)
    return validate_node_schedule(lower(plan_schedule(paths, num_nodes, placement=placement)), p.node_memory)


def _predicted(cfg: JobConfig, setting: Any, groups: Sequence[Sequence[int]], train: Schedule,
               full: Schedule) -> dict[str, float]:
    """The simulator's iteration seconds of both schedules, each stage's all-reduce included (as
    :func:`spotpipe.sim.skipjob.plan_job` plays a plan)."""
    from spotpipe.network import ring_allreduce_s
    from spotpipe.sim.skipplay import play_node_schedule

    ar = [ring_allreduce_s(setting.network, g, setting.grad_bytes[s]) if cfg.sim.delay_collectives else 0.0
          for s, g in enumerate(groups)]
    return {name: play_node_schedule(sch, setting.costs, groups, ar).iteration_s
            for name, sch in (("train", train), ("full", full))}


def read_plan_file(cfg: JobConfig, base_dir: str | Path | None = None) -> Schedule:
    """Read ``pipeline.plan_file`` and check it against the config.

    Args:
        cfg: The job (``pipeline.stage_nodes``, ``stages``, ``microbatches``, ``node_memory``).
        base_dir: Folder that a relative path is read from.

    Returns:
        The lowered, validated node schedule.

    Raises:
        SpotpipeError: the file cannot be read or parsed, is not a node schedule, its nodes,
            stage groups, microbatches or stages per path differ from the config, or it breaks a
            SkipPipe rule.
    """
    from spotpipe.fsutil import resolve_path

    p = cfg.pipeline
    path = resolve_path(p.plan_file, base_dir)
    where = f"pipeline.plan_file {path}"
    text = read_text(path, "pipeline.plan_file")
    try:
        schedule = Schedule.from_csv(text, where)
    except ScheduleError as exc:
        raise SpotpipeError(f"{exc} (write one with `spotpipe schedule plan --config FILE --csv OUT.csv`)") from None
    if schedule.chunk_stage is None:
        raise SpotpipeError(f"{where}: not a SkipPipe node schedule (no chunk_stage line); write one with "
                            "`spotpipe schedule plan --config FILE --csv OUT.csv`")
    sizes = tuple(len(g) for g in node_groups(schedule))
    if schedule.num_ranks != p.ranks or sizes != tuple(p.stage_nodes):
        raise SpotpipeError(f"{where} plans {schedule.num_ranks} nodes in stage groups {list(sizes)}, but "
                            f"pipeline.stage_nodes = {list(p.stage_nodes)}: plan again with this config")
    want = p.stage_nodes[0] * p.microbatches
    if schedule.num_microbatches != want:
        raise SpotpipeError(f"{where} has {schedule.num_microbatches} microbatches per iteration, but "
                            f"pipeline.stage_nodes[0] x pipeline.microbatches = {want}: plan again with this config")
    k = p.stages if p.paths == "full" else path_stages(p.stages, p.skip_ratio)
    visits = sorted({len(schedule.path(m)) - 1 for m in range(schedule.num_microbatches)})  # the head is no stage
    if visits != [k]:
        raise SpotpipeError(f"{where}: its paths visit {' or '.join(map(str, visits))} of {p.stages} stages, but "
                            + (f"pipeline.paths = full visits all {k}" if p.paths == "full" else
                               f"pipeline.skip_ratio = {p.skip_ratio:g} gives k = {k}") + ": plan again with this config")
    try:
        return validate_node_schedule(schedule if schedule.is_lowered() else lower(schedule), p.node_memory)
    except ScheduleError as exc:
        first = str(exc).splitlines()[0]
        raise SpotpipeError(f"{where}: {first}") from None


def absent_nodes(plan: NodePlan) -> set[int]:
    """Nodes the job started with that ``plan`` no longer has (lost and planned around).

    Args:
        plan: The plan in force.

    Returns:
        Node ids.
    """
    return {x for g in plan.start_groups for x in g} - {x for g in plan.groups for x in g}


def replan_without(cfg: JobConfig, plan: NodePlan, lost: Collection[int],
                   base_dir: str | Path | None = None) -> tuple[NodePlan | None, str]:
    """Plan the paths again over the starting nodes but ``lost`` (SkipPipe's answer to a lost node;
    with fewer nodes in ``lost`` than are absent now, the plan that takes a joined node back).

    Every stage keeps at least one node, so every model stage still trains; the iteration keeps
    its ``M`` microbatches, now spread over the stage-0 nodes that are left (``M / n0`` each),
    so microbatch ``j`` reads the same samples as before and the step replays with the same data.
    The nodes keep their schedule stages (:func:`~spotpipe.schedule.nodepaths.plan_schedule` with
    the starting placement), so no worker renumbers its chunks.

    Args:
        cfg: The job (``pipeline.paths``, ``skip_ratio``, ``max_swaps``, ``node_memory``, ``[network]``, ``[sim]``).
        plan: The plan in force.
        lost: Every node to leave out: the absent ones (:func:`absent_nodes`) and the newly lost,
            less any that joins again.
        base_dir: Folder a relative ``network.matrix`` is read from.

    Returns:
        ``(new plan, "")``, or ``(None, why)`` when no plan keeps the same iteration: a stage lost
        every node, the microbatches do not split evenly over the stage-0 nodes left, or the
        visits or memory rules cannot be met (one line; the caller falls back to its recovery
        strategy).
    """
    from spotpipe.sim.skipjob import skip_setting

    p = cfg.pipeline
    groups = tuple(tuple(x for x in g if x not in lost) for g in plan.start_groups)
    gone = [s for s, g in enumerate(groups) if not g]
    if gone:
        return None, (f"stage {gone[0]} lost every node ({', '.join(map(str, plan.start_groups[gone[0]]))}): no path can visit it")
    total, n0 = plan.train.num_microbatches, len(groups[0])
    if total % n0:
        return None, (f"the {total} microbatches of an iteration do not split evenly over the {n0} stage-0 nodes left")
    variant = "skippipe" if p.plan_file else p.paths
    k = len(groups) if variant == "full" else path_stages(p.stages, p.skip_ratio)
    start, n = plan.start_groups, plan.train.num_ranks
    try:
        check_sizes(groups, total // n0, k, p.node_memory)
        setting = skip_setting(cfg, base_dir)
        train = _node_schedule(cfg, setting, groups, variant, k, p.max_swaps, total // n0, n, start)
        full = _node_schedule(cfg, setting, groups, "full", len(groups), 0, total // n0, n, start)
    except (ConfigError, ScheduleError) as exc:
        return None, " ".join(str(exc).split("\n")[0].split())
    return NodePlan(groups, train, full, variant, _predicted(cfg, setting, groups, train, full), start), ""


def stage_loss_plans(cfg: JobConfig, plan: NodePlan, lost: Collection[int],
                     checkpoint_step: int | None) -> list[RecoveryPlan]:
    """How a node run rebuilds lost nodes when the paths cannot be planned around them (a stage
    lost every node): one plan per lost node, all nodes keeping their place in the plan.

    * A node whose stage keeps a live node copies that node's state (``replica``: the nodes of a
      stage hold the same state).
    * A middle block stage ``0 < s < S-1`` that lost every node, with both neighbouring stages
      alive and ``ft.strategy`` ``checkfree`` or ``auto``: each of its nodes becomes the
      gradient-norm-weighted average of a live node of stage ``s-1`` and one of ``s+1``, at 1.1x
      the learning rate (CheckFree; Blagoev, Ersoy, Chen 2025, section 3.1).
    * Otherwise (stage 0, with the data, embedding and heads; the last block stage, with one
      neighbour; a neighbour lost too; ``ft.strategy = checkpoint``): the whole job rolls back to
      the last checkpoint, or stops without one.

    Args:
        cfg: The job (``ft.strategy``, ``pipeline.stages``, ``model.layers``).
        plan: The plan in force (its live groups).
        lost: The nodes lost now.
        checkpoint_step: The last complete checkpoint's step, or None.

    Returns:
        The :class:`~spotpipe.ft.strategies.base.RecoveryPlan` of each lost node (``stage`` = the
        node id), in node order.
    """
    from spotpipe.ft.strategies.checkfree import CHECKFREE_LR_SCALE
    from spotpipe.model.partition import partition_layers

    S = cfg.pipeline.stages
    live = [tuple(x for x in g if x not in lost) for g in plan.groups]
    stage_of = {x: s for s, g in enumerate(plan.start_groups) for x in g}
    blocks = [b - a for a, b in partition_layers(cfg.model.layers, S)]
    out: list[RecoveryPlan] = []
    for n in sorted(lost):
        s = stage_of[n]
        if live[s]:
            out.append(RecoveryPlan(n, 0, "replica", f"node {n}: copies node {live[s][0]} of its stage {s}",
                                    sources=((live[s][0], 0),), exact=True))
            continue
        why = ""
        if cfg.ft.strategy not in ("checkfree", "auto"):
            why = f"ft.strategy = {cfg.ft.strategy}"
        elif not 0 < s < S - 1:
            why = f"stage {s} is {'stage 0 (data, embedding, heads)' if s == 0 else 'the last block stage (one neighbour)'}"
        elif not (live[s - 1] and live[s + 1]):
            why = f"a neighbouring stage of stage {s} lost every node too"
        elif len({blocks[s - 1], blocks[s], blocks[s + 1]}) > 1:
            why = f"stages {s - 1}..{s + 1} hold unequal blocks ({blocks[s - 1]}, {blocks[s]}, {blocks[s + 1]})"
        if not why:
            out.append(RecoveryPlan(n, 0, "checkfree", f"stage {s} lost every node: node {n} rebuilt as the weighted "
                                    f"average of node {live[s - 1][0]} (stage {s - 1}) and node {live[s + 1][0]} "
                                    f"(stage {s + 1}), lr x{CHECKFREE_LR_SCALE:g}",
                                    sources=((live[s - 1][0], 0), (live[s + 1][0], 0)), lr_scale=CHECKFREE_LR_SCALE))
        elif checkpoint_step is not None:
            out.append(RecoveryPlan(n, 0, "checkpoint", f"stage {s} lost every node and {why}: the whole job rolls "
                                    f"back to the checkpoint of step {checkpoint_step}", checkpoint_step=checkpoint_step))
        else:
            out.append(RecoveryPlan(n, 0, "stop", f"stage {s} lost every node and {why}, and there is no checkpoint "
                                    "(train.checkpoint_every = 0)"))
    return out
