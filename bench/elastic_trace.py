"""Replay spot preemptions of the Bamboo p3 trace on real worker processes: elastic vs wait vs restart.

A time-compressed slice of a Bamboo-format preemption trace (Thorpe et al., NSDI'23; default
``../shared/data/bamboo-spot-traces/p3-trace.csv``) is played on a real ``spotpipe train`` job,
in up to four modes alternated in one run (elastic, wait, restart, rollback, then the next round):

* ``elastic``: ``ft.elastic = true``: a lost worker with no replacement makes the job shrink to
  fewer stages after ``ft.replace_wait_s``; a joiner makes it grow back.
* ``wait``: ``ft.elastic = false``, ``ft.strategy = auto`` (mirror with one replica): the lost role
  waits for the next worker that joins, which recovers the stage from its mirror (no rollback).
* ``restart``: checkpoint/restart, as Varuna, DeepSpeed elasticity and torchrun do it:
  ``ft.strategy = none``, ``train.checkpoint_every = K``. A loss stops the whole job (the
  controller ends, every surviving worker exits); once enough nodes are up again (the survivors'
  and the trace's next ``add``), the harness starts it again with ``spotpipe train --resume
  RUN_DIR`` on a new port and starts one fresh ``worker --join`` per role with the new job token.
  The job goes on from the step after its last checkpoint: the steps since are trained again.
* ``rollback``: ``ft.strategy = checkpoint``, ``train.checkpoint_every = K``: the job keeps its
  processes; once a replacement joins, every worker reloads the last checkpoint in place (a few
  seconds, no restart). Reported, with no target; ``--quick`` leaves it out.

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
  ``--warmup`` (counted from 0; default ``--checkpoint-every`` - 1, in every mode: the step of the
  first checkpoint, so the restart and rollback modes have one to go back to when the first loss
  comes, and their checkpoints fall where the simulator's do: every ``K`` steps from the start).
* A ``remove`` of a node that runs a worker is a real SIGKILL of that process; of an idle node, it
  leaves the pool. An ``add`` starts a ``worker --join`` process when the job has fewer live
  workers than its configured size; otherwise the node waits idle in the pool (the simulator's
  standby) and starts a worker at the next loss. A joiner the controller refuses (it came before
  the lost role was freed) goes back to the pool and is started again a second later. In
  ``restart`` mode no worker joins a running job: a restart takes the survivors' nodes and the
  oldest idle ones; a lost job that has not ended ``ft.detect_timeout_s`` + 5 s after the loss
  gets Ctrl-C (at once when it has not committed since it started), and workers left 5 s after
  their controller ended are SIGKILLed. After the window (no more trace events), for its pause
  only, a restart under way runs to its first commit, and a job that is down is restarted at once
  (on spare nodes if too few are up) and runs to its first commit.

Measured per run from its ``events.jsonl`` (a restarted job appends its own ``run_start`` and
steps to it), over the replay window (``--seconds`` from the commit of step ``--warmup``): useful
samples per second (``progress x train.batch_size / window``, where progress is the step number
the job goes on from at the window's end minus the one at its start: a commit's, or after a loss
that throws steps away the step after the checkpoint it restarts or rolls back to, so steps
trained twice count once) and ETTR (the ``step_time`` of the steps that count / window; the
first step of a generation or of a restarted job, which includes the recovery, counts the run's
median step time instead).

Predicted: :func:`spotpipe.sim.elastic.simulate_elastic` on the same node events, same window,
calibrated with what the mode's runs measured: the mean steady step time of every shape they ran,
the pause of the mode minus one step (wait: from a replacement's process start to the next
commit, ``sim.regroup_s``; restart: from the moment the lost job could restart, its loss
``ft.detect_timeout_s`` old and enough nodes up, to the restarted job's first commit,
``sim.restart_s``; rollback: from the replacement's start to the next commit, ``sim.restart_s``),
the reshape pause (``reshape.seconds``, elastic) and the checkpoint write time; the trace's
timing, the detection delay, the shapes the policy picks and the lost work are the simulator's
own. The simulator's ``checkpoint`` mode predicts both ``restart`` and ``rollback``.
``sim_vs_runtime_error`` is the largest relative error, over elastic, wait and restart, of the
predicted against the measured median useful throughput (calibrated on the same runs);
``sim_vs_runtime_error_held_out`` calibrates on the other rounds (``--rounds`` >= 2).

Writes ``bench/results/elastic_trace.json`` with ``elastic_vs_wait`` and ``elastic_vs_checkpoint``
(ratios of median useful throughput, the latter against ``restart``; targets >= 1.2 and >= 2.0),
``elastic_vs_rollback`` (no target), ``sim_vs_runtime_error`` (target <= 0.15), the trace slice,
compression and replacement delays, and every run with the load average before and after it.

    python bench/elastic_trace.py --quick    # 1 round of elastic, wait, restart: 40 s replays, x40 (under 4 minutes)
    python bench/elastic_trace.py            # 3 rounds of the 4 modes, 80 s replays, x40 (about 20 minutes)
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
from spotpipe.sim.elastic import ElasticMode, ElasticResult, simulate_elastic, trace_events  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "bamboo-spot-traces" / "p3-trace.csv"
JOB = ["pipeline.stages=4", "pipeline.replicas=1", "pipeline.microbatches=4", "run.plot=false", "run.progress=false",
       "train.eval_every=0", "train.steps=1000000", "run.local_workers=0", "ft.spares=0", "run.timeout_s=600",
       "ft.detect_timeout_s=2"]
MODES: dict[str, list[str]] = {
    "elastic": ["ft.elastic=true", "ft.strategy=auto"],
    "wait": ["ft.elastic=false", "ft.strategy=auto"],
    "restart": ["ft.elastic=false", "ft.strategy=none"],
    "rollback": ["ft.elastic=false", "ft.strategy=checkpoint"],
}
SIM_MODES: dict[str, ElasticMode] = {"elastic": "elastic", "wait": "wait", "restart": "checkpoint",
                                     "rollback": "checkpoint"}  # the simulator's mode that predicts each
CHECKPOINTED = ("restart", "rollback")  # the modes that write checkpoints (train.checkpoint_every)
TARGET_MODES = ("elastic", "wait", "restart")  # sim_vs_runtime_error is their largest error
QUICK_MODES = ("elastic", "wait", "restart")  # --quick leaves out rollback (4 minutes)
LEGACY_MODES = {"checkpoint": "rollback"}  # the in-place rollback's name in results written before "restart"
TARGETS = {"elastic_vs_wait": 1.2, "elastic_vs_checkpoint": 2.0, "sim_vs_runtime_error": 0.15}
START_TIMEOUT_S = 120.0  # controller + first workers up to the first committed step
STOP_GRACE_S = 20.0  # after Ctrl-C (SIGINT) the job stops after its step; then a second one, then SIGKILL
DOWN_GRACE_S = 5.0  # restart: a lost job not ended this long after ft.detect_timeout_s gets Ctrl-C, then SIGKILL
LEFTOVER_S = 5.0  # restart: workers still running this long after their controller ended are SIGKILLed
SPARE_NODES = 10**6  # ids of the nodes a restart after the window runs on when too few are up
AFTER_WINDOW_S = 45.0  # restart: how long a restart under way at the window's end may run to its first commit


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


def durable_end(records: Sequence[dict[str, Any]], last: dict[str, Any], lost_by: float = math.inf) -> int | None:
    """The step a job goes on from after its last commit in the window, when a loss there throws steps away.

    A job lost after that commit and restarted from a checkpoint (or rolled back to one) trains
    again from the checkpoint's next step: the steps after the checkpoint are not progress. A
    loss recorded after ``lost_by`` is left to the next window (the simulator counts the steps
    done up to its horizon).

    Args:
        records: The run's events, in file order.
        last: The last ``step`` record inside the window (one of ``records``).
        lost_by: Seconds since the epoch: the latest a loss (``failure_confirmed``, or a
            ``run_end`` with status ``failed``) may be recorded to count.

    Returns:
        With such a loss after ``last``, what follows it first: a commit's step number (the next
        step trained is the one it committed), a resumed ``run_start``'s checkpoint step + 1, or
        at the end of the records, after a failed ``run_end``, the newest checkpoint's step + 1
        (0 without one); else ``None``.
    """
    at = next(i for i, r in enumerate(records) if r is last)
    saved = max([int(r["step"]) for r in records[:at + 1] if r.get("event") == "checkpoint" and "step" in r], default=-1)
    lost = failed = False
    for r in records[at + 1:]:
        kind = r.get("event")
        if kind == "checkpoint" and "step" in r:
            saved = max(saved, int(r["step"]))
        elif kind == "failure_confirmed" or (kind == "run_end" and r.get("status") == "failed"):
            if not lost and float(r.get("t", 0.0)) > lost_by:
                return None
            lost, failed = True, failed or kind == "run_end"
        elif kind == "step":
            return int(r["step"]) if lost else None
        elif kind == "run_start" and r.get("resumed_from") is not None:
            return int(r["resumed_from"]) + 1 if lost else None
    return saved + 1 if failed else None


def measure(records: Sequence[dict[str, Any]], window_s: float, batch_size: int, start_step: int = 0,
            loss_grace_s: float = 0.0) -> dict[str, Any]:
    """Useful throughput and ETTR of one run over its replay window (module docstring).

    The run may be several jobs in one ``events.jsonl`` (a restart mode's ``--resume``: each
    appends a ``run_start`` and goes on from its checkpoint's next step): progress is the step
    number the job goes on from at the window's end (:func:`durable_end`: steps after a
    checkpoint that a loss threw away are not counted) minus the one at its start.

    Args:
        records: The run's events (``events.jsonl`` records; ``t`` in seconds since the epoch).
        window_s: The window's length, seconds, from the commit of step ``start_step``.
        batch_size: ``train.batch_size`` (samples per committed step).
        start_step: The step (counted from 0) whose commit starts the window (the warm-up before it
            is not measured).
        loss_grace_s: A loss recorded this long after the window's end happened inside it (the
            harness kills nothing after the window; detection and a job's end lag the kill).

    Returns:
        ``t0`` (the window's first commit), ``useful_steps``, ``samples_per_s``, ``productive_s``, ``ettr``,
        ``median_step_s`` (steady steps), ``step_s_by_shape`` and ``mean_step_s_by_shape`` (median and
        mean steady step per ``"SxR"``, seconds),
        ``failures`` (confirmed losses and jobs that stopped failed), ``recoveries``, ``reshapes``,
        ``rollbacks`` (commits of an older step number), ``restarts`` (jobs started again),
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
    going_on = durable_end(records, inside[-1], end + loss_grace_s)
    if going_on is not None:
        last = min(last, going_on)
    # a job's first step after a run_start or a new generation includes its (re)start: not steady
    first_of_gen: set[int] = set()
    shape_of_gen: dict[tuple[int, Any], str] = {}
    gen_of: dict[int, tuple[int, Any]] = {}
    shape, run, prev = None, 0, None
    for r in records:
        if r.get("event") == "run_start":
            p = (r.get("config") or {}).get("pipeline", {})
            shape = f"{p.get('stages', '?')}x{p.get('replicas', '?')}"
            run, prev = run + 1, None
        elif r.get("event") == "reshape":
            shape = str(r.get("to"))
        elif r.get("event") == "step":
            key = (run, r.get("generation"))
            shape_of_gen.setdefault(key, shape or "?")
            gen_of[id(r)] = key
            if prev is None or prev.get("generation") != r.get("generation") or int(r["step"]) != int(prev["step"]) + 1:
                first_of_gen.add(id(r))
            prev = r
    steady: list[float] = []
    by_shape: dict[str, list[float]] = {}
    for r in steps:
        if id(r) not in first_of_gen:
            steady.append(float(r["step_time"]))
            by_shape.setdefault(shape_of_gen.get(gen_of[id(r)], "?"), []).append(float(r["step_time"]))
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
        "failures": sum(1 for r in window if r.get("event") == "failure_confirmed"
                        or (r.get("event") == "run_end" and r.get("status") == "failed")),
        "recoveries": sum(1 for r in window if r.get("event") == "recovery_finished"),
        "reshapes": [{k: r.get(k) for k in ("kind", "from", "to", "why", "bytes", "seconds")}
                     for r in window if r.get("event") == "reshape"],
        "rollbacks": rollbacks, "restarts": sum(1 for r in window if r.get("event") == "run_start"),
        "checkpoints": len(writes), "checkpoint_write_s": statistics.median(writes) if writes else 0.0,
    }


