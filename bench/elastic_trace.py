"""Replay spot preemptions of the Bamboo p3 trace on real worker processes: elastic vs wait vs checkpoint.

A time-compressed slice of a Bamboo-format preemption trace (Thorpe et al., NSDI'23; default
``../shared/data/bamboo-spot-traces/p3-trace.csv``) is played on a real ``spotpipe train`` job,
in three modes alternated in one run (elastic, wait, checkpoint, then the next round):

* ``elastic``: ``ft.elastic = true``: a lost worker with no replacement makes the job shrink to
  fewer stages after ``ft.replace_wait_s``; a joiner makes it grow back.
* ``wait``: ``ft.elastic = false``, ``ft.strategy = auto`` (mirror with one replica): the lost role
  waits for the next worker that joins, which recovers the stage from its mirror (no rollback).
* ``checkpoint``: ``ft.strategy = checkpoint``, ``train.checkpoint_every = K``: once a
  replacement joins, every worker rolls back to the last checkpoint.

The harness starts the controller with ``run.local_workers = 0`` (it starts no worker itself, so a
lost role really waits for the trace's next addition) and starts EVERY worker with ``python -m
spotpipe worker --join 127.0.0.1:PORT`` (the job token in its environment):

* The trace is thinned to the job's size: the p3 cluster holds up to 32 nodes, far more than the 4
  workers this machine runs, and a job that owned a handful of its nodes would always find an idle
  one. ``--thin N --group G`` keeps the nodes whose order of first appearance is ``G`` modulo
  ``N`` (one of ``N`` jobs sharing the cluster), so the job owns about its share of the nodes.
* The slice starts at ``--start`` trace seconds: the nodes up at that moment are the cluster at
  time 0 (the first ``stages x replicas`` of them are the job's workers, as
  :func:`spotpipe.sim.elastic.trace_events` maps them) and the events follow, divided by
  ``--compress``. The replay lasts ``--seconds`` of wall time, counted from the commit of step
  ``--warmup`` (default ``--checkpoint-every``, in every mode, so the checkpoint mode has a
  checkpoint to roll back to when the first loss comes).
* A ``remove`` of a node that runs a worker is a real SIGKILL of that process; of an idle node, it
  leaves the pool. An ``add`` starts a ``worker --join`` process when the job has fewer live
  workers than its configured size; otherwise the node waits idle in the pool (the simulator's
  standby) and starts a worker at the next loss. A joiner the controller refuses (it came before
  the lost role was freed) goes back to the pool and is started again a second later.

Measured per run from its ``events.jsonl``, over the replay window (``--seconds`` from the commit
of step ``--warmup``): useful samples per second (``progress x train.batch_size / window``, where progress is the
committed step number reached at the end minus the one at the start, so steps rolled back to a
checkpoint do not count) and ETTR (the ``step_time`` of the steps that count / window; the first
step of a generation, which includes the recovery, counts the run's median step time instead).

Predicted: :func:`spotpipe.sim.elastic.simulate_elastic` on the same node events, same window,
calibrated with what the mode's runs measured: the mean steady step time of every shape they ran,
the pause from a replacement's process start to the next commit minus one step (``sim.regroup_s``
for wait, ``sim.restart_s`` for checkpoint), the reshape pause (``reshape.seconds``, elastic) and
the checkpoint write time; the trace's timing, the detection delay, the shapes the policy picks
and the lost work are the simulator's own. ``sim_vs_runtime_error`` is the largest relative error,
over the modes, of the predicted against the measured median useful throughput (calibrated on
the same runs); ``sim_vs_runtime_error_held_out`` calibrates on the other rounds (``--rounds`` >= 2).

Writes ``bench/results/elastic_trace.json`` with ``elastic_vs_wait`` and ``elastic_vs_checkpoint``
(ratios of median useful throughput; targets >= 1.2 and >= 2.0), ``sim_vs_runtime_error``
(target <= 0.15), the trace slice, compression and replacement delays, and every run with the
load average before and after it.

    python bench/elastic_trace.py --quick    # 1 round of 40 s replays, x60: under 4 minutes
    python bench/elastic_trace.py            # 3 rounds of 80 s replays, x40 (about 15 minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spotpipe import __version__  # noqa: E402
from spotpipe.config import JobConfig, load_config  # noqa: E402
from spotpipe.errors import SpotpipeError  # noqa: E402
from spotpipe.ft.elastic import Shape, elastic_cost, initial_shape, step_seconds  # noqa: E402
from spotpipe.sim.cluster import FAIL, NodeEvent  # noqa: E402
from spotpipe.sim.elastic import ELASTIC_MODES, ElasticResult, simulate_elastic, trace_events  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "bamboo-spot-traces" / "p3-trace.csv"
JOB = ["pipeline.stages=4", "pipeline.replicas=1", "pipeline.microbatches=4", "run.plot=false", "run.progress=false",
       "train.eval_every=0", "train.steps=1000000", "run.local_workers=0", "ft.spares=0", "run.timeout_s=600",
       "ft.detect_timeout_s=2"]
MODES: dict[str, list[str]] = {
    "elastic": ["ft.elastic=true", "ft.strategy=auto"],
    "wait": ["ft.elastic=false", "ft.strategy=auto"],
    "checkpoint": ["ft.elastic=false", "ft.strategy=checkpoint"],
}
TARGETS = {"elastic_vs_wait": 1.2, "elastic_vs_checkpoint": 2.0, "sim_vs_runtime_error": 0.15}
START_TIMEOUT_S = 120.0  # controller + first workers up to the first committed step
STOP_GRACE_S = 20.0  # after Ctrl-C (SIGINT) the job stops after its step; then a second one, then SIGKILL


class BenchError(SpotpipeError):
    """A bad option, a missing trace, or a run that did not start (one line, no traceback)."""


# ----------------------------------------------------------------------------------------------
# The trace: thinning, slicing, mapping (pure)


def _trace_rows(text: str, source: str) -> list[tuple[int, str, str]]:
    """``(ms, kind, name)`` per line of a Bamboo-format trace (comments and blank lines skipped)."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in line.split(",")]
        try:
            ms = int(float(cells[0]))
        except (ValueError, IndexError):
            ms = -1
        if len(cells) != 3 or cells[1] not in ("add", "remove") or ms < 0:
            raise BenchError(f"{source}:{number}: expected '<ms>,<add|remove>,<node>', got {line.strip()!r}")
        rows.append((ms, cells[1], cells[2]))
    return rows


