"""Smoke test of bench/skippipe_quality.py: the quick mode runs, writes the JSON and the PNG, and its
figures are finite."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.timeout(240)
def test_skippipe_quality_quick(tmp_path: Path) -> None:
    if not DATA.is_file():
        pytest.skip(f"reference data {DATA} is absent")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import skippipe_quality
    finally:
        sys.path.pop(0)
    out = tmp_path / "quality.json"
    assert skippipe_quality.main(["--quick", "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 1000
    result = json.loads(out.read_text())
    for key in ("setting", "runs", "inference", "machine", "versions", "paper_reference"):
        assert key in result
    assert set(result["runs"]) == {"skip0", "skip50+full"}
    assert len(result["machine"]["loadavg_before"]) == 3 and len(result["machine"]["loadavg_after"]) == 3
    steps = result["setting"]["steps"]
    for name, row in result["runs"].items():
        assert row["k"] == (12 if name == "skip0" else 6)
        assert len(row["train_loss"]) == steps and all(math.isfinite(x) for x in row["train_loss"])
        assert [c["step"] for c in row["curve"]] == list(range(0, steps + 1, result["setting"]["eval_every"]))
        for key in ("final_val_loss", "val_loss_at_equal_time", "time_to_target_s", "emulated_s", "cpu_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["emulated_s"] == pytest.approx(
            (steps - row["full_steps"]) * row["predicted_s"]["train"] + row["full_steps"] * row["predicted_s"]["full"])
    assert result["runs"]["skip50+full"]["full_steps"] == steps // 10
    assert result["runs"]["skip50+full"]["emulated_s"] < result["runs"]["skip0"]["emulated_s"]
    for name, entry in result["inference"].items():
        assert math.isfinite(entry["full_ppl"]) and entry["full_ppl"] > 1
        assert set(entry["fractions"]) == {"25", "50"}
        for pct, frac in entry["fractions"].items():
            assert frac["stages_skipped"] == {"25": 3, "50": 6}[pct]
            assert all(1 <= s <= 11 for subset in frac["sets"] for s in subset)
            for key in ("mean_ppl", "std_ppl", "rel_increase_vs_own_full", "rel_increase_vs_skip0_full"):
                assert math.isfinite(frac[key]), (name, pct, key)
    # the same subsets for every model
    sets = {n: [f["sets"] for f in e["fractions"].values()] for n, e in result["inference"].items()}
    assert sets["skip0"] == sets["skip50+full"]
