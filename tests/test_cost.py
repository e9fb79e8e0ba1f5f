"""Cost model: analytic seconds and bytes from model shapes, profiled calibration from events."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from spotpipe.config import JobConfig, apply_overrides
from spotpipe.cost import analytic_cost, calibrate_scale, fit_scale_and_overhead, read_profile, speeds_per_node
from spotpipe.errors import ConfigError, SpotpipeError
from spotpipe.model.partition import model_shapes
from spotpipe.schedule.build import job_schedule
from spotpipe.schedule.ir import Action, Op
from spotpipe.sim.job import profiled_cost
from spotpipe.network import build_network
from spotpipe.sim.player import play_iteration

pytestmark = pytest.mark.timeout(60)


def cfg_of(*overrides: str) -> JobConfig:
    return apply_overrides(JobConfig(), list(overrides)).validate()


def test_analytic_cost_from_shapes() -> None:
    cfg = cfg_of("pipeline.stages=4", "pipeline.microbatches=4", "train.batch_size=32", "pipeline.replicas=2",
                 "sim.device_tflops=2.5", "sim.backward_ratio=3", "model.dtype=bfloat16")
    cost = analytic_cost(cfg)
    shapes = model_shapes(cfg.model, 4)
    seqs = 32 // (2 * 4)
    tokens = seqs * cfg.model.context
    for s, shape in enumerate(shapes):
        assert cost.forward_s[s] == pytest.approx(shape.forward_flops_per_token * tokens / 2.5e12)
        assert cost.backward_s[s] == pytest.approx(3 * cost.forward_s[s])
        assert cost.grad_bytes[s] == shape.params * 2
        assert cost.activation_bytes[s] == shape.activation_bytes_per_sequence * seqs
    hidden = seqs * cfg.model.context * cfg.model.d_model * 2
    assert cost.message_bytes(Action(1, Op.SEND_F, 0)) == hidden
    assert cost.message_bytes(Action(2, Op.RECV_F, 3)) == hidden
    assert cost.message_bytes(Action(2, Op.SEND_B, 3)) == hidden
    assert cost.message_bytes(Action(3, Op.SEND_B, 3)) == hidden  # the last stage's boundary is 0: uses the hidden size
    assert cost.duration(Action(1, Op.B, 0), speed=2.0) == pytest.approx(cost.backward_s[1] / 2)
    assert cost.duration(Action(1, Op.SEND_F, 0)) == 0.0
    # The last chunk carries the LM head: it is the most expensive.
    assert cost.forward_s[3] > cost.forward_s[1]
    doubled = cost.scaled(2.0)
    assert doubled.forward_s == pytest.approx(tuple(2 * x for x in cost.forward_s))
    assert doubled.boundary_bytes == cost.boundary_bytes


def test_interleaved_cost_has_one_entry_per_chunk() -> None:
    cfg = cfg_of("pipeline.schedule=interleaved", "pipeline.stages=2", "pipeline.virtual_stages=2", "pipeline.microbatches=4")
    assert analytic_cost(cfg).num_stages == 4


def test_speeds_per_node() -> None:
    assert speeds_per_node((), 2, 3) == (1.0, 1.0, 1.0)
    assert speeds_per_node((1, 0.5), 2, 5) == (1.0, 0.5, 1.0, 0.5, 1.0)
    assert speeds_per_node((1, 2, 3), 2, 3) == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError, match=r"sim.speed_factors has 4 entries; expected 2 \(one per pipeline rank\) or 3"):
        speeds_per_node((1, 1, 1, 1), 2, 3)
    with pytest.raises(ConfigError, match=r"sim.speed_factors\[1\] must be > 0"):
        cfg_of("sim.speed_factors=[1.0, -2.0]")


def write_events(path: Path, cfg: JobConfig, step_times: list[float]) -> None:
    lines = [{"event": "run_start", "t": 0.0, "config": dataclasses.asdict(cfg) | {"future": {"x": 1}}, "mode": "runtime"}]
    lines += [{"event": "step", "t": i + 1.0, "step": i + 1, "step_time": s} for i, s in enumerate(step_times)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_profiled_cost_reproduces_the_profiled_run(tmp_path: Path) -> None:
    prof_cfg = cfg_of("pipeline.stages=2", "pipeline.microbatches=2", "train.batch_size=4", "pipeline.schedule=gpipe",
                      "network.latency_ms=5")
    events = tmp_path / "events.jsonl"
    write_events(events, prof_cfg, [9.0, 0.7, 0.40, 0.44, 0.42, 0.41])  # two warm-up steps
    prof = read_profile(events)
    assert prof.step_time == pytest.approx(0.415) and prof.skip == 2  # trimmed mean of the middle half
    target = cfg_of("pipeline.stages=4", "pipeline.microbatches=8", "train.batch_size=16")
    cost = profiled_cost(target, [events])
    assert cost.source.startswith("profiled:")
    factor = cost.forward_s[0] / analytic_cost(target).forward_s[0]
    assert cost.backward_s[2] == pytest.approx(factor * analytic_cost(target).backward_s[2])
    # Playing the profiled run itself with the calibrated factor gives its measured time.
    pcost = analytic_cost(prof_cfg).scaled(factor)
    net = build_network(prof_cfg.network, 2, 2)
    assert play_iteration(job_schedule(prof_cfg), pcost, net).iteration_s == pytest.approx(0.415, rel=1e-3)


def test_calibrate_scale_and_profile_errors(tmp_path: Path) -> None:
    assert calibrate_scale(10.0, lambda f: 1.0 + 3.0 * f) == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(SpotpipeError, match="shorter than its simulated communication alone"):
        calibrate_scale(0.5, lambda f: 1.0 + f)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"event": "step", "t": 1, "step_time": 0.1}) + "\n")
    with pytest.raises(SpotpipeError, match="no run_start event with a config"):
        read_profile(bad)
    write_events(bad, JobConfig(), [])
    with pytest.raises(SpotpipeError, match="no step events with step_time"):
        read_profile(bad)
    with pytest.raises(SpotpipeError, match="does not exist"):
        read_profile(tmp_path / "missing.jsonl")


def test_fit_scale_and_overhead() -> None:
    work = [1.0, 2.5, 4.0]
    f, c = fit_scale_and_overhead([2.0 * w + 0.3 for w in work], lambda k: [k * w for w in work])
    assert f == pytest.approx(2.0, rel=1e-3) and c == pytest.approx(0.3, abs=1e-3)
    f1, c1 = fit_scale_and_overhead([5.0], lambda k: [k * 2.0])
    assert f1 == pytest.approx(2.5, rel=1e-3) and c1 == 0.0


def test_profiled_cost_from_two_runs(tmp_path: Path) -> None:
    runs = []
    for micro, t in ((2, 0.5), (8, 1.1)):
        cfg = cfg_of("pipeline.stages=2", f"pipeline.microbatches={micro}", f"train.batch_size={2 * micro}")
        path = tmp_path / f"m{micro}.jsonl"
        write_events(path, cfg, [3.0, t, t, t])
        runs.append((cfg, path, t))
    target = cfg_of("pipeline.stages=2", "pipeline.microbatches=4", "train.batch_size=8")
    cost = profiled_cost(target, [p for _, p, _ in runs])
    assert cost.overhead_s > 0
    factor = cost.forward_s[0] / analytic_cost(target).forward_s[0]
    sims = [play_iteration(job_schedule(c), analytic_cost(c).scaled(factor).with_overhead(cost.overhead_s),
                           build_network(c.network, 2, 2)).iteration_s for c, _, _ in runs]
    assert sims == pytest.approx([t for _, _, t in runs], rel=0.02)


def test_measured_overhead_from_compute_s(tmp_path: Path) -> None:
    cfg = cfg_of("pipeline.stages=2", "pipeline.microbatches=2", "train.batch_size=4")
    path = tmp_path / "e.jsonl"
    lines = [{"event": "run_start", "t": 0, "config": dataclasses.asdict(cfg)}]
    lines += [{"event": "step", "t": i, "step": i, "step_time": st, "compute_s": cs}
              for i, (st, cs) in enumerate([(5.0, 1.0), (0.9, 0.5), (0.5, 0.4), (0.5, 0.4), (0.5, 0.4), (0.6, 0.3)])]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prof = read_profile(path)
    assert prof.overhead_s == pytest.approx(0.1) and prof.step_time == pytest.approx(0.5)
    cost = profiled_cost(cfg, [path])
    assert cost.overhead_s == pytest.approx(0.1)
    iteration = play_iteration(job_schedule(cfg), cost, build_network(cfg.network, 2, 2)).iteration_s
    assert iteration == pytest.approx(0.5, rel=1e-3)  # compute explains the remaining 0.4 s
    f, c = fit_scale_and_overhead([2.1, 4.1], lambda k: [k * 1.0, k * 2.0], overhead_s=0.1)
    assert (f, c) == (pytest.approx(2.0, rel=1e-3), 0.1)
