"""`spotpipe schedule plan`: config to planner inputs, the whole plan, the CLI and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotpipe.cli import main
from spotpipe.config import load_config
from spotpipe.network import read_matrix
from spotpipe.sim.skipjob import plan_job, plan_report, skip_setting

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
GEO = REPO / "configs" / "skippipe-paper.toml"

SMALL = """
[model]
layers = 4
d_model = 64
heads = 4
context = 32
[pipeline]
stages = 4
stage_nodes = [2, 2, 2, 2]
microbatches = 3
skip_ratio = 0.25
max_swaps = 1
node_memory = 2
plan_budget = 60
[train]
batch_size = 12
[sim]
layer_forward_s = 0.01
message_overhead_s = 0.05
"""


def _write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_geo_config_gives_the_reference_costs() -> None:
    cfg = load_config(GEO)
    setting = skip_setting(cfg, GEO.parent)
    assert setting.k == 4 and setting.sizes == (5, 3, 3, 3, 3, 3)
    assert setting.message_bytes == 4 * 1024 * 1024 * 8  # fp32 x d_model x context x 8 sequences
    assert setting.costs.forward_s == pytest.approx([0.055 * 4 * 8] * 20)  # 24 layers / 6 stages
    matrix = read_matrix(REPO / "configs" / "networks" / "gcp-12-locations.csv")
    locs = list(cfg.network.locations)
    for a, b in ((0, 11), (4, 9), (0, 12)):  # Belgium-Australia, Japan-Taiwan, Belgium-Belgium
        link = (0.001, 2 * 2**30) if locs[a] == locs[b] else (
            matrix.link(locs[a], locs[b]).latency_s, matrix.link(locs[a], locs[b]).bandwidth_Bps)
        expected = link[0] + setting.message_bytes / link[1] + 0.35
        assert setting.costs.message_s[a][b] == pytest.approx(expected, rel=1e-6)


def test_plan_job_plans_every_variant(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, SMALL))
    job = plan_job(cfg)
    report = plan_report(job)
    assert set(report["variants"]) == {"full", "random", "skippipe-nca", "skippipe"}
    assert sorted(n for g in report["placement"]["groups"] for n in g) == list(range(8))
    for v, r in report["variants"].items():
        assert r["iteration_s"] >= r["pipeline_s"] > 0
        visits = r["stage_visits"]
        assert visits[0] == 6 and len(set(visits[1:])) == 1, (v, visits)
    assert report["k"] == 3


def test_cli_json_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path, SMALL)
    trace = tmp_path / "t.json"
    assert main(["schedule", "plan", "--config", str(cfg), "--json", "--no-progress", "--trace", str(trace)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["variants"]["skippipe"]["pipeline_s"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("ph") == "X" for e in events)
    csv = tmp_path / "plan.csv"
    assert main(["schedule", "plan", "--config", str(cfg), "--no-progress", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "skippipe: paths of origin node" in out and "vs full" in out
    assert main(["schedule", "validate", str(csv), "--node-memory", "2"]) == 0
    assert "valid" in capsys.readouterr().out
    # the same file with one receive dropped is rejected with the marked grid
    lines = csv.read_text().splitlines()
    recv = next(i for i, line in enumerate(lines) if "RECV_F" in line)
    csv.write_text("\n".join(lines[:recv] + lines[recv + 1:]) + "\n")
    assert main(["schedule", "validate", str(csv), "--node-memory", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error:") and "has no matching" in err and "SEND_F" in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("stage_nodes = [2, 2, 2]", "pipeline.stage_nodes lists 3 stage groups, but pipeline.stages = 4"),
        ("skip_ratio = -0.5", "pipeline.skip_ratio must be in [0, 1), got -0.5"),
        ("node_memory = 0", "pipeline.node_memory must be in 1..1000000, got 0"),
        ("microbatches = 4", "train.batch_size (12) must be a multiple of pipeline.stage_nodes[0] x pipeline.microbatches (8)"),
        ("microbatches = 1", "4 visits cannot split evenly over the 3 non-first stages; choose pipeline.microbatches"),
    ],
)
def test_bad_pipeline_keys_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str, message: str) -> None:
    key = change.split(" =")[0]
    text = "\n".join(line for line in SMALL.splitlines() if not line.startswith(key + " ="))
    text = text.replace("[pipeline]\n", "[pipeline]\n" + change + "\n")
    assert main(["schedule", "plan", "--config", str(_write(tmp_path, text)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_network_inputs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    matrix = tmp_path / "links.csv"
    matrix.write_text("location_a,location_b,latency_ms,bandwidth_GiB_per_s\nA,B,10,0.5\n")
    base = SMALL + f'[network]\nmatrix = "{matrix}"\n'
    cases = [
        (base + 'locations = ["A", "B", "A"]\n', "network.locations has 3 entries; expected 4 (one per pipeline rank) or 8 (one per node)"),
        (base + 'locations = ["A", "B", "C", "A"]\n', "network.locations[2]: unknown location 'C'"),
    ]
    for text, message in cases:
        assert main(["schedule", "plan", "--config", str(_write(tmp_path, text)), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("spotpipe: error:") and message in err, err
        assert len(err.strip().splitlines()) == 1
    matrix.write_text("location_a,location_b,latency_ms,bandwidth_GiB_per_s\nA,B,10,-0.5\n")
    assert main(["schedule", "plan", "--config", str(_write(tmp_path, base + 'locations = ["A", "B", "A", "B"]\n')),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{matrix}:2: bandwidth_GiB_per_s must be > 0, got -0.5" in err and len(err.strip().splitlines()) == 1


def test_too_many_nodes_are_refused_before_any_work() -> None:
    """A 3,000-node plan would spend minutes building its link table before showing anything."""
    from spotpipe.errors import ConfigError

    cfg = load_config(None, ["pipeline.stages=6", "pipeline.stage_nodes=[500, 500, 500, 500, 500, 500]",
                             "train.batch_size=2000", "pipeline.microbatches=4"])
    with pytest.raises(ConfigError, match="pipeline.stage_nodes: 3000 nodes; the planner takes at most 1024"):
        plan_job(cfg)
