"""`spotpipe simulate`: example configs, JSON, trace and events files, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotpipe.cli import main
from spotpipe.events import read_events

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
LINKS = ROOT / ".." / "shared" / "data" / "gcp-12-locations" / "links.csv"
GEO_LOCATIONS = "['Belgium','NL','Germany','London','Canada','Iowa']"


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["simulate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_local_config_table_json_trace_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, events = tmp_path / "trace.json", tmp_path / "events.jsonl"
    assert main(["simulate", "--config", str(CONFIGS / "sim-local.toml"), "--trace", str(trace), "--events", str(events)]) == 0
    out = capsys.readouterr().out
    assert "bubble" in out and "ETTR" in out and "schedule 1f1b: 4 stages" in out
    data = run_json(capsys, "--config", str(CONFIGS / "sim-local.toml"), "--set", "sim.failures=[]")
    assert [r["peak_activations"] for r in data["ranks"]] == [4, 3, 2, 1]
    assert data["iteration_s"] >= data["pipeline_s"] > 0
    assert all(0 < r["bubble"] < 1 and r["peak_memory_bytes"] > r["peak_activation_bytes"] for r in data["ranks"])
    assert data["job"]["status"] == "finished" and data["job"]["failures"] == 0 and data["job"]["ettr"] < 1  # checkpoints
    doc = json.loads(trace.read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 4 * 8 * 2 + 2 * 3 * 8  # compute actions + sends of 4 ranks, 8 microbatches
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(data["pipeline_s"] * 1e6, rel=1e-6)
    records = read_events(events)
    assert records[0]["event"] == "run_start" and records[-1]["event"] == "run_end"
    assert any(r["event"] == "failure_confirmed" for r in records)  # the config's node 2 failure


@pytest.mark.skipif(not LINKS.is_file(), reason="shared data ../shared/data/gcp-12-locations/links.csv not present")
def test_geo_config_with_the_shared_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = run_json(capsys, "--config", str(CONFIGS / "sim-geo.toml"), "--set", "sim.failure_rate=0")
    shared = run_json(capsys, "--config", str(CONFIGS / "sim-geo.toml"), "--set", "sim.failure_rate=0",
                      "--set", f"network.matrix={str(LINKS.resolve())!r}")
    assert shared["iteration_s"] == pytest.approx(shipped["iteration_s"])
    assert shared["config"]["workers"] == 18 and shared["config"]["spares"] == 2
    locs = {r["location"] for r in shared["ranks"]}
    assert locs == {"Belgium", "NL", "Germany", "London", "Canada", "Iowa"}
    # Cross-continent replicas: the gradient all-reduce is a large share of the step.
    assert max(r["allreduce_s"] for r in shared["ranks"]) > 0.1 * shared["iteration_s"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["network.locations=['Belgium','Mars','Germany','London','Canada','Iowa']"], "network.locations[1]: unknown location 'Mars'"),
        (["network.bandwidth_gbps=-1"], "network.bandwidth_gbps must be >= 0"),
        (["sim.failures=['x']"], "sim.failures[0]: expected NODE@SECONDS"),
        (["network.locations=['Belgium']"], "network.locations has 1 entries; expected 6"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--config", str(CONFIGS / "sim-geo.toml")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "row,message",
    [("", "missing pair B,C"), ("B,C,3,-0.5\n", "bandwidth_GiB_per_s must be > 0, got -0.5 for B,C")],
)
def test_bad_matrix_files(tmp_path: Path, row: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    matrix = tmp_path / "links.csv"
    matrix.write_text("location_a,location_b,latency_ms,bandwidth_GiB_per_s\nA,B,1,1\nA,C,2,1\n" + row)
    args = ["simulate", "--set", f"network.matrix={str(matrix)!r}", "--set", "network.locations=['A','B','C','A']"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: ") and message in err and str(matrix) in err and err.count("\n") == 1
