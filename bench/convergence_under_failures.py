"""Convergence under stage failures: checkpointing vs CheckFree vs CheckFree+ vs mirrors.

The in-process mode (:mod:`spotpipe.ft.inprocess`) trains a >= 6-stage LLaMA-style model on
tinyshakespeare with every stage in one process; per-stage failures arrive at 5%, 10% and 16%
per hour (CheckFree, Blagoev, Ersoy, Chen 2025, section 5 and Table 2), converted to per-step
probabilities with a *stated* step time, and each lost stage is rebuilt by the shipped policy and
recovery functions. For each rate and strategy it reports the committed steps, the executed
steps (iterations) and the simulated wall time until the validation loss first reaches the
target, where the target is what the run without failures reaches at 75% of its steps.

Strategies (all with the same checkpoint every K steps as the fallback the policy uses for what
the strategy cannot rebuild: edge stages under plain CheckFree, adjacent stages lost together):

- ``checkpoint``: every loss rolls the job back to the last checkpoint (the baseline).
- ``checkfree``: middle stages rebuilt from their neighbours (gradient-norm-weighted average).
- ``checkfree+``: the swap schedule; edge stages copied from their swap partner.
- ``mirror``: each stage rebuilt from the host-memory mirror its predecessor keeps (every step).

Failures are drawn from one seed per rate, so every strategy sees the same failure times. The
simulated clock charges one step time per executed step and the interrupted part of a failed
step; checkpoint writes and recovery transfers are free on it (this favours checkpointing).

It also measures CheckFree's omega question (``omega`` in the JSON): how often per-stage
gradient norms exceed ``train.grad_clip``, how far the neighbour weights are from 0.5 with the
pre-clip norms versus with per-stage clipped norms, and the validation loss right after a
middle stage is rebuilt with each weighting.

    python bench/convergence_under_failures.py --quick     # < 1 min
    python bench/convergence_under_failures.py             # the full table (about 20 min, 1 core)

Writes bench/results/convergence_under_failures.json and .png (the PNG is gitignored).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from spotpipe import __version__  # noqa: E402
from spotpipe.config import DataConfig, JobConfig, load_config  # noqa: E402
from spotpipe.data.tokens import default_cache_dir, resolve_dataset  # noqa: E402
from spotpipe.ft.inprocess import run_inprocess  # noqa: E402
from spotpipe.ft.recovery import checkfree_rebuild, checkfree_weights, import_state  # noqa: E402
from spotpipe.runtime.local import LocalTrainer  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = ROOT / "configs" / "convergence.toml"
OUT = ROOT / "bench" / "results"
STRATEGIES = ("checkpoint", "checkfree", "checkfree+", "mirror")
PAPER = ("CheckFree paper (500M LLaMA, its Table 2): CheckFree+ reaches its target 1.38-1.69x faster in wall "
         "time than checkpointing")

FULL = dict(layers=6, d_model=64, heads=4, context=64, microbatches=2, batch=8, steps=400, lr=3e-3, warmup=20,
            eval_every=10, eval_batches=4, step_time_s=90.0, checkpoint_every=50, rates=(5.0, 10.0, 16.0))
QUICK = dict(layers=6, d_model=32, heads=4, context=32, microbatches=2, batch=8, steps=40, lr=1e-2, warmup=4,
             eval_every=10, eval_batches=2, step_time_s=300.0, checkpoint_every=10, rates=(16.0,))


def _config(p: dict[str, Any], strategy: str, rate: float | None, seed: int) -> JobConfig:
    """configs/convergence.toml with the benchmark's sizes, strategy and failure rate on top."""
    sets = [
        f"model.layers={p['layers']}", f"model.d_model={p['d_model']}", f"model.heads={p['heads']}",
        f"model.context={p['context']}", f"pipeline.stages={p['layers']}", f"pipeline.microbatches={p['microbatches']}",
        f"train.batch_size={p['batch']}", f"train.steps={p['steps']}", f"train.lr={p['lr']}",
        f"train.warmup_steps={p['warmup']}", f"train.eval_every={p['eval_every']}",
        f"train.eval_batches={p['eval_batches']}", f"train.seed={seed}", "run.name=convergence",
        f"ft.strategy={'auto' if strategy == 'none' else strategy}", "ft.mirror_every=1",
        f"ft.rate_step_time_s={p['step_time_s']}",
        f"train.checkpoint_every={p['checkpoint_every'] if strategy != 'none' else 0}",
    ]
    if rate is not None:
        sets.append(f'ft.faults=["{rate:g}%/h"]')
    else:
        sets.append("ft.faults=[]")
    return load_config(CONFIG, sets)


