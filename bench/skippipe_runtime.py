"""SkipPipe on real worker processes: full vs random vs SkipPipe paths over an emulated WAN.

The job is ``configs/skippipe-geo.toml``: 8 worker processes (one per node) over 8 Google Cloud
locations of the GCP-12 matrix (measured latency and bandwidth, emulated on every activation and
gradient message and on every stage all-reduce), 4 stages of 2 nodes, the default small model,
12 microbatches per iteration, SkipPipe paths visiting 3 of the 4 stages (25% skipped) with at
most one swap. On 2 CPU cores its compute is tens of ms per stage and microbatch, its messages
cross links of 4-100 ms latency and 10-250 MiB/s: communication weighs as it does on a WAN.

1. **Calibrate**: one run on full paths with NO link delay; ``sim.layer_forward_s`` (the
   planner's and the simulator's compute cost) is set so that the simulated iteration without
   links equals the measured one. The paths are planned with that cost, as a user would after a
   profiling run.
2. **Measure**: ``spotpipe train`` with ``pipeline.paths`` = ``full``, ``random`` and
   ``skippipe``, alternated in rounds (full, random, skippipe, then the next round), each run
   timed by the median ``step_time`` of its steps after the warm-up.
3. **Predict**: the simulator's iteration time of the same plan (the controller's
   :func:`spotpipe.runtime.control.nodeplan.plan_nodes`, deterministic for a seed).
4. **Faults** (not with ``--quick``): a SIGKILL of a stage-2 node and of a stage-0 node (each
   stage keeps another node), no spare: seconds from the kill to the next committed step.

Two skip ratios are measured against the same full-path runs: 25% (k = 3 of 4 stages, the
config's) and 50% (k = 2). Writes bench/results/skippipe_runtime.json: ``runtime.ratio_vs_full``
(skippipe / full median step time at 50% skipped; target <= 0.60), ``runtime.ratio_vs_random``,
both per skip ratio under ``runtime.by_skip_percent``, ``sim_vs_runtime_error`` (relative error
of the simulator's skippipe iteration at 50% against the measured one; target <= 0.15), the
errors of every run kind, and the load average before and after.

    python bench/skippipe_runtime.py --quick   # 1 round, 8 steps per run: under 3 minutes
    python bench/skippipe_runtime.py           # 3 rounds, 14 steps per run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spotpipe import __version__  # noqa: E402
from spotpipe.config import JobConfig, load_config  # noqa: E402
from spotpipe.runtime.control.nodeplan import plan_nodes  # noqa: E402

CONFIG = ROOT / "configs" / "skippipe-geo.toml"
SPOTPIPE = [sys.executable, "-m", "spotpipe.cli"]
RUNS = {  # name -> overrides; the skip ratio does not change full paths
    "full": ["pipeline.paths=full"],
    "random-25": ["pipeline.paths=random", "pipeline.skip_ratio=0.25"],
    "skippipe-25": ["pipeline.paths=skippipe", "pipeline.skip_ratio=0.25"],
    "random-50": ["pipeline.paths=random", "pipeline.skip_ratio=0.5"],
    "skippipe-50": ["pipeline.paths=skippipe", "pipeline.skip_ratio=0.5"],
}
COMMON = ["run.plot=false", "run.progress=false", "train.eval_every=0", "train.eval_batches=1",
          "train.checkpoint_every=0", "run.timeout_s=120", "ft.strategy=none"]
NO_LINKS = ["network.matrix=''", "network.locations=[]", "network.latency_ms=0", "network.bandwidth_gbps=0"]


def train(name: str, overrides: list[str], steps: int, workdir: Path) -> Path:
    """Run ``spotpipe train --config configs/skippipe-geo.toml`` for real; return its events file."""
    run_dir = workdir / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = SPOTPIPE + ["train", "--config", str(CONFIG)]
    for o in COMMON + overrides + [f"train.steps={steps}", f"run.dir={run_dir}"]:
        args += ["--set", o]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-8:])
        raise SystemExit(f"spotpipe train failed for {name} (exit {proc.returncode}):\n{tail}")
    print(f"  ran {name}: {steps} steps in {time.perf_counter() - start:.1f} s", flush=True)
    return run_dir / "events.jsonl"


def kill_to_commit(events: Path) -> list[dict[str, Any]]:
    """Per injected kill: seconds from the kill to the next committed step, and how it was recovered."""
    records = [json.loads(line) for line in events.open()]
    out = []
    for i, r in enumerate(records):
        if r.get("event") != "fault_injected":
            continue
        nxt = next((q for q in records[i:] if q.get("event") == "step"), None)
        how = next((q for q in records[i:] if q.get("event") == "recovery_started"), {})
        if nxt is not None:
            out.append({"node": r["stage"], "step": r["step"], "seconds": nxt["t"] - r["t"],
                        "strategy": how.get("strategy"), "why": how.get("why")})
    return out


def median_step(events: Path, warmup: int) -> float:
    """Median ``step_time`` of the committed steps after ``warmup`` (the first steps include start-up)."""
    times = [r["step_time"] for r in map(json.loads, events.open()) if r.get("event") == "step"][warmup:]
    if not times:
        raise SystemExit(f"{events}: no steps after the {warmup} warm-up steps")
    return statistics.median(times)


def config(overrides: list[str]) -> JobConfig:
    return load_config(CONFIG, COMMON + overrides)


def predicted(cfg: JobConfig) -> float:
    """The simulator's iteration time of the plan the controller makes for ``cfg``."""
    return plan_nodes(cfg, CONFIG.parent).predicted_s["train"]


