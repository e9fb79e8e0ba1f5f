"""SkipPipe on real worker processes: one worker per node, the controller's planned paths.

* Exactness: skip ratio 0, full paths, one node per stage: the per-step losses and validation
  losses equal the single-process reference's (which 1F1B equals, test_integration_training)
  within 1e-5 relative.
* Partial paths on 8 nodes (stage groups of 2, 25% skipped, one swap allowed, every 4th
  iteration on full paths, 1 ms links): every step commits once, the sampler moves by one batch
  per step (every sample used once), the full-path iterations are the ones asked for, and the
  losses, gradient norms and validation losses equal a single-process reference that plays the
  same paths with the gradient rule of :mod:`spotpipe.runtime.worker.nodes` (each stage's
  gradient x M / visits). The reference without that rule gives gradient norms about 10% apart
  in the first steps, so the test fails if the rule is lost.
* `spotpipe eval` and `spotpipe generate` read the workers' checkpoint of a node run (one file per
  node): the full model's loss is the workers' own last validation loss, and the last block stage
  may be skipped (the head is apart on the stage-0 nodes).
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

NODES = ["pipeline.stage_nodes=[2,2,2,2]", "pipeline.microbatches=3", "train.batch_size=12", "pipeline.skip_ratio=0.25",
         "pipeline.max_swaps=1", "pipeline.full_every=4", "pipeline.plan_budget=300", "train.steps=12",
         "train.eval_every=6", "network.latency_ms=1", "sim.layer_forward_s=0.001"]


def reference(run_dir: Path, gradient_rule: bool = True) -> tuple[list[float], list[float], dict[int, float]]:
    """Per-step losses, gradient norms and validation losses of the single-process reference
    playing the run's node plan (:class:`spotpipe.runtime.inprocess.paths.NodePathTrainer`)."""
    import torch

    from spotpipe.config import load_config
    from spotpipe.data.tokens import TokenFile
    from spotpipe.runtime.control.nodeplan import plan_nodes
    from spotpipe.runtime.inprocess.paths import NodePathTrainer

    cfg = load_config(run_dir / "config.toml")
    torch.set_num_threads(1)
    trainer = NodePathTrainer(cfg, TokenFile(cfg.data.path), plan_nodes(cfg), gradient_rule=gradient_rule)  # the controller's plan
    losses, norms, vals = [], [], {}
    for step in range(cfg.train.steps):
        result = trainer.train_step()
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if (step + 1) % cfg.train.eval_every == 0:
            vals[step] = trainer.evaluate()
    return losses, norms, vals


@pytest.mark.timeout(300)
def test_full_paths_on_one_node_per_stage_equal_single_process(tmp_path: Path, train: Callable[..., Any],
                                                                helpers: Any) -> None:
    from spotpipe.config import load_config
    from spotpipe.data.tokens import TokenFile
    from spotpipe.runtime.inprocess.local import LocalTrainer

    run_dir = tmp_path / "exact"
    proc = train(run_dir, "pipeline.stage_nodes=[1,1,1,1]", "pipeline.skip_ratio=0", "pipeline.paths=full",
                 "pipeline.plan_budget=50", "train.steps=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 stages on 4 nodes" in proc.stdout and "s per step (median)" in proc.stdout, proc.stdout[-2000:]
    losses = helpers.step_losses(run_dir)
    cfg = load_config(run_dir / "config.toml")
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, stage_nodes=()))  # the same job on full pipelines over stages
    trainer = LocalTrainer(cfg, TokenFile(cfg.data.path))
    ref = [trainer.train_step().loss for _ in range(20)]
    assert sorted(losses) == list(range(20))
    for step, want in enumerate(ref):
        assert losses[step] == pytest.approx(want, rel=1e-5), f"step {step}: nodes {losses[step]} vs local {want}"
    val = [r["val_loss"] for r in helpers.read_events(run_dir) if r["event"] == "eval"]
    assert val and val[-1] == pytest.approx(trainer.evaluate(), rel=1e-5)