def _target(evals: list[list[float]], steps: int) -> float:
    """Val loss of the failure-free run at the evaluation nearest 75% of its steps."""
    at = min(evals, key=lambda e: abs(e[0] - 0.75 * steps))
    return float(at[3])


def omega_study(p: dict[str, Any], token_file: Any, seed: int, log: Any) -> dict[str, Any]:
    """Pre-clip vs per-stage-clipped omega: norm statistics and val loss right after a rebuild."""
    cfg = _config(p, "none", None, seed)
    clip = cfg.train.grad_clip
    tr = LocalTrainer(cfg, token_file)
    stats = {"steps": 0, "global_clip_active": 0, "stage_norm_above_clip": 0, "stage_norms": 0,
             "dev_preclip": [], "dev_stage_clipped": []}
    rebuilds: list[dict[str, Any]] = []
    probe_steps = {p["steps"] // 4, p["steps"] // 2} if p["steps"] >= 8 else {p["steps"] // 2}
    middle = list(range(1, tr.num_chunks - 1))
    for _ in range(max(probe_steps)):
        r = tr.train_step()
        norms = tr.last_grad_norms()
        stats["steps"] += 1
        stats["global_clip_active"] += int(clip > 0 and r.grad_norm > clip)
        stats["stage_norm_above_clip"] += sum(n > clip for n in norms)
        stats["stage_norms"] += len(norms)
        for i in middle:
            a, _ = checkfree_weights(norms[i - 1], norms[i + 1])
            c, _ = checkfree_weights(min(norms[i - 1], clip), min(norms[i + 1], clip))
            stats["dev_preclip"].append(abs(a - 0.5))
            stats["dev_stage_clipped"].append(abs(c - 0.5))
        if tr.step in probe_steps:
            base = tr.evaluate()
            saved = tr.state_dict()
            for i in middle:
                row: dict[str, Any] = {"step": tr.step, "stage": i, "val_before": base,
                                       "w_prev_preclip": checkfree_weights(norms[i - 1], norms[i + 1])[0],
                                       "w_prev_stage_clipped": checkfree_weights(min(norms[i - 1], clip), min(norms[i + 1], clip))[0]}
                for name, (wa, wb) in {"preclip": (norms[i - 1], norms[i + 1]),
                                       "stage_clipped": (min(norms[i - 1], clip), min(norms[i + 1], clip)),
                                       "uniform": (1.0, 1.0)}.items():
                    blocks = checkfree_rebuild(tr.chunks[i - 1].state_dict(), tr.chunks[i + 1].state_dict(), wa, wb)
                    import_state(tr.chunks[i], None, {"model": blocks, "optim": {}})
                    row[f"val_after_{name}"] = tr.evaluate()
                    tr.load_state_dict(saved)
                rebuilds.append(row)
            log(f"omega probe at step {tr.step}: val {base:.4f}")
    n = max(1, len(stats["dev_preclip"]))
    return {
        "grad_clip": clip,
        "steps_measured": stats["steps"],
        "fraction_steps_global_clip_active": stats["global_clip_active"] / max(1, stats["steps"]),
        "fraction_stage_norms_above_clip": stats["stage_norm_above_clip"] / max(1, stats["stage_norms"]),
        "mean_abs_w_minus_half_preclip": sum(stats["dev_preclip"]) / n,
        "mean_abs_w_minus_half_stage_clipped": sum(stats["dev_stage_clipped"]) / n,
        "max_abs_w_minus_half_preclip": max(stats["dev_preclip"], default=0.0),
        "max_abs_w_minus_half_stage_clipped": max(stats["dev_stage_clipped"], default=0.0),
        "rebuilds": rebuilds,
        "note": "global-norm clipping scales every stage's norm by one factor, so the pre-clip and post-global-clip "
                "weights are identical; 'stage_clipped' is min(norm, grad_clip), what per-stage clipping leaves",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, one rate, < 1 min")
    ap.add_argument("--steps", type=int, help="training steps of the failure-free run")
    ap.add_argument("--step-time", type=float, help="seconds per step used to convert per-hour rates")
    ap.add_argument("--checkpoint-every", type=int, help="K: steps between checkpoints")
    ap.add_argument("--rates", type=str, help="per-hour stage-failure rates in percent, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models are fastest on 1)")
    ap.add_argument("--no-omega", action="store_true", help="skip the omega study")
    ap.add_argument("--out", type=Path, default=OUT / "convergence_under_failures.json")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.steps:
        p["steps"] = args.steps
    if args.step_time:
        p["step_time_s"] = args.step_time
    if args.checkpoint_every:
        p["checkpoint_every"] = args.checkpoint_every
    if args.rates:
        p["rates"] = tuple(float(x) for x in args.rates.split(","))
    if not DATA.is_file():
        print(f"needs {DATA} (tinyshakespeare); not found", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    token_file = resolve_dataset(DataConfig(path=str(DATA.resolve())), default_cache_dir())

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {line}", flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    scratch = ROOT / "bench" / "scratch" / "convergence"
    scratch.mkdir(parents=True, exist_ok=True)
    for old in scratch.glob("*.jsonl"):
        old.unlink()  # event logs append; start each benchmark with fresh ones
    log(f"baseline: no failures, {p['steps']} steps")
    base = run_inprocess(_config(p, "none", None, args.seed), token_file, events=scratch / "none.jsonl")
    target = _target([list(e) for e in base.evals], p["steps"])
    base_target = next(e for e in base.evals if e[3] <= target)
    log(f"target val loss {target:.4f} (no-failure run at step {base_target[0]}); simulated step time {base.step_time_s:g} s")
    runs: list[dict[str, Any]] = [{**base.to_json(), "rate_per_hour": 0.0, "strategy": "none", "target": target,
                                   "target_at": list(base_target)}]
    swap = run_inprocess(_config(p, "checkfree+", None, args.seed), token_file, events=scratch / "swap-only.jsonl",
                         target_loss=target)
    runs.append({**swap.to_json(), "rate_per_hour": 0.0, "strategy": "checkfree+"})
    log(f"swap schedule, no failures: target " + (f"at step {swap.target_at[0]}" if swap.target_at else "not reached"))
    for rate in p["rates"]:
        for strategy in STRATEGIES:
            cfg = _config(p, strategy, rate, args.seed)
            res = run_inprocess(cfg, token_file, events=scratch / f"{strategy}-{rate:g}.jsonl", target_loss=target,
                                stop_at_target=True, max_iterations=3 * p["steps"])
            runs.append({**res.to_json(), "rate_per_hour": rate, "strategy": strategy})
            at = res.target_at
            log(f"{rate:4g}%/h {strategy:11s} failures {res.failures:3d} {res.recoveries} -> "
                + (f"target at step {at[0]}, iteration {at[1]}, {at[2] / 3600:.2f} sim h" if at else f"target not reached ({res.status})"))
    omega = None if args.no_omega else omega_study(p, token_file, args.seed, log)

    # table: steps, iterations and simulated hours to the target; speed-up = checkpoint time / strategy time
    rows = []
    for r in runs:
        at = r["target_at"]
        ck = next((x for x in runs if x["rate_per_hour"] == r["rate_per_hour"] and x["strategy"] == "checkpoint"), None)
        speedup = None
        if at and ck and ck["target_at"]:
            speedup = ck["target_at"][2] / at[2] if at[2] > 0 and r["rate_per_hour"] > 0 else None
        rows.append({"rate_per_hour": r["rate_per_hour"], "strategy": r["strategy"], "failures": r["failures"],
                     "recoveries": r["recoveries"], "steps_to_target": at[0] if at else None,
                     "iterations_to_target": at[1] if at else None,
                     "sim_hours_to_target": at[2] / 3600 if at else None,
                     "cpu_seconds": r["wall_seconds"], "speedup_vs_checkpoint": speedup,
                     "lost_steps": r["lost_steps"], "mirror_bytes": r["mirror_bytes"], "status": r["status"]})
    print()
    print(f"target val loss {target:.4f}; step time for rate conversion and clock {p['step_time_s']:g} s; "
          f"checkpoint every {p['checkpoint_every']} steps; {p['layers']} stages")
    head = f"{'rate/h':>6} {'strategy':11s} {'fail':>4} {'steps':>6} {'iters':>6} {'sim h':>7} {'vs ckpt':>7} {'cpu s':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(v: Any, fmt: str) -> str:
            width = int("".join(ch for ch in fmt if ch.isdigit() and ch != "0")[:1] or 0)
            return format(v, fmt) if v is not None else "-".rjust(width)
        print(f"{r['rate_per_hour']:>5g}% {r['strategy']:11s} {r['failures']:>4d} {f(r['steps_to_target'], '>6d')} "
              f"{f(r['iterations_to_target'], '>6d')} {f(r['sim_hours_to_target'], '>7.2f')} "
              f"{f(r['speedup_vs_checkpoint'], '>6.2f') + 'x' if r['speedup_vs_checkpoint'] else '      -'} {r['cpu_seconds']:>6.0f}")
    print(PAPER)
    if omega:
        print(f"omega: global clip active in {omega['fraction_steps_global_clip_active']:.0%} of steps, per-stage norms above "
              f"grad_clip {omega['fraction_stage_norms_above_clip']:.0%}; mean |w-0.5| pre-clip "
              f"{omega['mean_abs_w_minus_half_preclip']:.3f} vs per-stage clipped {omega['mean_abs_w_minus_half_stage_clipped']:.3f}")
        for row in omega["rebuilds"]:
            print(f"  step {row['step']} stage {row['stage']}: val {row['val_before']:.4f} -> rebuilt pre-clip "
                  f"{row['val_after_preclip']:.4f} (w {row['w_prev_preclip']:.3f}), stage-clipped "
                  f"{row['val_after_stage_clipped']:.4f} (w {row['w_prev_stage_clipped']:.3f}), uniform {row['val_after_uniform']:.4f}")

    result = {
        "benchmark": "convergence_under_failures",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "spotpipe": __version__, "threads": args.threads,
                    "load_before": load_before, "load_after": os.getloadavg()},
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "seed": args.seed,
        "target_val_loss": target,
        "target_rule": "val loss of the failure-free run at the evaluation nearest 75% of its steps",
        "clock": "simulated: step_time_s per executed step + the interrupted fraction of failed steps; checkpoint "
                 "writes and recovery transfers free",
        "rows": rows,
        "runs": runs,
        "omega": omega,
        "paper": PAPER,
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log(f"wrote {args.out}")
    _plot(runs, p, target, args.out.with_suffix(".png"))
    return 0


def _plot(runs: list[dict[str, Any]], p: dict[str, Any], target: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    rates = list(p["rates"])
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.2), squeeze=False)
    base = next(r for r in runs if r["strategy"] == "none")
    swap = next((r for r in runs if r["strategy"] == "checkfree+" and r["rate_per_hour"] == 0.0), None)
    for ax, rate in zip(axes[0], rates):
        ax.plot([e[2] / 3600 for e in base["evals"]], [e[3] for e in base["evals"]], "k-", label="no failures")
        if swap is not None:
            ax.plot([e[2] / 3600 for e in swap["evals"]], [e[3] for e in swap["evals"]], "k--", lw=1,
                    label="swap schedule, no failures")
        for r in runs:
            if r["rate_per_hour"] == rate:
                ax.plot([e[2] / 3600 for e in r["evals"]], [e[3] for e in r["evals"]], marker=".", label=r["strategy"])
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.3f}")
        ax.set_title(f"{rate:g}% stage failures per hour")
        ax.set_xlabel(f"simulated hours ({p['step_time_s']:g} s per step)")
        ax.set_ylabel("validation loss")
        lo = min(e[3] for e in base["evals"])
        ax.set_ylim(lo - 0.05, lo + 1.0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
