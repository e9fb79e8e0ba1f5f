"""Convergence under stage failures: checkpointing vs CheckFree vs CheckFree+ vs mirrors.

The in-process mode (:mod:`spotpipe.runtime.inprocess.convergence`) trains a 6-stage LLaMA-style model on
tinyshakespeare with every stage in one process; per-stage failures arrive at 5%, 10% and 16%
per hour (CheckFree, Blagoev, Ersoy, Chen 2025, section 5 and Table 2), converted to per-step
probabilities with a *stated* step time (90 s), and each lost stage is rebuilt by the shipped
policy and recovery functions. For each seed, rate and strategy it reports the committed steps,
the executed steps (iterations) and the simulated wall time until the validation loss first
reaches the target, and the speed-up over checkpointing (its simulated hours / the strategy's).

Target and cap. The target is the failure-free run's validation loss at step T = 300. Every run
uses the same cosine learning-rate horizon of 2T = 600 steps and may commit up to 600 steps (and
execute up to 1800), so a run that is slower than the reference still has room to get there; the
CheckFree+ swap schedule alone (no failures) is measured the same way ("swap-schedule-alone cost":
its steps to the target vs the reference's). An earlier version put the target at 75% of a
400-step horizon and capped at 400: there the loss curve is already flat, a small gap costs many
steps, and CheckFree+ (whose swap alone needed 360 steps) never reached the target.

Model: 6 layers on 6 stages (one block per stage), d_model 64, context 64, lr 3e-3 (the best of
1e-3/2e-3/3e-3 for the failure-free run; the lr is tuned for the reference, not for the swap).
Why one block per stage: with identical neighbours CheckFree's average is well defined, and the
swap schedule costs least here. Swap schedule alone, steps to the reference loss at step 300
(``swap_study`` in the JSON, full run of 2026-11-23): 6 layers on 6 stages 310 vs 300 and 380 vs
290 (1.03x and 1.31x, two seeds), 8 on 8 stages 310 vs 290 (1.07x), 12 layers on 6 stages (two
blocks per stage) 410 vs 300 (1.37x). Two blocks per stage make the swap dearer, not cheaper; in
scratch runs the 12x6 cost fell to 1.00x at lr 1e-3, where the reference itself trains far slower.
Evaluation uses the normal path, the model a user deploys: a swap-trained model scores about the
same on the swapped path (after step 200: within 0.02 nats, on average 0.003-0.007 lower; 7 runs
measured), so evaluating the other path would move "steps to target" by a step or two of noise.

Strategies (all with the same checkpoint every K = 50 steps as the fallback the policy uses for
what the strategy cannot rebuild: edge stages under plain CheckFree, adjacent stages lost together):

- ``checkpoint``: every loss rolls the job back to the last checkpoint (the baseline).
- ``checkfree``: middle stages rebuilt from their neighbours (gradient-norm-weighted average).
- ``checkfree+``: the swap schedule; edge stages copied from their swap partner.
- ``mirror``: each stage rebuilt from the host-memory mirror its predecessor keeps (every step).

Within a seed every strategy sees the same failure draws (they depend on the seed and the
iteration); seeds differ in model init, data order and failures. The simulated clock charges one
step time per executed step and the interrupted part of a failed step; checkpoint writes and
recovery transfers are free on it (this favours checkpointing), and the swap schedule is charged
the normal step time (true for GPipe; :mod:`spotpipe.schedule.swap` measures 1F1B 20-27% longer).

It also measures CheckFree's omega question (``omega`` in the JSON): how often per-stage
gradient norms exceed ``train.grad_clip``, how far the neighbour weights are from 0.5 with the
pre-clip norms versus with per-stage clipped norms, and the validation loss right after a
middle stage is rebuilt with each weighting.

    python bench/convergence_under_failures.py --quick     # < 1 min
    python bench/convergence_under_failures.py             # 2 seeds, 3 rates: 27 min on 1 busy core

Writes bench/results/convergence_under_failures.json and .png (the PNG is gitignored).
"""

from __future__ import annotations

