"""The simulator's ``sim.recovery = "policy"``: spotpipe's own recovery policy, priced on the cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spotpipe import events as ev
from spotpipe.config import JobConfig, apply_overrides
from spotpipe.errors import ConfigError
from spotpipe.events import EventLog, read_events
from spotpipe.model.partition import DTYPE_BYTES, block_params, model_shapes
from spotpipe.sim.ftpolicy import PlannedRecovery, stage_bytes
from spotpipe.sim.job import prepare, simulate_job
from spotpipe.network import Network, parse_matrix, uniform_link
from spotpipe.sim.recovery import CheckpointRestart, FailureContext, build_policy, last_heartbeat

pytestmark = pytest.mark.timeout(30)

BASE = ["pipeline.stages=4", "pipeline.microbatches=4", "train.batch_size=8", "model.layers=4", "train.steps=10",
        "sim.device_tflops=0.01", "network.latency_ms=2", "network.bandwidth_gbps=0.1", "run.heartbeat_s=0.5",
        "ft.detect_timeout_s=2.0", "sim.recovery=policy"]


def job(*overrides: str) -> JobConfig:
    return apply_overrides(JobConfig(), BASE + list(overrides)).validate()


def ctx(cfg: JobConfig, lost: list[tuple[int, int]], step: int = 7, checkpoint: int | None = None,
        locations: tuple[str, ...] = ()) -> FailureContext:
    return FailureContext(now=10.0, failed_at=9.0, lost=tuple(lost), lost_nodes=(), step=step, checkpoint_step=checkpoint,
                          free_nodes=0, config=cfg, locations=locations)


def full_state_bytes(cfg: JobConfig, rank: int) -> int:
    """Weights + two AdamW moments of one rank (one chunk per rank), straight from the model shapes."""
    return 3 * model_shapes(cfg.model, cfg.pipeline.stages)[rank].param_bytes


def step_time(cfg: JobConfig) -> float:
    return simulate_job(prepare(apply_overrides(cfg, ["train.steps=1", "sim.failures=[]"]))).step_time_s


def test_config_accepts_policy_and_checks_regroup() -> None:
    assert JobConfig().sim.recovery == "checkpoint"  # existing results do not move
    assert isinstance(build_policy(JobConfig()), CheckpointRestart)
    assert isinstance(build_policy(job()), PlannedRecovery)
    with pytest.raises(ConfigError, match="sim.recovery must be one of checkpoint, policy"):
        job("sim.recovery=magic")
    with pytest.raises(ConfigError, match="sim.regroup_s must be >= 0"):
        job("sim.regroup_s=-1")


def test_mirror_recovery_resumes_without_rollback_in_replacement_plus_transfer_time(tmp_path: Path) -> None:
    base = job("ft.strategy=mirror", "sim.replace_s=20", "sim.regroup_s=1.5", "train.checkpoint_every=4")
    t = step_time(base)
    fail_at = 5.5 * t  # in step 5 (0-based), after the checkpoint of step 4, 5 steps committed
    cfg = apply_overrides(base, [f"sim.failures=['2@{fail_at!r}']"]).validate()
    with EventLog(tmp_path / "e.jsonl") as log:
        result = simulate_job(prepare(cfg), log=log)
    link = uniform_link(cfg.network.latency_ms, cfg.network.bandwidth_gbps)
    moved = full_state_bytes(cfg, 2)
    transfer = cfg.network.latency_ms / 1e3 + moved / (cfg.network.bandwidth_gbps * 1e9 / 8)
    assert transfer == pytest.approx(link.send_s(moved)) and transfer > 0.1  # the transfer is visible
    downtime = cfg.sim.replace_s + transfer + cfg.sim.regroup_s  # no spare: wait for the replacement
    assert result.status == "finished" and result.steps == 10
    assert result.replayed_steps == 0 and result.restarts == 1
    assert result.wall_s == pytest.approx(fail_at + downtime + 5 * t)
    records = read_events(tmp_path / "e.jsonl")
    started = [r for r in records if r["event"] == ev.RECOVERY_STARTED]
    finished = [r for r in records if r["event"] == ev.RECOVERY_FINISHED]
    assert len(started) == 1 and started[0]["strategy"] == "mirror" and started[0]["resume_step"] == 5
    assert "mirror held by stage 1" in started[0]["why"] and "without rollback" in started[0]["why"]
    assert len(finished) == 1 and finished[0]["strategy"] == "mirror" and finished[0]["exact"] is True
    assert finished[0]["bytes"] == moved and "mirror" in finished[0]["why"]
    assert finished[0]["seconds"] == pytest.approx(downtime)
    assert [r["step"] for r in records if r["event"] == ev.STEP_REPLAYED] == [5]  # only the interrupted step
    assert [r["step"] for r in records if r["event"] == ev.STEP] == list(range(10))


def test_replica_transfer_uses_the_link_between_source_and_target_locations() -> None:
    matrix = parse_matrix("location_a,location_b,latency_ms,bandwidth_GiB_per_s\na,b,40,0.01\n", "m.csv")
    cfg = job("pipeline.stages=2", "pipeline.replicas=2", "model.layers=2", "ft.strategy=auto")
    local = uniform_link(cfg.network.latency_ms, cfg.network.bandwidth_gbps)
    policy = PlannedRecovery(Network(4, local, matrix, ("a", "a", "b", "b")))
    # slots replica x 2 + rank: replica 0 in a, replica 1 in b; stage 1 replica 0 copies from b.
    decision = policy.decide(ctx(cfg, [(1, 0)], locations=("a", "a", "b", "b")))
    moved = full_state_bytes(cfg, 1)
    transfer = 0.040 + moved / (0.01 * 2**30)
    assert decision.strategy == "replica" and decision.resume_step == 7 and not decision.stop
    assert decision.bytes == moved and decision.workers[0].exact
    assert decision.restart_s == pytest.approx(transfer + cfg.sim.regroup_s)
    # Both replicas in one location: the uniform link.
    same = policy.decide(ctx(cfg, [(1, 0)], locations=("b", "b", "b", "b")))
    assert same.restart_s == pytest.approx(local.send_s(moved) + cfg.sim.regroup_s)


def test_checkfree_moves_the_neighbours_blocks_from_two_sources() -> None:
    cfg = job("ft.strategy=checkfree")
    decision = PlannedRecovery().decide(ctx(cfg, [(1, 0)]))
    per_block = block_params(cfg.model) * DTYPE_BYTES[cfg.model.dtype]  # one layer per stage
    link = uniform_link(cfg.network.latency_ms, cfg.network.bandwidth_gbps)
    assert decision.strategy == "checkfree" and decision.resume_step == 7
    assert decision.bytes == 2 * per_block  # stage 0's embedding stays home
    assert stage_bytes(cfg).weights[0] > per_block
    assert decision.restart_s == pytest.approx(link.send_s(per_block) + cfg.sim.regroup_s)
    assert not decision.workers[0].exact


def test_checkfree_plus_copies_an_edge_stage_from_its_swap_partner() -> None:
    cfg = job("ft.strategy=checkfree+")
    decision = PlannedRecovery().decide(ctx(cfg, [(3, 0)]))
    assert decision.strategy == "checkfree+" and decision.workers[0].bytes == full_state_bytes(cfg, 3)
    assert "swap partner stage 2" in decision.workers[0].why
    assert PlannedRecovery().decide(ctx(job("ft.strategy=checkfree"), [(3, 0)], checkpoint=4)).strategy == "checkpoint"


def test_mirror_lag_follows_mirror_every() -> None:
    cfg = job("ft.strategy=mirror", "ft.mirror_every=3")
    fresh = PlannedRecovery().decide(ctx(cfg, [(2, 0)], step=6))
    stale = PlannedRecovery().decide(ctx(cfg, [(2, 0)], step=8))
    assert fresh.workers[0].exact and "(exact)" in fresh.why
    assert not stale.workers[0].exact and "2 steps behind" in stale.why and stale.resume_step == 8


def test_auto_recovers_adjacent_stages_with_a_mirror_then_checkfree() -> None:
    cfg = job("ft.strategy=auto")
    decision = PlannedRecovery().decide(ctx(cfg, [(1, 0), (2, 0)], checkpoint=4))
    assert decision.strategy == "checkfree/mirror" and decision.resume_step == 7
    assert {w.stage: w.strategy for w in decision.workers} == {1: "mirror", 2: "checkfree"}


def test_adjacent_stages_without_replicas_roll_back_to_the_checkpoint(tmp_path: Path) -> None:
    base = job("ft.strategy=checkfree", "train.checkpoint_every=4", "sim.replace_s=3", "sim.restart_s=7")
    t = step_time(base)
    fail_at = 6.5 * t  # in step 6: steps 4 and 5 are thrown away
    cfg = apply_overrides(base, [f"sim.failures=['1@{fail_at!r}', '2@{fail_at!r}']"]).validate()
    with EventLog(tmp_path / "e.jsonl") as log:
        result = simulate_job(prepare(cfg), log=log)
    detect = last_heartbeat(fail_at, 0.5) + 2.0
    assert result.status == "finished" and result.steps == 10
    assert result.replayed_steps == 2 and result.restarts == 1
    assert result.wall_s == pytest.approx(max(detect, fail_at + 3) + 7 + 6 * t)
    records = read_events(tmp_path / "e.jsonl")
    started = [r for r in records if r["event"] == ev.RECOVERY_STARTED]
    assert started and all(r["strategy"] == "checkpoint" and r["resume_step"] == 4 for r in started)
    assert "checkpoint of step 4" in started[0]["why"] and "adjacent" in started[0]["why"]
    assert [r["step"] for r in records if r["event"] == ev.STEP_REPLAYED] == [4, 5, 6]


def test_unrecoverable_without_a_checkpoint_stops_the_job(tmp_path: Path) -> None:
    base = job("ft.strategy=checkfree", "train.checkpoint_every=0")
    t = step_time(base)
    cfg = apply_overrides(base, [f"sim.failures=['0@{3.5 * t!r}']"]).validate()  # edge stage: no CheckFree
    with EventLog(tmp_path / "e.jsonl") as log:
        result = simulate_job(prepare(cfg), log=log)
    assert result.status == "failed" and result.steps == 3 and result.restarts == 0
    records = read_events(tmp_path / "e.jsonl")
    started = [r for r in records if r["event"] == ev.RECOVERY_STARTED]
    assert len(started) == 1 and started[0]["strategy"] == "stop"
    assert "no checkpoint" in started[0]["why"] and "edge stage" in started[0]["why"]
    assert records[-1]["event"] == ev.RUN_END and records[-1]["status"] == "failed"
    # With ft.strategy = none a loss stops the job even with a checkpoint.
    none = PlannedRecovery().decide(ctx(job("ft.strategy=none"), [(2, 0)], checkpoint=4))
    assert none.stop and none.strategy == "stop" and "ft.strategy = none" in none.why


def test_policy_beats_checkpoint_restart_under_the_same_seeded_failures(tmp_path: Path) -> None:
    common = ["train.steps=300", "train.checkpoint_every=20", "sim.failure_rate=300", "sim.replace_s=10",
              "sim.restart_s=20", "sim.checkpoint_write_s=0.5", "ft.strategy=auto"]
    ettr: dict[str, list[float]] = {"checkpoint": [], "policy": []}
    for seed in range(8):
        out, first = {}, {}
        for recovery in ("checkpoint", "policy"):
            cfg = job(*common, f"sim.seed={seed}", f"sim.recovery={recovery}")
            path = tmp_path / f"{seed}-{recovery}.jsonl"
            with EventLog(path) as log:
                out[recovery] = simulate_job(prepare(cfg), log=log)
            first[recovery] = [(r["t"], r["worker"]) for r in read_events(path, ev.FAILURE_SUSPECTED)][:1]
            ettr[recovery].append(out[recovery].ettr)
        ckpt, pol = out["checkpoint"], out["policy"]
        assert ckpt.status == pol.status == "finished"
        assert first["checkpoint"] == first["policy"]  # the same seeded process: same first failure
        assert pol.replayed_steps <= ckpt.replayed_steps
        assert pol.ettr >= ckpt.ettr - 1e-12
    assert sum(1 for c, p in zip(ettr["checkpoint"], ettr["policy"]) if p > c) >= 4
    assert sum(ettr["policy"]) / 8 > sum(ettr["checkpoint"]) / 8 + 0.1


def test_ftpolicy_does_not_import_torch() -> None:
    code = "import sys, spotpipe.sim.ftpolicy, spotpipe.sim.job; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=20).returncode == 0


def test_ftpolicy_and_the_recovery_hooks_import_one_way() -> None:
    # sim.recovery (build_policy) imports sim.ftpolicy; both share sim.decision; never the reverse
    code = "import sys, spotpipe.sim.ftpolicy; sys.exit('spotpipe.sim.recovery' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=20).returncode == 0
