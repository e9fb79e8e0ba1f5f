"""The seeded fault plan and real signals to a real process (the spec grammar: tests/test_faultspec.py)."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import pytest

from spotpipe.config import load_config
from spotpipe.errors import ConfigError
from spotpipe.faultspec import FaultSpecError, parse_fault_spec, rate_per_step
from spotpipe.ft.faults import Fault, FaultPlan, deliver


def test_plan_fixed_steps_and_adjacent_pairs():
    plan = FaultPlan.from_texts(["stage=2@step=4", "stages=1+2@step=6", "stage=3,replica=1@step=4,stall=2s"],
                                num_stages=4, replicas=2, total_steps=10, seed=3)
    at4 = plan.faults_at(4)
    assert {(f.stage, f.kind) for f in at4} == {(2, "kill"), (3, "stall")}
    assert [f for f in at4 if f.kind == "stall"][0].replica == 1
    at6 = plan.faults_at(6)
    assert sorted(f.stage for f in at6) == [1, 2] and len({f.replica for f in at6}) == 1
    assert plan.faults_at(5) == ()
    with pytest.raises(FaultSpecError, match="stage 5 does not exist"):
        FaultPlan.from_texts(["stage=5@step=1"], num_stages=4)


def test_plan_is_deterministic_and_order_free():
    texts = ["stage=1@random", "10%/h", "3%/step"]
    a = FaultPlan.from_texts(texts, num_stages=6, total_steps=300, seed=7, step_time_s=60.0)
    b = FaultPlan.from_texts(texts, num_stages=6, total_steps=300, seed=7, step_time_s=60.0)
    forward = a.all_faults()
    backward = [f for step in reversed(range(300)) for f in b.faults_at(step)]
    assert forward == sorted(backward, key=lambda f: (f.step, f.at_fraction, f.stage, f.replica))
    assert forward != FaultPlan.from_texts(texts, num_stages=6, total_steps=300, seed=8, step_time_s=60.0).all_faults()
    once = [f for f in forward if f.spec == "stage=1@random"]
    assert len(once) == 1 and 1 <= once[0].step < 300 and 0 <= once[0].at_fraction < 1


def test_rates_convert_with_the_step_time():
    assert rate_per_step(0.10, 3600.0) == pytest.approx(1 - math.exp(-0.1))
    plan = FaultPlan.from_texts(["16%/h"], num_stages=6, total_steps=20000, seed=1)
    assert plan.needs_step_time
    with pytest.raises(FaultSpecError, match="needs the step time"):
        plan.faults_at(0)
    n = len(plan.with_step_time(36.0).all_faults())
    expected = 6 * 20000 * rate_per_step(0.16, 36.0)  # 6 workers x 200 h x 0.16/h = 192
    assert abs(n - expected) < 4 * math.sqrt(expected)
    per_step = FaultPlan.from_texts(["2%/step"], num_stages=4, total_steps=5000, seed=2).all_faults()
    assert abs(len(per_step) - 400) < 4 * math.sqrt(400)
    assert {f.stage for f in per_step} == {0, 1, 2, 3}


@pytest.mark.timeout(30)
def test_deliver_sigkill_to_a_real_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        deliver(proc.pid, Fault(step=0, stage=0, replica=0, kind="kill"))
        assert proc.wait(timeout=30) == -9
        with pytest.raises(FaultSpecError, match="no such process"):
            deliver(proc.pid, Fault(step=0, stage=0, replica=0, kind="kill"))
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_for_state(pid: int, states: tuple[str, ...], timeout_s: float = 20.0) -> str:
    """The process state once it is one of ``states`` (or the last seen at the deadline)."""
    deadline = time.monotonic() + timeout_s
    state = _state(pid)
    while state not in states and time.monotonic() < deadline:
        time.sleep(0.01)
        state = _state(pid)
    return state


@pytest.mark.timeout(30)
def test_deliver_stall_stops_then_continues_a_real_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        handle = deliver(proc.pid, Fault(step=0, stage=0, replica=0, kind="stall", stall_s=0.4))
        assert _wait_for_state(proc.pid, ("T",)) == "T"  # stopped
        t0 = time.monotonic()
        handle.wait(timeout=20)
        assert time.monotonic() - t0 < 10.0  # released after the stall, not after the 30 s sleep
        assert _wait_for_state(proc.pid, ("S", "R")) in ("S", "R")  # running again
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(FaultSpecError, match="refusing"):
        deliver(0, Fault(step=0, stage=0, replica=0))


def test_convergence_config_loads_with_rate_faults():
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "convergence.toml")
    assert cfg.pipeline.stages >= 6 and cfg.model.layers % cfg.pipeline.stages == 0
    plan = FaultPlan.from_texts(cfg.ft.faults, cfg.pipeline.stages, total_steps=cfg.train.steps,
                                step_time_s=cfg.ft.rate_step_time_s)
    assert not plan.needs_step_time or plan.step_time_s == cfg.ft.rate_step_time_s > 0
    with pytest.raises(ConfigError, match="needs >= 4 pipeline stages"):
        load_config(None, ["ft.strategy=checkfree+", "pipeline.stages=2"])


def test_phase_faults_parse_and_travel_with_their_fault() -> None:
    from spotpipe.faultspec import PHASES

    spec = parse_fault_spec("stage=2@step=40,phase=backward")
    assert spec.phase == "backward" and spec.step == 40 and spec.kind == "kill"
    plan = FaultPlan.from_texts(["stage=1@step=3,phase=optimizer", "stage=2@step=3"], 4, 1, 10)
    assert sorted((f.stage, f.phase) for f in plan.faults_at(3)) == [(1, "optimizer"), (2, "")]
    assert set(PHASES) == {"forward", "backward", "allreduce", "optimizer", "recovery"}
    for bad, why in (("stage=1@step=3,phase=sideways", "phase must be one of"),
                     ("stage=1@stall=2s,phase=forward", "not with a stall or a rate"),
                     ("stage=1@5%/h,phase=forward", "not with a stall or a rate")):
        with pytest.raises(FaultSpecError, match=why):
            parse_fault_spec(bad)


def test_phase_faults_are_found_without_walking_every_step() -> None:
    import time

    from spotpipe.ft.faults import FaultPlan

    plan = FaultPlan.from_texts(["stage=1@step=3,phase=optimizer", "stage=2@random,phase=backward", "stage=0@step=5"], 4, 1,
                                10_000_000, seed=3)
    t0 = time.perf_counter()
    found = plan.phase_faults()
    assert time.perf_counter() - t0 < 0.5
    assert [(f.step, f.stage, f.phase) for f in found if f.stage == 1] == [(3, 1, "optimizer")]
    drawn = [f for f in found if f.stage == 2]
    assert len(drawn) == 1 and drawn[0].phase == "backward" and plan.faults_at(drawn[0].step) == (drawn[0],)
    assert all(f.phase for f in found)
