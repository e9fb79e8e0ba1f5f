"""spotpipe's 1F1B runtime against torch.distributed.pipelining.Schedule1F1B.

Same model chunks (spotpipe's ``build_stage``), same microbatches, same optimiser work (global
grad-norm all-reduce, clipping, AdamW), 4 ranks, gloo, CPU, one intra-op thread per rank (what
``spotpipe train`` gives each of 4 local workers on 2 cores). The two sides alternate, round by
round, in this one run; each side's throughput is its median steady-state step interval (the
warm-up steps are dropped). spotpipe's step interval is commit to commit as its controller logs
it, so it includes the atomic-step protocol; torch's is the interval between step ends on rank 0.

Writes ``bench/results/runtime_vs_torch.json`` with both tokens/s and ``ratio`` (spotpipe /
torch). ``--quick`` finishes in under a minute. spotpipe runs with ``ft.strategy=none`` (torch
has no failure handling either); the cost of the default peer mirror is measured by
bench/recovery.py.

    python bench/runtime_vs_torch.py [--quick] [--rounds N] [--steps N]
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _torch_pipelining import run_torch_pipelining  # noqa: E402

from spotpipe import __version__  # noqa: E402
from spotpipe.config import apply_overrides, JobConfig  # noqa: E402
from spotpipe.data.tokens import TokenFile, prepare_tokens  # noqa: E402
from spotpipe.events import STEP, read_events  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def token_dir(work: Path) -> Path:
    """tinyshakespeare when the shared data is there, else a small slice of this file's own text."""
    out = work / "tokens"
    source = SHAKESPEARE if SHAKESPEARE.is_file() else Path(__file__)
    prepare_tokens([source], out)
    return out


def run_spotpipe(overrides: list[str], work: Path, round_no: int) -> list[float]:
    """Per-step commit-to-commit intervals of one `spotpipe train` run."""
    run_dir = work / f"spotpipe-{round_no}"
    cmd = [sys.executable, "-m", "spotpipe.cli", "train", *sum((["--set", o] for o in overrides), [])]
    cmd += ["--set", f"run.dir={run_dir}", "--set", "run.progress=false", "--set", "run.plot=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"spotpipe train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return [float(r["step_time"]) for r in read_events(run_dir / "events.jsonl", STEP)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 1 round: under a minute")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime_vs_torch.json"))
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (8 if args.quick else 20)
    model = ["model.layers=4", "model.d_model=64", "model.context=64"] if args.quick else []
    overrides = model + [
        "pipeline.stages=4",
        "pipeline.schedule=1f1b",
        "pipeline.microbatches=4",
        "train.batch_size=16",
        f"train.steps={args.warmup + steps}",
        "train.eval_every=0",
        "train.eval_batches=1",
        # Compare the pipeline runtimes alone: torch has no failure handling, so spotpipe runs
        # without its peer mirror (ft.strategy=auto refreshes a mirror every step; see README).
        "ft.strategy=none",
    ]
    with tempfile.TemporaryDirectory(prefix="spotpipe-bench-") as tmp:
        work = Path(tmp)
        tokens = token_dir(work)
        overrides.append(f"data.path={tokens}")
        overrides.append(f"model.vocab_size={TokenFile(tokens).vocab_size}")
        cfg = apply_overrides(JobConfig(), overrides).validate()
        tokens_per_step = cfg.train.batch_size * cfg.model.context
        per_round = []
        for r in range(rounds):
            t_torch = run_torch_pipelining(cfg, str(tokens), args.warmup + steps, threads=1)[args.warmup :]
            t_spot = run_spotpipe(overrides, work, r)[args.warmup :]
            row = {
                "round": r,
                "torch_step_s": statistics.median(t_torch),
                "spotpipe_step_s": statistics.median(t_spot),
            }
            row["ratio"] = row["torch_step_s"] / row["spotpipe_step_s"]
            per_round.append(row)
            print(f"round {r}: torch {row['torch_step_s']*1e3:7.1f} ms/step   spotpipe "
                  f"{row['spotpipe_step_s']*1e3:7.1f} ms/step   ratio {row['ratio']:.3f}", flush=True)
    torch_s = statistics.median(r["torch_step_s"] for r in per_round)
    spot_s = statistics.median(r["spotpipe_step_s"] for r in per_round)
    result = {
        "benchmark": "runtime_vs_torch",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "spotpipe": __version__, "load": os.getloadavg()},
        "config": overrides,
        "rounds": per_round,
        "torch_tokens_per_s": tokens_per_step / torch_s,
        "spotpipe_tokens_per_s": tokens_per_step / spot_s,
        "ratio": torch_s / spot_s,
        "ratio_per_round_median": statistics.median(r["ratio"] for r in per_round),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'side':<10}{'tokens/s':>12}\n{'torch':<10}{result['torch_tokens_per_s']:>12.0f}\n"
          f"{'spotpipe':<10}{result['spotpipe_tokens_per_s']:>12.0f}\nratio (spotpipe / torch) = {result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
