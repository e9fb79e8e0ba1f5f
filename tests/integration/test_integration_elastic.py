"""Elastic training on real worker processes (``ft.elastic``): a lost worker with no replacement
shrinks the job, a worker that joins (`spotpipe worker --join`) grows it, and every shape trains on
the failure-free run's samples in the failure-free order, so the losses equal the single-process
reference step for step."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ELASTIC = ["ft.elastic=true", "ft.spares=0", "train.eval_every=0", "train.steps=12"]


def reference_losses(run_dir: Path, steps: int) -> list[float]:
    """The single-process trainer's losses of the run's config, step by step (the failure-free run)."""
    from spotpipe.config import load_config
    from spotpipe.data.tokens import TokenFile
    from spotpipe.runtime.inprocess.local import LocalTrainer

    cfg = load_config(run_dir / "config.toml")
    trainer = LocalTrainer(cfg, TokenFile(cfg.data.path))
    return [trainer.train_step().loss for _ in range(steps)]


def assert_failure_free(run_dir: Path, helpers: Any) -> dict[int, float]:
    losses = helpers.step_losses(run_dir)
    want = reference_losses(run_dir, max(losses) + 1)
    assert sorted(losses) == list(range(len(want)))
    for step, loss in losses.items():
        assert loss == pytest.approx(want[step], rel=1e-5), f"step {step}: {loss} vs failure-free {want[step]}"
    return losses


def reshapes(events: list[dict[str, Any]], kinds: tuple[str, ...] = ("shrink", "grow")) -> list[dict[str, Any]]:
    return [r for r in events if r["event"] == "reshape" and r["kind"] in kinds]


@pytest.mark.timeout(240)
def test_one_replica_lost_stage_is_re_partitioned_over_three_workers_exactly(tmp_path: Path, train: Callable[..., Any],
                                                                             helpers: Any) -> None:
    """4 -> 3 stages: the lost stage's blocks come from its mirror, the others move peer to peer,
    and every step's loss equals the failure-free reference within 1e-5."""
    run_dir = tmp_path / "repartition"
    proc = train(run_dir, *ELASTIC, "ft.strategy=mirror", "ft.faults=['stage=2@step=4,phase=backward']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = helpers.read_events(run_dir)
    (shrink,) = reshapes(events)
    assert (shrink["from"], shrink["to"], shrink["lost"]) == ("4x1", "3x1", [2])
    assert shrink["bytes"] > 0 and "re-partition model.layers into 3 stage(s)" in shrink["why"]
    assert not [r for r in events if r["event"] == "worker_start" and r["worker"] >= 4], "a replacement was started"
    shapes = {r["shape"] for r in events if r["event"] == "step"}
    assert shapes == {"4x1", "3x1"}
    assert "time at shape 4x1" in proc.stdout and "lost to shrinking" in proc.stdout
    assert_failure_free(run_dir, helpers)


@pytest.mark.timeout(240)
def test_with_replicas_a_lost_worker_drops_its_replica_group_exactly(tmp_path: Path, train: Callable[..., Any],
                                                                     helpers: Any) -> None:
    """4x2 -> 4x1: the replica that lost a worker stands by, the other runs all 8 microbatches of
    the global batch; the losses equal the failure-free reference within 1e-5."""
    run_dir = tmp_path / "drop-group"
    proc = train(run_dir, *ELASTIC, "pipeline.replicas=2", "ft.faults=['stage=1,replica=1@step=4,phase=backward']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (shrink,) = reshapes(helpers.read_events(run_dir))
    assert (shrink["from"], shrink["to"], shrink["bytes"]) == ("4x2", "4x1", 0)
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("worker-*.log"))
    assert logs.count("has no place for this worker: it stands by") == 3
    assert_failure_free(run_dir, helpers)


@pytest.mark.timeout(240)
def test_a_loss_at_a_reshaped_shape_shrinks_again_even_with_a_replace_wait(tmp_path: Path, train: Callable[..., Any],
                                                                          helpers: Any) -> None:
    """4 -> 3 stages after ft.replace_wait_s, then stage 0 is lost at 3x1: its copy is on the last
    stage of the shape in force (not of the configured 4 stages), so the job shrinks to 2x1 at
    once instead of stopping for "no fresh mirror" or rebuilding a configured-shape role."""
    run_dir = tmp_path / "reshaped-wait"
    proc = train(run_dir, *ELASTIC, "ft.replace_wait_s=1",
                 "ft.faults=['stage=1@step=3,phase=backward', 'stage=0@step=8,phase=backward']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    walk = [(r["from"], r["to"]) for r in reshapes(helpers.read_events(run_dir))]
    assert walk == [("4x1", "3x1"), ("3x1", "2x1")], walk
    assert_failure_free(run_dir, helpers)


@pytest.mark.timeout(240)
def test_a_standby_takes_the_lost_position_of_a_reshaped_job(tmp_path: Path, train: Callable[..., Any],
                                                             helpers: Any) -> None:
    """2x2 -> 2x1 (replica 1 dropped; with 2 blocks no 3-stage shape runs, so its live worker stands
    by), then a 2x1 worker is lost: the standby takes its position with the lost stage's mirror
    (a copy into the configured 2x2 roles failed with KeyError (1, 1))."""
    run_dir = tmp_path / "standby-takes-over"
    proc = train(run_dir, *ELASTIC, "model.layers=2", "pipeline.stages=2", "pipeline.replicas=2",
                 "ft.faults=['stage=1,replica=1@step=3,phase=backward', 'stage=1,replica=0@step=7,phase=backward']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    walk = [(r["kind"], r["from"], r["to"]) for r in reshapes(helpers.read_events(run_dir), ("shrink", "replace"))]
    assert walk == [("shrink", "2x2", "2x1"), ("replace", "2x1", "2x1")], walk
    assert "standbys took the lost positions: 2x1 -> 2x1" in proc.stdout
    assert_failure_free(run_dir, helpers)


def _memory_between(cfg_sets: list[str]) -> float:
    """A per-worker memory budget (GB) that holds the configured 4 stages but not 3."""
    from spotpipe.config import JobConfig, apply_overrides
    from spotpipe.ft.elastic import elastic_cost, initial_shape, peak_memory

    cfg = apply_overrides(JobConfig(), cfg_sets).validate()
    cost = elastic_cost(cfg)
    four = peak_memory(initial_shape(cfg.model.layers, 4, 1), cost)[0]
    three = peak_memory(initial_shape(cfg.model.layers, 3, 1), cost)[0]
    assert four < three
    return (four + three) / 2 / 1e9


@pytest.mark.timeout(240)
@pytest.mark.parametrize("limit", ["memory", "min_workers"])
def test_a_shape_that_cannot_run_is_said_in_one_line_and_the_job_is_replaced_instead(
        tmp_path: Path, train: Callable[..., Any], helpers: Any, limit: str) -> None:
    sets = [*ELASTIC, "ft.faults=['stage=2@step=4,phase=backward']"]
    if limit == "memory":
        sets.append(f"pipeline.memory_budget_gb={_memory_between([*helpers.tiny, *sets]):.9f}")
    else:
        sets.append("ft.min_workers=4")
    run_dir = tmp_path / limit
    proc = train(run_dir, *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = helpers.read_events(run_dir)
    assert not reshapes(events)
    (wait,) = reshapes(events, ("wait",))
    said = "GB per worker" if limit == "memory" else "below ft.min_workers = 4"
    assert said in wait["why"] and "no shape runs without a replacement" in wait["why"]
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("elastic:") and said in ln]
    assert [r for r in events if r["event"] == "recovery_finished"], "the lost stage was not replaced"
    assert_failure_free(run_dir, helpers)


@pytest.mark.timeout(420)
def test_every_shape_from_four_workers_down_to_two_and_back_trains_every_step_once(
        tmp_path: Path, token_dir: Path, spotpipe_env: dict[str, str], helpers: Any) -> None:
    """4 -> 3 -> 2 workers (SIGKILL, no replacement) -> 3 -> 4 (`spotpipe worker --join`): each shape
    commits steps, every step is committed exactly once, the two workers that stay throughout keep
    their processes, and the losses equal the failure-free reference."""
    run_dir = tmp_path / "walk"
    args = ["train"]
    for s in [*helpers.tiny, f"data.path={token_dir}", f"run.dir={run_dir}", "train.steps=100000", *ELASTIC[:3]]:
        args += ["--set", s]
    proc = subprocess.Popen(helpers.spotpipe_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=spotpipe_env, cwd=tmp_path)
    joiners: list[subprocess.Popen[str]] = []

    def events() -> list[dict[str, Any]]:
        return helpers.read_events(run_dir) if (run_dir / "events.jsonl").exists() else []

    def wait_for(pred: Callable[[list[dict[str, Any]]], bool], what: str, timeout: float = 150) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"train exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}"
            found = events()
            if pred(found):
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout} s")

    def steps(found: list[dict[str, Any]]) -> int:
        return sum(r["event"] == "step" for r in found)

    def three_more_steps() -> None:
        n = steps(events())
        wait_for(lambda e: steps(e) >= n + 3, "3 more steps")

    try:
        wait_for(lambda e: steps(e) >= 3, "3 steps")
        first_pids = {r["worker"]: r["pid"] for r in events() if r["event"] == "worker_start"}
        for i, stage in enumerate((2, 1)):
            three_more_steps()
            gen = [r for r in events() if r["event"] == "generation"][-1]
            os.kill(first_pids[gen["workers"][stage]], signal.SIGKILL)  # one replica: world rank = stage
            wait_for(lambda e, i=i: len(reshapes(e)) > i, "shrink")
        address = next(r["address"] for r in events() if r["event"] == "run_start")
        for i in range(2):
            three_more_steps()
            joiners.append(subprocess.Popen(
                helpers.spotpipe_cmd("worker", "--join", address, "--token-file", str(run_dir / "job.token")),
                env=spotpipe_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            wait_for(lambda e, i=i: len(reshapes(e)) > 2 + i, "grow", 180)
        three_more_steps()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        for j in joiners:
            j.communicate(timeout=60)
    finally:
        for p in [proc, *joiners]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 130, err[-3000:]
    found = events()
    walk = [(r["from"], r["to"]) for r in reshapes(found)]
    assert walk == [("4x1", "3x1"), ("3x1", "2x1"), ("2x1", "3x1"), ("3x1", "4x1")], walk
    by_shape = [r["shape"] for r in found if r["event"] == "step"]
    for before, after in walk:
        assert after in by_shape[by_shape.index(before):], f"no step at {after} after {before}"
    # No worker restarted: workers 0 and 3 kept their processes (one worker_start each), the
    # joiners are workers 4 and 5.
    assert sorted(r["worker"] for r in found if r["event"] == "worker_start") == [0, 1, 2, 3, 4, 5]
    assert "time at shape 4x1" in out and "3x1" in out and "2x1" in out
    assert_failure_free(run_dir, helpers)


@pytest.mark.parametrize("sets, said", [
    (["ft.min_workers=5"], "ft.min_workers must be in [1, pipeline.stages x pipeline.replicas = 4], got 5"),
    (["pipeline.memory_budget_gb=0.00001"], "the configured shape 4x1 needs"),
    (["pipeline.schedule=interleaved"], "ft.elastic re-partitions one model chunk per stage"),
])
def test_bad_elastic_input_is_one_line_before_any_worker_starts(tmp_path: Path, train: Callable[..., Any], helpers: Any,
                                                               sets: list[str], said: str) -> None:
    run_dir = tmp_path / "bad"
    proc = train(run_dir, *ELASTIC, *sets, timeout=60)
    helpers.assert_one_line_error(proc, said)
    assert not (run_dir / "events.jsonl").exists()
