"""Worker side of an elastic reshape: take a new place in a new shape and move blocks peer to peer.

With ``ft.elastic`` the controller may answer a lost worker with no replacement by a smaller
shape, or a joined worker by a bigger one (:func:`spotpipe.ft.elastic.next_shape`;
:mod:`spotpipe.runtime.control.reshape`). It publishes the new shape in the generation's recovery
record (``outcome = "reshape"``): the blocks of every stage, the workers at every position, the
microbatches each replica runs, and the *moves*: ``[start, end)`` blocks (the embedding travels
with block 0, the final norm and LM head with the last block) from the worker that holds them,
or, for a lost worker's blocks, from the worker that holds its mirror, to their new owner.

:func:`apply_reshape` is each worker's part, run when it enters the generation (before the
executor is built for the new schedule): it builds its new stage (the cut of
:func:`spotpipe.model.partition.partition_layers`, as a job configured with that many stages
would start), copies the blocks it keeps from its old state, sends and receives the moved blocks
(weights, AdamW moments and step counts, in the one flat form of
:class:`~spotpipe.runtime.state.stage_state.StageState`, a span at a time: :func:`span_state`),
and hands the new state to its worker. Nothing is rounded or re-initialised, so the next step
computes what the failure-free run computes (Parcae, NSDI'24, migrates layers live the same way).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from spotpipe.config import JobConfig
from spotpipe.ft.elastic import Span, overlap
from spotpipe.runtime.comm.transfer import TAG_BASE, p2p
from spotpipe.runtime.state.stage_state import StageState


class Parked(Exception):
    """This worker has no place in the new shape: it leaves the job's generations and waits as a
    standby (a spare) until a grow takes it back."""


@dataclass(frozen=True)
class ReshapeRecord:
    """The part of a generation's recovery record that describes a reshape.

    Attributes:
        layers: Per stage of the new shape, its ``[start, end)`` blocks.
        deal: Per replica of the new shape, the microbatches of the global batch it runs.
        old_layers: Per worker that held a stage before, that stage's blocks.
        moves: ``(span, from worker, from its mirror, to worker)`` for every block span that changes owner.
        parked: Workers that leave the generations and stand by.
    """

    layers: tuple[Span, ...]
    deal: tuple[tuple[int, ...], ...]
    old_layers: dict[int, Span]
    moves: tuple[tuple[Span, int, bool, int], ...]
    parked: tuple[int, ...]

    @staticmethod
    def from_record(record: dict[str, Any]) -> ReshapeRecord:
        """Read the ``shape`` entry of a recovery record (:func:`spotpipe.runtime.control.reshape.reshape_record`).

        Args:
            record: The decoded ``gen/<g>/recovery`` value, ``outcome = "reshape"``.

        Returns:
            The reshape.
        """
        s = record["shape"]
        return ReshapeRecord(
            tuple((int(a), int(b)) for a, b in s["layers"]),
            tuple(tuple(int(m) for m in row) for row in s["deal"]),
            {int(w): (int(a), int(b)) for w, (a, b) in s["old_layers"].items()},
            tuple(((int(m["layers"][0]), int(m["layers"][1])), int(m["from"]), bool(m["mirror"]), int(m["to"]))
                  for m in s["moves"]),
            tuple(int(w) for w in s["parked"]),
        )


def span_state(state: StageState, span: Span, num_layers: int) -> StageState:
    """The state of blocks ``span`` of a one-chunk stage: a view over those blocks (with the token
    embedding when the span starts at block 0, the final norm and LM head when it ends at the last
    block) that shares the stage's modules and optimizer, so its :meth:`StageState.flat` reads and
    its :meth:`StageState.load_flat` writes the stage itself. Two stages that hold a span build the
    same layout, whatever else they hold.

    Args:
        state: A worker's (or a mirror's) state of exactly one chunk.
        span: ``[start, end)`` blocks, inside the chunk's ``layer_range``.
        num_layers: ``model.layers``.

    Returns:
        The view.

    Raises:
        ValueError: if the state holds more than one chunk or not the whole span.
    """
    if len(state.chunks) != 1:
        raise ValueError(f"a span view needs a one-chunk stage, got chunks {sorted(state.chunks)}")
    (key, chunk), = state.chunks.items()
    lo, hi = chunk.layer_range
    if not lo <= span[0] < span[1] <= hi:
        raise ValueError(f"blocks {span} are not all in chunk {key}'s blocks {chunk.layer_range}")
    parts: list[nn.Module] = [chunk.embed] if span[0] == 0 else []
    parts += [chunk.blocks[i - lo] for i in range(*span)]
    parts += [chunk.norm, chunk.head] if span[1] == num_layers else []
    view = StageState({key: nn.ModuleList(parts)}, state.optimizer)
    view.lr_scale = state.lr_scale  # the same dict: what the view loads lands in the state
    return view


def reshaped_config(job: JobConfig, stages: int, replicas: int, microbatches: int) -> JobConfig:
    """The job config a worker of a reshaped job plays: ``stages`` x ``replicas`` with its replica's
    ``microbatches``; everything else, the batch and the learning-rate schedule included, as the
    configured job (not validated again: the batch size stays the configured one's).

    Args:
        job: The configured job.
        stages: Stages of the new shape.
        replicas: Replicas of the new shape.
        microbatches: Microbatches this worker's replica runs per step.

    Returns:
        The config.
    """
    return replace(job, pipeline=replace(job.pipeline, stages=stages, replicas=replicas, microbatches=microbatches))


def apply_reshape(w: Any, gen: Any, record: dict[str, Any]) -> tuple[int, float]:
    """This worker's part of a reshape (module docstring): build the new stage, move its blocks,
    and install it in ``w`` (:meth:`spotpipe.runtime.worker.worker.Worker.take_stage`).

    Args:
        w: The worker (``id``, ``job``, ``state``, ``mirror``, ``device``, ``take_stage``).
        gen: The generation of the new shape (its members give this worker's stage and replica).
        record: Its recovery record, ``outcome = "reshape"``.

    Returns:
        ``(bytes received, seconds in the peer-to-peer transfer)``.

    Raises:
        Parked: this worker has no place in the new shape.
        RuntimeError: a peer of the transfer is gone (torch's error; the caller aborts the generation).
    """
    from spotpipe.model.stages import build_stage
    from spotpipe.runtime.state.pick import build_chunk_optimizer

    shape = ReshapeRecord.from_record(record)
    if w.id in shape.parked:
        raise Parked(f"generation {gen.number} has no place for this worker")
    me = next(m for m in gen.plan.members if m.worker == w.id)
    stage, replica = me.stage, me.replica
    S, L = len(shape.layers), shape.layers[-1][1]
    job: JobConfig = w.job
    mine = shape.layers[stage]
    chunk = build_stage(job.model, job.train.seed, stage, S, device=w.device)
    if chunk.layer_range != mine:
        raise ValueError(f"stage {stage} of {S} holds blocks {chunk.layer_range}, the reshape gives it {mine}")
    new = StageState({stage: chunk}, build_chunk_optimizer({stage: chunk}, job.train, job.pipeline.offload == "optimizer"))
    old: StageState | None = w.state if w.id in shape.old_layers else None
    mirror = w.mirror.state if w.mirror is not None else None
    kept = overlap(mine, shape.old_layers[w.id]) if old is not None else None
    if kept is not None:
        span_state(new, kept, L).load_flat(span_state(old, kept, L).flat())
    rank_of = {m.worker: r for r, m in enumerate(gen.plan.members)}
    sends: list[tuple[torch.Tensor, int, int]] = []
    recvs: list[tuple[torch.Tensor, int, int]] = []
    installs: list[tuple[Span, torch.Tensor]] = []
    for i, (span, src, from_mirror, dst) in enumerate(shape.moves):
        source = mirror if from_mirror else old
        if src == w.id and source is None:
            raise ValueError(f"the reshape names this worker the source of blocks {span}, but it holds no "
                             f"{'mirror' if from_mirror else 'stage'}")
        if src == w.id and dst == w.id:
            assert source is not None
            span_state(new, span, L).load_flat(span_state(source, span, L).flat())
        elif src == w.id:
            assert source is not None
            sends.append((span_state(source, span, L).flat(), rank_of[dst], TAG_BASE + i))
        elif dst == w.id:
            buf = torch.zeros(span_state(new, span, L).numel())
            recvs.append((buf, rank_of[src], TAG_BASE + i))
            installs.append((span, buf))
    t0 = time.perf_counter()
    p2p(gen, sends, recvs, job.run.timeout_s)
    seconds = time.perf_counter() - t0
    for span, buf in installs:
        span_state(new, span, L).load_flat(buf)
    w.take_stage(stage, replica, new, shape)
    return sum(b.numel() * 4 for _, b in installs), seconds
