"""The fault-spec grammar shared by the config (``ft.faults``) and fault injection (pure).

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

This module only reads specs: :func:`parse_fault_spec` gives a :class:`FaultSpec`, and
:class:`spotpipe.ft.faults.FaultPlan` turns specs into the faults of each step. It sits at the
top of the package, beside :mod:`spotpipe.config`, so that the config can check ``ft.faults``
without importing :mod:`spotpipe.ft`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

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
        """Per-step failure probability of one worker for a rate spec.

        Args:
            step_time_s: Seconds per training step; needed for a per-hour rate only.

        Returns:
            A probability in [0, 1]: the rate itself for a per-step rate, else :func:`rate_per_step`.

        Raises:
            FaultSpecError: if the spec has no rate, or a per-hour rate has no positive step time.
        """
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


def rate_per_step(per_hour: float, step_time_s: float) -> float:
    """Per-step probability of a Poisson failure process of ``per_hour`` events per hour.

    ``1 - exp(-rate x t)``: the chance of at least one event in a step of ``t`` hours.

    Args:
        per_hour: Events per hour, >= 0.
        step_time_s: Seconds per step.

    Returns:
        A probability in [0, 1).
    """
    return 1.0 - math.exp(-per_hour * step_time_s / 3600.0)


_TARGET_RE = re.compile(r"^(stage|stages)=([0-9+]+)(?:,replica=(\d+))?$")
_RATE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)%/(h|step)$")
_DUR_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(s|ms)?$")


def _bad(text: str, why: str) -> FaultSpecError:
    return FaultSpecError(f"bad fault spec {text!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def parse_fault_spec(text: str) -> FaultSpec:
    """Parse one spec (see the module docstring); errors name the spec and the accepted forms.

    Args:
        text: One spec, e.g. ``stage=1@step=5``; spaces are ignored.

    Returns:
        The parsed spec.

    Raises:
        FaultSpecError: on anything the grammar does not accept.
    """
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
    """Parse several specs (``ft.faults`` plus command-line ``--fail`` / ``--fail-rate``).

    Args:
        texts: Specs, each as :func:`parse_fault_spec` reads it.

    Returns:
        The parsed specs, in order.

    Raises:
        FaultSpecError: on the first bad spec.
    """
    return tuple(parse_fault_spec(t) for t in texts)
