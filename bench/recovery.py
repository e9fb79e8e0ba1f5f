"""Recovery time per strategy and ETTR under repeated worker kills (issue 5), on real processes.

Two measurements, both from the runs' own ``events.jsonl``:

1. **Recovery time** per strategy: ``spotpipe train`` on the default small model (4 stages,
   d_model 128, 8 layers, context 128, tinyshakespeare) with one worker killed by SIGKILL at a
   fixed step (``--fail stage=2@step=N``; ``replica`` runs 2 replicas; ``checkfree+`` loses the
   edge stage 0, which it rebuilds from its swap partner). Recovery time = from the
   ``fault_injected`` event to the next committed ``step`` event (the failed step replayed),
   so it includes detection, the collect grace, the replacement, the state transfer and the
   replayed step. Strategies are run round-robin, ``--repeats`` times each.
2. **Steady-state cost** of each way of being ready (``--overhead``): runs of the same job
   without failures, alternated round-robin, compared by their median step time (commit to
   commit): ``ft.strategy = none`` against a mirror replayed every step (``mirror_every = 1``: the
   gradient published each step, the holder replays the update), a mirror refreshed every 5
   steps (full state), and the CheckFree+ swap schedule (tied-gradient exchange included).
3. **ETTR** (Kokolis et al., Meta 2025: productive time / wall time, computed by
   :func:`spotpipe.reliability.runs.read_runs` from the events) of a run where this script kills
   one worker (a random one, with a real SIGKILL to its pid) every ``--kill-every`` seconds.

Writes ``bench/results/recovery.json`` (machine, versions, config, every run). ``--quick`` keeps
it near a minute (one mirror run, a 20 s ETTR run with kills every 7 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
SMALL = ["pipeline.stages=4", "pipeline.microbatches=4", "run.plot=false", "run.progress=false", "train.eval_every=0"]
STRATEGIES = {
    "replica": ["ft.strategy=replica", "pipeline.replicas=2"],
    "mirror": ["ft.strategy=mirror", "ft.mirror_every=1"],
    "checkfree": ["ft.strategy=checkfree"],
    "checkpoint": ["ft.strategy=checkpoint", "train.checkpoint_every=10"],
    "checkfree+": ["ft.strategy=checkfree+"],
}
KILL_STAGE = {"checkfree+": 0}  # the edge stage CheckFree+ copies from its swap partner; others: stage 2
STEADY = {
    "none": ["ft.strategy=none"],
    "mirror every step": ["ft.strategy=mirror", "ft.mirror_every=1"],
    "mirror every 5": ["ft.strategy=mirror", "ft.mirror_every=5"],
    "checkfree+ swap": ["ft.strategy=checkfree+"],
}


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def train_cmd(run_dir: Path, sets: list[str], extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "spotpipe.cli", "train", "--set", f"data.path={DATA}", "--set", f"run.dir={run_dir}"]
    for s in [*SMALL, *sets]:
        cmd += ["--set", s]
    return cmd + list(extra)


def recovery_times(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per injected fault: seconds to the next committed step, and the recovery events."""
    out = []
    for i, e in enumerate(evs):
        if e["event"] not in ("fault_injected", "failure_confirmed") or (e["event"] == "failure_confirmed" and any(
                x["event"] == "fault_injected" and x["worker"] == e["worker"] for x in evs)):
            continue
        t0 = e["t"]
        after = evs[i + 1:]
        fin = next((x for x in after if x["event"] == "recovery_finished"), None)
        nxt = next((x for x in after if x["event"] == "step" and fin is not None and x["t"] >= fin["t"]), None)
        started = next((x for x in after if x["event"] == "recovery_started"), None)
        again = next((x for x in after if x["event"] == "step" and x["step"] == e.get("step")), None)
        out.append({
            "step": e.get("step"), "strategy": started["strategy"] if started else None,
            "to_next_commit_s": None if nxt is None else nxt["t"] - t0,
            "to_failed_step_commit_s": None if again is None else again["t"] - t0,
            "recovery_event_s": None if fin is None else fin["seconds"], "bytes": None if fin is None else fin["bytes"],
            "spare": any(x["event"] == "worker_start" and x.get("spare") for x in after[: after.index(fin)] if fin) if fin else None,
        })
    return out


