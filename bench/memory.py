"""The largest model each memory plan trains under one per-rank budget, found by running it.

Three plans (:data:`spotpipe.planner.PLANS`): 1F1B, 1F1B with full recompute, and chronos with
Chronos-Recomp (each rank's longest-lived chunk recomputed) and the AdamW moments offloaded to
host memory. For each, the memory model (:func:`spotpipe.planner.evaluate_plan`) proposes the
most layers at a fixed width; then the model is *trained* for a few steps on the real executor
(every rank in this process, :class:`~spotpipe.runtime.inprocess.player.PipelineTrainer` with the
measured-memory accounting of :mod:`spotpipe.runtime.pipeline.meter`), and the depth goes down
while any rank's measured peak is over the budget and up while one more layer still fits. The
size is the parameter count of the largest depth that ran within the budget.

Throughput: at the depth 1F1B fits, the three plans train in turns, round by round in this one
run, and each plan's tokens/s is its median over the rounds. Every rank runs in this one process
and takes turns with the others, so the figure is the compute each plan does per token (recompute
costs one more forward of the recomputed chunks, offload the moves of the moments), not the
pipeline's overlap across machines (the simulator prices that: ``spotpipe schedule memory``).

Writes ``bench/results/memory.json`` with ``size_ratio_vs_1f1b``, ``size_ratio_vs_1f1b_recompute``
and ``throughput_ratio_vs_1f1b``, the per-plan figures, the machine and the load average at the
start and the end. ``--quick`` uses a smaller budget and model (under 3 minutes on 2 idle cores).

    python bench/memory.py [--quick] [--budget-mb N] [--rounds N] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from spotpipe import __version__  # noqa: E402
from spotpipe.config import JobConfig, load_config  # noqa: E402
from spotpipe.data.tokens import TokenFile, prepare_tokens  # noqa: E402
from spotpipe.model.partition import model_shapes  # noqa: E402
from spotpipe.planner import PLANS, Plan, evaluate_plan, plan_config  # noqa: E402
from spotpipe.runtime.inprocess.player import PipelineTrainer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BENCH_PLANS = ("1f1b", "1f1b+recompute", "chronos+recompute+offload")


def tokens(work: Path) -> TokenFile:
    """tinyshakespeare when the shared data is there, else this file's own text."""
    source = SHAKESPEARE if SHAKESPEARE.is_file() else Path(__file__)
    return prepare_tokens([source], work / "tokens")


def params_of(cfg: JobConfig) -> int:
    """Parameters of the job's model."""
    return sum(s.params for s in model_shapes(cfg.model, 1))


DEVICE = "cpu"  # --device


def measured_peak(cfg: JobConfig, corpus: TokenFile, steps: int = 2) -> tuple[int, list[int]]:
    """Train ``steps`` steps (the optimizer state exists from the first update on) and return the
    largest measured peak over ranks of the last step, and every rank's. On CUDA, running out of
    the capped memory counts as an infinite peak."""
    try:
        trainer = PipelineTrainer(cfg, corpus, device=DEVICE, measure_memory=True)
        for _ in range(steps):
            trainer.train_step()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return 1 << 62, []
    peaks = [m.peak for m in trainer.last_memory]
    del trainer
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return max(peaks), peaks


def largest_depth(base: JobConfig, plan: Plan, budget: float, corpus: TokenFile, log: list[dict]) -> dict:
    """The most layers ``plan`` trains within ``budget`` bytes per rank, measured."""
    cfg = plan_config(base, plan, budget)
    predicted = evaluate_plan(cfg, plan, budget, timing=False).max_layers
    chunks = cfg.pipeline.stages * (2 if plan.schedule == "chronos" else 1)

    def at(layers: int) -> JobConfig:
        return plan_config(replace(base, model=replace(base.model, layers=layers)), plan, budget)

    def fits(layers: int) -> tuple[bool, int]:
        peak, per_rank = measured_peak(at(layers), corpus)
        cfg = at(layers)
        log.append({"plan": plan.name, "layers": layers, "recompute": cfg.pipeline.recompute,
                    "recompute_chunks": list(cfg.pipeline.recompute_chunks), "measured_peak_bytes": per_rank,
                    "fits": peak <= budget})
        print(f"  {plan.name:<26} {layers:>4} layers: measured peak {peak / 1e6:8.2f} MB "
              f"({'fits' if peak <= budget else 'over'})", flush=True)
        return peak <= budget, peak

    layers = max(predicted, chunks)
    ok, peak = fits(layers)
    while not ok and layers > chunks:
        layers -= 1
        ok, peak = fits(layers)
    if not ok:
        return {"plan": plan.name, "predicted_layers": predicted, "layers": 0, "params": 0, "measured_peak_bytes": peak}
    best = layers
    best_peak = peak
    for _ in range(4):  # the prediction is within a few percent: a few more layers at most
        ok, peak = fits(best + 1)
        if not ok:
            break
        best, best_peak = best + 1, peak
    return {"plan": plan.name, "predicted_layers": predicted, "layers": best, "params": params_of(at(best)),
            "measured_peak_bytes": best_peak}


