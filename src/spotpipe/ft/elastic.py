"""Elastic reshape: the next shape of the job when workers are lost for good or join (pure).

A :class:`Shape` is ``S`` pipeline stages x ``R`` data-parallel replicas: the contiguous blocks of
``model.layers`` each stage holds, the worker id at every (replica, stage) position, and the idle
*standby* workers. :func:`next_shape` chooses the shape after workers are lost (with no
replacement) or join, and names the layers that move, from which stage/worker to which, and
their bytes. The runtime and the simulator (:mod:`spotpipe.sim.elastic`) call the same function.

Rules (each cited where it comes from):

* **Lost, a standby is free.** A standby takes the lost position (a hot spare, as Bamboo's
  redundant instances, Thorpe et al. NSDI'23, and HyperPod's checkpointless recovery 2025): the
  state comes from a live replica of the stage, or, with one replica, is rebuilt by the configured
  recovery strategy (``from_worker = None`` in the move).
* **Lost, R > 1, no standby: drop the whole replica group.** The data-parallel dimension absorbs
  the loss, as torchft drops a replica group (Meta, 2024) and HyperPod elastic training (2025)
  scales the data-parallel degree. The other choice, keeping every replica and running the hit
  stage with one worker fewer, is not taken: that stage would process ``R / (R - 1)`` times the
  microbatches of the others, so the step is as slow as with a replica dropped, while its
  neighbours would have to route microbatches across replicas (a heterogeneous pipeline that
  the one schedule builder does not express; Oobleck, SOSP'23, also keeps whole pipelines as its
  unit). Dropping a group moves no state, and the group's other workers become standbys that
  replace the next loss at once. The global batch and the sample order stay those of the
  failure-free run: the ``R0 x M`` microbatches of a step are dealt to the remaining replicas,
  ``ceil(R0 x M / R)`` at most each.
* **Lost, R = 1, no standby: re-partition.** ``model.layers`` is cut into ``S - k`` contiguous
  balanced blocks (:func:`spotpipe.model.partition.partition_layers`, the cut the job would start
  with) over the surviving workers in their pipeline order; every layer whose owner changes is a
  move (Parcae, NSDI'24, migrates layers live the same way; Oobleck re-instantiates a template).
  The lost worker's layers are rebuilt first by the recovery strategy (mirror, CheckFree, ...).
* **Floor and fallbacks.** A shape needs at least ``ft.min_workers`` workers, at most one stage
  per layer, and must fit ``limits.memory_bytes`` per worker (weights, gradients, AdamW state and
  the activations 1F1B keeps in flight). When the preferred shape breaks a rule, the next one in
  order is tried (fewer stages, fewer replicas) and the decision's ``why`` says which rule failed;
  when none is left the decision is ``wait`` (for a replacement). Oobleck stops with an error
  here; spotpipe falls back.
* **Grow.** Free workers (joiners and standbys) go where they shorten the predicted step most:
  another replica (when ``S`` of them are free; the ``torchft`` / HyperPod way back up) or, with
  one replica, a deeper pipeline (up to one stage per block), whichever is faster. A joiner of a
  deeper pipeline is inserted where the fewest bytes move, which is next to the most loaded
  stage: it takes half of that stage's blocks (Parcae's live migration, NSDI'24). A grow that does
  not shorten the step is not made; the workers stand by. ``limits.max_workers`` caps the active
  workers (the job's configured size).

Cost model (:func:`step_seconds`): with ``m = ceil(N / R)`` microbatches per replica (``N`` the
microbatches of the global batch), a 1F1B step takes ``(m + S - 1) x`` the slowest stage's time
per microbatch (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", s. 2.2: bubble ``(S - 1) / m``), i.e. ``max_stage x N / R x (m + S -
1) / m``. A stage's time per microbatch is its blocks x ``layer_s``; embedding and head compute
and the gradient all-reduce are left out. Bytes moved per parameter are the weights plus the
optimizer state (:func:`spotpipe.model.partition.optimizer_bytes_per_param`); gradients are not
moved (each step recomputes them).

Pure Python: imports neither torch nor the runtime or the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from spotpipe.config import JobConfig
from spotpipe.model.partition import (
    DTYPE_BYTES,
    block_activation_elements,
    block_params,
    optimizer_bytes_per_param,
    partition_layers,
)

ReshapeKind = Literal["keep", "replace", "shrink", "grow", "wait"]
"""What a decision does: nothing, fill lost positions from standbys, fewer or more workers, or
wait for a replacement (no shape runs)."""

Span = tuple[int, int]  # [start, end) of model.layers


@dataclass(frozen=True)
class Shape:
    """Stages x replicas, the blocks of each stage, and who holds which position.

    Attributes:
        layers: Per stage, the ``[start, end)`` blocks it holds; contiguous, covering the model.
        workers: ``workers[replica][stage]``: the worker id at each position.
        standby: Idle workers (no position); they take a lost position at once.
    """

    layers: tuple[Span, ...]
    workers: tuple[tuple[int, ...], ...]
    standby: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        start = 0
        for a, b in self.layers:
            if a != start or b <= a:
                raise ValueError(f"shape: stage blocks {self.layers} are not contiguous non-empty ranges from 0")
            start = b
        if not self.workers or any(len(row) != len(self.layers) for row in self.workers):
            raise ValueError(f"shape: every replica needs one worker per stage ({len(self.layers)}), got {self.workers}")
        ids = [w for row in self.workers for w in row] + list(self.standby)
        if len(set(ids)) != len(ids):
            raise ValueError(f"shape: a worker id appears twice in {self.workers} / standby {self.standby}")

    @property
    def stages(self) -> int:
        """Pipeline stages ``S``."""
        return len(self.layers)

    @property
    def replicas(self) -> int:
        """Data-parallel replicas ``R``."""
        return len(self.workers)

    @property
    def num_layers(self) -> int:
        """Blocks of the model (``model.layers``)."""
        return self.layers[-1][1]

    @property
    def active(self) -> tuple[int, ...]:
        """Worker ids holding a position, replica by replica."""
        return tuple(w for row in self.workers for w in row)

    @property
    def label(self) -> str:
        """``"<S>x<R>"``, e.g. ``"3x1"``."""
        return f"{self.stages}x{self.replicas}"

    def position(self, worker: int) -> tuple[int, int] | None:
        """Where a worker sits.

        Args:
            worker: A worker id.

        Returns:
            ``(stage, replica)``, or ``None`` for a standby or unknown worker.
        """
        for r, row in enumerate(self.workers):
            if worker in row:
                return row.index(worker), r
        return None


def initial_shape(num_layers: int, stages: int, replicas: int, spares: int = 0) -> Shape:
    """The job's starting shape: worker ``replica x stages + stage`` (as
    :meth:`spotpipe.schedule.ir.Placement.dense`), balanced contiguous blocks, spares standing by.

    Args:
        num_layers: ``model.layers``.
        stages: ``pipeline.stages`` (1..num_layers).
        replicas: ``pipeline.replicas`` (>= 1).
        spares: Standby workers, ids after the active ones.

    Returns:
        The shape.

    Raises:
        ConfigError: if ``stages`` is not in ``[1, num_layers]``.
    """
    rows = tuple(tuple(r * stages + s for s in range(stages)) for r in range(replicas))
    n = stages * replicas
    return Shape(tuple(partition_layers(num_layers, stages)), rows, tuple(range(n, n + spares)))


@dataclass(frozen=True)
class ElasticCost:
    """What the policy prices a shape with (see the module docstring for the formula).

    Attributes:
        layer_s: Forward plus backward seconds of one block for one microbatch.
        microbatches: Microbatches of the global batch, all replicas (``pipeline.replicas x
            pipeline.microbatches`` of the failure-free job); fixed across shapes.
        layer_params: Parameters of one block.
        embedding_params: Parameters that travel with block 0 (the token embedding).
        head_params: Parameters that travel with the last block (final norm, LM head).
        move_bytes_per_param: Bytes moved per parameter (weights + optimizer state).
        memory_bytes_per_param: Bytes resident per parameter (weights, gradients, optimizer state).
        layer_activation_bytes: Bytes one block keeps for backward per microbatch.
    """

    layer_s: float
    microbatches: int
    layer_params: int
    embedding_params: int = 0
    head_params: int = 0
    move_bytes_per_param: int = 0
    memory_bytes_per_param: int = 0
    layer_activation_bytes: int = 0

    def span_bytes(self, span: Span, num_layers: int) -> int:
        """Bytes that move with the blocks ``span`` (the embedding with block 0, the head with the last).

        Args:
            span: ``[start, end)`` blocks.
            num_layers: Blocks of the model.

        Returns:
            Parameters x :attr:`move_bytes_per_param`.
        """
        a, b = span
        params = (b - a) * self.layer_params
        params += self.embedding_params if a == 0 < b else 0
        params += self.head_params if b == num_layers > a else 0
        return params * self.move_bytes_per_param


@dataclass(frozen=True)
class ShapeLimits:
    """Rules a shape must keep.

    Attributes:
        min_workers: ``ft.min_workers``: the fewest active workers.
        max_workers: Most active workers (the job's configured size); 0: no cap.
        memory_bytes: Device memory per worker (``pipeline.memory_budget_gb``); 0: no limit.
    """

    min_workers: int = 1
    max_workers: int = 0
    memory_bytes: float = 0.0


def elastic_cost(cfg: JobConfig) -> ElasticCost:
    """The policy's cost model of a job, from the model shapes of :mod:`spotpipe.model.partition`.

    ``layer_s`` is ``sim.layer_forward_s`` x sequences per microbatch when set, else the block's
    forward FLOPs (PaLM accounting, Chowdhery et al. 2022, app. B) over ``sim.device_tflops``;
    times ``1 + sim.backward_ratio`` for the backward.

    Args:
        cfg: The job (``model``, ``pipeline``, ``train.batch_size``, ``sim``).

    Returns:
        The cost model.
    """
    m, p, s = cfg.model, cfg.pipeline, cfg.sim
    seqs = max(1, cfg.train.batch_size // (p.replicas * p.microbatches))
    params = block_params(m)
    if s.layer_forward_s > 0:
        forward = s.layer_forward_s * seqs
    else:
        flops_per_token = 2 * (params - 2 * m.d_model) + 4 * m.d_model * m.context
        forward = flops_per_token * seqs * m.context / (s.device_tflops * 1e12)
    dtype = DTYPE_BYTES.get(m.dtype, 4)
    optimizer = optimizer_bytes_per_param(dtype)
    head = m.d_model + (0 if m.tie_embeddings else m.vocab_size * m.d_model)
    return ElasticCost(
        layer_s=forward * (1 + s.backward_ratio),
        microbatches=p.replicas * p.microbatches,
        layer_params=params,
        embedding_params=m.vocab_size * m.d_model,
        head_params=head,
        move_bytes_per_param=dtype + optimizer,
        memory_bytes_per_param=2 * dtype + optimizer,
        layer_activation_bytes=block_activation_elements(m, m.context) * dtype * seqs,
    )


def limits_from(cfg: JobConfig) -> ShapeLimits:
    """The limits of a job: ``ft.min_workers``, its configured size, ``pipeline.memory_budget_gb``.

    Args:
        cfg: The job.

    Returns:
        The limits.
    """
    p = cfg.pipeline
    return ShapeLimits(cfg.ft.min_workers, p.stages * p.replicas, p.memory_budget_gb * 1e9)


def step_seconds(shape: Shape, cost: ElasticCost) -> float:
    """Predicted seconds of one step of the global batch on ``shape`` (1F1B; module docstring).

    Args:
        shape: The shape.
        cost: The cost model.

    Returns:
        ``(ceil(N / R) + S - 1) x max blocks per stage x layer_s``.
    """
    per_replica = math.ceil(cost.microbatches / shape.replicas)
    slowest = max(b - a for a, b in shape.layers)
    return (per_replica + shape.stages - 1) * slowest * cost.layer_s


def peak_memory(shape: Shape, cost: ElasticCost) -> tuple[float, int]:
    """The most memory one worker of ``shape`` needs, and its stage.

    Stage ``s`` of 1F1B keeps at most ``min(S - s, m)`` microbatches' activations (Narayanan et
    al. 2021, s. 2.2, PipeDream-Flush); weights, gradients and optimizer state are resident.

    Args:
        shape: The shape.
        cost: The cost model.

    Returns:
        ``(bytes, stage)`` of the fullest stage.
    """
    per_replica = math.ceil(cost.microbatches / shape.replicas)
    best = (-1.0, 0)
    for s, (a, b) in enumerate(shape.layers):
        params = (b - a) * cost.layer_params
        params += cost.embedding_params if a == 0 else 0
        params += cost.head_params if b == shape.num_layers else 0
        in_flight = min(shape.stages - s, per_replica)
        need = float(params * cost.memory_bytes_per_param + (b - a) * cost.layer_activation_bytes * in_flight)
        best = max(best, (need, s), key=lambda x: x[0])
    return best


def deal_microbatches(total: int, replicas: int) -> tuple[tuple[int, ...], ...]:
    """Which microbatches of the global batch each replica runs, so that any replica count keeps
    the failure-free run's batch and sample order: microbatch ``i`` is always the same samples,
    replicas take contiguous runs of them, the first ``total mod replicas`` one more.

    Args:
        total: Microbatches of the global batch (``pipeline.replicas x pipeline.microbatches``).
        replicas: Replicas of the shape, 1..total.

    Returns:
        Per replica, its microbatch indices in order; together ``0 .. total - 1`` once each.

    Raises:
        ValueError: if ``replicas`` is not in ``[1, total]``.
    """
    if not 1 <= replicas <= total:
        raise ValueError(f"deal_microbatches: replicas must be in [1, {total}], got {replicas}")
    return tuple(tuple(range(a, b)) for a, b in partition_layers(total, replicas))


@dataclass(frozen=True)
class Move:
    """Blocks that change owner in a reshape.

    Attributes:
        layers: ``[start, end)`` blocks.
        from_stage: Stage that held them in the old shape.
        from_worker: Worker that sends them; ``None``: its holder was lost, the recovery strategy
            rebuilds them first.
        to_stage: Stage that holds them in the new shape.
        to_worker: Worker that receives them.
        bytes: Weights and optimizer state moved (:meth:`ElasticCost.span_bytes`).
    """

    layers: Span
    from_stage: int
    from_worker: int | None
    to_stage: int
    to_worker: int
    bytes: int


@dataclass(frozen=True)
class ShapeDecision:
    """The next shape and how to get there.

    Attributes:
        kind: What it does (:data:`ReshapeKind`).
        from_shape: The shape before (lost workers still in their positions).
        to_shape: The shape after; for ``wait``: the old one, standbys updated.
        why: One line.
        moves: The blocks that change owner.
        before_s: Predicted step seconds of ``from_shape`` (healthy).
        after_s: Predicted step seconds of ``to_shape``; ``inf`` for ``wait``.
    """

    kind: ReshapeKind
    from_shape: Shape
    to_shape: Shape
    why: str
    moves: tuple[Move, ...] = ()
    before_s: float = 0.0
    after_s: float = 0.0

    @property
    def bytes(self) -> int:
        """Bytes moved in all."""
        return sum(m.bytes for m in self.moves)


def overlap(a: Span, b: Span) -> Span | None:
    """The blocks two spans share.

    Args:
        a: ``[start, end)``.
        b: ``[start, end)``.

    Returns:
        Their common ``[start, end)``, or None.
    """
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def moves_between(old: Shape, new: Shape, alive: set[int], cost: ElasticCost) -> tuple[Move, ...]:
    """Every block a worker of ``new`` needs and did not hold in ``old``, with its source.

    A worker of ``new`` held its ``old`` stage's blocks (none for a standby or joiner). The
    source of a block is the first live worker that held its old stage, else ``None`` (rebuilt).

    Args:
        old: The shape before.
        new: The shape after (same ``model.layers``).
        alive: Workers that are up.
        cost: For the bytes.

    Returns:
        The moves, by new replica, new stage and old stage.
    """
    moves: list[Move] = []
    for row in new.workers:
        for s, worker in enumerate(row):
            pos = old.position(worker)
            for k, span in enumerate(old.layers):
                part = overlap(new.layers[s], span)
                if part is None or (pos is not None and k == pos[0]):
                    continue
                source = next((r[k] for r in old.workers if r[k] in alive), None)
                moves.append(Move(part, k, source, s, worker, cost.span_bytes(part, new.num_layers)))
    return tuple(moves)


def _one_pipeline(old: Shape, alive: set[int], pool: list[int], stages: int, cost: ElasticCost) -> Shape:
    """A single pipeline of ``stages`` over the live workers of ``old``'s fullest replica, its holes
    filled from ``pool`` (workers holding the hole's stage first), more workers from ``pool``
    inserted where the fewest bytes move; the rest of ``pool`` stands by."""
    base = max(range(old.replicas), key=lambda r: (sum(w in alive for w in old.workers[r]), -r))
    order: list[int | None] = [w if w in alive else None for w in old.workers[base]]
    free = list(pool) + [w for r, row in enumerate(old.workers) if r != base for w in row if w in alive]
    for s, w in enumerate(order):
        if w is None and sum(x is not None for x in order) < stages and free:
            same = [x for x in free if (p := old.position(x)) is not None and p[0] == s]
            pick = (same or free)[0]
            order[s] = pick
            free.remove(pick)
    chain = [w for w in order if w is not None][:stages]
    free += [w for w in order if w is not None][stages:]
    spans = tuple(partition_layers(old.num_layers, stages))
    while len(chain) < stages:
        worker = free.pop(0)
        options = []
        for i in range(len(chain) + 1):
            trial = chain[:i] + [worker] + chain[i:]
            spans_i = tuple(partition_layers(old.num_layers, len(trial)))
            moved = sum(m.bytes for m in moves_between(old, Shape(spans_i, (tuple(trial),)), alive, cost))
            options.append((moved, i))
        chain.insert(min(options)[1], worker)
    return Shape(spans, (tuple(chain),), tuple(sorted(free)))


def _replicated(old: Shape, alive: set[int], pool: list[int], replicas: int) -> Shape:
    """``old``'s stages with ``replicas`` replicas: the fullest replicas kept, holes filled from
    ``pool`` (a worker already holding the stage first), new replicas from ``pool``."""
    ranked = sorted(range(old.replicas), key=lambda r: (-sum(w in alive for w in old.workers[r]), r))
    keep = sorted(ranked[:replicas])
    free = list(pool) + [w for r in ranked[replicas:] for w in old.workers[r] if w in alive]
    rows: list[tuple[int, ...]] = []
    for r in keep + [-1] * max(0, replicas - len(keep)):
        row: list[int] = []
        for s in range(old.stages):
            w = old.workers[r][s] if r >= 0 else -1
            if w not in alive:
                same = [x for x in free if (p := old.position(x)) is not None and p[0] == s]
                w = (same or free)[0]
                free.remove(w)
            row.append(w)
        rows.append(tuple(row))
    return Shape(old.layers, tuple(rows), tuple(sorted(free)))


def _refusal(shape: Shape, cost: ElasticCost, limits: ShapeLimits) -> str | None:
    """Why ``shape`` cannot run (one clause), or ``None``."""
    n = len(shape.active)
    if n < limits.min_workers:
        return f"{shape.label} has {n} workers, below ft.min_workers = {limits.min_workers}"
    if limits.memory_bytes > 0:
        need, stage = peak_memory(shape, cost)
        if need > limits.memory_bytes:
            return (f"{shape.label} needs {need / 1e9:.3g} GB on stage {stage}, over the "
                    f"{limits.memory_bytes / 1e9:.3g} GB per worker")
    return None


def _candidates(old: Shape, alive: set[int], pool: list[int], lost_active: bool, limits: ShapeLimits,
                cost: ElasticCost, refused: list[str]) -> list[tuple[Shape, str]]:
    """Shapes to try, most preferred first, each with a short name of its rule; shapes the layer
    count rules out are named in ``refused`` instead."""
    survivors = [w for w in old.active if w in alive]
    n = len(survivors) + len(pool)
    if limits.max_workers > 0:
        n = min(n, limits.max_workers)
    S, R, L = old.stages, old.replicas, old.num_layers
    out: list[tuple[Shape, str]] = []
    if lost_active and n >= S * R:
        return [(_replicated(old, alive, pool, R), "standbys take the lost positions")]
    if lost_active:
        for r in range(min(R - 1, n // S), 0, -1):
            out.append((_replicated(old, alive, pool, r), f"drop to {r} replica(s) of {S} stages"))
        for s in range(min(n, S - 1), 0, -1):
            out.append((_one_pipeline(old, alive, pool, s, cost), f"re-partition model.layers into {s} stage(s)"))
        return out
    grows: list[tuple[Shape, str]] = []
    if n // S > R:
        grows.append((_replicated(old, alive, pool, n // S), f"add replicas: {n // S} of {S} stages"))
    if R == 1 and n > S:
        if n > L:
            refused.append(f"{n} stages need more blocks than model.layers = {L}")
        for s in range(S + 1, min(n, L) + 1):
            grows.append((_one_pipeline(old, alive, pool, s, cost), f"split the pipeline into {s} stages"))
    grows.sort(key=lambda c: (step_seconds(c[0], cost), len(c[0].active)))
    return grows


def _kind(old: Shape, new: Shape) -> ReshapeKind:
    a, b = len(old.active), len(new.active)
    if a == b:
        return "keep" if (old.layers, old.workers) == (new.layers, new.workers) else "replace"
    return "shrink" if b < a else "grow"


def next_shape(current: Shape, lost: Sequence[int], joined: Sequence[int], cost: ElasticCost,
               limits: ShapeLimits = ShapeLimits()) -> ShapeDecision:
    """The shape after ``lost`` workers are gone for good and ``joined`` workers arrived.

    The rules, their order and their sources are in the module docstring: standbys first, then
    (R > 1) drop replica groups, then (one replica) re-partition; a grow only when it shortens the
    predicted step; a shape below ``ft.min_workers``, with more stages than blocks, or over the
    memory limit is skipped for the next one, and ``why`` says why.

    Args:
        current: The shape now (``lost`` workers still in their positions).
        lost: Workers gone (active or standby); unknown ids are ignored.
        joined: New workers (ids not in ``current``).
        cost: The cost model (:func:`elastic_cost`).
        limits: ``ft.min_workers``, the most workers, memory per worker.

    Returns:
        The decision; ``kind = "wait"`` when no shape can run without a replacement.

    Raises:
        ValueError: if a joined id is already in ``current``.
    """
    known = set(current.active) | set(current.standby)
    if any(w in known for w in joined):
        raise ValueError(f"next_shape: joined workers {sorted(set(joined) & known)} are already in the shape")
    gone = set(lost) & known
    alive = (known - gone) | set(joined)
    pool = [w for w in current.standby if w in alive] + [w for w in joined if w not in current.standby]
    lost_active = [w for w in current.active if w in gone]
    before = step_seconds(current, cost)
    what = _what(current, lost_active, joined)
    refused: list[str] = []
    for shape, rule in _candidates(current, alive, pool, bool(lost_active), limits, cost, refused):
        reason = _refusal(shape, cost, limits)
        if reason is not None:
            refused.append(reason)
            continue
        after = step_seconds(shape, cost)
        if not lost_active and after >= before:
            refused.append(f"{rule} would not shorten the step ({before:.3g} s -> {after:.3g} s)")
            break  # grows come fastest first: none after this one is shorter
        why = f"{what}: {rule}, {current.label} -> {shape.label}, step {before:.3g} s -> {after:.3g} s"
        why += _because(refused)
        moves = moves_between(current, shape, alive, cost)
        return ShapeDecision(_kind(current, shape), current, shape, why, moves, before, after)
    standby = tuple(sorted(pool))
    if lost_active:
        why = f"{what}: no shape runs without a replacement{_because(refused)}: wait"
        return ShapeDecision("wait", current, replace(current, standby=standby), why, (), before, math.inf)
    why = f"{what}: keep {current.label}{_because(refused)}"
    return ShapeDecision("keep", current, replace(current, standby=standby), why, (), before, before)


def _because(refused: Sequence[str]) -> str:
    """`` (first refusal; second refusal; N more)``, or nothing."""
    if not refused:
        return ""
    more = f"; {len(refused) - 2} more" if len(refused) > 2 else ""
    return " (" + "; ".join(refused[:2]) + more + ")"


def _what(shape: Shape, lost_active: Sequence[int], joined: Sequence[int]) -> str:
    """``lost worker 2 (stage 2, replica 0), 1 joined`` and the like."""
    parts = []
    for w in lost_active:
        pos = shape.position(w)
        assert pos is not None
        parts.append(f"lost worker {w} (stage {pos[0]}, replica {pos[1]})")
    if joined:
        parts.append(f"worker{'s' if len(joined) > 1 else ''} {', '.join(map(str, joined))} joined")
    return ", ".join(parts) or "standby change"
