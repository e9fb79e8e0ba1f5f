"""Pipeline training on real worker processes reproduces single-process training.

Same seed, 30 steps, 4 stages, fp32, a tiny model: the per-step losses of GPipe, 1F1B,
interleaved 1F1B and chronos with recompute and optimizer offload (and 1F1B with 2 replicas per stage) equal
LocalTrainer's within 1e-5 relative, and the
CheckFree+ swap schedule (odd microbatches through stages 1, 0, 2, 3 ... with the embedding and head
copies kept in sync across workers) equals the in-process PipelineTrainer's (the same lowered swap
schedule played by the executor, every rank in one process);
a run resumed from a checkpoint reproduces the uninterrupted run's losses exactly; `spotpipe eval`
and `spotpipe generate` read the workers' checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

CASES = {
    "gpipe": ["pipeline.schedule=gpipe"],
    "1f1b": ["pipeline.schedule=1f1b", "train.checkpoint_every=10"],
    "interleaved": ["pipeline.schedule=interleaved", "pipeline.virtual_stages=2"],
    "1f1b-2replicas": ["pipeline.schedule=1f1b", "pipeline.replicas=2"],
    "checkfree+": ["pipeline.schedule=1f1b", "ft.strategy=checkfree+"],  # the CheckFree+ swap schedule
    # V placement, R actions, AdamW moments in host memory
    "chronos-recompute-offload": ["pipeline.schedule=chronos", "pipeline.recompute=longest", "pipeline.offload=optimizer"],
    "bf16-masters": ["pipeline.schedule=1f1b", "model.dtype=bfloat16"],  # float32 master weights
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, train: Callable[..., Any]) -> Callable[[str], Path]:
    """Run each case once (lazily) and hand out its run directory."""
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            run_dir = tmp_path_factory.mktemp("runs") / case
            proc = train(run_dir, *CASES[case])
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "finished: 30 steps" in proc.stdout, proc.stdout[-2000:]
            done[case] = run_dir
        return done[case]

    return get


def reference(run_dir: Path) -> tuple[list[float], dict[int, float]]:
    """LocalTrainer's (PipelineTrainer's under CheckFree+) per-step losses and validation losses for the
    run's own resolved config."""
    import torch

    from spotpipe.config import load_config
    from spotpipe.data.tokens import TokenFile
    from spotpipe.runtime.inprocess.convergence import swap_on
    from spotpipe.runtime.inprocess.local import LocalTrainer
    from spotpipe.runtime.inprocess.player import PipelineTrainer

    cfg = load_config(run_dir / "config.toml")
    torch.set_num_threads(1)
    trainer = (PipelineTrainer if swap_on(cfg) else LocalTrainer)(cfg, TokenFile(cfg.data.path))
    losses, vals = [], {}
    for step in range(cfg.train.steps):
        losses.append(trainer.train_step().loss)
        if (step + 1) % cfg.train.eval_every == 0:
            vals[step] = trainer.evaluate()
    return losses, vals


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_losses_equal_single_process(case: str, runs: Callable[[str], Path], helpers: Any) -> None:
    run_dir = runs(case)
    events = helpers.read_events(run_dir)
    losses = helpers.step_losses(run_dir)
    assert sorted(losses) == list(range(30))
    ref, ref_vals = reference(run_dir)
    for step, want in enumerate(ref):
        assert losses[step] == pytest.approx(want, rel=1e-5), f"step {step}: pipeline {losses[step]} vs local {want}"
    assert losses[29] < losses[0] - 0.5, "the tiny model should learn in 30 steps"
    vals = {r["step"]: r["val_loss"] for r in events if r["event"] == "eval"}
    assert sorted(vals) == [9, 19, 29]
    for step, want in ref_vals.items():
        assert vals[step] == pytest.approx(want, rel=1e-5)
    # The log: one worker_start per role with its pid, a generation, steps with sampler position.
    replicas = 2 if "replicas" in case else 1
    starts = [r for r in events if r["event"] == "worker_start"]
    assert sorted((r["stage"], r["replica"]) for r in starts) == [(s, r) for s in range(4) for r in range(replicas)]
    assert all(r["pid"] > 0 for r in starts)
    steps = [r for r in events if r["event"] == "step"]
    assert [r["sampler"]["position"] for r in steps[:3]] == [8, 16, 24]
    assert all(r["tokens"] == 8 * 16 and r["step_time"] > 0 and r["lr"] > 0 for r in steps)
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "finished"
    assert (run_dir / "config.toml").is_file()
    # Measured memory per rank in every step, within 10% of the memory model's prediction once the
    # optimizer state exists (after the first update).
    from spotpipe.config import load_config
    from spotpipe.planner import predict_memory

    predicted = [r.peak for r in predict_memory(load_config(run_dir / "config.toml"))]
    for r in steps[1:]:
        assert len(r["peak_bytes"]) == 4 and all(b > 0 for b in r["activation_bytes"])
        for rank, (got, want) in enumerate(zip(r["peak_bytes"], predicted)):
            assert got == pytest.approx(want, rel=0.10), f"step {r['step']} rank {rank}"