def thin_trace(text: str, every: int, group: int, source: str = "trace") -> str:
    """Keep one node in ``every``: those whose order of first appearance is ``group`` modulo ``every``.

    Args:
        text: A Bamboo-format trace (``<ms>,<add|remove>,<name>`` lines).
        every: Keep one node in this many (>= 1; 1 keeps all).
        group: Which one, in ``[0, every)``.
        source: The trace's name in error messages.

    Returns:
        The kept lines, in trace order, as trace text.

    Raises:
        BenchError: for a bad line (named) or ``group`` out of range.
    """
    if every < 1 or not 0 <= group < every:
        raise BenchError(f"--thin must be >= 1 and --group in [0, --thin), got --thin {every} --group {group}")
    order: dict[str, int] = {}
    kept = []
    for ms, kind, name in _trace_rows(text, source):
        order.setdefault(name, len(order))
        if order[name] % every == group:
            kept.append(f"{ms},{kind},{name}")
    return "\n".join(kept) + "\n"


def slice_trace(text: str, start_s: float, length_s: float, source: str = "trace") -> str:
    """The trace from ``start_s`` for ``length_s`` trace seconds, rebased to start at 0.

    The nodes up at ``start_s`` come first as ``0,add,<name>`` lines (in order of first
    appearance), so the first names of the slice are the nodes the job starts on.

    Args:
        text: A Bamboo-format trace.
        start_s: Where the slice starts, trace seconds (>= 0).
        length_s: Its length, trace seconds (> 0).
        source: The trace's name in error messages.

    Returns:
        The slice as trace text (times in ms from the slice's start).

    Raises:
        BenchError: for a bad line, a negative start or an empty length.
    """
    if not (start_s >= 0 and length_s > 0):
        raise BenchError(f"trace slice: the start must be >= 0 and the length > 0 s, got {start_s} and {length_s}")
    start_ms, end_ms = start_s * 1000.0, (start_s + length_s) * 1000.0
    up: dict[str, None] = {}
    lines: list[str] = []
    for ms, kind, name in _trace_rows(text, source):
        if ms < start_ms:
            if kind == "add":
                up[name] = None
            else:
                up.pop(name, None)
        elif ms <= end_ms:
            lines.append(f"{int(round(ms - start_ms))},{kind},{name}")
    return "\n".join([f"0,add,{name}" for name in up] + lines) + "\n"


def replay_events(cfg: JobConfig, trace: Path, every: int, group: int, start_s: float, seconds: float,
                  compress: float, workdir: Path) -> list[NodeEvent]:
    """The node events the replay plays: thinned, sliced, mapped and compressed.

    Args:
        cfg: The job (its ``stages x replicas`` first names are its workers).
        trace: The Bamboo-format trace file.
        every: ``--thin``.
        group: ``--group``.
        start_s: ``--start``, trace seconds.
        seconds: ``--seconds``: the replay's wall length.
        compress: ``--compress``: trace seconds per wall second (> 0).
        workdir: Where the sliced trace file is written (``slice.csv``).

    Returns:
        Events in wall seconds from the replay's start, up to ``seconds``.

    Raises:
        BenchError: for an unreadable or bad trace, or a slice with fewer nodes up than the job needs.
    """
    try:
        text = trace.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read the trace {trace}: {exc}") from None
    if not (compress > 0 and math.isfinite(compress)):
        raise BenchError(f"--compress must be a finite number > 0, got {compress}")
    sliced = slice_trace(thin_trace(text, every, group, str(trace)), start_s, seconds * compress, str(trace))
    workers = cfg.pipeline.stages * cfg.pipeline.replicas
    up = sum(1 for line in sliced.splitlines() if line.startswith("0,add,"))
    if up < workers:
        raise BenchError(f"{trace} thinned to 1 node in {every} (group {group}) has {up} nodes up at {start_s:g} s; "
                         f"the job needs {workers}: pick another --start or --group")
    path = workdir / "slice.csv"
    path.write_text(sliced, encoding="utf-8")
    return [e for e in trace_events(cfg, path, compress) if e.time <= seconds]


