"""Simulated vs measured iteration time: does the simulator predict the real runtime?

1. **Profile.** Short `spotpipe train` runs of the benchmark model with no link delay (two runs
   that differ in microbatches; one in --quick) give measured step times; the simulator's cost
   model is fitted to them (`sim.profile`: one compute-scale factor on top of the FLOP-based
   per-chunk costs, plus a fixed per-step overhead; :func:`spotpipe.cost.fit_scale_and_overhead`).
2. **Measure.** Each benchmark config (schedules, stage counts, microbatches and link delays of
   tens to hundreds of ms, one from the shipped 12-location matrix) runs for real with the
   runtime's link-delay emulation (`runtime/linkdelay.py`, the same link model and numbers as the
   simulator). Measured iteration time = mean ``step_time`` after warm-up steps.
3. **Simulate.** The same config is simulated with the profiled cost model. Settings that
   describe this machine, not the cluster: ``sim.host_cores`` = this machine's cores (all
   workers share them: processor sharing), ``sim.delay_collectives = false`` (emulation delays
   only point-to-point messages).

Runs alternate between configs (full mode measures every config twice, in forward then reverse
order, and averages) so slow drift of the machine's load spreads over all of them.

    python bench/sim_vs_runtime.py --quick    # 1 profile run + 2 configs, under a minute
    python bench/sim_vs_runtime.py            # 2 profile runs + 5 configs x 2 passes

Writes bench/results/sim_vs_runtime.json (each config's simulated and measured time, relative
error, and max_rel_error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
from spotpipe.config import JobConfig, apply_overrides  # noqa: E402
from spotpipe.cost import read_profile  # noqa: E402
from spotpipe.sim.job import prepare, simulate_job  # noqa: E402

MATRIX = ROOT / "configs" / "networks" / "gcp-12-locations.csv"
SPOTPIPE = [sys.executable, "-m", "spotpipe.cli"]

# The model every run trains (small, so that a step is tens to hundreds of ms on CPU).
MODEL = ["model.layers=8", "model.d_model=128", "model.heads=4", "model.context=64"]
COMMON = ["run.plot=false", "run.progress=false", "train.eval_every=0", "train.eval_batches=1",
          "train.checkpoint_every=0", "run.timeout_s=120"]
SEQS_PER_MICROBATCH = 2


def pipeline(schedule: str, stages: int, micro: int, virtual: int = 1) -> list[str]:
    return [f"pipeline.schedule={schedule}", f"pipeline.stages={stages}", f"pipeline.microbatches={micro}",
            f"pipeline.virtual_stages={virtual}", f"train.batch_size={SEQS_PER_MICROBATCH * micro}"]


PROFILES = {
    "profile-1f1b-4x8": pipeline("1f1b", 4, 8),
    "profile-1f1b-4x2": pipeline("1f1b", 4, 2),
}

CONFIGS: dict[str, list[str]] = {
    "1f1b-4x4-lat50ms": pipeline("1f1b", 4, 4) + ["network.latency_ms=50"],
    "gpipe-2x8-lat200ms": pipeline("gpipe", 2, 8) + ["network.latency_ms=200"],
    "interleaved-2x2v-4-lat100ms-50Mbps": pipeline("interleaved", 2, 4, 2) + ["network.latency_ms=100", "network.bandwidth_gbps=0.05"],
    "1f1b-3x6-geo-Belgium-Iowa-Japan": pipeline("1f1b", 3, 6) + [
        f"network.matrix={str(MATRIX)!r}", "network.locations=['Belgium','Iowa','Japan']",
        "network.latency_ms=1", "network.bandwidth_gbps=17.18"],
    "gpipe-4x4-lat20ms": pipeline("gpipe", 4, 4) + ["network.latency_ms=20"],
}
QUICK_CONFIGS = ("1f1b-4x4-lat50ms", "gpipe-2x8-lat200ms")


def job_config(overrides: list[str]) -> JobConfig:
    return apply_overrides(JobConfig(), MODEL + COMMON + overrides).validate()


def train(name: str, overrides: list[str], steps: int, workdir: Path) -> Path:
    """Run `spotpipe train` for real; return its events file."""
    run_dir = workdir / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = SPOTPIPE + ["train"]
    for o in MODEL + COMMON + overrides + [f"train.steps={steps}", f"run.dir={run_dir}", f"run.name={name}"]:
        args += ["--set", o]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise SystemExit(f"spotpipe train failed for {name} (exit {proc.returncode}):\n{tail}")
    print(f"  ran {name}: {steps} steps in {time.perf_counter() - start:.1f} s", flush=True)
    return run_dir / "events.jsonl"


def measured_step(events: Path, warmup: int) -> tuple[float, int]:
    """Mean step time after ``warmup`` steps (the controller sees commits at 50 ms polls, so a
    mean over several steps is exact to 50 ms / steps, a median is not)."""
    prof = read_profile(events, skip=warmup)
    times = prof.step_times[warmup:]
    return sum(times) / len(times), len(times)


def simulate(overrides: list[str], profiles: list[Path]) -> tuple[float, Any]:
    cfg = job_config(overrides)
    sim = replace(cfg.sim, profile=tuple(str(p) for p in profiles), host_cores=os.cpu_count() or 1, delay_collectives=False)
    setup = prepare(replace(cfg, sim=sim, train=replace(cfg.train, steps=1)))
    result = simulate_job(setup)
    return result.step_time_s, setup.cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 profile run and 2 configs (under a minute)")
    parser.add_argument("--steps", type=int, default=0, help="steps per measured run (default 12, quick 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sim_vs_runtime.json")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 12)
    warmup = 2
    names = list(QUICK_CONFIGS) if args.quick else list(CONFIGS)
    profile_names = ["profile-1f1b-4x8"] if args.quick else list(PROFILES)
    passes = 1 if args.quick else 2
    workdir = Path(tempfile.mkdtemp(prefix="spotpipe-sim-vs-runtime-"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    print(f"profiling ({len(profile_names)} run(s), no link delay) ...", flush=True)
    profiles = [train(n, PROFILES[n], steps, workdir) for n in profile_names]
    profile_times = {n: measured_step(p, warmup)[0] for n, p in zip(profile_names, profiles)}

    measured: dict[str, list[float]] = {n: [] for n in names}
    print(f"measuring {len(names)} configs x {passes} pass(es) with link-delay emulation ...", flush=True)
    for p in range(passes):
        order = names if p % 2 == 0 else list(reversed(names))
        for n in order:
            events = train(f"{n}-pass{p}", CONFIGS[n], steps, workdir)
            measured[n].append(measured_step(events, warmup)[0])

    rows = []
    cost = None
    for n in names:
        sim_s, cost = simulate(CONFIGS[n], profiles)
        meas = sum(measured[n]) / len(measured[n])
        rows.append({
            "config": n,
            "overrides": CONFIGS[n],
            "measured_s": meas,
            "measured_passes": measured[n],
            "simulated_s": sim_s,
            "rel_error": abs(sim_s - meas) / meas,
        })
    assert cost is not None
    max_err = max(r["rel_error"] for r in rows)

    print(f"\n{'config':<40} {'measured_ms':>12} {'simulated_ms':>13} {'rel_error':>10}")
    for r in rows:
        print(f"{r['config']:<40} {r['measured_s'] * 1e3:>12.1f} {r['simulated_s'] * 1e3:>13.1f} {r['rel_error']:>10.3f}")
    print(f"max_rel_error {max_err:.3f} (target < 0.10); profiled compute scale {cost.forward_s[0]:.4g} s "
          f"per first-stage forward, overhead {cost.overhead_s * 1e3:.1f} ms per step")

    out = {
        "benchmark": "sim_vs_runtime",
        "quick": args.quick,
        "steps_per_run": steps,
        "warmup_steps": warmup,
        "passes": passes,
        "configs": rows,
        "max_rel_error": max_err,
        "within_10pct": max_err < 0.10,
        "profile": {
            "runs": {n: PROFILES[n] for n in profile_names},
            "measured_step_s": profile_times,
            "overhead_s": cost.overhead_s,
            "source": "fit of compute scale (+ overhead with 2 runs) to the profile runs",
        },
        "model": MODEL,
        "sim_settings": {"host_cores": os.cpu_count(), "delay_collectives": False},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "spotpipe": __version__,
        "wall_s": time.perf_counter() - t0,
    }
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['wall_s']:.0f} s")
    if args.keep:
        print(f"runs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