def restart_pauses(records: Sequence[dict[str, Any]], restarts: Sequence[tuple[float, float]]) -> list[float]:
    """Seconds from the moment a lost job could restart to the restarted job's first commit.

    Args:
        records: The run's events.
        restarts: ``(ready, started)`` per restart the harness made, in order: ``ready`` is when
            the loss was detectable (``ft.detect_timeout_s`` after it) and enough nodes were up,
            ``started`` when the harness started ``spotpipe train --resume`` (seconds since the epoch).

    Returns:
        One pause per restart whose job committed a step before the next restart started (a job
        lost again before its first commit gives none), in order.
    """
    commits = sorted(float(r["t"]) for r in records if r.get("event") == "step")
    out = []
    for k, (ready, started) in enumerate(restarts):
        nxt = next((c for c in commits if c > started), None)
        later = restarts[k + 1][1] if k + 1 < len(restarts) else math.inf
        if nxt is not None and nxt < later:
            out.append(nxt - ready)
    return out


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
        else the median of the runs' ``pauses_s``, minus one step: from a replacement's process
        start to the next commit, or in restart mode from the moment a lost job could restart to
        its first commit (:func:`restart_pauses`; ``sim.restart_s``); else 1 s) and ``write_s``
        (median checkpoint write, seconds; 0 without checkpoints).
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
        mode: The bench's mode (a key of :data:`MODES`); the simulator plays
            ``SIM_MODES[mode]``: ``restart`` and ``rollback`` are its ``checkpoint`` mode.
        window_s: The replay's length, seconds.
        step_s: Measured median step of the configured shape, seconds.
        by_shape: Measured median step per shape label, seconds.
        pause_s: Measured pause of the mode's recovery, restart or reshape, seconds, one step
            excluded (``sim.regroup_s``, or ``sim.restart_s`` in the simulator's checkpoint mode).
        write_s: Measured checkpoint write, seconds (``sim.checkpoint_write_s``).

    Returns:
        The :class:`spotpipe.sim.elastic.ElasticResult`.

    Raises:
        BenchError: for a mode the bench does not know.
    """
    name = LEGACY_MODES.get(mode, mode)
    if name not in SIM_MODES:
        raise BenchError(f"prediction: unknown mode {mode!r}; choose from {', '.join(SIM_MODES)}")
    sim = replace(cfg.sim, replace_s=math.inf, regroup_s=max(0.0, pause_s), restart_s=max(0.0, pause_s),
                  checkpoint_write_s=write_s, spares=0)
    job = replace(cfg, sim=sim)
    return simulate_elastic(job, events, SIM_MODES[name], horizon_s=window_s,
                            step_time=calibrated_step_time(job, step_s, by_shape))


def relative_error(predicted: float, measured: float) -> float:
    """``|predicted - measured| / measured``.

    Args:
        predicted: The simulator's figure.
        measured: The runtime's figure (> 0).

    Returns:
        The relative error; when ``measured`` is 0 (a run with no useful progress): 0 if
        ``predicted`` is 0 too, else ``inf``.
    """
    if measured > 0:
        return abs(predicted - measured) / measured
    return 0.0 if predicted == 0 else math.inf


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
    from spotpipe.errors import SpotpipeError
    from spotpipe.events import read_events

    if not path.exists():
        return []
    try:
        return read_events(path)
    except SpotpipeError:  # unreadable now (being replaced): nothing to read yet
        return []


@dataclass
class Replay:
    """One run of the job under the trace: its processes and what the harness did.

    In ``restart`` mode a loss ends the whole job (``ft.strategy = none``); :meth:`tick_restart`
    waits for it to end, then starts it again with ``spotpipe train --resume`` and fresh workers
    once enough nodes are up.
    """

    mode: str
    run_dir: Path
    events: list[NodeEvent]
    workers: int
    env: dict[str, str]
    overrides: list[str] = field(default_factory=list)  # the job's --set values
    detect_s: float = 0.0  # ft.detect_timeout_s
    address: str = ""
    controller_log: Path = Path("controller.log")
    controller: subprocess.Popen[bytes] | None = None
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)  # node -> its worker process
    pool: list[int] = field(default_factory=list)  # nodes up with no process (idle)
    retry_at: float = 0.0
    actions: list[dict[str, Any]] = field(default_factory=list)
    starts: list[tuple[int, float]] = field(default_factory=list)  # (pid, time) of joiners in the replay
    all_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    controllers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)  # nodes whose process the harness SIGKILLed
    # restart mode
    down_since: float | None = None  # when the running job was lost (None: it runs, or is starting)
    loss_at: float = 0.0  # the loss that took it down
    enough_at: float | None = None  # since when enough nodes are up again
    interrupt_at: float = math.inf  # when the lost job, still running, gets the next Ctrl-C
    interrupts: int = 0
    interrupt_gap: float = DOWN_GRACE_S  # between a lost job's Ctrl-Cs
    after_window: bool = False  # the window is over: a lost job restarts at once, to measure its pause
    gone_at: float | None = None  # when the lost job's controller ended
    starting_since: float | None = None  # a restart's controller runs and its job token is awaited
    assigned: list[int] = field(default_factory=list)  # its nodes, whose workers start with the token
    restarts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def restart_mode(self) -> bool:
        """Whether a loss stops the whole job (mode ``restart``)."""
        return self.mode == "restart"

    def launch(self, resume: bool) -> None:
        """Start the controller on a free port: the job, or ``--resume`` of its run directory.

        Args:
            resume: Continue the run from its last checkpoint (a restart).
        """
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        run = self.run_dir / "run"
        cmd = [sys.executable, "-m", "spotpipe", "train"]
        if resume:
            (run / "job.token").unlink(missing_ok=True)  # the next one is the new job's
            cmd += ["--resume", str(run), "--set", f"run.port={port}"]
            log_path = self.run_dir / f"controller-restart{len(self.restarts)}.log"
        else:
            for o in [*self.overrides, f"run.port={port}", f"run.dir={run}"]:
                cmd += ["--set", o]
            log_path = self.run_dir / "controller.log"
        self.controller_log = log_path
        with open(log_path, "wb") as log:
            self.controller = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env, cwd=str(ROOT), start_new_session=True)
        self.controllers.append(self.controller)

    def token(self) -> str:
        """The job token the running controller wrote (empty until it has).

        Returns:
            The token, or ``""``.
        """
        try:
            return (self.run_dir / "run" / "job.token").read_text().strip()
        except OSError:
            return ""

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

        In restart mode the workers of a lost job go to the pool's front: they run the restarted
        job with the oldest idle nodes, as the simulator keeps the survivors.

        Args:
            now: Seconds since the epoch.
            t0: The replay's start, seconds since the epoch.
        """
        for node, proc in list(self.procs.items()):
            if proc.poll() is not None and node not in self.killed:
                del self.procs[node]
                if self.restart_mode and self.down_since is not None:
                    self.pool.insert(0, node)
                    self.actions.append({"t": now - t0, "what": "stopped", "node": node, "pid": proc.pid,
                                         "rc": proc.returncode})
                    continue
                self.pool.append(node)
                self.actions.append({"t": now - t0, "what": "exited", "node": node, "pid": proc.pid, "rc": proc.returncode})
                self.retry_at = now + 1.0

    def fill(self, now: float, t0: float) -> None:
        """Start a worker for idle nodes while the job has fewer live workers than its size.

        Args:
            now: Seconds since the epoch.
            t0: The replay's start, seconds since the epoch.
        """
        if self.restart_mode:  # a restart starts every worker at once (tick_restart)
            return
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
            if e.node in self.assigned:  # a restart's node, its worker not started yet
                self.assigned.remove(e.node)
                self.actions.append({"t": now - t0, "trace_t": e.time, "what": "restart node removed", "node": e.node})
                self.lost(now, t0)
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
            if self.restart_mode:
                self.lost(now, t0)
        else:
            self.pool.append(e.node)
            self.actions.append({"t": now - t0, "trace_t": e.time, "what": "node up", "node": e.node})

    def lost(self, now: float, t0: float) -> None:
        """Restart mode: the job lost a worker and ends (a second loss while it is down changes nothing).

        Args:
            now: Seconds since the epoch.
            t0: The replay's start, seconds since the epoch.
        """
        if self.down_since is not None:
            return
        # ft.strategy = none ends a job on its own; one that has not committed since it started (its
        # workers may not have joined, and one not joined is no loss to it) is stopped at once
        fresh = self.starting_since is not None or self.restart_pending()
        self.down_since, self.loss_at, self.enough_at, self.gone_at, self.interrupts = now, now, None, None, 0
        self.interrupt_at = now if fresh else now + self.detect_s + DOWN_GRACE_S
        self.interrupt_gap = 1.0 if fresh else DOWN_GRACE_S
        self.pool[:0] = self.assigned
        self.assigned, self.starting_since = [], None
        self.actions.append({"t": now - t0, "what": "job lost"})

    def tick_restart(self, now: float, t0: float) -> None:
        """Restart mode, every turn of the replay: end a lost job, restart it, start its workers.

        Args:
            now: Seconds since the epoch.
            t0: The replay's start, seconds since the epoch.

        Raises:
            BenchError: when a restarted controller ends or writes no job token within the start timeout.
        """
        c = self.controller
        if self.starting_since is not None and c is not None:
            if c.poll() is not None:
                raise BenchError(f"restart: spotpipe train --resume exited with code {c.returncode}: "
                                 f"{_tail(self.controller_log)}")
            token = self.token()
            if not token:
                if now > self.starting_since + START_TIMEOUT_S:
                    raise BenchError(f"restart: spotpipe train --resume wrote no job token in {START_TIMEOUT_S:g} s: "
                                     f"{_tail(self.controller_log)}")
                return
            self.env["SPOTPIPE_TOKEN"] = token
            for node in self.assigned:
                self.start_worker(node, counted=False)
            self.assigned, self.starting_since = [], None
            return
        if self.down_since is None:
            return
        self.reap(now, t0)
        up = len(self.pool) + len(self.procs)
        if up < self.workers:
            self.enough_at = None
        elif self.enough_at is None:
            self.enough_at = now
        if c is not None and c.poll() is None:
            if now >= self.interrupt_at:
                if self.interrupts < 2:
                    c.send_signal(signal.SIGINT)
                    why = "lost before its first commit" if self.interrupt_gap < DOWN_GRACE_S else "lost job still running"
                    self.actions.append({"t": now - t0, "what": f"Ctrl-C ({why})"})
                else:
                    c.kill()
                self.interrupts += 1
                self.interrupt_at = now + self.interrupt_gap
            return
        if self.gone_at is None:
            self.gone_at = now
        if any(p.poll() is None for p in self.procs.values()):
            if now > self.gone_at + LEFTOVER_S:
                for p in self.procs.values():
                    if p.poll() is None:
                        p.kill()
            return
        ready = max(self.enough_at or now, self.loss_at + self.detect_s)
        if self.after_window and len(self.pool) < self.workers:  # nodes no longer matter: spare ones
            self.pool += [SPARE_NODES + k for k in range(self.workers - len(self.pool))]
            ready = now
        if len(self.pool) < self.workers or self.enough_at is None and not self.after_window:
            return
        nodes, self.pool = self.pool[:self.workers], self.pool[self.workers:]
        self.restarts.append({"t": now - t0, "ready": ready, "started": now, "nodes": nodes})
        self.actions.append({"t": now - t0, "what": "restart", "nodes": nodes, "waited_s": now - self.loss_at})
        self.down_since, self.starting_since, self.assigned = None, now, nodes
        self.launch(resume=True)

    def restart_pending(self) -> bool:
        """Restart mode: whether the newest restart has not committed a step yet (nor been lost).

        Returns:
            ``True`` while a restarted job starts; ``False`` with no restart, a commit since, or the job down.
        """
        if not self.restarts or self.down_since is not None:
            return False
        started = self.restarts[-1]["started"]
        return not any(r.get("event") == "step" and float(r["t"]) > started
                       for r in read_records(self.run_dir / "run" / "events.jsonl"))

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
        for old in self.controllers:
            if old.poll() is None:
                old.kill()
                old.wait()
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
        mode: A key of :data:`MODES` (``elastic``, ``wait``, ``restart``, ``rollback``).
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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    load_before = os.getloadavg()
    r = Replay(mode, run_dir, list(events), workers, env, list(overrides), detect_s=cfg.ft.detect_timeout_s)
    out: dict[str, Any] = {"mode": mode, "run": tag, "load_before": load_before, "error": None}
    wall0 = time.monotonic()
    r.launch(resume=False)
    assert r.controller is not None
    t0: float | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not r.token():
            if r.controller.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{mode}: the controller wrote no job token: {_tail(run_dir / 'controller.log')}")
            time.sleep(0.1)
        env["SPOTPIPE_TOKEN"] = r.token()
        for node in range(workers):
            r.start_worker(node, counted=False)
        events_path = run_dir / "run" / "events.jsonl"
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
            if now >= t0 + window_s or (r.controller.poll() is not None and r.down_since is None):
                break
            while queue and t0 + queue[0].time <= now:
                r.play(queue.pop(0), now, t0)
            r.reap(now, t0)
            r.fill(now, t0)
            if r.restart_mode:
                r.tick_restart(now, t0)
            time.sleep(0.05)
        if r.restart_mode:  # no more trace events: a lost job ends and restarts; a restart runs to its first commit
            until, check = time.time() + AFTER_WINDOW_S, 0.0
            r.after_window = True
            while time.time() < until:
                now = time.time()
                r.tick_restart(now, t0)
                if r.controller.poll() is not None and r.down_since is None and r.starting_since is None:
                    break
                if r.down_since is None and r.starting_since is None and now >= check:
                    if not r.restart_pending():
                        break
                    check = now + 0.5
                time.sleep(0.05)
        if r.controller.poll() is not None and r.down_since is None:
            out["error"] = f"the controller exited with code {r.controller.returncode} before the window ended: " \
                           f"{_tail(r.controller_log)}"
    except BenchError as exc:
        out["error"] = str(exc)
    finally:
        r.stop()
    records = read_records(run_dir / "run" / "events.jsonl")
    try:
        out.update(measure(records, window_s, cfg.train.batch_size, warmup,
                           loss_grace_s=cfg.ft.detect_timeout_s + DOWN_GRACE_S))
    except BenchError as exc:
        out["error"] = out["error"] or f"{mode}: {exc}"
    if r.restart_mode:
        out["pauses_s"] = restart_pauses(records, [(x["ready"], x["started"]) for x in r.restarts])
    else:
        out["pauses_s"] = join_pauses(records, r.starts)
    out["restarts_started"] = [{"t": x["t"], "ready_t": x["ready"] - (t0 or 0.0), "nodes": x["nodes"]}
                               for x in r.restarts]
    out["actions"] = r.actions
    out["warnings"] = run_warnings(out)
    out["controller_tail"] = _tail(r.controller_log, 6).split(" | ")
    out["failed_joiners"] = {f"pid {a['pid']}": _tail(run_dir / f"joiner-node{a['node']}-{i}.log", 2)
                             for i, p in enumerate(r.all_procs) for a in r.actions
                             if a.get("what") == "exited" and a.get("pid") == p.pid}
    out["wall_s"] = time.monotonic() - wall0
    out["load_after"] = os.getloadavg()
    return out


def run_warnings(run: dict[str, Any]) -> list[str]:
    """What looks wrong in a run that ended without an error: kills the controller never
    confirmed, joiners it turned away, (elastic) a shrink with no grow although a node came, or
    (restart) a lost job that did not end on its own.

    Args:
        run: A run record (``actions``, ``failures``, ``reshapes``, ``mode``).

    Returns:
        One line per finding (empty: nothing seen).
    """
    acts = run.get("actions", [])
    kills = sum(1 for a in acts if a.get("what") == "SIGKILL")
    out = []
    if "failures" in run and run["failures"] < kills and run.get("mode") != "restart":  # restart: one per job
        out.append(f"{kills} workers SIGKILLed but {run['failures']} failures confirmed in the window")
    exited = sum(1 for a in acts if a.get("what") == "exited")
    if exited:
        out.append(f"{exited} joiner(s) exited without a role (refused or failed; see failed_joiners)")
    kinds = [x.get("kind") for x in run.get("reshapes", [])]
    joined = any(a.get("what") == "join" for a in acts)
    if run.get("mode") == "elastic" and "shrink" in kinds and "grow" not in kinds and joined:
        out.append("the job shrank and a node joined, but it never grew")
    stuck = sum(1 for a in acts if a.get("what") == "Ctrl-C (lost job still running)")
    if stuck:
        out.append(f"{stuck} Ctrl-C sent to a lost job that did not end on its own (ft.strategy = none)")
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
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="modes: elastic (ft.elastic = true: shrink, grow back); wait (the lost role waits for the next "
               "joiner, mirror recovery); restart (checkpoint/restart: a loss stops the whole job, which starts "
               "again with spotpipe train --resume and fresh workers once enough nodes are up; elastic_vs_checkpoint "
               "is against it and the simulator's checkpoint mode predicts it); rollback (ft.strategy = checkpoint: "
               "the survivors reload the last checkpoint in place; reported, no target). "
               "--quick: 1 round of 40 s replays of elastic, wait and restart (under 4 minutes)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round of elastic, wait and restart, 40 s replays at --compress 40 (the first half of "
                         "the full replay), a checkpoint every 5 steps (under 4 minutes)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every mode (default 3)")
    ap.add_argument("--modes", default=None,
                    help=f"comma-separated subset of {', '.join(MODES)}, in round order (default all; --quick "
                         f"{', '.join(QUICK_MODES)})")
    ap.add_argument("--trace", default=str(TRACE), help="Bamboo-format trace (default the p3 trace)")
    ap.add_argument("--thin", type=int, default=8, help="keep 1 trace node in N (default 8: ~4 of the p3 cluster's 32)")
    ap.add_argument("--group", type=int, default=0, help="which one of the N (default 0)")
    ap.add_argument("--start", type=float, default=1800.0, help="slice start, trace seconds (default 1800)")
    ap.add_argument("--seconds", type=float, default=None, help="replay length, wall seconds (default 80; --quick 40)")
    ap.add_argument("--compress", type=float, default=None, help="trace seconds per wall second (default 40)")
    ap.add_argument("--replace-wait", type=float, default=0.0,
                    help="ft.replace_wait_s: seconds a loss waits for a joiner before an elastic job shrinks (default 0)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="train.checkpoint_every of the restart and rollback modes (default 20; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="the step (counted from 0) whose commit starts the replay, in every mode (default "
                         "--checkpoint-every - 1: the first checkpoint's step, as in the simulator's replay)")
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
    args.compress = args.compress if args.compress is not None else 40.0
    args.checkpoint_every = args.checkpoint_every if args.checkpoint_every is not None else (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else args.checkpoint_every - 1
    if args.rounds < 1 or not args.seconds > 0 or args.checkpoint_every < 1 or args.warmup < 0:
        ap.error(f"--rounds and --checkpoint-every must be >= 1, --seconds > 0 and --warmup >= 0; got {args.rounds}, "
                 f"{args.checkpoint_every}, {args.seconds} and {args.warmup}")
    if args.modes is None:
        args.modes = ",".join(QUICK_MODES if args.quick else MODES)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(MODES)}")
    args.modes = modes
    return args


def mode_overrides(mode: str, args: argparse.Namespace) -> list[str]:
    """The job's ``--set`` values in one mode.

    Args:
        mode: A key of :data:`MODES`.
        args: The parsed options.

    Returns:
        ``section.key=value`` strings (a checkpoint every ``--checkpoint-every`` steps in
        :data:`CHECKPOINTED` modes, none in the others).
    """
    extra = [f"ft.replace_wait_s={args.replace_wait}"]
    extra.append(f"train.checkpoint_every={args.checkpoint_every if mode in CHECKPOINTED else 0}")
    return [*JOB, *MODES[mode], *extra, *args.set]


def resummarise(path: Path, out: Path) -> int:
    """Compute the summary of a written result again from its runs, with no new run.

    For a result whose runs were disturbed (a run with an error is left out) or after the
    summary's rules changed; the runs, trace events and settings are the file's own. A result
    written before the restart mode existed names the in-place rollback ``checkpoint``: it is
    read as ``rollback``.

    Args:
        path: A JSON file this bench wrote.
        out: Where the result goes (may be ``path``).

    Returns:
        The exit code: 0, or 2 when the file cannot be read or is not this bench's.
    """
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        rec["config"]["modes"] = {LEGACY_MODES.get(m, m): o for m, o in rec["config"]["modes"].items()}
        unknown = [m for m in rec["config"]["modes"] if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode {', '.join(unknown)}")
        cfgs = {m: load_config(None, o) for m, o in rec["config"]["modes"].items()}
        events = [NodeEvent(**e) for e in rec["trace"]["events"]]
        ns = argparse.Namespace(modes=list(cfgs), seconds=float(rec["trace"]["window_s"]))
        runs = [{**r, "mode": LEGACY_MODES.get(r["mode"], r["mode"])} for r in rec["runs"]]
        rec["runs"] = runs
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SpotpipeError) as exc:
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
                      f"{len(r['reshapes'])} reshapes, {r['restarts']} restarts"
                      + (f" (pauses {[round(x, 1) for x in r['pauses_s']]} s)" if mode == "restart" else ""))
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
        ``elastic_vs_checkpoint`` (against ``restart``: checkpoint/restart), ``elastic_vs_rollback``
        (no target), ``sim_vs_runtime_error`` (max over the modes of :data:`TARGET_MODES`) and
        ``sim_vs_runtime_error_by_mode`` (every mode), ``excluded_runs`` (runs with an error, left out of every
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
            "pause_s": calibrate(mine, cfgs[mode])["pause_s"],
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
    target_errors = [v for m, v in errors.items() if m in TARGET_MODES]
    target_held = [v for m, v in held_by_mode.items() if m in TARGET_MODES]
    out = {"excluded_runs": [{"run": r.get("run"), "error": r.get("error")} for r in runs if r not in ok],
           "by_mode": by_mode, "elastic_vs_wait": ratio("elastic", "wait"),
           "elastic_vs_checkpoint": ratio("elastic", "restart"),
           "elastic_vs_checkpoint_is": "against restart: a loss stops the job, which is restarted from its last "
                                       "checkpoint (spotpipe train --resume) once enough nodes are up",
           "elastic_vs_rollback": ratio("elastic", "rollback"),
           "sim_vs_runtime_error": max(target_errors) if target_errors else None,
           "sim_vs_runtime_error_is": f"max over {', '.join(TARGET_MODES)} of |predicted - measured| / measured, "
                                      "of the median useful "
                                      "samples/s over the rounds; each run is predicted at its own mean step time "
                                      "per shape, with the median pauses of the mode's runs",
           "sim_vs_runtime_error_by_mode": errors,
           "sim_vs_runtime_error_held_out": max(target_held) if target_held else None,
           "sim_vs_runtime_error_held_out_is": f"max over {', '.join(TARGET_MODES)} of the mean, over runs, of the "
                                               "relative error of the run's prediction at its own step time with "
                                               "the pauses of the other rounds' runs"}
    print(f"\n{'mode':11s} {'samples/s':>10s} {'ETTR':>6s} {'steps':>6s} {'pause s':>8s} {'sim samples/s':>14s} "
          f"{'sim ETTR':>9s} {'error':>6s}  load (1 min, before -> after)")
    for mode, e in by_mode.items():
        if not e:
            print(f"{mode:11s} (no run)")
            continue
        loads = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in e["loads"])
        print(f"{mode:11s} {e['median_samples_per_s']:10.2f} {e['median_ettr']:6.3f} {e['median_useful_steps']:6.0f} "
              f"{e['pause_s']:8.2f} {e['predicted_median_samples_per_s']:14.2f} {e['predicted_median_ettr']:9.3f} {e['error']:6.3f}  {loads}")
    if out["sim_vs_runtime_error_held_out"] is not None:
        print(f"sim_vs_runtime_error, calibrated on the other rounds: {out['sim_vs_runtime_error_held_out']:.3f}")
    for key in ("elastic_vs_wait", "elastic_vs_checkpoint", "sim_vs_runtime_error"):
        v = out[key]
        other = {"elastic_vs_wait": "wait", "elastic_vs_checkpoint": "restart"}.get(key)
        none = "-" if not (other and by_mode.get(other)) else f"- ({other} made no useful progress)"
        print(f"{key:24s} {none if v is None else f'{v:.3f}'}  (target {'>=' if 'vs_runtime' not in key else '<='} "
              f"{TARGETS[key]})")
    if out["elastic_vs_rollback"] is not None:
        print(f"{'elastic_vs_rollback':24s} {out['elastic_vs_rollback']:.3f}  (no target: the in-place rollback)")
    return out


if __name__ == "__main__":
    sys.exit(main())
