"""SkipPipe planning: simulated iteration time per variant, and how long the planner takes.

Headline: SkipPipe's own setting (``configs/skippipe-paper.toml``: 20 nodes over 12 Google Cloud
locations, stage groups [5, 3, 3, 3, 3, 3], 33% skip, one swap, 3 activations per node, the
reference simulator's cost constants). All four variants are planned on the same placement and
played in one run; the JSON reports their simulated times (``sim.*_s``: until the last
backward, the quantity SkipPipe's simulator reports; ``iteration_s`` adds the per-stage
all-reduce), their ratios, and, next to them, the values SkipPipe's code reports for its
committed schedule. ``full`` lets every stage-0 node feed its microbatches through full paths
(network-aware, the best of its coarsenings by simulation); ``full_dtfm_pipelines_s`` is the
baseline as DT-FM and SkipPipe's code run it (min-group-size fixed chains, extra stage-0 nodes
idle), reported next to it. Then the planner's run time on the same setting and on 64 nodes / 8 stages.
The load average is written next to every timed figure.

    python bench/skippipe_plan.py           # full search budgets (a few minutes on 2 cores)
    python bench/skippipe_plan.py --quick   # smaller budgets, under 2 minutes

Writes bench/results/skippipe_plan.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spotpipe import __version__  # noqa: E402
from spotpipe.config import JobConfig, load_config  # noqa: E402
from spotpipe.schedule.placement import PlacementProblem, held_karp, place_nodes, random_placement  # noqa: E402
from spotpipe.schedule.pathtime import play_paths  # noqa: E402
from spotpipe.sim.skipjob import PLACEMENT_EVALUATIONS, JobPlan, plan_job, skip_setting  # noqa: E402

CONFIG = ROOT / "configs" / "skippipe-paper.toml"
OUT = ROOT / "bench" / "results" / "skippipe_plan.json"

# What SkipPipe's own code reports for its committed 20-node schedule (gensyn-ai/skippipe,
# schedule.json at commit 7f20d8a: baseline-expected-time, random-expected-time,
# nonca-expected-time, ca-expected-time; GCMAscore), and what its simulator
# (schedulers/com_sym.py run_simulation) gives when it replays that file's own paths and
# partitions with the constants committed in create_schedule.py (8 sequences per microbatch),
# measured once outside this repository. Their DT-FM objective value of the committed partition
# uses their matching code, whose padding for unequal groups ignores two stage-0 nodes.
REFERENCE = {
    "reported": {"full_s": 79.93971963540922, "random_s": 48.915682705668054,
                 "skippipe_nca_s": 35.43481420147051, "skippipe_s": 33.31379002209655,
                 "placement_objective": 21.590300540879163},
    "replayed_with_committed_constants": {"full_s": 154.2028027193757, "random_s": 87.16626475429263,
                                          "skippipe_nca_s": 75.80595624426377, "skippipe_s": 68.55379002209654},
    "partition": [[0, 3, 4, 10, 11], [15, 8, 14], [1, 9, 6], [16, 12, 13], [5, 18, 7], [17, 2, 19]],
}


def load() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return (round(a, 2), round(b, 2), round(c, 2))


def scaled_config(nodes_per_stage: int, stages: int, microbatches: int) -> JobConfig:
    """The geo setting with ``stages`` groups of ``nodes_per_stage`` nodes, round-robin over the
    12 locations."""
    cfg = load_config(CONFIG)
    locations = ("Belgium", "Canada", "Germany", "Iowa", "Japan", "LA", "NL", "Oregon", "Singapore", "Taiwan",
                 "London", "Australia")
    n = nodes_per_stage * stages
    seqs = 8
    return replace(
        cfg,
        model=replace(cfg.model, layers=4 * stages),
        pipeline=replace(cfg.pipeline, stages=stages, stage_nodes=(nodes_per_stage,) * stages, microbatches=microbatches),
        train=replace(cfg.train, batch_size=nodes_per_stage * microbatches * seqs),
        network=replace(cfg.network, locations=tuple(locations[i % len(locations)] for i in range(n))),
    ).validate()


def dtfm_pipelines_s(job: JobPlan, cfg: JobConfig) -> float:
    """The full-pipeline baseline as DT-FM and SkipPipe's code run it: ``P = min group size``
    fixed chains of one node per stage (greedy: each chain takes the next stage's node nearest to
    its tail; origins are the ``P`` stage-0 nodes nearest to stage 1), the other stage-0 nodes
    idle, and the same microbatches in all spread evenly over the chains."""
    groups = job.placement.groups
    costs = job.setting.costs
    p = min(len(g) for g in groups)
    origins = sorted(groups[0], key=lambda o: min(costs.message_s[o][x] for x in groups[1]))[:p]
    chains: list[list[int]] = [[o] for o in origins]
    for g in groups[1:]:
        free = list(g)
        for chain in chains:
            best = min(free, key=lambda x, tail=chain[-1]: costs.message_s[tail][x])
            free.remove(best)
            chain.append(best)
    total = len(groups[0]) * cfg.pipeline.microbatches
    mine = [q % p for q in range(total)]
    timing = play_paths([chains[i][0] for i in mine], [chains[i][1:] for i in mine], costs, cfg.pipeline.node_memory)
    return timing.makespan_s


def variants_figures(cfg: JobConfig, budget: int) -> dict[str, Any]:
    before = load()
    job = plan_job(cfg, CONFIG.parent, budget=budget)
    after = load()
    v = job.variants
    sim = {f"{name.replace('-', '_')}_s": r.played.pipeline_s for name, r in v.items()}
    sim["ratio_vs_full"] = v["skippipe"].played.pipeline_s / v["full"].played.pipeline_s
    sim["ratio_vs_random"] = v["skippipe"].played.pipeline_s / v["random"].played.pipeline_s
    sim["iteration_with_allreduce_s"] = {name: r.played.iteration_s for name, r in v.items()}
    sim["full_dtfm_pipelines_s"] = dtfm_pipelines_s(job, cfg)
    sim["ratio_vs_full_dtfm_pipelines"] = v["skippipe"].played.pipeline_s / sim["full_dtfm_pipelines_s"]
    pl = job.placement
    return {
        "sim": sim,
        "planner_seconds": job.planner_s,
        "search_seconds": {name: r.plan.seconds for name, r in v.items()},
        "budget": budget,
        "placement": {"groups": [list(g) for g in pl.groups], "objective_s": pl.objective, "seconds": pl.seconds,
                      "method": pl.method, "evaluations": pl.evaluations},
        "loadavg_before": before, "loadavg_after": after,
    }


def reference_formula(problem: PlacementProblem, groups: list[list[int]]) -> float:
    """The DT-FM objective as SkipPipe's scheduler computes it (``schedulers/gcma.py``): the same
    data-parallel term, and a closed tour over symmetric group edges where the edge between
    groups ``i < j`` is the bottleneck matching from group ``i`` with sender compute, and only the
    first ``len(group j)`` nodes of a larger group ``i`` (in list order) are matched (its padding
    frees the rest). Our own formula matches every node of the smaller group into the larger."""
    s = len(groups)
    edge = [[0.0] * s for _ in range(s)]
    for i in range(s):
        for j in range(i + 1, s):
            src = groups[i][: len(groups[j])] if len(groups[i]) > len(groups[j]) else groups[i]
            edge[i][j] = edge[j][i] = problem.bottleneck(src, groups[j])
    dp = max(problem.dp_cost(g) for g in groups)
    return dp + 2 * held_karp(edge)[0]


def placement_figures(cfg: JobConfig) -> dict[str, Any]:
    """DT-FM objective of our search, random partitions, and the reference's committed partition."""
    setting = skip_setting(cfg, CONFIG.parent)
    problem = PlacementProblem(setting.costs.message_s, setting.costs.forward_s, setting.sizes)
    before = load()
    t0 = time.perf_counter()
    ours = place_nodes(problem, 0, max_evaluations=PLACEMENT_EVALUATIONS)
    seconds = time.perf_counter() - t0
    randoms = [random_placement(problem, seed).objective for seed in range(20)]
    ref_groups: list[list[int]] = [list(g) for g in REFERENCE["partition"]]  # type: ignore[union-attr]
    reference = problem.score(ref_groups)[0]
    ours_groups = [list(g) for g in ours.groups]
    # their formula depends on the order of the stage-0 list: give ours its best order
    ours_ref_formula = min(
        reference_formula(problem, [list(first) + [x for x in ours_groups[0] if x not in first], *ours_groups[1:]])
        for first in itertools.permutations(ours_groups[0], min(len(g) for g in ours_groups[1:]) if len(ours_groups) > 1 else 1)
    )
    return {
        "their_formula": {"ours": ours_ref_formula, "reference_partition": reference_formula(problem, ref_groups),
                          "reference_reported": REFERENCE["reported"]["placement_objective"]},
        "ours_objective_s": ours.objective, "ours_seconds": seconds, "ours_method": ours.method,
        "random_objective_s_mean": sum(randoms) / len(randoms), "random_objective_s_best": min(randoms),
        "reference_partition_objective_s": reference,
        "ratio_ours_vs_reference_partition": ours.objective / reference,
        "reference_reported_objective": REFERENCE["reported"]["placement_objective"],
        "loadavg_before": before, "loadavg_after": load(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller search budgets (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    budget = 1500 if args.quick else 6000
    cfg = load_config(CONFIG)
    out: dict[str, Any] = {"bench": "skippipe_plan", "quick": args.quick, "version": __version__,
                           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                       "python": platform.python_version()},
                           "config": str(CONFIG.relative_to(ROOT)), "reference": REFERENCE}
    print(f"20 nodes, [5,3,3,3,3,3], budget {budget} ...", flush=True)
    geo = variants_figures(cfg, budget)
    out.update({"sim": geo["sim"], "planner_seconds": geo["planner_seconds"], "geo20": geo})
    out["placement"] = placement_figures(cfg)
    print("64 nodes, 8 stages ...", flush=True)
    big = scaled_config(8, 8, 7)
    out["nodes64_stages8"] = variants_figures(big, budget // 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    rep = REFERENCE["reported"]
    print(f"{'variant':14s} {'ours s':>8s} {'ref reported':>12s} {'ref replayed':>12s}")
    for key in ("full_s", "random_s", "skippipe_nca_s", "skippipe_s"):
        print(f"{key[:-2]:14s} {geo['sim'][key]:8.2f} {rep[key]:12.2f} "
              f"{REFERENCE['replayed_with_committed_constants'][key]:12.2f}")
    print(f"{'full (DT-FM: 3 fixed pipelines)':14s} {geo['sim']['full_dtfm_pipelines_s']:8.2f}")
    print(f"skippipe / full {geo['sim']['ratio_vs_full']:.3f}, / DT-FM pipelines "
          f"{geo['sim']['ratio_vs_full_dtfm_pipelines']:.3f}, / random {geo['sim']['ratio_vs_random']:.3f}; "
          f"planner {geo['planner_seconds']:.1f} s (load {geo['loadavg_after'][0]}); 64 nodes / 8 stages: planner "
          f"{out['nodes64_stages8']['planner_seconds']:.1f} s, skippipe / full "
          f"{out['nodes64_stages8']['sim']['ratio_vs_full']:.3f} (load {out['nodes64_stages8']['loadavg_after'][0]})")
    p = out["placement"]
    print(f"placement objective: ours {p['ours_objective_s']:.2f} s in {p['ours_seconds']:.1f} s, reference partition "
          f"{p['reference_partition_objective_s']:.2f} s, random mean {p['random_objective_s_mean']:.2f} s; their formula: "
          f"ours {p['their_formula']['ours']:.2f}, theirs {p['their_formula']['reference_partition']:.2f} "
          f"(reported {p['their_formula']['reference_reported']:.2f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
