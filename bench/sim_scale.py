"""How long the simulator takes for one iteration, as workers and microbatches grow.

Headline: one iteration of ``configs/sim-4096.toml`` (64 stages x 64 replicas = 4,096 workers,
64 microbatches, 1F1B), played action by action: every action of every worker is an engine event
or a step of its worker's walk; no replica is assumed equal to another (no symmetry exploited).
The time covers everything `spotpipe simulate` does for it: schedule generation and lowering,
cost model, cluster, and the job of one step.

Sweeps: workers (replicas 1, 4, 16, 64 of 64 stages) at fixed microbatches, and microbatches
(8 .. 128) at fixed workers; each point is the median of ``--repeats`` runs and reports the
played actions and the cost per action.

    python bench/sim_scale.py           # full (a few minutes on 2 cores)
    python bench/sim_scale.py --quick   # under a minute

Writes bench/results/sim_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spotpipe import __version__  # noqa: E402
from spotpipe.config import JobConfig, load_config  # noqa: E402
from spotpipe.sim.job import prepare, simulate_job  # noqa: E402

CONFIG = ROOT / "configs" / "sim-4096.toml"


def with_sizes(cfg: JobConfig, replicas: int, microbatches: int) -> JobConfig:
    p = replace(cfg.pipeline, replicas=replicas, microbatches=microbatches)
    t = replace(cfg.train, batch_size=replicas * microbatches, steps=1)
    return replace(cfg, pipeline=p, train=t).validate()


def measure(cfg: JobConfig, repeats: int) -> dict[str, Any]:
    times, result, setup = [], None, None
    for _ in range(repeats):
        start = time.perf_counter()
        setup = prepare(cfg, CONFIG.parent)
        result = simulate_job(setup)
        times.append(time.perf_counter() - start)
    assert result is not None and setup is not None
    actions = sum(1 for acts in setup.schedule.ranks for a in acts if not a.op.is_recv) * cfg.pipeline.replicas
    seconds = statistics.median(times)
    return {
        "stages": cfg.pipeline.stages,
        "replicas": cfg.pipeline.replicas,
        "workers": cfg.pipeline.stages * cfg.pipeline.replicas,
        "microbatches": cfg.pipeline.microbatches,
        "played_actions": actions,
        "engine_events": result.iteration.events,
        "sim_seconds": seconds,
        "sim_seconds_all": times,
        "us_per_action": seconds / actions * 1e6,
        "iteration_s": result.iteration.iteration_s,
    }


def row(d: dict[str, Any]) -> str:
    return (f"{d['workers']:>8} {d['microbatches']:>6} {d['played_actions']:>10} {d['engine_events']:>9} "
            f"{d['sim_seconds']:>9.3f} {d['us_per_action']:>8.2f} {d['iteration_s']:>12.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (under a minute)")
    parser.add_argument("--repeats", type=int, default=0, help="runs per point (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sim_scale.json")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    base = load_config(CONFIG)
    header = f"{'workers':>8} {'micro':>6} {'actions':>10} {'events':>9} {'sim_s':>9} {'us/act':>8} {'iteration_s':>12}"

    print(f"headline: {CONFIG.name} (64 stages x 64 replicas, 64 microbatches), every action of every worker played")
    print(header)
    headline = measure(base, repeats)
    print(row(headline))

    sweep_m = 16 if args.quick else 64
    print(f"\nworkers sweep (64 stages, {sweep_m} microbatches)")
    print(header)
    workers = []
    for r in (1, 4, 16, 64):
        d = measure(with_sizes(base, r, sweep_m), repeats)
        workers.append(d)
        print(row(d))

    sweep_r = 16 if args.quick else 64
    print(f"\nmicrobatches sweep (64 stages x {sweep_r} replicas = {64 * sweep_r} workers)")
    print(header)
    micro = []
    for m in ((8, 16, 32, 64) if args.quick else (8, 16, 32, 64, 128)):
        d = measure(with_sizes(base, sweep_r, m), repeats)
        micro.append(d)
        print(row(d))

    out = {
        "benchmark": "sim_scale",
        "quick": args.quick,
        "repeats": repeats,
        "symmetry_exploited": False,
        "note": "every action of every worker is played; replicas are not deduplicated",
        "headline": headline,
        "headline_under_30s": headline["sim_seconds"] < 30.0,
        "workers_sweep": workers,
        "microbatches_sweep": micro,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "processor": platform.processor()},
        "spotpipe": __version__,
        "config": str(CONFIG.relative_to(ROOT)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nheadline {headline['sim_seconds']:.2f} s (< 30 s: {out['headline_under_30s']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
