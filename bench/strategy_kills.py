"""One kill per recovery strategy at a given model size: does every strategy hold up?

For each strategy (replica with 2 stages x 2 replicas; mirror, checkfree, checkpoint and
checkfree+ with 4 stages) two runs of the same job: failure-free, and with the stage-1 worker
killed (SIGKILL from the controller) when step ``--kill-step`` starts. From the runs' own
``events.jsonl`` it checks:

- every step committed exactly once (the killed step is replayed with the same data);
- the survivors kept their processes: the only new pid is the one that took the lost role;
- replica and mirror are exact: per-step losses equal the failure-free run's (1e-6 relative);
- how long the recovery took (kill to the next committed step) and how many bytes moved.

Default size: the 25 M-parameter shape of ``bench/mirror_scaling.py`` (d_model 512, 8 blocks,
context 64). Writes ``bench/results/strategy_kills.json``; ``--set`` passes overrides to every run
(``bench/gpu_check.py`` runs it with ``run.device=cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mirror_scaling import COMMON, SIZES, events, train  # noqa: E402

STRATEGIES = {
    "replica": ["ft.strategy=replica", "pipeline.stages=2", "pipeline.replicas=2"],
    "mirror": ["ft.strategy=mirror"],
    "checkfree": ["ft.strategy=checkfree"],
    "checkpoint": ["ft.strategy=checkpoint", "train.checkpoint_every=2"],
    "checkfree+": ["ft.strategy=checkfree+"],
}
EXACT = ("replica", "mirror")


def losses(evs: list[dict[str, Any]]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in evs if e["event"] == "step"}


def check_kill(name: str, ref: list[dict[str, Any]], run: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """What the events of the killed run say, against the failure-free run."""
    committed = [e["step"] for e in run if e["event"] == "step"]
    starts = [e for e in run if e["event"] == "worker_start"]
    fault = next((e for e in run if e["event"] == "fault_injected"), None)
    fin = next((e for e in run if e["event"] == "recovery_finished"), None)
    first = {(e["stage"], e["replica"]): e["pid"] for e in starts if e.get("generation", 1) == 1 and not e.get("spare")}
    later = [e for e in starts if e.get("generation", 1) > 1 or e.get("spare")]
    killed = (fault["stage"], fault["replica"]) if fault else None
    survivors_kept = fault is not None and all(e["stage"] == killed[0] and e["replica"] == killed[1] for e in later)
    a, b = losses(run), losses(ref)
    exact = bool(a) and a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * abs(b[k]) for k in a)
    nxt = next((e for e in run if e["event"] == "step" and fin is not None and e["t"] >= fin["t"]), None)
    row = {
        "strategy": name,
        "every_step_once": sorted(committed) == list(range(steps)) and len(committed) == steps,
        "survivors_kept_pids": survivors_kept, "workers_at_start": len(first),
        "losses_equal_failure_free": exact,
        "recovered_by": fin["strategy"] if fin else None,
        "bytes_moved": fin["bytes"] if fin else None,
        "kill_to_next_commit_s": nxt["t"] - fault["t"] if nxt and fault else None,
    }
    row["ok"] = row["every_step_once"] and survivors_kept and fin is not None and (exact or name not in EXACT)
    return row


def run_all(src: Path, sets: list[str], steps: int, kill_step: int, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name, extra in STRATEGIES.items():
        job = [*sets, *extra, f"train.steps={steps}"]
        ref_dir, kill_dir = tmp / f"{name}-ref", tmp / f"{name}-kill"
        rc_ref, err_ref = train(src, ref_dir, job)
        rc, err = train(src, kill_dir, job, ("--fail", f"stage=1@step={kill_step}"))
        row = {"rc": rc, "rc_ref": rc_ref, "error": err or err_ref, **check_kill(name, events(ref_dir), events(kill_dir), steps)}
        row["ok"] = row["ok"] and rc == 0 and rc_ref == 0
        rows.append(row)
        print(f"{name:>11}: {'ok' if row['ok'] else 'FAILED'}  {row}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="25M", choices=sorted(SIZES), help="model size (default 25M)")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    parser.add_argument("--kill-step", type=int, default=4, help="the step at whose start stage 1 is killed (default 4)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="another override for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "strategy_kills.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="spotpipe-kills-") as tmp:
        rows = run_all(ROOT / "src", [*COMMON, *SIZES[args.size], *args.extra], args.steps, args.kill_step, Path(tmp))
    result = {"size": args.size, "rows": rows, "meta": {"machine": platform.machine(), "cpus": os.cpu_count(),
              "steps": args.steps, "kill_step": args.kill_step, "extra": args.extra, "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'strategy':>11} {'ok':>6} {'once':>5} {'pids':>5} {'exact':>6} {'recovered by':>13} {'MB':>7} {'kill->commit s':>15}")
    for r in rows:
        mb = "-" if r["bytes_moved"] is None else f"{r['bytes_moved'] / 1e6:.1f}"
        t = "-" if r["kill_to_next_commit_s"] is None else f"{r['kill_to_next_commit_s']:.2f}"
        print(f"{r['strategy']:>11} {str(r['ok']):>6} {str(r['every_step_once']):>5} {str(r['survivors_kept_pids']):>5} "
              f"{str(r['losses_equal_failure_free']):>6} {str(r['recovered_by']):>13} {mb:>7} {t:>15}")
    print(f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
