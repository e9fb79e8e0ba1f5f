"""Fault injection from the controller: real signals to real worker processes.

The specs (``ft.faults``, ``spotpipe train --fail SPEC --fail-rate RATE``) are parsed and drawn
by the pure :class:`spotpipe.ft.faults.FaultPlan`; this module times them. A fault of step ``n``
is armed when step ``n`` starts (the controller saw step ``n - 1`` commit, or the generation
that runs ``n`` was published) and fires ``at_fraction x`` the expected step time later, so
``stage=1@random`` lands at a random moment inside the step (forward, backward, all-reduce or
optimizer step). Each fault fires once: a replayed step does not kill its replacement again.
Per-hour rates are converted with ``ft.rate_step_time_s``, or with the median measured step time
once three steps have committed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from spotpipe.config import JobConfig
from spotpipe.faultspec import parse_fault_specs
from spotpipe.ft.faults import Delivery, Fault, FaultPlan, deliver


@dataclass
class _Armed:
    due: float
    fault: Fault


class FaultInjector:
    """Arms and fires the job's faults.

    Args:
        cfg: The job (``ft.faults``, stages, replicas, steps, seed).
        pid_of: ``(stage, replica) -> (worker id, pid)`` of the current holder, or None if vacant.
        on_fire: Called with (fault, worker, pid) after a signal was sent (for the event log).
    """

    def __init__(self, cfg: JobConfig, pid_of: Callable[[int, int], tuple[int, int] | None],
                 on_fire: Callable[[Fault, int, int], None]) -> None:
        specs = parse_fault_specs(cfg.ft.faults)
        p = cfg.pipeline
        fixed = tuple(s for s in specs if s.rate is None)
        rates = tuple(s for s in specs if s.rate is not None)
        self.fixed = FaultPlan(fixed, p.ranks, p.replicas, cfg.train.steps, cfg.train.seed)
        self.rates = FaultPlan(rates, p.ranks, p.replicas, cfg.train.steps, cfg.train.seed + 1)
        self.rate_step_time = cfg.ft.rate_step_time_s if cfg.ft.rate_step_time_s > 0 else None
        if self.rate_step_time is not None:
            self.rates = self.rates.with_step_time(self.rate_step_time)
        self.pid_of = pid_of
        self.on_fire = on_fire
        self.step_times: list[float] = []
        self.armed: list[_Armed] = []
        self.fired: set[tuple[int, int, int, str]] = set()
        self.started: set[int] = set()
        self.deliveries: list[Delivery] = []
        self.enabled = bool(specs)
        self._phase_faults = self.fixed.phase_faults()

    def expected_step_s(self) -> float:
        return statistics.median(self.step_times[-9:]) if self.step_times else 0.2

    def step_committed(self, step_time: float, first_of_generation: bool) -> None:
        """Record a committed step's duration for the expected step time (first steps of a generation,

        which include start-up, and non-positive times are left out).

        Args:
            step_time: Seconds the step took.
            first_of_generation: The step was the first of its generation.
        """
        if not first_of_generation and step_time > 0:
            self.step_times.append(step_time)

    def step_started(self, step: int, now: float) -> None:
        """Arm the faults of ``step`` (once per step number).

        Args:
            step: The step, 0-based.
            now: Monotonic seconds; a fault fires at ``now + at_fraction x expected step time``.
        """
        if not self.enabled or step in self.started:
            return
        self.started.add(step)
        faults = list(self.fixed.faults_at(step))
        if self.rates.specs:
            if self.rates.step_time_s is None and len(self.step_times) >= 3:
                self.rates = self.rates.with_step_time(self.expected_step_s())
            if self.rates.step_time_s is not None:
                faults += self.rates.faults_at(step)
        for f in faults:
            if not f.phase:  # phase faults travel with the victim's role (phase_faults_for)
                self.armed.append(_Armed(now + f.at_fraction * self.expected_step_s(), f))

    def phase_faults_for(self, stage: int, replica: int) -> list[tuple[int, str]]:
        """``(step, phase)`` of the phase faults the holder of this role kills itself with
        (:mod:`spotpipe.runtime.worker.phase_fault`), those that have not fired yet.

        Args:
            stage: The role's stage.
            replica: The role's replica.

        Returns:
            ``(step, phase)`` pairs.
        """
        return [(f.step, f.phase) for f in self._phase_faults if f.worker == (stage, replica)
                and (f.step, f.stage, f.replica, f.spec) not in self.fired]

    def phase_fault_fired(self, stage: int, replica: int, step: int, phase: str) -> Fault | None:
        """A victim reported it killed itself in ``phase`` of ``step``: mark the fault fired.

        Args:
            stage: The victim's stage.
            replica: The victim's replica.
            step: The step, 0-based.
            phase: The phase it died in.

        Returns:
            The fault, or None when no planned fault matches.
        """
        for f in self.fixed.faults_at(step):
            if f.phase == phase and f.worker == (stage, replica):
                self.fired.add((f.step, f.stage, f.replica, f.spec))
                return f
        return None

    def poll(self, now: float) -> None:
        """Fire the armed faults that are due.

        Args:
            now: Monotonic seconds.
        """
        keep: list[_Armed] = []
        for a in self.armed:
            if a.due > now:
                keep.append(a)
                continue
            f = a.fault
            key = (f.step, f.stage, f.replica, f.spec)
            if key in self.fired:
                continue
            holder = self.pid_of(f.stage, f.replica)
            if holder is None:  # the role is vacant (a recovery is under way): fire when it is filled
                keep.append(a)
                continue
            self.fired.add(key)
            worker, pid = holder
            try:
                self.deliveries.append(deliver(pid, f))
            except Exception:
                continue
            self.on_fire(f, worker, pid)
        self.armed = keep

    def cancel(self) -> None:
        """Resume any stalled process (the run ends)."""
        for d in self.deliveries:
            d.cancel()
