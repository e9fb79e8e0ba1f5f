"""Trace replay of elastic / wait / checkpoint: a two-event trace worked out by hand, and the real
Bamboo p3 trace."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spotpipe.config import load_config
from spotpipe.errors import ConfigError
from spotpipe.ft.elastic import Move
from spotpipe.model.partition import block_params
from spotpipe.sim.cluster import parse_preemption_trace
from spotpipe.sim.elastic import checkpointed_progress, move_seconds, simulate_elastic, trace_events

pytestmark = pytest.mark.timeout(60)

P3 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "bamboo-spot-traces" / "p3-trace.csv"

# 8 blocks on 4 stages, 4 microbatches of 4 sequences; a block costs 0.025 s forward per sequence,
# so 0.3 s forward + backward per microbatch: a step is (4 + 3) x 2 x 0.3 = 4.2 s on 4 stages and
# (4 + 2) x 3 x 0.3 = 5.4 s on 3 stages ([0,3) [3,6) [6,8)).
HAND = [
    "sim.layer_forward_s=0.025", "ft.detect_timeout_s=2", "ft.replace_wait_s=12", "sim.regroup_s=1",
    "sim.restart_s=60", "sim.replace_s=1e9", "train.checkpoint_every=10", "sim.checkpoint_write_s=0",
]
# node c (worker 2, stage 2) is preempted at 100 s; a new node e comes up at 300 s.
TRACE = "0,add,a\n0,add,b\n0,add,c\n0,add,d\n100000,remove,c\n300000,add,e\n"


def test_two_event_trace_by_hand() -> None:
    cfg = load_config(None, HAND)
    events = parse_preemption_trace(TRACE, 4)
    got = {m: simulate_elastic(cfg, events, m, horizon_s=500.0) for m in ("elastic", "wait", "checkpoint")}

    # elastic: 23 steps of 4.2 s by 100 s (the 24th is lost); the loss is seen at 102 s, no node
    # comes within ft.replace_wait_s, so at 112 s the job shrinks to 3 stages (1 s to regroup, the
    # moves take no time on unlimited links), runs 187 s at 5.4 s (34 steps), grows back at 300 s
    # and runs from 301 s: 199 s at 4.2 s (47 steps).
    e = got["elastic"]
    assert e.steps == 23 + 34 + 47
    assert e.samples == e.steps * 16 and e.samples_per_s == pytest.approx(e.steps * 16 / 500)
    assert e.productive_s == pytest.approx(23 * 4.2 + 34 * 5.4 + 47 * 4.2)
    assert e.ettr == pytest.approx(e.productive_s / 500)
    assert dict(e.time_at_shape) == pytest.approx({"4x1": 100 + 199, "3x1": 300 - 113})
    assert e.down_s == pytest.approx(14.0)
    assert e.shrink_lost_s == pytest.approx(34 * (5.4 - 4.2))  # 34 steps at 3x1, each 1.2 s slower
    shrink, grow = e.reshapes
    block_bytes = block_params(cfg.model) * (4 + 8)  # float32 weights and two AdamW moments
    assert (shrink.time, shrink.kind, shrink.from_shape, shrink.to_shape) == (112.0, "shrink", "4x1", "3x1")
    assert shrink.bytes == 3 * block_bytes and shrink.seconds == 1.0  # block 2 to stage 0, blocks 4-5 to stage 1
    assert (grow.time, grow.kind, grow.to_shape, grow.bytes) == (300.0, "grow", "4x1", 2 * block_bytes)

    # wait: down from 100 s until node e at 300 s, 1 s to install the rebuilt stage: 23 + 47 steps.
    w = got["wait"]
    assert w.steps == 23 + 47 and [r.kind for r in w.reshapes] == ["replace"]
    assert w.down_s == pytest.approx(500 - 299)

    # checkpoint: a checkpoint every 10 steps holds 20 of the 23; restart at 300 + 60 s, then
    # 140 s at 4.2 s = 33 steps.
    c = got["checkpoint"]
    assert c.steps == 20 + 33 and c.reshapes[0].seconds == 60.0
    assert w.shrink_lost_s == c.shrink_lost_s == 0.0

    assert e.samples_per_s > w.samples_per_s > c.samples_per_s
    assert e.failures == w.failures == c.failures == 1 and e.joins == 1


def test_a_joiner_within_the_wait_fills_the_position_instead_of_a_shrink() -> None:
    cfg = load_config(None, HAND)
    events = parse_preemption_trace("0,add,a\n0,add,b\n0,add,c\n0,add,d\n100000,remove,c\n105000,add,e\n", 4)
    result = simulate_elastic(cfg, events, "elastic", horizon_s=200.0)
    assert [(r.time, r.kind, r.to_shape) for r in result.reshapes] == [(105.0, "replace", "4x1")]
    assert dict(result.time_at_shape) == pytest.approx({"4x1": 100 + 94})  # runs again from 106 s


def test_checkpointed_progress_counts_whole_steps_and_saved_ones() -> None:
    # cycles of 10 steps x 4.2 s + a 2 s write = 44 s: 2 cycles in 100 s, then 12 s = 2 more steps
    assert checkpointed_progress(100.0, 4.2, 10, 2.0) == (22, 20)
    assert checkpointed_progress(100.0, 4.2, 0, 2.0) == (23, 0)
    assert checkpointed_progress(86.0, 4.2, 10, 2.0) == (20, 10)  # the second write is cut short


def test_moves_to_different_workers_run_in_parallel() -> None:
    cfg = load_config(None, ["network.latency_ms=10", "network.bandwidth_gbps=1"])
    moves = [Move((0, 1), 0, 1, 0, 7, 10**8), Move((1, 2), 1, 2, 0, 7, 10**8), Move((2, 3), 1, 2, 1, 8, 10**8)]
    assert move_seconds(moves, cfg) == pytest.approx(0.010 + 2e8 * 8 / 1e9)
    assert move_seconds([], cfg) == 0.0


def test_bad_mode_compression_and_horizon_are_one_line() -> None:
    cfg = load_config(None, HAND)
    events = parse_preemption_trace(TRACE, 4)
    with pytest.raises(ConfigError, match="mode must be one of elastic, wait, checkpoint"):
        simulate_elastic(cfg, events, "pray")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nothing to replay"):
        simulate_elastic(cfg, [], "elastic")
    with pytest.raises(ConfigError, match="compression must be a finite number > 0"):
        trace_events(cfg, "unused.csv", compress=0)


@pytest.mark.skipif(not P3.is_file(), reason="shared Bamboo traces not present")
def test_bamboo_p3_trace_elastic_beats_waiting_and_checkpoints() -> None:
    # 8 stages x 3 replicas on the first 24 of the trace's nodes; p3 preempts up to 6 at once.
    cfg = load_config(None, [
        "model.layers=16", "pipeline.stages=8", "pipeline.replicas=3", "train.batch_size=48",
        "train.checkpoint_every=20", "sim.replace_s=1e9", "sim.layer_forward_s=0.02",
    ])
    events = trace_events(cfg, P3, compress=10)
    assert events and max(e.time for e in events) == pytest.approx(40920 / 10)
    got = {m: simulate_elastic(cfg, events, m) for m in ("elastic", "wait", "checkpoint")}
    e, w, c = got["elastic"], got["wait"], got["checkpoint"]
    assert e.samples_per_s > 1.2 * w.samples_per_s and e.samples_per_s > 2 * c.samples_per_s
    assert w.samples_per_s > c.samples_per_s
    for r in got.values():
        assert r.wall_s == pytest.approx(4092.0)
        assert sum(s for _, s in r.time_at_shape) + r.down_s == pytest.approx(r.wall_s)
        assert 0 < r.ettr < 1 and r.productive_s <= r.wall_s
        assert all(x.why and "\n" not in x.why for x in r.reshapes)
    shapes = {label for label, _ in e.time_at_shape}
    assert {"8x3", "8x2"} <= shapes  # the elastic job really ran shrunk
    assert {label for label, _ in w.time_at_shape} == {"8x3"}  # the others never change shape
    assert any(x.kind == "shrink" for x in e.reshapes) and any(x.kind == "grow" for x in e.reshapes)
    assert not math.isnan(e.samples_per_s)


def test_the_replay_writes_events_the_reliability_reader_measures(tmp_path: Path) -> None:
    from spotpipe.events import EventLog, read_events
    from spotpipe.reliability.runs import read_runs

    cfg = load_config(None, HAND)
    events = parse_preemption_trace(TRACE, 4)
    for mode in ("elastic", "checkpoint"):
        path = tmp_path / f"{mode}.jsonl"
        with EventLog(path) as log:
            result = simulate_elastic(cfg, events, mode, horizon_s=500.0, log=log)
        (run,), _ = read_runs(path)
        # the ETTR of Kokolis et al. as the event reader computes it equals the replay's
        assert run.ettr == pytest.approx(result.ettr) and run.wall_s == pytest.approx(500.0)
        assert run.failures == 1
        reshapes = read_events(path, "reshape")
        assert [(r["from"], r["to"]) for r in reshapes] == [(x.from_shape, x.to_shape) for x in result.reshapes]
    # checkpoint: steps 20-22 were committed, lost with the worker, and committed again
    assert run.redone_s == pytest.approx(3 * 4.2) and run.steps == 53


def test_played_step_time_is_the_simulators_iteration_and_drives_the_replay() -> None:
    from spotpipe.ft.elastic import initial_shape
    from spotpipe.planner import step_time
    from spotpipe.sim.elastic import played_step_time

    cfg = load_config(None, HAND + ["pipeline.replicas=2", "train.batch_size=32"])
    played = played_step_time(cfg)
    full, one = initial_shape(8, 4, 2), initial_shape(8, 4, 1)
    assert played(full) == pytest.approx(step_time(cfg))  # the planner plays the same job
    assert played(one) > played(full)  # one replica runs both replicas' microbatches
    events = parse_preemption_trace("0,add,a\n0,add,b\n0,add,c\n0,add,d\n0,add,e\n0,add,f\n0,add,g\n0,add,h\n"
                                    "100000,remove,c\n", 8)
    result = simulate_elastic(cfg, events, "elastic", horizon_s=200.0, step_time=played)
    assert [r.to_shape for r in result.reshapes] == ["4x1"]
    # 100 s at 4x2, then from 113 s (loss seen at 102 s, ft.replace_wait_s = 12, 1 s regroup) at 4x1
    expected = math.floor(100 / played(full)) + math.floor(87 / played(one))
    assert result.steps == expected


def test_simulate_elastic_cli_table_json_and_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from spotpipe.cli import main

    trace = tmp_path / "trace.csv"
    trace.write_text(TRACE)
    sets = [a for o in HAND + [f"sim.failure_trace={trace}"] for a in ("--set", o)]
    assert main(["simulate", *sets, "--elastic", "all", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["compress"] == 1.0 and set(data["modes"]) == {"elastic", "wait", "checkpoint"}
    # the last event (300 s) ends the replay: elastic 23 + 34 steps, wait and checkpoint 23 and 20
    assert data["modes"]["elastic"]["steps"] == 23 + 34 and data["modes"]["wait"]["steps"] == 23
    assert data["elastic_vs_wait"] == pytest.approx(57 / 23) and data["elastic_vs_checkpoint"] == pytest.approx(57 / 20)
    events = tmp_path / "events.jsonl"
    assert main(["simulate", *sets, "--elastic", "elastic", "--compress", "2", "--events", str(events)]) == 0
    out = capsys.readouterr().out
    assert "2x faster" in out and "3x1" in out and events.is_file()
    assert main(["simulate", "--elastic", "all"]) == 2
    err = capsys.readouterr().err
    assert "set sim.failure_trace" in err and len(err.strip().splitlines()) == 1
    assert main(["simulate", "--elastic", "sometimes"]) == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
