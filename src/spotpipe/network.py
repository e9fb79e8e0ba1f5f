"""Links between nodes: uniform clusters and per-location latency/bandwidth matrices.

This is the ONE place that turns ``[network]`` settings into per-link latency and bandwidth; the
simulator (:mod:`spotpipe.sim.player`) and the runtime's link-delay transport wrapper
(:mod:`spotpipe.runtime.comm.linkdelay`) both call it, so a simulated and an emulated cluster see the
same links. Pure Python: no torch.

The matrix format is that of the SkipPipe measurements of 12 Google Cloud locations (Blagoev,
Chen, Ersoy 2025, "SkipPipe: Partial and Reordered Pipelining Framework for Training LLMs in
Heterogeneous Networks"): a CSV with header ``location_a,location_b,latency_ms,
bandwidth_GiB_per_s``, one row per unordered pair of distinct locations; ``#`` lines are comments.
Sending ``B`` bytes over a link costs ``latency + B / bandwidth`` seconds (the same paper's cost
model, and the alpha-beta model of Hockney 1994). Two nodes in the same location use the uniform
link of ``network.latency_ms`` / ``network.bandwidth_gbps``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spotpipe.config import NetworkConfig
from spotpipe.errors import ConfigError
from spotpipe.fsutil import read_text, resolve_path

GIB = float(2**30)
HEADER = ("location_a", "location_b", "latency_ms", "bandwidth_GiB_per_s")


@dataclass(frozen=True)
class Link:
    """One direction of a link between two nodes.

    Attributes:
        latency_s: One-way latency in seconds.
        bandwidth_Bps: Bytes per second; ``math.inf`` means unlimited.
    """

    latency_s: float
    bandwidth_Bps: float

    def serialization_s(self, nbytes: int) -> float:
        """Time the link is busy pushing ``nbytes`` (``nbytes / bandwidth``).

        Args:
            nbytes: Message size in bytes.

        Returns:
            Seconds; 0 on an unlimited link.
        """
        return 0.0 if math.isinf(self.bandwidth_Bps) else nbytes / self.bandwidth_Bps

    def send_s(self, nbytes: int) -> float:
        """Time from send to arrival of one message on an idle link: latency + bytes / bandwidth.

        Args:
            nbytes: Message size in bytes.

        Returns:
            Seconds.
        """
        return self.latency_s + self.serialization_s(nbytes)


def uniform_link(latency_ms: float, bandwidth_gbps: float) -> Link:
    """A link from ``network.latency_ms`` and ``network.bandwidth_gbps`` (Gbit/s, 0 = unlimited).

    Args:
        latency_ms: One-way latency, milliseconds, >= 0.
        bandwidth_gbps: Bandwidth in Gbit/s (1e9 bits), >= 0; 0 is unlimited.

    Returns:
        The link in seconds and bytes per second.

    Raises:
        ConfigError: on a negative latency or bandwidth.
    """
    if latency_ms < 0:
        raise ConfigError(f"network.latency_ms must be >= 0, got {latency_ms}")
    if bandwidth_gbps < 0:
        raise ConfigError(f"network.bandwidth_gbps must be >= 0 (0 = unlimited), got {bandwidth_gbps}")
    bw = math.inf if bandwidth_gbps == 0 else bandwidth_gbps * 1e9 / 8.0
    return Link(latency_ms / 1000.0, bw)


@dataclass(frozen=True)
class LinkMatrix:
    """Latency and bandwidth between every pair of distinct locations (symmetric).

    Attributes:
        locations: Location names in order of first appearance in the file.
        links: ``(a, b) -> Link`` for both orders of every pair.
        source: Where the matrix came from (for error messages).
    """

    locations: tuple[str, ...]
    links: Mapping[tuple[str, str], Link] = field(repr=False)
    source: str = "matrix"

    def link(self, a: str, b: str) -> Link:
        """The link between two distinct locations; a clear error if one is unknown.

        Args:
            a: A location of the matrix.
            b: Another location of the matrix.

        Returns:
            The link between them (the matrix holds both directions).

        Raises:
            ConfigError: if a location is unknown or the pair has no row.
        """
        for loc in (a, b):
            if loc not in self.locations:
                raise ConfigError(f"{self.source}: unknown location {loc!r}; known: {', '.join(self.locations)}")
        try:
            return self.links[(a, b)]
        except KeyError:
            raise ConfigError(f"{self.source}: no row for the pair {a},{b}") from None


def _parse_float(value: str, column: str, where: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise ConfigError(f"{where}: {column} must be a number, got {value!r}") from None
    if math.isnan(out):
        raise ConfigError(f"{where}: {column} must be a number, got {value!r}")
    return out


def parse_matrix(text: str, source: str = "matrix") -> LinkMatrix:
    """Parse links.csv text; every error names ``source`` and the line.

    Args:
        text: The file's text: a ``location_a,location_b,latency_ms,bandwidth_GiB_per_s`` header,
            then one row per unordered pair.
        source: What to call the text in errors (the file's path).

    Returns:
        The matrix, links in seconds and bytes per second.

    Raises:
        ConfigError: bad header, bad number, negative latency, bandwidth <= 0, a pair listed twice
            with different values, a location paired with itself, or a missing pair.
    """
    rows = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise ConfigError(f"{source}: empty link matrix; expected header {','.join(HEADER)}")
    header_no, header_line = rows[0]
    header = tuple(c.strip() for c in next(csv.reader([header_line])))
    if header[:4] != HEADER:
        raise ConfigError(f"{source}:{header_no}: expected header {','.join(HEADER)}, got {','.join(header)}")
    locations: list[str] = []
    links: dict[tuple[str, str], Link] = {}
    for number, line in rows[1:]:
        where = f"{source}:{number}"
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) < 4:
            raise ConfigError(f"{where}: expected 4 columns ({','.join(HEADER)}), got {len(cells)}")
        a, b = cells[0], cells[1]
        if not a or not b:
            raise ConfigError(f"{where}: empty location name")
        if a == b:
            raise ConfigError(f"{where}: location {a!r} paired with itself (same-location links come from network.latency_ms / network.bandwidth_gbps)")
        latency_ms = _parse_float(cells[2], "latency_ms", where)
        bandwidth = _parse_float(cells[3], "bandwidth_GiB_per_s", where)
        if latency_ms < 0:
            raise ConfigError(f"{where}: latency_ms must be >= 0, got {latency_ms} for {a},{b}")
        if not bandwidth > 0:
            raise ConfigError(f"{where}: bandwidth_GiB_per_s must be > 0, got {bandwidth} for {a},{b}")
        link = Link(latency_ms / 1000.0, bandwidth * GIB)
        for loc in (a, b):
            if loc not in locations:
                locations.append(loc)
        old = links.get((a, b))
        if old is not None and old != link:
            raise ConfigError(f"{where}: pair {a},{b} listed twice with different values")
        links[(a, b)] = link
        links[(b, a)] = link
    for i, a in enumerate(locations):
        for b in locations[i + 1 :]:
            if (a, b) not in links:
                raise ConfigError(
                    f"{source}: missing pair {a},{b}: every pair of the {len(locations)} locations must have a row"
                )
    return LinkMatrix(tuple(locations), links, source)


def read_matrix(path: str | Path) -> LinkMatrix:
    """Read a links.csv-format file (see the module docstring).

    Args:
        path: The links.csv file.

    Returns:
        The matrix (see :func:`parse_matrix`).

    Raises:
        ConfigError: if ``path`` is a directory or missing, or on a bad row (:func:`parse_matrix`).
        SpotpipeError: if the file cannot be read or is not UTF-8.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"network.matrix: {p} is a directory, not a links.csv file")
    if not p.is_file():
        raise ConfigError(f"network.matrix: file {p} does not exist")
    text = read_text(p, "network.matrix:")
    return parse_matrix(text, source=str(p))


