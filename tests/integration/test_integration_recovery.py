"""Stage loss without checkpoints on real worker processes (issue 5, "Must show").

Real 4-stage CPU jobs over gloo; the controller kills workers with SIGKILL (``--fail``). After a
loss the job goes on in a new generation with a replacement process; the survivors keep their
processes. Checked from the event log: every committed step appears once, in order, with the
same sampler positions as a failure-free run (each training sample used exactly once), and with
``replica`` or ``mirror`` (``mirror_every = 1``) the per-step losses and the final weights and
optimizer state (the last checkpoint) equal the failure-free run's bit for bit. Kills land at a
random moment or, with ``phase=``, inside the forward, the backward, the step's all-reduce or
the optimizer step (the victim SIGKILLs itself there, :mod:`spotpipe.runtime.worker.phase_fault`).
Two adjacent stages lost together under ``checkfree`` roll back to the checkpoint and say so.
CheckFree+ rebuilds a lost edge stage from its swap partner and keeps the embedding and head
copies equal through a CheckFree rebuild of the stage that holds one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

STEPS = 16
BASE = [f"train.steps={STEPS}", "train.eval_every=0", "train.warmup_steps=3", "train.checkpoint_every=100"]  # final checkpoint only
PHASE_KILLS = ["stage=1@step=3,phase=forward", "stage=2@step=6,phase=backward", "stage=3@step=9,phase=allreduce",
               "stage=0@step=12,phase=optimizer"]


def _run(train: Callable[..., Any], run_dir: Path, *sets: str) -> Any:
    proc = train(run_dir, *BASE, *sets, timeout=150)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert f"finished: {STEPS} steps" in proc.stdout, proc.stdout[-2000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, train: Callable[..., Any]) -> Callable[[int], Path]:
    """Failure-free runs (one per replica count), run lazily once."""
    done: dict[int, Path] = {}

    def get(replicas: int) -> Path:
        if replicas not in done:
            run_dir = tmp_path_factory.mktemp("ref") / f"ref{replicas}"
            _run(train, run_dir, f"pipeline.replicas={replicas}", "ft.strategy=none")
            done[replicas] = run_dir
        return done[replicas]

    return get


def committed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "step"]


def check_survival(run_dir: Path, ref_dir: Path, helpers: Any, world: int, lost: int = 1) -> list[dict[str, Any]]:
    """The job went on: one new generation per loss, one replacement per loss, survivors kept
    their processes, every step committed once with the failure-free run's sampler positions."""
    events = helpers.read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds.count("fault_injected") == lost and kinds.count("failure_confirmed") == lost, kinds
    gens = [e for e in events if e["event"] == "generation"]
    assert len(gens) == lost + 1, gens
    starts = [e for e in events if e["event"] == "worker_start"]
    assert len(starts) == world + lost  # only the replacements are new processes
    killed = {e["worker"] for e in events if e["event"] == "fault_injected"}
    pid_of = {e["worker"]: e["pid"] for e in starts}
    for before, after in zip(gens, gens[1:]):
        survivors = [w for w in before["workers"] if w not in killed]
        assert set(survivors) <= set(after["workers"]), "a survivor was replaced"
        new_pids = {pid_of[w] for w in after["workers"] if w not in before["workers"]}
        assert len(new_pids) == 1 and not new_pids & {pid_of[w] for w in survivors}
    steps = committed(events)
    assert [e["step"] for e in steps] == list(range(STEPS)), "a committed step was lost or committed twice"
    ref_steps = committed(helpers.read_events(ref_dir))
    assert [e["sampler"] for e in steps] == [e["sampler"] for e in ref_steps], "samples skipped or seen twice"
    assert kinds.count("recovery_started") == lost and kinds.count("recovery_finished") == lost
    assert kinds.count("step_replayed") >= 1
    return events


