"""Real traces in ../shared/data (LANL failures, Bamboo spot preemptions), checked independently."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from spotpipe.reliability import montecarlo as mc
from spotpipe.reliability.analysis import analyze_path

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
LANL = DATA / "lanl-failures" / "LA-UR-05-7318-failure-data-1996-2005.csv"
BAMBOO = DATA / "bamboo-spot-traces"

needs_data = pytest.mark.skipif(not (LANL.is_file() and BAMBOO.is_dir()), reason=f"shared data not found under {DATA}")


@needs_data
def test_lanl_weibull_fits_show_decreasing_hazard():
    analysis = analyze_path(LANL)
    assert analysis.report.malformed_count == 0
    with open(LANL, newline="") as fh:
        raw = [row["System"] for row in csv.DictReader(fh)]
    by_name = {t.name: t for t in analysis.traces}
    assert len(by_name) == len(set(raw))
    assert by_name["LANL system 20"].events == raw.count("20")
    fitted = [t for t in analysis.traces if t.fits is not None]
    assert len(fitted) >= 20
    shapes = np.array([t.fits.weibull.shape for t in fitted])
    # Schroeder & Gibson (DSN 2006): Weibull with decreasing hazard, shape well below 1
    assert np.median(shapes) < 0.85 and shapes.max() < 1.1
    big = by_name["LANL system 20"].fits
    assert big is not None and big.preferred == "weibull" and 0.55 < big.weibull.shape < 0.75
    assert big.weibull.ks < big.exponential.ks


def _independent_rate(path: Path) -> float:
    live: set[str] = set()
    last, exposure, removes = 0.0, 0.0, 0
    with open(path, newline="") as fh:
        for ms, action, node in csv.reader(fh):
            t = int(ms) / 1000.0
            exposure += len(live) * (t - last)
            last = t
            if action == "add":
                live.add(node)
            else:
                live.discard(node)
                removes += 1
    return removes / (exposure / 3600.0)


@needs_data
@pytest.mark.parametrize("name", ["p3-trace.csv", "g4dn-trace.csv"])
def test_bamboo_preemptions_per_instance_hour(name):
    analysis = analyze_path(BAMBOO / name)
    (trace,) = analysis.traces
    assert analysis.report.malformed_count == 0
    assert trace.per_unit_hour == pytest.approx(_independent_rate(BAMBOO / name), rel=1e-12)
    assert 0.3 < trace.per_unit_hour < 1.0


@needs_data
def test_checkpoint_free_beats_checkpoint_restart_on_the_p3_trace():
    (trace,) = analyze_path(BAMBOO / "p3-trace.csv").failure_traces
    replay = mc.TraceReplay(trace, 32)
    cr = mc.simulate(replay, mc.CheckpointRestart(150, 30, 180), 86400.0, 10.0, 20, seed=0)
    cf = mc.simulate(replay, mc.CheckpointFree(30), 86400.0, 10.0, 20, seed=0)
    assert cr.failures_mean == pytest.approx(trace.events / trace.duration_s * 86400, rel=0.05)
    assert cf.ettr_mean > 0.9 > 0.6 > cr.ettr_mean
