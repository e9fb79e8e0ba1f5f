"""What a mirror costs as the model grows, and what the controller's store carries per step.

For three model sizes (about 0.5 M, 6 M and 25 M parameters; 8 blocks, 4 stages, one worker
process per stage on this machine, gloo on CPU), failure-free runs of ``ft.strategy = mirror``
(``mirror_every = 1``: each step the owner sends its gradient to the holder, which replays the
update) and ``ft.strategy = none`` are alternated, ``--rounds`` times each. Per run, from its own
``events.jsonl``:

- the steady-state step time: the wall time from the commit of step 2 to the last commit, divided
  by the steps in between (``step_s``; the median of the per-step times is kept beside it);
- the bytes the workers wrote to the controller's store per step (``store_bytes``, cumulative
  in each step event; the slope over the steady steps) and the bytes sent peer to peer to the
  mirror holders per step (``mirror_bytes``).

The ratio mirror / none is taken within each round and the median over rounds is reported.

Then, per size, one run of ``mirror`` with stage 2 killed (SIGKILL) at a fixed step: recovery
time (the ``fault_injected`` event to the next committed step) against the state bytes moved
(``recovery_finished``), with the achieved rate of the state transfer itself (bytes over its
``transfer_s``, the target's wait on the peer-to-peer receive) next to the loopback gloo
bandwidth of this machine, measured here by two processes sending 64 MiB to each other.

``--src DIR`` runs another checkout's ``src`` (for a before/after comparison of a change).
Writes ``bench/results/mirror_scaling.json`` (``ratio_by_params``, ``store_bytes_per_step_by_params``,
keyed by parameter count); ``--quick`` (fewer steps, one round) stays under 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"0.5M": ["model.d_model=64", "model.heads=4"],
         "6M": ["model.d_model=256", "model.heads=4"],
         "25M": ["model.d_model=512", "model.heads=8"]}
COMMON = ["model.layers=8", "model.context=64", "pipeline.stages=4", "pipeline.microbatches=4", "train.batch_size=8",
          "train.warmup_steps=2", "train.eval_every=0", "run.plot=false", "run.progress=false", "run.timeout_s=120"]
SIDES = {"mirror": ["ft.strategy=mirror", "ft.mirror_every=1"], "none": ["ft.strategy=none"]}


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(src: Path, run_dir: Path, sets: list[str], extra: tuple[str, ...] = ()) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "spotpipe.cli", "train", "--set", f"run.dir={run_dir}"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=1800, env=env)
    return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


def param_count(sets: list[str]) -> int:
    """Parameters of the model, from its shapes (nothing is built; older checkouts have this too)."""
    from spotpipe.config import load_config
    from spotpipe.model.partition import model_shapes

    cfg = load_config(None, sets)
    return sum(s.params for s in model_shapes(cfg.model, cfg.pipeline.stages))


def steady(evs: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [e for e in evs if e["event"] == "step" and e["step"] >= 2]
    if len(steps) < 2:
        return {"step_s": None}
    span = steps[-1]["step"] - steps[0]["step"]
    return {
        # Wall time over the steady steps, from the controller's commit times: exact over the span
        # whatever the controller's polling period (older versions timed each step by it).
        "step_s": (steps[-1]["t"] - steps[0]["t"]) / span,
        "median_of_step_times_s": statistics.median(e["step_time"] for e in steps),
        "store_bytes_per_step": (steps[-1].get("store_bytes", 0) - steps[0].get("store_bytes", 0)) / span,
        "mirror_bytes_per_step": (steps[-1].get("mirror_bytes", 0) - steps[0].get("mirror_bytes", 0)) / span,
    }


def recovery(evs: list[dict[str, Any]]) -> dict[str, Any]:
    fault = next((e for e in evs if e["event"] == "fault_injected"), None)
    fin = next((e for e in evs if e["event"] == "recovery_finished"), None)
    if fault is None or fin is None:
        return {"recovered": False}
    nxt = next((e for e in evs if e["event"] == "step" and e["t"] >= fin["t"]), None)
    transfer_s = float(fin.get("transfer_s", 0.0))
    return {"recovered": True, "strategy": fin["strategy"], "bytes": fin["bytes"], "recovery_s": fin["seconds"],
            "transfer_s": transfer_s, "to_next_commit_s": None if nxt is None else nxt["t"] - fault["t"],
            "transfer_rate_MBps": fin["bytes"] / transfer_s / 1e6 if transfer_s > 0 else None}


_BANDWIDTH = r"""
import datetime, sys, time, torch
from torch.distributed import TCPStore, ProcessGroupGloo
rank, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = TCPStore("127.0.0.1", port, 2, rank == 0, datetime.timedelta(seconds=60))
opts = ProcessGroupGloo._Options(); opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
opts._timeout = datetime.timedelta(seconds=60)
pg = ProcessGroupGloo(store, rank, 2, opts)
buf = torch.ones(n // 4)
best = 0.0
for k in range(4):
    t0 = time.perf_counter()
    (pg.send([buf], 1, k) if rank == 0 else pg.recv([buf], 0, k)).wait()
    best = max(best, n / (time.perf_counter() - t0))
if rank == 1:
    print(best)
"""


def loopback_bandwidth(nbytes: int = 64 * 2**20) -> float:
    """Bytes per second of one gloo send of ``nbytes`` between two processes on 127.0.0.1 (best of 4)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _BANDWIDTH, str(r), str(port), str(nbytes)], stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    out = [p.communicate(timeout=120)[0] for p in procs]
    return float(out[1].strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round (under 4 minutes)")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of mirror / none per size (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="steps per run (default 10)")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {', '.join(SIZES)}")
    parser.add_argument("--no-recovery", action="store_true", help="skip the kill-and-recover runs")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override for every run (e.g. run.device=cuda)")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the spotpipe sources to run (default: this checkout)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mirror_scaling.json")
    args = parser.parse_args()
    rounds, steps = (1, 6) if args.quick else (args.rounds, args.steps)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown size {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    sys.path.insert(0, str(args.src))
    load_before = os.getloadavg()
    results: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="spotpipe-mirror-scaling-") as tmp:
        for size in sizes:
            sets = [*COMMON, *SIZES[size], f"train.steps={steps}", *args.extra]
            params = param_count(sets)
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
            for k in range(rounds):
                for side in (SIDES if k % 2 == 0 else reversed(list(SIDES))):
                    run_dir = Path(tmp) / f"{size}-{side}-{k}"
                    t0 = time.perf_counter()
                    rc, err = train(args.src, run_dir, [*sets, *SIDES[side]])
                    row = {"rc": rc, "error": err if rc else "", "wall_s": time.perf_counter() - t0, **steady(events(run_dir))}
                    runs[side].append(row)
                    print(f"{size:>5} {side:>6} round {k}: rc {rc}, step {row.get('step_s')}", flush=True)
            ratios = [m["step_s"] / n["step_s"] for m, n in zip(runs["mirror"], runs["none"])
                      if m.get("step_s") and n.get("step_s")]
            entry: dict[str, Any] = {"params": params, "runs": runs,
                                     "ratio": statistics.median(ratios) if ratios else None,
                                     "store_bytes_per_step": {side: statistics.median(r["store_bytes_per_step"] for r in rows if r.get("step_s"))
                                                              for side, rows in runs.items() if any(r.get("step_s") for r in rows)},
                                     "mirror_bytes_per_step": statistics.median(r["mirror_bytes_per_step"] for r in runs["mirror"] if r.get("step_s"))
                                     if any(r.get("step_s") for r in runs["mirror"]) else None}
            if not args.no_recovery:
                run_dir = Path(tmp) / f"{size}-kill"
                rc, err = train(args.src, run_dir, [*sets, *SIDES["mirror"], f"train.steps={max(steps, 6)}"], ("--fail", "stage=2@step=3"))
                entry["recovery"] = {"rc": rc, "error": err if rc else "", **recovery(events(run_dir))}
            results["sizes"][size] = entry
    bandwidth = loopback_bandwidth()
    results["loopback_gloo_MBps"] = bandwidth / 1e6
    results["ratio_by_params"] = {str(e["params"]): e["ratio"] for e in results["sizes"].values()}
    results["store_bytes_per_step_by_params"] = {str(e["params"]): e["store_bytes_per_step"].get("mirror")
                                                 for e in results["sizes"].values()}
    results["meta"] = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "src": str(args.src), "quick": args.quick, "extra": args.extra, "rounds": rounds, "steps": steps, "common": COMMON,
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{'size':>5} {'params':>10} {'mirror/none':>12} {'store B/step':>13} {'mirror B/step':>14} "
          f"{'recovery s':>11} {'moved MB':>9} {'MB/s':>8}")
    for size, e in results["sizes"].items():
        rec = e.get("recovery", {})
        moved = rec.get("bytes")
        print(f"{size:>5} {e['params']:>10} {_fmt(e['ratio'], '.3f'):>12} {_fmt(e['store_bytes_per_step'].get('mirror'), '.0f'):>13} "
              f"{_fmt(e['mirror_bytes_per_step'], '.0f'):>14} {_fmt(rec.get('to_next_commit_s'), '.2f'):>11} "
              f"{_fmt(None if moved is None else moved / 1e6, '.1f'):>9} {_fmt(rec.get('transfer_rate_MBps'), '.0f'):>8}")
    print(f"loopback gloo bandwidth: {bandwidth / 1e6:.0f} MB/s; load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"wrote {args.out}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