def final_state(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Every rank's weights, AdamW state and sampler position from the run's last checkpoint."""
    from spotpipe.runtime.state.checkpoint import latest_checkpoint, load_state

    manifest = latest_checkpoint(run_dir)
    assert manifest is not None and manifest.step == STEPS - 1, manifest
    return {rank: load_state(manifest.path(rank)) for rank in manifest.files}


def assert_same_state(got: Any, want: Any, where: str = "") -> None:
    """Equal bit for bit, recursively (tensors with torch.equal)."""
    import torch

    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert sorted(map(str, got)) == sorted(map(str, want)), where
        for k in want:
            assert_same_state(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


def _stage_state(run_dir: Path, rank: int) -> Any:
    """Rank ``rank``'s StageState (one chunk per rank) from the run's last checkpoint, built as the
    worker builds it (CheckFree+ edge copies included) and loaded from the flat checkpoint form."""
    from spotpipe.config import load_config
    from spotpipe.model.stages import build_stage
    from spotpipe.ft.policy import swap_schedule_on
    from spotpipe.runtime.state.optimizer import ChunkAdamW
    from spotpipe.runtime.state.stage_state import StageState

    cfg = load_config(run_dir / "config.toml")
    chunk = build_stage(cfg.model, cfg.train.seed, rank, cfg.pipeline.stages, edge_copies=swap_schedule_on(cfg.ft))
    state = StageState({rank: chunk}, ChunkAdamW({rank: chunk}, cfg.train))
    state.load_checkpoint(final_state(run_dir)[rank]["state"], f"rank {rank}")
    return state


def assert_final_weights_equal(run_dir: Path, ref_dir: Path) -> None:
    """Every rank's stage state (weights, AdamW moments and steps, lr factors: the one flat
    serialisation of StageState) and sampler position equal the reference's bit for bit."""
    got, want = final_state(run_dir), final_state(ref_dir)
    assert sorted(got) == sorted(want)
    for rank in want:
        for part in ("state", "sampler"):
            assert_same_state(got[rank][part], want[rank][part], f"rank {rank} {part}")


@pytest.mark.timeout(240)
def test_replica_recovery_after_kills_at_a_random_moment_and_mid_optimizer_is_exact(
    tmp_path: Path, train: Callable[..., Any], reference: Callable[[int], Path], helpers: Any
) -> None:
    run_dir = tmp_path / "replica"
    proc = _run(train, run_dir, "pipeline.replicas=2", "ft.strategy=replica",
                'ft.faults=["stage=1,replica=0@random", "stage=2,replica=1@step=12,phase=optimizer"]')
    events = check_survival(run_dir, reference(2), helpers, world=8, lost=2)
    fins = [e for e in events if e["event"] == "recovery_finished"]
    assert all(e["strategy"] == "replica" and e["exact"] and e["bytes"] > 0 for e in fins), fins
    assert "recovered 1 lost worker by replica" in proc.stdout
    ref = helpers.step_losses(reference(2))
    got = helpers.step_losses(run_dir)
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6 * max(1.0, max(abs(v) for v in ref.values()))
    assert_final_weights_equal(run_dir, reference(2))
    assert "ETTR" in proc.stdout


@pytest.mark.timeout(300)
def test_mirror_recovery_after_kills_in_every_phase_equals_the_failure_free_run(
    tmp_path: Path, train: Callable[..., Any], reference: Callable[[int], Path], helpers: Any
) -> None:
    """Four kills, one per phase of a step, each in another stage; every lost stage is copied
    from the mirror its predecessor replays (exact even when the victim dies in its optimizer
    step: the step commits, and its gradient already reached the mirror)."""
    run_dir = tmp_path / "mirror"
    faults = ", ".join(f'"{f}"' for f in PHASE_KILLS)
    _run(train, run_dir, "ft.strategy=mirror", "ft.mirror_every=1", f"ft.faults=[{faults}]")
    events = check_survival(run_dir, reference(1), helpers, world=4, lost=len(PHASE_KILLS))
    phases = [e.get("phase") for e in events if e["event"] == "fault_injected"]
    assert phases == ["forward", "backward", "allreduce", "optimizer"], phases
    fins = [e for e in events if e["event"] == "recovery_finished"]
    assert all(e["strategy"] == "mirror" and e["exact"] for e in fins), fins
    # The optimizer-phase kill came after the commit decision: that step is not replayed.
    replayed = {e["step"] for e in events if e["event"] == "step_replayed"}
    assert {3, 6, 9} <= replayed and 12 not in replayed, replayed
    ref = helpers.step_losses(reference(1))
    got = helpers.step_losses(run_dir)
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6 * max(1.0, max(abs(v) for v in ref.values()))
    assert_final_weights_equal(run_dir, reference(1))


