"""Smoke test of bench/elastic_trace.py's pure parts: thinning and slicing a Bamboo trace, the
replacement delays, the figures from a run's events (a restarted job's too), the restart pauses,
and the simulator's calibrated prediction.

The real replay (worker processes, SIGKILL, ``worker --join``) is ``python bench/elastic_trace.py
--quick``: about 3 minutes, too slow for a test."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
try:
    import elastic_trace as et
finally:
    sys.path.pop(0)

from spotpipe.config import load_config  # noqa: E402
from spotpipe.sim.cluster import NodeEvent  # noqa: E402

# Eight nodes a..h up at 0; a later joiner i; removals of a job node (b), a pool node (g), and of c.
TRACE = """0,add,a
0,add,b
0,add,c
0,add,d
0,add,e
0,add,f
0,add,g
0,add,h
60000,remove,b
120000,remove,g
180000,add,i
240000,remove,c
300000,add,j
"""


def test_thin_keeps_one_node_in_n_by_first_appearance() -> None:
    kept = et.thin_trace(TRACE, 2, 0).split()
    assert kept == ["0,add,a", "0,add,c", "0,add,e", "0,add,g", "120000,remove,g", "180000,add,i", "240000,remove,c"]
    assert et.thin_trace(TRACE, 1, 0).split() == TRACE.split()
    with pytest.raises(et.BenchError, match="--group"):
        et.thin_trace(TRACE, 2, 2)
    with pytest.raises(et.BenchError, match="trace:2"):
        et.thin_trace("0,add,a\n5,del,a\n", 1, 0)


def test_slice_rebases_the_nodes_up_at_its_start() -> None:
    text = et.slice_trace(TRACE, 100.0, 150.0)
    # b is gone by 100 s; the others are up at the slice's 0; from 100 to 250 s: g, i and c; not j
    assert text.split() == ["0,add,a", "0,add,c", "0,add,d", "0,add,e", "0,add,f", "0,add,g", "0,add,h",
                            "20000,remove,g", "80000,add,i", "140000,remove,c"]
    with pytest.raises(et.BenchError, match="slice"):
        et.slice_trace(TRACE, -1.0, 10.0)


def test_replay_events_map_and_compress(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(TRACE)
    cfg = load_config(None, ["pipeline.stages=4", "sim.spares=0"])
    events = et.replay_events(cfg, trace, 1, 0, 0.0, 30.0, 10.0, tmp_path)
    # nodes 0..3 = a..d (the job), 4..7 = e..h join the pool at 0, i = 8 joins at 18 s
    assert [(e.time, e.kind, e.node) for e in events if e.time > 0] == [
        (6.0, "fail", 1), (12.0, "fail", 6), (18.0, "join", 8), (24.0, "fail", 2), (30.0, "join", 9)]
    assert sum(1 for e in events if e.time == 0 and e.kind == "join") == 4
    delays = et.replacement_delays(events, 4)
    assert [d["delay_s"] for d in delays] == [0.0, 0.0]  # the pool always had an idle node
    thin = et.replay_events(cfg, trace, 2, 0, 0.0, 30.0, 10.0, tmp_path)  # a, c, e, g up: the job; i joins later
    assert et.replacement_delays(thin, 4) == [{"node": 3, "at_s": 12.0, "delay_s": 6.0},
                                             {"node": 1, "at_s": 24.0, "delay_s": None}]
    with pytest.raises(et.BenchError, match="needs 4"):
        et.replay_events(cfg, trace, 4, 0, 0.0, 30.0, 10.0, tmp_path)


def _step(t: float, step: int, generation: int, step_time: float = 0.3) -> dict[str, Any]:
    return {"event": "step", "t": t, "step": step, "loss": 3.0, "tokens": 2048, "step_time": step_time, "wall": t - 1000.0,
            "generation": generation, "lr": 1e-3}


def _run_events() -> list[dict[str, Any]]:
    """A run as the runtime writes it: warm-up, a loss, a checkpoint rollback, a reshape."""
    ev: list[dict[str, Any]] = [{"event": "run_start", "t": 1000.0, "name": "x", "world": 4, "mode": "runtime",
                                 "config": {"pipeline": {"stages": 4, "replicas": 1}}}]
    t = 1010.0
    for k in range(12):  # steps 0..11, a checkpoint after step 9
        ev.append(_step(t, k, 1, 5.0 if k == 0 else 0.3))
        if k == 9:
            ev.append({"event": "checkpoint", "t": t + 0.05, "step": 9, "path": "p", "seconds": 0.1})
        t += 0.3
    ev.append({"event": "failure_confirmed", "t": t + 2.0, "worker": 2, "stage": 2, "replica": 0, "reason": "gone"})
    ev.append({"event": "worker_start", "t": t + 5.0, "worker": 4, "stage": 2, "replica": 0, "pid": 4242, "host": "h",
               "generation": 2})
    ev.append({"event": "recovery_finished", "t": t + 6.0, "stage": 2, "replica": 0, "strategy": "checkpoint",
               "bytes": 0, "seconds": 4.0})
    t += 6.5
    for k in range(10, 16):  # rolled back to step 10: steps 10 and 11 are redone
        ev.append(_step(t, k, 2, 6.5 if k == 10 else 0.3))
        t += 0.3
    ev.append({"event": "reshape", "t": t, "kind": "shrink", "from": "4x1", "to": "3x1", "why": "lost 1", "bytes": 10,
               "seconds": 1.5})
    t += 1.5
    for k in range(16, 20):
        ev.append(_step(t, k, 3, 8.0 if k == 16 else 0.4))
        t += 0.4
    return ev


def test_measure_counts_progress_not_redone_steps(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _run_events()) + '{"event": "st')  # a torn last line
    records = et.read_records(path)
    assert records == _run_events()
    t0 = 1010.0 + 10 * 0.3  # the commit of step 10 (warm-up 10 steps)
    window = 30.0
    m = et.measure(records, window, 16, start_step=10)
    assert m["t0"] == pytest.approx(t0)
    assert m["useful_steps"] == 20 - 11  # step 10 committed at t0, step 19 is the last: 9 steps of progress
    assert m["samples_per_s"] == pytest.approx(9 * 16 / window)
    assert m["rollbacks"] == 1 and m["failures"] == 1 and m["recoveries"] == 1
    assert m["reshapes"] == [{"kind": "shrink", "from": "4x1", "to": "3x1", "why": "lost 1", "bytes": 10, "seconds": 1.5}]
    assert m["step_s_by_shape"] == {"4x1": pytest.approx(0.3), "3x1": pytest.approx(0.4)}
    assert m["checkpoints"] == 1 and m["checkpoint_write_s"] == pytest.approx(0.1)
    # steps 11..19 count; 16, the first of generation 3, counts the median step (0.3) instead of its 8 s
    assert m["productive_s"] == pytest.approx(5 * 0.3 + 0.3 + 3 * 0.4)
    assert m["ettr"] == pytest.approx(m["productive_s"] / window)
    short = et.measure(records, 1.0, 16, start_step=10)  # the window ends before the loss
    assert short["useful_steps"] == 1 and short["failures"] == 0
    with pytest.raises(et.BenchError, match="no step after"):
        et.measure(records, window, 16, start_step=50)
    assert et.join_pauses(records, [(4242, 1010.0 + 12 * 0.3 + 4.0), (999, 1012.0)]) == [pytest.approx(2.5)]


def test_prediction_is_calibrated_and_finite() -> None:
    cfg = load_config(None, et.mode_overrides("restart", et.parse_args(["--quick"])))
    m = et.measure(_run_events(), 30.0, 16, start_step=10)
    run = {**m, "pauses_s": [2.5], "round": 0, "reshapes": []}
    cal = et.calibrate([run], cfg)
    assert cal["step_s"] == pytest.approx(0.3) and cal["by_shape"] == {"3x1": pytest.approx(0.4)}
    assert cal["pause_s"] == pytest.approx(2.2) and cal["write_s"] == pytest.approx(0.1)
    assert m["mean_step_s_by_shape"] == {"4x1": pytest.approx(0.3), "3x1": pytest.approx(0.4)}
    assert et.calibrate([{**run, "reshapes": m["reshapes"]}], cfg)["pause_s"] == pytest.approx(1.5)  # elastic: the reshape's
    events = [NodeEvent(4.0, "fail", 2), NodeEvent(13.0, "join", 4)]
    results = {mode: et.predict(cfg, events, mode, 30.0, **cal) for mode in et.MODES}
    for res in results.values():
        assert math.isfinite(res.samples_per_s) and 0 < res.ettr <= 1
    assert results["wait"].samples_per_s > results["restart"].samples_per_s  # the lost steps and the restart cost
    assert results["elastic"].samples_per_s >= results["wait"].samples_per_s
    assert results["restart"].mode == results["rollback"].mode == "checkpoint"  # the simulator's checkpoint mode
    assert et.predict(cfg, events, "checkpoint", 30.0, **cal) == results["rollback"]  # a result's older name
    with pytest.raises(et.BenchError, match="unknown mode 'bogus'"):
        et.predict(cfg, events, "bogus", 30.0, **cal)
    assert et.relative_error(9.0, 10.0) == pytest.approx(0.1) and et.relative_error(1.0, 0.0) == math.inf
    assert et.relative_error(0.0, 0.0) == 0.0  # no progress, none predicted


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert et.main(["--trace", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elastic_trace: error:") and "absent.csv" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        et.parse_args(["--modes", "elastic,bogus"])
    assert exc.value.code == 2


def test_options_and_modes() -> None:
    quick = et.parse_args(["--quick"])
    assert quick.modes == ["elastic", "wait", "restart"] and quick.rounds == 1
    assert quick.checkpoint_every == 5 and quick.warmup == 4 and quick.compress == 40.0  # starts at a checkpoint
    full = et.parse_args([])
    assert full.modes == ["elastic", "wait", "restart", "rollback"] and full.warmup == 19
    assert "ft.strategy=none" in et.mode_overrides("restart", full)
    assert "train.checkpoint_every=20" in et.mode_overrides("restart", full)
    assert "train.checkpoint_every=20" in et.mode_overrides("rollback", full)
    assert "train.checkpoint_every=0" in et.mode_overrides("elastic", full)


def test_summary_leaves_out_failed_runs_and_gives_ratios(tmp_path: Path) -> None:
    args = et.parse_args(["--modes", "elastic,wait,restart,rollback", "--out", str(tmp_path / "r.json")])
    cfgs = {m: load_config(None, et.mode_overrides(m, args)) for m in args.modes}
    m = et.measure(_run_events(), 30.0, 16, start_step=10)
    runs = []
    for k in range(2):
        for mode, sps in (("elastic", 30.0), ("wait", 20.0), ("restart", 10.0), ("rollback", 15.0)):
            runs.append({**m, "mode": mode, "run": f"{mode}-{k}", "round": k, "samples_per_s": sps + k, "error": None,
                         "pauses_s": [2.5], "reshapes": m["reshapes"] if mode == "elastic" else [],
                         "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 2.0, 2.0]})
    runs.append({**runs[-2], "run": "restart-9", "samples_per_s": 1.0, "error": "disturbed"})
    events = [NodeEvent(4.0, "fail", 2), NodeEvent(13.0, "join", 4)]
    out = et.summarise(runs, args, cfgs, events)
    assert out["excluded_runs"] == [{"run": "restart-9", "error": "disturbed"}]
    assert out["by_mode"]["restart"]["runs"] == 2
    assert out["elastic_vs_wait"] == pytest.approx(30.5 / 20.5)
    assert out["elastic_vs_checkpoint"] == pytest.approx(30.5 / 10.5)  # against checkpoint/restart
    assert out["elastic_vs_rollback"] == pytest.approx(30.5 / 15.5)
    for mode in args.modes:
        entry = out["by_mode"][mode]
        assert len(entry["predicted"]) == 2 and len(entry["held_out_errors"]) == 2
        assert entry["error"] == pytest.approx(et.relative_error(entry["predicted_median_samples_per_s"], entry["median_samples_per_s"]))
    by_mode = out["sim_vs_runtime_error_by_mode"]
    assert set(by_mode) == set(args.modes)
    assert out["sim_vs_runtime_error"] == max(by_mode[m] for m in ("elastic", "wait", "restart"))  # not rollback
    written = tmp_path / "w.json"
    written.write_text(json.dumps({"config": {"modes": {m: et.mode_overrides(m, args) for m in args.modes}},
                                   "trace": {"events": [{"time": 4.0, "kind": "fail", "node": 2}], "window_s": 30.0},
                                   "runs": runs}))
    assert et.resummarise(written, tmp_path / "again.json") == 0
    assert json.loads((tmp_path / "again.json").read_text())["excluded_runs"] == out["excluded_runs"]
    assert et.resummarise(tmp_path / "absent.json", tmp_path / "x.json") == 2
    # a result written before the restart mode: its "checkpoint" mode is the in-place rollback
    legacy = [{**r, "mode": "checkpoint"} if r["mode"] == "rollback" else r for r in runs]
    old = {m: et.mode_overrides(m, args) for m in args.modes}
    old["checkpoint"] = old.pop("rollback")
    written.write_text(json.dumps({"config": {"modes": old}, "trace": {"events": [], "window_s": 30.0}, "runs": legacy}))
    assert et.resummarise(written, tmp_path / "again.json") == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["by_mode"]["rollback"]["runs"] == 2 and "checkpoint" not in again["by_mode"]
    written.write_text(json.dumps({"config": {"modes": {"bogus": []}}, "trace": {"events": [], "window_s": 30.0},
                                   "runs": []}))
    assert et.resummarise(written, tmp_path / "x.json") == 2


def test_warnings_name_what_looks_wrong() -> None:
    acts = [{"what": "SIGKILL", "node": 2}, {"what": "join", "node": 4}, {"what": "SIGKILL", "node": 0},
            {"what": "exited", "node": 5, "pid": 7, "rc": 2}]
    run = {"mode": "elastic", "actions": acts, "failures": 1, "reshapes": [{"kind": "shrink"}]}
    assert et.run_warnings(run) == ["2 workers SIGKILLed but 1 failures confirmed in the window",
                                    "1 joiner(s) exited without a role (refused or failed; see failed_joiners)",
                                    "the job shrank and a node joined, but it never grew"]
    fine = {"mode": "elastic", "actions": acts[:3], "failures": 2, "reshapes": [{"kind": "shrink"}, {"kind": "grow"}]}
    assert et.run_warnings(fine) == []


def _restarted_run(resume_at_next: bool = False) -> list[dict[str, Any]]:
    """A restart mode's run: a job lost after step 11 (checkpoints of steps 4 and 9, or 11), started
    again with --resume (its own run_start, generation 1 again, a slow first step), lost again."""
    cfg = {"pipeline": {"stages": 4, "replicas": 1}}
    ev: list[dict[str, Any]] = [{"event": "run_start", "t": 1000.0, "config": cfg, "resumed_from": None}]
    t = 1010.0
    for k in range(12):
        ev.append(_step(t, k, 1, 5.0 if k == 0 else 0.3))
        if k in ((4, 9, 11) if resume_at_next else (4, 9)):
            ev.append({"event": "checkpoint", "t": t + 0.05, "step": k, "path": "p", "seconds": 0.1})
        t += 0.3
    ev.append({"event": "run_end", "t": t + 0.5, "steps": 12, "status": "failed", "reason": "worker 2 lost"})
    saved = 11 if resume_at_next else 9
    ev.append({"event": "run_start", "t": t + 5.0, "config": cfg, "resumed_from": saved})
    t += 15.0
    for k in range(saved + 1, saved + 5):
        ev.append(_step(t, k, 1, 5.0 if k == saved + 1 else 0.3))
        t += 0.3
    ev.append({"event": "run_end", "t": t + 0.5, "steps": saved + 5, "status": "failed", "reason": "worker 0 lost"})
    return ev


def test_measure_across_restarts_counts_what_a_restart_keeps() -> None:
    records = _restarted_run()
    t0 = 1010.0 + 4 * 0.3  # the commit of step 4, the first checkpoint
    m = et.measure(records, 60.0, 16, start_step=4)
    # steps 10..13 of the second job are thrown away by its loss: the job goes on from step 10
    assert m["t0"] == pytest.approx(t0) and m["useful_steps"] == 10 - 5
    assert m["failures"] == 2 and m["restarts"] == 1 and m["rollbacks"] == 1
    assert m["productive_s"] == pytest.approx(5 * 0.3)
    assert m["mean_step_s_by_shape"] == {"4x1": pytest.approx(0.3)}  # the restarted job's first step is no steady step
    # the window ends before the first loss: its steps count, as the simulator counts them to its horizon
    assert et.measure(records, 2.2, 16, start_step=4)["useful_steps"] == 12 - 5
    # ... unless the loss is recorded within the grace after the window (the kill came inside it)
    assert et.measure(records, 2.2, 16, start_step=4, loss_grace_s=1.0)["useful_steps"] == 10 - 5
    # the window ends while the job is down (its restart not begun): the checkpoint it restarts from
    down = records[:-6]  # up to the first job's failed run_end
    assert down[-1]["status"] == "failed" and et.measure(down, 60.0, 16, start_step=4)["useful_steps"] == 10 - 5
    # the job restarts at the step after its last commit: nothing lost, and its slow first step is not steady
    again = et.measure(_restarted_run(resume_at_next=True), 60.0, 16, start_step=4)
    assert again["useful_steps"] == 12 - 5
    assert again["mean_step_s_by_shape"] == {"4x1": pytest.approx(0.3)}
    # a run that goes on: its last commit in the window counts (no loss after it)
    assert et.durable_end(records, records[3]) is None and et.durable_end(records[:3], records[2]) is None
    assert et.durable_end(records, records[14]) == 10  # step 11, then the loss: the restart goes on from step 10


def test_restart_pauses_from_ready_to_first_commit() -> None:
    records = _restarted_run()
    first_after = float(records[-5]["t"])  # the restarted job's first commit (step 10)
    assert records[-6]["event"] == "run_start" and records[-5]["step"] == 10
    ready, started = first_after - 14.0, first_after - 12.0
    assert et.restart_pauses(records, [(ready, started)]) == [pytest.approx(14.0)]
    # a restart lost before its first commit (the next restart started first) gives no pause
    assert et.restart_pauses(records, [(ready - 0.4, ready - 0.2), (ready, started)]) == [pytest.approx(14.0)]
    assert et.restart_pauses(records, [(first_after + 5.0, first_after + 6.0)]) == []


def test_restart_warnings() -> None:
    acts = [{"what": "SIGKILL", "node": 2}, {"what": "job lost"}, {"what": "SIGKILL", "node": 0},
            {"what": "Ctrl-C (lost before its first commit)"}]
    assert et.run_warnings({"mode": "restart", "actions": acts, "failures": 1, "reshapes": []}) == []
    stuck = [*acts, {"what": "Ctrl-C (lost job still running)"}]
    assert et.run_warnings({"mode": "restart", "actions": stuck, "failures": 1, "reshapes": []}) == [
        "1 Ctrl-C sent to a lost job that did not end on its own (ft.strategy = none)"]