@pytest.mark.timeout(300)
def test_partial_paths_on_eight_nodes_train_as_the_rule_says(tmp_path: Path, train: Callable[..., Any],
                                                             helpers: Any) -> None:
    run_dir = tmp_path / "nodes"
    proc = train(run_dir, *NODES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished: 12 steps" in proc.stdout, proc.stdout[-2000:]
    events = helpers.read_events(run_dir)
    steps = [r for r in events if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(12)), "every iteration commits exactly once"
    assert [r["sampler"]["position"] for r in steps] == [12 * (i + 1) for i in range(12)], "every sample once, in order"
    assert [r["paths"] for r in steps] == ["full" if (i + 1) % 4 == 0 else "train" for i in range(12)]
    starts = [r for r in events if r["event"] == "worker_start"]
    assert sorted(r["stage"] for r in starts) == list(range(8)) and len({r["pid"] for r in starts}) == 8
    losses, norms, vals = reference(run_dir)
    for r in steps:
        i = r["step"]
        assert r["loss"] == pytest.approx(losses[i], rel=1e-4), f"step {i}: loss {r['loss']} vs reference {losses[i]}"
        assert r["grad_norm"] == pytest.approx(norms[i], rel=1e-4), f"step {i}: grad norm {r['grad_norm']} vs {norms[i]}"
    got_vals = {r["step"]: r["val_loss"] for r in events if r["event"] == "eval"}
    assert sorted(got_vals) == sorted(vals)
    for step, want in vals.items():
        assert got_vals[step] == pytest.approx(want, rel=1e-4)
    # Without M / visits the gradient norms of the first partial-path steps differ (by about 10%;
    # later steps less so: AdamW's update hardly depends on a gradient's scale, so the weights stay close).
    _, plain_norms, _ = reference(run_dir, gradient_rule=False)
    assert all(not math.isclose(norms[i], plain_norms[i], rel_tol=0.03) for i in (0, 1, 2))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3, "the tiny model should learn in 12 steps"


@pytest.mark.timeout(300)
def test_lost_nodes_are_planned_around_without_a_rollback(tmp_path: Path, train: Callable[..., Any], helpers: Any,
                                                           token_dir: Path) -> None:
    """SIGKILL a node of a later stage in the middle of a step's backward, and a stage-0 node at a
    random moment: both stages keep a node, so the paths are planned again over the nodes left,
    the failed iteration replays with the same data, and no process is started."""
    from spotpipe.config import JobConfig, apply_overrides
    from spotpipe.runtime.control.nodeplan import plan_nodes

    cfg = apply_overrides(JobConfig(), [*helpers.tiny, *NODES, f"data.path={token_dir}"]).validate()
    groups = plan_nodes(cfg).groups
    later, first = groups[2][0], groups[0][1]
    run_dir = tmp_path / "lost"
    proc = train(run_dir, *NODES, "pipeline.full_every=0", "ft.spares=0",
                 f"ft.faults=['stage={later}@step=3,phase=backward', 'stage={first},replica=0@random']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished: 12 steps" in proc.stdout and proc.stdout.count("paths planned again") == 2, proc.stdout[-3000:]
    events = helpers.read_events(run_dir)
    steps = [r for r in events if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(12)), "every iteration commits exactly once"
    assert [r["sampler"]["position"] for r in steps] == [12 * (i + 1) for i in range(12)], "every sample once, in order"
    starts = [r for r in events if r["event"] == "worker_start"]
    assert len(starts) == 8, "no process was started for the lost nodes"
    started = [r for r in events if r["event"] == "recovery_started"]
    assert sorted(r["stage"] for r in started) == sorted([later, first]) and {r["strategy"] for r in started} == {"replan"}
    lost = {r["worker"] for r in starts if r["stage"] in (later, first)}
    generations = [r for r in events if r["event"] == "generation"]
    assert len(generations) == 3, "one new generation per loss"
    assert sorted(generations[-1]["workers"]) == sorted({r["worker"] for r in starts} - lost), \
        "the survivors, in their own processes, are the last generation"


@pytest.mark.timeout(300)
def test_a_spare_takes_a_lost_node_back_with_its_stage_state(tmp_path: Path, train: Callable[..., Any],
                                                              helpers: Any, token_dir: Path) -> None:
    """With a warm spare, a lost node is first planned around (training goes on at once), then the
    spare takes the node back: it copies a live node of the same stage, the paths are planned
    again over all nodes, and no survivor restarts. At the end both nodes of that stage hold
    the same weights and optimizer state (their checkpoint files are equal)."""
    import torch

    from spotpipe.config import JobConfig, apply_overrides
    from spotpipe.runtime.control.nodeplan import plan_nodes
    from spotpipe.runtime.state.checkpoint import checkpoint_dir, load_state, rank_file_name

    cfg = apply_overrides(JobConfig(), [*helpers.tiny, *NODES, f"data.path={token_dir}"]).validate()
    group = plan_nodes(cfg).groups[1]
    run_dir = tmp_path / "grow"
    proc = train(run_dir, *NODES, "ft.spares=1", "train.checkpoint_every=12", f"ft.faults=['stage={group[0]}@step=3']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "paths planned again" in proc.stdout and f"node {group[0]} (stage 1) joins again" in proc.stdout, proc.stdout[-3000:]
    events = helpers.read_events(run_dir)
    steps = [r for r in events if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(12))
    assert [r["sampler"]["position"] for r in steps] == [12 * (i + 1) for i in range(12)]
    grows = [r for r in events if r["event"] == "reshape"]
    assert len(grows) == 1 and grows[0]["kind"] == "grow" and grows[0]["node"] == group[0] and grows[0]["bytes"] > 0
    generations = [r for r in events if r["event"] == "generation"]
    assert len(generations) == 3 and len(generations[1]["workers"]) == 7 and len(generations[2]["workers"]) == 8
    first = {r["worker"] for r in events if r["event"] == "worker_start"} & set(generations[0]["workers"])
    assert first - set(generations[2]["workers"]) == {next(r["worker"] for r in events if r["event"] == "worker_start"
                                                           and r["stage"] == group[0])}, "only the lost node's worker is new"
    files = [load_state(checkpoint_dir(run_dir, 11) / rank_file_name(n)) for n in group]
    assert torch.equal(files[0]["state"]["flat"], files[1]["state"]["flat"]), "the nodes of a stage hold the same state"


@pytest.mark.timeout(300)
def test_eval_and_generate_read_a_node_runs_checkpoint(tmp_path: Path, train: Callable[..., Any], helpers: Any,
                                                       spotpipe_env: dict[str, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`spotpipe eval` restores the workers' checkpoint of a node run (one file per node, keyed by
    schedule stage): with nothing skipped it gives the workers' own validation loss after the last
    step (the same windows); the last block stage may be skipped (the head is apart); `generate`
    continues the prompt; with a node's file gone the command fails with one line."""
    import json
    import subprocess

    from spotpipe.cli import main
    from spotpipe.runtime.state.checkpoint import checkpoint_dir, rank_file_name

    run_dir = tmp_path / "nodes-eval"
    sets = [s for s in NODES if not s.startswith(("train.steps=", "train.eval_every="))]
    proc = train(run_dir, *sets, "train.steps=6", "train.eval_every=3", "train.checkpoint_every=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    vals = {r["step"]: r["val_loss"] for r in helpers.read_events(run_dir) if r["event"] == "eval"}
    assert main(["eval", str(run_dir), "--skip-stages", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 5 and out["stages"] == 4 and out["chunks"] == 5 and len(out["stage_nodes"]) == 4
    assert out["full"]["loss"] == pytest.approx(vals[5], rel=1e-5)
    assert out["skipped"]["skipped"] == [3] and abs(out["skipped"]["loss"] - out["full"]["loss"]) > 1e-4
    assert main(["generate", str(run_dir), "--prompt", "KING", "--tokens", "8", "--seed", "1", "--skip-stages", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("KING") and len(text.rstrip("\n")) > 4
    node = out["stage_nodes"][1][0]  # the node stage 1 was read from
    (checkpoint_dir(run_dir, 5) / rank_file_name(node)).unlink()
    bad = subprocess.run(helpers.spotpipe_cmd("eval", str(run_dir)), capture_output=True, text=True, timeout=120,
                         env=spotpipe_env)
    helpers.assert_one_line_error(bad, f"file {rank_file_name(node)} of rank {node} is missing")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage, strategy", [(2, "checkfree"), (0, "checkpoint")])
def test_a_stage_that_loses_every_node_is_rebuilt(stage: int, strategy: str, tmp_path: Path, train: Callable[..., Any],
                                                  helpers: Any, token_dir: Path) -> None:
    """Both nodes of one stage killed at once: no path can visit the stage, so the lost nodes are
    rebuilt in new processes: a middle stage from its neighbours (CheckFree, no rollback), stage 0
    (data, embedding, heads) from the checkpoint; the events say why the paths were not planned
    again and every step commits once."""
    from spotpipe.config import JobConfig, apply_overrides
    from spotpipe.runtime.control.nodeplan import plan_nodes

    cfg = apply_overrides(JobConfig(), [*helpers.tiny, *NODES, f"data.path={token_dir}"]).validate()
    a, b = plan_nodes(cfg).groups[stage]
    run_dir = tmp_path / f"stage{stage}-lost"
    proc = train(run_dir, *NODES, "ft.spares=0", "train.checkpoint_every=2", "train.steps=8",
                 f"ft.faults=['stages={a}+{b}@step=5']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = helpers.read_events(run_dir)
    started = [r for r in events if r["event"] == "recovery_started"]
    assert {r["strategy"] for r in started} == {strategy} and sorted(r["stage"] for r in started) == sorted([a, b])
    assert all(r["why"].startswith(f"paths not re-planned: stage {stage} lost every node ({a}, {b})") for r in started)
    steps = [r for r in events if r["event"] == "step"]
    assert sorted({r["step"] for r in steps}) == list(range(8))
    if strategy == "checkfree":  # no rollback: every step commits exactly once
        assert [r["step"] for r in steps] == list(range(8)) and "rolling back" not in proc.stdout
        assert "lr x1.1" in started[0]["why"]
    else:
        assert "rolling back to the checkpoint of step 3" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.timeout(300)
def test_a_node_planned_around_on_full_paths_keeps_the_failure_free_losses(tmp_path: Path, train: Callable[..., Any],
                                                                             helpers: Any, token_dir: Path) -> None:
    """Elastic shrink is exact: with full paths and no skips, the nodes of a stage are data-parallel
    replicas of it; one killed (no spare) is planned around with the same microbatches, so every
    step's loss equals the failure-free single-process reference's within 1e-5."""
    from spotpipe.config import JobConfig, apply_overrides, load_config
    from spotpipe.data.tokens import TokenFile
    from spotpipe.runtime.control.nodeplan import plan_nodes
    from spotpipe.runtime.inprocess.local import LocalTrainer

    sets = [*NODES, "pipeline.skip_ratio=0", "pipeline.paths=full", "pipeline.full_every=0", "ft.spares=0",
            "train.eval_every=0"]
    cfg = apply_overrides(JobConfig(), [*helpers.tiny, *sets, f"data.path={token_dir}"]).validate()
    node = plan_nodes(cfg).groups[2][1]
    run_dir = tmp_path / "exact-shrink"
    proc = train(run_dir, *sets, f"ft.faults=['stage={node}@step=4,phase=backward']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "paths planned again over 7 nodes" in proc.stdout, proc.stdout[-3000:]
    losses = helpers.step_losses(run_dir)
    run_cfg = load_config(run_dir / "config.toml")
    flat = replace(run_cfg, pipeline=replace(run_cfg.pipeline, stage_nodes=(), microbatches=6))  # the same 6 microbatches of 2 samples
    trainer = LocalTrainer(flat, TokenFile(run_cfg.data.path))
    for step in range(12):
        want = trainer.train_step().loss
        assert losses[step] == pytest.approx(want, rel=1e-5), f"step {step}: {losses[step]} vs failure-free {want}"