@dataclass(frozen=True)
class Network:
    """The links between ``num_nodes`` nodes.

    Attributes:
        num_nodes: Node ids are ``0..num_nodes-1``.
        local: Link between two nodes of the same location (or every link without a matrix).
        matrix: Per-location links, or None for a uniform cluster.
        node_locations: Location of every node when a matrix is set.
    """

    num_nodes: int
    local: Link
    matrix: LinkMatrix | None = None
    node_locations: tuple[str, ...] = ()

    def link(self, src: int, dst: int) -> Link:
        """The link from node ``src`` to node ``dst``.

        Args:
            src: Sending node id.
            dst: Receiving node id.

        Returns:
            The uniform link when there is no matrix or both nodes share a location, else the matrix's.
        """
        if self.matrix is None:
            return self.local
        a, b = self.node_locations[src], self.node_locations[dst]
        return self.local if a == b else self.matrix.links[(a, b)]

    def location(self, node: int) -> str:
        """Location name of a node ("local" in a uniform cluster).

        Args:
            node: Node id.

        Returns:
            The location name.
        """
        return self.node_locations[node] if self.node_locations else "local"


def node_locations(
    locations: Sequence[str], ranks: int, num_nodes: int, matrix: LinkMatrix
) -> tuple[str, ...]:
    """One location per node from ``network.locations``.

    ``locations`` has either one entry per pipeline rank (every replica of rank ``k`` is in
    ``locations[k]``; node ``n`` is rank ``n % ranks``, so spare nodes take them round-robin) or
    one entry per node (workers ``replica * ranks + rank``, then spares).

    Args:
        locations: ``network.locations``.
        ranks: Pipeline ranks.
        num_nodes: All nodes, spares included.
        matrix: The link matrix the names must be in.

    Returns:
        One location per node id.

    Raises:
        ConfigError: on a wrong number of entries or a location the matrix does not know.
    """
    if len(locations) == num_nodes:
        per_node = tuple(locations)
    elif len(locations) == ranks:
        per_node = tuple(locations[n % ranks] for n in range(num_nodes))
    else:
        raise ConfigError(
            f"network.locations has {len(locations)} entries; expected {ranks} (one per pipeline rank)"
            + (f" or {num_nodes} (one per node)" if num_nodes != ranks else "")
        )
    known = set(matrix.locations)
    for i, loc in enumerate(locations):
        if loc not in known:
            raise ConfigError(
                f"network.locations[{i}]: unknown location {loc!r}; {matrix.source} has: {', '.join(matrix.locations)}"
            )
    return per_node


