"""The controller's node plans: planned once, and planned again around lost nodes (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotpipe.config import load_config
from spotpipe.runtime.control.nodeplan import plan_nodes, replan_without
from spotpipe.schedule.nodepaths import NodePlan, stage_visits

GEO = Path(__file__).resolve().parents[2] / "configs" / "skippipe-geo.toml"


@pytest.fixture(scope="module")
def plan_and_cfg():  # type: ignore[no-untyped-def]
    cfg = load_config(GEO, ["pipeline.plan_budget=200"])
    return cfg, plan_nodes(cfg, GEO.parent)


def _visited_nodes(plan: NodePlan) -> set[int]:
    s = plan.train
    return {s.stage_to_rank[x] for m in range(s.num_microbatches) for x in s.path(m)}


@pytest.mark.parametrize("where", [1, 0])  # a later stage's node, a stage-0 node
def test_a_lost_node_is_planned_around_with_the_same_microbatches(plan_and_cfg, where: int) -> None:  # type: ignore[no-untyped-def]
    cfg, plan = plan_and_cfg
    lost = plan.groups[where][0]
    new, why = replan_without(cfg, plan, [lost], GEO.parent)
    assert new is not None, why
    assert lost not in _visited_nodes(new) and lost not in {x for g in new.groups for x in g}
    assert _visited_nodes(new) == {x for g in plan.groups for x in g} - {lost}
    for sch in (new.train, new.full):
        assert sch.num_microbatches == plan.train.num_microbatches  # the same samples per iteration
        assert sch.num_stages == plan.train.num_stages and sch.chunk_stage == plan.train.chunk_stage
        assert not sch.ranks[lost]
        for node in _visited_nodes(new):  # every live node keeps its chunk numbers
            assert sch.stages_of_rank(node) == plan.train.stages_of_rank(node)
    visits = stage_visits(new.train)
    assert visits[0] == plan.train.num_microbatches and len(set(visits[1:])) == 1
    assert stage_visits(new.full) == (plan.train.num_microbatches,) * cfg.pipeline.stages
    origins = {new.train.stage_to_rank[new.train.path(m)[0]] for m in range(new.train.num_microbatches)}
    assert origins == set(new.groups[0])
    assert new.start_groups == plan.groups and NodePlan.from_json(new.to_json()).start_groups == plan.groups


def test_a_stage_that_loses_every_node_is_not_planned_around(plan_and_cfg) -> None:  # type: ignore[no-untyped-def]
    cfg, plan = plan_and_cfg
    new, why = replan_without(cfg, plan, list(plan.groups[2]), GEO.parent)
    assert new is None and why.startswith(f"stage 2 lost every node ({', '.join(map(str, plan.groups[2]))})")


def test_microbatches_that_do_not_split_over_the_stage0_nodes_left(tmp_path: Path) -> None:
    cfg = load_config(GEO, ["pipeline.stage_nodes=[3,2,2,1]", "network.matrix=''", "network.locations=[]",
                            "pipeline.microbatches=1", "train.batch_size=6", "pipeline.skip_ratio=0",
                            "pipeline.plan_budget=50", "pipeline.paths=full"])
    plan = plan_nodes(cfg)
    new, why = replan_without(cfg, plan, [plan.groups[0][0]])
    assert new is None and why == "the 3 microbatches of an iteration do not split evenly over the 2 stage-0 nodes left"


def test_stage_loss_plans_per_lost_node(plan_and_cfg) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from spotpipe.runtime.control.nodeplan import stage_loss_plans

    cfg, plan = plan_and_cfg
    g = plan.groups
    mid = stage_loss_plans(cfg, plan, [*g[2], g[1][0]], checkpoint_step=9)
    by_node = {p.stage: p for p in mid}
    assert by_node[g[1][0]].strategy == "replica" and by_node[g[1][0]].sources == ((g[1][1], 0),)
    for n in g[2]:  # stage 2 lost every node: CheckFree from the live nodes of stages 1 and 3
        assert by_node[n].strategy == "checkfree" and by_node[n].lr_scale == 1.1
        assert by_node[n].sources == ((g[1][1], 0), (g[3][0], 0))
    assert {p.strategy for p in stage_loss_plans(cfg, plan, list(g[0]), 9)} == {"checkpoint"}  # data, embedding, heads
    assert {p.strategy for p in stage_loss_plans(cfg, plan, list(g[3]), 9)} == {"checkpoint"}  # one neighbour
    assert {p.strategy for p in stage_loss_plans(cfg, plan, [*g[2], *g[3]], 9)} == {"checkpoint"}  # neighbour lost too
    assert {p.strategy for p in stage_loss_plans(cfg, plan, list(g[2]), None)} == {"checkfree"}
    assert {p.strategy for p in stage_loss_plans(cfg, plan, list(g[0]), None)} == {"stop"}
    assert "there is no checkpoint" in stage_loss_plans(cfg, plan, list(g[0]), None)[0].why
    ckpt = replace(cfg, ft=replace(cfg.ft, strategy="checkpoint"))
    assert {p.strategy for p in stage_loss_plans(ckpt, plan, list(g[2]), 9)} == {"checkpoint"}


def test_a_replanned_plan_survives_its_json_with_idle_ranks(plan_and_cfg) -> None:  # type: ignore[no-untyped-def]
    """After a stage-0 node is lost the full paths form one pipeline, so some nodes idle in full
    iterations; the plan the workers read back must still have a rank for every node."""
    from spotpipe.runtime.pipeline.executor import compile_rank

    cfg, plan = plan_and_cfg
    new, why = replan_without(cfg, plan, [plan.groups[0][1]], GEO.parent)
    assert new is not None, why
    back = NodePlan.from_json(new.to_json())
    for sch, orig in ((back.train, new.train), (back.full, new.full)):
        assert sch.num_ranks == orig.num_ranks == cfg.pipeline.ranks and sch.ranks == orig.ranks
        for node in range(sch.num_ranks):
            compile_rank(sch, node, lambda stage: stage)
