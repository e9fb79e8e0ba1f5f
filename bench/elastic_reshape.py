"""Elastic reshapes on real worker processes: how fast a shrink and a grow are, and which way a
job with replicas should shrink.

1. **Walk** (the default config, ``configs/default.toml``: 4 stages, 1 replica, no spare,
   ``ft.elastic = true``): SIGKILL the worker of stage 2 (4 -> 3 stages), then of stage 1
   (3 -> 2), then start two ``spotpipe worker --join`` processes one after the other (2 -> 3 -> 4).
   Measured per reshape, from the run's events:

   * shrink: seconds from the SIGKILL to the first committed step at the new shape (target <= 5 s);
   * grow: seconds from starting ``worker --join`` to the first committed step that uses it
     (target <= 60 s), whether any worker restarted (target: none), and the *stall*: the gap
     between the commits around the reshape minus the median step time, in step times
     (target <= 1);
   * every step committed once, and the state bytes each reshape moved.

2. **Replicas** (the default model, 4 stages x 2 replicas, no spare): which shrink is faster,
   alternated in rounds. ``group``: a lost worker drops its whole replica group (the policy of
   :mod:`spotpipe.ft.elastic`; the other replica runs all microbatches). ``stage``: the other
   way, every replica kept and the hit stage run with one worker fewer; the runtime has it as a
   SkipPipe node run on full paths (``pipeline.stage_nodes = [2, 2, 2, 2]``, no skips: the nodes
   of a stage are its replicas, :mod:`spotpipe.runtime.control.nodeplan`). Each run's median
   step time after the loss over its median before; on 2 shared cores this also counts the CPU
   the extra processes of ``stage`` take, so the simulator's step-time ratio of both shapes
   (:func:`spotpipe.ft.elastic.step_seconds`, one device per worker) is given beside it.

Writes bench/results/elastic_reshape.json with the figures, the load average before and after
each run, and the command.

    python bench/elastic_reshape.py --quick   # the walk once, 1 round of replicas: about 1.5 minutes
    python bench/elastic_reshape.py           # the walk twice, 3 rounds of replicas: about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spotpipe import __version__  # noqa: E402

SPOTPIPE = [sys.executable, "-m", "spotpipe.cli"]
CONFIG = ROOT / "configs" / "default.toml"
COMMON = ["train.steps=100000", "train.eval_every=0", "run.plot=false", "ft.spares=0", "run.progress=false"]
Events = list[dict[str, Any]]


class Job:
    """A running ``spotpipe train`` and its event log."""

    def __init__(self, run_dir: Path, sets: list[str]) -> None:
        args = [*SPOTPIPE, "train", "--config", str(CONFIG)]
        for s in [*COMMON, f"run.dir={run_dir}", *sets]:
            args += ["--set", s]
        self.run_dir = run_dir
        self.log = open(f"{run_dir}.out", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.joiners: list[subprocess.Popen[bytes]] = []

    def events(self) -> Events:
        from spotpipe.events import read_events  # a torn last line (being written) is skipped

        path = self.run_dir / "events.jsonl"
        return read_events(path) if path.exists() else []

    def wait(self, pred: Callable[[Events], bool], what: str, timeout: float = 240) -> Events:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"elastic_reshape: the job ended early ({self.proc.returncode}); see {self.run_dir}.out")
            found = self.events()
            if pred(found):
                return found
            time.sleep(0.05)
        raise SystemExit(f"elastic_reshape: no {what} within {timeout:.0f} s; see {self.run_dir}.out")

    def steps(self, found: Events | None = None) -> list[dict[str, Any]]:
        return [r for r in (self.events() if found is None else found) if r["event"] == "step"]

    def more_steps(self, n: int) -> None:
        have = len(self.steps())
        self.wait(lambda e: len(self.steps(e)) >= have + n, f"{n} more steps")

    def pids(self) -> dict[int, int]:
        return {r["worker"]: r["pid"] for r in self.events() if r["event"] == "worker_start"}

    def join(self) -> None:
        address = next(r["address"] for r in self.events() if r["event"] == "run_start")
        self.joiners.append(subprocess.Popen([*SPOTPIPE, "worker", "--join", address, "--token-file",
                                              str(self.run_dir / "job.token")], stdout=self.log, stderr=subprocess.STDOUT))

    def stop(self) -> Events:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        finally:
            for p in [self.proc, *self.joiners]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self.log.close()
        return self.events()


def reshapes(found: Events) -> list[dict[str, Any]]:
    return [r for r in found if r["event"] == "reshape" and r["kind"] in ("shrink", "grow")]


def first_step_at(found: Events, shape: str, after_t: float) -> dict[str, Any]:
    return next(r for r in found if r["event"] == "step" and r.get("shape") == shape and r["t"] > after_t)


def walk(run_dir: Path, steps_between: int) -> dict[str, Any]:
    """4 -> 3 -> 2 -> 3 -> 4 workers (see the module docstring)."""
    job = Job(run_dir, ["ft.elastic=true"])
    marks: list[tuple[str, float]] = []
    job.wait(lambda e: len(job.steps(e)) >= steps_between, "the first steps")
    first = job.pids()
    for i, stage in enumerate((2, 1)):
        job.more_steps(steps_between)
        gen = [r for r in job.events() if r["event"] == "generation"][-1]
        marks.append(("kill", time.time()))
        os.kill(first[gen["workers"][stage]], signal.SIGKILL)
        job.wait(lambda e, i=i: len(reshapes(e)) > i, "shrink")
    for i in range(2):
        job.more_steps(steps_between)
        marks.append(("join", time.time()))
        job.join()
        job.wait(lambda e, i=i: len(reshapes(e)) > 2 + i, "grow", 300)
    job.more_steps(steps_between)
    found = job.stop()
    steps = job.steps(found)
    median = statistics.median(float(r["step_time"]) for r in steps[1:])
    out = []
    for (what, t), r in zip(marks, reshapes(found)):
        first_new = first_step_at(found, r["to"], t)
        before = max((s for s in steps if s["t"] < first_new["t"]), key=lambda s: s["t"])
        gap = first_new["t"] - before["t"]
        out.append({
            "from": r["from"], "to": r["to"], "kind": r["kind"], "bytes": r["bytes"], "reshape_s": r["seconds"],
            ("kill_to_first_step_s" if what == "kill" else "join_to_first_step_s"): first_new["t"] - t,
            "commit_gap_s": gap, "stall_step_times": (gap - median) / median,
        })
    numbers = [r["step"] for r in steps]
    starts = sorted(r["worker"] for r in found if r["event"] == "worker_start")
    return {"reshapes": out, "median_step_s": median, "steps": len(numbers),
            "every_step_once": numbers == list(range(len(numbers))), "worker_starts": starts,
            "no_worker_restarted": starts == list(range(len(starts)))}


def replica_run(run_dir: Path, kind: str, steps_each: int) -> dict[str, Any]:
    """One replicas run: ``group`` or ``stage`` (module docstring); median step time before and
    after a SIGKILL of the stage-1 worker of replica 1."""
    sets = (["ft.elastic=true", "pipeline.replicas=2"] if kind == "group" else
            ["pipeline.stage_nodes=[2,2,2,2]", "pipeline.paths=full", "pipeline.skip_ratio=0", "pipeline.full_every=0"])
    job = Job(run_dir, sets)
    job.wait(lambda e: len(job.steps(e)) >= steps_each + 1, "steps before the loss")
    starts = {(r["stage"], r["replica"]): r["pid"] for r in job.events() if r["event"] == "worker_start"}
    if kind == "group":
        victim = starts[(1, 1)]
    else:  # the second node of model stage 1 (the node plan places the nodes)
        groups = json.loads((run_dir / "node_plan.json").read_text())["groups"]
        victim = starts[(groups[1][1], 0)]
    before = [float(r["step_time"]) for r in job.steps()[1:]]
    kill_at = time.time()
    os.kill(victim, signal.SIGKILL)
    job.wait(lambda e: len([r for r in job.steps(e) if r["t"] > kill_at]) >= steps_each + 1, "steps after the loss", 300)
    found = job.stop()
    after = [float(r["step_time"]) for r in job.steps(found) if r["t"] > kill_at][1:]
    b, a = statistics.median(before), statistics.median(after)
    return {"kind": kind, "median_before_s": b, "median_after_s": a, "after_over_before": a / b}


def predicted_ratios() -> dict[str, float]:
    """The cost model's step time after / before for both shrinks (one device per worker)."""
    from spotpipe.config import apply_overrides, load_config
    from spotpipe.ft.elastic import elastic_cost, initial_shape, step_seconds

    cfg = apply_overrides(load_config(CONFIG), ["pipeline.replicas=2"]).validate()
    cost = elastic_cost(cfg)
    L = cfg.model.layers
    full = step_seconds(initial_shape(L, 4, 2), cost)
    group = step_seconds(initial_shape(L, 4, 1), cost)
    # Every replica kept: the hit stage's one worker runs all N microbatches, the others N / 2;
    # the step is as slow as that stage: the shape of one replica with its bubble over N.
    stage = group
    return {"group": group / full, "stage": stage / full}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Writes bench/results/elastic_reshape.json.")
    parser.add_argument("--quick", action="store_true", help="one walk and one round of replicas (about 1.5 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "elastic_reshape.json",
                        help="where to write the results (default: %(default)s)")
    args = parser.parse_args(argv)
    walks, rounds, steps_between = (1, 1, 4) if args.quick else (2, 3, 6)
    result: dict[str, Any] = {"command": "python bench/elastic_reshape.py" + (" --quick" if args.quick else ""),
                              "spotpipe": __version__, "python": platform.python_version(), "config": str(CONFIG.relative_to(ROOT)),
                              "walks": [], "replicas": []}
    with tempfile.TemporaryDirectory(prefix="elastic-reshape-") as tmp:
        for i in range(walks):
            load = os.getloadavg()[0]
            w = walk(Path(tmp) / f"walk{i}", steps_between)
            w["load_before"], w["load_after"] = load, os.getloadavg()[0]
            result["walks"].append(w)
            for r in w["reshapes"]:
                key = "kill_to_first_step_s" if "kill_to_first_step_s" in r else "join_to_first_step_s"
                print(f"walk {i}: {r['from']} -> {r['to']}: {key} {r[key]:.2f} s, stall {r['stall_step_times']:.2f} step times, "
                      f"{r['bytes'] / 1e6:.2f} MB moved (load {load:.2f})", flush=True)
        for i in range(rounds):
            for kind in ("group", "stage"):
                load = os.getloadavg()[0]
                r = replica_run(Path(tmp) / f"{kind}{i}", kind, steps_between + 2)
                r["load_before"], r["load_after"], r["round"] = load, os.getloadavg()[0], i
                result["replicas"].append(r)
                print(f"replicas round {i}: {kind}: step after/before the loss {r['after_over_before']:.2f} (load {load:.2f})", flush=True)
    shrinks = [r for w in result["walks"] for r in w["reshapes"] if r["kind"] == "shrink"]
    grows = [r for w in result["walks"] for r in w["reshapes"] if r["kind"] == "grow"]
    by = {k: statistics.median(r["after_over_before"] for r in result["replicas"] if r["kind"] == k) for k in ("group", "stage")}
    result["summary"] = {
        "kill_to_first_step_s_max": max(r["kill_to_first_step_s"] for r in shrinks),
        "join_to_first_step_s_max": max(r["join_to_first_step_s"] for r in grows),
        "grow_stall_step_times_max": max(r["stall_step_times"] for r in grows),
        "every_step_once": all(w["every_step_once"] for w in result["walks"]),
        "no_worker_restarted": all(w["no_worker_restarted"] for w in result["walks"]),
        "replicas_after_over_before": by,
        "replicas_group_over_stage": by["group"] / by["stage"],
        "replicas_predicted_after_over_before": predicted_ratios(),
        "targets": {"kill_to_first_step_s": 5.0, "join_to_first_step_s": 60.0, "grow_stall_step_times": 1.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
