"""``spotpipe schedule show | validate``: look at a schedule and check one stored as CSV.

``spotpipe schedule show --schedule 1f1b --stages 4 --microbatches 8`` prints the ideal-time grid
(every compute action one step, communication none), so the pipeline bubble is visible;
``--format text|csv|chrome`` prints the action lists, the CSV form or a Chrome trace (Perfetto);
``--swap`` shows the CheckFree+ swapped paths. It builds through the same builder as the runtime
and the simulator (:mod:`spotpipe.schedule.build`), and its ``--schedule`` choices are the
registered generators (:data:`spotpipe.schedule.generators.REGISTRY`).
``spotpipe schedule validate FILE.csv`` checks a schedule (compute-only or lowered) for missing
actions, broken dependencies, unmatched send/recv and deadlocks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spotpipe.schedule.build import compute_schedule
from spotpipe.schedule.generators import REGISTRY
from spotpipe.schedule.ir import Schedule, ScheduleError
from spotpipe.schedule.passes import lower
from spotpipe.schedule.render import FORMATS, render
from spotpipe.schedule.validate import check_message_order, describe, validate_schedule


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``schedule`` command group to the top-level ``spotpipe`` parser."""
    group = subparsers.add_parser(
        "schedule",
        help="show, export and validate pipeline schedules",
        description="Show, export and validate pipeline schedules (GPipe, 1F1B, interleaved 1F1B).",
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
    show.add_argument("--stages", type=_positive_int, default=4,
                      help="pipeline ranks (default: %(default)s)")
    show.add_argument("--microbatches", type=_positive_int, default=8,
                      help="microbatches per step (default: %(default)s)")
    show.add_argument("--virtual-stages", type=_positive_int, default=2,
                      help="model chunks per rank, used by the interleaved schedule only, as pipeline.virtual_stages (default: %(default)s)")
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
    check.add_argument("--message-order", action="store_true",
                       help="also require the same send and receive order per rank pair "
                       "(needed by order-matching transports such as NCCL)")
    check.set_defaults(func=_cmd_validate)


def _cmd_show(args: argparse.Namespace) -> int:
    schedule = compute_schedule(args, swap=args.swap)  # the arguments carry the [pipeline] field names
    if args.lowered:
        schedule = lower(schedule)
    text = render(schedule, args.format)
    if not text.endswith("\n"):
        text += "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            args.out.write_text(text)
        except OSError as exc:
            raise ScheduleError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        print(f"wrote {args.out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScheduleError(f"cannot read schedule {path}: {exc.strerror or exc}") from None
    schedule: Schedule = Schedule.from_csv(text, where=str(path))
    validate_schedule(schedule, blocking_recv=args.blocking_recv, message_order=args.message_order)
    note = ""
    if not args.message_order and schedule.is_lowered() and check_message_order(schedule):
        note = " (send/recv order differs per rank pair: fine for gloo, not for NCCL)"
    print(f"{path}: valid {describe(schedule)}{note}")
    return 0
