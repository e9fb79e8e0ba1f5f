"""Memory a schedule needs on each rank, read from the IR alone.

An ``F`` action of stage ``s`` for microbatch ``m`` makes the activations that its backward will
need resident on ``s``'s rank; the matching ``B`` frees them. Walking each rank's action list in
order gives the number of resident activations after every action and its peak. Communication
actions change nothing here (their buffers are transient). Known answers: GPipe keeps all ``M``
microbatches resident (Huang et al. 2019); 1F1B keeps at most ``S - r`` on rank ``r`` when
``M >= S`` (Narayanan et al., ICML 2021), which is what makes it the memory-friendly schedule;
ChronosPipe (Lin et al. 2025) shortens these lifetimes further (:mod:`spotpipe.schedule.chronos`).

Recompute is read from the IR too: where a rank's list holds ``R`` for a stage and microbatch
(:func:`spotpipe.schedule.passes.add_recompute`), the ``F`` keeps only its input, the ``R`` brings
the rest back and the ``B`` frees all of it (Chen et al. 2016).

:func:`memory_profile` is the full model: per rank, bytes of weights, gradients and optimizer
state of the chunks it holds (the optimizer state of offloaded chunks lives in host memory and
comes back one chunk at a time for the optimizer step, as Chronos-Offload and ZeRO-Offload, Ren et
al. 2021, stream it), plus the activations after every action; the peak and the action that hits
it. The bytes per chunk (:class:`ChunkBytes`) come from the model's shapes
(:func:`spotpipe.planner.chunk_bytes`); this module needs only the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError


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

    Args:
        schedule: Compute-only or lowered, possibly with ``R`` actions.

    Returns:
        The :class:`ActivationProfile`: resident microbatch activations per rank after each action.

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
    """Most microbatch activations resident at once on each rank.

    Args:
        schedule: Compute-only or lowered.

    Returns:
        One count per rank (activations, not bytes).

    Raises:
        ScheduleError: as :func:`activation_profile`.
    """
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


def resident_bytes(
    schedule: Schedule,
    activation_bytes: float | Sequence[float],
    input_bytes: float | Sequence[float] = 0.0,
) -> tuple[tuple[float, ...], ...]:
    """Activation bytes resident on each rank after each of its actions.

    Args:
        schedule: compute-only or lowered, possibly with ``R`` actions.
        activation_bytes: bytes one microbatch's activations take, per stage (or one number for
            every stage); they include the stage's input.
        input_bytes: bytes of one microbatch's input, per stage: what a recomputed forward keeps
            (0 for token ids).

    Returns:
        Per rank, the resident activation bytes after each action of its list.

    Raises:
        ScheduleError: an unpaired ``F``/``B``, or per-stage lists of the wrong length.
    """
    act = _per_stage("activation_bytes", activation_bytes, schedule.num_stages)
    kept = _per_stage("input_bytes", input_bytes, schedule.num_stages)
    activation_profile(schedule)  # raises on an unpaired F or B
    rows: list[tuple[float, ...]] = []
    for acts in schedule.ranks:
        again = {(a.stage, a.microbatch) for a in acts if a.op is Op.R}
        total = 0.0
        row: list[float] = []
        for a in acts:
            if a.op is Op.F:
                total += min(kept[a.stage], act[a.stage]) if (a.stage, a.microbatch) in again else act[a.stage]
            elif a.op is Op.R:
                total += act[a.stage] - min(kept[a.stage], act[a.stage])
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

    Returns:
        Peak bytes of each rank, rank order.

    Raises:
        ScheduleError: as :func:`resident_bytes`.
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


@dataclass(frozen=True)
class ChunkBytes:
    """Bytes of one model chunk, the input of :func:`memory_profile`.

    Attributes:
        weights: parameter bytes.
        grads: gradient bytes (resident for the whole step: the workers keep one flat buffer).
        optimizer: optimizer-state bytes (AdamW: two moments, Loshchilov and Hutter 2019).
        activations: bytes one microbatch's forward keeps for its backward, input included.
        input: bytes of one microbatch's input, what a recomputed forward keeps (0 for the first
            chunk, whose input is token ids).
    """

    weights: float
    grads: float
    optimizer: float
    activations: float
    input: float = 0.0


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds over one step.

    Attributes:
        rank: pipeline rank.
        weights: parameter bytes of its chunks.
        grads: gradient bytes of its chunks.
        optimizer: optimizer-state bytes resident on the device (offloaded chunks' are not).
        streamed: optimizer-state bytes fetched back for the optimizer step (the largest
            offloaded chunk of the rank; 0 without offload).
        activations: activation bytes after each action of the rank's list.
        peak: most bytes at once: static bytes plus the peak of activations, or the optimizer
            step with its streamed chunk, whichever is larger.
        peak_index: index of the action in the rank's list right after which the peak is reached;
            ``-1`` when the optimizer step is the peak.
        peak_action: that action, or ``None`` for the optimizer step.
    """

    rank: int
    weights: float
    grads: float
    optimizer: float
    streamed: float
    activations: tuple[float, ...]
    peak: float
    peak_index: int
    peak_action: Action | None

    @property
    def static(self) -> float:
        """Weights, gradients and device-resident optimizer state."""
        return self.weights + self.grads + self.optimizer

    @property
    def peak_activations(self) -> float:
        """Most activation bytes at once."""
        return max(self.activations, default=0.0)


