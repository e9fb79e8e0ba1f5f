"""The simulated cluster: nodes (location, speed), links, and the processes that kill nodes.

Nodes ``0 .. stages x replicas - 1`` start as the job's workers (worker ``replica * stages +
rank`` holds pipeline rank ``rank`` of replica ``replica``, as :meth:`Placement.dense`); the next
``sim.spares`` nodes start as idle spares. A node that joins later (a replacement, or an ``add``
of a trace) gets a new id; it takes the location and speed of the worker it replaces when it is
placed (a spot instance re-acquired in the same region).

Failure sources, all producing :class:`NodeEvent` records the job simulation plays:

* fixed failures ``sim.failures = ["NODE@SECONDS", ...]``;
* a Poisson process per node at ``sim.failure_rate`` failures per node-day (exponential times
  between failures; the model behind the per-node-day rates of Kokolis et al. 2025, "Revisiting
  Reliability in Large-Scale Machine Learning Research Clusters");
* replay of a preemption trace in the format of the Bamboo traces (Thorpe et al., NSDI 2023):
  ``<ms since start>,<add|remove>,<node name>`` per line. Names map to node ids in order of first
  appearance: the first ``workers + spares`` names are the job's initial nodes (their ``add``
  lines are the cluster coming up and are ignored), a later ``add`` is a new node joining the
  spare pool, ``remove`` is a failure (preemption) of that node.

Pure Python.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spotpipe.config import JobConfig
from spotpipe.cost import speeds_per_node
from spotpipe.errors import ConfigError
from spotpipe.fsutil import read_text
from spotpipe.schedule.ir import Placement
from spotpipe.fsutil import resolve_path
from spotpipe.network import Network, build_network

FAIL = "fail"
JOIN = "join"
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class NodeEvent:
    """A node fails (``kind = "fail"``) or a new node joins the spare pool (``"join"``)."""

    time: float
    kind: str
    node: int


@dataclass(frozen=True)
class Cluster:
    """Nodes and links of a simulated job.

    Attributes:
        ranks: Pipeline ranks (``pipeline.stages``).
        replicas: Data-parallel replicas.
        network: Links between all nodes known so far.
        speeds: Relative compute speed per node.
        spares: Node ids that start idle.
    """

    ranks: int
    replicas: int
    network: Network
    speeds: tuple[float, ...]
    spares: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return self.network.num_nodes

    @property
    def workers(self) -> int:
        """Nodes that start as workers."""
        return self.ranks * self.replicas

    def initial_placement(self) -> Placement:
        """Worker ``replica * ranks + rank`` on rank ``rank``."""
        return Placement.dense(self.ranks, self.replicas)


def build_cluster(cfg: JobConfig, base_dir: str | Path | None = None) -> Cluster:
    """The cluster of a job config: stages x replicas workers plus ``sim.spares``.

    Args:
        cfg: A validated job config (``pipeline.stages``, ``pipeline.replicas``, ``sim.spares``,
            ``sim.speed_factors``, ``[network]``).
        base_dir: Folder that relative paths of ``[network]`` are read from; ``None``: the current one.

    Returns:
        The :class:`Cluster`: its network, one speed factor per node, and the spare node ids.

    Raises:
        ConfigError: for a network or speed-factor setting that does not fit the node count.
    """
    ranks, replicas = cfg.pipeline.stages, cfg.pipeline.replicas
    nodes = ranks * replicas + cfg.sim.spares
    network = build_network(cfg.network, ranks, nodes, base_dir)
    speeds = speeds_per_node(cfg.sim.speed_factors, ranks, nodes)
    return Cluster(ranks, replicas, network, speeds, tuple(range(ranks * replicas, nodes)))


# ----------------------------------------------------------------------------------------------
# Failure sources


def parse_failures(specs: Sequence[str], num_nodes: int) -> list[NodeEvent]:
    """``sim.failures`` entries ``"NODE@SECONDS"`` as fail events, sorted by time.

    Args:
        specs: ``sim.failures`` entries, ``"NODE@SECONDS"`` (node id, virtual seconds >= 0).
        num_nodes: Nodes of the cluster; a node id must be below it.

    Returns:
        One ``fail`` :class:`NodeEvent` per entry, sorted by time then node.

    Raises:
        ConfigError: for an entry that does not parse, a node out of range or a negative time.
    """
    out: list[NodeEvent] = []
    for i, spec in enumerate(specs):
        node_text, sep, time_text = spec.partition("@")
        try:
            node, when = int(node_text), float(time_text)
        except ValueError:
            node, when = -1, math.nan
        if not sep or not math.isfinite(when):
            raise ConfigError(f"sim.failures[{i}]: expected NODE@SECONDS (finite) like 3@120.5, got {spec!r}")
        if not 0 <= node < num_nodes:
            raise ConfigError(f"sim.failures[{i}]: node {node} out of range [0, {num_nodes - 1}] in {spec!r}")
        if when < 0:
            raise ConfigError(f"sim.failures[{i}]: time must be >= 0, got {when} in {spec!r}")
        out.append(NodeEvent(when, FAIL, node))
    return sorted(out, key=lambda e: (e.time, e.node))


class PoissonFailures:
    """Independent exponential times between failures per node, at ``rate`` per node-day."""

    def __init__(self, rate_per_node_day: float, seed: int = 0) -> None:
        """

        Args:
            rate_per_node_day: Expected failures per node per day (>= 0; 0: never).
            seed: Seed of the exponential draws.

        Raises:
            ConfigError: for a negative rate.
        """
        if rate_per_node_day < 0:
            raise ConfigError(f"sim.failure_rate must be >= 0, got {rate_per_node_day}")
        self.rate_per_s = rate_per_node_day / SECONDS_PER_DAY
        self._rng = random.Random(seed)

    def next_failure(self, now: float) -> float:
        """Time of the next failure of a node alive at ``now`` (``inf`` at rate 0).

        Args:
            now: Virtual time in seconds.

        Returns:
            ``now`` plus an exponential draw of mean ``1 / rate_per_s`` seconds; ``inf`` at rate 0.
        """
        if self.rate_per_s == 0:
            return math.inf
        return now + self._rng.expovariate(self.rate_per_s)


def parse_preemption_trace(text: str, initial_nodes: int, source: str = "trace") -> list[NodeEvent]:
    """Bamboo-format preemption trace -> node events (see the module docstring).

    Args:
        text: The trace: one ``<ms>,<add|remove>,<name>`` line per event (times in milliseconds).
        initial_nodes: Nodes up at time 0 (ids ``0 .. initial_nodes - 1``); added names get new ids.
        source: Name of the trace in error messages.

    Returns:
        Node events in virtual seconds, in trace order.

    Raises:
        ConfigError: a line that is not ``<ms>,<add|remove>,<name>`` (names the line), a time
            going backwards, or a ``remove`` of a node that is not up.
    """
    ids: dict[str, int] = {}
    up: set[int] = set()
    next_new = initial_nodes
    events: list[NodeEvent] = []
    last = -math.inf
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 3 or cells[1] not in ("add", "remove"):
            raise ConfigError(f"{source}:{number}: expected '<ms>,<add|remove>,<node>', got {line.strip()!r}")
        try:
            ms = float(cells[0])
        except ValueError:
            raise ConfigError(f"{source}:{number}: time {cells[0]!r} is not a number of milliseconds") from None
        if ms < last:
            raise ConfigError(f"{source}:{number}: time {ms:g} ms goes backwards (previous {last:g} ms)")
        last = ms
        name, kind = cells[2], cells[1]
        if kind == "add":
            if name not in ids and len(ids) < initial_nodes:
                ids[name] = len(ids)  # an initial node coming up
                up.add(ids[name])
                continue
            ids[name] = next_new  # a new node (or a preempted one re-acquired: a new instance)
            next_new += 1
            up.add(ids[name])
            events.append(NodeEvent(ms / 1000.0, JOIN, ids[name]))
        else:
            if name not in ids and len(ids) < initial_nodes:
                ids[name] = len(ids)
                up.add(ids[name])
            node = ids.get(name)
            if node is None or node not in up:
                raise ConfigError(f"{source}:{number}: remove of node {name!r}, which is not up")
            up.discard(node)
            events.append(NodeEvent(ms / 1000.0, FAIL, node))
    return events


def read_preemption_trace(path: str | Path, initial_nodes: int, base_dir: str | Path | None = None) -> list[NodeEvent]:
    """Read ``sim.failure_trace`` (Bamboo format).

    Args:
        path: The trace file (``sim.failure_trace``).
        initial_nodes: Nodes up at time 0.
        base_dir: Folder a relative ``path`` is read from; ``None``: the current one.

    Returns:
        Node events as :func:`parse_preemption_trace` gives them.

    Raises:
        ConfigError: for a missing file or a bad line (see :func:`parse_preemption_trace`).
    """
    p = resolve_path(str(path), base_dir)
    if not p.is_file():
        raise ConfigError(f"sim.failure_trace: file {p} does not exist")
    return parse_preemption_trace(read_text(p, "sim.failure_trace:"), initial_nodes, str(p))
