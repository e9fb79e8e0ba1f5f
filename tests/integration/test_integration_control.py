"""The control plane with real processes and real signals: Ctrl-C, refused joins, a killed worker,
and bad input (one clear line, exit code 2, no traceback, no process left behind)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def start_long_run(run_dir: Path, token_dir: Path, env: dict[str, str], helpers: Any, *sets: str) -> subprocess.Popen[str]:
    args = ["train"]
    for s in [*helpers.tiny, f"data.path={token_dir}", f"run.dir={run_dir}", "train.steps=100000", *sets]:
        args += ["--set", s]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        helpers.spotpipe_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=run_dir.parent
    )


def wait_for_steps(run_dir: Path, proc: subprocess.Popen[str], helpers: Any, n: int, timeout: float = 150) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"train exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        if (run_dir / "events.jsonl").exists():
            events = helpers.read_events(run_dir)
            if sum(r["event"] == "step" for r in events) >= n:
                return events
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {n} steps within {timeout} s")


def wait_for_warm_spare(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 120) -> Path:
    """Wait until a local spare says in its log that it is warm and waiting for a role.

    Args:
        run_dir: The job's run directory (local workers log to ``logs/worker-<i>.log``).
        proc: The ``spotpipe train`` process, which must stay alive meanwhile.
        timeout: Seconds to wait (generous: a spare imports torch and builds a stage first).

    Returns:
        The spare's log file.

    Raises:
        AssertionError: If the job exits or no spare is warm within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train exited early ({proc.returncode})"
        for log in sorted((run_dir / "logs").glob("worker-*.log")):
            text = log.read_text(errors="replace")
            if "spare worker" in text and "warm, waiting for a role" in text:
                return log
        time.sleep(0.05)
    raise AssertionError(f"no spare was warm within {timeout} s")


def worker_pids(events: list[dict[str, Any]]) -> dict[int, int]:
    return {r["worker"]: r["pid"] for r in events if r["event"] == "worker_start"}