def throughput(base: JobConfig, plans: list[Plan], corpus: TokenFile, rounds: int, steps: int,
               budget: float) -> dict[str, list[float]]:
    """tokens/s of each plan at ``base``'s size (recomputing what ``budget`` needs there), the plans
    taking turns round by round."""
    out: dict[str, list[float]] = {p.name: [] for p in plans}
    for r in range(rounds):
        for plan in plans if r % 2 == 0 else list(reversed(plans)):  # alternate the order too
            cfg = plan_config(base, plan, budget)
            trainer = PipelineTrainer(cfg, corpus, device=DEVICE)
            trainer.train_step()  # warm-up (allocations, AdamW state)
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            rate = steps * cfg.train.batch_size * cfg.model.context / (time.perf_counter() - t0)
            out[plan.name].append(rate)
            print(f"  round {r + 1} {plan.name:<26} {rate:9.0f} tokens/s (load {os.getloadavg()[0]:.2f})", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller budget and model: under 3 minutes on 2 idle cores")
    ap.add_argument("--budget-mb", type=float, default=None, help="per-rank budget in MB (1e6 bytes); default 60, --quick 24")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 3, --quick 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json", help="result JSON")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model trains; on cuda the process is capped at ranks x budget "
                    "(torch.cuda.set_per_process_memory_fraction), so the budget is real")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(1)
    budget_mb = args.budget_mb if args.budget_mb is not None else (24.0 if args.quick else 60.0)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    width = 128 if args.quick else 256
    base = load_config(None, [f"model.d_model={width}", "model.heads=4", "model.context=64", "model.layers=8",
                              "pipeline.stages=4", "pipeline.microbatches=8", "train.batch_size=16",
                              "train.warmup_steps=2"])
    budget = budget_mb * 1e6
    if DEVICE == "cuda":  # every rank plays in this process: the cap is the ranks' budgets together
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, base.pipeline.stages * budget / total))
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    plans = [p for p in PLANS if p.name in BENCH_PLANS]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = tokens(Path(tmp))
        print(f"budget {budget_mb:g} MB per rank; d_model {width}, context 64, 4 ranks, 8 microbatches of 2 sequences "
              f"(load {load_start[0]:.2f})", flush=True)
        log: list[dict] = []
        sizes = {p.name: largest_depth(base, p, budget, corpus, log) for p in plans}
        at_1f1b = replace(base, model=replace(base.model, layers=max(sizes["1f1b"]["layers"], 4)))
        print(f"throughput at {at_1f1b.model.layers} layers (the depth 1F1B fits):", flush=True)
        rates = throughput(at_1f1b, plans, corpus, rounds, 2 if args.quick else 4, budget)
    median = {name: statistics.median(r) for name, r in rates.items()}

    def ratio(a: str, b: str) -> float | None:
        return sizes[a]["params"] / sizes[b]["params"] if sizes[b]["params"] else None

    result = {
        "budget_bytes_per_rank": budget,
        "config": {"d_model": width, "heads": 4, "context": 64, "stages": 4, "microbatches": 8, "batch_size": 16},
        "plans": {name: {**sizes[name], "tokens_per_s": median[name], "tokens_per_s_rounds": rates[name]} for name in sizes},
        "size_ratio_vs_1f1b": ratio("chronos+recompute+offload", "1f1b"),
        "size_ratio_vs_1f1b_recompute": ratio("chronos+recompute+offload", "1f1b+recompute"),
        "throughput_ratio_vs_1f1b": median["chronos+recompute+offload"] / median["1f1b"],
        "throughput_ratio_1f1b_recompute_vs_1f1b": median["1f1b+recompute"] / median["1f1b"],
        "note": "sizes measured by training (every rank in one process, the workers' accounting); throughput "
                "in one process counts compute per token, not pipeline overlap across machines",
        "runs": log,
        "quick": args.quick,
        "device": DEVICE,
        "wall_s": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "spotpipe": __version__, "load_start": load_start,
                    "load_end": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'plan':<26} {'layers':>6} {'params':>11} {'peak MB':>8} {'tokens/s':>9}")
    for name in sizes:
        s = sizes[name]
        print(f"{name:<26} {s['layers']:>6} {s['params']:>11,} {s['measured_peak_bytes'] / 1e6:>8.2f} {median[name]:>9.0f}")
    print(f"size ratio vs 1f1b {result['size_ratio_vs_1f1b']}, vs 1f1b+recompute {result['size_ratio_vs_1f1b_recompute']}, "
          f"throughput ratio vs 1f1b {result['throughput_ratio_vs_1f1b']:.3f} (load {load_start[0]:.2f} -> "
          f"{result['machine']['load_end'][0]:.2f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