def run_strategy(name: str, steps: int, kill_step: int, tmp: Path, k: int) -> dict[str, Any]:
    run_dir = tmp / f"{name}-{k}"
    sets = [*STRATEGIES[name], f"train.steps={steps}"]
    t0 = time.perf_counter()
    fail = f"stage={KILL_STAGE.get(name, 2)}@step={kill_step}"
    proc = subprocess.run(train_cmd(run_dir, sets, ["--fail", fail]), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    evs = events(run_dir)
    rec = recovery_times(evs)
    return {"strategy": name, "rc": proc.returncode, "wall_s": wall, "recoveries": rec,
            "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None}


def run_steady(name: str, steps: int, tmp: Path, k: int) -> dict[str, Any]:
    """A failure-free run; its median step time over the steps after the first three."""
    run_dir = tmp / f"steady-{name.replace(' ', '-')}-{k}"
    proc = subprocess.run(train_cmd(run_dir, [*STEADY[name], f"train.steps={steps}"]), capture_output=True, text=True, timeout=600)
    times = [e["step_time"] for e in events(run_dir) if e["event"] == "step" and e["step"] >= 3]
    return {"config": name, "rc": proc.returncode, "median_step_s": statistics.median(times) if times else None, "steps": len(times)}


def run_ettr(duration_s: float, kill_every_s: float, tmp: Path, seed: int) -> dict[str, Any]:
    """A long run; every ``kill_every_s`` SIGKILL a random current worker (by its pid)."""
    from spotpipe.reliability.runs import read_runs

    run_dir = tmp / "ettr"
    sets = ["ft.strategy=auto", "train.steps=1000000", f"train.max_minutes={duration_s / 60:.4f}"]
    proc = subprocess.Popen(train_cmd(run_dir, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(seed)
    kills: list[dict[str, Any]] = []
    started: float | None = None
    next_kill = None
    while proc.poll() is None:
        time.sleep(0.2)
        evs = events(run_dir)
        if started is None and any(e["event"] == "step" for e in evs):
            started = time.monotonic()
            next_kill = started + kill_every_s
        if next_kill is not None and time.monotonic() >= next_kill:
            gens = [e for e in evs if e["event"] == "generation"]
            pid_of = {e["worker"]: e["pid"] for e in evs if e["event"] == "worker_start"}
            busy = evs and evs[-1]["event"] not in ("step", "eval", "checkpoint", "step_replayed")
            if gens and not busy:
                victim = rng.choice(gens[-1]["workers"])
                try:
                    os.kill(pid_of[victim], signal.SIGKILL)
                    kills.append({"worker": victim, "pid": pid_of[victim], "t": time.time()})
                except ProcessLookupError:
                    pass
                next_kill += kill_every_s
    out, err = proc.communicate()
    runs, _ = read_runs(run_dir / "events.jsonl")
    s = runs[-1]
    evs = events(run_dir)
    rec = []
    for k in kills:  # from the moment this script sent SIGKILL (detection included)
        fin = next((x for x in evs if x["event"] == "recovery_finished" and x["t"] >= k["t"]), None)
        nxt = next((x for x in evs if x["event"] == "step" and fin is not None and x["t"] >= fin["t"]), None)
        rec.append({"worker": k["worker"], "strategy": None if fin is None else fin["strategy"],
                    "to_next_commit_s": None if nxt is None else nxt["t"] - k["t"],
                    "recovery_event_s": None if fin is None else fin["seconds"]})
    return {"rc": proc.returncode, "kills": len(kills), "ettr": s.ettr, "wall_s": s.wall_s, "productive_s": s.productive_s,
            "failures": s.failures, "recovery_s": s.recovery_s, "steps": s.steps, "recoveries": rec,
            "summary_line": out.strip().splitlines()[-1] if out.strip() else err.strip()[-300:],
            "error": err.strip().splitlines()[-1] if proc.returncode and err.strip() else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="under a minute")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ettr-seconds", type=float, default=300.0)
    ap.add_argument("--kill-every", type=float, default=60.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.json"))
    ap.add_argument("--strategies", default="replica,mirror,checkfree,checkfree+,checkpoint", help="comma-separated subset")
    ap.add_argument("--overhead-rounds", type=int, default=2, help="rounds of the steady-state runs (0: skip)")
    ap.add_argument("--no-ettr", action="store_true", help="skip the ETTR run")
    args = ap.parse_args()
    if not DATA.is_file():
        print(f"reference data {DATA} is absent", file=sys.stderr)
        return 2
    names = [n for n in args.strategies.split(",") if n in STRATEGIES]
    repeats, steps, kill_step = args.repeats, 40, 25  # 25: five steps after the checkpoint of step 19
    ettr_s, kill_every = args.ettr_seconds, args.kill_every
    if args.quick:
        names, repeats, steps, kill_step, ettr_s, kill_every = ["mirror"], 1, 8, 4, 20.0, 7.0
        args.overhead_rounds = 0
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for k in range(repeats):
            for name in names:  # round-robin: machine load drifts affect every strategy alike
                r = run_strategy(name, steps, kill_step, tmp, k)
                results.append(r)
                got = [x["to_next_commit_s"] for x in r["recoveries"]]
                print(f"  {name:10s} run {k}: rc {r['rc']}, recovery (kill -> next commit) {got}", flush=True)
        steady: list[dict[str, Any]] = []
        for k in range(args.overhead_rounds):
            for name in STEADY:  # alternated, like the strategies
                r = run_steady(name, 30, tmp, k)
                steady.append(r)
                print(f"  steady {name:18s} round {k}: rc {r['rc']}, median step {r['median_step_s']}", flush=True)
        ettr = {"ettr": None, "wall_s": 0.0, "kills": 0, "failures": 0, "steps": 0} if args.no_ettr else run_ettr(ettr_s, kill_every, tmp, 0)
    table = []
    for name in names:
        times = [x["to_next_commit_s"] for r in results if r["strategy"] == name for x in r["recoveries"]
                 if x["to_next_commit_s"] is not None]
        inner = [x["recovery_event_s"] for r in results if r["strategy"] == name for x in r["recoveries"]
                 if x["recovery_event_s"] is not None]
        redo = [x["to_failed_step_commit_s"] for r in results if r["strategy"] == name for x in r["recoveries"]
                if x.get("to_failed_step_commit_s") is not None]
        table.append({"strategy": name, "n": len(times), "median_s": statistics.median(times) if times else None,
                      "failed_step_committed_median_s": statistics.median(redo) if redo else None,
                      "max_s": max(times) if times else None,
                      "confirm_to_installed_median_s": statistics.median(inner) if inner else None})
    print(f"\n{'strategy':12s} {'n':>3s} {'kill->next commit median':>26s} {'max':>8s} {'confirm->installed':>20s} "
          f"{'kill->failed step committed':>28s}")
    for row in table:
        med = "-" if row["median_s"] is None else f"{row['median_s']:.2f} s"
        mx = "-" if row["max_s"] is None else f"{row['max_s']:.2f} s"
        inner = "-" if row["confirm_to_installed_median_s"] is None else f"{row['confirm_to_installed_median_s']:.2f} s"
        redo = "-" if row["failed_step_committed_median_s"] is None else f"{row['failed_step_committed_median_s']:.2f} s"
        print(f"{row['strategy']:12s} {row['n']:3d} {med:>26s} {mx:>8s} {inner:>20s} {redo:>28s}")
    overhead = []
    for name in STEADY if steady else ():
        meds = [r["median_step_s"] for r in steady if r["config"] == name and r["median_step_s"] is not None]
        overhead.append({"config": name, "median_step_s": statistics.median(meds) if meds else None})
    base = next((o["median_step_s"] for o in overhead if o["config"] == "none"), None)
    for o in overhead:
        o["ratio_vs_none"] = None if base is None or o["median_step_s"] is None else o["median_step_s"] / base
        print(f"steady state {o['config']:18s} median step {o['median_step_s']:.3f} s  x{o['ratio_vs_none']:.3f} vs none")
    e = "-" if ettr["ettr"] is None else f"{ettr['ettr']:.3f}"
    print(f"\nETTR with one worker killed every {kill_every:g} s over {ettr['wall_s']:.0f} s: {e} "
          f"({ettr['kills']} kills, {ettr['failures']} failures, {ettr['steps']} steps)")
    if ettr.get("rc"):
        print(f"  the ETTR run exited with code {ettr['rc']}: {ettr.get('error')}")
    import torch

    record = {
        "bench": "recovery", "quick": args.quick, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                            "python": platform.python_version(), "torch": torch.__version__},
        "config": {"small": SMALL, "strategies": STRATEGIES, "steps": steps, "kill_step": kill_step, "repeats": repeats,
                   "ettr_seconds": ettr_s, "kill_every_s": kill_every},
        "table": table, "runs": results, "ettr": ettr, "steady_state": overhead, "steady_runs": steady,
        "kill_stage": {n: KILL_STAGE.get(n, 2) for n in names}, "steady_configs": STEADY,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