def replacement_delays(events: Sequence[NodeEvent], workers: int) -> list[dict[str, Any]]:
    """For every loss of a worker, seconds until a node is there to take its place.

    The job's nodes are ``0 .. workers - 1``; joiners wait idle in a pool, the first loss takes
    the oldest (0 s when one waits), as the harness and the simulator's standby do.

    Args:
        events: Node events (wall seconds).
        workers: The job's workers.

    Returns:
        Per loss: ``node``, ``at_s`` and ``delay_s`` (``None``: no node came before the end).
    """
    active = set(range(workers))
    pool: list[int] = []
    waiting: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for e in sorted(events, key=lambda e: e.time):
        if e.kind == FAIL:
            if e.node in pool:
                pool.remove(e.node)
            elif e.node in active:
                active.discard(e.node)
                row: dict[str, Any] = {"node": e.node, "at_s": e.time, "delay_s": None}
                out.append(row)
                if pool:
                    active.add(pool.pop(0))
                    row["delay_s"] = 0.0
                else:
                    waiting.append(row)
        elif waiting:
            row = waiting.pop(0)
            row["delay_s"] = e.time - row["at_s"]
            active.add(e.node)
        else:
            pool.append(e.node)
    return out


# ----------------------------------------------------------------------------------------------
# Figures from a run's events (pure)


def measure(records: Sequence[dict[str, Any]], window_s: float, batch_size: int, start_step: int = 0) -> dict[str, Any]:
    """Useful throughput and ETTR of one run over its replay window (module docstring).

    Args:
        records: The run's events (``events.jsonl`` records; ``t`` in seconds since the epoch).
        window_s: The window's length, seconds, from the commit of step ``start_step``.
        batch_size: ``train.batch_size`` (samples per committed step).
        start_step: The step (counted from 0) whose commit starts the window (the warm-up before it
            is not measured).

    Returns:
        ``t0`` (the window's first commit), ``useful_steps``, ``samples_per_s``, ``productive_s``, ``ettr``,
        ``median_step_s`` (steady steps), ``step_s_by_shape`` and ``mean_step_s_by_shape`` (median and
        mean steady step per ``"SxR"``, seconds),
        ``failures``, ``recoveries``, ``reshapes``, ``rollbacks`` (commits of an older step number),
        all inside the window, and ``checkpoints`` and ``checkpoint_write_s`` (median) of the whole run.

    Raises:
        BenchError: when the run committed no step after its warm-up.
    """
    steps = [r for r in records if r.get("event") == "step"]
    begin = next((i for i, r in enumerate(steps) if int(r["step"]) >= start_step), None)
    if begin is None:
        raise BenchError(f"the run committed no step after its {start_step} warm-up steps")
    steps = steps[begin:]
    t0 = float(steps[0]["t"])
    end = t0 + window_s
    inside = [r for r in steps if r["t"] <= end + 1e-9]
    first, last = int(steps[0]["step"]) + 1, int(inside[-1]["step"]) + 1
    steady, first_of_gen = [], set()
    shape_of_gen: dict[Any, str] = {}
    shape = None
    for r in records:
        if r.get("event") == "run_start":
            p = (r.get("config") or {}).get("pipeline", {})
            shape = f"{p.get('stages', '?')}x{p.get('replicas', '?')}"
        elif r.get("event") == "reshape":
            shape = str(r.get("to"))
        elif r.get("event") == "step":
            shape_of_gen.setdefault(r.get("generation"), shape or "?")
    by_shape: dict[str, list[float]] = {}
    for prev, r in zip([None, *steps], steps):
        if prev is None or prev.get("generation") != r.get("generation") or int(r["step"]) != int(prev["step"]) + 1:
            first_of_gen.add(id(r))
        else:
            steady.append(float(r["step_time"]))
            by_shape.setdefault(shape_of_gen.get(r.get("generation"), "?"), []).append(float(r["step_time"]))
    median_step = statistics.median(steady) if steady else float(steps[0]["step_time"])
    counted: dict[int, dict[str, Any]] = {}
    for r in inside[1:]:
        if int(r["step"]) < last:
            counted[int(r["step"])] = r
    for k in list(counted):
        if k < first:
            del counted[k]
    productive = math.fsum(median_step if id(r) in first_of_gen else float(r["step_time"]) for r in counted.values())
    window = [r for r in records if t0 < float(r.get("t", 0.0)) <= end]
    rollbacks = sum(1 for a, b in zip(inside, inside[1:]) if int(b["step"]) <= int(a["step"]))
    writes = [float(r["seconds"]) for r in records if r.get("event") == "checkpoint" and "seconds" in r]
    useful = max(0, last - first)
    return {
        "t0": t0, "useful_steps": useful, "samples": useful * batch_size, "samples_per_s": useful * batch_size / window_s,
        "productive_s": productive, "ettr": productive / window_s, "median_step_s": median_step,
        "step_s_by_shape": {k: statistics.median(v) for k, v in by_shape.items()},
        "mean_step_s_by_shape": {k: statistics.fmean(v) for k, v in by_shape.items()},
        "failures": sum(1 for r in window if r.get("event") == "failure_confirmed"),
        "recoveries": sum(1 for r in window if r.get("event") == "recovery_finished"),
        "reshapes": [{k: r.get(k) for k in ("kind", "from", "to", "why", "bytes", "seconds")}
                     for r in window if r.get("event") == "reshape"],
        "rollbacks": rollbacks, "checkpoints": len(writes),
        "checkpoint_write_s": statistics.median(writes) if writes else 0.0,
    }


def join_pauses(records: Sequence[dict[str, Any]], starts: Sequence[tuple[int, float]]) -> list[float]:
    """Seconds from a replacement's process start to the job's next committed step.

    Args:
        records: The run's events.
        starts: ``(pid, start time)`` of every joiner the harness started in the replay
            (seconds since the epoch).

    Returns:
        One pause per joiner that took a role (a ``worker_start`` event with its pid) and was
        followed by a commit, in start order.
    """
    granted = {int(r["pid"]) for r in records if r.get("event") == "worker_start" and "pid" in r}
    commits = sorted(float(r["t"]) for r in records if r.get("event") == "step")
    out = []
    for pid, t in starts:
        nxt = next((c for c in commits if c > t), None)
        if pid in granted and nxt is not None:
            out.append(nxt - t)
    return out