@pytest.mark.timeout(300)
def test_a_bfloat16_model_recovers_its_float32_masters_from_the_mirror_exactly(
    tmp_path: Path, train: Callable[..., Any], helpers: Any
) -> None:
    """model.dtype = bfloat16 trains with float32 master weights; the mirror holds the masters, so a
    stage lost in its forward pass and one lost in its optimizer step come back bit for bit."""
    import torch

    ref_dir, run_dir = tmp_path / "ref-bf16", tmp_path / "mirror-bf16"
    _run(train, ref_dir, "model.dtype=bfloat16", "ft.strategy=none")
    faults = '"stage=1@step=4,phase=forward", "stage=2@step=9,phase=optimizer"'
    _run(train, run_dir, "model.dtype=bfloat16", "ft.strategy=mirror", f"ft.faults=[{faults}]")
    events = check_survival(run_dir, ref_dir, helpers, world=4, lost=2)
    assert all(e["exact"] for e in events if e["event"] == "recovery_finished")
    ref, got = helpers.step_losses(ref_dir), helpers.step_losses(run_dir)
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6 * max(1.0, max(abs(v) for v in ref.values()))
    assert_final_weights_equal(run_dir, ref_dir)
    # the checkpoint holds float32 masters, not the bf16 weights the forward uses
    flat = final_state(run_dir)[1]["state"]["flat"]
    assert flat.dtype == torch.float32 and not torch.equal(flat, flat.to(torch.bfloat16).float())


@pytest.mark.timeout(240)
def test_checkfree_rebuilds_a_middle_stage_and_training_goes_on(
    tmp_path: Path, train: Callable[..., Any], reference: Callable[[int], Path], helpers: Any
) -> None:
    run_dir = tmp_path / "checkfree"
    _run(train, run_dir, "ft.strategy=checkfree", 'ft.faults=["stage=2@random"]')
    events = check_survival(run_dir, reference(1), helpers, world=4)
    fin = next(e for e in events if e["event"] == "recovery_finished")
    assert fin["strategy"] == "checkfree" and not fin["exact"]
    ref = helpers.step_losses(reference(1))
    got = helpers.step_losses(run_dir)
    fault = next(e for e in events if e["event"] == "fault_injected")
    before = [k for k in ref if k < fault["step"]]
    assert all(abs(got[k] - ref[k]) <= 1e-6 for k in before)  # identical until the loss
    last = STEPS - 1
    assert got[last] == got[last] and abs(got[last] - ref[last]) < 0.5  # approximate, not garbage


@pytest.mark.timeout(240)
def test_two_adjacent_stages_lost_roll_back_to_the_checkpoint(
    tmp_path: Path, train: Callable[..., Any], reference: Callable[[int], Path], helpers: Any
) -> None:
    run_dir = tmp_path / "adjacent"
    proc = train(run_dir, *BASE, "ft.strategy=checkfree", "train.checkpoint_every=5", 'ft.faults=["stages=1+2@step=8"]', timeout=150)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "rolling back to the checkpoint of step 4" in proc.stdout, proc.stdout
    events = helpers.read_events(run_dir)
    started = [e for e in events if e["event"] == "recovery_started"]
    assert len(started) == 2 and {e["strategy"] for e in started} == {"checkpoint"}
    assert all("rolls back to the checkpoint of step 4" in e["why"] and "adjacent" in e["why"] for e in started)
    replayed = sorted(e["step"] for e in events if e["event"] == "step_replayed")
    assert replayed[0] == 5 and replayed[-1] >= 8
    # The last commit of every step carries the failure-free run's data and (exact rollback) loss.
    last: dict[int, dict[str, Any]] = {}
    for e in committed(events):
        last[e["step"]] = e
    ref = {e["step"]: e for e in committed(helpers.read_events(reference(1)))}
    assert sorted(last) == list(range(STEPS))
    assert all(last[k]["sampler"] == ref[k]["sampler"] for k in ref)
    assert max(abs(last[k]["loss"] - ref[k]["loss"]) for k in ref) <= 1e-6 * 10


