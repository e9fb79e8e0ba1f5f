"""Known answers of the pipeline player, and a cross-check against an independent longest path."""

from __future__ import annotations

import math
import random

import pytest

from spotpipe.cost import CostModel
from spotpipe.schedule.generators import build_schedule
from spotpipe.schedule.ir import Op, Placement, Schedule, ScheduleError
from spotpipe.schedule.passes import lower
from spotpipe.sim.engine import SimulationError
from spotpipe.network import Link, LinkMatrix, Network
from spotpipe.sim.player import play_iteration

pytestmark = pytest.mark.timeout(60)

INF = math.inf


def costs(stages: int, tf: float | list[float] = 1.0, tb: float | list[float] = 2.0, nbytes: int = 1000, grad: int = 0) -> CostModel:
    fs = tf if isinstance(tf, list) else [tf] * stages
    bs = tb if isinstance(tb, list) else [tb] * stages
    return CostModel(
        forward_s=tuple(fs), backward_s=tuple(bs), boundary_bytes=(nbytes,) * stages,
        activation_bytes=(7,) * stages, grad_bytes=(grad,) * stages, param_count=(0,) * stages,
    )


def uniform(nodes: int, latency: float = 0.0, bw: float = INF) -> Network:
    return Network(nodes, Link(latency, bw))


class OneSlowLink(Network):
    """Uniform links except between nodes k and k+1 (both directions)."""

    def __init__(self, nodes: int, k: int, slow: Link, fast: Link = Link(0.0, INF)) -> None:
        super().__init__(nodes, fast)
        object.__setattr__(self, "_k", k)
        object.__setattr__(self, "_slow", slow)

    def link(self, src: int, dst: int) -> Link:
        return self._slow if {src, dst} == {self._k, self._k + 1} else self.local


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,micro", [(2, 1), (2, 5), (4, 4), (4, 8), (8, 3), (8, 16), (16, 32)])
def test_bubble_equal_stage_times(name: str, stages: int, micro: int) -> None:
    tf, tb = 1.5, 3.0
    r = play_iteration(lower(build_schedule(name, stages, micro)), costs(stages, tf, tb), uniform(stages))
    assert r.pipeline_s == pytest.approx((micro + stages - 1) * (tf + tb))
    expected = (stages - 1) / (micro + stages - 1)
    for rank_bubble in r.rank_bubble():
        assert rank_bubble == pytest.approx(expected)


@pytest.mark.parametrize("ranks,virtual,micro", [(2, 2, 4), (4, 2, 8), (4, 3, 8), (3, 2, 9)])
def test_bubble_interleaved(ranks: int, virtual: int, micro: int) -> None:
    # Each chunk takes 1/V of a rank's work: bubble (P-1)/(V M + P-1) (Narayanan et al. 2021).
    chunks = ranks * virtual
    r = play_iteration(lower(build_schedule("interleaved", ranks, micro, virtual)), costs(chunks, 1.0, 1.0), uniform(ranks))
    for b in r.rank_bubble():
        assert b == pytest.approx((ranks - 1) / (virtual * micro + ranks - 1))


@pytest.mark.parametrize("stages,micro", [(4, 4), (4, 9), (6, 12), (8, 8), (5, 3)])
def test_1f1b_peak_activations(stages: int, micro: int) -> None:
    r = play_iteration(lower(build_schedule("1f1b", stages, micro)), costs(stages), uniform(stages, 0.3, 1e5))
    for rank in range(stages):
        assert r.peak_activations[rank] == (min(stages - rank, micro),)
        assert r.peak_activation_bytes[rank] == (7 * min(stages - rank, micro),)
    g = play_iteration(lower(build_schedule("gpipe", stages, micro)), costs(stages), uniform(stages))
    assert all(p == (micro,) for p in g.peak_activations)