# ----------------------------------------------------------------------------------------------
# The simulator's prediction (pure)


def calibrated_step_time(cfg: JobConfig, step_s: float, by_shape: dict[str, float]) -> Any:
    """Seconds per step of a shape: measured where a run ran it, else the policy's model scaled.

    Args:
        cfg: The job.
        step_s: The measured median step of the configured shape, seconds.
        by_shape: Measured median step per ``"SxR"`` label (elastic runs), seconds.

    Returns:
        ``shape -> seconds``: ``by_shape[label]`` if measured, else ``step_s x`` the policy's
        :func:`spotpipe.ft.elastic.step_seconds` of the shape over that of the configured one.
    """
    cost = elastic_cost(cfg)
    p = cfg.pipeline
    full = step_seconds(initial_shape(cfg.model.layers, p.stages, p.replicas), cost)

    def seconds(shape: Shape) -> float:
        if shape.label in by_shape:
            return by_shape[shape.label]
        return step_s * step_seconds(shape, cost) / full

    return seconds


def configured_label(cfg: JobConfig) -> str:
    """The configured shape's ``"SxR"`` label.

    Args:
        cfg: The job.

    Returns:
        ``"<stages>x<replicas>"``, as ``reshape`` events name shapes.
    """
    return f"{cfg.pipeline.stages}x{cfg.pipeline.replicas}"


