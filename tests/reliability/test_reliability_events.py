"""ETTR, failures and time lost from spotpipe's own events.jsonl (written here, as the runtime would)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotpipe import events as ev
from spotpipe.cli import main
from spotpipe.events import EventLog
from spotpipe.reliability.runs import read_runs


def _run_with_one_failure(path: Path) -> None:
    """10 steps, a checkpoint, 2 more steps, a failure, 5 s recovery, steps 11-12 redone, 13-15, end."""
    with EventLog(path) as log:
        log.write(ev.RUN_START, t=0.0, name="demo", mode="runtime", world=4)
        for step in range(1, 11):
            log.write(ev.STEP, t=float(step), step=step, step_time=1.0, loss=2.0)
        log.write(ev.CHECKPOINT, t=10.5, step=10, seconds=0.5)
        log.write(ev.STEP, t=11.5, step=11, step_time=1.0)
        log.write(ev.STEP, t=12.5, step=12, step_time=1.0)
        log.write(ev.FAILURE_SUSPECTED, t=12.8, worker=2, stage=1, replica=0, reason="heartbeat")
        log.write(ev.FAILURE_CONFIRMED, t=13.0, worker=2, stage=1, replica=0, reason="heartbeat")
        log.write(ev.RECOVERY_STARTED, t=13.0, stage=1, replica=0, strategy="checkpoint", why="lost")
        log.write(ev.RECOVERY_FINISHED, t=18.0, stage=1, replica=0, strategy="checkpoint", bytes=10, seconds=5.0)
        log.write(ev.STEP, t=19.0, step=11, step_time=1.0)
        log.write(ev.STEP, t=20.0, step=12, step_time=1.0)
        log.write(ev.STEP, t=20.0, step=12, step_time=1.0, worker=1)  # a second writer, same step
        for step in (13, 14, 15):
            log.write(ev.STEP, t=float(step + 8), step=step, step_time=1.0)
        log.write(ev.RUN_END, t=24.0, steps=15, wall=24.0, status="finished")


def test_ettr_failures_and_time_lost_from_events(tmp_path):
    path = tmp_path / "events.jsonl"
    _run_with_one_failure(path)
    runs, report = read_runs(path)
    assert report.malformed_count == 0
    (run,) = runs
    assert run.name == "demo" and run.status == "finished"
    assert run.wall_s == 24.0
    assert run.steps == 15
    assert run.productive_s == 15.0
    assert run.ettr == pytest.approx(15 / 24)
    assert run.failures == 1
    assert run.recovery_s == 5.0 and run.mean_recovery_s == 5.0
    assert run.checkpoint_s == 0.5
    assert run.redone_s == 2.0  # steps 11 and 12 were rolled back and redone
    assert run.duplicate_steps == 1
    assert run.lost_s == 9.0
    assert run.other_lost_s == pytest.approx(1.5)
    assert run.mttf_hours == pytest.approx(24 / 3600)


def test_analyze_cli_on_events_and_plan_with_measured_recovery(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    _run_with_one_failure(path)
    assert main(["reliability", "analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["files"][0]
    assert data["format"] == "events"
    run = data["runs"][0]
    assert run["ettr"] == pytest.approx(0.625) and run["failures"] == 1 and run["time_lost_s"] == 9.0
    assert main(["reliability", "analyze", str(path)]) == 0
    assert "ETTR 0.6250" in capsys.readouterr().out
    assert main(["reliability", "plan", "--gpus", "64", "--rf", "6.5", "--recovery-from", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recovery_s"] == 5.0


def test_run_without_failures_or_end_and_bad_records(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [
        {"event": "run_start", "t": 100.0, "name": "a"},
        {"event": "step", "t": 110.0, "step": 1},
        {"event": "step", "t": 120.0, "step": 2},
        {"event": "step", "t": "late", "step": 3},
        {"event": "step", "t": 130.0, "step": "three"},
        {"event": "step", "t": 130.0, "step": 3},
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in lines[3:]) + "\n")
    runs, report = read_runs(path)
    assert [(p.line, p.message.split(":")[0]) for p in report.malformed] == [(5, "step"), (6, "step")]
    (run,) = runs
    assert run.failures == 0 and run.mttf_hours is None
    assert run.mttf_text == "no failures observed (> 0.00833 h of exposure)"
    assert run.wall_s == 30.0
    assert run.productive_s == 30.0  # three steps without step_time: the median gap, 10 s each
    assert any("no run_end" in n for n in run.notes)


def test_two_runs_in_one_file_are_reported_separately(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        for name, t0 in (("first", 0.0), ("second", 100.0)):
            log.write(ev.RUN_START, t=t0, name=name)
            log.write(ev.STEP, t=t0 + 4, step=1, step_time=4.0)
            log.write(ev.RUN_END, t=t0 + 8, status="finished")
    runs, _ = read_runs(path)
    assert [(r.name, r.ettr) for r in runs] == [("first", 0.5), ("second", 0.5)]