def calibrate(measured_s: float, base: list[str]) -> tuple[float, float]:
    """``sim.layer_forward_s`` that makes the simulated full-path iteration without links equal
    ``measured_s`` (the iteration is close to linear in it: three fixed-point steps); and its prediction."""
    cfg = config(base + NO_LINKS + ["pipeline.paths=full"])
    x = cfg.sim.layer_forward_s
    pred = predicted(cfg)
    for _ in range(3):
        x = x * measured_s / pred
        pred = predicted(replace(cfg, sim=replace(cfg.sim, layer_forward_s=x)))
    return x, pred


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 8-step runs (under 3 minutes)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of the three variants (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default 14, quick 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "skippipe_runtime.json")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (8 if args.quick else 14)
    warmup = 2
    workdir = Path(tempfile.mkdtemp(prefix="spotpipe-skippipe-runtime-"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    print("calibrating the compute cost (full paths, no link delay):", flush=True)
    local_s = median_step(train("calibrate", NO_LINKS + ["pipeline.paths=full"], steps, workdir), warmup)
    layer_s, local_pred = calibrate(local_s, [])
    cost = [f"sim.layer_forward_s={layer_s!r}"]
    print(f"  measured {local_s * 1e3:.0f} ms per step without links: sim.layer_forward_s = {layer_s * 1e3:.3f} ms "
          f"(simulated {local_pred * 1e3:.0f} ms)", flush=True)

    measured: dict[str, list[float]] = {v: [] for v in RUNS}
    for r in range(rounds):
        print(f"round {r + 1} of {rounds}:", flush=True)
        for v, sets in RUNS.items():
            events = train(f"{v}-{r}", cost + sets, steps, workdir)
            measured[v].append(median_step(events, warmup))
    rows: dict[str, dict[str, Any]] = {}
    for v, sets in RUNS.items():
        meas = statistics.median(measured[v])
        sim = predicted(config(cost + sets))
        rows[v] = {"overrides": sets, "measured_s": meas, "measured_runs_s": measured[v], "simulated_s": sim,
                   "rel_error": abs(sim - meas) / meas}
    full = rows["full"]["measured_s"]
    by_skip = {skip: {"ratio_vs_full": rows[f"skippipe-{skip}"]["measured_s"] / full,
                      "ratio_vs_random": rows[f"skippipe-{skip}"]["measured_s"] / rows[f"random-{skip}"]["measured_s"],
                      "ratio_vs_full_per_round": [s / f for s, f in zip(measured[f"skippipe-{skip}"], measured["full"])],
                      "simulated_ratio_vs_full": rows[f"skippipe-{skip}"]["simulated_s"] / rows["full"]["simulated_s"]}
               for skip in ("25", "50")}
    faults: list[dict[str, Any]] = []
    if not args.quick:  # SIGKILL a later-stage node and a stage-0 node (each in a stage with another node)
        groups = plan_nodes(config(cost), CONFIG.parent).groups
        print("faults (no spare: the paths are planned around each lost node):", flush=True)
        for r, node in enumerate((groups[2][0], groups[0][1])):
            events = train(f"fault-{r}", cost + ["ft.strategy=auto", "ft.spares=0", f"ft.faults=['stage={node}@step=6']"],
                           steps, workdir)
            faults += kill_to_commit(events)
    load_after = os.getloadavg()

    print(f"\n{'paths':<12} {'measured ms':>11} {'simulated ms':>12} {'rel err':>8}  runs (ms)")
    for v, row in rows.items():
        runs = " ".join(f"{x * 1e3:.0f}" for x in row["measured_runs_s"])
        print(f"{v:<12} {row['measured_s'] * 1e3:>11.0f} {row['simulated_s'] * 1e3:>12.0f} {row['rel_error']:>8.3f}  {runs}")
    for skip, r in by_skip.items():
        print(f"skip {skip}%: skippipe / full {r['ratio_vs_full']:.3f} (simulated {r['simulated_ratio_vs_full']:.3f}; per round "
              f"{' '.join(f'{x:.3f}' for x in r['ratio_vs_full_per_round'])}), skippipe / random {r['ratio_vs_random']:.3f}")
    for f in faults:
        print(f"kill node {f['node']} at step {f['step']}: next committed step {f['seconds']:.2f} s later ({f['strategy']})")
    print(f"targets: skippipe / full <= 0.60, simulator error <= 0.15 (skippipe-50: {rows['skippipe-50']['rel_error']:.3f}, "
          f"skippipe-25: {rows['skippipe-25']['rel_error']:.3f}); load average {load_before[0]:.1f} -> {load_after[0]:.1f}; "
          f"{time.perf_counter() - t0:.0f} s in all")

    import torch

    out = {
        "benchmark": "skippipe_runtime",
        "config": str(CONFIG.relative_to(ROOT)),
        "quick": args.quick,
        "rounds": rounds,
        "steps_per_run": steps,
        "warmup_steps": warmup,
        "calibration": {"no_links_measured_s": local_s, "layer_forward_s": layer_s, "no_links_simulated_s": local_pred},
        "variants": rows,
        "runtime": {"ratio_vs_full": by_skip["50"]["ratio_vs_full"], "ratio_vs_random": by_skip["50"]["ratio_vs_random"],
                    "by_skip_percent": by_skip},
        "sim_vs_runtime_error": rows["skippipe-50"]["rel_error"],
        "sim_vs_runtime_error_max": max(r["rel_error"] for r in rows.values()),
        "targets": {"ratio_vs_full": 0.60, "sim_vs_runtime_error": 0.15},
        "faults": faults,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "spotpipe": __version__,
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
