"""`spotpipe eval` and `spotpipe generate` on a SkipPipe node run (``pipeline.stage_nodes``).

A node run's checkpoint holds one file per node, keyed by schedule stage (node ``n``'s copy of
model stage ``chunk_stage[n]``, and on a stage-0 node its head ``N + i``). The run directories
here are written as the workers write them: each node's chunks are built by the worker's own
:meth:`NodeRole.build_chunks` (keyed by schedule stage), hold the weights of their model stage
from a :class:`NodePathTrainer` trained a few steps, and go through ``StageState.to_checkpoint``;
the manifest lists every node. The placement of the plan is not the identity (stage 1 sits on
nodes 6 and 7 here), so a loader that read node ``s`` for stage ``s`` would get wrong weights.
A real `spotpipe train` node run is read in tests/integration/test_integration_skippipe.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spotpipe.cli import main
from spotpipe.config import JobConfig, config_to_toml, load_config
from spotpipe.data.tokens import TokenFile
from spotpipe.errors import SpotpipeError
from spotpipe.model.sampling import sample_tokens
from spotpipe.runtime.control.job import checkpoint_layout
from spotpipe.runtime.control.nodeplan import plan_nodes
from spotpipe.runtime.inprocess.evaluate import evaluate_skipping
from spotpipe.runtime.inprocess.paths import NodePathTrainer
from spotpipe.runtime.inprocess.restore import load_trained_run, stage_chunks
from spotpipe.runtime.inprocess.skipsets import fixed_stages, skip_count, skippable_stages
from spotpipe.runtime.state.checkpoint import checkpoint_dir, rank_file_name, save_state, write_manifest
from spotpipe.runtime.state.pick import build_chunk_optimizer
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.worker.nodes import NodeRole

WORDS = ["alpha", "beta", "gamma", "delta", "pipeline", "stage", "spot", "skip"]
NODES = ["model.layers=4", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=4",
         "pipeline.stage_nodes=[2,2,2,2]", "pipeline.microbatches=3", "train.batch_size=12", "pipeline.skip_ratio=0.25",
         "pipeline.max_swaps=1", "pipeline.full_every=2", "pipeline.plan_budget=300", "network.latency_ms=1",
         "sim.layer_forward_s=0.001", "train.warmup_steps=1", "train.lr=1e-2", "train.eval_batches=2", "run.plot=false"]
STEPS = 4


def write_node_run(run_dir: Path, cfg: JobConfig, trainer: NodePathTrainer, nodes: list[int] | None = None) -> None:
    """Write ``trainer``'s model as a node run directory: config.toml, one file per node (what
    Worker.save_checkpoint writes for a node) and the manifest listing ``nodes`` (default: all)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config_to_toml(cfg))
    plan = trainer.plan
    chunk_stage = plan.train.chunk_stage
    assert chunk_stage is not None
    step = trainer.step - 1
    directory = checkpoint_dir(run_dir, step)
    files = {}
    for node in range(plan.train.num_ranks) if nodes is None else nodes:
        chunks = NodeRole(cfg, plan, node).build_chunks(torch.device("cpu"))  # schedule stage -> module
        for key, module in chunks.items():
            module.load_state_dict(trainer.chunks[chunk_stage[key]].state_dict())
        state = StageState(chunks, build_chunk_optimizer(chunks, cfg.train))
        saved = {"format": "spotpipe-stage-state", "step": step, "rank": node, "state": state.to_checkpoint(),
                 "sampler": trainer.sampler.state_dict()}
        files[node] = (rank_file_name(node), save_state(directory / rank_file_name(node), saved))
    write_manifest(directory, step, files, checkpoint_layout(cfg, plan.train.num_stages))


@pytest.fixture(scope="module")
def node_run(tmp_path_factory: pytest.TempPathFactory, word_corpus: Callable[..., TokenFile],
             one_thread: None) -> tuple[Path, NodePathTrainer]:
    """A 4-stage node run on 8 nodes trained 4 steps along its planned paths, and its reference."""
    tmp = tmp_path_factory.mktemp("noderun")
    corpus = word_corpus(tmp, WORDS, seed=7)
    cfg = load_config(None, [*NODES, f"data.path={corpus.dir}", f"run.dir={tmp / 'run'}"])
    torch.manual_seed(0)
    trainer = NodePathTrainer(cfg, corpus, plan_nodes(cfg))
    for _ in range(STEPS):
        trainer.train_step()
    write_node_run(tmp / "run", cfg, trainer)
    return tmp / "run", trainer


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_head_is_apart_so_only_stage_0_is_fixed() -> None:
    cfg = load_config(None, NODES)
    placement = stage_chunks(cfg)
    assert placement == ((0, 4), (1,), (2,), (3,))
    assert fixed_stages(placement, 5) == {0: "the embedding and the head"}
    assert skippable_stages(placement, 5) == [1, 2, 3]
    assert [skip_count(f, placement, 5) for f in (0.25, 0.5, 0.75, 0.9)] == [1, 2, 3, 3]
    plain = load_config(None, [s for s in NODES if not s.startswith("pipeline.stage_nodes")])
    assert skippable_stages(stage_chunks(plain), 4) == [1, 2]  # a full pipeline keeps its last stage
    with pytest.raises(SpotpipeError, match=r"= 3 of 4 stages, but only 2 may be skipped \(stage 0 holds the "
                                            r"embedding, stage 3 holds the head\)"):
        skip_count(0.75, stage_chunks(plain), 4)


