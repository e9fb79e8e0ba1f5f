"""Link matrices, uniform links, node locations, and the engine's event order."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from spotpipe.config import NetworkConfig
from spotpipe.errors import ConfigError
from spotpipe.sim.engine import Engine, SimulationError
from spotpipe.network import GIB, build_network, parse_matrix, read_matrix, uniform_link

pytestmark = pytest.mark.timeout(60)

LINKS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gcp-12-locations" / "links.csv"
SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "networks" / "gcp-12-locations.csv"

SMALL = """location_a,location_b,latency_ms,bandwidth_GiB_per_s
A,B,10,0.5
A,C,20,0.25
B,C,30,1
"""


def test_parse_small_matrix() -> None:
    m = parse_matrix(SMALL, "small.csv")
    assert m.locations == ("A", "B", "C")
    ab = m.link("B", "A")
    assert ab.latency_s == pytest.approx(0.010)
    assert ab.bandwidth_Bps == pytest.approx(0.5 * GIB)
    assert ab.send_s(2**20) == pytest.approx(0.010 + 2**20 / (0.5 * GIB))


@pytest.mark.parametrize(
    "text,message",
    [
        (SMALL.replace("B,C,30,1\n", ""), r"small.csv: missing pair B,C: every pair of the 3 locations"),
        (SMALL.replace("A,C,20,0.25", "A,C,20,-0.25"), r"small.csv:3: bandwidth_GiB_per_s must be > 0, got -0.25 for A,C"),
        (SMALL.replace("A,C,20,0.25", "A,C,-1,0.25"), r"small.csv:3: latency_ms must be >= 0"),
        (SMALL.replace("A,C,20,0.25", "A,C,x,0.25"), r"small.csv:3: latency_ms must be a number, got 'x'"),
        (SMALL.replace("A,C,20,0.25", "A,A,20,0.25"), r"small.csv:3: location 'A' paired with itself"),
        (SMALL + "B,A,11,0.5\n", r"small.csv:5: pair B,A listed twice with different values"),
        ("a,b,c,d\nA,B,1,1\n", r"small.csv:1: expected header location_a,location_b,latency_ms,bandwidth_GiB_per_s"),
        ("", r"small.csv: empty link matrix"),
    ],
)
def test_bad_matrices(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_matrix(text, "small.csv")


def test_build_network_locations(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(SMALL)
    net = build_network(NetworkConfig(matrix=str(path), locations=("A", "B", "C"), latency_ms=1, bandwidth_gbps=8), 3, 5)
    assert net.node_locations == ("A", "B", "C", "A", "B")  # per rank, spares round-robin
    assert net.link(0, 3).latency_s == pytest.approx(0.001)  # same location: the uniform link
    assert net.link(0, 3).bandwidth_Bps == pytest.approx(1e9)
    assert net.link(1, 2).latency_s == pytest.approx(0.030)
    per_node = build_network(NetworkConfig(matrix=str(path), locations=("C", "C", "B", "A", "A")), 3, 5)
    assert per_node.location(3) == "A" and per_node.link(1, 2).latency_s == pytest.approx(0.030)
    with pytest.raises(ConfigError, match=r"network.locations\[1\]: unknown location 'Mars'; .*m.csv has: A, B, C"):
        build_network(NetworkConfig(matrix=str(path), locations=("A", "Mars", "C")), 3, 3)
    with pytest.raises(ConfigError, match=r"network.locations has 2 entries; expected 3 \(one per pipeline rank\) or 5"):
        build_network(NetworkConfig(matrix=str(path), locations=("A", "B")), 3, 5)
    with pytest.raises(ConfigError, match=r"network.matrix: file .*nope.csv does not exist"):
        build_network(NetworkConfig(matrix=str(tmp_path / "nope.csv"), locations=("A",)), 1, 1)
    with pytest.raises(ConfigError, match=r"network.locations is set but network.matrix is empty"):
        build_network(NetworkConfig(locations=("A",)), 1, 1)


def test_uniform_links() -> None:
    assert uniform_link(0, 0).bandwidth_Bps == math.inf
    assert uniform_link(2.5, 80).send_s(10**9) == pytest.approx(0.0025 + 0.1)
    with pytest.raises(ConfigError, match=r"network.bandwidth_gbps must be >= 0"):
        uniform_link(1, -1)


@pytest.mark.skipif(not LINKS.is_file(), reason="shared data ../shared/data/gcp-12-locations/links.csv not present")
def test_gcp_matrix_and_shipped_copy() -> None:
    m = read_matrix(LINKS)
    assert len(m.locations) == 12 and len(m.links) == 12 * 11
    assert m.link("Belgium", "Germany").latency_s == pytest.approx(0.004)
    assert m.link("NL", "London").bandwidth_Bps == pytest.approx(0.00023681640625 * GIB)
    shipped = read_matrix(SHIPPED)
    assert shipped.locations == m.locations and dict(shipped.links) == dict(m.links)


def test_engine_orders_events_and_cancels() -> None:
    e = Engine()
    seen: list[tuple[float, str]] = []
    e.at(2.0, lambda: seen.append((e.now, "b")))
    e.at(1.0, lambda: seen.append((e.now, "a")))
    e.at(2.0, lambda: seen.append((e.now, "c")))  # same time: scheduling order
    timer = e.at(1.5, lambda: seen.append((e.now, "x")), cancellable=True)
    assert timer is not None
    timer.cancel()
    e.at(0.5, lambda: e.after(3.0, lambda: seen.append((e.now, "d"))))
    assert e.run() == 3.5
    assert seen == [(1.0, "a"), (2.0, "b"), (2.0, "c"), (3.5, "d")]
    with pytest.raises(SimulationError, match="in the past"):
        e.at(1.0, lambda: None)
    e2 = Engine()
    e2.at(5.0, lambda: seen.append((e2.now, "late")))
    assert e2.run(until=4.0) == 4.0 and seen[-1] == (3.5, "d")


def test_sim_and_cost_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import spotpipe.cost, spotpipe.sim.cli, spotpipe.sim.job, spotpipe.sim.report, spotpipe.network\n"
        "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:3]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
