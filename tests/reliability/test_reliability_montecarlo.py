"""Monte Carlo ETTR against the closed forms, and where the first-order model breaks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spotpipe.cli import main
from spotpipe.errors import SpotpipeError
from spotpipe.reliability import models as m
from spotpipe.reliability import montecarlo as mc
from spotpipe.reliability.failure_traces import FailureTrace
from spotpipe.reliability.units import SECONDS_PER_DAY, rate_per_second
from spotpipe.reliability.validation import compare_grid, default_grid, summarize


@pytest.mark.timeout(60)
def test_monte_carlo_agrees_with_meta_model_where_its_assumptions_hold():
    points = compare_grid(default_grid(), rf=6.5, trials=48)
    assert len(points) == 96
    valid = [p for p in points if p.load <= 0.1]
    assert len(valid) >= 30
    worst = max(valid, key=lambda p: p.error_first_order)
    assert worst.error_first_order <= 0.03, worst
    # The exact renewal form matches the simulation everywhere the job still makes progress.
    assert max(p.error_exact for p in points if p.mc > 0.05) <= 0.02
    # Where failures are frequent relative to the interval, the first-order model breaks down.
    frequent = [p for p in points if p.load >= 0.8]
    assert frequent and all(p.error_first_order > 0.2 for p in frequent)
    assert all(p.first_order < p.mc for p in frequent)  # it is pessimistic there
    summary = summarize(points)
    assert summary.max_error_valid == worst.error_first_order
    assert summary.smallest_load_over_3pct is not None and summary.smallest_load_over_3pct > 0.1


def test_checkpoint_restart_mc_matches_exact_form_within_its_interval():
    lam = rate_per_second(8192, 6.5)  # MTTF 27 min
    policy = mc.CheckpointRestart(interval_s=600, write_s=30, restart_s=120)
    r = mc.simulate(mc.Exponential(1 / lam), policy, wall_s=20 * SECONDS_PER_DAY, step_s=10, trials=64, seed=5)
    exact = m.ettr_checkpoint_exact(600, 30, 120, lam)
    half = (r.ettr_ci95[1] - r.ettr_ci95[0]) / 2
    assert abs(r.ettr_mean - exact) <= 4 * half + 1e-3
    assert r.failures_mean == pytest.approx(20 * SECONDS_PER_DAY * lam, rel=0.02)
    parts = r.ettr_mean + r.restart_fraction + r.checkpoint_fraction + r.lost_work_fraction
    assert parts == pytest.approx(1.0, abs=1e-9)  # every second of wall time is accounted for


def test_checkpoint_free_mc_matches_exact_form():
    lam = rate_per_second(16384, 6.5)
    r = mc.simulate(mc.Exponential(1 / lam), mc.CheckpointFree(30, penalty_s=20), 10 * SECONDS_PER_DAY, 10, 64, seed=2)
    assert r.ettr_mean == pytest.approx(m.ettr_checkpoint_free_exact(30, lam, 10, 20), abs=2e-3)
    assert r.checkpoint_fraction == 0.0
    assert r.penalty_fraction == pytest.approx(lam * 20, rel=0.05)


def test_weibull_shape_one_is_exponential_and_renewal_rate_is_kept():
    policy = mc.CheckpointRestart(1800, 60, 300)
    a = mc.simulate(mc.Exponential(7200), policy, 60 * SECONDS_PER_DAY, 10, 64, seed=1)
    b = mc.simulate(mc.Weibull(7200, 1.0), policy, 60 * SECONDS_PER_DAY, 10, 64, seed=1)
    assert a.ettr_mean == pytest.approx(b.ettr_mean, abs=0.003)
    c = mc.simulate(mc.Weibull(7200, 0.6), policy, 60 * SECONDS_PER_DAY, 10, 64, seed=1)
    assert c.failures_mean == pytest.approx(60 * 86400 / 7200, rel=0.05)
    # Bursty failures (shape < 1) cluster: more short gaps, more long ones; same mean.
    assert c.ettr_mean != pytest.approx(a.ettr_mean, abs=0.003)


def _regular_trace(pool: float) -> FailureTrace:
    times = np.arange(10) * 100.0 + 50.0  # one event every 100 s over a 1000 s trace
    objs = np.empty(10, dtype=object)
    objs[:] = ["remove"] * 10
    return FailureTrace(
        name="regular", kind="spot preemptions", unit="instance", times=times, causes=objs,
        details=objs, pool=np.full(10, pool), duration_s=1000.0, unit_seconds=pool * 1000.0,
    )


def test_trace_replay_hits_the_job_in_proportion_to_its_share_of_the_pool():
    wall = 10_000.0
    full = mc.simulate(mc.TraceReplay(_regular_trace(10), 10), mc.CheckpointFree(5), wall, 1.0, 50, seed=0)
    assert full.failures_mean == 100  # every event, 10 cycles of the trace
    # gaps of 100 s, 5 s recovery each: ETTR = 95% up to the first gap's offset
    assert full.ettr_mean == pytest.approx(0.95, abs=0.01)
    half = mc.simulate(mc.TraceReplay(_regular_trace(20), 10), mc.CheckpointFree(5), wall, 1.0, 200, seed=0)
    assert half.failures_mean == pytest.approx(50, rel=0.05)


def test_simulate_rejects_bad_arguments():
    with pytest.raises(SpotpipeError, match="wall time"):
        mc.simulate(mc.Exponential(100), mc.CheckpointFree(1), 0.0)
    with pytest.raises(SpotpipeError, match="--trials"):
        mc.simulate(mc.Exponential(100), mc.CheckpointFree(1), 1000.0, trials=1)
    with pytest.raises(SpotpipeError, match="shape"):
        mc.simulate(mc.Weibull(100, 0.0), mc.CheckpointFree(1), 1000.0)


def test_simulate_cli_json(capsys):
    rc = main([
        "reliability", "simulate", "--gpus", "16384", "--rf", "6.5", "--wall", "5d", "--trials", "20",
        "--failures", "weibull", "--shape", "0.8", "--json",
    ])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    policies = [r["policy"] for r in data["results"]]
    assert policies == ["checkpoint/restart", "checkpoint-free"]
    cr, cf = data["results"]
    assert cf["ettr_mean"] > cr["ettr_mean"]
    assert cr["ettr_ci95"][0] <= cr["ettr_mean"] <= cr["ettr_ci95"][1]
    assert data["job"]["mttf_hours"] == pytest.approx(1.8, rel=0.01)
    assert cr["goodput_gpu_hours"] == pytest.approx(cr["ettr_mean"] * 16384 * 120)