@pytest.mark.timeout(240)
def test_checkfree_plus_rebuilds_an_edge_stage_and_keeps_the_copies_equal(
    tmp_path: Path, train: Callable[..., Any], reference: Callable[[int], Path], helpers: Any
) -> None:
    """The swap schedule runs; a lost stage 0 is copied from its swap partner (CheckFree+); a
    lost stage 1, which holds the embedding copy, is rebuilt by CheckFree and gets the exact
    embedding from stage 0, so at the end both copies (and both head copies) are equal."""
    run_dir = tmp_path / "checkfree-plus"
    _run(train, run_dir, "ft.strategy=checkfree+", 'ft.faults=["stage=0@step=4", "stage=1@step=9,phase=backward"]')
    events = check_survival(run_dir, reference(1), helpers, world=4, lost=2)
    fins = [e for e in events if e["event"] == "recovery_finished"]
    assert [(e["stage"], e["strategy"]) for e in fins] == [(0, "checkfree+"), (1, "checkfree")], fins
    state = {r: _stage_state(run_dir, r) for r in range(4)}
    emb = [state[r].chunks[r].embed.weight for r in (0, 1)]
    head = [state[r].chunks[r].head.weight for r in (2, 3)]
    assert emb[0].equal(emb[1]) and head[0].equal(head[1])
    moments = [state[r].optimizer.moments(r, state[r].chunks[r].embed.weight) for r in (0, 1)]
    assert moments[0] is not None and moments[1] is not None
    assert moments[0][0].equal(moments[1][0]) and moments[0][1].equal(moments[1][1]) and moments[0][2] == moments[1][2]
    got = helpers.step_losses(run_dir)
    assert all(v == v for v in got.values()) and got[STEPS - 1] < got[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--set", "ft.strategy=checkfree+", "--set", "pipeline.schedule=interleaved"], ["ft.strategy = checkfree+ needs one chunk per worker"]),
        (["--set", "ft.strategy=checkfree+", "--set", "model.layers=5"], ["swap partners with equal blocks", "stage 0 2 blocks and stage 1 1"]),
        (["--fail", "stage=9@step=3"], ["names stage 9, but stages are 0..3"]),
        (["--fail", "stage=1@sometime"], ["bad fault spec"]),
        (["--fail", "stage=1@step=3,phase=sideways"], ["phase must be one of forward, backward, allreduce, optimizer, recovery"]),
    ],
)
def test_refused_recovery_settings_are_one_line(
    extra: list[str], needles: list[str], token_dir: Path, spotpipe_env: dict[str, str], tmp_path: Path, helpers: Any
) -> None:
    import subprocess

    args = ["train"]
    for s in [*helpers.tiny, f"data.path={token_dir}", f"run.dir={tmp_path / 'run'}"]:
        args += ["--set", s]
    proc = subprocess.run(helpers.spotpipe_cmd(*args, *extra), capture_output=True, text=True, timeout=100,
                          env=spotpipe_env, cwd=tmp_path)
    helpers.assert_one_line_error(proc, *needles)


def _first_event(events: list[dict[str, Any]], trigger: tuple[str, str, int] | None) -> bool:
    """Whether ``events`` hold the trigger ``(event, field, value)`` (None: at once)."""
    if trigger is None:
        return True
    name, key, value = trigger
    return any(e["event"] == name and (not key or e.get(key) == value) for e in events)


def _run_with_kills(run_dir: Path, token_dir: Path, env: dict[str, str], helpers: Any, sets: list[str],
                    kills: list[tuple[tuple[str, str, int] | None, int]]) -> tuple[Any, str, str, list[dict[str, Any]]]:
    """Run a job and SIGKILL, from outside, the newest worker of each stage of ``kills`` as soon as
    its trigger event is in ``events.jsonl``, in order. Returns (process, stdout, stderr, victims)."""
    import os
    import signal
    import subprocess
    import time

    args = ["train"]
    for s in [*helpers.tiny, f"data.path={token_dir}", f"run.dir={run_dir}", *BASE, "ft.strategy=mirror", "ft.mirror_every=1",
              *sets]:
        args += ["--set", s]
    proc = subprocess.Popen(helpers.spotpipe_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=run_dir.parent)
    victims: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 150
        while len(victims) < len(kills) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
            events = helpers.read_events(run_dir) if (run_dir / "events.jsonl").exists() else []
            trigger, stage = kills[len(victims)]
            if events and _first_event(events, trigger):
                victim = [e for e in events if e["event"] == "worker_start" and e["stage"] == stage][-1]
                os.kill(victim["pid"], signal.SIGKILL)
                victims.append(victim)
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out, err, victims


