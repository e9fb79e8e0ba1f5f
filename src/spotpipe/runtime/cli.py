"""``spotpipe train`` and ``spotpipe worker``.

``spotpipe train [--config FILE] [--set section.key=value ...] [--resume RUN_DIR]`` starts the
controller and the local workers and trains; ``spotpipe worker --join HOST:PORT`` joins a job
from another machine. torch is imported only inside the commands, so ``spotpipe --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spotpipe.runtime.worker.entry import add_worker_arguments

EXIT_INTERRUPTED = 130


def register(subparsers: Any) -> None:
    """Add ``train`` and ``worker`` to the top-level parser.

    Args:
        subparsers: The top-level parser's ``add_subparsers()`` object.
    """
    train = subparsers.add_parser(
        "train",
        help="train a model with pipeline parallelism on worker processes",
        description=(
            "Start the controller and one worker process per (stage, replica) (per node with "
            "pipeline.stage_nodes: SkipPipe, see configs/skippipe-geo.toml), plus ft.spares warm spares, "
            "and train. With no arguments: the default small model, 4 stages on CPU, a few minutes. "
            "Writes runs/<name>/ (events.jsonl, config.toml, loss.png, checkpoints/). Workers on other "
            "machines join with `spotpipe worker --join`: with run.local_workers below the worker count, "
            "train prints the address and the token to use."
        ),
    )
    train.add_argument("--config", default=None, metavar="FILE", help="TOML config (see configs/)")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.steps=100 (repeatable)"
    )
    train.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument(
        "--fail", action="append", default=[], metavar="SPEC",
        help="inject a fault (appended to ft.faults), e.g. stage=2@step=40, stage=1,replica=0@random, stages=1+2@step=30, "
             "stage=2@stall=5s, stage=2@step=40,phase=backward (phases: forward, backward, allreduce, optimizer, recovery); "
             "with pipeline.stage_nodes, stage=N names node N",
    )
    train.add_argument(
        "--fail-rate", action="append", default=[], metavar="RATE",
        help="kill workers at a rate (appended to ft.faults), e.g. 10%%/h (per worker, Poisson) or 2%%/step",
    )
    train.set_defaults(func=cmd_train)

    worker = subparsers.add_parser(
        "worker",
        help="join a running job from this machine",
        description=(
            "Join the job whose controller listens at HOST:PORT and work in the role it hands out. "
            "The job token comes from $SPOTPIPE_TOKEN or --token-file (never the command line)."
        ),
    )
    add_worker_arguments(worker)
    worker.set_defaults(func=cmd_worker)


def cmd_train(args: argparse.Namespace) -> int:
    """``spotpipe train``: start the controller and its local workers, train, print the result line.

    Args:
        args: Parsed ``spotpipe train`` arguments.

    Returns:
        0, or :data:`EXIT_INTERRUPTED` when the job was interrupted.

    Raises:
        SpotpipeError: on bad input (config, run directory, data, checkpoint, fault specs) or when
            the job failed.
    """
    from spotpipe.errors import SpotpipeError
    from spotpipe.runtime.control.job import prepare_run

    # Bad input (the --fail specs included, with the config's range checks) fails here, before torch loads.
    prep = prepare_run(args.config, list(args.set), args.resume, faults=tuple(args.fail) + tuple(args.fail_rate))
    for note in prep.notes:
        print(f"note: {note}", flush=True)
    from spotpipe.runtime.control.controller import Controller
    from spotpipe.runtime.control.progress import format_result

    controller = Controller(
        prep.cfg, prep.run_dir, prep.token_dir, prep.token_sha256, resume=prep.resume, layout=prep.layout,
        node_plan=prep.node_plan,
    )
    result = controller.run()
    if result.status == "failed":
        raise SpotpipeError(result.message)
    print(format_result(result), flush=True)
    if result.status == "interrupted":
        if result.checkpoint is not None:
            print(f"resume with: spotpipe train --resume {result.run_dir}", flush=True)
        return EXIT_INTERRUPTED
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """``spotpipe worker``: join a job and work until it ends.

    Args:
        args: Parsed ``spotpipe worker`` arguments.

    Returns:
        The worker's exit status (:func:`~spotpipe.runtime.worker.entry.run_worker`).

    Raises:
        SpotpipeError: on a bad ``--join`` address or token, checked before torch is imported.
    """
    from spotpipe.runtime import protocol

    # Check the cheap things before torch is imported, so bad input fails at once.
    protocol.parse_address(args.join)
    protocol.read_token(args.token_file)
    from spotpipe.runtime.worker.entry import run_worker

    return run_worker(args)


if __name__ == "__main__":  # pragma: no cover
    from spotpipe.cli import main

    sys.exit(main())
