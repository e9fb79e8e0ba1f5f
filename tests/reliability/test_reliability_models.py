"""Closed-form models and `spotpipe reliability plan`: MTTF, ETTR, best interval, durations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spotpipe.cli import main
from spotpipe.errors import SpotpipeError
from spotpipe.reliability import models as m
from spotpipe.reliability.units import format_duration, mttf_text, parse_duration, rate_per_second


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    rc = main(["reliability", "plan", *args, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize(
    "gpus, published_hours, digits, tolerance",
    # 131,072 GPUs: the model gives 0.2254 h, 2.02% below the published 0.23 h, which is that
    # value rounded to two decimals; it matches at the published precision, not within 2.00%.
    [(16384, 1.8, 1, 0.02), (131072, 0.23, 2, 0.021)],
)
def test_plan_mttf_matches_metas_published_figures(capsys, gpus, published_hours, digits, tolerance):
    data = _plan(capsys, "--gpus", str(gpus), "--gpus-per-node", "8", "--rf", "6.5")
    assert abs(data["mttf_hours"] - published_hours) / published_hours < tolerance
    assert round(data["mttf_hours"], digits) == published_hours
    # 1000 node-days / (N r_f), N = GPUs / 8
    assert data["mttf_hours"] == pytest.approx(1000 * 24 / (gpus / 8 * 6.5), rel=1e-12)
    assert data["nodes"] == gpus / 8


def test_plan_accepts_nodes_and_mttf_instead_of_gpus_and_rf(capsys):
    data = _plan(capsys, "--nodes", "2048", "--mttf", "1.8h")
    assert data["gpus"] == 2048 * 8
    assert data["rf"] == pytest.approx(24000 / (2048 * 1.8))
    assert data["mttf_hours"] == pytest.approx(1.8)


def test_plan_reports_best_interval_and_checkpoint_free(capsys):
    data = _plan(
        capsys, "--gpus", "16384", "--rf", "6.5", "--ckpt-write", "60s", "--restart", "5m",
        "--interval", "30m", "--recovery", "45s", "--step", "0",
    )
    lam = rate_per_second(2048, 6.5)
    assert data["interval_s"] == 1800
    assert data["ettr_at_interval"] == pytest.approx((1 - lam * (300 + 900)) / (1 + 60 / 1800))
    assert data["ettr_checkpoint_free"] == pytest.approx(1 - lam * 45)
    best = data["best_interval_s"]
    assert data["best_ettr"] >= data["ettr_at_interval"]
    assert best == pytest.approx(math.sqrt(2 * 60 / lam), rel=0.1)  # close to Young's
    assert data["ettr_checkpoint_free"] > data["best_ettr"]
    assert data["first_order_valid"] is (data["model_load"] <= 0.1)


def test_plan_text_flags_first_order_model_outside_validity(capsys):
    assert main(["reliability", "plan", "--gpus", "131072", "--rf", "6.5"]) == 0
    out = capsys.readouterr().out
    assert "MTTF: 0.225 h" in out
    assert "trust the exact figure" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "64", "--rf", "0"], "argument --rf: expected a number in (0, 1e+06], got 0"),
        (["--gpus", "0", "--rf", "6.5"], "argument --gpus: expected an integer in 1..1000000000, got 0"),
        (["--gpus", "64"], "give --rf"),
        (["--rf", "6.5"], "--gpus"),
        (["--gpus", "64", "--rf", "6.5", "--restart", "5 minutes"], "--restart: '5 minutes' is not a duration"),
        (["--gpus", "64", "--rf", "6.5", "--ckpt-write=-1s"], "--ckpt-write"),
        (["--gpus", "64", "--rf", "6.5", "--mttf", "2h"], "not both"),
    ],
)
def test_plan_bad_input_is_one_line_error(capsys, args, message):
    assert main(["reliability", "plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: ")
    assert message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "text, seconds",
    [("60s", 60), ("5m", 300), ("2h", 7200), ("1d", 86400), ("90", 90), ("1.5h", 5400), (" 30 s ", 30), (12, 12)],
)
def test_parse_duration_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "", "h", "-3s", "1e999d", "5 min", float("nan")])
def test_parse_duration_rejects_bad_values_naming_the_option(text):
    with pytest.raises(SpotpipeError, match="--restart"):
        parse_duration(text, "--restart")


def test_mttf_text_never_prints_infinity():
    assert mttf_text(None, 12.0) == "no failures observed (> 12 h of exposure)"
    assert mttf_text(float("inf"), 3.5) == "no failures observed (> 3.5 h of exposure)"
    assert mttf_text(1.8, 100.0) == "1.8 h"
    assert format_duration(90) == "90 s" and format_duration(600) == "10.0 min"
    assert format_duration(7200) == "2.00 h" and format_duration(4 * 86400) == "4.0 d"


def test_optimal_interval_maximises_first_order_ettr():
    for nodes, write, restart in [(2048, 60, 300), (256, 10, 60), (16384, 120, 600), (64, 300, 30)]:
        best = m.optimal_interval(write, restart, nodes, 6.5)
        assert best is not None
        grid = np.logspace(0, 6, 4000)
        values = [m.ettr_checkpoint(t, write, restart, nodes, 6.5) for t in grid]
        top = float(grid[int(np.argmax(values))])
        assert best == pytest.approx(top, rel=0.01)
        at_best = m.ettr_checkpoint(best, write, restart, nodes, 6.5)
        assert at_best >= max(values) - 1e-9


def test_young_daly_and_exact_optimum_agree_when_writes_are_cheap():
    lam = rate_per_second(512, 6.5)
    mttf = 1 / lam
    young = m.young_interval(10, mttf)
    assert m.daly_interval(10, mttf) == pytest.approx(young, rel=0.02)
    assert m.optimal_interval(10, 0, 512, 6.5) == pytest.approx(young, rel=0.02)
    exact = m.optimal_interval_exact(10, 0, lam)
    assert exact is not None
    grid = np.logspace(1, 5, 3000)
    top = grid[int(np.argmax([m.ettr_checkpoint_exact(t, 10, 0, lam) for t in grid]))]
    assert exact == pytest.approx(top, rel=0.01)
    assert m.daly_interval(10, mttf) == pytest.approx(exact, rel=0.01)
    assert m.daly_interval(500, 100) == 100  # w >= 2M: Daly's rule gives M


def test_exact_and_first_order_ettr_agree_at_low_load_and_split_at_high_load():
    low = (600, 30, 120, 64)
    lam = rate_per_second(64, 6.5)
    assert m.ettr_checkpoint_exact(*low[:3], lam) == pytest.approx(m.ettr_checkpoint(*low, 6.5), abs=2e-3)
    lam_hi = rate_per_second(16384, 6.5)
    first = m.ettr_checkpoint(3600, 60, 300, 16384, 6.5)
    exact = m.ettr_checkpoint_exact(3600, 60, 300, lam_hi)
    assert first == 0.0 and exact > 0.01  # first order clipped; the exact form is not
    assert m.model_load(16384, 6.5, 3600, 300) > 1


def test_checkpoint_free_formulas():
    lam = rate_per_second(2048, 6.5)
    assert m.ettr_checkpoint_free(30, 2048, 6.5, step_s=10, penalty_s=5) == pytest.approx(1 - lam * (30 + 5 + 5))
    exact = m.ettr_checkpoint_free_exact(30, lam, 10, 5)
    assert exact == pytest.approx(math.exp(-lam * 30) * lam * 10 / math.expm1(lam * 10) - lam * 5)
    assert exact == pytest.approx(m.ettr_checkpoint_free(30, 2048, 6.5, 10, 5), abs=1e-4)
    assert m.ettr_checkpoint_free_exact(30, 0.0) == 1.0
