"""``spotpipe schedule show | validate``: look at a schedule and check one stored as CSV.

``spotpipe schedule show --schedule 1f1b --stages 4 --microbatches 8`` prints the ideal-time grid
(every compute action one step, communication none), so the pipeline bubble is visible;
``--format text|csv|chrome`` prints the action lists, the CSV form or a Chrome trace (Perfetto);
``--swap`` shows the CheckFree+ swapped paths. It builds through the same builder as the runtime
and the simulator (:mod:`spotpipe.schedule.build`), and its ``--schedule`` choices are the
registered generators (:data:`spotpipe.schedule.generators.REGISTRY`).
``spotpipe schedule validate FILE.csv`` checks a schedule (compute-only or lowered) for missing
actions, broken dependencies, unmatched send/recv and deadlocks, and a SkipPipe node schedule
also for paths that revisit a stage or do not return, unbalanced visits and (``--node-memory``)
nodes over their memory.
``spotpipe schedule plan --config FILE`` plans SkipPipe node placement and paths
(:mod:`spotpipe.sim.skipcli`). ``spotpipe schedule memory --config F --budget 4GB`` prints the
memory plans of a job (:mod:`spotpipe.planner`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spotpipe.cliargs import int_in
from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import check_output, read_text, write_output
from spotpipe.schedule.build import compute_schedule
from spotpipe.schedule.generators import REGISTRY, model_chunks
from spotpipe.schedule.ir import Schedule
from spotpipe.schedule.nodepaths import validate_node_schedule
from spotpipe.schedule.passes import lower
from spotpipe.schedule.render import FORMATS, render
from spotpipe.schedule.validate import check_message_order, describe, validate_schedule
from spotpipe.sim.skipcli import register_plan


MAX_ACTIONS = 100_000  # default --max-actions: at most ~10 s and ~100 MB on one core
# Measured on one busy core: the grid (which plays the schedule to place every action) costs about
# 80 us and 0.6 kB per action; the other formats about 15 us.
_SECONDS_PER_ACTION = {"grid": 8e-5}
_DEFAULT_SECONDS_PER_ACTION = 1.5e-5
_BYTES_PER_ACTION = 600
_COUNT = int_in(1, 1_000_000)


def count_actions(schedule: str, stages: int, microbatches: int, virtual_stages: int, lowered: bool) -> int:
    """Actions ``schedule show`` would generate: a forward and a backward per microbatch and
    model chunk, plus, lowered, a SEND and a RECV each way per microbatch and chunk boundary.

    Args:
        schedule: Registered schedule name.
        stages: Pipeline ranks.
        microbatches: Microbatches per step.
        virtual_stages: Model chunks per rank (chunked schedules).
        lowered: Count the SEND/RECV actions too.

    Returns:
        The number of actions, without building the schedule.

    Raises:
        ScheduleError: for an unknown schedule name.
    """
    chunks = model_chunks(schedule, stages, virtual_stages)
    compute = 2 * chunks * microbatches
    return compute + (4 * (chunks - 1) * microbatches if lowered else 0)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``schedule`` command group to the top-level ``spotpipe`` parser.

    Args:
        subparsers: The top-level parser's sub-command action (``add_subparsers()``).
    """
    group = subparsers.add_parser(
        "schedule",
        help="show, export, validate and plan pipeline schedules; plan their memory",
        description="Show, export and validate pipeline schedules (GPipe, 1F1B, interleaved 1F1B, chronos); "
        "plan SkipPipe paths over nodes; plan memory under a per-rank budget.",
    )
    sub = group.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND")

    def _help(_args: argparse.Namespace) -> int:
        group.print_help()
        return 2

    group.set_defaults(func=_help)

    show = sub.add_parser(
        "show",
        help="print a generated schedule (grid, action lists, CSV or Chrome trace)",
        description="Generate a schedule and print it; the grid shows ideal time steps "
        "(each forward/backward one step, communication none), so the bubble is visible.",
    )
    show.add_argument("--schedule", choices=tuple(REGISTRY), default="1f1b",
                      help="schedule generator (default: %(default)s)")
    show.add_argument("--stages", type=_COUNT, default=4,
                      help="pipeline ranks (default: %(default)s)")
    show.add_argument("--microbatches", type=_COUNT, default=8,
                      help="microbatches per step (default: %(default)s)")
    show.add_argument("--virtual-stages", type=_COUNT, default=2,
                      help="model chunks per rank, used by the interleaved schedule (chronos needs 2), as pipeline.virtual_stages (default: %(default)s)")
    show.add_argument("--swap", action="store_true",
                      help="CheckFree+ swapped paths for odd microbatches (stages 0<->1 and S-2<->S-1), "
                      "as ft.strategy = checkfree+ runs them; needs >= 4 stages")
    show.add_argument("--lowered", action="store_true",
                      help="add the send/recv actions the runtime and simulator play")
    show.add_argument("--format", choices=FORMATS, default="grid",
                      help="grid = ideal-time rank x step grid, text = action list per rank, "
                      "csv = CSV for `schedule validate`, chrome = Chrome-trace JSON for Perfetto "
                      "(default: %(default)s)")
    show.add_argument("--out", type=Path, default=None, metavar="FILE",
                      help="write to FILE instead of standard output")
    show.add_argument("--max-actions", type=int_in(1, 10**9), default=MAX_ACTIONS, metavar="N",
                      help="refuse schedules of more than N actions, which take long and much memory "
                      "to build and print (default: %(default)s)")
    show.set_defaults(func=_cmd_show)

    check = sub.add_parser(
        "validate",
        help="check a schedule CSV for missing actions, broken dependencies and deadlocks",
        description="Check a schedule CSV (as written by `schedule show --format csv`). Prints one "
        "line when it is valid; otherwise the problem and the rank x step grid with the faulty "
        "action marked, and exits 2.",
    )
    check.add_argument("file", type=Path, metavar="FILE.csv", help="schedule CSV to check")
    check.add_argument("--blocking-recv", action="store_true",
                       help="play each RECV as blocking its rank until the data arrived "
                       "(stricter than the default, where the consumer waits)")
    check.add_argument("--node-memory", type=int_in(1, 10**9), default=None, metavar="N",
                       help="for a SkipPipe node schedule (schedule plan --csv): also reject a node that holds "
                       "more than N activations, as pipeline.node_memory (default: no memory check)")
    check.add_argument("--message-order", action="store_true",
                       help="also require the same send and receive order per rank pair "
                       "(needed by order-matching transports such as NCCL)")
    check.set_defaults(func=_cmd_validate)
    register_plan(sub)

    memory = sub.add_parser(
        "memory",
        help="peak memory per rank of each plan under a budget, the largest model that fits, the step time",
        description="For 1F1B, 1F1B + full recompute, interleaved 1F1B and chronos (+ recompute, + optimizer "
        "offload), print the predicted peak bytes per rank (weights, gradients, optimizer state and "
        "activations, from the schedule), the action that hits the peak, whether it fits the per-rank "
        "budget, the largest model that fits (layers at the job's d_model, d_model at its layers) and the "
        "predicted step time; then the plan pipeline.schedule = auto would pick.",
    )
    memory.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="job config TOML (default: built-in job)")
    memory.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set model.layers=32 (repeatable)")
    memory.add_argument("--budget", default=None, metavar="SIZE",
                        help="device memory per rank, e.g. 4GB, 512MiB or 2.5 (GB) (default: the config's "
                        "pipeline.memory_budget_gb)")
    memory.set_defaults(func=_cmd_memory)


