"""``spotpipe simulate --config FILE``: play a job's lowered schedule on a modelled cluster.

Prints a summary table (iteration time, bubble per rank, peak memory, busiest links, the job's
failures and ETTR), or the same as JSON with ``--json``; ``--trace OUT.json`` writes a Chrome
trace of the first iteration (opens in Perfetto), ``--events OUT.jsonl`` the event log the
runtime would write, in virtual time. ``--elastic MODE`` instead replays ``sim.failure_trace``
(``--compress`` times faster) elastic, waiting for replacements, or from checkpoints, or all
three (:mod:`spotpipe.sim.elastic`). Pure Python: never imports torch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, cast

from spotpipe import events as ev
from spotpipe.cliargs import float_in, int_in
from spotpipe.config import JobConfig, load_config
from spotpipe.errors import SpotpipeError
from spotpipe.events import EventLog
from spotpipe.fsutil import check_output, write_output
from spotpipe.progressline import ProgressLine
from spotpipe.schedule.cli import count_actions

MAX_STEPS = 10_000_000  # default --max-steps: about a minute and half a GiB
MAX_ACTIONS = 4_000_000  # default --max-actions: actions of one played iteration, all replicas
# Measured on one busy core: the simulator plays about 150,000 steps a second and keeps ~40 bytes
# per committed step (its duration, for rollbacks); an iteration plays ~700,000 actions a second
# and its lowered schedule holds ~500 bytes per action.
STEPS_PER_SECOND = 150_000
BYTES_PER_STEP = 40
ACTIONS_PER_SECOND = 700_000
BYTES_PER_ACTION = 500


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``simulate`` command to the top-level ``spotpipe`` parser.

    Args:
        subparsers: The top-level parser's sub-command action (``add_subparsers()``).
    """
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
    cmd.add_argument("--max-actions", type=int_in(1, 10**12), default=MAX_ACTIONS, metavar="N",
                     help="refuse a job whose iteration plays more than N actions (pipeline.stages x "
                     "pipeline.microbatches x pipeline.replicas, lowered) (default: %(default)s)")
    cmd.add_argument("--max-steps", type=int_in(1, 10**12), default=MAX_STEPS, metavar="N",
                     help="refuse a job of more than N train.steps, and stop one that has played N steps "
                     "(replays after rollbacks included) without finishing (default: %(default)s)")
    cmd.add_argument("--elastic", choices=("elastic", "wait", "checkpoint", "all"), default=None, metavar="MODE",
                     help="replay sim.failure_trace instead: elastic (shrink and grow), wait (for replacements), "
                     "checkpoint (restart from the last one) or all (the three, with their throughput ratios)")
    cmd.add_argument("--compress", type=float_in(0, 1e9, lo_open=True), default=1.0, metavar="X",
                     help="with --elastic: replay the trace X times faster (default: %(default)s)")
    cmd.set_defaults(func=_cmd_simulate)


class _StepWatch:
    """Stands in for the event log of a simulation: shows progress with an ETA on stderr, stops
    a job that has played more than ``max_steps`` steps, and passes every record on to ``log``."""

    def __init__(self, log: EventLog | None, steps: int, max_steps: int) -> None:
        self.log = log
        self.steps = steps
        self.max_steps = max_steps
        self.played = 0
        self.committed = 0
        self.progress = ProgressLine("simulate", steps, "steps")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        if event == ev.STEP:
            self.played += 1
            self.committed = int(fields.get("step", 0)) + 1
            self.progress.update(self.committed)
            if self.played > self.max_steps:
                raise SpotpipeError(
                    f"simulate: stopped after playing {self.played - 1:,} steps ({self.played - 1 - self.committed:,} of "
                    f"them again after rollbacks) with {self.committed - 1:,} of train.steps = {self.steps:,} committed: "
                    "failures roll the job back faster than it moves on (see sim.failure_rate, train.checkpoint_every, "
                    f"sim.recovery = policy); the limit is --max-steps {self.max_steps}: raise it to go on"
                )
        if self.log is not None:
            return self.log.write(event, **fields)
        return {"event": event, **fields}

    def close(self) -> None:
        self.progress.close()
        if self.log is not None:
            self.log.close()


