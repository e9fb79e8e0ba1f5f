"""Simulated vs measured iteration time: does the simulator predict the real runtime?

For every config (different schedules, stage counts, microbatches, and link delays of tens to
hundreds of ms, one of them from the shipped 12-location matrix):

1. **Profile**: a short `spotpipe train` run of the same job with NO link delay. The simulator's
   cost model is fitted to its measured step time (`sim.profile`: one compute-scale factor on top
   of the FLOP-based per-chunk costs; :func:`spotpipe.cost.fit_scale_and_overhead`).
2. **Measure**: the job runs for real with the runtime's link-delay emulation
   (`runtime/linkdelay.py`, the same link model and numbers as the simulator). Measured
   iteration time = mean ``step_time`` after warm-up steps.
3. **Simulate** the delayed job with the profiled cost, each worker modelled as its own device
   (``sim.host_cores = 0``: the profile's compute times already include whatever sharing this
   machine's cores imposed) and ``sim.delay_collectives = false`` (emulation delays only
   point-to-point messages). The same is also reported with processor sharing of this
   machine's cores (``sim.host_cores = cpu_count``, ``simulated_shared_cores_s``), for comparison.

Profile and measured run of a config run back to back, so they see the same machine load; the
question answered is the simulator's: given the compute, what do the links do to the step. As a
cross-check, every config is also simulated with ONE shared profile (the first config's), which
also tests the FLOP-based scaling across schedules, stage counts and microbatch counts
(``simulated_shared_profile_s``; not part of ``max_rel_error``).

    python bench/sim_vs_runtime.py --quick    # 1 config (profile + delayed run), under a minute
    python bench/sim_vs_runtime.py            # 5 configs

Writes bench/results/sim_vs_runtime.json (each config's simulated and measured time, relative
error, and max_rel_error) with the machine's load average before and after: the runs are CPU
bound, so other work on the machine adds noise.
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

# The model every run trains: small, so that its compute (tens of ms per step on CPU) is a
# minor part of a step with link delays of tens to hundreds of ms, and the noise of a CPU that
# other jobs share moves the result little.
MODEL = ["model.layers=4", "model.d_model=64", "model.heads=4", "model.context=32"]
COMMON = ["run.plot=false", "run.progress=false", "train.eval_every=0", "train.eval_batches=1",
          "train.checkpoint_every=0", "run.timeout_s=120"]
SEQS_PER_MICROBATCH = 2


def pipeline(schedule: str, stages: int, micro: int, virtual: int = 1) -> list[str]:
    return [f"pipeline.schedule={schedule}", f"pipeline.stages={stages}", f"pipeline.microbatches={micro}",
            f"pipeline.virtual_stages={virtual}", f"train.batch_size={SEQS_PER_MICROBATCH * micro}"]


CONFIGS: dict[str, list[str]] = {
    "1f1b-4x4-lat50ms": pipeline("1f1b", 4, 4) + ["network.latency_ms=50"],
    "gpipe-2x8-lat200ms": pipeline("gpipe", 2, 8) + ["network.latency_ms=200"],
    "interleaved-2x2v-4-lat100ms-50Mbps": pipeline("interleaved", 2, 4, 2) + ["network.latency_ms=100", "network.bandwidth_gbps=0.05"],
    "1f1b-3x6-geo-Belgium-Iowa-Japan": pipeline("1f1b", 3, 6) + [
        f"network.matrix={str(MATRIX)!r}", "network.locations=['Belgium','Iowa','Japan']",
        "network.latency_ms=1", "network.bandwidth_gbps=17.18"],
    "gpipe-4x4-lat20ms": pipeline("gpipe", 4, 4) + ["network.latency_ms=20"],
}
QUICK_CONFIGS = ("1f1b-4x4-lat50ms",)


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
    events = run_dir / "events.jsonl"
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-6:])
        done = sum(1 for line in events.open() if '"event":"step"' in line) if events.is_file() else 0
        if done < steps:  # a crash after the last step (at shutdown) does not spoil the timings
            raise SystemExit(f"spotpipe train failed for {name} (exit {proc.returncode}) after {done} steps:\n{tail}")
        print(f"  note: {name} exited {proc.returncode} after all {steps} steps: {tail.splitlines()[-1]}", flush=True)
    print(f"  ran {name}: {steps} steps in {time.perf_counter() - start:.1f} s", flush=True)
    return events


def measured_step(events: Path, warmup: int) -> float:
    """Iteration time of a run: trimmed mean of ``step_time`` after ``warmup`` steps (the same
    estimator the profiled cost model uses, :attr:`spotpipe.cost.RunProfile.step_time`)."""
    return read_profile(events, skip=warmup).step_time


def simulate(overrides: list[str], profiles: list[Path], host_cores: int = 0) -> tuple[float, Any]:
    """Simulated iteration time of the delayed job with a cost profiled from ``profiles`` (their
    warm-up steps are skipped by :func:`spotpipe.cost.read_profile`'s default, as ``main`` does)."""
    cfg = job_config(overrides)
    sim = replace(cfg.sim, profile=tuple(str(p) for p in profiles), host_cores=host_cores, delay_collectives=False)
    setup = prepare(replace(cfg, sim=sim, train=replace(cfg.train, steps=1)))
    result = simulate_job(setup)
    return result.step_time_s, setup.cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 config, fewer steps (under a minute)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default 10, quick 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sim_vs_runtime.json")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 10)
    warmup = 1 if args.quick else 2
    names = list(QUICK_CONFIGS) if args.quick else list(CONFIGS)
    workdir = Path(tempfile.mkdtemp(prefix="spotpipe-sim-vs-runtime-"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    # Per config: profile and delayed runs back to back; full mode in ABBA order (P D D P) so a
    # linear drift of the machine's load affects both sides equally.
    profiles: dict[str, list[Path]] = {}
    measured: dict[str, list[float]] = {}
    profile_step: dict[str, list[float]] = {}
    for n in names:
        local = [o for o in CONFIGS[n] if not o.startswith("network.")]
        print(f"{n}:", flush=True)
        order = ["profile", "delayed"] if args.quick else ["profile", "delayed", "delayed", "profile"]
        profiles[n], measured[n], profile_step[n] = [], [], []
        for i, kind in enumerate(order):
            events = train(f"{n}-{kind}{i}", local if kind == "profile" else CONFIGS[n], steps, workdir)
            if kind == "profile":
                profiles[n].append(events)
                profile_step[n].append(measured_step(events, warmup))
            else:
                measured[n].append(measured_step(events, warmup))

    rows = []
    shared = profiles[names[0]]
    for n in names:
        sim_s, cost = simulate(CONFIGS[n], profiles[n])
        shared_s, _ = simulate(CONFIGS[n], shared)
        cores_s, _ = simulate(CONFIGS[n], profiles[n], host_cores=os.cpu_count() or 1)
        meas = sum(measured[n]) / len(measured[n])
        rows.append({
            "config": n,
            "overrides": CONFIGS[n],
            "profile_step_s": sum(profile_step[n]) / len(profile_step[n]),
            "profile_runs_s": profile_step[n],
            "measured_s": meas,
            "measured_runs_s": measured[n],
            "simulated_s": sim_s,
            "rel_error": abs(sim_s - meas) / meas,
            "simulated_shared_profile_s": shared_s,
            "rel_error_shared_profile": abs(shared_s - meas) / meas,
            "simulated_shared_cores_s": cores_s,
            "rel_error_shared_cores": abs(cores_s - meas) / meas,
            "first_stage_forward_s": cost.forward_s[0],
            "overhead_s": cost.overhead_s,
        })
    max_err = max(r["rel_error"] for r in rows)

    print(f"\n{'config':<36} {'profile_ms':>10} {'measured_ms':>11} {'simulated_ms':>12} {'rel_err':>8} {'shared_prof':>11} {'rel_err':>8}")
    for r in rows:
        print(f"{r['config']:<36} {r['profile_step_s'] * 1e3:>10.1f} {r['measured_s'] * 1e3:>11.1f} "
              f"{r['simulated_s'] * 1e3:>12.1f} {r['rel_error']:>8.3f} {r['simulated_shared_profile_s'] * 1e3:>11.1f} "
              f"{r['rel_error_shared_profile']:>8.3f}")
    print(f"max_rel_error {max_err:.3f} (target < 0.10); max with one shared profile "
          f"{max(r['rel_error_shared_profile'] for r in rows):.3f}; max with processor sharing of "
          f"{os.cpu_count()} cores {max(r['rel_error_shared_cores'] for r in rows):.3f}; "
          f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")

    out = {
        "benchmark": "sim_vs_runtime",
        "quick": args.quick,
        "steps_per_run": steps,
        "warmup_steps": warmup,
        "configs": rows,
        "max_rel_error": max_err,
        "within_10pct": max_err < 0.10,
        "max_rel_error_shared_profile": max(r["rel_error_shared_profile"] for r in rows),
        "max_rel_error_shared_cores": max(r["rel_error_shared_cores"] for r in rows),
        "model": MODEL,
        "seqs_per_microbatch": SEQS_PER_MICROBATCH,
        "sim_settings": {"host_cores": 0, "delay_collectives": False,
                         "cost": "profiled from the same job without link delay (sim.profile)"},
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