import argparse
import json
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
from spotpipe.runtime.inprocess.convergence import run_inprocess  # noqa: E402
from spotpipe.runtime.state.rules import checkfree_weights  # noqa: E402
from spotpipe.runtime.inprocess.local import LocalTrainer  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = ROOT / "configs" / "convergence.toml"
OUT = ROOT / "bench" / "results"
STRATEGIES = ("checkpoint", "checkfree", "checkfree+", "mirror")
PAPER = ("CheckFree paper (500M LLaMA, its Table 2): CheckFree+ reaches its target 1.38-1.69x faster in wall "
         "time than checkpointing")

# target_step T: the target is the failure-free val loss at step T; every run may commit up to
# cap_factor x T steps (that is also train.steps, the cosine-lr horizon, for every run) and execute
# iteration_factor x that many steps. swap_study: extra (layers, stages) cuts whose swap-alone cost is measured.
FULL = dict(layers=6, stages=6, d_model=64, heads=4, context=64, microbatches=2, batch=8, target_step=300,
            cap_factor=2.0, iteration_factor=3, lr=3e-3, warmup=20, eval_every=10, eval_batches=8, step_time_s=90.0,
            checkpoint_every=50, rates=(5.0, 10.0, 16.0), seeds=(0, 1), swap_study=((12, 6), (8, 8)))
QUICK = dict(layers=6, stages=6, d_model=32, heads=4, context=32, microbatches=2, batch=8, target_step=20,
             cap_factor=2.0, iteration_factor=3, lr=1e-2, warmup=4, eval_every=5, eval_batches=2, step_time_s=300.0,
             checkpoint_every=10, rates=(16.0,), seeds=(0,), swap_study=((12, 6),))


def _config(p: dict[str, Any], strategy: str, rate: float | None, seed: int, *, layers: int | None = None,
            stages: int | None = None) -> JobConfig:
    """configs/convergence.toml with the benchmark's sizes, strategy and failure rate on top.

    ``strategy="none"`` is the failure-free reference: plain CheckFree settings with no faults, no
    checkpoints and no mirrors, so it trains exactly like every strategy but CheckFree+ (no swap).
    """
    layers = p["layers"] if layers is None else layers
    stages = p["stages"] if stages is None else stages
    sets = [
        f"model.layers={layers}", f"model.d_model={p['d_model']}", f"model.heads={p['heads']}",
        f"model.context={p['context']}", f"pipeline.stages={stages}", f"pipeline.microbatches={p['microbatches']}",
        f"train.batch_size={p['batch']}", f"train.steps={p['steps']}", f"train.lr={p['lr']}",
        f"train.warmup_steps={p['warmup']}", f"train.eval_every={p['eval_every']}",
        f"train.eval_batches={p['eval_batches']}", f"train.seed={seed}", "run.name=convergence",
        f"ft.strategy={'checkfree' if strategy == 'none' else strategy}", "ft.mirror_every=1",
        f"ft.rate_step_time_s={p['step_time_s']}",
        f"train.checkpoint_every={p['checkpoint_every'] if strategy != 'none' else 0}",
    ]
    sets.append(f'ft.faults=["{rate:g}%/h"]' if rate is not None else "ft.faults=[]")
    return load_config(CONFIG, sets)


def _target(evals: list[list[float]], step: int) -> float:
    """Val loss of the failure-free run at its evaluation at ``step`` (the nearest one if none is exactly there)."""
    at = min(evals, key=lambda e: abs(e[0] - step))
    return float(at[3])