def _cmd_simulate(args: argparse.Namespace) -> int:
    from spotpipe.planner import resolved  # the planner builds on the simulator
    from spotpipe.sim.job import prepare, simulate_job
    from spotpipe.sim.report import format_summary, iteration_trace, summary

    cfg = resolved(load_config(args.config, args.overrides))
    if args.elastic is not None:
        return _cmd_elastic(args, cfg)
    p = cfg.pipeline
    per_replica = count_actions(p.schedule, p.stages, p.microbatches, p.virtual_stages, lowered=True)
    played = per_replica * p.replicas
    if played > args.max_actions:
        raise SpotpipeError(
            f"simulate: an iteration plays {played:,} actions ({per_replica:,} per replica x pipeline.replicas = "
            f"{p.replicas}): about {played / ACTIONS_PER_SECOND:,.0f} s and {per_replica * BYTES_PER_ACTION / 2**30:.1f} GiB "
            f"per distinct placement; the limit is --max-actions {args.max_actions}: raise it to go on"
        )
    steps = cfg.train.steps
    if steps > args.max_steps:
        raise SpotpipeError(
            f"simulate: train.steps = {steps:,} steps are played one by one: at least {steps / STEPS_PER_SECOND:,.0f} s "
            f"and {steps * BYTES_PER_STEP / 2**30:.1f} GiB, more with failures; the limit is --max-steps "
            f"{args.max_steps}: raise it to go on"
        )
    for path, option in ((args.trace, "--trace"), (args.events, "--events")):
        if path is not None:
            check_output(path, option)
    base_dir = args.config.resolve().parent if args.config is not None else None
    start = time.perf_counter()
    setup = prepare(cfg, base_dir)
    if args.events is not None and args.events.is_file():
        args.events.write_bytes(b"")  # a fresh log per simulation (a link's target; a device is left as it is)
    watch = _StepWatch(EventLog(args.events) if args.events is not None else None, steps, args.max_steps)
    try:
        result = simulate_job(setup, log=cast(EventLog, watch), record=args.trace is not None)
    finally:
        watch.close()
    elapsed = time.perf_counter() - start
    data = summary(setup, result, elapsed)
    if args.trace is not None:
        write_output(args.trace, json.dumps(iteration_trace(setup, result.iteration)), "--trace")
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(format_summary(data))
        if args.trace is not None:
            print(f"trace: {args.trace}")
        if args.events is not None:
            print(f"events: {args.events}")
    return 0


def _cmd_elastic(args: argparse.Namespace, cfg: JobConfig) -> int:
    """``simulate --elastic MODE``: replay ``sim.failure_trace`` in one mode or all three."""
    from spotpipe.sim.elastic import ELASTIC_MODES, ElasticMode, simulate_elastic, trace_events
    from spotpipe.sim.report import elastic_summary, format_elastic

    if not cfg.sim.failure_trace:
        raise SpotpipeError("simulate --elastic replays a preemption trace: set sim.failure_trace "
                            "(lines '<ms>,<add|remove>,<node>', the Bamboo format)")
    if args.events is not None:
        check_output(args.events, "--events")
    base_dir = args.config.resolve().parent if args.config is not None else None
    events = trace_events(cfg, cfg.sim.failure_trace, args.compress, base_dir)
    modes: tuple[ElasticMode, ...] = ELASTIC_MODES if args.elastic == "all" else (cast(ElasticMode, args.elastic),)
    if args.events is not None and args.events.is_file():
        args.events.write_bytes(b"")
    log = EventLog(args.events) if args.events is not None else None
    try:
        results = [simulate_elastic(cfg, events, mode, log=log) for mode in modes]
    finally:
        if log is not None:
            log.close()
    data = elastic_summary(results, cfg.sim.failure_trace, args.compress)
    print(json.dumps(data, indent=1) if args.json else format_elastic(data))
    if args.events is not None and not args.json:
        print(f"events: {args.events}")
    return 0