@pytest.fixture(scope="module")
def interrupted_run(
    tmp_path_factory: pytest.TempPathFactory, token_dir: Path, spotpipe_env: dict[str, str], helpers: Any
) -> dict[str, Any]:
    """A long run with one worker joining from "another machine" (`spotpipe worker --join` with
    the token file), two bad workers that try to join, then a real SIGINT to `spotpipe train`."""
    run_dir = tmp_path_factory.mktemp("sigint") / "run"
    proc = start_long_run(run_dir, token_dir, spotpipe_env, helpers, "train.checkpoint_every=5", "run.local_workers=3")
    remote = None
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "job.token").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        token_mode = oct((run_dir / "job.token").stat().st_mode & 0o777)
        address = next(r["address"] for r in helpers.read_events(run_dir) if r["event"] == "run_start")
        remote = subprocess.Popen(
            helpers.spotpipe_cmd("worker", "--join", address, "--token-file", str(run_dir / "job.token")),
            env=spotpipe_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        events = wait_for_steps(run_dir, proc, helpers, 3)
        wrong_env = dict(spotpipe_env, SPOTPIPE_TOKEN="0" * 32)
        intruders = {
            "wrong": subprocess.Popen(helpers.spotpipe_cmd("worker", "--join", address, "--timeout", "30"),
                                      env=wrong_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            "missing": subprocess.Popen(helpers.spotpipe_cmd("worker", "--join", address, "--timeout", "30"),
                                        env=spotpipe_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        }
        refused = {}
        for name, p in intruders.items():
            out, err = p.communicate(timeout=90)
            refused[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        deadline = time.monotonic() + 60  # the refusals are logged before the answer; wait for the event anyway
        while sum(e["event"] == "join_refused" for e in helpers.read_events(run_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = worker_pids(helpers.read_events(run_dir))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        remote_out, remote_err = remote.communicate(timeout=60)
    finally:
        for p in (proc, remote):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    return {"run_dir": run_dir, "rc": proc.returncode, "out": out, "err": err, "pids": pids, "refused": refused,
            "remote": subprocess.CompletedProcess(remote.args, remote.returncode, remote_out, remote_err),
            "token_mode": token_mode, "remote_pid": remote.pid}


@pytest.mark.timeout(300)
def test_sigint_stops_every_process_and_leaves_a_resumable_run(interrupted_run: dict[str, Any], helpers: Any) -> None:
    r = interrupted_run
    assert r["rc"] == 130, (r["out"][-2000:], r["err"][-2000:])
    assert "Traceback" not in r["err"]
    assert "interrupted:" in r["out"] and "resume with: spotpipe train --resume" in r["out"]
    assert len(r["pids"]) == 4
    assert not [pid for pid in r["pids"].values() if helpers.alive(pid)], "worker processes survived Ctrl-C"
    events = helpers.read_events(r["run_dir"])
    # The worker that joined by hand got a role, trained, and left cleanly at the stop.
    assert r["remote"].returncode == 0, r["remote"].stderr[-2000:]
    starts = [e for e in events if e["event"] == "worker_start"]
    assert sorted(e["local"] for e in starts) == [False, True, True, True]
    assert next(e for e in starts if not e["local"])["pid"] == r["remote_pid"]
    assert r["token_mode"] == "0o600" and not (r["run_dir"] / "job.token").exists()
    assert "spotpipe worker --join 127.0.0.1:" in r["out"]
    end = events[-1]
    assert end["event"] == "run_end" and end["status"] == "interrupted"
    last_step = max(e["step"] for e in events if e["event"] == "step")
    assert end["steps"] == last_step + 1
    # A checkpoint is written at the stop, so a resume continues from the very last step.
    ckpt_steps = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert ckpt_steps[-1] == last_step
    assert (r["run_dir"] / "checkpoints" / f"step-{last_step:06d}" / "manifest.json").is_file()


@pytest.mark.timeout(300)
def test_workers_without_the_token_are_refused_and_logged(interrupted_run: dict[str, Any], helpers: Any) -> None:
    refused = interrupted_run["refused"]
    helpers.assert_one_line_error(refused["wrong"], "refused", "wrong job token")
    helpers.assert_one_line_error(refused["missing"], "refused", "missing job token")
    events = helpers.read_events(interrupted_run["run_dir"])
    reasons = sorted(e["reason"] for e in events if e["event"] == "join_refused")
    assert len(reasons) == 2 and reasons[0].startswith("missing job token") and reasons[1] == "wrong job token"
    # The refused workers got no role: still exactly one worker per stage.
    assert sorted(e["stage"] for e in events if e["event"] == "worker_start") == [0, 1, 2, 3]


@pytest.mark.timeout(300)
def test_killed_worker_fails_the_job_cleanly(
    tmp_path: Path, token_dir: Path, spotpipe_env: dict[str, str], helpers: Any
) -> None:
    """SIGKILL one worker: the job names it, every other process exits, nothing is left running."""
    run_dir = tmp_path / "run"
    proc = start_long_run(run_dir, token_dir, spotpipe_env, helpers, "ft.strategy=none")  # no stage recovery
    try:
        events = wait_for_steps(run_dir, proc, helpers, 3)
        victim = next(e for e in events if e["event"] == "worker_start" and e["stage"] == 2)
        pids = worker_pids(events)
        os.kill(victim["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = helpers.assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert f"worker {victim['worker']} (stage 2, replica 0) died (killed by SIGKILL)" in line
    assert not [pid for pid in pids.values() if helpers.alive(pid)], "worker processes survived the failure"
    events = helpers.read_events(run_dir)
    confirmed = [e for e in events if e["event"] == "failure_confirmed"]
    assert confirmed and confirmed[0]["worker"] == victim["worker"]
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "failed"


@pytest.mark.timeout(240)
def test_a_worker_lost_while_the_job_stops_ends_it_at_its_last_committed_step(
    tmp_path: Path, token_dir: Path, spotpipe_env: dict[str, str], helpers: Any
) -> None:
    """Ctrl-C asks the job to stop after the current step; a worker killed before that step ends
    is not rebuilt and does not fail the job: it ends as interrupted, at its last committed step,
    with one line naming the loss, at once (no wait for run.timeout_s), and nothing left running.
    Stage 3 is stalled (SIGSTOP) in that step, so the kill is sure to land inside it."""
    run_dir = tmp_path / "run"
    proc = start_long_run(run_dir, token_dir, spotpipe_env, helpers, "ft.strategy=mirror",
                          'ft.faults=["stage=3@step=4,stall=6s"]')
    try:
        wait_for_steps(run_dir, proc, helpers, 3)
        deadline = time.monotonic() + 60
        while not any(e["event"] == "fault_injected" for e in helpers.read_events(run_dir)):
            assert time.monotonic() < deadline and proc.poll() is None, "the stall was not injected"
            time.sleep(0.01)
        events = helpers.read_events(run_dir)
        victim = next(e for e in events if e["event"] == "worker_start" and e["stage"] == 1)
        pids = worker_pids(events)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)  # the controller's loop turns the interrupt into a stop request every 50 ms
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=90)
        ended_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "Traceback" not in err
    assert f"worker {victim['worker']} (stage 1, replica 0) died (killed by SIGKILL) while the job was stopping" in out
    assert "no checkpoint was written (train.checkpoint_every), so it cannot be resumed" in out  # none due by step 4
    assert ended_after < 20, ended_after  # the stalled worker resumes after 6 s; no run.timeout_s wait
    events = helpers.read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert "recovery_started" not in kinds
    steps = [e["step"] for e in events if e["event"] == "step"]
    # Every committed step once, none replayed. The stall is armed when the controller sees step 3
    # commit; on a busy machine that can come after stage 3 finished step 4, so step 4 may commit too.
    assert steps == list(range(len(steps))) and max(steps) <= 4
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "interrupted"
    assert not [pid for pid in pids.values() if helpers.alive(pid)], "worker processes survived"


@pytest.mark.timeout(240)
def test_a_killed_remote_worker_is_confirmed_within_seconds_and_replaced(
    tmp_path: Path, token_dir: Path, spotpipe_env: dict[str, str], helpers: Any
) -> None:
    """A worker the controller did not start (`spotpipe worker --join`, as on another machine) has
    no process handle to watch: its SIGKILL is confirmed from its heartbeat silence while the others
    aborted their step, in about ft.detect_timeout_s (2 s), far below run.timeout_s (60 s); a
    local replacement takes its role, training goes on, and its later silence is not a new failure."""
    run_dir = tmp_path / "run"
    # run.timeout_s = 10 s and a 30 s time limit (steps without end): the job goes on for longer than
    # run.timeout_s after the kill however fast the machine is, so the dead worker's silence must
    # not count again once it was replaced.
    proc = start_long_run(run_dir, token_dir, spotpipe_env, helpers, "run.local_workers=3", "ft.strategy=mirror",
                          "ft.mirror_every=1", "train.steps=1000000", "train.max_minutes=0.5", "train.eval_every=0",
                          "run.timeout_s=10")
    remote = None
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "job.token").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        address = next(r["address"] for r in helpers.read_events(run_dir) if r["event"] == "run_start")
        remote = subprocess.Popen(
            helpers.spotpipe_cmd("worker", "--join", address, "--token-file", str(run_dir / "job.token")),
            env=spotpipe_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_steps(run_dir, proc, helpers, 5)
        killed_at = time.time()
        os.kill(remote.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=150)
    finally:
        for p in (proc, remote):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 0, (out[-2000:], err[-2000:])
    assert "train.max_minutes=0.5 reached" in out and "finished: " in out
    events = helpers.read_events(run_dir)
    victim = next(e for e in events if e["event"] == "worker_start" and not e["local"])
    assert events[-1]["t"] - killed_at > 10.0, "the run ended before the dead worker's silence passed run.timeout_s"
    confirmed = [e for e in events if e["event"] == "failure_confirmed"]
    assert [e["worker"] for e in confirmed] == [victim["worker"]], confirmed
    assert "while the others aborted their step" in confirmed[0]["reason"], confirmed[0]
    assert confirmed[0]["t"] - killed_at < 8.0, "the loss was confirmed by the run.timeout_s fallback"
    fin = next(e for e in events if e["event"] == "recovery_finished")
    assert fin["strategy"] == "mirror" and fin["exact"]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(len(steps))) and len(steps) > 5  # every step committed once, in order


def joined_processes(address: str) -> list[int]:
    """Pids of the worker processes (local or joined by hand) whose command line joins ``address``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if address.encode() in argv and any(b"spotpipe" in a for a in argv) and b"--join" in argv:
            pids.append(int(entry))
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"]


@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
@pytest.mark.parametrize("moment", ["training", "recovery"])
def test_workers_that_lose_the_controller_exit_with_one_line(
    moment: str, tmp_path: Path, token_dir: Path, spotpipe_env: dict[str, str], helpers: Any
) -> None:
    """Issue 10, section 2: SIGKILL of `spotpipe train` itself, while training or while a stage
    recovery is under way. Every worker (local ones, the warm spare, one joined by hand) exits
    within seconds with one line naming the controller's address, no traceback, non-zero."""
    run_dir = tmp_path / "run"
    sets = ["run.local_workers=3", "ft.strategy=mirror", "train.eval_every=0"]
    if moment == "recovery":
        sets.append('ft.faults=["stage=2@step=4"]')
    proc = start_long_run(run_dir, token_dir, spotpipe_env, helpers, *sets)
    remote = None
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "job.token").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        address = next(r["address"] for r in helpers.read_events(run_dir) if r["event"] == "run_start")
        # The remote worker joins once the local ones hold their roles, so it gets the last stage
        # and is never the fault's victim (stage 2): it must meet the controller's loss.
        while sum(1 for e in helpers.read_events(run_dir) if e["event"] == "worker_start") < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "the local workers did not start"
            time.sleep(0.05)
        remote = subprocess.Popen(
            helpers.spotpipe_cmd("worker", "--join", address, "--token-file", str(run_dir / "job.token")),
            env=spotpipe_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        wait_for_steps(run_dir, proc, helpers, 3)
        if moment == "recovery":
            deadline = time.monotonic() + 60
            while not any(e["event"] == "recovery_started" for e in helpers.read_events(run_dir)):
                assert time.monotonic() < deadline and proc.poll() is None, "no recovery started"
                time.sleep(0.005)
        else:
            wait_for_warm_spare(run_dir, proc)  # the spare is in its role wait, not still starting
        before = joined_processes(address)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=10)
        while joined_processes(address) and time.monotonic() - killed < 20:
            time.sleep(0.1)
        left = joined_processes(address)
        exit_s = time.monotonic() - killed
        r_out, r_err = remote.communicate(timeout=30)
    finally:
        for p in (proc, remote):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for pid in joined_processes(address) if "address" in locals() else []:
            os.kill(pid, signal.SIGKILL)
    # 3 local workers, the spare, the one joined by hand (less the one killed by the fault)
    assert len(before) >= (5 if moment == "training" else 4), before
    assert not left and exit_s < 15, (left, exit_s)
    line = f"lost the controller at {address} ("
    errors = [ln for ln in r_err.splitlines() if ln.strip()]
    assert remote.returncode == 4 and len(errors) == 1, (remote.returncode, r_err[-2000:])
    assert errors[0].startswith("spotpipe worker: error: worker ") and line in errors[0] and errors[0].endswith("; exiting")
    events = helpers.read_events(run_dir)
    killed_pids = {e["pid"] for e in events if e["event"] == "fault_injected"}
    logs = sorted((run_dir / "logs").glob("worker-*.log"))
    said = 0
    for log in logs:
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, (log.name, text[-2000:])
        errs = [ln for ln in text.splitlines() if "error:" in ln]
        assert len(errs) <= 1, (log.name, errs)
        if errs:
            assert line in errs[0], errs
            said += 1
    assert said >= len(logs) - len(killed_pids), [log.read_text()[-300:] for log in logs]
    assert any("spare worker" in log.read_text() and line in log.read_text() for log in logs), "the spare did not say it"


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture()
def run_cli(spotpipe_env: dict[str, str], helpers: Any, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(helpers.spotpipe_cmd(*args), capture_output=True, text=True, timeout=120,
                              env=env or spotpipe_env, cwd=tmp_path)

    return run


def train_args(token_dir: Path, run_dir: Path, helpers: Any, *sets: str) -> list[str]:
    args = ["train"]
    for s in [*helpers.tiny, f"data.path={token_dir}", f"run.dir={run_dir}", *sets]:
        args += ["--set", s]
    return args


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "sets,needles",
    [
        (["model.foo=1"], ["unknown key model.foo", "known keys of [model]"]),
        (["pipeline.stages=16"], ["pipeline.stages (16)", "model.layers (8)"]),
        (["pipeline.microbatches=0"], ["pipeline.microbatches must be >= 1"]),
        (["run.backend=mpi"], ["run.backend must be auto, gloo or nccl"]),
        (["data.path=/nonexistent/corpus.txt"], ["data.path /nonexistent/corpus.txt does not exist"]),
    ],
)
def test_bad_config_is_one_line(sets: list[str], needles: list[str], run_cli: Any, token_dir: Path, tmp_path: Path, helpers: Any) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*train_args(token_dir, run_dir, helpers, *sets))
    helpers.assert_one_line_error(proc, *needles)
    assert not (run_dir / "logs").exists(), "no worker may start for a bad config"


@pytest.mark.timeout(120)
def test_port_in_use_is_one_line(run_cli: Any, token_dir: Path, tmp_path: Path, helpers: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(*train_args(token_dir, tmp_path / "run", helpers, f"run.port={port}"))
    helpers.assert_one_line_error(proc, f"127.0.0.1:{port}", "already in use", "run.port")
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.timeout(120)
def test_bad_token_files_are_one_line(run_cli: Any, tmp_path: Path, helpers: Any) -> None:
    proc = run_cli("worker", "--join", "127.0.0.1:9", "--token-file", str(tmp_path / "missing.token"))
    helpers.assert_one_line_error(proc, "token file", "missing.token does not exist")
    corrupt = tmp_path / "corrupt.token"
    corrupt.write_text("not a token\n")
    proc = run_cli("worker", "--join", "127.0.0.1:9", "--token-file", str(corrupt))
    helpers.assert_one_line_error(proc, "corrupt.token is malformed")
    proc = run_cli("worker", "--join", "nowhere", "--token-file", str(corrupt))
    helpers.assert_one_line_error(proc, "expected HOST:PORT")


@pytest.mark.timeout(300)
def test_bad_checkpoints_are_one_line(interrupted_run: dict[str, Any], run_cli: Any, tmp_path: Path, helpers: Any) -> None:
    source = interrupted_run["run_dir"]
    # A flipped byte in the newest checkpoint's file.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt, ignore=shutil.ignore_patterns("logs"))
    newest = sorted((corrupt / "checkpoints").iterdir())[-1]
    victim = newest / "rank1.pt"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_cli("train", "--resume", str(corrupt))
    helpers.assert_one_line_error(proc, "rank1.pt is corrupt", "SHA-256")
    assert not (corrupt / "logs").exists()
    # No checkpoint at all.
    empty = tmp_path / "empty"
    shutil.copytree(source, empty, ignore=shutil.ignore_patterns("logs", "checkpoints"))
    proc = run_cli("train", "--resume", str(empty))
    helpers.assert_one_line_error(proc, "no complete checkpoint")
    # Not a run directory.
    proc = run_cli("train", "--resume", str(tmp_path))
    helpers.assert_one_line_error(proc, "not a spotpipe run directory")
    # A new run may not overwrite an existing one.
    proc = run_cli("train", "--set", f"run.dir={source}")
    helpers.assert_one_line_error(proc, "already holds a run", f"--resume {source}")
    # A checkpoint that does not fit the job.
    proc = run_cli("train", "--resume", str(source), "--set", "model.d_model=64")
    helpers.assert_one_line_error(proc, "model.d_model = 32", "this job has 64")


@pytest.mark.timeout(240)
def test_train_says_what_auto_picked_and_a_resume_does_not_replay_injected_faults(
    tmp_path: Path, token_dir: Path, train: Any, helpers: Any
) -> None:
    """`pipeline.schedule = auto` names the plan it picked before the job starts; `--resume` of a
    run with injected faults does not kill the same worker at the same step again (it says so)."""
    from spotpipe.runtime.control.job import prepare_run

    auto = prepare_run(None, [*helpers.tiny, f"data.path={token_dir}", f"run.dir={tmp_path / 'auto'}",
                              "pipeline.schedule=auto", "pipeline.memory_budget_gb=0.05"], None)
    assert auto.cfg.pipeline.schedule != "auto"
    assert [n for n in auto.notes if n.startswith(f"pipeline.schedule = auto picked {auto.cfg.pipeline.schedule}")]
    run_dir = tmp_path / "faulty"
    first = train(run_dir, "train.steps=12", "train.checkpoint_every=5", "ft.strategy=none", 'ft.faults=["stage=1@step=7"]')
    assert first.returncode == 2 and "died (killed by SIGKILL)" in first.stderr, first.stderr[-2000:]
    again = train(run_dir, resume=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "note: the run's injected faults (ft.faults = ['stage=1@step=7']) are not replayed on --resume" in again.stdout
    steps = [e["step"] for e in helpers.read_events(run_dir) if e["event"] == "step"]
    assert steps[-1] == 11
