"""Unit tests of the controller's recovery state machine (runtime/control/recovery.py).

The supervisor runs against a dict-backed store, a real event log and a small host that plays the
controller's part (generation and step counters, commits), so every moment of a recovery can be
reached deterministically: a loss before the plan is published, while replacements join, while the
new generation installs its state, and a loss of the worker that holds the copy being restored.
Each either recovers (a new generation with a plan for every lost role) or stops at once with one
line naming what cannot be rebuilt: never a wait for a timeout.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spotpipe import events as ev
from spotpipe.config import JobConfig, apply_overrides, load_config
from spotpipe.events import EventLog
from spotpipe.ft.confirm import GROUPING_WINDOW_S, Failure
from spotpipe.runtime import protocol
from spotpipe.runtime.comm.groups import GenerationPlan, Member
from spotpipe.runtime.control.context import ControlContext
from spotpipe.runtime.control.membership import Membership, WorkerState
from spotpipe.runtime.control.progress import Progress
from spotpipe.runtime.control.recovery import RecoverySupervisor
from spotpipe.runtime.state.checkpoint import Manifest
from spotpipe.sim.job import prepare, simulate_job


class DictStore:
    """The store calls the supervisor and membership make, over a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str | bytes) -> None:
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.data[k] for k in keys]

    def add(self, key: str, n: int) -> int:
        value = int(self.data.get(key, b"0")) + n
        self.data[key] = str(value).encode()
        return value

    def delete_key(self, key: str) -> bool:
        return self.data.pop(key, None) is not None


class FakeLocals:
    """Counts the local processes the supervisor asks for."""

    def __init__(self) -> None:
        self.started = 0
        self.procs: list[Any] = []

    def start(self, n: int) -> None:
        self.started += n


class Host:
    """The controller's side of the RecoveryHost / MembershipHost interfaces."""

    def __init__(self, members: Membership | None = None) -> None:
        self.plan: GenerationPlan | None = None
        self.generation = 0
        self.next_step = 0
        self.last_checkpoint: int | None = None
        self.last_manifest: Manifest | None = None
        self.stop_reason = ""
        self.local_count = 4
        self.node_plan = None
        self.members = members
        self.committed: list[int] = []
        self.failures: list[Failure] = []

    def poll_commits(self) -> None:
        pass

    def commit(self, step: int, members: list[Member] | None = None) -> None:
        self.committed.append(step)

    def publish_generation(self, reason: str) -> None:
        assert self.members is not None
        self.generation += 1
        self.plan = GenerationPlan(self.generation, self.members.ctx.cfg.pipeline.stages,
                                   self.members.ctx.cfg.pipeline.replicas, self.members.members())

    def restart_step_clock(self) -> None:
        pass

    def fail(self, failure: Failure) -> None:
        self.failures.append(failure)

    def vacancies(self) -> int:
        return 0

    def steady_step_s(self) -> float | None:
        return None

    def make_grant(self, worker: int, stage: int, replica: int, local: Any) -> dict[str, Any]:
        return {"worker": worker, "stage": stage, "replica": replica}

    def on_failure(self, w: Any, failure: Failure, confirm: bool) -> None:
        self.failures.append(failure)

    def on_exit(self, w: Any) -> None:
        pass


