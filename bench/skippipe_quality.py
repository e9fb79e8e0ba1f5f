"""SkipPipe quality: what partial paths cost in validation loss, at equal steps and at equal emulated time.

Issue 12, "Quality". Every run trains the same model on the same data in one process, with
:class:`spotpipe.runtime.inprocess.paths.NodePathTrainer` (the single-process reference of a node
run, which the integration tests hold equal to the multi-process runtime), playing the node plan
the controller would make (:func:`spotpipe.runtime.control.nodeplan.plan_nodes`).

Setting (chosen so that 25 / 33 / 50% skipped give distinct k):

* tinyshakespeare, byte tokens (prepared into a temporary token dir), 5% validation split.
* Model: 12 blocks, d_model 128, 4 heads, context 128; 12 stages of one block each, one node
  per stage (``stage_nodes`` all 1), so k = 12 - round(r x 12) = 12 / 9 / 8 / 6 stages per path
  for r = 0 / 0.25 / 0.33 / 0.5.
* ``check_sizes``: 1 stage-0 node x microbatches x (k - 1) must be a multiple of S - 1 = 11, so
  11 microbatches per iteration of 1 sequence each (``train.batch_size = 11``).
* Network: the GCP-12 matrix (``configs/networks/gcp-12-locations.csv``), one node in each of the
  12 locations; same-location links 1 ms, 2 GiB/s. [sim] constants are SkipPipe's simulator's
  (as ``configs/skippipe-paper.toml``): ``layer_forward_s = 0.055``, ``backward_ratio = 1.5``,
  ``head_ratio = 0.25``, ``message_overhead_s = 0.35``, ``compute_gap_s = 0.13``. So the emulated
  iteration seconds are those of the paper's regime, not of this CPU.
* Paths: ``full`` for skip 0; ``skippipe`` (collision-aware search, at most one adjacent swap,
  3 activations per node, as the paper) otherwise. "+full" runs play full paths every 10th
  iteration (``pipeline.full_every = 10``, as the reference implementation).
* The learning-rate schedule (warm-up 30, cosine to 10%) and AdamW are the defaults; the same
  seed, so every run starts from the same weights and reads the same samples in the same order.

Emulated wall time: iteration ``i`` costs ``plan.predicted_s["train"]`` or ``["full"]``
(whichever schedule it plays), the simulator's iteration time of that plan on the emulated
network. Validation loss is measured every ``--eval-every`` steps on the same first windows of the
validation split. "Equal emulated time" is the shortest total of all runs (linear interpolation of
each curve); "time to target" is the emulated time at which each curve first reaches the worst
final loss of all runs. Caveat: every run's learning rate follows the same 400-step schedule, so
at the equal-time point the longer runs are still at a higher learning rate (not annealed) while
the shortest has finished its decay; a run given only that time budget would anneal sooner.

Order: the runs are alternated, one block of ``--eval-every`` steps per run in the order of
``CONFIGS`` then the next block, so machine load spreads evenly over them (the figures that matter
are deterministic; only the measured CPU seconds depend on the load).

Then skipped-stage inference: for the models trained on full pipelines, with 25% and with 50%
skipped (with and without full steps; ``--infer`` names others), the validation
perplexity of the full model and of random subsets of ``round(f x 12)`` stages out of 1..11 left
out, f = 25% and 50% (3 and 6 stages), the same subsets and validation windows for every model
(:func:`spotpipe.runtime.inprocess.evaluate.evaluate_fraction`, the code of ``spotpipe eval``).

Writes bench/results/skippipe_quality.json and bench/results/skippipe_quality.png (``--out``
names the JSON; the PNG goes next to it).

    python bench/skippipe_quality.py --quick   # 2 runs x 16 steps, tiny evaluations: under 60 s
    python bench/skippipe_quality.py           # 7 runs x 400 steps: ~1300 CPU s (1 thread);
                                               # measured 1923 s wall at load average 2-6.5 on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from spotpipe import __version__  # noqa: E402
from spotpipe.config import JobConfig, apply_overrides  # noqa: E402
from spotpipe.schedule.skippipe import path_stages  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
MATRIX = ROOT / "configs" / "networks" / "gcp-12-locations.csv"
STAGES = 12
LOCATIONS = ["Belgium", "Canada", "Germany", "Iowa", "Japan", "LA", "NL", "Oregon", "Singapore", "Taiwan",
             "London", "Australia"]  # one node per location, SkipPipe's order
COMMON = [
    "model.layers=12", "model.d_model=128", "model.heads=4", "model.context=128",
    f"pipeline.stages={STAGES}", f"pipeline.stage_nodes=[{','.join(['1'] * STAGES)}]",
    "pipeline.microbatches=11", "train.batch_size=11",
    "pipeline.node_memory=3", "pipeline.plan_budget=1000",
    f"network.matrix='{MATRIX}'", "network.locations=[" + ",".join(f'"{x}"' for x in LOCATIONS) + "]",
    "network.latency_ms=1.0", "network.bandwidth_gbps=17.179869184",
    "sim.layer_forward_s=0.055", "sim.backward_ratio=1.5", "sim.head_ratio=0.25",
    "sim.message_overhead_s=0.35", "sim.compute_gap_s=0.13",
    "run.plot=false", "run.progress=false", "ft.strategy=none", "train.checkpoint_every=0",
]
#: name -> (skip ratio, full_every); skip 0 plays full paths every iteration, so it has no "+full" twin.
CONFIGS: dict[str, tuple[float, int]] = {
    "skip0": (0.0, 0),
    "skip25": (0.25, 0), "skip25+full": (0.25, 10),
    "skip33": (0.33, 0), "skip33+full": (0.33, 10),
    "skip50": (0.5, 0), "skip50+full": (0.5, 10),
}
QUICK_CONFIGS = ("skip0", "skip50+full")
FRACTIONS = (0.25, 0.5)
#: Models evaluated with skipped stages by default (those trained): full pipelines, 25% and 50% skipped.
INFER = ("skip0", "skip25", "skip50", "skip50+full")


def job_config(name: str, steps: int, token_dir: Path, max_swaps: int) -> JobConfig:
    """The job of run ``name`` (see :data:`CONFIGS`).

    Args:
        name: A key of :data:`CONFIGS`.
        steps: ``train.steps`` (the learning-rate schedule's length).
        token_dir: The prepared token dir.
        max_swaps: ``pipeline.max_swaps`` of the partial-path runs.

    Returns:
        The validated config.
    """
    skip, full_every = CONFIGS[name]
    paths = ["pipeline.paths=full", "pipeline.max_swaps=0"] if skip == 0 else \
        ["pipeline.paths=skippipe", f"pipeline.max_swaps={max_swaps}"]
    return apply_overrides(JobConfig(), COMMON + paths + [
        f"pipeline.skip_ratio={skip}", f"pipeline.full_every={full_every}", f"train.steps={steps}",
        f"data.path='{token_dir}'"])


def path_summary(schedule: Any) -> dict[str, Any]:
    """Model stages each microbatch visits, how many paths swap two stages, and visits per stage.

    Args:
        schedule: A node schedule (``chunk_stage`` set).

    Returns:
        ``{"paths": [[stage, ...], ...], "swapped": int, "visits": [int, ...]}``.
    """
    cs = schedule.chunk_stage
    paths = [[cs[x] for x in schedule.path(j)[:-1]] for j in range(schedule.num_microbatches)]
    visits = [sum(s in p for p in paths) for s in range(STAGES)]
    return {"paths": paths, "swapped": sum(p != sorted(p) for p in paths), "visits": visits}


@dataclass
class Run:
    """One training run in progress.

    Attributes:
        name: Its :data:`CONFIGS` key.
        cfg: The job.
        trainer: Its :class:`~spotpipe.runtime.inprocess.paths.NodePathTrainer`.
        plan: The node plan.
        emulated_s: Emulated seconds so far.
        curve: ``{"step", "emulated_s", "val_loss"}`` per evaluation (step = steps done).
        train_loss: Training loss of every step.
        full_steps: Steps that played full paths.
        cpu_s: CPU seconds this process spent training the run (evaluations excluded).
    """

    name: str
    cfg: JobConfig
    trainer: Any
    plan: Any
    emulated_s: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    full_steps: int = 0
    cpu_s: float = 0.0

    def train(self, steps: int) -> None:
        """Take ``steps`` steps, adding each iteration's predicted seconds.

        Args:
            steps: Steps to take.
        """
        start = time.process_time()
        for _ in range(steps):
            full = self.trainer.schedule_of_step(self.trainer.step) is self.plan.full and self.plan.full is not self.plan.train
            self.emulated_s += self.plan.predicted_s["full" if full else "train"]
            self.full_steps += int(full)
            self.train_loss.append(self.trainer.train_step().loss)
        self.cpu_s += time.process_time() - start

    def evaluate(self, windows: int) -> None:
        """Append the validation loss on the first ``windows`` windows to the curve.

        Args:
            windows: Validation windows.
        """
        loss = self.trainer.validation_loss(windows)
        self.curve.append({"step": self.trainer.step, "emulated_s": self.emulated_s, "val_loss": loss})


def at_time(run: Run, t: float) -> float:
    """The run's validation loss at emulated time ``t`` (linear between evaluations).

    Args:
        run: A finished run.
        t: Emulated seconds, at most the run's total.

    Returns:
        The interpolated loss.
    """
    return float(np.interp(t, [c["emulated_s"] for c in run.curve], [c["val_loss"] for c in run.curve]))


def time_to(run: Run, target: float) -> float:
    """Emulated seconds at which the run's curve first reaches ``target`` (linear between evaluations).

    Args:
        run: A finished run.
        target: A validation loss.

    Returns:
        The seconds, or ``inf`` if never reached.
    """
    pts = [(c["emulated_s"], c["val_loss"]) for c in run.curve]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return math.inf


def plot(runs: dict[str, Run], path: Path, title: str) -> None:
    """Two panels of validation loss: vs step and vs emulated seconds.

    Args:
        runs: The finished runs.
        path: The PNG to write.
        title: The figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {0.0: "black", 0.25: "tab:blue", 0.33: "tab:green", 0.5: "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for name, run in runs.items():
        skip, full_every = CONFIGS[name]
        style = {"color": colors.get(skip, "gray"), "linestyle": "--" if full_every else "-", "label": name,
                 "marker": "." if len(run.curve) < 15 else None}
        axes[0].plot([c["step"] for c in run.curve], [c["val_loss"] for c in run.curve], **style)
        axes[1].plot([c["emulated_s"] / 3600 for c in run.curve], [c["val_loss"] for c in run.curve], **style)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("emulated wall time (hours, simulator on the GCP-12 network)")
    axes[0].set_ylabel("validation loss (nats / byte)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def skipped_inference(runs: dict[str, Run], names: list[str], windows: int, subsets: int, seed: int) -> dict[str, Any]:
    """Perplexity with 25% and 50% of the stages left out, for each named run's final model.

    Args:
        runs: The finished runs.
        names: Which runs to evaluate.
        windows: Validation windows per evaluation (the same for every model and subset).
        subsets: Random stage subsets per fraction (the same for every model).
        seed: Seed of the subsets' draw.

    Returns:
        Run name -> ``{"full_ppl", "full_loss", "fractions": {"25": {...}, "50": {...}}}``.
    """
    from spotpipe.runtime.inprocess.evaluate import evaluate_fraction
    from spotpipe.runtime.inprocess.restore import TrainedRun

    # Stage 0 holds chunk 0 (embedding and first block) and chunk S (the head); stage s holds chunk s.
    stage_chunks = ((0, STAGES),) + tuple((s,) for s in range(1, STAGES))
    out: dict[str, Any] = {}
    for name in names:
        r = runs[name]
        tr = TrainedRun(Path(tempfile.gettempdir()), r.cfg, r.trainer.step - 1, r.trainer, stage_chunks)
        entry: dict[str, Any] = {"fractions": {}}
        for f in FRACTIONS:
            ev = evaluate_fraction(tr, f, subsets, seed, windows)
            entry["full_loss"], entry["full_ppl"] = ev.full.loss, ev.full.perplexity
            entry["fractions"][f"{round(f * 100)}"] = {
                "fraction": f, "stages_skipped": ev.count, "possible_sets": ev.possible,
                "sets": [list(s.skipped) for s in ev.sets], "ppl": [s.perplexity for s in ev.sets],
                "mean_ppl": ev.mean_perplexity, "std_ppl": ev.std_perplexity,
                "min_ppl": ev.min_perplexity, "max_ppl": ev.max_perplexity,
                "rel_increase_vs_own_full": ev.mean_perplexity / ev.full.perplexity - 1,
            }
        entry["windows"] = windows
        out[name] = entry
        print(f"  {name}: full ppl {entry['full_ppl']:.3f}; " + "; ".join(
            f"{k}% skipped {v['mean_ppl']:.3f} +- {v['std_ppl']:.3f} ({v['rel_increase_vs_own_full'] * 100:+.1f}%)"
            for k, v in entry["fractions"].items()), flush=True)
    return out


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON).

    Args:
        value: Nested dicts, lists and scalars.

    Returns:
        The same structure.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the figures depend on."""
    import matplotlib
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "matplotlib": matplotlib.__version__, "spotpipe": __version__}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 runs x 16 steps, small evaluations (under 60 s)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default 400, quick 16)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default 20, quick 8)")
    parser.add_argument("--val-windows", type=int, default=0, help="validation windows per curve point (default 110, quick 11)")
    parser.add_argument("--infer-windows", type=int, default=0, help="validation windows per inference evaluation (default 220, quick 11)")
    parser.add_argument("--subsets", type=int, default=0, help="random stage subsets per skip fraction (default 6, quick 2)")
    parser.add_argument("--max-swaps", type=int, default=1, help="pipeline.max_swaps of the SkipPipe runs (default 1, as the paper)")
    parser.add_argument("--configs", default="", help="comma-separated run names (default all; quick: skip0,skip50+full)")
    parser.add_argument("--infer", default="", help="comma-separated runs to evaluate with skipped stages (default all trained)")
    parser.add_argument("--data", type=Path, default=DATA, help="the text to train on (tinyshakespeare)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "skippipe_quality.json")
    args = parser.parse_args(argv)
    steps = args.steps or (16 if args.quick else 400)
    eval_every = args.eval_every or (8 if args.quick else 20)
    val_windows = args.val_windows or (11 if args.quick else 110)
    infer_windows = args.infer_windows or (11 if args.quick else 220)
    subsets = args.subsets or (2 if args.quick else 6)
    names = [n for n in args.configs.split(",") if n] or list(QUICK_CONFIGS if args.quick else CONFIGS)
    infer = [n for n in args.infer.split(",") if n] or [n for n in INFER if n in names] or names
    for n in names + infer:
        if n not in CONFIGS:
            parser.error(f"unknown run {n!r}; known: {', '.join(CONFIGS)}")
    if not args.data.is_file():
        parser.error(f"{args.data} is absent (tinyshakespeare input.txt)")

    import torch

    torch.set_num_threads(1)
    from spotpipe.data.tokens import TokenFile, prepare_tokens
    from spotpipe.runtime.control.nodeplan import plan_nodes
    from spotpipe.runtime.inprocess.paths import NodePathTrainer

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="spotpipe-skippipe-quality-")
    token_dir = Path(tmp.name) / "tinyshakespeare"
    prepare_tokens([args.data], token_dir, "byte", progress=False)
    tokens = TokenFile(token_dir)

    runs: dict[str, Run] = {}
    for n in names:
        cfg = job_config(n, steps, token_dir, args.max_swaps)
        plan = plan_nodes(cfg, ROOT / "configs")
        runs[n] = Run(n, cfg, NodePathTrainer(cfg, tokens, plan), plan)
        k = path_stages(STAGES, cfg.pipeline.skip_ratio)
        print(f"{n}: k = {k} of {STAGES} stages, predicted {plan.predicted_s['train']:.2f} s per iteration "
              f"(full paths {plan.predicted_s['full']:.2f} s)", flush=True)
    print(f"order: blocks of {eval_every} steps, round-robin over {', '.join(names)}; {steps} steps each", flush=True)

    from tqdm import tqdm

    for r in runs.values():
        r.evaluate(val_windows)
    with tqdm(total=steps * len(runs), desc="training", unit="step", file=sys.stderr, mininterval=5) as bar:
        done = 0
        while done < steps:
            block = min(eval_every, steps - done)
            for r in runs.values():
                r.train(block)
                r.evaluate(val_windows)
                bar.update(block)
            done += block
    train_s = time.perf_counter() - t0
    load_mid = os.getloadavg()

    horizon = min(r.emulated_s for r in runs.values())
    target = max(r.curve[-1]["val_loss"] for r in runs.values())
    base = runs.get("skip0")
    rows: dict[str, Any] = {}
    for n, r in runs.items():
        skip, full_every = CONFIGS[n]
        rows[n] = {
            "skip_ratio": skip, "full_every": full_every, "k": path_stages(STAGES, skip),
            "overrides": [
                f"pipeline.skip_ratio={skip}", f"pipeline.full_every={full_every}",
                f"pipeline.paths={r.cfg.pipeline.paths}", f"pipeline.max_swaps={r.cfg.pipeline.max_swaps}"],
            "predicted_s": dict(r.plan.predicted_s), "full_steps": r.full_steps, "emulated_s": r.emulated_s,
            "final_val_loss": r.curve[-1]["val_loss"], "val_loss_at_equal_time": at_time(r, horizon),
            "time_to_target_s": time_to(r, target), "cpu_s": r.cpu_s, "cpu_s_per_step": r.cpu_s / steps,
            "train_plan": path_summary(r.plan.train), "curve": r.curve, "train_loss": r.train_loss,
        }
        if base is not None:
            rows[n]["final_val_loss_vs_skip0"] = rows[n]["final_val_loss"] - base.curve[-1]["val_loss"]
            rows[n]["val_loss_at_equal_time_vs_skip0"] = rows[n]["val_loss_at_equal_time"] - at_time(base, horizon)

    print(f"\nvalidation loss (nats/byte, {val_windows} windows of {runs[names[0]].cfg.model.context} bytes) after "
          f"{steps} steps; equal emulated time = {horizon / 3600:.2f} h (the shortest run's total); "
          f"target = {target:.3f} (worst final loss)")
    print(f"{'run':<12} {'k':>2} {'s/iter':>7} {'full it':>7} {'total h':>7} {'val@step':>9} {'val@time':>9} "
          f"{'h to tgt':>8} {'cpu s/step':>10}")
    for n, row in rows.items():
        print(f"{n:<12} {row['k']:>2} {row['predicted_s']['train']:>7.2f} {row['full_steps']:>7} "
              f"{row['emulated_s'] / 3600:>7.2f} {row['final_val_loss']:>9.4f} {row['val_loss_at_equal_time']:>9.4f} "
              f"{row['time_to_target_s'] / 3600:>8.2f} {row['cpu_s_per_step']:>10.3f}")
    print(f"load average before {load_before[0]:.2f}, after training {load_mid[0]:.2f}; training {train_s:.0f} s", flush=True)

    print(f"\nskipped-stage inference ({infer_windows} windows, {subsets} random subsets of stages 1..{STAGES - 1} "
          f"per fraction, the same for every model):", flush=True)
    inference = skipped_inference(runs, infer, infer_windows, subsets, seed=0)
    if "skip0" in inference:
        ref = inference["skip0"]["full_ppl"]
        for n, e in inference.items():
            for v in e["fractions"].values():
                v["rel_increase_vs_skip0_full"] = v["mean_ppl"] / ref - 1
    print("what we see at 50% of the stages skipped (mean perplexity over the subsets vs the same model's full perplexity): "
          + ", ".join(f"{n}-trained {e['fractions']['50']['rel_increase_vs_own_full'] * 100:+.1f}%" for n, e in inference.items()))
    print("paper (SkipPipe, Blagoev et al. 2025): about 7% perplexity lost with half the model skipped at inference, "
          "for SkipPipe-trained models")
    load_after = os.getloadavg()
    seconds = time.perf_counter() - t0
    print(f"load average before {load_before[0]:.2f} / {load_before[1]:.2f} (1 / 5 min), after "
          f"{load_after[0]:.2f} / {load_after[1]:.2f}; {seconds:.0f} s in all")

    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, png, f"tinyshakespeare, 12 stages x 1 block, 11 microbatches, GCP-12 network; {steps} steps "
         f"(dashed: full paths every 10th step)")
    out = {
        "benchmark": "skippipe_quality",
        "quick": args.quick,
        "setting": {"common_overrides": COMMON, "data": str(args.data), "stages": STAGES, "locations": LOCATIONS,
                    "steps": steps, "eval_every": eval_every, "val_windows": val_windows,
                    "infer_windows": infer_windows, "subsets": subsets, "max_swaps": args.max_swaps,
                    "order": f"round-robin blocks of {eval_every} steps over {names}",
                    "equal_time_s": horizon, "target_val_loss": target},
        "runs": rows,
        "inference": inference,
        "paper_reference": {"skip_half_ppl_increase": 0.07, "source": "SkipPipe, Blagoev, Chen, Ersoy 2025"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": list(load_before), "loadavg_after_training": list(load_mid),
                    "loadavg_after": list(load_after)},
        "versions": versions(),
        "seconds": seconds,
        "training_seconds": train_s,
    }
    args.out.write_text(json.dumps(finite(out), indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out} and {png}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
