"""Fault injection: a seeded per-step fault plan, and real signals to real processes (no torch).

The faults come from fault specs (``stage=2@step=40``, ``10%/h``, ...), whose grammar lives in
:mod:`spotpipe.faultspec` and is shared with the config's ``ft.faults`` check.

:class:`FaultPlan` decides, per step, which workers fail. Its draws depend only on
``(seed, spec index, step)``, so asking about steps in any order, or twice, gives the same
answer, and a replayed step sees the same faults. :func:`deliver` sends the real signal.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from spotpipe.faultspec import KILL, STALL, FaultSpec, FaultSpecError, parse_fault_specs


@dataclass(frozen=True)
class Fault:
    """One fault to deliver.

    Attributes:
        step: Training step during which it happens.
        stage: Pipeline stage of the victim.
        replica: Replica of the victim.
        kind: ``"kill"`` (SIGKILL) or ``"stall"`` (SIGSTOP, then SIGCONT after ``stall_s``).
        at_fraction: When within the step, as a fraction of the step time (0 = at its start).
        stall_s: Stall duration for ``"stall"``.
        spec: Text of the spec that produced it.
        phase: Phase of the step the victim kills itself in (``""``: timed by ``at_fraction``).
    """

    step: int
    stage: int
    replica: int
    kind: str = KILL
    at_fraction: float = 0.0
    stall_s: float = 0.0
    spec: str = ""
    phase: str = ""

    @property
    def worker(self) -> tuple[int, int]:
        return (self.stage, self.replica)


@dataclass(frozen=True)
class FaultPlan:
    """Which workers fail in which step, deterministic from ``seed``.

    Attributes:
        specs: Parsed specs.
        num_stages: Pipeline stages of the job.
        replicas: Replicas per stage.
        total_steps: Steps of the run (``random`` picks a step in ``[1, total_steps)``).
        seed: Seed of every draw.
        step_time_s: Step time that converts per-hour rates; ``None`` until measured.
    """

    specs: tuple[FaultSpec, ...]
    num_stages: int
    replicas: int = 1
    total_steps: int = 1
    seed: int = 0
    step_time_s: float | None = None

    def __post_init__(self) -> None:
        for spec in self.specs:
            for s in spec.stages or ():
                if s >= self.num_stages:
                    raise FaultSpecError(f"fault spec {spec.text!r}: stage {s} does not exist (stages 0..{self.num_stages - 1})")
            if spec.replica is not None and spec.replica >= self.replicas:
                raise FaultSpecError(f"fault spec {spec.text!r}: replica {spec.replica} does not exist (replicas 0..{self.replicas - 1})")

    @staticmethod
    def from_texts(
        texts: Sequence[str], num_stages: int, replicas: int = 1, total_steps: int = 1,
        seed: int = 0, step_time_s: float | None = None,
    ) -> FaultPlan:
        """Parse ``texts`` and build the plan.

        Args:
            texts: Fault specs in the :mod:`spotpipe.faultspec` grammar (``stage=2@step=40``, ``10%/h``).
            num_stages: Pipeline stages of the job.
            replicas: Replicas per stage.
            total_steps: Steps of the run.
            seed: Seed of every draw.
            step_time_s: Step time in seconds that converts per-hour rates; ``None`` until measured.

        Returns:
            The plan.

        Raises:
            FaultSpecError: for a text that does not parse, or a stage or replica the job does not have.
        """
        return FaultPlan(parse_fault_specs(texts), num_stages, replicas, total_steps, seed, step_time_s)

    def with_step_time(self, step_time_s: float) -> FaultPlan:
        """The same plan with the measured step time (for per-hour rates).

        Args:
            step_time_s: Measured seconds per training step.

        Returns:
            A copy of this plan with ``step_time_s`` set.
        """
        return replace(self, step_time_s=step_time_s)

    @property
    def needs_step_time(self) -> bool:
        return any(s.rate is not None and s.rate_unit == "h" for s in self.specs)

    def _rng(self, index: int, what: object) -> random.Random:
        return random.Random(f"spotpipe-faults:{self.seed}:{index}:{what}")

    def _victims(self, spec: FaultSpec, rng: random.Random) -> list[tuple[int, int]]:
        stages = spec.stages if spec.stages is not None else (rng.randrange(self.num_stages),)
        replica = spec.replica if spec.replica is not None else rng.randrange(self.replicas)
        return [(s, replica) for s in stages]

    def faults_at(self, step: int) -> tuple[Fault, ...]:
        """Faults that happen during ``step``, ordered by moment then worker; a worker appears at
        most once (a kill wins over a stall).

        Args:
            step: Training step, ``0 <= step < total_steps`` for the plan to mean anything.

        Returns:
            The faults of ``step``, sorted by ``at_fraction`` (fraction of the step, in [0, 1)), stage, replica.

        Raises:
            FaultSpecError: for a per-hour rate while ``step_time_s`` is still ``None``.
        """
        found: dict[tuple[int, int], Fault] = {}

        def add(f: Fault) -> None:
            old = found.get(f.worker)
            if old is None or (old.kind == STALL and f.kind == KILL) or (old.kind == f.kind and f.at_fraction < old.at_fraction):
                found[f.worker] = f

        for index, spec in enumerate(self.specs):
            stall = spec.stall_s or 0.0
            if spec.step is not None or spec.random_step:
                rng = self._rng(index, "once")
                when = spec.step
                frac = 0.0
                if spec.random_step:
                    when = rng.randrange(1, self.total_steps) if self.total_steps > 1 else 0
                    frac = rng.random()
                if when != step:
                    continue
                for s, r in self._victims(spec, rng):
                    add(Fault(step, s, r, spec.kind, frac, stall, spec.text, spec.phase or ""))
                continue
            p = spec.per_step_probability(self.step_time_s)
            rng = self._rng(index, step)
            if spec.stages is not None:  # a targeted rate: the listed stages fail together
                if rng.random() < p:
                    frac = rng.random()
                    for s, r in self._victims(spec, rng):
                        add(Fault(step, s, r, spec.kind, frac, stall, spec.text))
                continue
            for s in range(self.num_stages):  # every worker independently
                for r in range(self.replicas):
                    if spec.replica is not None and r != spec.replica:
                        continue
                    if rng.random() < p:
                        add(Fault(step, s, r, spec.kind, rng.random(), stall, spec.text))
        return tuple(sorted(found.values(), key=lambda f: (f.at_fraction, f.stage, f.replica)))

    def phase_faults(self) -> list[Fault]:
        """The faults aimed at a phase (``phase=``), found from their specs' steps alone (a plan
        over a million steps is not walked)."""
        steps: set[int] = set()
        for index, spec in enumerate(self.specs):
            if spec.phase and spec.step is not None:
                steps.add(spec.step)
            elif spec.phase and spec.random_step:
                steps.add(self._rng(index, "once").randrange(1, self.total_steps) if self.total_steps > 1 else 0)
        return [f for step in sorted(steps) for f in self.faults_at(step) if f.phase]

    def all_faults(self, steps: Iterable[int] | None = None) -> list[Fault]:
        """Every fault over ``steps`` (default ``range(total_steps)``), for logs and tests.

        Args:
            steps: Steps to ask about; ``None``: every step of the run.

        Returns:
            The faults of every step in ``steps``, step by step.
        """
        return [f for step in (range(self.total_steps) if steps is None else steps) for f in self.faults_at(step)]


@dataclass
class Delivery:
    """A delivered fault; for a stall, :meth:`wait` blocks until SIGCONT has been sent."""

    pid: int
    fault: Fault
    _timer: threading.Timer | None = None

    def wait(self, timeout: float | None = None) -> None:
        """Block until a stall's SIGCONT has been sent (at once for a kill).

        Args:
            timeout: Longest wait in seconds; ``None``: no limit.
        """
        if self._timer is not None:
            self._timer.join(timeout)

    def cancel(self) -> None:
        """Resume a stalled process now (SIGCONT), e.g. when the run ends first."""
        if self._timer is not None:
            self._timer.cancel()
            _signal(self.pid, signal.SIGCONT, missing_ok=True)


def _signal(pid: int, sig: int, missing_ok: bool = False) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        if not missing_ok:
            raise FaultSpecError(f"cannot send {signal.Signals(sig).name} to pid {pid}: no such process") from None


def deliver(pid: int, fault: Fault, *, wait: bool = False) -> Delivery:
    """Send ``fault`` to process ``pid`` as a real signal.

    A kill is SIGKILL (the process cannot catch it, as when a spot instance disappears). A stall
    is SIGSTOP, then SIGCONT ``fault.stall_s`` seconds later from a timer thread (or inline when
    ``wait``); a process that died meanwhile is ignored.

    Args:
        pid: Target process id (> 0).
        fault: What to send: a kill, or a stall of ``fault.stall_s`` seconds.
        wait: Block until a stall ends (SIGCONT sent inline) instead of returning at once.

    Returns:
        The :class:`Delivery`, whose :meth:`Delivery.wait` or :meth:`Delivery.cancel` ends a stall.

    Raises:
        FaultSpecError: if ``pid`` does not exist, or the fault kind is unknown.
    """
    if pid <= 0:
        raise FaultSpecError(f"refusing to signal pid {pid} (only a single positive process id is allowed)")
    if fault.kind == KILL:
        _signal(pid, signal.SIGKILL)
        return Delivery(pid, fault)
    if fault.kind != STALL:
        raise FaultSpecError(f"unknown fault kind {fault.kind!r} (kill or stall)")
    _signal(pid, signal.SIGSTOP)
    timer = threading.Timer(fault.stall_s, _signal, args=(pid, signal.SIGCONT), kwargs={"missing_ok": True})
    timer.daemon = True
    timer.start()
    delivery = Delivery(pid, fault, timer)
    if wait:
        delivery.wait()
    return delivery
