"""The time-aware cost model of node paths: when every compute of every microbatch runs.

A microbatch of a SkipPipe plan (Blagoev, Chen, Ersoy 2025, arXiv 2502.19913) starts at its
origin (a stage-0 node: data, embedding, first blocks), visits ``k - 1`` other nodes, comes back
to its origin for the final norm, LM head and loss, and retraces the path backwards. Its tasks,
in order::

    F@origin, F@n1, ..., F@n_{k-1}, H@origin, B@n_{k-1}, ..., B@n1, B@origin

Costs (the constants of the SkipPipe simulator, ``schedulers/com_sym.py`` and
``create_schedule.py`` of gensyn-ai/skippipe; they are parameters here):

* ``F`` takes the node's ``forward_s``; ``B`` takes ``backward_ratio`` x that (1.5); the head
  ``H`` (forward, loss and its backward) takes ``head_ratio`` x the origin's forward (0.25).
* A node computes one task at a time and then stays busy ``gap_s`` more (0.13 s of host-device
  copies in the reference).
* A hand-off between two nodes arrives ``message_s[a][b]`` after the task ends (latency + bytes /
  bandwidth + a fixed overhead, 0.35 s in the reference); on one node it is immediate.
* A node holds at most ``node_memory`` microbatches' activations: an ``F`` on a full node waits
  until a ``B`` there ends. ``H`` holds nothing new.

:func:`play_paths` runs this as a discrete-event simulation where a free node takes, among the
tasks that have arrived, a backward or head first (it frees memory), then the earliest arrival.
It is the objective of the collision-aware path search (:mod:`spotpipe.schedule.skippipe`), and
its per-node order is the order the plan's lowered schedule keeps.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from spotpipe.errors import ConfigError

# Task kinds.
FORWARD, HEAD, BACKWARD = "F", "H", "B"
_PRIORITY = {BACKWARD: 0, HEAD: 0, FORWARD: 1}


@dataclass(frozen=True)
class PathCosts:
    """Seconds per task and per hand-off, per node.

    Attributes:
        forward_s: ``N`` forward seconds of one microbatch on each node's stage.
        message_s: ``N x N`` seconds from the end of a task on ``a`` until its output is at ``b``.
        backward_ratio: Backward / forward (SkipPipe's simulator: 1.5).
        head_ratio: Head (norm, LM head, loss, and their backward) / origin forward (0.25).
        gap_s: Busy time after every task (0.13 s in SkipPipe's simulator).
    """

    forward_s: tuple[float, ...]
    message_s: tuple[tuple[float, ...], ...]
    backward_ratio: float = 1.5
    head_ratio: float = 0.25
    gap_s: float = 0.13

    def __post_init__(self) -> None:
        n = len(self.forward_s)
        if len(self.message_s) != n or any(len(r) != n for r in self.message_s):
            raise ConfigError(f"path costs: message matrix must be {n} x {n}")
        if any(not x >= 0 for x in self.forward_s) or any(not x >= 0 for r in self.message_s for x in r):
            raise ConfigError("path costs: compute and message times must be >= 0")

    @property
    def num_nodes(self) -> int:
        return len(self.forward_s)

    def duration(self, kind: str, node: int) -> float:
        """Seconds of one task of ``kind`` (F, H or B) on ``node``.

        Args:
            kind: ``F`` (forward), ``H`` (head) or ``B`` (backward).
            node: Node id.

        Returns:
            Seconds: forward, ``backward_ratio`` x forward, or ``head_ratio`` x forward.
        """
        f = self.forward_s[node]
        if kind == FORWARD:
            return f
        if kind == BACKWARD:
            return self.backward_ratio * f
        return self.head_ratio * f

    def hop(self, a: int, b: int) -> float:
        """Hand-off time from node ``a`` to node ``b`` (0 on one node).

        Args:
            a: Sending node.
            b: Receiving node.

        Returns:
            ``message_s[a][b]`` seconds; 0.0 when ``a == b``.
        """
        return 0.0 if a == b else self.message_s[a][b]

    def isolated_s(self, origin: int, nodes: Sequence[int]) -> float:
        """Round trip of one microbatch alone on the cluster (no collisions, no gaps).

        Args:
            origin: Stage-0 node the microbatch starts and ends on.
            nodes: Nodes it visits after the origin, in order.

        Returns:
            Seconds of the forwards, head, backwards and the hops both ways.
        """
        chain = [origin, *nodes]
        t = sum(self.duration(FORWARD, n) for n in chain) + self.duration(HEAD, origin)
        t += sum(self.duration(BACKWARD, n) for n in chain)
        t += 2 * sum(self.hop(chain[i], chain[i + 1]) for i in range(len(chain) - 1))
        t += 2 * self.hop(chain[-1], origin)
        return t


@dataclass(frozen=True)
class Task:
    """One compute of one microbatch on one node, as played."""

    microbatch: int
    kind: str
    node: int
    position: int  # 0 = the origin's stage, i = the i-th node of the path (the head: len(path))
    start: float
    end: float


@dataclass(frozen=True)
class PathTiming:
    """Result of :func:`play_paths`.

    Attributes:
        makespan_s: End of the last backward (``inf`` when the plan cannot finish).
        finish_s: Per microbatch, end of its last backward at its origin.
        node_tasks: Per node, its tasks in the order they ran.
        stuck: A one-line reason when the plan cannot finish (node memory), else "".
    """

    makespan_s: float
    finish_s: tuple[float, ...]
    node_tasks: tuple[tuple[Task, ...], ...]
    stuck: str = ""


def task_chain(origin: int, nodes: Sequence[int]) -> list[tuple[str, int, int]]:
    """The tasks of one microbatch in order: (kind, node, position).

    Args:
        origin: Stage-0 node.
        nodes: Nodes visited after the origin, in order.

    Returns:
        Forwards from the origin out, the head on the origin, backwards back; position 0 is the
        origin, ``i + 1`` the ``i``-th node of ``nodes``.
    """
    chain = [(FORWARD, origin, 0)] + [(FORWARD, n, i + 1) for i, n in enumerate(nodes)]
    chain.append((HEAD, origin, len(nodes) + 1))
    chain += [(BACKWARD, n, i + 1) for i, n in reversed(list(enumerate(nodes)))]
    chain.append((BACKWARD, origin, 0))
    return chain


def play_paths(
    origins: Sequence[int],
    paths: Sequence[Sequence[int]],
    costs: PathCosts,
    node_memory: int,
    release_s: Sequence[float] | None = None,
) -> PathTiming:
    """Play every microbatch's path on the cluster (see the module docstring for the model).

    Args:
        origins: ``M`` origin node of each microbatch.
        paths: ``M`` node sequences after the origin (the nodes of the visited non-first stages).
        costs: Compute and hand-off times.
        node_memory: Most activations one node holds at once (>= 1).
        release_s: Earliest start of each microbatch (default 0); the microbatches of one origin
            start in index order.

    Returns:
        The :class:`PathTiming`; ``makespan_s`` is ``inf`` and ``stuck`` says why when nodes wait
        on each other's memory forever.
    """
    m = len(paths)
    n = costs.num_nodes
    chains = [task_chain(origins[j], paths[j]) for j in range(m)]
    step = [0] * m
    held = [0] * n
    free_at = [0.0] * n
    ready: list[list[tuple[int, float, int, int]]] = [[] for _ in range(n)]  # (prio, arrival, seq, mb)
    wake: list[tuple[float, int, int]] = []
    seq = 0
    rel = [0.0] * m if release_s is None else list(release_s)
    for j in range(m):
        ready[origins[j]].append((1, rel[j], j, j))
        heapq.heappush(wake, (rel[j], seq, origins[j]))
        seq += 1
    done: list[list[Task]] = [[] for _ in range(n)]
    finish = [math.inf] * m
    pending_free: list[tuple[float, int]] = []
    while wake:
        t, _, node = heapq.heappop(wake)
        while pending_free and pending_free[0][0] <= t:
            _, nd = heapq.heappop(pending_free)
            held[nd] -= 1
        if free_at[node] > t + 1e-12:
            continue
        best_i = -1
        for i, (prio, arrival, _s, j) in enumerate(ready[node]):
            if arrival > t + 1e-12:
                continue
            kind = chains[j][step[j]][0]
            if kind == FORWARD and held[node] >= node_memory:
                continue
            if best_i < 0 or (prio, arrival, _s) < ready[node][best_i][:3]:
                best_i = i
        if best_i < 0:
            continue
        _, _, _, j = ready[node].pop(best_i)
        kind, nd, pos = chains[j][step[j]]
        end = t + costs.duration(kind, nd)
        if kind == FORWARD:
            held[nd] += 1
        elif kind == BACKWARD:
            heapq.heappush(pending_free, (end, nd))
        free_at[nd] = end + costs.gap_s
        done[nd].append(Task(j, kind, nd, pos, t, end))
        heapq.heappush(wake, (free_at[nd], seq, nd))
        seq += 1
        step[j] += 1
        if step[j] == len(chains[j]):
            finish[j] = end
            continue
        nxt_kind, nxt, _ = chains[j][step[j]]
        arrival = end + costs.hop(nd, nxt)
        ready[nxt].append((_PRIORITY[nxt_kind], arrival, seq, j))
        heapq.heappush(wake, (arrival, seq, nxt))
        seq += 1
    stuck = ""
    if any(math.isinf(f) for f in finish):
        waiting = [j for j in range(m) if math.isinf(finish[j])]
        j = waiting[0]
        kind, nd, _ = chains[j][step[j]]
        stuck = (f"microbatch {j} waits forever for a free activation slot on node {nd} (node_memory "
                 f"{node_memory}); {len(waiting)} microbatches cannot finish")
    return PathTiming(max(finish, default=0.0), tuple(finish), tuple(tuple(d) for d in done), stuck)
