"""The simulator's failure-handling hooks: when a failure is detected, and what the job does.

Two seams, both pure functions of the virtual clock:

* **Detection.** :func:`detection_time` asks the runtime's own detector,
  :func:`spotpipe.ft.detector.detect` (``detect(now, last_heartbeat, config)``), when a dead
  worker is first suspected: workers heartbeat every ``run.heartbeat_s`` from time 0, a dead one
  stops, and the detector is evaluated at :func:`spotpipe.ft.detector.next_deadline` (the same
  rule the controller ships, so the simulator measures it; DESIGN.md "failure detection and
  policy are pure functions"). The detector is a parameter, so another rule can be plugged in.
* **Policy.** A :class:`RecoveryPolicy` turns a :class:`FailureContext` (who was lost, the
  committed step, the newest checkpoint, free nodes) into a :class:`RecoveryDecision`: which step
  training resumes from, how long the restart takes once every lost position has a node, and
  whether lost positions need replacement nodes. :class:`CheckpointRestart` is the baseline of
  the Meta cluster study (Kokolis et al. 2025, "Revisiting Reliability in Large-Scale Machine
  Learning Research Clusters", s. 4: restart from the last checkpoint after a failure)
  (``sim.recovery = "checkpoint"``, the default). :class:`spotpipe.sim.ftpolicy.PlannedRecovery`
  (``sim.recovery = "policy"``) plays the shipped policy,
  :func:`spotpipe.ft.policy.plan_recovery` (replica / mirror / CheckFree recovery of the lost
  stages without rollback, else the checkpoint, else stop).

Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from spotpipe.config import SIM_RECOVERY, FTConfig, JobConfig
from spotpipe.errors import ConfigError
from spotpipe.ft.detector import detect as ft_detect
from spotpipe.ft.detector import next_deadline
from spotpipe.sim.network import Network

Worker = tuple[int, int]  # (pipeline rank, replica)
Detector = Callable[[float, Mapping[int, float], FTConfig], Any]


@dataclass(frozen=True)
class FailureContext:
    """What a policy knows when it decides.

    Attributes:
        now: Virtual time of the detection.
        failed_at: Virtual time the node died.
        lost: Lost worker positions ``(rank, replica)``.
        lost_nodes: Their node ids.
        step: Steps committed so far.
        checkpoint_step: Step of the newest complete checkpoint (``None``: none yet).
        free_nodes: Idle nodes (spares, replacements) ready now.
        config: The job.
        locations: Location of the node of every worker slot (``replica x ranks + rank``; a lost
            slot: its dead node's); empty: unknown (the initial placement's is used).
    """

    now: float
    failed_at: float
    lost: tuple[Worker, ...]
    lost_nodes: tuple[int, ...]
    step: int
    checkpoint_step: int | None
    free_nodes: int
    config: JobConfig
    locations: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerRecovery:
    """How one lost worker is rebuilt (for its ``recovery_finished`` event).

    Attributes:
        stage: Pipeline rank.
        replica: Data-parallel replica.
        strategy: Its own strategy (``mirror``, ``checkfree``, ``checkpoint``, ...).
        why: One line from the policy.
        bytes: State bytes moved to the new node.
        exact: The rebuilt state equals the lost state.
    """

    stage: int
    replica: int
    strategy: str
    why: str
    bytes: int = 0
    exact: bool = False


@dataclass(frozen=True)
class RecoveryDecision:
    """What the job does about a failure.

    Attributes:
        strategy: Name for the ``recovery_started`` event (``checkpoint``, ``stop``, ...).
        resume_step: Training continues after this many committed steps (steps after it are
            replayed).
        restart_s: Seconds from the moment every lost position has a node until training runs.
        replace_lost: Lost positions take idle nodes (spares or replacements).
        why: One line for the event log.
        stop: The job ends instead.
        bytes: State bytes moved to the new nodes (0: none, or a checkpoint load).
        workers: Per lost worker, its own strategy, reason and bytes (empty: the decision's).
    """

    strategy: str
    resume_step: int
    restart_s: float
    replace_lost: bool
    why: str
    stop: bool = False
    bytes: int = 0
    workers: tuple[WorkerRecovery, ...] = ()


class RecoveryPolicy(Protocol):
    """Decides what a detected failure costs."""

    @property
    def name(self) -> str:
        """The ``sim.recovery`` value it implements (read-only: policies are frozen dataclasses)."""
        ...

    def decide(self, ctx: FailureContext) -> RecoveryDecision:
        """The decision for one detected failure."""
        ...


@dataclass(frozen=True)
class CheckpointRestart:
    """Restart the whole job from the newest checkpoint (step 0 when there is none).

    Attributes:
        restart_s: Re-launch plus checkpoint load (``sim.restart_s``).
    """

    restart_s: float
    name: str = "checkpoint"

    def decide(self, ctx: FailureContext) -> RecoveryDecision:
        resume = ctx.checkpoint_step if ctx.checkpoint_step is not None else 0
        where = f"checkpoint of step {resume}" if ctx.checkpoint_step is not None else "step 0 (no checkpoint yet)"
        lost = ", ".join(f"rank {r} replica {p}" for r, p in ctx.lost)
        return RecoveryDecision(
            strategy=self.name,
            resume_step=resume,
            restart_s=self.restart_s,
            replace_lost=True,
            why=f"lost {lost} at step {ctx.step}: restart the job from the {where}, replaying {ctx.step - resume} steps",
        )


def build_policy(cfg: JobConfig, network: Network | None = None) -> RecoveryPolicy:
    """The policy named by ``sim.recovery``.

    Args:
        cfg: The job.
        network: The cluster's links, to price state transfers (``policy``); ``None``: the
            uniform link of ``[network]``.
    """
    if cfg.sim.recovery == "checkpoint":
        return CheckpointRestart(cfg.sim.restart_s)
    if cfg.sim.recovery == "policy":
        from spotpipe.sim.ftpolicy import PlannedRecovery  # it imports this module

        return PlannedRecovery(network)
    raise ConfigError(f"sim.recovery must be one of {', '.join(SIM_RECOVERY)}, got {cfg.sim.recovery!r}")


def last_heartbeat(t: float, heartbeat_s: float) -> float:
    """Time of the last heartbeat sent at or before ``t`` (heartbeats at 0, h, 2h, ...)."""
    return math.floor(t / heartbeat_s + 1e-9) * heartbeat_s


def detection_time(
    node: int,
    failed_at: float,
    alive: Mapping[int, float] | None,
    heartbeat_s: float,
    ft: FTConfig,
    detector: Detector = ft_detect,
    max_checks: int = 10_000,
) -> tuple[float, str]:
    """When ``detector`` first suspects ``node`` that died at ``failed_at``, and why.

    Args:
        node: The dead node.
        failed_at: Its death time.
        alive: Other members and their join times (they heartbeat regularly); may be None.
        heartbeat_s: ``run.heartbeat_s``.
        ft: The ``[ft]`` section the detector reads.
        detector: ``detect(now, last_heartbeat, config)`` returning an object with ``suspects``
            and ``reasons`` (as :class:`spotpipe.ft.detector.Detection`).

    Returns:
        ``(time, reason)``: the first check time at which ``node`` is a suspect.
    """
    dead_hb = last_heartbeat(failed_at, heartbeat_s)
    t = next_deadline({node: dead_hb}, ft) or failed_at
    t = max(t, failed_at)
    for _ in range(max_checks):
        beats = {w: max(j, last_heartbeat(t, heartbeat_s)) for w, j in (alive or {}).items()}
        beats[node] = dead_hb
        found = detector(t, beats, ft)
        if node in found.suspects:
            return t, str(found.reasons.get(node, "suspected"))
        t += heartbeat_s
    raise ConfigError(f"the failure detector never suspected node {node} that died at t={failed_at:g} s")