def memory_profile(
    schedule: Schedule,
    chunks: Sequence[ChunkBytes],
    *,
    offload: Iterable[int] = (),
) -> tuple[RankMemory, ...]:
    """Bytes per rank over the step: weights, gradients, optimizer state and activations.

    Recompute is what the schedule says (its ``R`` actions); offload is an input.

    Args:
        schedule: compute-only or lowered (with or without ``R`` actions).
        chunks: one :class:`ChunkBytes` per stage of the schedule.
        offload: stages whose optimizer state lives in host memory; it comes back one chunk at a
            time for the optimizer step (the rank's largest offloaded chunk is then resident).

    Returns:
        One :class:`RankMemory` per rank.

    Raises:
        ScheduleError: ``chunks`` does not match the schedule's stages, negative bytes, an
            offloaded stage that does not exist, or an unpaired ``F``/``B``.
    """
    n = schedule.num_stages
    if len(chunks) != n:
        raise ScheduleError(f"memory: {len(chunks)} chunk sizes for the {n} stages of the {schedule.name} schedule")
    for i, c in enumerate(chunks):
        if min(c.weights, c.grads, c.optimizer, c.activations, c.input) < 0:
            raise ScheduleError(f"memory: chunk {i} has negative bytes: {c}")
    away = set(offload)
    bad = sorted(s for s in away if not 0 <= s < n)
    if bad:
        raise ScheduleError(f"memory: offload of chunk(s) {bad}: the {schedule.name} schedule has chunks 0..{n - 1}")
    acts = resident_bytes(schedule, [c.activations for c in chunks], [c.input for c in chunks])
    out: list[RankMemory] = []
    for r in range(schedule.num_ranks):
        own = schedule.stages_of_rank(r)
        weights = sum(chunks[s].weights for s in own)
        grads = sum(chunks[s].grads for s in own)
        optimizer = sum(chunks[s].optimizer for s in own if s not in away)
        streamed = max((chunks[s].optimizer for s in own if s in away), default=0.0)
        static = weights + grads + optimizer
        row = acts[r]
        top = max(range(len(row)), key=lambda i: (row[i], -i)) if row else -1
        act_peak = row[top] if row else 0.0
        if static + streamed > static + act_peak or top < 0:
            peak, index, action = static + streamed, -1, None
        else:
            peak, index, action = static + act_peak, top, schedule.ranks[r][top]
        out.append(RankMemory(r, weights, grads, optimizer, streamed, row, peak, index, action))
    return tuple(out)