def _cmd_show(args: argparse.Namespace) -> int:
    actions = count_actions(args.schedule, args.stages, args.microbatches, args.virtual_stages, args.lowered)
    if actions > args.max_actions:
        raise SpotpipeError(
            f"schedule show: --stages {args.stages} x --microbatches {args.microbatches}"
            + (f" x --virtual-stages {args.virtual_stages}" if REGISTRY[args.schedule].chunked else "")
            + f" makes {actions:,} actions{' (lowered)' if args.lowered else ''}: about "
            f"{actions * _SECONDS_PER_ACTION.get(args.format, _DEFAULT_SECONDS_PER_ACTION):.0f} s and "
            f"{actions * _BYTES_PER_ACTION / 2**30:.1f} GiB to build and print as {args.format}; the limit is "
            f"--max-actions {args.max_actions}: raise it to go on"
        )
    if args.out is not None:
        check_output(args.out, "--out")
    schedule = compute_schedule(args, swap=args.swap)  # the arguments carry the [pipeline] field names
    if args.lowered:
        schedule = lower(schedule)
    text = render(schedule, args.format)
    if not text.endswith("\n"):
        text += "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_output(args.out, text, "--out")
        print(f"wrote {args.out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    path: Path = args.file
    text = read_text(path, "schedule")
    schedule: Schedule = Schedule.from_csv(text, where=str(path))
    if schedule.chunk_stage is not None:  # a SkipPipe node schedule: its path, balance and memory rules too
        validate_node_schedule(schedule, args.node_memory or 10**9)
    validate_schedule(schedule, blocking_recv=args.blocking_recv, message_order=args.message_order)
    note = ""
    if not args.message_order and schedule.is_lowered() and check_message_order(schedule):
        note = " (send/recv order differs per rank pair: fine for gloo, not for NCCL)"
    print(f"{path}: valid {describe(schedule)}{note}")
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from spotpipe.config import AUTO_SCHEDULE, load_config
    from spotpipe.planner import GB, evaluate_plans, format_plans, parse_bytes

    # every plan is evaluated anyway: a --set pipeline.schedule=auto changes nothing here
    cfg = load_config(args.config, [o for o in args.overrides if o.replace(" ", "") != f"pipeline.schedule={AUTO_SCHEDULE}"])
    if args.budget is not None:
        budget = parse_bytes(args.budget)
    elif cfg.pipeline.memory_budget_gb > 0:
        budget = cfg.pipeline.memory_budget_gb * GB
    else:
        raise SpotpipeError("schedule memory: give --budget SIZE (e.g. --budget 4GB) or set pipeline.memory_budget_gb")
    print(format_plans(evaluate_plans(cfg, budget), budget, cfg))
    return 0
