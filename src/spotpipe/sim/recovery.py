"""The simulator's failure-handling hooks: when a failure is detected, and what the job does.

Two seams, both pure functions of the virtual clock:

* **Detection.** :func:`detection_time` asks the runtime's own detector,
  :func:`spotpipe.ft.detector.detect` (``detect(now, last_heartbeat, config)``), when a dead
  worker is first suspected: workers heartbeat every ``run.heartbeat_s`` from time 0, a dead one
  stops, and the detector is evaluated at :func:`spotpipe.ft.detector.next_deadline` (the same
  rule the controller ships, so the simulator measures it; DESIGN.md "failure detection and
  policy are pure functions"). The detector is a parameter, so another rule can be plugged in.
  The job (:mod:`spotpipe.sim.job`) then groups confirmed losses into recoveries by the
  controller's rules too (:func:`spotpipe.ft.confirm.loss_action`,
  :func:`spotpipe.ft.confirm.collect_step`: the 0.3 s grouping window).
* **Policy.** A :class:`~spotpipe.sim.decision.RecoveryPolicy` turns a
  :class:`~spotpipe.sim.decision.FailureContext` (who was lost, the committed step, the newest
  checkpoint, free nodes) into a :class:`~spotpipe.sim.decision.RecoveryDecision`: which step
  training resumes from, how long the restart takes once every lost position has a node, and
  whether lost positions need replacement nodes (those types live in :mod:`spotpipe.sim.decision`
  and are re-exported here). :func:`build_policy` picks the policy by ``sim.recovery``.
  :class:`CheckpointRestart` is the baseline of
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
from typing import Any

from spotpipe.config import SIM_RECOVERY, FTConfig, JobConfig
from spotpipe.errors import ConfigError
from spotpipe.ft.detector import detect as ft_detect
from spotpipe.ft.detector import next_deadline
from spotpipe.ft.confirm import confirm_silence
from spotpipe.sim.decision import FailureContext as FailureContext
from spotpipe.sim.decision import RecoveryDecision as RecoveryDecision
from spotpipe.sim.decision import RecoveryPolicy as RecoveryPolicy
from spotpipe.sim.decision import Worker as Worker
from spotpipe.sim.decision import WorkerRecovery as WorkerRecovery
from spotpipe.sim.ftpolicy import PlannedRecovery
from spotpipe.network import Network

Detector = Callable[[float, Mapping[int, float], FTConfig], Any]


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

    Returns:
        A :class:`CheckpointRestart` (``checkpoint``) or a :class:`PlannedRecovery` (``policy``).

    Raises:
        ConfigError: for another ``sim.recovery`` value.
    """
    if cfg.sim.recovery == "checkpoint":
        return CheckpointRestart(cfg.sim.restart_s)
    if cfg.sim.recovery == "policy":
        return PlannedRecovery(network)
    raise ConfigError(f"sim.recovery must be one of {', '.join(SIM_RECOVERY)}, got {cfg.sim.recovery!r}")


def last_heartbeat(t: float, heartbeat_s: float) -> float:
    """Time of the last heartbeat sent at or before ``t`` (heartbeats at 0, h, 2h, ...).

    Args:
        t: Virtual time in seconds (>= 0).
        heartbeat_s: Heartbeat period in seconds (> 0).

    Returns:
        The largest multiple of ``heartbeat_s`` that is <= ``t`` (up to rounding).
    """
    return math.floor(t / heartbeat_s + 1e-9) * heartbeat_s


def detection_time(
    node: int,
    failed_at: float,
    alive: Mapping[int, float] | None,
    heartbeat_s: float,
    ft: FTConfig,
    detector: Detector = ft_detect,
    max_checks: int = 10_000,
    run_timeout_s: float = math.inf,
) -> tuple[float, str]:
    """When the loss of ``node`` that died at ``failed_at`` is confirmed, and why.

    ``detector`` must first suspect it; then the runtime's confirmation rule
    (:func:`spotpipe.ft.confirm.confirm_silence`) decides, with the other members known to have
    aborted their step (a dead peer breaks the running step at once). A suspect the rule does
    not confirm yet is checked again a heartbeat later.

    Args:
        node: The dead node.
        failed_at: Its death time.
        alive: Other members and their join times (they heartbeat regularly); may be None.
        heartbeat_s: ``run.heartbeat_s``.
        ft: The ``[ft]`` section the detector reads.
        detector: ``detect(now, last_heartbeat, config)`` returning an object with ``suspects``
            and ``reasons`` (as :class:`spotpipe.ft.detector.Detection`; ``silent`` if it has one).
        max_checks: Heartbeat periods to try before giving up.
        run_timeout_s: ``run.timeout_s`` (silence that confirms a loss on its own).

    Returns:
        ``(time, reason)``: the first check time at which ``node``'s loss is confirmed.

    Raises:
        ConfigError: If the detector never suspects ``node`` within ``max_checks`` periods.
    """
    dead_hb = last_heartbeat(failed_at, heartbeat_s)
    t = next_deadline({node: dead_hb}, ft) or failed_at
    t = max(t, failed_at)
    for _ in range(max_checks):
        beats = {w: max(j, last_heartbeat(t, heartbeat_s)) for w, j in (alive or {}).items()}
        beats[node] = dead_hb
        found = detector(t, beats, ft)
        if node in found.suspects:
            silent = node in getattr(found, "silent", found.suspects)
            if confirm_silence(max(0.0, t - dead_hb), silent, True, run_timeout_s) is not None:
                return t, str(found.reasons.get(node, "suspected"))
        t += heartbeat_s
    raise ConfigError(f"the failure detector never suspected node {node} that died at t={failed_at:g} s")