def test_a_node_run_restores_every_stage_from_its_nodes(node_run: tuple[Path, NodePathTrainer]) -> None:
    run_dir, trainer = node_run
    groups = trainer.plan.groups
    assert groups != ((0, 1), (2, 3), (4, 5), (6, 7))  # the placement is not the config's order
    run = load_trained_run(run_dir)
    assert isinstance(run.trainer, NodePathTrainer) and run.nodes == groups
    assert run.step == STEPS - 1 and run.stage_chunks == ((0, 4), (1,), (2,), (3,)) and len(run.chunks) == 5
    assert run.chunks[4].head is not None and run.chunks[3].head is None  # the head apart, the last blocks without it
    for i, (mine, theirs) in enumerate(zip(run.chunks, trainer.chunks)):  # every trained weight back, bit for bit
        for (k, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), (i, k)
    assert evaluate_skipping(run, ()).loss == trainer.evaluate()  # the reference's evaluation, the same windows


def test_a_node_run_may_skip_its_last_block_stage(node_run: tuple[Path, NodePathTrainer],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, trainer = node_run
    out = _json(["eval", str(run_dir), "--skip-stages", "3", "--samples", "10", "--json"], capsys)
    assert out["stages"] == 4 and out["chunks"] == 5 and out["stage_nodes"] == [list(g) for g in trainer.plan.groups]
    assert out["full"]["loss"] == trainer.validation_loss(10)
    weighted = 0.0
    with torch.no_grad():  # by hand: blocks of stages 0, 1, 2, then the head
        for start in range(0, 10, 12):
            ids = list(range(start, min(start + 12, 10)))
            batch = torch.from_numpy(trainer.val_sampler.batch(trainer.token_file, ids))
            x = batch[:, :-1]
            for i in (0, 1, 2):
                x = trainer.chunks[i](x)
            weighted += float(trainer.chunks[4](x, batch[:, 1:])) * len(ids)
    assert out["skipped"]["skipped"] == [3] and out["skipped"]["loss"] == pytest.approx(weighted / 10, rel=1e-6)
    assert abs(out["skipped"]["loss"] - out["full"]["loss"]) > 1e-4
    assert main(["eval", str(run_dir), "--skip-stages", "1,2"]) == 0
    text = capsys.readouterr().out.splitlines()
    first = ",".join(str(g[0]) for g in trainer.plan.groups)
    assert f"4 stages on 8 nodes (SkipPipe, the stages read from nodes {first}; 5 chunks with the head apart" in text[0]
    assert text[3].split()[0] == "1,2"


def test_skip_fraction_of_a_node_run_may_leave_out_every_stage_but_0(node_run: tuple[Path, NodePathTrainer],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = node_run
    out = _json(["eval", str(run_dir), "--skip-fraction", "0.75", "--samples", "4", "--json"], capsys)
    frac = out["skip_fraction"]
    assert frac["skipped_per_set"] == 3 and frac["possible_sets"] == 1 and [s["skipped"] for s in frac["sets"]] == [[1, 2, 3]]
    out = _json(["eval", str(run_dir), "--skip-fraction", "0.9", "--samples", "4", "--json"], capsys)
    assert out["skip_fraction"]["skipped_per_set"] == 3  # SkipPipe's rule keeps one stage: every stage but 0 goes
    err = _error(["eval", str(run_dir), "--skip-stages", "3,0"], capsys)
    assert "stage 0 holds the embedding and the head and cannot be skipped; stages 1..3 may be skipped" in err
    assert "out of range: the run has 4 stages (0..3)" in _error(["eval", str(run_dir), "--skip-stages", "4"], capsys)


def test_generate_from_a_node_run(node_run: tuple[Path, NodePathTrainer], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, trainer = node_run
    for skip, chunks in (([], ()), (["--skip-stages", "3"], (3,))):
        assert main(["generate", str(run_dir), "--prompt", "alpha", "--tokens", "12", "--seed", "2", *skip]) == 0
        text = capsys.readouterr().out.rstrip("\n")
        new = sample_tokens(trainer.chunks, list(b"alpha"), 12, seed=2, skip=chunks)  # the reference's weights
        assert len(new) == 12 and text == bytes(list(b"alpha") + new).decode("utf-8", "replace")


def test_a_node_run_with_a_missing_node_file_is_one_line(node_run: tuple[Path, NodePathTrainer], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, trainer = node_run
    groups = trainer.plan.groups
    gone = shutil.copytree(run_dir, tmp_path / "gone")
    step_dir = next((gone / "checkpoints").glob("step-*"))
    (step_dir / rank_file_name(groups[1][0])).unlink()
    err = _error(["eval", str(gone)], capsys)
    assert f"file {rank_file_name(groups[1][0])} of rank {groups[1][0]} is missing" in err
    cfg = load_config(run_dir / "config.toml")
    unlisted = [n for n in range(8) if n != groups[1][0]]  # a manifest without the first node of stage 1:
    write_node_run(tmp_path / "unlisted", cfg, trainer, unlisted)  # (a node lost and planned around)
    assert main(["generate", str(tmp_path / "unlisted"), "--prompt", "a", "--tokens", "2"]) == 0  # its peer is read
    capsys.readouterr()
    neither = [n for n in range(8) if n not in groups[1]]  # no node of stage 1 at all
    write_node_run(tmp_path / "neither", cfg, trainer, neither)
    err = _error(["generate", str(tmp_path / "neither"), "--prompt", "a"], capsys)
    assert f"has no file for node {groups[1][0]} (model stage 1)" in err