@pytest.mark.parametrize("stages,micro,k,latency", [(2, 4, 0, 0.7), (4, 8, 1, 5.0), (4, 8, 2, 0.25), (6, 3, 4, 11.0)])
def test_single_slow_link_latency_gpipe(stages: int, micro: int, k: int, latency: float) -> None:
    # The critical path crosses the slow link once forward and once backward: +2L.
    tf, tb = 1.0, 2.0
    s = lower(build_schedule("gpipe", stages, micro))
    r = play_iteration(s, costs(stages, tf, tb), OneSlowLink(stages, k, Link(latency, INF)))
    assert r.pipeline_s == pytest.approx((micro + stages - 1) * (tf + tb) + 2 * latency)


@pytest.mark.parametrize("stages,micro,k,x,latency", [(2, 4, 0, 3.0, 0.0), (4, 6, 1, 2.5, 0.0), (5, 8, 3, 4.0, 1.5), (3, 1, 0, 10.0, 2.0)])
def test_single_bandwidth_bound_link_gpipe(stages: int, micro: int, k: int, x: float, latency: float) -> None:
    # Messages of x seconds each (x >= tf, tb) queue on the slow link: S(tf+tb) + 2Mx + 2L.
    tf, tb, nbytes = 1.0, 2.0, 1000
    s = lower(build_schedule("gpipe", stages, micro))
    r = play_iteration(s, costs(stages, tf, tb, nbytes), OneSlowLink(stages, k, Link(latency, nbytes / x)))
    assert r.pipeline_s == pytest.approx(stages * (tf + tb) + 2 * micro * x + 2 * latency)
    slow = [u for u in r.links if {u.src, u.dst} == {k, k + 1}]
    assert sum(u.busy_s for u in slow) == pytest.approx(2 * micro * x)
    assert sum(u.messages for u in slow) == 2 * micro


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved"])
def test_single_microbatch_slow_link_any_schedule(name: str) -> None:
    ranks, virtual = 4, (2 if name == "interleaved" else 1)
    micro = ranks if name == "interleaved" else 1
    s = lower(build_schedule(name, ranks, micro, virtual))
    base = play_iteration(s, costs(s.num_stages, 1.0, 2.0), uniform(ranks))
    slow = play_iteration(s, costs(s.num_stages, 1.0, 2.0, 500), OneSlowLink(ranks, 1, Link(0.5, 1000.0)))
    crossings = sum(1 for a, b in zip(range(s.num_stages), range(1, s.num_stages)) if {a % ranks, b % ranks} == {1, 2})
    if micro == 1:
        assert slow.pipeline_s == pytest.approx(base.pipeline_s + 2 * crossings * (0.5 + 0.5))
    else:
        assert slow.pipeline_s > base.pipeline_s


# -- independent cross-check -------------------------------------------------------------------


def longest_path(schedule: Schedule, cost: CostModel, net: Network, nodes: list[int], speeds: list[float]) -> tuple[float, list[float]]:
    """Fixed-point relaxation of start times over (rank order, message) constraints."""
    m = schedule.num_microbatches
    ends: dict[tuple[int, int], float] = {}  # (rank, index) -> end time
    arrival: dict[int, float] = {}
    for _ in range(10_000):
        changed = False
        link_free: dict[tuple[int, int], float] = {}
        for rank, acts in enumerate(schedule.ranks):
            t = 0.0
            posted: dict[tuple[int, Op, int], int] = {}
            for i, a in enumerate(acts):
                if a.op.is_recv:
                    posted[(a.stage, Op.F if a.op is Op.RECV_F else Op.B, a.microbatch)] = a.tag(m)
                    end = t
                elif a.op.is_send:
                    dst = nodes[schedule.stage_to_rank[a.peer]]
                    link = net.link(nodes[rank], dst)
                    start = max(t, link_free.get((nodes[rank], dst), 0.0))
                    ser = link.serialization_s(cost.message_bytes(a))
                    link_free[(nodes[rank], dst)] = start + ser
                    arr = start + ser + link.latency_s
                    if arrival.get(a.tag(m)) != arr:
                        arrival[a.tag(m)] = arr
                        changed = True
                    end = t
                else:
                    tag = posted.pop((a.stage, a.op, a.microbatch), None)
                    start = max(t, arrival.get(tag, INF) if tag is not None else t)
                    end = start + cost.duration(a, speeds[rank])
                if ends.get((rank, i)) != end:
                    ends[(rank, i)] = end
                    changed = True
                t = end
        if not changed:
            break
    busy = [sum(cost.duration(a, speeds[r]) for a in acts if a.op.is_compute) for r, acts in enumerate(schedule.ranks)]
    return max(ends.values()), busy


