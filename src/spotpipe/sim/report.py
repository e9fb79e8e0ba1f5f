"""What `spotpipe simulate` prints and writes: a summary (dict / table) and a Chrome trace.

The summary holds the iteration time, per-rank bubble fraction, busy time, resident activations
and peak memory (weights + gradients + AdamW moments + activations, from
:func:`spotpipe.schedule.memory.memory_profile`), the busiest links, and the job outcome
(failures, restarts, ETTR). The Chrome trace draws the simulated timings of the first iteration
with the schedule renderer's writer (:func:`spotpipe.schedule.render.chrome_trace`), one process
per (replica, rank), so it opens in Perfetto like the schedule traces do.

``spotpipe simulate --elastic MODE`` prints :func:`elastic_summary` (:func:`format_elastic`): per
mode of :func:`spotpipe.sim.elastic.simulate_elastic`, useful samples per second, ETTR, time at
each shape and the reshapes, and the elastic mode's throughput ratios over the others.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from spotpipe.schedule.generators import model_chunks
from spotpipe.schedule.memory import ChunkBytes, memory_profile
from spotpipe.schedule.render import chrome_trace
from spotpipe.schedule.validate import ActionTiming, Timeline
from spotpipe.sim.elastic import ElasticResult
from spotpipe.sim.job import JobResult, SimSetup
from spotpipe.sim.player import IterationResult

MAX_TABLE_RANKS = 16
MAX_LINKS = 20


def peak_memory(setup: SimSetup) -> list[float]:
    """Peak bytes per rank (:func:`spotpipe.schedule.memory.memory_profile`): weights, gradients,
    AdamW moments (2 x param bytes, same dtype; in host memory with ``pipeline.offload =
    "optimizer"``) and the schedule's activations (a recomputed chunk keeps its input only).

    Args:
        setup: From :func:`spotpipe.sim.job.prepare` (its cost model gives the bytes per chunk).

    Returns:
        Peak device bytes of each rank, rank order.
    """
    cost = setup.cost
    chunks = [
        ChunkBytes(weights=g, grads=g, optimizer=2 * g, activations=a, input=cost.boundary_bytes[s - 1] if s else 0)
        for s, (g, a) in enumerate(zip(cost.grad_bytes, cost.activation_bytes))
    ]
    offload = range(len(chunks)) if setup.config.pipeline.offload == "optimizer" else ()
    return [r.peak for r in memory_profile(setup.schedule, chunks, offload=offload)]


def _location(setup: SimSetup, node: int) -> str:
    net = setup.cluster.network
    return net.node_locations[node] if net.node_locations and node < len(net.node_locations) else "local"


def summary(setup: SimSetup, result: JobResult, sim_seconds: float) -> dict[str, Any]:
    """Everything `spotpipe simulate --json` prints.

    Args:
        setup: From :func:`spotpipe.sim.job.prepare`.
        result: From :func:`spotpipe.sim.job.simulate_job`.
        sim_seconds: Wall-clock seconds the simulation took.

    Returns:
        JSON-ready dict: ``config``, times in seconds, per-rank rows, links, job outcome, ``sim``.
    """
    cfg, it = setup.config, result.iteration
    p = cfg.pipeline
    memory = peak_memory(setup)
    ranks = []
    bubble, busy = it.rank_bubble(), it.rank_busy()
    for r in range(setup.schedule.num_ranks):
        ranks.append({
            "rank": r,
            "location": _location(setup, r),
            "bubble": bubble[r],
            "busy_s": busy[r],
            "peak_activations": max(it.peak_activations[r]),
            "peak_activation_bytes": max(it.peak_activation_bytes[r]),
            "peak_memory_bytes": memory[r],
            "allreduce_s": it.allreduce_s[r],
        })
    links = sorted(it.links, key=lambda u: (-u.busy_s, u.src, u.dst))
    by_loc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for u in it.links:
        acc = by_loc[(_location(setup, u.src), _location(setup, u.dst))]
        acc[0] += u.busy_s
        acc[1] += u.bytes
        acc[2] += u.messages
    return {
        "config": {
            "schedule": p.schedule,
            "stages": p.stages,
            "replicas": p.replicas,
            "microbatches": p.microbatches,
            "virtual_stages": model_chunks(p.schedule, 1, p.virtual_stages),
            "workers": p.stages * p.replicas,
            "spares": cfg.sim.spares,
            "network": cfg.network.matrix or f"uniform {cfg.network.latency_ms} ms, {cfg.network.bandwidth_gbps or 'unlimited'} Gbit/s",
            "cost": setup.cost.source,
            "steps": cfg.train.steps,
        },
        "iteration_s": it.iteration_s,
        "pipeline_s": it.pipeline_s,
        "barrier_s": it.barrier_s,
        "bubble_mean": sum(bubble) / len(bubble),
        "ranks": ranks,
        "links": {
            "count": len(it.links),
            "busiest": [
                {"src": u.src, "dst": u.dst, "src_location": _location(setup, u.src), "dst_location": _location(setup, u.dst),
                 "busy_s": u.busy_s, "bytes": u.bytes, "messages": u.messages}
                for u in links[:MAX_LINKS]
            ],
            "by_location": [
                {"src_location": a, "dst_location": b, "busy_s": v[0], "bytes": int(v[1]), "messages": int(v[2])}
                for (a, b), v in sorted(by_loc.items(), key=lambda kv: -kv[1][0])
            ],
        },
        "job": {
            "status": result.status,
            "steps": result.steps,
            "wall_s": result.wall_s,
            "failures": result.failures,
            "spare_failures": result.spare_failures,
            "restarts": result.restarts,
            "replayed_steps": result.replayed_steps,
            "checkpoints": result.checkpoints,
            "productive_s": result.productive_s,
            "ettr": result.ettr,
        },
        "sim": {"seconds": sim_seconds, "events": it.events},
    }


def _ms(x: float) -> str:
    return f"{x * 1e3:10.3f}"


def format_summary(data: dict[str, Any]) -> str:
    """The summary as a table for the terminal.

    Args:
        data: A :func:`summary` dict.

    Returns:
        The table, lines joined by newlines (times in ms, memory in MiB).
    """
    c = data["config"]
    lines = [
        f"schedule {c['schedule']}: {c['stages']} stages x {c['replicas']} replica{'s' if c['replicas'] != 1 else ''}"
        + (f" x {c['virtual_stages']} virtual" if c["virtual_stages"] > 1 else "")
        + f", {c['microbatches']} microbatches, {c['workers']} workers + {c['spares']} spares",
        f"network {c['network']}; cost {c['cost']}",
        f"iteration {data['iteration_s'] * 1e3:.3f} ms (pipeline {data['pipeline_s'] * 1e3:.3f} ms, step barrier "
        f"{data['barrier_s'] * 1e3:.3f} ms), mean bubble {data['bubble_mean']:.4f}",
        "",
        f"{'rank':>5} {'location':>12} {'bubble':>8} {'busy_ms':>10} {'peak_act':>8} {'peak_mem_MiB':>12} {'allreduce_ms':>12}",
    ]
    ranks = data["ranks"]
    shown = ranks if len(ranks) <= MAX_TABLE_RANKS else ranks[: MAX_TABLE_RANKS // 2] + ranks[-MAX_TABLE_RANKS // 2 :]
    for i, r in enumerate(shown):
        if len(ranks) > MAX_TABLE_RANKS and i == MAX_TABLE_RANKS // 2:
            lines.append(f"{'...':>5} ({len(ranks) - MAX_TABLE_RANKS} ranks not shown; --json has all)")
        lines.append(
            f"{r['rank']:>5} {r['location'][:12]:>12} {r['bubble']:8.4f} {_ms(r['busy_s'])} {r['peak_activations']:>8} "
            f"{r['peak_memory_bytes'] / 2**20:12.2f} {_ms(r['allreduce_s']):>12}"
        )
    busiest = data["links"]["busiest"][:5]
    if busiest:
        lines += ["", f"busiest links (of {data['links']['count']}):"]
        for u in busiest:
            lines.append(
                f"  node {u['src']} ({u['src_location']}) -> node {u['dst']} ({u['dst_location']}): "
                f"busy {u['busy_s'] * 1e3:.3f} ms, {u['bytes'] / 2**20:.2f} MiB in {u['messages']} messages"
            )
    j = data["job"]
    lines += [
        "",
        f"job: {j['status']}, {j['steps']} steps in {j['wall_s']:.3f} s virtual; failures {j['failures']} "
        f"(+{j['spare_failures']} idle nodes), restarts {j['restarts']}, replayed steps {j['replayed_steps']}, "
        f"checkpoints {j['checkpoints']}, ETTR {j['ettr']:.4f}",
        f"simulated in {data['sim']['seconds']:.2f} s ({data['sim']['events']} events in the first iteration)",
    ]
    return "\n".join(lines)


def elastic_summary(results: list[ElasticResult], trace: str, compress: float) -> dict[str, Any]:
    """The replays of one trace, as a dict for ``--json``.

    Args:
        results: One :class:`~spotpipe.sim.elastic.ElasticResult` per mode played.
        trace: The trace file (``sim.failure_trace``).
        compress: The time compression the trace was replayed with.

    Returns:
        ``trace``, ``compress``, per mode its measures and reshapes, and, when the elastic mode and
        another were played, ``elastic_vs_<mode>``: the ratio of useful samples per second.
    """
    modes = {
        r.mode: {
            "wall_s": r.wall_s, "steps": r.steps, "samples": r.samples, "samples_per_s": r.samples_per_s,
            "ettr": r.ettr, "productive_s": r.productive_s, "down_s": r.down_s, "shrink_lost_s": r.shrink_lost_s, "failures": r.failures,
            "joins": r.joins, "time_at_shape": dict(r.time_at_shape),
            "reshapes": [{"t": x.time, "kind": x.kind, "from": x.from_shape, "to": x.to_shape, "why": x.why,
                          "bytes": x.bytes, "seconds": x.seconds} for x in r.reshapes],
        }
        for r in results
    }
    data: dict[str, Any] = {"trace": trace, "compress": compress, "modes": modes}
    rates = {r.mode: r.samples_per_s for r in results}
    if "elastic" in rates:
        for name, rate in rates.items():
            if name != "elastic":
                data[f"elastic_vs_{name}"] = rates["elastic"] / rate if rate > 0 else None
    return data


def format_elastic(data: dict[str, Any]) -> str:
    """The replays as a table for the terminal.

    Args:
        data: An :func:`elastic_summary` dict.

    Returns:
        One line per mode (useful samples/s, ETTR, down time, reshapes, time lost to running
        shrunk, seconds at each shape),
        then the ratios, lines joined by newlines.
    """
    lines = [f"trace {data['trace']} ({data['compress']:g}x faster)",
             f"{'mode':>10} {'samples/s':>10} {'ETTR':>7} {'steps':>8} {'down_s':>9} {'failures':>8} {'reshapes':>8} {'shrink_lost_s':>13}  time at shape (s)"]
    for mode, m in data["modes"].items():
        shapes = ", ".join(f"{label} {sec:.0f}" for label, sec in m["time_at_shape"].items())
        lines.append(f"{mode:>10} {m['samples_per_s']:10.3f} {m['ettr']:7.4f} {m['steps']:8d} {m['down_s']:9.1f} "
                     f"{m['failures']:8d} {len(m['reshapes']):8d} {m['shrink_lost_s']:13.1f}  {shapes}")
    for key, value in data.items():
        if key.startswith("elastic_vs_"):
            lines.append(f"{key}: " + ("n/a (no useful samples)" if value is None else f"{value:.2f}x useful samples/s"))
    return "\n".join(lines)


def iteration_trace(setup: SimSetup, iteration: IterationResult, max_workers: int = 1024) -> dict[str, Any]:
    """Chrome trace of a recorded iteration (``play_iteration(..., record=True)``).

    One trace process per (replica, rank), at most ``max_workers`` of them (whole replicas).

    Args:
        setup: From :func:`spotpipe.sim.job.prepare`.
        iteration: A recorded iteration (its ``actions`` filled).
        max_workers: Most trace processes (whole replicas shown, at least one).

    Returns:
        A Chrome trace dict (``traceEvents``, ``otherData``), pid ``replica * ranks + rank``.
    """
    schedule = setup.schedule
    ranks = schedule.num_ranks
    replicas = len(iteration.busy_s[0]) if iteration.busy_s else 1
    shown = max(1, min(replicas, max_workers // max(1, ranks)))
    per: dict[int, list[list[ActionTiming]]] = {p: [[] for _ in range(ranks)] for p in range(shown)}
    for a in iteration.actions:
        if a.replica < shown:
            per[a.replica][a.rank].append(ActionTiming(a.rank, a.index, a.action, a.start, a.end))
    events: list[dict[str, Any]] = []
    other: dict[str, Any] = {}
    for p in range(shown):
        rows = tuple(tuple(sorted(row, key=lambda t: t.index)) for row in per[p])
        trace = chrome_trace(schedule, timeline=Timeline(schedule, rows))
        other = trace.get("otherData", {})
        for e in trace["traceEvents"]:
            e = dict(e)
            rank = e["pid"]
            e["pid"] = p * ranks + rank
            if e.get("name") == "process_name":
                e["args"] = {"name": f"replica {p} rank {rank}"}
            elif e.get("name") == "process_sort_index":
                e["args"] = {"sort_index": p * ranks + rank}
            events.append(e)
    other = dict(other, simulated=True, iteration_s=iteration.iteration_s, replicas_shown=shown, replicas=replicas)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}