def _first_at(evals: list[list[float]], target: float) -> list[float] | None:
    return next((list(e) for e in evals if e[3] <= target), None)


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def swap_cost(p: dict[str, Any], token_file: Any, layers: int, stages: int, seed: int, log: Any,
              scratch: Path) -> dict[str, Any]:
    """Steps the swap schedule alone (no failures) needs to reach the normal run's loss at ``target_step``."""
    T, cap = p["target_step"], p["steps"]
    normal = run_inprocess(_config(p, "none", None, seed, layers=layers, stages=stages), token_file,
                           events=scratch / f"swapcost-{layers}x{stages}-normal.jsonl", max_iterations=T)
    target = _target([list(e) for e in normal.evals], T)
    swap = run_inprocess(_config(p, "checkfree+", None, seed, layers=layers, stages=stages), token_file,
                         events=scratch / f"swapcost-{layers}x{stages}-swap.jsonl", target_loss=target,
                         stop_at_target=True, max_iterations=cap)
    row = _swap_row(layers, stages, seed, target, normal.to_json(), swap.to_json(), normal.wall_seconds + swap.wall_seconds)
    log(f"swap cost {layers} layers on {stages} stages: normal reaches {target:.4f} at step {row['normal_steps']}, "
        f"swap at " + (f"step {row['swap_steps']} ({row['ratio']:.2f}x)" if row["swap_steps"] else f"- (not by step {cap})"))
    return row


def _swap_row(layers: int, stages: int, seed: int, target: float, normal: dict[str, Any], swap: dict[str, Any],
              cpu: float) -> dict[str, Any]:
    n_at, s_at = _first_at(normal["evals"], target), swap["target_at"]
    n_steps, s_steps = (int(n_at[0]) if n_at else None), (int(s_at[0]) if s_at else None)
    last = swap["evals"][-1] if swap["evals"] else None
    return {"layers": layers, "stages": stages, "blocks_per_stage": layers / stages, "seed": seed, "target": target,
            "normal_steps": n_steps, "swap_steps": s_steps,
            "ratio": s_steps / n_steps if s_steps and n_steps else None,
            "swap_val_at_cap": None if s_at or last is None else last[3],
            "normal_evals": normal["evals"], "swap_evals": swap["evals"], "cpu_seconds": cpu}


