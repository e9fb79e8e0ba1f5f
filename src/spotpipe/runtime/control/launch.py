"""Local worker processes: start them, watch them, and make sure none outlives the job.

Workers are started with :mod:`subprocess` as ``python -m spotpipe.runtime.worker.worker --join
HOST:PORT``, each in its own session (so a Ctrl-C on the terminal reaches only the controller,
which then stops them in order). The job token travels in the environment (``SPOTPIPE_TOKEN``),
never on the command line, where any user could read it. Output goes to
``RUN_DIR/logs/worker-<i>.log``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from spotpipe.runtime.protocol import CONTROLLER_PID_ENV, LOCAL_INDEX_ENV, TOKEN_ENV


@dataclass
class LocalProcess:
    """One started worker process."""

    index: int
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def returncode(self) -> int | None:
        return self.popen.poll()

    def last_log_line(self) -> str:
        """The last non-empty line of the worker's log (what it said before it died)."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""


def describe_exit(code: int) -> str:
    """``-9`` -> ``killed by SIGKILL``; ``3`` -> ``exit code 3``.

    Args:
        code: A ``Popen.returncode`` (negative: killed by that signal).

    Returns:
        The words.
    """
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class LocalWorkers:
    """The worker processes this machine runs for the job.

    Args:
        address: ``HOST:PORT`` the workers join.
        token: The job token (passed in the environment).
        log_dir: Where their logs go.
        threads: Intra-op threads per worker (0 = torch's default).
    """

    def __init__(self, address: str, token: str, log_dir: Path, threads: int = 0) -> None:
        self.address = address
        self.token = token
        self.log_dir = log_dir
        self.threads = threads
        self.procs: list[LocalProcess] = []

    def start(self, count: int) -> None:
        """Start ``count`` more workers.

        Args:
            count: How many worker processes to start (each logs to ``worker-<i>.log``).
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            index = len(self.procs)
            env = dict(os.environ)
            env[TOKEN_ENV] = self.token
            env[LOCAL_INDEX_ENV] = str(index)
            env[CONTROLLER_PID_ENV] = str(os.getpid())  # the worker's parent: it is orphaned when that changes
            env.setdefault("PYTHONUNBUFFERED", "1")
            if self.threads > 0:
                env["OMP_NUM_THREADS"] = str(self.threads)
            log_path = self.log_dir / f"worker-{index}.log"
            # The child writes to its own copy of the descriptor: the controller keeps none, so a
            # job that starts hundreds of replacements holds no file per dead worker.
            with open(log_path, "ab") as log:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "spotpipe.runtime.worker", "--join", self.address],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            self.procs.append(LocalProcess(index, popen, log_path))

    def by_pid(self, pid: int) -> LocalProcess | None:
        """The local worker process with this pid.

        Args:
            pid: Process id.

        Returns:
            The process, or None when none of this object's has that pid.
        """
        for p in self.procs:
            if p.pid == pid:
                return p
        return None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def running(self) -> list[LocalProcess]:
        return [p for p in self.procs if p.returncode() is None]

    def wait_all(self, timeout_s: float, give_up: Callable[[], bool] | None = None) -> bool:
        """Wait until every worker exited; True if they all did within ``timeout_s``.

        Args:
            timeout_s: Seconds to wait at most (polled every 50 ms).
            give_up: Stop waiting as soon as this returns True (a second Ctrl-C).

        Returns:
            Whether no worker is left running.
        """
        deadline = time.monotonic() + timeout_s
        while self.running():
            if time.monotonic() > deadline or (give_up is not None and give_up()):
                return False
            time.sleep(0.05)
        return True

    def terminate(self, pids: Iterable[int]) -> None:
        """SIGTERM the running workers with these pids (processes that hold no state: a warm spare,
        a replacement still starting), so a stopping job does not wait for them.

        Args:
            pids: Process ids of this object's workers.
        """
        wanted = set(pids)
        for p in self.running():
            if p.pid in wanted:
                _signal_group(p.popen, signal.SIGTERM)

    def stop_all(self, grace_s: float = 3.0) -> None:
        """SIGTERM every running worker, then SIGKILL what is left after ``grace_s``; reap all.

        Args:
            grace_s: Seconds between SIGTERM and SIGKILL.
        """
        for p in self.running():
            _signal_group(p.popen, signal.SIGTERM)
        if not self.wait_all(grace_s):
            for p in self.running():
                _signal_group(p.popen, signal.SIGKILL)
            self.wait_all(5.0)
        for p in self.procs:
            try:
                p.popen.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the worker's whole session (the worker and anything it started)."""
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            popen.send_signal(sig)
        except ProcessLookupError:
            pass