class Job:
    """A 4-stage job in generation 1 with workers 0-3 (stage s = worker s), mid-step ``step``."""

    def __init__(self, tmp_path: Path, strategy: str = "mirror", stages: int = 4, replicas: int = 1, step: int = 7,
                 timeout_s: float = 60.0, checkpoint: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = load_config(None, [f"pipeline.stages={stages}", f"pipeline.replicas={replicas}", f"ft.strategy={strategy}",
                                 f"run.timeout_s={timeout_s}", "model.layers=8"])
        self.store = DictStore()
        self.locals = FakeLocals()
        log = ev.EventLog(tmp_path / "events.jsonl") if clock is time.monotonic else ev.EventLog(tmp_path / "events.jsonl", clock=clock)
        self.ctx = ControlContext(cfg, Progress(10, io.StringIO(), enabled=False), self.store,
                                  log, self.locals)  # type: ignore[arg-type]
        self.host = Host()
        self.members = Membership(self.ctx, self.host, "token", "job", spare_count=0)
        self.host.members = self.members
        self.sup = RecoverySupervisor(self.ctx, self.members, self.host, clock=clock)
        self.tmp = tmp_path
        for replica in range(replicas):
            for stage in range(stages):
                wid = replica * stages + stage
                self.members.workers[wid] = WorkerState(wid, stage, replica, "h", 1000 + wid, None)
                self.members.role_of[(stage, replica)] = wid
        self.host.next_step = step
        if checkpoint is not None:
            self.host.last_checkpoint = checkpoint
            self.host.last_manifest = Manifest(tmp_path / "ckpt", checkpoint, {}, {})
        self.host.publish_generation("initial membership")
        self.step = step
        self._next_id = stages * replicas

    def lose(self, wid: int) -> None:
        """Worker ``wid`` is confirmed lost (its process died)."""
        self.sup.start(self.members.workers[wid], f"worker {wid} died")

    def survivors_post(self, generation: int, mirror_step: int | None = None, skip: tuple[int, ...] = ()) -> None:
        rec = self.sup.recovering
        assert rec is not None
        for wid in self.members.workers:
            if wid in rec.lost or wid in skip:
                continue
            body = {"step": self.step, "sampler": {"pos": self.step}, "mirror_step": self.step - 1 if mirror_step is None else mirror_step}
            self.store.set(protocol.survivor_key(generation, wid), json.dumps(body))

    def drive(self, wait_window: bool = True) -> None:
        if wait_window:
            rec = self.sup.recovering
            if rec is not None:
                rec.last_loss_at = time.monotonic() - GROUPING_WINDOW_S - 0.01
        self.sup.drive()

    def join_replacements(self) -> list[int]:
        """New workers take every free role (as replacement processes would)."""
        joined = []
        for role in [(s, r) for r in range(self.ctx.cfg.pipeline.replicas) for s in range(self.ctx.cfg.pipeline.stages)]:
            if role not in self.members.role_of:
                wid = self._next_id
                self._next_id += 1
                self.members.workers[wid] = WorkerState(wid, role[0], role[1], "h", 2000 + wid, None)
                self.members.role_of[role] = wid
                joined.append(wid)
        return joined

    def record(self, generation: int) -> dict[str, Any]:
        return json.loads(self.store.get(protocol.recovery_key(generation)))

    def install_all(self, generation: int, skip: tuple[int, ...] = ()) -> None:
        assert self.host.plan is not None
        for m in self.host.plan.members:
            if m.worker not in skip:
                self.store.set(protocol.recovered_key(generation, m.worker), json.dumps({"bytes": 100}))

    def events(self, name: str) -> list[dict[str, Any]]:
        self.ctx.log.sync()  # type: ignore[union-attr]
        return ev.read_events(self.tmp / "events.jsonl", name)


def test_one_loss_recovers_by_mirror_through_every_phase(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.lose(2)
    rec = job.sup.recovering
    assert rec is not None and rec.phase == "collect"
    assert job.store.check([protocol.abort_key(1)])  # the generation is aborted at once
    job.drive()
    assert rec.phase == "collect"  # survivors have not posted yet
    job.survivors_post(1)
    job.drive()
    assert rec.phase == "replace" and job.host.plan is None
    assert [p.strategy for p in rec.plans] == ["mirror"]
    assert job.locals.started == 1  # no spare: one new process
    started = job.events("recovery_started")
    assert [(e["stage"], e["strategy"], e["replanned"]) for e in started] == [(2, "mirror", False)]
    job.drive()
    assert rec.phase == "replace"  # waits for the replacement
    [new] = job.join_replacements()
    job.drive()
    assert rec.phase == "install" and job.host.generation == 2
    record = job.record(2)
    assert record["plans"] == [{"worker": new, "stage": 2, "replica": 0, "strategy": "mirror", "sources": [1], "lr_scale": 1.0}]
    assert record["resume_step"] == job.step
    job.install_all(2)
    job.drive()
    assert job.sup.recovering is None and not job.host.failures
    [done] = job.events("recovery_finished")
    assert done["worker"] == new and done["bytes"] == 100


def test_checkfree_plan_carries_its_learning_rate_factor(tmp_path: Path) -> None:
    job = Job(tmp_path, strategy="checkfree")
    job.lose(1)
    job.survivors_post(1)
    job.drive()
    job.join_replacements()
    job.drive()
    [plan] = job.record(2)["plans"]
    assert plan["strategy"] == "checkfree" and plan["sources"] == [0, 2] and plan["lr_scale"] == pytest.approx(1.1)


def test_second_loss_before_the_plan_is_one_failure(tmp_path: Path) -> None:
    """Lost within the grouping window, before survivors posted: planned together."""
    job = Job(tmp_path)
    job.lose(3)
    job.lose(1)
    job.survivors_post(1)
    job.drive()
    rec = job.sup.recovering
    assert rec is not None and rec.phase == "replace"
    assert sorted((p.stage, p.strategy) for p in rec.plans) == [(1, "mirror"), (3, "mirror")]
    assert job.locals.started == 2


def test_grouping_window_delays_the_plan(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.lose(3)
    job.survivors_post(1)
    job.drive(wait_window=False)  # within the window: a second loss may still belong to this failure
    assert job.sup.recovering is not None and job.sup.recovering.phase == "collect"


def test_second_loss_while_replacements_join_replans(tmp_path: Path) -> None:
    """Issue scenario: stage 3 lost, then stage 1 as soon as recovery_started appears."""
    job = Job(tmp_path)
    job.lose(3)
    job.survivors_post(1)
    job.drive()
    rec = job.sup.recovering
    assert rec is not None and rec.phase == "replace"
    job.lose(1)
    assert rec.phase == "replace"
    assert sorted((p.stage, p.strategy) for p in rec.plans) == [(1, "mirror"), (3, "mirror")]
    started = job.events("recovery_started")
    assert [e["replanned"] for e in started] == [False, True, True]
    assert job.locals.started == 2  # one more process for the newly lost role only
    new = job.join_replacements()
    job.drive()
    assert rec.phase == "install" and job.host.generation == 2 and len(new) == 2
    record = job.record(2)
    by_stage = {p["stage"]: p for p in record["plans"]}
    assert by_stage[1]["sources"] == [0] and by_stage[3]["sources"] == [2]
    job.install_all(2)
    job.drive()
    assert job.sup.recovering is None and not job.host.failures


def test_losing_the_mirror_holder_while_replacements_join_falls_back(tmp_path: Path) -> None:
    """Stage 2 lost, then stage 1 (which holds stage 2's mirror): stage 2 can no longer be copied
    from its mirror; with two adjacent stages lost and no checkpoint the job stops at once."""
    job = Job(tmp_path)
    job.lose(2)
    job.survivors_post(1)
    job.drive()
    job.lose(1)
    assert job.host.failures, "must stop at once, not wait for run.timeout_s"
    assert "cannot recover" in job.host.failures[0].reason


def test_losing_the_mirror_holder_with_a_checkpoint_rolls_back(tmp_path: Path) -> None:
    job = Job(tmp_path, checkpoint=4)
    job.lose(2)
    job.survivors_post(1)
    job.drive()
    job.lose(1)
    rec = job.sup.recovering
    assert rec is not None and not job.host.failures
    assert {p.strategy for p in rec.plans} == {"checkpoint"}
    job.join_replacements()
    job.drive()
    record = job.record(2)
    assert record["outcome"] == "rollback" and record["checkpoint"]["step"] == 4
    assert job.host.next_step == 5


def test_loss_while_installing_restarts_from_the_new_generation(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.lose(3)
    job.survivors_post(1)
    job.drive()
    [new] = job.join_replacements()
    job.drive()
    rec = job.sup.recovering
    assert rec is not None and rec.phase == "install" and job.host.generation == 2
    job.lose(1)  # a survivor dies while the replacement installs its state
    again = job.sup.recovering
    assert again is not None and again is not rec and again.generation == 2
    assert set(again.lost) == {1, new}  # the replacement's state is void: lost too
    assert job.store.check([protocol.abort_key(2)])
    job.survivors_post(2)
    job.drive()
    # stage 2 still holds the mirror of stage 3 (no step committed since): both are copies again
    assert sorted((p.stage, p.strategy) for p in again.plans) == [(1, "mirror"), (3, "mirror")]
    assert again.resume_step == job.step  # the same step is replayed
    job.join_replacements()
    job.drive()
    assert again.phase == "install" and job.host.generation == 3
    job.install_all(3)
    job.drive()
    assert job.sup.recovering is None and not job.host.failures


def test_replacement_installed_before_the_loss_is_kept(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.lose(3)
    job.survivors_post(1)
    job.drive()
    [new] = job.join_replacements()
    job.drive()
    job.store.set(protocol.recovered_key(2, new), json.dumps({"bytes": 5}))
    job.lose(0)
    again = job.sup.recovering
    assert again is not None and set(again.lost) == {0}


def test_survivors_that_never_post_time_out_with_one_line(tmp_path: Path) -> None:
    job = Job(tmp_path, timeout_s=1.0)
    job.lose(2)
    rec = job.sup.recovering
    assert rec is not None
    rec.started -= 2.0
    job.drive()
    [failure] = job.host.failures
    assert "timed out" in failure.reason and "run.timeout_s" in failure.reason


def test_replica_strategy_takes_the_live_replica(tmp_path: Path) -> None:
    job = Job(tmp_path, strategy="replica", stages=2, replicas=2)
    job.lose(3)  # stage 1, replica 1
    job.survivors_post(1)
    job.drive()
    job.join_replacements()
    job.drive()
    [plan] = job.record(2)["plans"]
    assert plan["strategy"] == "replica" and plan["sources"] == [1]


def test_every_strategy_that_moves_state_has_a_runtime_half() -> None:
    """The pure registry and the runtime registry name the same strategies (checkpoint reloads files)."""
    from spotpipe.ft.strategies import REGISTRY as PURE
    from spotpipe.runtime.worker.strategies import REGISTRY as RUNTIME

    assert set(RUNTIME) == {name for name, s in PURE.items() if s.rebuilds}


def test_install_aborted_by_every_member_without_a_loss_stops_at_once(tmp_path: Path) -> None:
    """The state transfer failed though no worker was lost (every member of the new generation
    posted that it aborted it): nothing the controller waits for can change, so the job stops at
    once with one line naming the stage and the members' error, not after run.timeout_s."""
    job = Job(tmp_path)
    job.lose(3)
    job.survivors_post(1)
    job.drive()
    job.join_replacements()
    job.drive()
    rec = job.sup.recovering
    assert rec is not None and rec.phase == "install" and job.host.plan is not None
    members = [m.worker for m in job.host.plan.members]
    for wid in members[:-1]:  # not every member yet: the others may still install
        job.store.set(protocol.survivor_key(2, wid), json.dumps({"step": job.step, "error": "mirror unusable"}))
    job.drive()
    assert not job.host.failures and job.sup.recovering is rec
    job.store.set(protocol.survivor_key(2, members[-1]), json.dumps({"step": job.step, "error": "mirror unusable"}))
    job.drive()
    [failure] = job.host.failures
    assert failure.reason.startswith("cannot rebuild stage 3: every member of generation 2 aborted")
    assert "mirror unusable" in failure.reason and "timed out" not in failure.reason


def test_a_suspect_that_beats_again_is_cleared_and_counted(tmp_path: Path) -> None:
    """Issue 10, section 5: a late heartbeat is logged as failure_suspected; when the worker beats
    again the suspicion is cleared (an event, and a count the run summary shows), no failure."""
    job = Job(tmp_path)
    for w in job.members.workers.values():
        w.last_beat = 100.0
    job.store.add(protocol.heartbeat_key(2), 0)
    for wid in (0, 1, 3):  # the others beat on time
        job.store.add(protocol.heartbeat_key(wid), 1)
    job.members.check_health(104.0)  # worker 2 silent for 4 s > ft.detect_timeout_s (2 s)
    [suspected] = job.events("failure_suspected")
    assert suspected["worker"] == 2 and job.members.workers[2].suspected
    assert job.members.suspicions_cleared == 0 and not job.host.failures
    job.store.add(protocol.heartbeat_key(2), 1)
    job.members.check_health(105.0)
    [cleared] = job.events("suspicion_cleared")
    assert cleared["worker"] == 2 and cleared["silent_s"] == pytest.approx(5.0)
    assert job.members.suspicions_cleared == 1 and not job.members.workers[2].suspected and not job.host.failures
    job.members.check_health(105.5)  # no new silence: nothing more
    assert job.members.suspicions_cleared == 1


def test_run_summary_says_how_many_suspicions_were_cleared() -> None:
    from spotpipe.runtime.control.progress import RunResult, format_result

    quiet = format_result(RunResult("finished", Path("runs/x"), last_step=9, wall_s=5.0))
    assert "suspected" not in quiet
    line = format_result(RunResult("finished", Path("runs/x"), last_step=9, wall_s=5.0, suspicions_cleared=2))
    assert "2 suspected failures cleared (late heartbeats, no failure" in line


def test_a_loss_that_extends_a_recovery_gives_its_waits_the_whole_timeout(tmp_path: Path) -> None:
    """A recovery that started long ago and is extended (or restarted) by another loss starts new
    processes: they get run.timeout_s from that loss, not what is left since the first one."""
    job = Job(tmp_path, timeout_s=10.0)
    job.lose(3)
    job.survivors_post(1)
    job.drive()
    rec = job.sup.recovering
    assert rec is not None and rec.phase == "replace"
    rec.started -= 9.5  # the replacement has been starting for 9.5 s of the 10 s
    job.lose(1)  # another loss while it joins: replanned, one more process
    rec.started -= 1.0  # 10.5 s since the first loss, 1 s since the second
    job.drive()
    assert not job.host.failures and rec.phase == "replace"
    rec.waiting_since -= 10.5
    job.drive()
    [failure] = job.host.failures
    assert "timed out" in failure.reason and "replacement workers to join" in failure.reason


class _RefusedLocal:
    """A local replacement process that exited before it joined (the controller refused it)."""

    pid = 4242
    index = 5

    def returncode(self) -> int | None:
        return 2

    def last_log_line(self) -> str:
        return "spotpipe worker: error: the controller refused this worker: the job is stopping"


def test_a_replacement_refused_because_the_job_is_stopping_is_no_failure(tmp_path: Path) -> None:
    """A replacement process started for a recovery can join after the job began to stop
    (train.max_minutes, Ctrl-C, the last step): it is refused, naming the stop, and exits. That
    exit must not fail a job that finishes (a quick recovery bench run exited 2 this way); the same
    exit while the job runs is still a failure, named."""
    job = Job(tmp_path)
    for w in job.members.workers.values():
        w.last_beat = 100.0
        job.store.add(protocol.heartbeat_key(w.worker), 1)
    job.host.stop_reason = "time"
    job.members._answer_join({"host": "h", "pid": 4242, "proof": protocol.join_proof("token", "job", "n1")}, "n1")
    [refused] = job.events("join_refused")
    assert refused["reason"] == "the job is stopping"
    job.locals.procs.append(_RefusedLocal())
    job.members.check_health(100.5)
    assert job.host.failures == []
    job.host.stop_reason = ""
    job.members.check_health(100.6)
    [failure] = job.host.failures
    assert failure.reason == ("local worker 5 (pid 4242) exited before it held a role (exit code 2): spotpipe worker: error: "
                              "the controller refused this worker: the job is stopping")


class _KilledLocal:
    """A local process without a role (a spare, or a replacement still starting) killed by SIGKILL."""

    def __init__(self, pid: int, index: int) -> None:
        self.pid, self.index = pid, index

    def returncode(self) -> int | None:
        return -9

    def last_log_line(self) -> str:
        return "spare worker 9: warm, waiting for a role"


def test_a_spare_or_starting_replacement_killed_is_replaced_and_the_job_goes_on(tmp_path: Path) -> None:
    """A role-less local process lost to a signal held no state: another is started, once per
    loss, and nothing fails; a dead warm spare is never handed a role. One that exits with an
    error still stops the job (it would fail again)."""
    job = Job(tmp_path)
    for w in job.members.workers.values():
        w.last_beat = 100.0
        job.store.add(protocol.heartbeat_key(w.worker), 1)
    before = job.locals.started
    job.locals.procs.append(_KilledLocal(5151, 7))
    job.members.check_health(100.5)
    job.members.check_health(100.6)  # the same loss is not replaced twice
    assert job.host.failures == [] and job.locals.started == before + 1
    spare_proc = _KilledLocal(5252, 8)
    spare = WorkerState(99, -1, -1, "h", 5252, spare_proc, last_beat=100.0)  # type: ignore[arg-type]
    job.members.spares.append(spare)
    job.locals.procs.append(spare_proc)
    job.members.check_health(100.65)
    assert spare not in job.members.spares and job.locals.started == before + 2 and job.host.failures == []
    assert not job.members.take_spare(1, 0)  # no live spare left to take a role
    job.locals.procs.append(_RefusedLocal())
    job.members.check_health(100.7)
    [failure] = job.host.failures
    assert "local worker 5 (pid 4242) exited before it held a role (exit code 2)" in failure.reason


# -- the controller and the simulator group losses alike ---------------------------------------------


class Clock:
    """A clock the test moves: the supervisor's ``clock`` and its event log's."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sim_config(deaths: dict[int, float], *overrides: str) -> JobConfig:
    """A 4-stage simulated job whose nodes ``deaths`` die at the given times; losses are confirmed
    0.05 s after a death (heartbeats every 0.05 s), restarts take 0.02 s on a spare."""
    failures = [f"{node}@{at!r}" for node, at in sorted(deaths.items())]
    base = ["pipeline.stages=4", "pipeline.microbatches=4", "train.batch_size=8", "model.layers=4", "train.steps=40",
            "sim.device_tflops=0.01", "network.latency_ms=2", "run.heartbeat_s=0.05", "ft.detect_timeout_s=0.05",
            "sim.spares=3", "sim.restart_s=0.02", f"sim.failures={failures!r}"]
    return apply_overrides(JobConfig(), base + list(overrides)).validate()


def started_records(records: list[dict[str, Any]]) -> list[tuple[float, int, bool]]:
    """``(t, stage, replanned)`` of every ``recovery_started`` record."""
    return [(round(r["t"], 9), r["stage"], bool(r["replanned"])) for r in records if r["event"] == ev.RECOVERY_STARTED]


def controller_on_sim_timeline(tmp_path: Path, deaths: dict[int, float], sim: list[dict[str, Any]], cfg: JobConfig,
                               ) -> list[tuple[float, int, bool]]:
    """Play the simulated run's losses into the controller's supervisor on a virtual clock.

    Every loss is confirmed when the simulator confirmed it; surviving workers (those not dead by
    then) post their status at once; lost roles are taken by replacements at once when the
    simulated job has a spare for each, else when the simulator's restart began (its generation's
    time less ``sim.restart_s``); the new generation has installed its state when the simulator's
    restart ended. The supervisor is polled every 10 ms and at each
    of those instants, and at the times the simulator planned (so an exact plan time can match).

    Returns:
        The supervisor's ``recovery_started`` records as ``(t, stage, replanned)``.
    """
    clock = Clock()
    job = Job(tmp_path, strategy="checkpoint", checkpoint=4, clock=clock)
    restart_s, spares = cfg.sim.restart_s, cfg.sim.spares >= len(deaths)
    confirms = [(r["t"], r["stage"], r["replica"]) for r in sim if r["event"] == ev.FAILURE_CONFIRMED]
    restarts = [r["t"] for r in sim if r["event"] == ev.GENERATION and r["generation"] > 0]
    plans = [r["t"] for r in sim if r["event"] == ev.RECOVERY_STARTED]
    end = max(restarts + plans + [c[0] for c in confirms]) + 1.0
    ticks = sorted({round(0.01 * k, 9) for k in range(int(end / 0.01) + 1)} | {c[0] for c in confirms}
                   | set(restarts) | {t - restart_s for t in restarts} | set(plans))
    for now in ticks:
        clock.now = now
        for at, stage, replica in confirms:
            if at == now:
                job.lose(job.members.role_of[(stage, replica)])
        rec = job.sup.recovering
        if rec is None:
            continue
        if rec.phase == "collect":
            dead = tuple(w for w, at in deaths.items() if at <= now)
            job.survivors_post(rec.generation, skip=dead)
        job.sup.drive()
        rec = job.sup.recovering
        if rec is not None and rec.phase == "replace" and (spares or any(t - restart_s <= now + 1e-9 for t in restarts)):
            job.join_replacements()
            job.sup.drive()
        rec = job.sup.recovering
        if rec is not None and rec.phase == "install" and restarts and restarts[0] <= now + 1e-9:
            restarts.pop(0)
            job.install_all(job.host.generation)
            job.sup.drive()
    assert not job.host.failures, job.host.failures
    return started_records(job.events(ev.RECOVERY_STARTED))


GROUPING_CASES: dict[str, tuple[dict[int, float], tuple[str, ...], list[list[int]]]] = {
    # name: (node -> death time, simulator overrides, stages of each planning in order)
    "0.1 s apart: one recovery": ({0: 1.0, 1: 1.1}, (), [[0, 1]]),
    "5 s apart: two recoveries": ({0: 1.0, 1: 6.0}, (), [[0], [1]]),
    "just past the window: two": ({0: 1.0, 1: 1.4}, (), [[0], [1]]),
    "a chain, each within the window": ({0: 1.0, 1: 1.2, 2: 1.4}, (), [[0, 1, 2]]),
    "lost while replacements join: replanned": ({0: 1.0, 1: 1.6}, ("sim.spares=0", "sim.replace_s=1.0"), [[0], [0, 1]]),
    "lost while installing: recovered again": ({0: 1.0, 1: 1.6}, ("sim.restart_s=1.0",), [[0], [0, 1]]),
}


@pytest.mark.parametrize("case", list(GROUPING_CASES))
def test_controller_and_simulator_group_losses_alike(tmp_path: Path, case: str) -> None:
    """The same losses at the same times give the same recoveries, planned at the same instants,
    in the controller's supervisor and in the simulator: both follow ft.confirm (loss_action,
    collect_step), so neither can drift from the other. The window itself is asserted by the
    simulator's tests (tests/sim/test_sim_grouping.py)."""
    deaths, overrides, want = GROUPING_CASES[case]
    cfg = sim_config(deaths, *overrides)
    (tmp_path / "sim").mkdir()
    (tmp_path / "ctl").mkdir()
    with EventLog(tmp_path / "sim" / "e.jsonl") as log:
        simulate_job(prepare(cfg), log=log)
    sim = ev.read_events(tmp_path / "sim" / "e.jsonl")
    sim_started = started_records(sim)
    grouped: list[list[int]] = []
    for i, (t, stage, _) in enumerate(sim_started):
        if i and t == sim_started[i - 1][0]:
            grouped[-1].append(stage)
        else:
            grouped.append([stage])
    assert grouped == want
    assert controller_on_sim_timeline(tmp_path / "ctl", deaths, sim, cfg) == sim_started
