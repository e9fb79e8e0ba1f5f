"""``spotpipe reliability analyze | plan | simulate | validate | report``.

Durations accept ``60s``, ``5m``, ``2h``, ``1d`` or plain seconds. Heavy modules (numpy,
matplotlib) are imported inside the commands so ``spotpipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotpipe.cliargs import float_in, int_in
from spotpipe.errors import SpotpipeError
from spotpipe.progressline import ProgressLine

if TYPE_CHECKING:
    from spotpipe.reliability.models import Plan
    from spotpipe.reliability.taxonomy import Taxonomy

_FORMAT_CHOICES = ("auto", "sacct", "acme", "events", "lanl", "bamboo")


MAX_FAILURES = 10_000_000  # default --max-failures: about 4 s and 1 GiB at most
_GPUS = int_in(1, 10**9)
_RF = float_in(0.0, 1e6, lo_open=True)
_TRIALS = int_in(2, 10**6)
_MAX_FAILURES_HELP = ("refuse work of more than N simulated failures (all trials together), which takes long "
                      "and much memory; the estimate is printed (default %(default)s)")


def register(subparsers: Any) -> None:
    """Add the ``reliability`` command group to the top-level parser.

    Args:
        subparsers: The top-level parser's sub-command action (``add_subparsers()``).
    """
    group = subparsers.add_parser(
        "reliability",
        help="failure rates, MTTF, ETTR and checkpoint planning from traces and event logs",
        description="Reliability analytics (Kokolis et al., Meta 2025): measure traces, plan checkpointing.",
    )
    sub = group.add_subparsers(dest="reliability_command", metavar="SUBCOMMAND")
    group.set_defaults(func=lambda args: _help(group))

    p = sub.add_parser(
        "analyze",
        help="measure job traces, failure traces and spotpipe event logs",
        description="Read job traces (Slurm sacct -P, AcmeTrace CSV), failure traces (LANL, Bamboo spot) and "
        "spotpipe events.jsonl; print failure rates, r_f, MTTF by job size, shares by state and failure "
        "category, fits of the time between failures and, for event logs, ETTR and the time lost.",
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="sacct -P output, AcmeTrace CSV, events.jsonl, LANL CSV, Bamboo trace")
    _trace_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser(
        "plan",
        help="MTTF, ETTR and the best checkpoint interval for a job size",
        description="Closed-form planning for a job of --gpus (or --nodes) at a failure rate --rf (or --mttf): "
        "MTTF, Meta's first-order ETTR and the exact renewal ETTR at --interval, the best checkpoint "
        "interval (and Young's and Daly's), and the ETTR of checkpoint-free recovery.",
    )
    _job_options(p)
    p.add_argument("--interval", default="1h", help="checkpoint interval to evaluate, or 'best' (default 1h)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "simulate",
        help="Monte Carlo ETTR of a long job with confidence intervals",
        description="Simulate --trials jobs of --wall wall time step by step under exponential, Weibull or "
        "trace-replayed failures, with checkpoint/restart and checkpoint-free recovery; print ETTR with a "
        "95%% confidence interval, the spread between jobs and where the time went.",
    )
    _job_options(p)
    p.add_argument("--interval", default="best", help="checkpoint interval, or 'best' (default)")
    p.add_argument("--failures", choices=("exponential", "weibull"), default="exponential",
                   help="distribution of the time between failures, with mean = the job's MTTF (default exponential)")
    p.add_argument("--shape", type=float_in(0.05, 20.0), default=0.7,
                   help="Weibull shape in [0.05, 20]; < 1: failures come in bursts (default 0.7)")
    p.add_argument("--trace", help="replay failures from a Bamboo or LANL trace instead")
    p.add_argument("--trace-name", help="which system of a LANL trace (e.g. 'LANL system 20')")
    p.add_argument("--policy", choices=("checkpoint", "free", "both"), default="both",
                   help="recovery to simulate: checkpoint/restart, checkpoint-free, or both (default both)")
    p.add_argument("--wall", default="30d", help="job wall time (default 30d)")
    p.add_argument("--trials", type=_TRIALS, default=200, help="simulated jobs, 2..1000000 (default 200)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="random seed (default 0)")
    p.add_argument("--max-failures", type=int_in(1, 10**12), default=MAX_FAILURES, metavar="N", help=_MAX_FAILURES_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "validate",
        help="Monte Carlo vs the closed-form ETTR over a grid",
        description="Simulate a grid of job sizes, checkpoint intervals, write and restart times and compare "
        "the Monte Carlo ETTR with Meta's first-order formula and the exact renewal form: where does the "
        "closed form hold?",
    )
    p.add_argument("--rf", type=_RF, default=6.5, help="failures per 1000 node-days (default 6.5)")
    p.add_argument("--wall", default="30d", help="simulated job length (default 30d)")
    p.add_argument("--trials", type=_TRIALS, default=48, help="simulated jobs per grid point, 2..1000000 (default 48)")
    p.add_argument("--max-failures", type=int_in(1, 10**12), default=MAX_FAILURES, metavar="N", help=_MAX_FAILURES_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "report",
        help="HTML page with MTTF, ETTR and failure-interval plots",
        description="Write one HTML page: the plan for a job size, MTTF vs job size, ETTR vs checkpoint "
        "interval (closed forms and Monte Carlo points), the time between failures and the analysis of "
        "every trace given.",
    )
    p.add_argument("traces", nargs="*", metavar="TRACE",
                   help="job traces, failure traces or events.jsonl to analyse and plot (optional)")
    _trace_options(p)
    _job_options(p, gpus_per_node=False)
    p.add_argument("--interval", default="1h", help="checkpoint interval to evaluate (default 1h)")
    p.add_argument("--trials", type=_TRIALS, default=64, help="Monte Carlo jobs per plotted point, 2..1000000 (default 64)")
    p.add_argument("--max-failures", type=int_in(1, 10**12), default=MAX_FAILURES, metavar="N", help=_MAX_FAILURES_HELP)
    p.add_argument("-o", "--output", default="reliability_report.html", help="HTML file to write (default reliability_report.html)")
    p.set_defaults(func=_cmd_report)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _trace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=_FORMAT_CHOICES, default="auto", help="trace format (default: detect)")
    p.add_argument("--rules", help="taxonomy rules file (TOML), tried before the defaults")
    p.add_argument("--count", help="categories counted toward r_f (default hardware,infrastructure)")
    p.add_argument("--gpus-per-node", type=int_in(1, 1024), default=8, help="GPUs per node, 1..1024 (default 8)")
    p.add_argument("--buckets", default="1,2,8,16,64,256,1024,4096", help="GPU-count bucket edges")
    p.add_argument("--min-intervals", type=int_in(2, 10**9), default=50,
                   help="fewest intervals between failures for a fit, >= 2 (default 50)")


def _job_options(p: argparse.ArgumentParser, gpus_per_node: bool = True) -> None:
    if gpus_per_node:  # the report parser already has it from the trace options
        p.add_argument("--gpus-per-node", type=int_in(1, 1024), default=8, help="GPUs per node, 1..1024 (default 8)")
    p.add_argument("--gpus", type=_GPUS, help="GPUs in the job, 1..1000000000")
    p.add_argument("--nodes", type=_GPUS, help="nodes in the job (instead of --gpus), 1..1000000000")
    p.add_argument("--rf", type=_RF, help="failures per 1000 node-days, in (0, 1e6] (Meta reports 6.5)")
    p.add_argument("--mttf", help="job MTTF instead of --rf (e.g. 2h)")
    p.add_argument("--ckpt-write", default="60s", help="checkpoint write time w (default 60s)")
    p.add_argument("--restart", default="5m", help="restart overhead u0 (default 5m)")
    p.add_argument("--recovery", default="30s", help="checkpoint-free recovery time (default 30s)")
    p.add_argument("--recovery-from", help="use the mean recovery time measured in this events.jsonl")
    p.add_argument("--step", default="10s", help="training step time; a failure loses the step in flight")
    p.add_argument("--penalty", default="0s", help="checkpoint-free: progress lost per failure (default 0s)")


def _taxonomy(args: argparse.Namespace) -> Taxonomy:
    from spotpipe.reliability.taxonomy import load_taxonomy, with_failure_categories

    tax = load_taxonomy(args.rules)
    return with_failure_categories(tax, args.count) if args.count else tax


def _buckets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SpotpipeError(f"--buckets {text!r}: use comma-separated GPU counts like 1,8,64") from None
    if not values or any(not 1 <= v <= 10**9 for v in values):
        raise SpotpipeError(f"--buckets {text!r}: GPU counts must be in 1..1000000000")
    return values


def _analyses(args: argparse.Namespace) -> list[Any]:
    from spotpipe.reliability.analysis import analyze_path

    tax = _taxonomy(args)
    buckets = _buckets(args.buckets)
    return [
        analyze_path(path, args.format, tax, args.gpus_per_node, buckets, args.min_intervals)
        for path in args.traces
    ]


def _cmd_analyze(args: argparse.Namespace) -> int:
    from spotpipe.reliability.analysis import analysis_to_json, render_analysis

    results = _analyses(args)
    if args.json:
        print(json.dumps({"files": [analysis_to_json(a) for a in results]}, indent=2))
    else:
        print("\n\n".join(render_analysis(a) for a in results))
    return 0


def _job_size(args: argparse.Namespace) -> tuple[int, int]:
    """(gpus, gpus_per_node) from --gpus or --nodes."""
    gpn = args.gpus_per_node
    if gpn is None or gpn <= 0:
        raise SpotpipeError(f"--gpus-per-node must be > 0, got {gpn}")
    if args.gpus is not None and args.nodes is not None:
        raise SpotpipeError("give --gpus or --nodes, not both")
    if args.nodes is not None:
        if args.nodes <= 0:
            raise SpotpipeError(f"--nodes must be > 0, got {args.nodes}")
        return args.nodes * gpn, gpn
    if args.gpus is None:
        raise SpotpipeError("give the job size with --gpus N (or --nodes N)")
    if args.gpus <= 0:
        raise SpotpipeError(f"--gpus must be > 0, got {args.gpus}")
    return args.gpus, gpn


def _rf(args: argparse.Namespace, nodes: float, required: bool = True) -> float | None:
    from spotpipe.reliability.units import SECONDS_PER_HOUR, parse_duration

    if args.rf is not None and args.mttf is not None:
        raise SpotpipeError("give --rf or --mttf, not both")
    if args.mttf is not None:
        mttf_s = parse_duration(args.mttf, "--mttf")
        if mttf_s <= 0:
            raise SpotpipeError("--mttf must be > 0")
        rf = 1000.0 * 24.0 / (nodes * mttf_s / SECONDS_PER_HOUR)
        if not 0 < rf <= 1e6:
            raise SpotpipeError(f"--mttf {args.mttf} of a {nodes:g}-node job means r_f = {rf:.3g} failures per 1000 "
                                "node-days; it must be in (0, 1e6]")
        return rf
    if args.rf is None:
        if required:
            raise SpotpipeError("give --rf (failures per 1000 node-days, e.g. 6.5) or --mttf")
        return None
    if not args.rf > 0:
        raise SpotpipeError(f"--rf must be > 0 failures per 1000 node-days, got {args.rf}")
    return float(args.rf)


def _recovery(args: argparse.Namespace) -> float:
    from spotpipe.reliability.runs import read_runs
    from spotpipe.reliability.units import parse_duration

    if not args.recovery_from:
        return parse_duration(args.recovery, "--recovery")
    runs, _ = read_runs(args.recovery_from)
    times = [t for r in runs for t in r.recovery_times]
    if not times:
        raise SpotpipeError(f"--recovery-from {args.recovery_from}: no recovery_finished events with 'seconds'")
    return sum(times) / len(times)


def _make_plan(args: argparse.Namespace, rf: float, gpus: int, gpn: int) -> Plan:
    from spotpipe.reliability.models import optimal_interval_exact, make_plan
    from spotpipe.reliability.units import parse_duration, rate_per_second

    write = parse_duration(args.ckpt_write, "--ckpt-write")
    restart = parse_duration(args.restart, "--restart")
    if args.interval == "best":  # the exact optimum: right at any failure rate
        best = optimal_interval_exact(write, restart, rate_per_second(gpus / gpn, rf))
        if best is None:
            raise SpotpipeError("--interval best: no optimum with a zero --ckpt-write; give an interval")
        interval = best
    else:
        interval = parse_duration(args.interval, "--interval")
        if interval <= 0:
            raise SpotpipeError("--interval must be > 0")
    return make_plan(
        gpus=gpus,
        gpus_per_node=gpn,
        rf=rf,
        write_s=write,
        restart_s=restart,
        interval_s=interval,
        recovery_s=_recovery(args),
        step_s=parse_duration(args.step, "--step"),
        penalty_s=parse_duration(args.penalty, "--penalty"),
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    gpus, gpn = _job_size(args)
    rf = _rf(args, gpus / gpn)
    assert rf is not None
    plan = _make_plan(args, rf, gpus, gpn)
    from spotpipe.reliability.models import plan_to_json, render_plan

    print(json.dumps(plan_to_json(plan), indent=2) if args.json else render_plan(plan))
    return 0


def _load_replay(path: str, name: str | None) -> Any:
    from spotpipe.reliability.failure_traces import read_bamboo, read_lanl
    from spotpipe.reliability.traces import detect_format

    fmt = detect_format(path)
    if fmt == "bamboo":
        return read_bamboo(path)[0]
    if fmt != "lanl":
        raise SpotpipeError(f"--trace {path}: replay needs a Bamboo spot trace or the LANL failure CSV, not {fmt}")
    systems = read_lanl(path)[0]
    names = [t.name for t in systems]
    chosen = [t for t in systems if t.name == name]
    if not chosen:
        what = "--trace-name is needed for a LANL trace" if name is None else f"--trace-name {name!r} not found"
        raise SpotpipeError(f"{what}: pick one of {', '.join(repr(n) for n in names)}")
    return chosen[0]


def _cmd_simulate(args: argparse.Namespace) -> int:
    from spotpipe.reliability import montecarlo as mc
    from spotpipe.reliability.units import SECONDS_PER_HOUR, parse_duration, rate_per_second

    gpus, gpn = _job_size(args)
    nodes = gpus / gpn
    wall = parse_duration(args.wall, "--wall")
    failures: mc.FailureModel
    if args.trace:
        trace = _load_replay(args.trace, args.trace_name)
        failures = mc.TraceReplay(trace, int(round(nodes)))
        hits = float(sum(min(1.0, nodes / max(p, 1.0)) for p in trace.pool))
        if hits == 0:
            raise SpotpipeError(f"--trace {args.trace}: no events to replay")
        rf = hits / (nodes * trace.duration_s / 86400.0) * 1000.0
    else:
        rf_value = _rf(args, nodes)
        assert rf_value is not None
        rf = rf_value
        mttf = 1.0 / rate_per_second(nodes, rf)
        if args.failures == "weibull":
            failures = mc.Weibull(mttf, args.shape)
        else:
            failures = mc.Exponential(mttf)
    plan = _make_plan(args, rf, gpus, gpn)
    step = plan.step_s
    policies: list[mc.Policy] = []
    if args.policy in ("checkpoint", "both"):
        policies.append(mc.CheckpointRestart(plan.interval_s, plan.write_s, plan.restart_s))
    if args.policy in ("free", "both"):
        policies.append(mc.CheckpointFree(plan.recovery_s, plan.penalty_s))
    cost = mc.estimate_cost(failures, wall, args.trials, len(policies))
    mc.check_cost(cost, args.max_failures,
                  f"reliability simulate ({args.trials} trials x {len(policies)} polic{'ies' if len(policies) > 1 else 'y'} "
                  f"of {wall / 86400:.4g} days at MTTF {plan.mttf_hours:.3g} h)")
    bar = ProgressLine("reliability simulate", args.trials * len(policies), "jobs", enabled=cost.seconds > 2.0)
    results = []
    for k, pol in enumerate(policies):
        offset = k * args.trials

        def report(done: int, offset: int = offset) -> None:
            bar.update(offset + done)

        results.append(mc.simulate(failures, pol, wall, step, args.trials, args.seed, gpus, progress=report))
    bar.close()
    if args.json:
        payload = {
            "job": {"gpus": gpus, "nodes": nodes, "rf": rf, "mttf_hours": plan.mttf_hours, "wall_s": wall},
            "interval_s": plan.interval_s,
            "results": [dict(r.__dict__, goodput_gpu_hours=r.goodput_gpu_hours) for r in results],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(f"job: {gpus} GPUs ({nodes:g} nodes), {wall / 86400:.3g} days, failures {failures.label}")
    print(f"effective r_f {rf:.4g} per 1000 node-days -> MTTF {plan.mttf_hours:.3g} h")
    for r, pol in zip(results, policies):
        detail = (
            f"interval {plan.interval_s / 60:.1f} min, w {plan.write_s:g} s, u0 {plan.restart_s:g} s"
            if isinstance(pol, mc.CheckpointRestart)
            else f"recovery {plan.recovery_s:g} s, penalty {plan.penalty_s:g} s"
        )
        print(
            f"{r.policy} ({detail}): ETTR {r.ettr_mean:.4f} (95% CI {r.ettr_ci95[0]:.4f}-{r.ettr_ci95[1]:.4f}; "
            f"jobs p5-p95 {r.ettr_p05:.4f}-{r.ettr_p95:.4f}), {r.failures_mean:.1f} failures per job; "
            f"lost: restart {r.restart_fraction:.3f}, checkpoints {r.checkpoint_fraction:.3f}, "
            f"work {r.lost_work_fraction:.3f}; goodput {r.goodput_gpu_hours or 0.0:,.0f} GPU-h "
            f"of {gpus * wall / SECONDS_PER_HOUR:,.0f}"
        )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from spotpipe.reliability.units import parse_duration
    from spotpipe.reliability.validation import compare_grid, default_grid, summarize

    from spotpipe.reliability import montecarlo as mc
    from spotpipe.reliability.units import rate_per_second

    wall = parse_duration(args.wall, "--wall")
    if wall <= 0:
        raise SpotpipeError("--wall must be > 0")
    grid = default_grid()
    total = sum(
        mc.estimate_cost(mc.Exponential(1.0 / rate_per_second(nodes, args.rf)), wall, args.trials).failures
        for nodes, _, _, _ in grid
    )
    largest = max(mc.estimate_cost(mc.Exponential(1.0 / rate_per_second(n, args.rf)), wall, args.trials).largest_chunk
                  for n, _, _, _ in grid)
    cost = mc.Cost(total, largest)
    mc.check_cost(cost, args.max_failures, f"reliability validate ({len(grid)} grid points x {args.trials} trials)")
    bar = ProgressLine("reliability validate", len(grid), "grid points", enabled=cost.seconds > 2.0)
    points = compare_grid(grid, rf=args.rf, wall_s=wall, trials=args.trials, progress=bar.update)
    bar.close()
    summary = summarize(points)
    if args.json:
        print(json.dumps({"summary": summary.__dict__, "points": [
            dict(p.__dict__, error_first_order=p.error_first_order, error_exact=p.error_exact) for p in points
        ]}, indent=2))
        return 0
    print("nodes  interval  write  restart   load  first-order   exact      MC     err(1st)  err(exact)")
    for p in sorted(points, key=lambda q: q.load):
        print(
            f"{p.nodes:>5} {p.interval_s:>8.0f}s {p.write_s:>5.0f}s {p.restart_s:>6.0f}s {p.load:>7.3f} "
            f"{p.first_order:>9.4f} {p.exact:>9.4f} {p.mc:>8.4f} {100 * p.error_first_order:>8.2f}% "
            f"{100 * p.error_exact:>8.2f}%"
        )
    print(
        f"first-order model vs Monte Carlo: max error {100 * summary.max_error_valid:.2f}% over the "
        f"{summary.valid_points} points with N r_f (u0 + dt/2) <= {summary.limit}"
    )
    if summary.smallest_load_over_3pct is not None:
        print(
            f"it exceeds 3% from N r_f (u0 + dt/2) = {summary.smallest_load_over_3pct:.3g}: failures during "
            "restarts, redone work and checkpoint writes are second-order terms the model drops"
        )
    print(f"exact renewal form vs Monte Carlo: max error {100 * summary.max_error_exact:.2f}% (points with ETTR > 0.05)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from spotpipe.fsutil import check_output
    from spotpipe.reliability import montecarlo as mc
    from spotpipe.reliability.report import ETTR_POINTS, ettr_plot_wall, write_report
    from spotpipe.reliability.units import rate_per_second

    check_output(args.output, "--output")
    gpus, gpn = _job_size(args) if (args.gpus or args.nodes) else (16384, args.gpus_per_node)
    analyses = _analyses(args)
    rf = _rf(args, gpus / gpn, required=False)
    if rf is None:
        measured = [a.jobs.rf for a in analyses if a.jobs is not None and a.jobs.rf]
        measured += [t.rf for a in analyses for t in a.traces if t.rf and t.unit == "node"]
        if not measured:
            raise SpotpipeError("report: no trace gives r_f; pass --rf (failures per 1000 node-days)")
        rf = float(measured[0])
    plan = _make_plan(args, rf, gpus, gpn)
    mttf_s = 1.0 / rate_per_second(plan.nodes, plan.rf)
    cost = mc.estimate_cost(mc.Exponential(mttf_s), ettr_plot_wall(mttf_s), args.trials, ETTR_POINTS)
    mc.check_cost(cost, args.max_failures, f"reliability report ({ETTR_POINTS} Monte Carlo points x {args.trials} trials)")
    out = write_report(Path(args.output), analyses, plan, trials=args.trials)
    print(f"wrote {out}", file=sys.stderr)
    print(str(out))
    return 0