def calibrate(runs: Sequence[dict[str, Any]], cfg: JobConfig,
              steps_from: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the simulator is told from the runs of one mode: step times and pauses.

    The step time is the mean of the steady steps (on a shared 2-core machine a slow step, e.g.
    while a joiner imports torch, is part of what a shape delivers; the median would hide it).

    Args:
        runs: Run records of one mode (:func:`run_mode`: ``mean_step_s_by_shape``, ``median_step_s``,
            ``pauses_s``, ``reshapes``, ``checkpoints``, ``checkpoint_write_s``): the pauses.
        cfg: The mode's job.
        steps_from: The runs whose step times are taken (the machine's load of that moment, which
            no model of the job predicts); ``None``: ``runs``.

    Returns:
        :func:`predict`'s keyword arguments: ``step_s`` (median over the runs of the mean step of
        the configured shape, seconds), ``by_shape`` (the same for every other shape the runs ran),
        ``pause_s`` (a reshape's pause: the median ``reshape.seconds`` where the runs reshaped;
        else the median seconds from a replacement's process start to the next commit, minus one
        step; else 1 s) and ``write_s`` (median checkpoint write, seconds; 0 without checkpoints).
    """
    label = configured_label(cfg)
    timed = runs if steps_from is None else steps_from
    lists: dict[str, list[float]] = {}
    for r in timed:
        for shape, sec in r["mean_step_s_by_shape"].items():
            lists.setdefault(shape, []).append(sec)
    step_s = statistics.median(lists.get(label) or [r["median_step_s"] for r in timed])
    by_shape = {k: statistics.median(v) for k, v in lists.items() if k not in (label, "?")}
    pauses = [p for r in runs for p in r["pauses_s"]]
    reshape_s = [x["seconds"] for r in runs for x in r["reshapes"] if isinstance(x.get("seconds"), (int, float))]
    pause = statistics.median(reshape_s) if reshape_s else statistics.median(pauses) - step_s if pauses else 1.0
    writes = [r["checkpoint_write_s"] for r in runs if r["checkpoints"]]
    return {"step_s": step_s, "by_shape": by_shape, "pause_s": max(0.0, pause),
            "write_s": statistics.median(writes) if writes else 0.0}


def predict(cfg: JobConfig, events: Sequence[NodeEvent], mode: str, window_s: float, step_s: float,
            by_shape: dict[str, float], pause_s: float, write_s: float) -> ElasticResult:
    """The simulator's replay of the same events in one mode, calibrated with measured times.

    Args:
        cfg: The job as the runs ran it (``ft.*``, ``train.checkpoint_every``).
        events: The replay's node events (wall seconds).
        mode: ``elastic``, ``wait`` or ``checkpoint``.
        window_s: The replay's length, seconds.
        step_s: Measured median step of the configured shape, seconds.
        by_shape: Measured median step per shape label, seconds.
        pause_s: Measured pause of the mode's recovery or reshape, seconds, one step excluded
            (``sim.regroup_s``, or ``sim.restart_s`` in checkpoint mode).
        write_s: Measured checkpoint write, seconds (``sim.checkpoint_write_s``).

    Returns:
        The :class:`spotpipe.sim.elastic.ElasticResult`.
    """
    sim = replace(cfg.sim, replace_s=math.inf, regroup_s=max(0.0, pause_s), restart_s=max(0.0, pause_s),
                  checkpoint_write_s=write_s, spares=0)
    job = replace(cfg, sim=sim)
    return simulate_elastic(job, events, mode, horizon_s=window_s,  # type: ignore[arg-type]
                            step_time=calibrated_step_time(job, step_s, by_shape))


def relative_error(predicted: float, measured: float) -> float:
    """``|predicted - measured| / measured``.

    Args:
        predicted: The simulator's figure.
        measured: The runtime's figure (> 0).

    Returns:
        The relative error; ``inf`` when ``measured`` is 0.
    """
    return abs(predicted - measured) / measured if measured > 0 else math.inf


# ----------------------------------------------------------------------------------------------
# The harness (real processes, real signals)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of an ``events.jsonl`` being written (a torn last line is skipped).

    Args:
        path: The file; absent: no records.

    Returns:
        The records, in file order.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@dataclass
class Replay:
    """One run of the job under the trace: its processes and what the harness did."""

    mode: str
    run_dir: Path
    events: list[NodeEvent]
    workers: int
    env: dict[str, str]
    address: str = ""
    controller: subprocess.Popen[bytes] | None = None
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # node -> its worker process
    pool: list[int] = field(default_factory=list)  # nodes up with no process (idle)
    retry_at: float = 0.0
    actions: list[dict[str, Any]] = field(default_factory=list)
    starts: list[tuple[int, float]] = field(default_factory=list)  # (pid, time) of joiners in the replay
    all_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)  # nodes whose process the harness SIGKILLed

    def start_worker(self, node: int, counted: bool) -> None:
        """Start ``python -m spotpipe worker --join`` for ``node`` (the token in its environment).

        Args:
            node: The trace node it plays.
            counted: Whether it is a replacement in the replay (its start-to-commit pause is measured).
        """
        log = open(self.run_dir / f"joiner-node{node}-{len(self.all_procs)}.log", "wb")
        with log:
            proc = subprocess.Popen([sys.executable, "-m", "spotpipe", "worker", "--join", self.address],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=str(ROOT), start_new_session=True)
        self.procs[node] = proc
        self.all_procs.append(proc)
        if counted:
            self.starts.append((proc.pid, time.time()))

    def live(self) -> int:
        """Worker processes the harness started that still run.

        Returns:
            Their number.
        """
        return sum(1 for p in self.procs.values() if p.poll() is None)

    def reap(self, now: float, t0: float) -> None:
        """Joiners that exited on their own (refused, or the job ended): their nodes go back to the pool.

        Args:
            now: Seconds since the epoch.
            t0: The replay's start, seconds since the epoch.
        """
        for node, proc in list(self.procs.items()):
            if proc.poll() is not None and node not in self.killed:
                del self.procs[node]
                self.pool.append(node)
                self.actions.append({"t": now - t0, "what": "exited", "node": node, "pid": proc.pid, "rc": proc.returncode})
                self.retry_at = now + 1.0

    def fill(self, now: float, t0: float) -> None:
        """Start a worker for idle nodes while the job has fewer live workers than its size.

        Args:
            now: Seconds since the epoch.
            t0: The replay's start, seconds since the epoch.
        """
        while self.pool and self.live() < self.workers and now >= self.retry_at:
            node = self.pool.pop(0)
            self.start_worker(node, counted=True)
            self.actions.append({"t": now - t0, "what": "join", "node": node, "pid": self.procs[node].pid})

    def play(self, e: NodeEvent, now: float, t0: float) -> None:
        """One trace event: SIGKILL the node's worker, or drop it from the pool; or the node comes up idle.

        Args:
            e: The event (``fail`` or ``join``).
            now: Seconds since the epoch.
            t0: The replay's start, seconds since the epoch.
        """
        if e.kind == FAIL:
            if e.node in self.pool:
                self.pool.remove(e.node)
                self.actions.append({"t": now - t0, "trace_t": e.time, "what": "idle node removed", "node": e.node})
                return
            proc = self.procs.pop(e.node, None)
            if proc is None:
                return
            self.killed.add(e.node)
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.actions.append({"t": now - t0, "trace_t": e.time, "what": "SIGKILL", "node": e.node, "pid": proc.pid})
        else:
            self.pool.append(e.node)
            self.actions.append({"t": now - t0, "trace_t": e.time, "what": "node up", "node": e.node})

    def stop(self) -> None:
        """Ctrl-C the controller (stops after the step), again after a grace, then SIGKILL what is left."""
        c = self.controller
        if c is not None and c.poll() is None:
            for _ in range(2):
                c.send_signal(signal.SIGINT)
                try:
                    c.wait(STOP_GRACE_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
            if c.poll() is None:
                c.kill()
                c.wait()
        deadline = time.monotonic() + 10.0
        for p in self.all_procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_mode(mode: str, overrides: list[str], events: list[NodeEvent], window_s: float, warmup: int, workdir: Path,
             tag: str) -> dict[str, Any]:
    """Play the replay on a real job in one mode and measure it.

    Args:
        mode: ``elastic``, ``wait`` or ``checkpoint``.
        overrides: ``--set`` values of the job (the mode's included).
        events: The node events (wall seconds from the replay's start).
        window_s: The replay's length, seconds.
        warmup: Steps before the replay starts (at the commit of step ``warmup``, counted from 0).
        workdir: Parent of the run directory.
        tag: The run directory's name.

    Returns:
        The run's figures (:func:`measure`), the harness's actions, pauses, load averages and errors.
    """
    cfg = load_config(None, overrides)
    workers = cfg.pipeline.stages * cfg.pipeline.replicas
    run_dir = workdir / tag
    run_dir.mkdir(parents=True)
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    load_before = os.getloadavg()
    r = Replay(mode, run_dir, list(events), workers, env, address=f"127.0.0.1:{port}")
    cmd = [sys.executable, "-m", "spotpipe", "train"]
    for o in [*overrides, f"run.port={port}", f"run.dir={run_dir / 'run'}"]:
        cmd += ["--set", o]
    out: dict[str, Any] = {"mode": mode, "run": tag, "load_before": load_before, "error": None}
    wall0 = time.monotonic()
    with open(run_dir / "controller.log", "wb") as log:
        r.controller = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(ROOT), start_new_session=True)
    try:
        token_path = run_dir / "run" / "job.token"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not token_path.is_file() or not token_path.read_text().strip():
            if r.controller.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{mode}: the controller wrote no job token: {_tail(run_dir / 'controller.log')}")
            time.sleep(0.1)
        env["SPOTPIPE_TOKEN"] = token_path.read_text().strip()
        for node in range(workers):
            r.start_worker(node, counted=False)
        events_path = run_dir / "run" / "events.jsonl"
        t0 = None
        while t0 is None:
            steps = [x for x in read_records(events_path) if x.get("event") == "step" and int(x["step"]) >= warmup]
            if steps:
                t0 = float(steps[0]["t"])
            elif r.controller.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{mode}: no step committed: {_tail(run_dir / 'controller.log')}")
            else:
                time.sleep(0.1)
        queue = sorted(r.events, key=lambda e: e.time)
        while True:
            now = time.time()
            if now >= t0 + window_s or r.controller.poll() is not None:
                break
            while queue and t0 + queue[0].time <= now:
                r.play(queue.pop(0), now, t0)
            r.reap(now, t0)
            r.fill(now, t0)
            time.sleep(0.05)
        if r.controller.poll() is not None:
            out["error"] = f"the controller exited with code {r.controller.returncode} before the window ended: " \
                           f"{_tail(run_dir / 'controller.log')}"
    except BenchError as exc:
        out["error"] = str(exc)
    finally:
        r.stop()
    records = read_records(run_dir / "run" / "events.jsonl")
    try:
        out.update(measure(records, window_s, cfg.train.batch_size, warmup))
    except BenchError as exc:
        out["error"] = out["error"] or f"{mode}: {exc}"
    out["pauses_s"] = join_pauses(records, r.starts)
    out["actions"] = r.actions
    out["warnings"] = run_warnings(out)
    out["controller_tail"] = _tail(run_dir / "controller.log", 6).split(" | ")
    out["failed_joiners"] = {f"pid {a['pid']}": _tail(run_dir / f"joiner-node{a['node']}-{i}.log", 2)
                             for i, p in enumerate(r.all_procs) for a in r.actions
                             if a.get("what") == "exited" and a.get("pid") == p.pid}
    out["wall_s"] = time.monotonic() - wall0
    out["load_after"] = os.getloadavg()
    return out


def run_warnings(run: dict[str, Any]) -> list[str]:
    """What looks wrong in a run that ended without an error: kills the controller never
    confirmed, joiners it turned away, or (elastic) a shrink with no grow although a node came.

    Args:
        run: A run record (``actions``, ``failures``, ``reshapes``, ``mode``).

    Returns:
        One line per finding (empty: nothing seen).
    """
    acts = run.get("actions", [])
    kills = sum(1 for a in acts if a.get("what") == "SIGKILL")
    out = []
    if "failures" in run and run["failures"] < kills:
        out.append(f"{kills} workers SIGKILLed but {run['failures']} failures confirmed in the window")
    exited = sum(1 for a in acts if a.get("what") == "exited")
    if exited:
        out.append(f"{exited} joiner(s) exited without a role (refused or failed; see failed_joiners)")
    kinds = [x.get("kind") for x in run.get("reshapes", [])]
    joined = any(a.get("what") == "join" for a in acts)
    if run.get("mode") == "elastic" and "shrink" in kinds and "grow" not in kinds and joined:
        out.append("the job shrank and a node joined, but it never grew")
    return out


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``--help`` lists it); a bad value ends with one usage line, exit code 2.

    Args:
        argv: The arguments; ``None``: ``sys.argv[1:]``.

    Returns:
        The options, defaults filled in (``seconds``, ``compress``, ``checkpoint_every``, ``warmup``).
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="--quick: 1 round of 40 s replays (under 4 minutes)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 40 s replays at --compress 60, a checkpoint every 10 steps (under 4 minutes)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of elastic, wait, checkpoint (default 3)")
    ap.add_argument("--modes", default=",".join(ELASTIC_MODES), help="comma-separated subset, in round order")
    ap.add_argument("--trace", default=str(TRACE), help="Bamboo-format trace (default the p3 trace)")
    ap.add_argument("--thin", type=int, default=8, help="keep 1 trace node in N (default 8: ~4 of the p3 cluster's 32)")
    ap.add_argument("--group", type=int, default=0, help="which one of the N (default 0)")
    ap.add_argument("--start", type=float, default=1800.0, help="slice start, trace seconds (default 1800)")
    ap.add_argument("--seconds", type=float, default=None, help="replay length, wall seconds (default 80; --quick 40)")
    ap.add_argument("--compress", type=float, default=None, help="trace seconds per wall second (default 40; --quick 60)")
    ap.add_argument("--replace-wait", type=float, default=0.0,
                    help="ft.replace_wait_s: seconds a loss waits for a joiner before an elastic job shrinks (default 0)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="train.checkpoint_every of the checkpoint mode (default 20; --quick 10)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps before the replay starts, in every mode (default --checkpoint-every: the checkpoint "
                         "mode has a checkpoint)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more job settings (all modes)")
    ap.add_argument("--keep", metavar="DIR", default="",
                    help="keep every run's directory (events, logs) under DIR instead of a temporary folder")
    ap.add_argument("--resummarise", metavar="JSON", default="",
                    help="no new run: compute the summary of a result this bench wrote again (writes --out)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "elastic_trace.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1
    args.seconds = args.seconds if args.seconds is not None else (40.0 if args.quick else 80.0)
    args.compress = args.compress if args.compress is not None else (60.0 if args.quick else 40.0)
    args.checkpoint_every = args.checkpoint_every if args.checkpoint_every is not None else (10 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else args.checkpoint_every
    if args.rounds < 1 or not args.seconds > 0 or args.checkpoint_every < 1 or args.warmup < 0:
        ap.error(f"--rounds and --checkpoint-every must be >= 1, --seconds > 0 and --warmup >= 0; got {args.rounds}, "
                 f"{args.checkpoint_every}, {args.seconds} and {args.warmup}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(MODES)}")
    args.modes = modes
    return args


def mode_overrides(mode: str, args: argparse.Namespace) -> list[str]:
    """The job's ``--set`` values in one mode.

    Args:
        mode: ``elastic``, ``wait`` or ``checkpoint``.
        args: The parsed options.

    Returns:
        ``section.key=value`` strings.
    """
    extra = [f"ft.replace_wait_s={args.replace_wait}"]
    extra.append(f"train.checkpoint_every={args.checkpoint_every if mode == 'checkpoint' else 0}")
    return [*JOB, *MODES[mode], *extra, *args.set]


def resummarise(path: Path, out: Path) -> int:
    """Compute the summary of a written result again from its runs, with no new run.

    For a result whose runs were disturbed (a run with an error is left out) or after the
    summary's rules changed; the runs, trace events and settings are the file's own.

    Args:
        path: A JSON file this bench wrote.
        out: Where the result goes (may be ``path``).

    Returns:
        The exit code: 0, or 2 when the file cannot be read or is not this bench's.
    """
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        cfgs = {m: load_config(None, o) for m, o in rec["config"]["modes"].items()}
        events = [NodeEvent(**e) for e in rec["trace"]["events"]]
        ns = argparse.Namespace(modes=list(cfgs), seconds=float(rec["trace"]["window_s"]))
        runs = list(rec["runs"])
    except (OSError, ValueError, KeyError, TypeError, SpotpipeError) as exc:
        print(f"elastic_trace: error: {path} is not a result of this bench: {exc}", file=sys.stderr)
        return 2
    rec.update(summarise(runs, ns, cfgs, events))
    rec["resummarised"] = {"from": str(path), "command": " ".join([sys.executable, *sys.argv])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench (module docstring).

    Args:
        argv: The arguments; ``None``: ``sys.argv[1:]``.

    Returns:
        The exit code: 0, 1 when a run failed (its error is in the JSON), 2 for bad input.
    """
    args = parse_args(argv)
    if args.resummarise:
        return resummarise(Path(args.resummarise), Path(args.out))
    trace = Path(args.trace)
    if not trace.is_file():
        print(f"elastic_trace: error: the trace {trace} is absent (pass --trace FILE)", file=sys.stderr)
        return 2
    try:
        cfgs = {m: load_config(None, mode_overrides(m, args)) for m in args.modes}
    except SpotpipeError as exc:
        print(f"elastic_trace: error: {exc}", file=sys.stderr)
        return 2
    cfg0 = next(iter(cfgs.values()))
    workers = cfg0.pipeline.stages * cfg0.pipeline.replicas
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="elastic-trace-") as d:
        workdir = Path(args.keep) if args.keep else Path(d)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            events = replay_events(cfg0, trace, args.thin, args.group, args.start, args.seconds, args.compress, workdir)
        except SpotpipeError as exc:
            print(f"elastic_trace: error: {exc}", file=sys.stderr)
            return 2
        delays = replacement_delays(events, workers)
        print(f"trace {trace.name}: 1 node in {args.thin} (group {args.group}), from {args.start:g} s, "
              f"{args.seconds * args.compress:g} trace s in {args.seconds:g} s (x{args.compress:g}); "
              f"{sum(e.kind == FAIL for e in events)} removals, {sum(e.kind != FAIL for e in events)} additions; "
              f"losses of workers wait {[None if x['delay_s'] is None else round(x['delay_s'], 1) for x in delays]} s",
              flush=True)
        for k in range(args.rounds):
            for mode in args.modes:  # alternated: load drifts hit every mode alike
                r = run_mode(mode, mode_overrides(mode, args), events, args.seconds, args.warmup, workdir, f"{mode}-{k}")
                r["round"] = k
                runs.append(r)
                sps = r.get("samples_per_s")
                print(f"  round {k} {mode:10s} " + ("-" if sps is None else f"{sps:7.2f} samples/s, ETTR {r['ettr']:.3f}, "
                      f"{r['useful_steps']} steps, step {r['median_step_s']:.3f} s, {r['failures']} losses, "
                      f"{len(r['reshapes'])} reshapes")
                      + f"  (load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f})"
                      + (f"  ERROR {r['error']}" if r["error"] else "")
                      + "".join(f"\n      warning: {w}" for w in r["warnings"]), flush=True)
    summary = summarise(runs, args, cfgs, events)
    record = {
        "bench": "elastic_trace", "quick": args.quick, "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "spotpipe": __version__, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "config": {"job": JOB, "modes": {m: mode_overrides(m, args) for m in args.modes}},
        "trace": {"path": str(trace), "thin": args.thin, "group": args.group, "start_s": args.start,
                  "trace_seconds": args.seconds * args.compress, "window_s": args.seconds, "warmup_steps": args.warmup,
                  "time_compression": args.compress,
                  "events": [asdict(e) for e in events],
                  "replacement_delays": delays,
                  "replacement_delay_s": [x["delay_s"] for x in delays],
                  "replacement_delay_trace_s": [None if x["delay_s"] is None else x["delay_s"] * args.compress
                                                for x in delays]},
        "targets": TARGETS, **summary, "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["error"] is None for r in runs) else 1


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace, cfgs: dict[str, JobConfig],
              events: list[NodeEvent]) -> dict[str, Any]:
    """Medians per mode, the ratios, the simulator's predictions and its error; prints the table.

    Args:
        runs: Every run's record (:func:`run_mode`).
        args: The parsed options.
        cfgs: The job config per mode.
        events: The replay's node events.

    Returns:
        ``by_mode`` (medians, predictions, calibration), ``elastic_vs_wait``,
        ``elastic_vs_checkpoint``, ``sim_vs_runtime_error`` (max over modes) and
        ``sim_vs_runtime_error_by_mode``, ``excluded_runs`` (runs with an error, left out of every
        figure); a figure is ``None`` where no run of its modes succeeded.
    """
    ok = [r for r in runs if r.get("samples_per_s") is not None and not r.get("error")]
    by_mode: dict[str, Any] = {}
    for mode in args.modes:
        mine = [r for r in ok if r["mode"] == mode]
        if not mine:
            by_mode[mode] = None
            continue
        med = {k: statistics.median(r[k] for r in mine) for k in ("samples_per_s", "ettr", "useful_steps", "median_step_s")}
        per_run = []
        for r in mine:  # each run at its own step times; the mode's pauses
            cal = calibrate(mine, cfgs[mode], steps_from=[r])
            res = predict(cfgs[mode], events, mode, args.seconds, **cal)
            per_run.append({"run": r["run"], "calibration": cal, "samples_per_s": res.samples_per_s, "ettr": res.ettr,
                            "steps": res.steps, "down_s": res.down_s, "time_at_shape": res.time_at_shape,
                            "reshapes": [asdict(x) for x in res.reshapes],
                            "error": relative_error(res.samples_per_s, r["samples_per_s"])})
        predicted = statistics.median(p["samples_per_s"] for p in per_run)
        entry: dict[str, Any] = {
            "runs": len(mine), **{f"median_{k}": v for k, v in med.items()},
            "loads": [[r["load_before"][0], r["load_after"][0]] for r in mine],
            "predicted_median_samples_per_s": predicted,
            "predicted_median_ettr": statistics.median(p["ettr"] for p in per_run),
            "predicted": per_run,
            "error": relative_error(predicted, med["samples_per_s"]),
        }
        rounds = sorted({r["round"] for r in mine})
        if len(rounds) > 1:  # the pauses from the other rounds, compared with this one
            held: list[float] = []
            for r in mine:
                others = [x for x in mine if x["round"] != r["round"]]
                res = predict(cfgs[mode], events, mode, args.seconds, **calibrate(others, cfgs[mode], steps_from=[r]))
                held.append(relative_error(res.samples_per_s, r["samples_per_s"]))
            entry["held_out_errors"] = held
            entry["held_out_error"] = statistics.fmean(held)
        by_mode[mode] = entry

    def ratio(a: str, b: str) -> float | None:
        x, y = by_mode.get(a), by_mode.get(b)
        if not x or not y or not y["median_samples_per_s"]:
            return None
        return float(x["median_samples_per_s"] / y["median_samples_per_s"])

    errors = {m: e["error"] for m, e in by_mode.items() if e and "error" in e}
    held_by_mode = {m: e["held_out_error"] for m, e in by_mode.items() if e and "held_out_error" in e}
    out = {"excluded_runs": [{"run": r.get("run"), "error": r.get("error")} for r in runs if r not in ok],
           "by_mode": by_mode, "elastic_vs_wait": ratio("elastic", "wait"),
           "elastic_vs_checkpoint": ratio("elastic", "checkpoint"),
           "sim_vs_runtime_error": max(errors.values()) if errors else None,
           "sim_vs_runtime_error_is": "max over modes of |predicted - measured| / measured, of the median useful "
                                      "samples/s over the rounds; each run is predicted at its own mean step time "
                                      "per shape, with the median pauses of the mode's runs",
           "sim_vs_runtime_error_by_mode": errors,
           "sim_vs_runtime_error_held_out": max(held_by_mode.values()) if held_by_mode else None,
           "sim_vs_runtime_error_held_out_is": "max over modes of the mean, over runs, of the relative error of the "
                                               "run's prediction at its own step time with the pauses of the other "
                                               "rounds' runs"}
    print(f"\n{'mode':11s} {'samples/s':>10s} {'ETTR':>6s} {'steps':>6s} {'sim samples/s':>14s} {'sim ETTR':>9s} "
          f"{'error':>6s}  load (1 min, before -> after)")
    for mode, e in by_mode.items():
        if not e:
            print(f"{mode:11s} (no run)")
            continue
        loads = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in e["loads"])
        print(f"{mode:11s} {e['median_samples_per_s']:10.2f} {e['median_ettr']:6.3f} {e['median_useful_steps']:6.0f} "
              f"{e['predicted_median_samples_per_s']:14.2f} {e['predicted_median_ettr']:9.3f} {e['error']:6.3f}  {loads}")
    if out["sim_vs_runtime_error_held_out"] is not None:
        print(f"sim_vs_runtime_error, calibrated on the other rounds: {out['sim_vs_runtime_error_held_out']:.3f}")
    for key in ("elastic_vs_wait", "elastic_vs_checkpoint", "sim_vs_runtime_error"):
        v = out[key]
        print(f"{key:24s} {'-' if v is None else f'{v:.3f}'}  (target {'>=' if 'vs_runtime' not in key else '<='} "
              f"{TARGETS[key]})")
    return out


if __name__ == "__main__":
    sys.exit(main())
