"""Whole simulated jobs: steps, checkpoints, failures, detection, checkpoint restart, events."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from spotpipe import events as ev
from spotpipe.config import JobConfig, apply_overrides
from spotpipe.errors import ConfigError
from spotpipe.events import EventLog, read_events
from spotpipe.ft.confirm import GROUPING_WINDOW_S
from spotpipe.sim.cluster import FAIL, JOIN, NodeEvent, parse_failures, parse_preemption_trace
from spotpipe.sim.job import prepare, simulate_job
from spotpipe.sim.recovery import CheckpointRestart, FailureContext, RecoveryDecision, detection_time, last_heartbeat

pytestmark = pytest.mark.timeout(60)

BAMBOO = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "bamboo-spot-traces" / "p3-trace.csv"
EVENT_NAMES = {v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str)}


def job(*overrides: str) -> JobConfig:
    base = ["pipeline.stages=3", "pipeline.microbatches=4", "train.batch_size=8", "model.layers=3",
            "train.steps=10", "sim.device_tflops=0.01", "network.latency_ms=2", "run.heartbeat_s=0.5",
            "ft.detect_timeout_s=2.0"]
    return apply_overrides(JobConfig(), base + list(overrides)).validate()


def test_failure_free_job(tmp_path: Path) -> None:
    cfg = job("train.checkpoint_every=4", "sim.checkpoint_write_s=0.5")
    setup = prepare(cfg)
    with EventLog(tmp_path / "events.jsonl") as log:
        result = simulate_job(setup, log=log)
    t = result.step_time_s
    assert result.status == "finished" and result.steps == 10
    assert result.wall_s == pytest.approx(10 * t + 2 * 0.5)  # checkpoints after steps 4 and 8
    assert result.checkpoints == 2 and result.failures == 0
    assert result.ettr == pytest.approx(10 * t / result.wall_s)
    records = read_events(tmp_path / "events.jsonl")
    assert {r["event"] for r in records} <= EVENT_NAMES
    assert [r["t"] for r in records] == sorted(r["t"] for r in records)
    steps = [r for r in records if r["event"] == ev.STEP]
    assert [r["step"] for r in steps] == list(range(10))  # 0-based, as the runtime writes them
    assert all(r["step_time"] == pytest.approx(t) for r in steps)
    assert steps[-1]["t"] == pytest.approx(10 * t + 1.0)  # after two checkpoint writes
    assert records[0]["event"] == ev.RUN_START and records[0]["mode"] == "sim"
    assert records[-1]["event"] == ev.RUN_END and records[-1]["status"] == "finished"
    assert sum(r["event"] == ev.WORKER_START for r in records) == 3


def test_failure_restarts_from_checkpoint_on_a_spare(tmp_path: Path) -> None:
    t = simulate_job(prepare(job("train.steps=1"))).step_time_s
    fail_at = 4 * t + 0.5 + 1.5 * t  # in step 6, after the checkpoint of step 4
    cfg = job("train.checkpoint_every=4", "sim.checkpoint_write_s=0.5", "sim.spares=1", "sim.restart_s=7",
              f"sim.failures=['1@{fail_at!r}']")
    with EventLog(tmp_path / "e.jsonl") as log:
        result = simulate_job(prepare(cfg), log=log)
    detect = last_heartbeat(fail_at, 0.5) + 2.0
    assert result.failures == 1 and result.restarts == 1 and result.replayed_steps == 1
    # planned once the grouping window after the loss has closed, as the controller plans
    assert result.wall_s == pytest.approx(detect + GROUPING_WINDOW_S + 7 + 6 * t + 0.5)
    assert result.ettr == pytest.approx(10 * t / result.wall_s)
    records = read_events(tmp_path / "e.jsonl")
    suspected = [r for r in records if r["event"] == ev.FAILURE_SUSPECTED]
    assert len(suspected) == 1 and suspected[0]["t"] == pytest.approx(detect)
    assert suspected[0]["worker"] == 1 and suspected[0]["stage"] == 1 and "no heartbeat" in suspected[0]["reason"]
    started = [r for r in records if r["event"] == ev.RECOVERY_STARTED][0]
    assert started["strategy"] == "checkpoint" and "checkpoint of step 4" in started["why"]
    gen = [r for r in records if r["event"] == ev.GENERATION]
    assert gen[-1]["generation"] == 1 and gen[-1]["workers"] == [0, 3, 2]  # the spare took rank 1
    assert [r["step"] for r in records if r["event"] == ev.STEP_REPLAYED] == [4, 5]
    assert [r["step"] for r in records if r["event"] == ev.STEP] == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9]
    assert [r["step"] for r in records if r["event"] == ev.CHECKPOINT] == [3, 7]
    assert [r["generation"] for r in records if r["event"] == ev.STEP][-1] == 1


def test_without_spares_the_job_waits_for_a_replacement() -> None:
    t = simulate_job(prepare(job("train.steps=1"))).step_time_s
    fail_at = 2.5 * t
    cfg = job("sim.restart_s=3", "sim.replace_s=40", f"sim.failures=['0@{fail_at!r}']")
    result = simulate_job(prepare(cfg))
    # no checkpoint: restart from step 0 once the replacement arrived (40 s after the failure)
    assert result.wall_s == pytest.approx(fail_at + 40 + 3 + 10 * t)
    assert result.replayed_steps == 2


def test_failure_of_an_idle_spare_changes_nothing() -> None:
    base = simulate_job(prepare(job("sim.spares=2")))
    hit = simulate_job(prepare(job("sim.spares=2", "sim.failures=['4@0.001']")))
    assert hit.spare_failures == 1 and hit.failures == 0 and hit.wall_s == pytest.approx(base.wall_s)


def test_poisson_failures_are_seeded() -> None:
    cfg = job("train.steps=200", "train.checkpoint_every=10", "sim.failure_rate=2000", "sim.spares=2",
              "sim.restart_s=1", "sim.replace_s=2")
    a, b = simulate_job(prepare(cfg)), simulate_job(prepare(cfg))
    assert a.failures > 0 and a.wall_s == b.wall_s and a.failures == b.failures
    c = simulate_job(prepare(replace(cfg, sim=replace(cfg.sim, seed=5))))
    assert c.wall_s != a.wall_s
    assert a.ettr < 1 and a.steps == 200 and a.status == "finished"


def test_geographic_replacement_takes_the_lost_nodes_place(tmp_path: Path) -> None:
    matrix = tmp_path / "m.csv"
    matrix.write_text("location_a,location_b,latency_ms,bandwidth_GiB_per_s\nA,B,50,1\n")
    cfg = job(f"network.matrix={str(matrix)!r}", "network.locations=['A','B','A']", "sim.spares=1",
              "network.locations=['A','B','A','B']", "sim.failures=['0@0.001']", "sim.restart_s=1")
    result = simulate_job(prepare(cfg))
    # The spare is in B: afterwards ranks 0 and 1 are both in B, so the step gets faster.
    assert result.restarts == 1 and result.wall_s < 1 + 2.0 + 10 * result.step_time_s


class StopPolicy:
    name = "stop"

    def decide(self, ctx: FailureContext) -> RecoveryDecision:
        assert ctx.lost == ((2, 0),) and ctx.lost_nodes == (2,)
        return RecoveryDecision("stop", ctx.step, 0.0, False, "give up", stop=True)


def test_policy_and_detector_hooks() -> None:
    cfg = job("sim.failures=['2@0.3']")
    result = simulate_job(prepare(cfg), policy=StopPolicy())
    # heartbeat at 0, timeout 2, then the grouping window before the policy is asked
    assert result.status == "failed" and result.wall_s == pytest.approx(2.0 + GROUPING_WINDOW_S)

    class Now:
        def __init__(self, suspects: tuple[int, ...]) -> None:
            self.suspects, self.reasons = suspects, {s: "told" for s in suspects}

    def oracle(now: float, beats: dict[int, float], config: object) -> Now:
        return Now(tuple(w for w, seen in beats.items() if seen <= 0.0 and now > 0.3))

    when, why = detection_time(2, 0.3, {0: 0.0, 1: 0.0}, 0.5, cfg.ft, detector=oracle)
    assert why == "told" and when == pytest.approx(2.0)  # first check at the ft deadline
    assert CheckpointRestart(5.0).decide(FailureContext(1, 0.5, ((0, 0),), (0,), 7, None, 0, cfg)).resume_step == 0


def test_parse_failures_and_trace() -> None:
    assert parse_failures(["3@1.5", "0@0"], 4) == [NodeEvent(0.0, FAIL, 0), NodeEvent(1.5, FAIL, 3)]
    for bad, msg in [("x@1", "expected NODE@SECONDS"), ("9@1", r"node 9 out of range \[0, 3\]"), ("1@-2", "time must be >= 0")]:
        with pytest.raises(ConfigError, match=msg):
            parse_failures([bad], 4)
    text = "0,add,n1\n0,add,n2\n1000,remove,n2\n2500,add,n3\n3000,add,n2\n4000,remove,n2\n"
    assert parse_preemption_trace(text, 2) == [
        NodeEvent(1.0, FAIL, 1), NodeEvent(2.5, JOIN, 2), NodeEvent(3.0, JOIN, 3), NodeEvent(4.0, FAIL, 3)
    ]
    with pytest.raises(ConfigError, match=r"t.csv:2: remove of node 'zz', which is not up"):
        parse_preemption_trace("0,add,n1\n5,remove,zz\n", 1, "t.csv")
    with pytest.raises(ConfigError, match=r"t.csv:1: expected '<ms>,<add\|remove>,<node>'"):
        parse_preemption_trace("0,up,n1\n", 1, "t.csv")


@pytest.mark.skipif(not BAMBOO.is_file(), reason="shared data ../shared/data/bamboo-spot-traces not present")
def test_bamboo_trace_replay() -> None:
    cfg = job("pipeline.stages=4", "model.layers=4", "pipeline.replicas=4", "train.batch_size=16",
              "sim.spares=4", f"sim.failure_trace={str(BAMBOO)!r}", "train.steps=2000",
              "train.checkpoint_every=100", "sim.device_tflops=0.0005")
    result = simulate_job(prepare(cfg))
    assert result.status == "finished" and result.failures > 0 and result.restarts > 0
    assert result.ettr < 1 and not math.isnan(result.ettr)


def test_failure_at_time_zero_and_a_second_failure_during_restart() -> None:
    t = simulate_job(prepare(job("train.steps=1"))).step_time_s
    r0 = simulate_job(prepare(job("sim.failures=['0@0']", "sim.spares=1", "sim.restart_s=5")))
    # detected at 0 + timeout, planned after the grouping window
    assert r0.failures == 1 and r0.wall_s == pytest.approx(2.0 + GROUPING_WINDOW_S + 5 + 10 * t)
    # Node 1 dies while the job restarts after node 0's failure: the restart begins again.
    r2 = simulate_job(prepare(job("sim.failures=['0@0', '1@4.0']", "sim.spares=2", "sim.restart_s=5")))
    assert r2.failures == 2 and r2.restarts == 1 and r2.generations == 2
    assert r2.wall_s == pytest.approx(last_heartbeat(4.0, 0.5) + 2.0 + GROUPING_WINDOW_S + 5 + 10 * t)


def test_peak_memory_follows_recompute_and_offload() -> None:
    # The simulator's peak memory is the memory model's (spotpipe.planner predicts the same).
    from spotpipe.config import load_config
    from spotpipe.planner import predict_memory
    from spotpipe.sim.report import peak_memory

    base = ["pipeline.schedule=chronos", "pipeline.microbatches=8"]
    plain = peak_memory(prepare(load_config(None, base)))
    again = peak_memory(prepare(load_config(None, [*base, "pipeline.recompute=all"])))
    away = peak_memory(prepare(load_config(None, [*base, "pipeline.recompute=all", "pipeline.offload=optimizer"])))
    assert all(a < p for a, p in zip(again, plain)) and all(b < a for b, a in zip(away, again))
    cfg = load_config(None, [*base, "pipeline.recompute=all", "pipeline.offload=optimizer"])
    assert away == pytest.approx([r.peak for r in predict_memory(cfg)])