@pytest.mark.timeout(300)
def test_resume_reproduces_uninterrupted_losses(
    runs: Callable[[str], Path], train: Callable[..., Any], helpers: Any, tmp_path: Path
) -> None:
    original = runs("1f1b")
    full = helpers.step_losses(original)
    full_vals = {r["step"]: r["val_loss"] for r in helpers.read_events(original) if r["event"] == "eval"}
    # Pretend the run stopped after step 9: keep only that checkpoint.
    copy = tmp_path / "resumed"
    shutil.copytree(original, copy)
    ckpts = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert ckpts == ["step-000009", "step-000019", "step-000029"]
    for name in ckpts[1:]:
        shutil.rmtree(copy / "checkpoints" / name)
    proc = train(copy, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = helpers.step_losses(copy, after_last_start=True)
    assert sorted(resumed) == list(range(10, 30))
    for step in range(10, 30):
        assert resumed[step] == full[step], f"step {step}: resumed {resumed[step]} != uninterrupted {full[step]}"
    events = helpers.read_events(copy)
    start = [r for r in events if r["event"] == "run_start"][-1]
    assert start["resumed_from"] == 9 and start["start_step"] == 10
    vals = {r["step"]: r["val_loss"] for r in events[events.index(start):] if r["event"] == "eval"}
    assert vals == {19: full_vals[19], 29: full_vals[29]}


NONFINITE = ["train.lr=1e8", "train.warmup_steps=0", "model.d_model=64", "train.steps=5", "train.eval_every=0"]


@pytest.mark.timeout(180)
def test_a_nonfinite_step_stops_the_job_with_one_line(tmp_path: Path, train: Callable[..., Any], helpers: Any) -> None:
    """Issue 10, section 6: lr = 1e8 makes step 2's gradient norm NaN. The update is not applied,
    and the job stops (train.nonfinite = "stop", the default) with one line naming the step; it
    never exits 0 after training on NaN, and no NaN loss is committed."""
    run_dir = tmp_path / "stop"
    proc = train(run_dir, *NONFINITE)
    line = helpers.assert_one_line_error(proc, "step 2/5: the gradient norm is nan", "its update was not applied",
                                         "train.nonfinite")
    assert "after step 1/5" in line, line
    events = helpers.read_events(run_dir)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [0] and all(e["loss"] == e["loss"] for e in steps)
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "failed"


@pytest.mark.timeout(180)
def test_nonfinite_steps_can_be_skipped(tmp_path: Path, train: Callable[..., Any], helpers: Any) -> None:
    """With train.nonfinite = "skip" the run finishes; each skipped step is committed once (the data
    order is kept), says why in its event, and the summary counts them."""
    run_dir = tmp_path / "skip"
    proc = train(run_dir, *NONFINITE, "train.nonfinite=skip")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    events = helpers.read_events(run_dir)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(5))
    skipped = [e["step"] for e in steps if e.get("skipped")]
    assert skipped == [1, 2, 3, 4] and all("the gradient norm is nan" in e["skipped"] for e in steps[1:]), steps
    assert "skipped" not in steps[0]
    assert len({json.dumps(e["sampler"], sort_keys=True) for e in steps}) == 5  # the data moved on every step
    assert all(e["loss"] == e["loss"] for e in steps)  # the weights stayed finite
    assert "4 steps skipped (non-finite, train.nonfinite = skip)" in proc.stdout, proc.stdout[-2000:]
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "finished"
    starts = [e for e in events if e["event"] == "worker_start"]
    for e in starts:  # each worker_start names the log file of its worker (files go by start order)
        assert f"worker {e['worker']} (stage {e['stage']}" in (run_dir / e["log"]).read_text(), e


@pytest.mark.timeout(240)
def test_skipping_stops_once_the_model_has_diverged(tmp_path: Path, train: Callable[..., Any], helpers: Any) -> None:
    """Skipping a non-finite step cannot help once every step is non-finite (the first, finite
    update of lr 1e8 already ruined the weights): after 5 skipped steps in a row the job stops with
    one line, never "finished"."""
    run_dir = tmp_path / "diverged"
    sets = [s if not s.startswith("train.steps=") else "train.steps=9" for s in NONFINITE]
    proc = train(run_dir, *sets, "train.nonfinite=skip")
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "5 steps in a row were not finite" in proc.stderr and "Traceback" not in proc.stderr
    events = helpers.read_events(run_dir)
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "failed"


@pytest.mark.timeout(300)
def test_eval_and_generate_read_the_workers_checkpoint(runs: Callable[[str], Path], helpers: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With nothing skipped `spotpipe eval` gives the workers' own validation loss after the last
    step (the same windows); a skipped stage changes it; `generate` continues the prompt."""
    from spotpipe.cli import main

    run_dir = runs("1f1b")
    vals = {r["step"]: r["val_loss"] for r in helpers.read_events(run_dir) if r["event"] == "eval"}
    assert main(["eval", str(run_dir), "--skip-stages", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 29 and out["full"]["loss"] == pytest.approx(vals[29], rel=1e-5)
    assert out["skipped"]["skipped"] == [2] and out["skipped"]["loss"] != out["full"]["loss"]
    assert main(["generate", str(run_dir), "--prompt", "KING", "--tokens", "8", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("KING") and len(text.rstrip("\n")) > 4
