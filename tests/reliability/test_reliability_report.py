"""HTML report, benchmark smoke runs, and the package's purity (no torch, runtime or sim)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spotpipe.cli import main

ROOT = Path(__file__).resolve().parents[2]

SACCT = "JobID|State|Start|End|NNodes|AllocTRES\n" + "".join(
    f"{i}|{'NODE_FAIL' if i % 7 == 0 else 'COMPLETED'}|2024-01-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00|"
    f"2024-02-{1 + i % 28:02d}T{i % 24:02d}:00:00|{1 + i % 16}|gres/gpu={8 * (1 + i % 16)}\n"
    for i in range(600)
)


@pytest.mark.timeout(60)
def test_report_writes_html_with_three_embedded_plots(tmp_path, capsys):
    trace = tmp_path / "jobs.sacct"
    trace.write_text(SACCT)
    out = tmp_path / "report" / "r.html"
    rc = main(["reliability", "report", str(trace), "--gpus", "4096", "--trials", "4", "--min-intervals", "20",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 3
    for heading in ("MTTF vs job size", "ETTR vs checkpoint interval", "Time between failures"):
        assert heading in html
    assert "r_f" in html and "jobs.sacct" in html


def test_report_without_rf_source_is_a_clear_error(tmp_path, capsys):
    trace = tmp_path / "ok.sacct"
    trace.write_text("JobID|State|Start|End|NNodes\n1|COMPLETED|2024-01-01T00:00:00|2024-01-01T01:00:00|1\n")
    assert main(["reliability", "report", str(trace), "-o", str(tmp_path / "x.html")]) == 2
    assert "pass --rf" in capsys.readouterr().err


def test_reliability_never_imports_torch_runtime_or_sim():
    code = (
        "import sys, pkgutil, importlib, spotpipe.reliability as r\n"
        "for m in pkgutil.iter_modules(r.__path__): importlib.import_module('spotpipe.reliability.' + m.name)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'spotpipe.runtime', 'spotpipe.sim'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_scale_benchmark_quick_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import reliability_scale
    finally:
        sys.path.pop(0)
    out = tmp_path / "scale.json"
    for fmt in ("sacct", "acme"):
        assert reliability_scale.main(["--rows", "3000", "--format", fmt, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["rows"] == 3000 and result["malformed"] == 1
        assert result["used"] + sum(result["skipped"].values()) + result["malformed"] == 3000
