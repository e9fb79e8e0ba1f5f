"""Train the real-size configs for a few steps on this machine and record each worker's peak memory.

Runs ``spotpipe train --config configs/model-<size>.toml`` with a small batch and context (CPU:
the configs are sized for GPUs) and samples the resident set size of every worker process
(``/proc/<pid>/status``, VmRSS) every 0.2 s; reports the largest per worker, the parameter line
``spotpipe train`` prints, the losses and the wall time. Writes
``bench/results/real_size_smoke.json``.

    python bench/real_size_smoke.py [--sizes 125m] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.batch_size=4", "pipeline.microbatches=4", "model.context=64", "train.eval_every=0", "run.plot=false",
         "run.progress=false", "run.timeout_s=300"]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_size(size: str, steps: int, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / size
    cmd = [sys.executable, "-m", "spotpipe.cli", "train", "--config", str(ROOT / "configs" / f"model-{size}.toml"),
           "--set", f"run.dir={run_dir}", "--set", f"train.steps={steps}"]
    for s in SMALL:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak: dict[int, int] = {}
    while proc.poll() is None:
        events = run_dir / "events.jsonl"
        if events.exists():
            for line in events.read_text().splitlines():
                if '"worker_start"' in line:
                    try:
                        pid = int(json.loads(line)["pid"])
                    except ValueError:
                        continue
                    peak[pid] = max(peak.get(pid, 0), rss_kib(pid))
        time.sleep(0.2)
    out, err = proc.communicate()
    evs = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()] if (run_dir / "events.jsonl").exists() else []
    return {"size": size, "rc": proc.returncode, "wall_s": time.perf_counter() - t0,
            "model_line": next((x for x in out.splitlines() if x.startswith("model:")), ""),
            "losses": [e["loss"] for e in evs if e["event"] == "step"],
            "peak_rss_gib_per_worker": sorted(round(v / 2**20, 2) for v in peak.values()),
            "error": (err.strip().splitlines() or [""])[-1] if proc.returncode else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="25m,125m", help="comma-separated: 25m, 125m, 350m (default 25m,125m)")
    parser.add_argument("--steps", type=int, default=3, help="steps per run (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "real_size_smoke.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="spotpipe-real-size-") as tmp:
        rows = [run_size(s.strip(), args.steps, Path(tmp)) for s in args.sizes.split(",") if s.strip()]
    for r in rows:
        print(f"{r['size']:>5}: rc {r['rc']}, {r['wall_s']:.0f} s, losses {[round(x, 3) for x in r['losses']]}, "
              f"peak RSS per worker {r['peak_rss_gib_per_worker']} GiB {r['error']}\n       {r['model_line']}")
    print(f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "small": SMALL, "loadavg_before": load_before,
                                    "loadavg_after": os.getloadavg()}, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