def omega_study(p: dict[str, Any], token_file: Any, seed: int, log: Any) -> dict[str, Any]:
    """Pre-clip vs per-stage-clipped omega: norm statistics and val loss right after a rebuild."""
    cfg = _config(p, "none", None, seed)
    clip = cfg.train.grad_clip
    tr = LocalTrainer(cfg, token_file)
    stats = {"steps": 0, "global_clip_active": 0, "stage_norm_above_clip": 0, "stage_norms": 0,
             "dev_preclip": [], "dev_stage_clipped": []}
    rebuilds: list[dict[str, Any]] = []
    T = p["target_step"]
    probe_steps = {T // 2, T} if T >= 4 else {T}
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
                    st = tr.state  # the rebuild the runtime does (StageState.install_checkfree)
                    st.view([i]).install_checkfree(st.view([i - 1]).blocks_flat(wa), st.view([i + 1]).blocks_flat(wb), 1.0)
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
    ap.add_argument("--quick", action="store_true", help="tiny model, one rate, one seed, < 1 min")
    ap.add_argument("--target-step", type=int, help="T: the target is the failure-free val loss at step T")
    ap.add_argument("--cap-factor", type=float, help="committed-step cap (and lr horizon) as a multiple of T")
    ap.add_argument("--step-time", type=float, help="seconds per step used to convert per-hour rates")
    ap.add_argument("--checkpoint-every", type=int, help="K: steps between checkpoints")
    ap.add_argument("--rates", type=str, help="per-hour stage-failure rates in percent, comma-separated")
    ap.add_argument("--seeds", type=str, help="run seeds (model, data and failures), comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models are fastest on 1)")
    ap.add_argument("--no-omega", action="store_true", help="skip the omega study")
    ap.add_argument("--no-swap-study", action="store_true", help="skip the swap cost of other layer/stage cuts")
    ap.add_argument("--out", type=Path, default=OUT / "convergence_under_failures.json")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.target_step:
        p["target_step"] = args.target_step
    if args.cap_factor:
        p["cap_factor"] = args.cap_factor
    if args.step_time:
        p["step_time_s"] = args.step_time
    if args.checkpoint_every:
        p["checkpoint_every"] = args.checkpoint_every
    if args.rates:
        p["rates"] = tuple(float(x) for x in args.rates.split(","))
    if args.seeds:
        p["seeds"] = tuple(int(x) for x in args.seeds.split(","))
    if args.no_swap_study:
        p["swap_study"] = ()
    p["steps"] = int(round(p["cap_factor"] * p["target_step"]))
    T, cap = p["target_step"], p["steps"]
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
    runs: list[dict[str, Any]] = []
    swap_rows: list[dict[str, Any]] = []
    targets: dict[int, float] = {}
    for seed in p["seeds"]:
        log(f"seed {seed}: failure-free reference, {T} steps (lr horizon {cap})")
        base = run_inprocess(_config(p, "none", None, seed), token_file, events=scratch / f"none-s{seed}.jsonl",
                             max_iterations=T)
        target = targets[seed] = _target([list(e) for e in base.evals], T)
        base_json = {**base.to_json(), "target": target, "target_at": _first_at([list(e) for e in base.evals], target)}
        runs.append({**base_json, "seed": seed, "rate_per_hour": 0.0, "strategy": "none"})
        swap = run_inprocess(_config(p, "checkfree+", None, seed), token_file, events=scratch / f"swap-only-s{seed}.jsonl",
                             target_loss=target, stop_at_target=True, max_iterations=cap)
        runs.append({**swap.to_json(), "seed": seed, "rate_per_hour": 0.0, "strategy": "checkfree+"})
        swap_rows.append(_swap_row(p["layers"], p["stages"], seed, target, base_json, swap.to_json(),
                                   base.wall_seconds + swap.wall_seconds))
        log(f"seed {seed}: target val loss {target:.4f} (step {T}); swap schedule alone: "
            + (f"step {swap.target_at[0]}" if swap.target_at else f"not reached by step {cap}"))
        for rate in p["rates"]:
            for strategy in STRATEGIES:
                res = run_inprocess(_config(p, strategy, rate, seed), token_file,
                                    events=scratch / f"{strategy}-{rate:g}-s{seed}.jsonl", target_loss=target,
                                    stop_at_target=True, max_iterations=p["iteration_factor"] * cap)
                runs.append({**res.to_json(), "seed": seed, "rate_per_hour": rate, "strategy": strategy})
                at = res.target_at
                log(f"seed {seed} {rate:4g}%/h {strategy:11s} failures {res.failures:3d} {res.recoveries} -> "
                    + (f"target at step {at[0]}, iteration {at[1]}, {at[2] / 3600:.2f} sim h" if at
                       else f"target not reached ({res.status}, {res.steps} steps, {res.iterations} iterations)"))
    for layers, stages in p["swap_study"]:
        swap_rows.append(swap_cost(p, token_file, layers, stages, p["seeds"][0], log, scratch))
    omega = None if args.no_omega else omega_study(p, token_file, p["seeds"][0], log)

    rows = _rows(runs)
    summary = _summary(rows, p)
    _print_tables(rows, summary, swap_rows, omega, p, targets)
    result = {
        "benchmark": "convergence_under_failures",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "spotpipe": __version__, "threads": args.threads,
                    "load_before": load_before, "load_after": os.getloadavg()},
        "params": {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
                   for k, v in p.items()},
        "seeds": list(p["seeds"]),
        "target_val_loss": targets,
        "target_rule": f"val loss of the failure-free run at step {T} (target_step); every run may commit up to "
                       f"{cap} steps (cap_factor x target_step, also the cosine-lr horizon of every run) and execute "
                       f"up to {p['iteration_factor'] * cap} steps",
        "clock": "simulated: step_time_s per executed step + the interrupted fraction of failed steps; checkpoint "
                 "writes and recovery transfers free (favours checkpointing); the swap schedule is charged the normal "
                 "step time (free under GPipe; spotpipe.schedule.swap measures 20-27% longer 1F1B steps at 6-8 stages)",
        "summary": summary,
        "rows": rows,
        "swap_study": swap_rows,
        "runs": runs,
        "omega": omega,
        "paper": PAPER,
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log(f"wrote {args.out}")
    _plot(runs, p, targets, args.out.with_suffix(".png"))
    return 0


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: steps, iterations and simulated hours to the target; speed-up = checkpoint time / time."""
    rows = []
    for r in runs:
        at = r["target_at"]
        ck = next((x for x in runs if x["seed"] == r["seed"] and x["rate_per_hour"] == r["rate_per_hour"]
                   and x["strategy"] == "checkpoint"), None)
        speedup = None
        if at and ck and ck["target_at"] and at[2] > 0 and r["rate_per_hour"] > 0:
            speedup = ck["target_at"][2] / at[2]
        rows.append({"seed": r["seed"], "rate_per_hour": r["rate_per_hour"], "strategy": r["strategy"],
                     "failures": r["failures"], "recoveries": r["recoveries"],
                     "steps_to_target": int(at[0]) if at else None,
                     "iterations_to_target": int(at[1]) if at else None,
                     "sim_hours_to_target": at[2] / 3600 if at else None,
                     "cpu_seconds": r["wall_seconds"], "speedup_vs_checkpoint": speedup,
                     "lost_steps": r["lost_steps"], "mirror_bytes": r["mirror_bytes"], "status": r["status"],
                     "steps_at_end": r["steps"], "iterations_at_end": r["iterations"],
                     "val_at_end": r["evals"][-1][3] if r["evals"] else None})
    return rows


def _summary(rows: list[dict[str, Any]], p: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (rate, strategy) over seeds: how many reached the target, medians, and the speed-up range."""
    out = []
    keys = [(0.0, "none"), (0.0, "checkfree+")] + [(r, s) for r in p["rates"] for s in STRATEGIES]
    for rate, strategy in keys:
        rs = [r for r in rows if r["rate_per_hour"] == rate and r["strategy"] == strategy]
        hit = [r for r in rs if r["steps_to_target"] is not None]
        sp = [r["speedup_vs_checkpoint"] for r in rs if r["speedup_vs_checkpoint"] is not None]
        out.append({"rate_per_hour": rate, "strategy": strategy, "seeds": len(rs), "reached": len(hit),
                    "median_failures": _median([r["failures"] for r in rs]),
                    "median_steps": _median([r["steps_to_target"] for r in hit]),
                    "median_iterations": _median([r["iterations_to_target"] for r in hit]),
                    "median_sim_hours": _median([r["sim_hours_to_target"] for r in hit]),
                    "median_speedup": _median(sp) if len(sp) == len(rs) else None,
                    "speedups": [r["speedup_vs_checkpoint"] for r in rs],
                    "min_speedup": min(sp) if sp and len(sp) == len(rs) else None,
                    "max_speedup": max(sp) if sp else None})
    return out


def _fmt(v: Any, fmt: str, width: int) -> str:
    return format(v, fmt).rjust(width) if v is not None else "-".rjust(width)


def _print_tables(rows: list[dict[str, Any]], summary: list[dict[str, Any]], swap_rows: list[dict[str, Any]],
                  omega: dict[str, Any] | None, p: dict[str, Any], targets: dict[int, float]) -> None:
    print()
    print(f"{p['layers']} layers on {p['stages']} stages, d_model {p['d_model']}; target = failure-free val loss at "
          f"step {p['target_step']} ({', '.join(f'seed {s}: {t:.4f}' for s, t in targets.items())}); step cap "
          f"{p['steps']}; step time {p['step_time_s']:g} s; checkpoint every {p['checkpoint_every']} steps")
    head = (f"{'seed':>4} {'rate/h':>6} {'strategy':11s} {'fail':>4} {'steps':>6} {'iters':>6} {'sim h':>7} "
            f"{'vs ckpt':>7} {'cpu s':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = _fmt(r["speedup_vs_checkpoint"], ".2f", 6) + ("x" if r["speedup_vs_checkpoint"] else " ")
        print(f"{r['seed']:>4d} {r['rate_per_hour']:>5g}% {r['strategy']:11s} {r['failures']:>4d} "
              f"{_fmt(r['steps_to_target'], 'd', 6)} {_fmt(r['iterations_to_target'], 'd', 6)} "
              f"{_fmt(r['sim_hours_to_target'], '.2f', 7)} {sp} {r['cpu_seconds']:>6.0f}")
    print()
    print(f"summary over {len(p['seeds'])} seed(s): medians over the seeds that reached the target; speed-up = "
          "checkpointing's simulated hours / the strategy's, per seed")
    head = (f"{'rate/h':>6} {'strategy':11s} {'reached':>7} {'fail':>5} {'steps':>6} {'iters':>6} {'sim h':>7} "
            f"{'median':>7} {'range':>13}")
    print(head)
    print("-" * len(head))
    for s in summary:
        rng = (f"{s['min_speedup']:.2f}-{s['max_speedup']:.2f}x" if s["min_speedup"] is not None
               else ("-" if s["max_speedup"] is None else f"<= {s['max_speedup']:.2f}x"))
        print(f"{s['rate_per_hour']:>5g}% {s['strategy']:11s} {s['reached']:>3d}/{s['seeds']:<3d} "
              f"{_fmt(s['median_failures'], 'g', 5)} {_fmt(s['median_steps'], 'g', 6)} {_fmt(s['median_iterations'], 'g', 6)} "
              f"{_fmt(s['median_sim_hours'], '.2f', 7)} {_fmt(s['median_speedup'], '.2f', 6)}"
              f"{'x' if s['median_speedup'] is not None else ' '} {rng:>13}")
    print(PAPER)
    print()
    print("swap schedule alone (no failures): steps to the normal run's val loss at step "
          f"{p['target_step']}, cap {p['steps']}")
    for s in swap_rows:
        print(f"  {s['layers']:>3d} layers / {s['stages']} stages (seed {s['seed']}): normal {s['normal_steps']}, swap "
              + (f"{s['swap_steps']} ({s['ratio']:.2f}x)" if s["swap_steps"] else
                 f"not reached (val {s['swap_val_at_cap']:.4f} at the cap vs target {s['target']:.4f})"))
    if omega:
        print(f"omega: global clip active in {omega['fraction_steps_global_clip_active']:.0%} of steps, per-stage norms above "
              f"grad_clip {omega['fraction_stage_norms_above_clip']:.0%}; mean |w-0.5| pre-clip "
              f"{omega['mean_abs_w_minus_half_preclip']:.3f} vs per-stage clipped {omega['mean_abs_w_minus_half_stage_clipped']:.3f}")
        for row in omega["rebuilds"]:
            print(f"  step {row['step']} stage {row['stage']}: val {row['val_before']:.4f} -> rebuilt pre-clip "
                  f"{row['val_after_preclip']:.4f} (w {row['w_prev_preclip']:.3f}), stage-clipped "
                  f"{row['val_after_stage_clipped']:.4f} (w {row['w_prev_stage_clipped']:.3f}), uniform {row['val_after_uniform']:.4f}")


def _plot(runs: list[dict[str, Any]], p: dict[str, Any], targets: dict[int, float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    seed = p["seeds"][0]
    target = targets[seed]
    rates = list(p["rates"])
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.2), squeeze=False)
    mine = [r for r in runs if r["seed"] == seed]
    base = next(r for r in mine if r["strategy"] == "none")
    swap = next((r for r in mine if r["strategy"] == "checkfree+" and r["rate_per_hour"] == 0.0), None)
    for ax, rate in zip(axes[0], rates):
        ax.plot([e[2] / 3600 for e in base["evals"]], [e[3] for e in base["evals"]], "k-", label="no failures")
        if swap is not None:
            ax.plot([e[2] / 3600 for e in swap["evals"]], [e[3] for e in swap["evals"]], "k--", lw=1,
                    label="swap schedule, no failures")
        for r in mine:
            if r["rate_per_hour"] == rate:
                ax.plot([e[2] / 3600 for e in r["evals"]], [e[3] for e in r["evals"]], marker=".", ms=3,
                        label=r["strategy"])
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.3f}")
        ax.set_title(f"{rate:g}% stage failures per hour (seed {seed})")
        ax.set_xlabel(f"simulated hours ({p['step_time_s']:g} s per step)")
        ax.set_ylabel("validation loss")
        lo = min(e[3] for e in base["evals"])
        ax.set_ylim(lo - 0.1, lo + 1.0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
