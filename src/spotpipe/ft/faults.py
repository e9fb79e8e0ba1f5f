"""Fault injection: fault specs, a seeded per-step fault plan, and real signals (no torch).

A fault spec is one string, the same on the command line (``spotpipe train --fail SPEC``) and in
the ``ft.faults`` config list::

    stage=2@step=40             kill stage 2 (replica drawn from the seed) at the start of step 40
    stage=1,replica=0@random    kill stage 1 replica 0 at a random moment of a random step
    stages=1+2@step=30          kill stages 1 and 2 of one replica at once (adjacent loss)
    stage=2@stall=5s            SIGSTOP stage 2 at a random moment for 5 s, then SIGCONT (straggler)
    stage=2@step=40,stall=500ms stall at a given step
    stage=2@step=40,phase=backward  kill stage 2 in the middle of step 40's backward pass; phases:
                                forward, backward, allreduce (while the step's all-reduce runs),
                                optimizer (after its optimizer step, before it reports the step),
                                recovery (while it sends state in a recovery that resumes at step 40)
    10%/h                       every worker fails at 0.10 failures per hour (Poisson), converted
                                to a per-step probability with the (measured or stated) step time
    2%/step                     every worker fails with probability 0.02 in each step
    stage=3@5%/h                a rate for one stage only

Rates are per worker: with ``10%/h`` each worker independently fails at 0.1 per hour, so a
6-stage pipeline sees 0.6 failures per hour. This is how the CheckFree paper states its 5%, 10%
and 16% per-hour stage-failure rates (Blagoev, Ersoy, Chen 2025, section 5). A per-hour rate
``r`` becomes the per-step probability ``1 - exp(-r * step_time_s / 3600)``.

:class:`FaultPlan` decides, per step, which workers fail. Its draws depend only on
``(seed, spec index, step)``, so asking about steps in any order, or twice, gives the same
answer, and a replayed step sees the same faults. :func:`deliver` sends the real signal.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from spotpipe.errors import SpotpipeError

ACCEPTED_FORMS = (
    "stage=I@step=N, stage=I,replica=R@random, stages=I+J@step=N, stage=I@stall=5s, "
    "stage=I@step=N,stall=500ms, stage=I@step=N,phase=forward|backward|allreduce|optimizer|recovery, P%/h, P%/step, stage=I@P%/h"
)
PHASES = ("forward", "backward", "allreduce", "optimizer", "recovery")

KILL = "kill"
STALL = "stall"


class FaultSpecError(SpotpipeError):
    """A fault spec that does not parse or does not fit the job."""


@dataclass(frozen=True)
class FaultSpec:
    """One parsed fault spec.

    Attributes:
        text: The spec as written.
        stages: Stages that fail together; ``None`` = any worker (rates), or one drawn at random.
        replica: Replica of those stages; ``None`` = drawn from the seed.
        step: Fail at the start of this step.
        random_step: Fail at a random moment of a random step.
        rate: Failure rate, per hour (``rate_unit == "h"``) or probability per step (``"step"``).
        rate_unit: ``"h"`` or ``"step"`` when ``rate`` is set.
        stall_s: Stall (SIGSTOP) for this long instead of killing.
        phase: Kill inside this phase of the step (one of ``PHASES``) instead of at a time.
    """

    text: str
    stages: tuple[int, ...] | None = None
    replica: int | None = None
    step: int | None = None
    random_step: bool = False
    rate: float | None = None
    rate_unit: str | None = None
    stall_s: float | None = None
    phase: str | None = None

    @property
    def kind(self) -> str:
        return STALL if self.stall_s is not None else KILL

    def per_step_probability(self, step_time_s: float | None) -> float:
        """Per-step failure probability of one worker for a rate spec."""
        if self.rate is None:
            raise FaultSpecError(f"fault spec {self.text!r} has no rate")
        if self.rate_unit == "step":
            return self.rate
        if step_time_s is None or not step_time_s > 0:
            raise FaultSpecError(
                f"fault spec {self.text!r}: a per-hour rate needs the step time to convert it to a per-step "
                "probability (measure it, or set ft.rate_step_time_s)"
            )
        return rate_per_step(self.rate, step_time_s)


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


def rate_per_step(per_hour: float, step_time_s: float) -> float:
    """Per-step probability of a Poisson failure process of ``per_hour`` events per hour."""
    return 1.0 - math.exp(-per_hour * step_time_s / 3600.0)


_TARGET_RE = re.compile(r"^(stage|stages)=([0-9+]+)(?:,replica=(\d+))?$")
_RATE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)%/(h|step)$")
_DUR_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(s|ms)?$")


def _bad(text: str, why: str) -> FaultSpecError:
    return FaultSpecError(f"bad fault spec {text!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def parse_fault_spec(text: str) -> FaultSpec:
    """Parse one spec (see the module docstring); errors name the spec and the accepted forms."""
    raw = text
    text = "".join(text.split())  # spaces are allowed anywhere
    if not text:
        raise _bad(raw, "empty")
    target_text, at, trigger_text = text.partition("@")
    if not at:
        if _TARGET_RE.match(text):
            raise _bad(raw, "say when after @: step=N, random, a rate, or stall=D")
        target_text, trigger_text = "", text
    stages: tuple[int, ...] | None = None
    replica: int | None = None
    if target_text:
        m = _TARGET_RE.match(target_text)
        if not m:
            raise _bad(raw, f"cannot read the target {target_text!r} (expected stage=I, stage=I,replica=R or stages=I+J)")
        key, numbers, rep = m.groups()
        parts = numbers.split("+")
        if any(not p.isdigit() for p in parts):
            raise _bad(raw, f"stage numbers {numbers!r} must be non-negative integers joined by +")
        stages = tuple(int(p) for p in parts)
        if key == "stage" and len(stages) != 1:
            raise _bad(raw, "use stages=I+J for more than one stage")
        if key == "stages" and len(stages) < 2:
            raise _bad(raw, "stages= needs two or more stages joined by +, e.g. stages=1+2")
        if len(set(stages)) != len(stages):
            raise _bad(raw, "a stage is listed twice")
        replica = None if rep is None else int(rep)
    step: int | None = None
    random_step = False
    rate: float | None = None
    unit: str | None = None
    stall: float | None = None
    phase: str | None = None
    for item in trigger_text.split(","):
        if item.startswith("step="):
            if not item[5:].isdigit():
                raise _bad(raw, f"step must be a non-negative integer, got {item[5:]!r}")
            if step is not None:
                raise _bad(raw, "step= given twice")
            step = int(item[5:])
        elif item.startswith("phase="):
            if item[6:] not in PHASES:
                raise _bad(raw, f"phase must be one of {', '.join(PHASES)}, got {item[6:]!r}")
            phase = item[6:]
        elif item == "random":
            random_step = True
        elif item.startswith("stall="):
            d = _DUR_RE.match(item[6:])
            if not d:
                raise _bad(raw, f"stall duration {item[6:]!r} must look like 5s, 0.5s or 500ms")
            stall = float(d.group(1)) / (1000.0 if d.group(2) == "ms" else 1.0)
            if not stall > 0:
                raise _bad(raw, "stall duration must be > 0")
        elif _RATE_RE.match(item):
            r = _RATE_RE.match(item)
            assert r is not None
            if rate is not None:
                raise _bad(raw, "two rates given")
            rate, unit = float(r.group(1)) / 100.0, r.group(2)
            if not rate > 0:
                raise _bad(raw, "a rate must be > 0")
            if unit == "step" and rate > 1:
                raise _bad(raw, f"a per-step probability must be <= 100%/step, got {r.group(1)}%/step")
        elif not item:
            raise _bad(raw, "empty item (a stray comma or @?)")
        else:
            raise _bad(raw, f"cannot read {item!r}")
    triggers = (step is not None) + random_step + (rate is not None)
    if triggers > 1:
        raise _bad(raw, "give only one of step=N, random, or a rate")
    if triggers == 0:
        if stall is None:
            raise _bad(raw, "say when: step=N, random, a rate, or stall=D")
        random_step = True
    if phase is not None and (stall is not None or rate is not None):
        raise _bad(raw, "phase= goes with a kill at step=N or random, not with a stall or a rate")
    return FaultSpec(raw, stages, replica, step, random_step, rate, unit, stall, phase)


def parse_fault_specs(texts: Iterable[str]) -> tuple[FaultSpec, ...]:
    """Parse several specs (``ft.faults`` plus command-line ``--fail`` / ``--fail-rate``)."""
    return tuple(parse_fault_spec(t) for t in texts)


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
        """Parse ``texts`` and build the plan."""
        return FaultPlan(parse_fault_specs(texts), num_stages, replicas, total_steps, seed, step_time_s)

    def with_step_time(self, step_time_s: float) -> FaultPlan:
        """The same plan with the measured step time (for per-hour rates)."""
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
        most once (a kill wins over a stall)."""
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
        """Every fault over ``steps`` (default ``range(total_steps)``), for logs and tests."""
        return [f for step in (range(self.total_steps) if steps is None else steps) for f in self.faults_at(step)]


@dataclass
class Delivery:
    """A delivered fault; for a stall, :meth:`wait` blocks until SIGCONT has been sent."""

    pid: int
    fault: Fault
    _timer: threading.Timer | None = None

    def wait(self, timeout: float | None = None) -> None:
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
