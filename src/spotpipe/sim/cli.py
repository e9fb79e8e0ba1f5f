"""``spotpipe simulate --config FILE``: play a job's lowered schedule on a modelled cluster.

Prints a summary table (iteration time, bubble per rank, peak memory, busiest links, the job's
failures and ETTR), or the same as JSON with ``--json``; ``--trace OUT.json`` writes a Chrome
trace of the first iteration (opens in Perfetto), ``--events OUT.jsonl`` the event log the
runtime would write, in virtual time. Pure Python: never imports torch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spotpipe.config import load_config
from spotpipe.events import EventLog


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``simulate`` command to the top-level ``spotpipe`` parser."""
    cmd = subparsers.add_parser(
        "simulate",
        help="simulate a job's schedule on a modelled cluster and network, with failures",
        description="Play the lowered schedule of a job config on a simulated cluster (per-link "
        "latency and bandwidth, node speeds, failures with checkpoint-restart) and print iteration "
        "time, bubble per rank, peak memory, link use and the job outcome.",
    )
    cmd.add_argument("--config", type=Path, default=None, metavar="FILE",
                     help="job config TOML with optional [sim] and [network] sections (default: built-in job)")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value, e.g. --set pipeline.microbatches=16 (repeatable)")
    cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    cmd.add_argument("--trace", type=Path, default=None, metavar="OUT.json",
                     help="write a Chrome trace of the first iteration (open in ui.perfetto.dev)")
    cmd.add_argument("--events", type=Path, default=None, metavar="OUT.jsonl",
                     help="write the job's events (same records as the runtime, virtual time)")
    cmd.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from spotpipe.sim.job import prepare, simulate_job
    from spotpipe.sim.report import format_summary, iteration_trace, summary

    cfg = load_config(args.config, args.overrides)
    base_dir = args.config.resolve().parent if args.config is not None else None
    start = time.perf_counter()
    setup = prepare(cfg, base_dir)
    if args.events is not None and args.events.exists():
        args.events.unlink()  # a fresh log per simulation
    log = EventLog(args.events) if args.events is not None else None
    try:
        result = simulate_job(setup, log=log, record=args.trace is not None)
    finally:
        if log is not None:
            log.close()
    elapsed = time.perf_counter() - start
    data = summary(setup, result, elapsed)
    if args.trace is not None:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        args.trace.write_text(json.dumps(iteration_trace(setup, result.iteration)))
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(format_summary(data))
        if args.trace is not None:
            print(f"trace: {args.trace}")
        if args.events is not None:
            print(f"events: {args.events}")
    return 0