@pytest.mark.parametrize("name,ranks,micro,virtual", [("gpipe", 4, 6, 1), ("1f1b", 5, 7, 1), ("1f1b", 3, 2, 1), ("interleaved", 3, 6, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_longest_path(name: str, ranks: int, micro: int, virtual: int, seed: int) -> None:
    rng = random.Random(seed)
    s = lower(build_schedule(name, ranks, micro, virtual))
    n = s.num_stages
    cost = costs(n, [rng.uniform(0.5, 2) for _ in range(n)], [rng.uniform(1, 4) for _ in range(n)], nbytes=1000)
    locations = tuple(rng.choice("abc") for _ in range(ranks))
    links = {}
    for a in "abc":
        for b in "abc":
            if a != b:
                links[(a, b)] = Link(rng.uniform(0, 3), rng.choice([INF, rng.uniform(200, 2000)]))
    net = Network(ranks, Link(0.1, 5000.0), LinkMatrix(("a", "b", "c"), links), locations)
    speeds = [rng.choice([0.5, 1.0, 2.0]) for _ in range(ranks)]
    r = play_iteration(s, cost, net, Placement.dense(ranks, 1), speeds)
    expected, busy = longest_path(s, cost, net, list(range(ranks)), speeds)
    # The last action of the longest path is a compute action (sends end at the same time).
    assert r.pipeline_s == pytest.approx(expected)
    assert [b[0] for b in r.busy_s] == pytest.approx(busy)


def test_replicas_are_played_separately() -> None:
    # Replica 1 sits on slow nodes: its ranks take longer, replica 0 is untouched.
    s = lower(build_schedule("1f1b", 3, 4))
    net = uniform(6, 0.0)  # no latency: halving the speed exactly doubles every time
    r = play_iteration(s, costs(3), net, Placement.dense(3, 2), speeds=[1, 1, 1, 0.5, 0.5, 0.5])
    single = play_iteration(s, costs(3), uniform(3, 0.0))
    assert r.pipeline_s == pytest.approx(2 * single.pipeline_s)
    assert [b[0] for b in r.busy_s] == pytest.approx([b[0] for b in single.busy_s])
    assert [b[1] for b in r.busy_s] == pytest.approx([2 * b[0] for b in single.busy_s])


def test_ring_allreduce_and_optimizer_time() -> None:
    ranks, reps, grad, lat, bw = 2, 4, 8000, 0.01, 1000.0
    s = lower(build_schedule("gpipe", ranks, 2))
    cost = costs(ranks, grad=grad)
    cost = CostModel(**{**cost.__dict__, "optimizer_s": 0.3, "overhead_s": 0.2})
    r = play_iteration(s, cost, uniform(ranks * reps, lat, bw), Placement.dense(ranks, reps))
    ar = 2 * (reps - 1) * (lat + grad / reps / bw)  # Patarasuk & Yuan 2009
    assert r.allreduce_s == pytest.approx((ar, ar))
    barrier = 2 * (ranks * reps - 1) * lat  # ring of scalars over all 8 workers
    assert r.barrier_s == pytest.approx(barrier)
    # the last rank finishes its backwards first, rank 0 last: rank 0 decides the iteration
    assert r.iteration_s == pytest.approx(r.pipeline_s + ar + barrier + 0.3 + 0.2)
    off = play_iteration(s, cost, uniform(ranks * reps, lat, bw), Placement.dense(ranks, reps), collectives=False)
    assert off.allreduce_s == (0.0, 0.0) and off.barrier_s == 0.0
    assert off.iteration_s == pytest.approx(r.pipeline_s + 0.3 + 0.2)


def test_unlowered_schedule_is_a_clear_error() -> None:
    with pytest.raises(ScheduleError, match=r"rank 0: 0B0 needs data from stage 1 on rank 1 but no 0RECV_B0 precedes it"):
        play_iteration(build_schedule("1f1b", 2, 2), costs(2), uniform(2))


def test_deadlock_names_rank_and_action() -> None:
    s = lower(build_schedule("gpipe", 2, 1))
    ranks = [list(acts) for acts in s.ranks]
    ranks[0] = [a for a in ranks[0] if a.op is not Op.SEND_F]
    with pytest.raises(SimulationError, match=r"deadlock: .*rank 1 \(replica 0\) at 1F0"):
        play_iteration(s.with_ranks(ranks), costs(2), uniform(2))


def test_recorded_actions_are_consistent() -> None:
    s = lower(build_schedule("1f1b", 3, 4))
    r = play_iteration(s, costs(3), uniform(3, 0.2, 1e4), record=True)
    assert len(r.actions) == sum(1 for acts in s.ranks for a in acts if not a.op.is_recv)
    for rank in range(3):
        mine = sorted((a for a in r.actions if a.rank == rank and a.action.op.is_compute), key=lambda a: a.start)
        assert all(x.end <= y.start + 1e-12 for x, y in zip(mine, mine[1:]))  # one compute at a time
    sends = {(a.action.stage, a.action.op, a.action.microbatch): a.end for a in r.actions if a.action.op.is_send}
    for a in r.actions:
        if a.action.op is Op.F and a.action.stage > 0:
            assert a.start >= sends[(a.action.stage - 1, Op.SEND_F, a.action.microbatch)] - 1e-12


def test_shared_host_processor_sharing() -> None:
    # GPipe, 2 stages, 1 microbatch: the ranks never compute at once, so sharing changes nothing.
    s1 = lower(build_schedule("gpipe", 2, 1))
    alone = play_iteration(s1, costs(2), uniform(2))
    assert play_iteration(s1, costs(2), uniform(2), host_cores=1).pipeline_s == pytest.approx(alone.pipeline_s)
    # 1 replica per rank, every rank busy from t=0 without dependencies: 4 single-stage jobs.
    s = Schedule.from_rank_texts(["0F0 0B0"], num_microbatches=1)
    four = play_iteration(s, costs(1, 1.0, 2.0), uniform(4), Placement.dense(1, 4), host_cores=2)
    assert four.pipeline_s == pytest.approx(2 * 3.0)  # 4 jobs on 2 cores: each at half speed
    assert [b[0] for b in zip(*four.busy_s)] == pytest.approx([6.0] * 4)
    # 3 jobs of 1 and one of 2 on 2 cores: all at 1/2 until t=2, then the long one alone at 1.
    s2 = Schedule.from_rank_texts(["0F0"], num_microbatches=1)
    c = CostModel((1.0,), (1.0,), (0,), (0,), (0,), (0,))
    r = play_iteration(s2, c, uniform(4), Placement.dense(1, 4), speeds=[1, 1, 1, 0.5], host_cores=2)
    assert r.pipeline_s == pytest.approx(3.0)
    # Matches the no-sharing answer when there are at least as many cores as workers.
    s3 = lower(build_schedule("1f1b", 4, 6))
    assert play_iteration(s3, costs(4), uniform(4, 0.2), host_cores=4).pipeline_s == pytest.approx(
        play_iteration(s3, costs(4), uniform(4, 0.2)).pipeline_s)
    assert play_iteration(s3, costs(4), uniform(4, 0.2), host_cores=1).pipeline_s > play_iteration(
        s3, costs(4), uniform(4, 0.2)).pipeline_s
