"""The controller's fault injector: arms a step's faults when it starts, fires real signals once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from spotpipe.config import load_config
from spotpipe.runtime.control.inject import FaultInjector


@pytest.mark.timeout(30)
def test_a_fault_fires_once_with_sigkill_and_waits_for_a_vacant_role() -> None:
    cfg = load_config(None, ["pipeline.stages=4", "model.layers=8", "train.steps=10", 'ft.faults=["stage=2@step=3"]'])
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder: dict[tuple[int, int], tuple[int, int] | None] = {(2, 0): None}
    fired: list[tuple[int, int, int]] = []
    inj = FaultInjector(cfg, lambda s, r: holder.get((s, r)), lambda f, w, pid: fired.append((f.step, w, pid)))
    try:
        for step in range(3):
            inj.step_started(step, time.monotonic())
            inj.poll(time.monotonic())
        assert not fired and not inj.armed
        inj.step_started(3, time.monotonic())
        inj.poll(time.monotonic())
        assert not fired and len(inj.armed) == 1  # role vacant (a recovery under way): wait
        holder[(2, 0)] = (7, victim.pid)
        inj.poll(time.monotonic())
        assert fired == [(3, 7, victim.pid)]
        assert victim.wait(timeout=10) == -9  # a real SIGKILL
        inj.step_started(3, time.monotonic())  # the replayed step: no second kill
        inj.poll(time.monotonic())
        assert fired == [(3, 7, victim.pid)] and not inj.armed
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_random_moments_are_delayed_by_the_expected_step_time() -> None:
    cfg = load_config(None, ["pipeline.stages=4", "model.layers=8", "train.steps=50", 'ft.faults=["stage=1@random"]'])
    inj = FaultInjector(cfg, lambda s, r: None, lambda f, w, pid: None)
    for _ in range(5):
        inj.step_committed(2.0, first_of_generation=False)
    fault = next(f for step in range(50) for f in inj.fixed.faults_at(step))
    now = 100.0
    inj.step_started(fault.step, now)
    assert len(inj.armed) == 1
    assert inj.armed[0].due == pytest.approx(now + fault.at_fraction * 2.0)
    assert 0.0 < fault.at_fraction < 1.0