SECOND_LOSS_MOMENTS = {
    # Issue 10, section 1, as reported: stage 3 after step 6 committed, stage 1 as soon as
    # recovery_started is logged (a warm spare already took stage 3: the new generation is being built).
    "issue-recipe": ([], [(("step", "step", 6), 3), (("recovery_started", "", 0), 1)]),
    # Before the plan is published: the second loss right after the first is confirmed.
    "before-the-plan": ([], [(("step", "step", 6), 3), (("failure_confirmed", "", 0), 1)]),
    # While replacements join: stage 1 is killed by the fault injector; no spare, so a new
    # process must start, and stage 3 is killed meanwhile.
    "replacements-join": (["ft.spares=0", 'ft.faults=["stage=1@step=5"]'], [(("recovery_started", "", 0), 3)]),
    # While the next generation's groups are built (its plan is out, a member is gone).
    "groups-built": ([], [(("step", "step", 6), 3), (("generation", "generation", 2), 1)]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moment", sorted(SECOND_LOSS_MOMENTS))
def test_a_second_kill_during_a_recovery_is_recovered_too(
    moment: str, tmp_path: Path, token_dir: Path, spotpipe_env: dict[str, str], reference: Callable[[int], Path], helpers: Any
) -> None:
    """A stage is killed from outside; at one moment of its recovery another stage is killed too.
    The controller adds the second loss (plans again, or recovers the half-built generation in
    turn); both stages come back from their mirrors, with no wait for run.timeout_s, and the
    committed steps, losses and final state equal the failure-free run's."""
    sets, kills = SECOND_LOSS_MOMENTS[moment]
    run_dir = tmp_path / moment
    proc, out, err, victims = _run_with_kills(run_dir, token_dir, spotpipe_env, helpers, sets, kills)
    assert len(victims) == len(kills), (out[-2000:], err[-3000:])
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    assert f"finished: {STEPS} steps" in out, out[-2000:]
    events = helpers.read_events(run_dir)
    confirmed = [e["worker"] for e in events if e["event"] == "failure_confirmed"]
    assert {v["worker"] for v in victims} <= set(confirmed) and len(confirmed) >= 2, confirmed
    fins = [e for e in events if e["event"] == "recovery_finished"]
    assert {e["stage"] for e in fins} >= {1, 3} and all(e["strategy"] == "mirror" and e["exact"] for e in fins), fins
    first_loss = next(e["t"] for e in events if e["event"] == "failure_confirmed")
    last_recovered = fins[-1]["t"]
    assert last_recovered - first_loss < 45, "a recovery waited for run.timeout_s (60 s)"
    steps = committed(events)
    assert [e["step"] for e in steps] == list(range(STEPS))
    assert [e["sampler"] for e in steps] == [e["sampler"] for e in committed(helpers.read_events(reference(1)))]
    ref = helpers.step_losses(reference(1))
    got = helpers.step_losses(run_dir)
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-6 * max(1.0, max(abs(v) for v in ref.values()))
    assert_final_weights_equal(run_dir, reference(1))


def _fds_and_threads(pid: int) -> tuple[int, int] | None:
    """Open descriptors and threads of a live process (None once it exited)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(")")[-1].split()[0] in ("Z", "X"):
                return None
        return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


@pytest.mark.timeout(300)
@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs /proc")
def test_recoveries_leave_no_descriptors_or_threads_behind(
    tmp_path: Path, token_dir: Path, spotpipe_env: dict[str, str], reference: Callable[[int], Path], helpers: Any
) -> None:
    """Issue 10, section 6: stage 2 is lost three times (mirror). The survivors (stages 0, 1, 3)
    and the controller hold as many descriptors and threads after the third recovery as before
    the first: every retired generation's groups (gloo sockets and threads, store connection)
    were released, and the controller keeps no file of a dead worker. Counts are read from /proc
    (the smallest of the samples of a window, so a release thread that is just ending does not count)."""
    import subprocess
    import time

    run_dir = tmp_path / "leak"
    kills = [4, 7, 10]
    args = ["train"]
    faults = ", ".join(f'"stage=2@step={k}"' for k in kills)
    for s in [*helpers.tiny, f"data.path={token_dir}", f"run.dir={run_dir}", *BASE, "ft.strategy=mirror", "ft.mirror_every=1",
              f"ft.faults=[{faults}]"]:
        args += ["--set", s]
    proc = subprocess.Popen(helpers.spotpipe_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=spotpipe_env, cwd=tmp_path)
    before: dict[str, list[tuple[int, int]]] = {}
    after: dict[str, list[tuple[int, int]]] = {}
    try:
        while proc.poll() is None:
            events = helpers.read_events(run_dir) if (run_dir / "events.jsonl").exists() else []
            done = [e["step"] for e in events if e["event"] == "step"]
            recovered = sum(e["event"] == "recovery_finished" for e in events)
            last = done[-1] if done else -1
            if 1 <= last <= kills[0] - 2:
                window: dict[str, list[tuple[int, int]]] | None = before
            elif recovered == len(kills) and kills[-1] + 1 <= last <= STEPS - 3:  # the workers still train
                window = after
            else:
                window = None
            if window is not None:
                pids = {f"stage {e['stage']}": e["pid"] for e in events if e["event"] == "worker_start" and e["stage"] != 2}
                pids["controller"] = proc.pid
                for who, pid in pids.items():
                    got = _fds_and_threads(pid)
                    if got is not None:
                        window.setdefault(who, []).append(got)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    check_survival(run_dir, reference(1), helpers, world=4, lost=len(kills))
    assert set(before) == set(after) == {"stage 0", "stage 1", "stage 3", "controller"}, (before, after)
    for who in before:
        fds0, threads0 = min(f for f, _ in before[who]), min(t for _, t in before[who])
        fds1, threads1 = min(f for f, _ in after[who]), min(t for _, t in after[who])
        assert fds1 <= fds0 + 2 and threads1 <= threads0 + 1, (who, (fds0, threads0), (fds1, threads1))


@pytest.mark.timeout(240)
def test_a_source_lost_while_the_new_generation_installs_is_recovered_in_turn(
    tmp_path: Path, train: Callable[..., Any], reference: Callable[[int], Path], helpers: Any
) -> None:
    """Stage 1 is killed; stage 0, which holds its mirror, dies while sending it (``phase=recovery``).
    The half-installed generation is aborted and recovered in turn: stage 0 from the mirror the
    last stage keeps, stage 1 (its mirror is gone) by CheckFree from stage 0 and stage 2.
    Stage 1 dies in its forward pass of step 5 (a phase fault, not a timed signal that could land
    after step 5 committed), so the recovery surely resumes at step 5, where stage 0's fault waits."""
    run_dir = tmp_path / "install"
    _run(train, run_dir, "ft.strategy=auto", "ft.mirror_every=1", 'ft.faults=["stage=1@step=5,phase=forward", "stage=0@step=5,phase=recovery"]')
    events = helpers.read_events(run_dir)
    phases = [e.get("phase") for e in events if e["event"] == "fault_injected"]
    assert phases == ["forward", "recovery"], phases
    fins = [(e["stage"], e["strategy"]) for e in events if e["event"] == "recovery_finished"]
    assert fins == [(0, "mirror"), (1, "checkfree")], fins
    gens = [e for e in events if e["event"] == "generation"]
    assert len(gens) == 3, gens  # the first, the aborted half-installed one, the recovered one
    steps = committed(events)
    assert [e["step"] for e in steps] == list(range(STEPS))
    assert [e["sampler"] for e in steps] == [e["sampler"] for e in committed(helpers.read_events(reference(1)))]
