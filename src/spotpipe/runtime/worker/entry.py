"""How a worker process starts: ``spotpipe worker --join HOST:PORT`` and
``python -m spotpipe.runtime.worker``.

Parses the arguments, joins the job (:func:`spotpipe.runtime.protocol.request_join`), waits as a
warm spare when the controller says so, then runs :class:`spotpipe.runtime.worker.worker.Worker`.
This module imports torch only inside :func:`run_worker`, so ``spotpipe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from spotpipe.cliargs import float_in
from spotpipe.config import MAX_WAIT_S
from spotpipe.errors import SpotpipeError
from spotpipe.runtime import protocol
from spotpipe.runtime.worker.heartbeat import ControllerLost


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``spotpipe worker`` (and ``python -m spotpipe.runtime.worker``).

    Args:
        parser: The parser to add ``--join``, ``--token-file``, ``--listen-host``, ``--timeout`` and
            the rest to.
    """
    parser.add_argument("--join", required=True, metavar="HOST:PORT", help="the controller's address, printed by `spotpipe train`")
    parser.add_argument("--token-file", default=None, metavar="FILE", help="file holding the job token (default: $SPOTPIPE_TOKEN)")
    parser.add_argument(
        "--listen-host",
        default=None,
        metavar="ADDR",
        help="address the other workers reach this one on (default: this machine's address towards the controller)",
    )
    parser.add_argument("--timeout", type=float_in(0.0, MAX_WAIT_S, lo_open=True), default=60.0, metavar="S",
                        help=f"seconds to wait for the controller, in (0, {MAX_WAIT_S:g}] (default 60)")



def wait_as_spare(store: Any, grant: protocol.Grant) -> protocol.Grant | None:
    """A warm standby: load torch and build a throwaway stage (the first model build of a process
    is slow), then wait for the controller to hand over a lost role. None: the job ended.

    Args:
        store: A client of the controller's store.
        grant: The spare's grant (its ``info`` holds the job config as TOML and ``threads``).

    Returns:
        The role handed over, or None.

    Raises:
        Exception: The store's own error when the controller is gone (the caller says so).
    """
    import tomllib

    import torch
    from torch.distributed import DistStoreError

    from spotpipe.config import config_from_mapping
    from spotpipe.model.stages import build_stage

    cfg = config_from_mapping(tomllib.loads(grant.info["config"]), where="job config").validate()
    threads = int(grant.info.get("threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    build_stage(cfg.model, cfg.train.seed, 0, cfg.pipeline.stages)
    import spotpipe.runtime.worker.worker  # noqa: F401  (the worker's own imports, before a role waits on them)

    print(f"[{time.strftime('%H:%M:%S')}] spare worker {grant.worker}: warm, waiting for a role", flush=True)
    store.set(protocol.spare_warm_key(grant.worker), "1")
    key = protocol.spare_key(grant.worker)
    while True:
        try:  # the store wakes the wait when the role is granted: no polling while the job trains
            store.wait([key], SPARE_CHECK)
        except DistStoreError:  # not granted within SPARE_CHECK: has the job ended meanwhile?
            if store.check([protocol.END]) or store.check([protocol.STOP]):
                return None
            continue
        info = json.loads(store.get(key))
        for done in (key, protocol.spare_warm_key(grant.worker)):  # a worker parked later waits again
            store.delete_key(done)
        print(f"[{time.strftime('%H:%M:%S')}] spare worker {grant.worker}: takes stage {info['stage']}, replica {info['replica']}", flush=True)
        return protocol.Grant(int(info["worker"]), int(info["stage"]), int(info["replica"]), info)


CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"
SPARE_CHECK = datetime.timedelta(seconds=0.25)
"""How often a waiting spare checks whether the job has ended (a granted role wakes it at once)."""


def run_worker(args: argparse.Namespace) -> int:
    """Join the job at ``args.join`` and work until it ends. Raises SpotpipeError on bad input.

    The worker says every store or connection failure in one line of its own (a lost controller:
    :class:`~spotpipe.runtime.worker.heartbeat.ControllerLost`), so c10d's C++ warnings, which
    come with C++ stack traces, are off unless ``$TORCH_CPP_LOG_LEVEL`` asks for them.

    Args:
        args: Parsed :func:`add_worker_arguments` arguments.

    Returns:
        The process exit status (0 when the job ended normally).

    Raises:
        SpotpipeError: on bad input (the ``--join`` address, the token).
    """
    os.environ.setdefault(CPP_LOG_LEVEL, "ERROR")  # read once, when torch is first imported (below)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when to stop
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    host, port = protocol.parse_address(args.join)
    token = protocol.read_token(args.token_file)
    address = f"{host}:{port}"
    local = os.environ.get(protocol.LOCAL_INDEX_ENV)
    parent = os.environ.get(protocol.CONTROLLER_PID_ENV, "")

    def controller_ended() -> str:
        """A local worker's parent is the controller: once it is not, the controller ended."""
        if parent.isdigit() and os.getppid() != int(parent):
            return "its process ended before this worker connected"
        return ""

    try:
        store = protocol.connect_store(host, port, args.timeout, give_up=controller_ended)
    except protocol.ControllerGone as exc:
        ControllerLost(f"local worker {local}", address)(str(exc))
    listen_host = args.listen_host or protocol.local_address_towards(host, port)
    try:
        grant = protocol.request_join(store, token, listen_host=listen_host, timeout_s=args.timeout)
    except SpotpipeError:
        raise
    except Exception:  # the store failed under the join: the controller is gone
        ControllerLost("this worker", address).check(store)
        raise
    try:
        from spotpipe.runtime.worker.worker import EXIT_PARKED, Worker

        while True:
            if grant.info.get("spare"):  # a warm spare, or a worker a reshape left out: wait for a role
                try:
                    assigned = wait_as_spare(store, grant)
                except Exception:
                    ControllerLost(f"spare worker {grant.worker}", address).check(store)
                    raise
                if assigned is None:
                    code = 0
                    break
                grant = assigned
            code = Worker(store, grant, listen_host, address).run()
            if code != EXIT_PARKED:
                break
            grant = protocol.Grant(grant.worker, -1, -1, {**grant.info, "spare": True})  # stands by
    except BaseException:  # a bug: the controller already has the one-line report; log the rest
        import traceback

        traceback.print_exc()
        code = 1
    # Everything is written and fsynced; skip the interpreter's slow teardown of torch, gloo and
    # the store client (seconds on a busy machine, during which the controller waits).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m spotpipe.runtime.worker``.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: :func:`run_worker`'s, or 2 after printing a
        :class:`~spotpipe.errors.SpotpipeError` in one line.
    """
    parser = argparse.ArgumentParser(prog="python -m spotpipe.runtime.worker", description="A spotpipe worker process.")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_worker(args)
    except SpotpipeError as exc:
        print(f"spotpipe worker: error: {exc}", file=sys.stderr, flush=True)
        return 2


