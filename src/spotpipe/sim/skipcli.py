"""``spotpipe schedule plan --config FILE``: plan SkipPipe paths for a job and compare variants.

Prints the placement (nodes and locations per stage, DT-FM objective against a random
placement), the predicted iteration time of every variant (``full``, ``random``,
``skippipe-nca``, ``skippipe``) with its ratio to ``full`` and ``random``, the visits per stage,
and the paths of the chosen variant as one table per origin node. ``--json`` prints the same as
JSON; ``--trace OUT.json`` writes the Chrome trace of the chosen variant's played iteration,
``--csv OUT.csv`` its lowered node schedule (``schedule validate`` checks it).
A progress bar shows the searches on stderr. Pure Python: never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from spotpipe.cliargs import int_in
from spotpipe.config import load_config
from spotpipe.fsutil import check_output, write_output
from spotpipe.progressline import ProgressLine
from spotpipe.schedule.render import chrome_trace
from spotpipe.schedule.skippipe import VARIANTS
from spotpipe.sim.skipjob import JobPlan, plan_job, plan_report


def register_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plan`` to the ``schedule`` command group.

    Args:
        sub: The ``schedule`` group's sub-command action.
    """
    plan = sub.add_parser(
        "plan",
        help="plan SkipPipe paths (placement, partial and reordered paths) and compare variants",
        description="Place the nodes of pipeline.stage_nodes on stages from the network (DT-FM "
        "objective), plan every microbatch's path for the variants full, random, skippipe-nca and "
        "skippipe, lower and validate each, and print their simulated iteration times.",
    )
    plan.add_argument("--config", type=Path, required=True, metavar="FILE",
                      help="job config TOML with pipeline.stage_nodes, pipeline.skip_ratio, [network] and [sim]")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a config value, e.g. --set pipeline.max_swaps=0 (repeatable)")
    plan.add_argument("--variant", choices=VARIANTS, default="skippipe",
                      help="variant whose paths, trace and CSV are shown (default: %(default)s)")
    plan.add_argument("--budget", type=int_in(1, 10_000_000), default=None, metavar="N",
                      help="simulated plans the collision-aware search scores (default: pipeline.plan_budget)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--trace", type=Path, default=None, metavar="OUT.json",
                      help="write a Chrome trace of the chosen variant's iteration (open in ui.perfetto.dev)")
    plan.add_argument("--csv", type=Path, default=None, metavar="OUT.csv",
                      help="write the chosen variant's lowered node schedule as CSV (check it with `schedule validate "
                      "OUT.csv --node-memory N`)")
    plan.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    plan.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from spotpipe.planner import resolved  # the planner builds on the simulator

    cfg = resolved(load_config(args.config, args.overrides))
    for path, flag in ((args.trace, "--trace"), (args.csv, "--csv")):
        if path is not None:
            check_output(path, flag)
    bar = ProgressLine("plan", 100, "%", enabled=not args.no_progress)
    phases: dict[str, int] = {v: i + 1 for i, v in enumerate(VARIANTS)}
    phases["placement"] = 0

    def progress(what: str, share: float) -> None:  # placement and every variant: equal shares of 100%
        bar.update(round(100 * (phases.get(what, 0) + min(1.0, share)) / len(phases)))

    try:
        job = plan_job(cfg, args.config.parent, budget=args.budget, progress=progress)
    finally:
        bar.close()
    report = plan_report(job)
    if args.trace is not None:
        chosen = job.variants[args.variant]
        trace = chrome_trace(chosen.schedule, timeline=chosen.played.timeline)
        write_output(args.trace, json.dumps(trace), "--trace")
    if args.csv is not None:
        write_output(args.csv, job.variants[args.variant].schedule.to_csv(), "--csv")
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_plan(job, report, args.variant))
    if not args.json:
        for path in (args.trace, args.csv):
            if path is not None:
                print(f"wrote {path}")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def format_plan(job: JobPlan, report: dict[str, Any], variant: str) -> str:
    """The human-readable plan: placement, variants, visits, and the paths of ``variant``.

    Args:
        job: The plan (its variants' paths are shown).
        report: :func:`spotpipe.sim.skipjob.plan_report` of ``job``.
        variant: Variant whose paths are shown (``full``, ``random``, ``skippipe-nca``, ``skippipe``).

    Returns:
        The text to print (times in seconds).
    """
    pl = report["placement"]
    out = [f"placement ({pl['method']}, {pl['evaluations']} partitions scored, {pl['seconds']:.1f} s): DT-FM "
           f"objective {pl['objective_s']:.2f} s (data-parallel {pl['dp_s']:.2f} + 2 x pipeline {pl['pp_s']:.2f}); "
           f"random placement {pl['random_objective_s']:.2f} s\n"]
    out.append(_table(["stage", "nodes", "locations"],
                      [[str(s), " ".join(map(str, g)), " ".join(loc)] for s, (g, loc) in enumerate(zip(pl["groups"], pl["locations"]))]))
    out.append(f"\npaths visit k = {report['k']} of {len(pl['groups'])} stages; "
               f"planner {report['planner_seconds']:.1f} s in all\n")
    vs = report["variants"]
    full = vs.get("full", {}).get("pipeline_s")
    rnd = vs.get("random", {}).get("pipeline_s")
    rows = []
    for v, r in vs.items():
        rows.append([v, f"{r['pipeline_s']:.2f}", f"{r['iteration_s']:.2f}",
                     f"{r['pipeline_s'] / full:.3f}" if full else "-", f"{r['pipeline_s'] / rnd:.3f}" if rnd else "-",
                     " ".join(map(str, r["stage_visits"])), f"{r['search_seconds']:.1f}"])
    out.append("\n" + _table(["variant", "pipeline s", "iteration s", "vs full", "vs random", "visits per stage",
                             "search s"], rows))
    out.append("(pipeline s: until the last backward, as SkipPipe's simulator reports it; iteration s adds the "
               "per-stage all-reduce)\n")
    chosen = job.variants.get(variant)
    if chosen is not None:
        stage_of = {n: s for s, g in enumerate(job.placement.groups) for n in g}
        by_origin: dict[int, list[list[str]]] = {}
        counts: dict[int, int] = {}
        for j, p in enumerate(chosen.plan.paths):
            q = counts.get(p.origin, 0)
            counts[p.origin] = q + 1
            fin = chosen.plan.timing.finish_s[j]
            by_origin.setdefault(p.origin, []).append(
                [str(q), "0 " + " ".join(map(str, p.stages)) + " 0",
                 f"{p.origin} " + " ".join(map(str, p.nodes)) + f" {p.origin}", f"{fin:.2f}"])
        for origin, rows in by_origin.items():
            out.append(f"\n{variant}: paths of origin node {origin} ({job.setting.network.location(origin)}, stage "
                       f"{stage_of[origin]})\n")
            out.append(_table(["microbatch", "stages", "nodes", "done at s"], rows))
    return "".join(out)