def build_network(
    net: NetworkConfig, ranks: int, num_nodes: int, base_dir: str | Path | None = None
) -> Network:
    """The :class:`Network` of a job: uniform links, or a matrix plus one location per node.

    Args:
        net: The ``[network]`` section.
        ranks: Pipeline ranks (``pipeline.stages``).
        num_nodes: All nodes (stages x replicas, plus spares in the simulator).
        base_dir: Folder of the config file, to resolve a relative ``network.matrix``.

    Returns:
        The network.

    Raises:
        ConfigError: on a bad latency or bandwidth, ``network.locations`` without a matrix (or the
            reverse), or a bad matrix or location list.
    """
    local = uniform_link(net.latency_ms, net.bandwidth_gbps)
    if not net.matrix:
        if net.locations:
            raise ConfigError("network.locations is set but network.matrix is empty: set the matrix file too")
        return Network(num_nodes, local)
    matrix = read_matrix(resolve_path(net.matrix, base_dir))
    if not net.locations:
        raise ConfigError(f"network.matrix is set: network.locations must name one location per rank ({ranks}) or per node ({num_nodes})")
    return Network(num_nodes, local, matrix, node_locations(net.locations, ranks, num_nodes, matrix))


def ring_allreduce_s(network: Network, group: Sequence[int], nbytes: int) -> float:
    """Ring all-reduce of ``nbytes`` over ``group`` (nodes in ring order): ``2 (g-1)`` steps,
    each ``nbytes / g`` over the slowest ring link plus that link's latency (Patarasuk and Yuan
    2009). 0 for one node.

    Args:
        network: Links between the nodes.
        group: Node ids, in ring order.
        nbytes: Bytes each node reduces.

    Returns:
        Seconds of the all-reduce; 0.0 for fewer than two nodes.
    """
    g = len(group)
    if g < 2:
        return 0.0
    links = [network.link(group[i], group[(i + 1) % g]) for i in range(g)]
    step = max(link.send_s(nbytes // g) for link in links)
    return 2 * (g - 1) * step
