"""Memory a schedule needs on each rank, read from the IR alone.

An ``F`` action of stage ``s`` for microbatch ``m`` makes the activations that its backward will
need resident on ``s``'s rank; the matching ``B`` frees them. Walking each rank's action list in
order gives the number of resident activations after every action and its peak. Communication
actions change nothing here (their buffers are transient). Known answers: GPipe keeps all ``M``
microbatches resident (Huang et al. 2019); 1F1B keeps at most ``S - r`` on rank ``r`` when
``M >= S`` (Narayanan et al., ICML 2021), which is what makes it the memory-friendly schedule;
ChronosPipe (Lin et al. 2025) shortens these lifetimes further.

:func:`peak_memory_bytes` turns counts into bytes: weights and optimizer state of every stage a
rank holds are resident throughout, activations come and go with their stage's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spotpipe.schedule.ir import Op, Schedule, ScheduleError


@dataclass(frozen=True)
class ActivationProfile:
    """Resident activations per rank after each action of that rank's list.

    Attributes:
        counts: ``counts[r][i]`` = activations resident on rank ``r`` after its ``i``-th action.
    """

    counts: tuple[tuple[int, ...], ...]

    @property
    def peaks(self) -> tuple[int, ...]:
        """Most activations resident at once, per rank."""
        return tuple(max(row, default=0) for row in self.counts)


def activation_profile(schedule: Schedule) -> ActivationProfile:
    """Count resident activations over each rank's action sequence (lowered or not).

    Raises:
        ScheduleError: for a ``B`` whose forward has not run yet on that rank, or an ``F`` that
            runs twice while its activation is still resident.
    """
    rows: list[tuple[int, ...]] = []
    for r, acts in enumerate(schedule.ranks):
        live: set[tuple[int, int]] = set()
        row: list[int] = []
        for i, a in enumerate(acts):
            key = (a.stage, a.microbatch)
            if a.op is Op.F:
                if key in live:
                    raise ScheduleError(f"memory: rank {r} step {i}: {a} runs again while its activation is resident")
                live.add(key)
            elif a.op is Op.B:
                if key not in live:
                    raise ScheduleError(f"memory: rank {r} step {i}: {a} frees an activation its forward never made")
                live.remove(key)
            row.append(len(live))
        rows.append(tuple(row))
    return ActivationProfile(tuple(rows))


def peak_activations(schedule: Schedule) -> list[int]:
    """Most microbatch activations resident at once on each rank."""
    return list(activation_profile(schedule).peaks)


def _per_stage(name: str, value: float | Sequence[float], stages: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * stages
    values = [float(v) for v in value]
    if len(values) != stages:
        raise ScheduleError(f"memory: {name} has {len(values)} entries, the schedule has {stages} stages")
    if any(v < 0 for v in values):
        raise ScheduleError(f"memory: {name} must be >= 0, got {values}")
    return values


def resident_bytes(schedule: Schedule, activation_bytes: float | Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """Activation bytes resident on each rank after each of its actions.

    Args:
        schedule: compute-only or lowered.
        activation_bytes: bytes one microbatch's activations take, per stage (or one number for
            every stage).
    """
    act = _per_stage("activation_bytes", activation_bytes, schedule.num_stages)
    activation_profile(schedule)  # raises on an unpaired F or B
    rows: list[tuple[float, ...]] = []
    for acts in schedule.ranks:
        total = 0.0
        row: list[float] = []
        for a in acts:
            if a.op is Op.F:
                total += act[a.stage]
            elif a.op is Op.B:
                total -= act[a.stage]
            row.append(total)
        rows.append(tuple(row))
    return tuple(rows)


def peak_memory_bytes(
    schedule: Schedule,
    activation_bytes: float | Sequence[float],
    weight_bytes: float | Sequence[float],
    optimizer_bytes: float | Sequence[float],
) -> list[float]:
    """Peak bytes per rank: weights + optimizer state of its stages + peak resident activations.

    Args:
        schedule: compute-only or lowered.
        activation_bytes: per stage, bytes of one microbatch's saved activations.
        weight_bytes: per stage, parameter bytes (gradients included if the caller counts them).
        optimizer_bytes: per stage, optimizer-state bytes (AdamW: two moments).
        Each may be one number meaning the same for every stage.
    """
    n = schedule.num_stages
    weights = _per_stage("weight_bytes", weight_bytes, n)
    optim = _per_stage("optimizer_bytes", optimizer_bytes, n)
    acts = resident_bytes(schedule, activation_bytes)
    peaks: list[float] = []
    for r in range(schedule.num_ranks):
        static = sum(weights[s] + optim[s] for s in schedule.stages_of_rank(r))
        peaks.append(static + max(acts[r], default=0.0))
    return peaks
