"""The simulator groups losses into recoveries by the controller's rules (ft/confirm.py).

With a fast detector (heartbeats every 0.05 s, suspected after 0.05 s) a loss is confirmed 0.05 s
after the node dies, so the grouping window of 0.3 s, not detection, decides what is one failure:
two losses confirmed 0.1 s apart are one recovery, planned the window after the second; two
losses 5 s apart are two. Planned at once instead, the first recovery would be over (a restart
of 0.02 s on a spare) before the second node died.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spotpipe import events as ev
from spotpipe.config import JobConfig, apply_overrides
from spotpipe.events import EventLog, read_events
from spotpipe.ft.confirm import GROUPING_WINDOW_S
from spotpipe.sim.job import JobResult, prepare, simulate_job

pytestmark = pytest.mark.timeout(60)


def fast_detection_job(*overrides: str) -> JobConfig:
    """4 stages, 40 steps of about a quarter second, losses confirmed 0.05 s after the death."""
    base = ["pipeline.stages=4", "pipeline.microbatches=4", "train.batch_size=8", "model.layers=4",
            "train.steps=40", "sim.device_tflops=0.01", "network.latency_ms=2", "run.heartbeat_s=0.05",
            "ft.detect_timeout_s=0.05", "sim.spares=3", "sim.restart_s=0.02"]
    return apply_overrides(JobConfig(), base + list(overrides)).validate()


def run(tmp_path: Path, failures: list[str], *overrides: str) -> tuple[JobResult, list[dict[str, Any]]]:
    """Simulate with ``sim.failures = failures``; the result and the event records."""
    cfg = fast_detection_job(f"sim.failures={failures!r}", *overrides)
    with EventLog(tmp_path / "e.jsonl") as log:
        result = simulate_job(prepare(cfg), log=log)
    return result, read_events(tmp_path / "e.jsonl")


def plans(records: list[dict[str, Any]]) -> list[tuple[float, list[int]]]:
    """Each planning of a recovery: its time and the stages it covers (``recovery_started`` records
    written at one instant)."""
    out: list[tuple[float, list[int]]] = []
    for r in (r for r in records if r["event"] == ev.RECOVERY_STARTED):
        if out and out[-1][0] == r["t"]:
            out[-1][1].append(r["stage"])
        else:
            out.append((r["t"], [r["stage"]]))
    return out


def confirmed(records: list[dict[str, Any]]) -> list[float]:
    return [r["t"] for r in records if r["event"] == ev.FAILURE_CONFIRMED]


def test_two_losses_confirmed_within_the_window_are_one_recovery(tmp_path: Path) -> None:
    result, records = run(tmp_path, ["0@1.0", "1@1.1"])
    first, second = confirmed(records)
    assert second - first == pytest.approx(0.1)
    assert result.failures == 2 and result.restarts == 1 and result.generations == 2
    [(at, stages)] = plans(records)
    assert stages == [0, 1] and at == pytest.approx(second + GROUPING_WINDOW_S)


def test_two_losses_5_s_apart_are_two_recoveries(tmp_path: Path) -> None:
    result, records = run(tmp_path, ["0@1.0", "1@6.0"])
    first, second = confirmed(records)
    assert result.failures == 2 and result.restarts == 2 and result.generations == 3
    assert [(round(t, 9), s) for t, s in plans(records)] == [
        (round(first + GROUPING_WINDOW_S, 9), [0]), (round(second + GROUPING_WINDOW_S, 9), [1])]


def test_a_loss_just_after_the_window_is_a_second_recovery(tmp_path: Path) -> None:
    """Confirmed 0.4 s after the first (the window is 0.3 s): the first recovery is planned and
    over before the second node dies."""
    result, records = run(tmp_path, ["0@1.0", "1@1.4"])
    assert result.restarts == 2 and [s for _, s in plans(records)] == [[0], [1]]


def test_each_loss_within_the_window_of_the_previous_extends_it(tmp_path: Path) -> None:
    """0.2 s apart each: 0.4 s from the first to the third, but every loss restarts the window."""
    result, records = run(tmp_path, ["0@1.0", "1@1.2", "2@1.4"])
    last = confirmed(records)[-1]
    assert result.restarts == 1
    [(at, stages)] = plans(records)
    assert stages == [0, 1, 2] and at == pytest.approx(last + GROUPING_WINDOW_S)


def test_a_loss_while_lost_positions_wait_for_nodes_replans_at_once(tmp_path: Path) -> None:
    """No spare: the first recovery is planned and waits for a replacement; a second loss then is
    planned again at its confirmation with both positions (the controller's ``replace`` phase)."""
    result, records = run(tmp_path, ["0@1.0", "1@1.6"], "sim.spares=0", "sim.replace_s=1.0")
    first, second = confirmed(records)
    started = [r for r in records if r["event"] == ev.RECOVERY_STARTED]
    assert [(r["stage"], r["replanned"]) for r in started] == [(0, False), (0, True), (1, True)]
    assert started[0]["t"] == pytest.approx(first + GROUPING_WINDOW_S) and started[1]["t"] == pytest.approx(second)
    assert result.restarts == 1


def test_the_stop_reason_is_the_best_explanation(tmp_path: Path) -> None:
    """A policy that cannot recover (no checkpoint, CheckFree on an edge stage) stops the job; the
    run's end names why, as the controller's does."""
    result, records = run(tmp_path, ["0@1.0"], "sim.recovery='policy'", "ft.strategy='checkfree'")
    assert result.status == "failed"
    end = records[-1]
    assert end["event"] == ev.RUN_END and end["status"] == "failed"
    assert end["reason"].startswith("cannot recover: ") and "edge stage" in end["reason"]
