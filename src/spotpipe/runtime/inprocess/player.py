"""The in-process player: every rank of the job's lowered schedule, played by the real executor.

:class:`PipelineTrainer` is a :class:`~spotpipe.runtime.inprocess.local.LocalTrainer` whose
microbatches are not chained by hand: each replica's step is the job's lowered
:class:`~spotpipe.schedule.ir.Schedule` (the one the workers play), compiled per rank by
:func:`~spotpipe.runtime.pipeline.executor.compile_rank` and played by one
:class:`~spotpipe.runtime.pipeline.executor.Executor` per rank, over the in-process transport
(:mod:`spotpipe.runtime.comm.inprocess`), whose ranks take turns in a fixed order so a step is
deterministic. One schedule IR, two players (DESIGN.md): the path each microbatch takes, the
order of every rank's actions and every message come from the schedule; nothing here knows
which schedule it plays. Under CheckFree+ (Blagoev, Ersoy, Chen 2025, section 3.2) the swap
schedule's odd microbatches start on chunk 1 and end on chunk S-2 because their *paths* say so.

Copies of the embedding and of the final norm and LM head. The first stage of a microbatch's
path embeds its tokens and the last computes the loss. A worker whose chunk starts or ends a path
without owning that part keeps an in-sync copy (chunks 1 and S-2 under CheckFree+; see
:mod:`spotpipe.model.stages`). In one process the copy *is* the original: the chunk uses chunk
0's embedding, resp. the last chunk's norm and head. That is exactly what an in-sync copy
computes, and the gradients of both uses land in one tensor, which is the summed gradient the
workers exchange (:mod:`spotpipe.runtime.worker.tied`), counted once in the gradient norm as the
workers count it. Chunk 0, second on a swapped path, and chunk S-1, second to last there, are
built as the workers' CheckFree+ chunks: chunk 0 takes hidden states, and the parts of both that
the copies mirror are their tied parameters. The in-process convergence mode keeps its own
snapshot of the copies, in the form a worker sends them
(:meth:`~spotpipe.runtime.state.stage_state.StageState.tied_flat`), for recovery
(:mod:`spotpipe.runtime.inprocess.convergence`).

Replicas. Each replica's pipeline is played on its own over the same chunks; LocalTrainer keeps
each replica's gradient apart and adds them in replica order, as the workers' all-reduce does.

Evaluation stays :meth:`LocalTrainer.evaluate`: the model in its own stage order, the path a user
deploys and the one the workers' forward-only evaluation schedule takes.

Record. After every replica's step :attr:`PipelineTrainer.last_trace` holds, per rank, what its
executor did as seen from outside: compute actions as ``(op, stage, microbatch)`` and messages as
``("SEND" | "RECV", peer rank, tag)`` (recomputes as ``("R", stage, microbatch)``), in the order
they happened. It equals the lowered schedule's
action list of that rank (the tests check it), so a hand-written loop cannot creep back in.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from spotpipe.config import JobConfig
from spotpipe.errors import SpotpipeError
from spotpipe.model.stages import StageModule, build_stage
from spotpipe.model.transformer import lm_loss
from spotpipe.runtime.comm.inprocess import InProcessHub
from spotpipe.runtime.comm.transport import Handle, Transport
from spotpipe.schedule.build import job_schedule  # the job's lowered schedule (the one builder)
from spotpipe.runtime.inprocess.local import LocalTrainer, default_num_chunks
from spotpipe.runtime.pipeline.executor import Executor, Instruction, compile_rank
from spotpipe.runtime.pipeline.meter import MeasuredMemory, SavedTensorMeter, moment_tensors, state_bytes
from spotpipe.runtime.pipeline.stage_runner import StageRunner
from spotpipe.schedule.ir import Schedule

TraceEntry = tuple[str, int, int]  # ("F" | "B" | "R", stage, microbatch) or ("SEND" | "RECV", peer rank, tag)


class _RankLog:
    """What one rank did in one replica's step, and the microbatch losses where paths end.

    Attributes:
        actions: Trace entries in the order they happened.
        microbatch: The microbatch of the forward under way (the chunk view reads it).
        losses: Shared by the ranks of the step: microbatch -> its unscaled loss.
    """

    def __init__(self) -> None:
        self.actions: list[TraceEntry] = []
        self.microbatch = -1
        self.losses: dict[int, float] = {}

    def reset(self, losses: dict[int, float]) -> None:
        """Start a new step whose path ends write into ``losses``."""
        self.actions = []
        self.microbatch = -1
        self.losses = losses


class _ChunkView(nn.Module):
    """A chunk as one rank's executor sees it in one process.

    Where the chunk starts a path without an embedding, it embeds with chunk 0's; where it ends a
    path without the final norm and head, it finishes with the last chunk's (the in-process form
    of an in-sync copy, see the module docstring). Every loss it computes is recorded.

    Args:
        chunk: The trainer's chunk.
        first: Chunk 0 (owns the embedding).
        last: The last chunk (owns the final norm and the LM head).
        log: The log of the rank that holds the chunk.
    """

    def __init__(self, chunk: StageModule, first: StageModule, last: StageModule, log: _RankLog) -> None:
        super().__init__()
        self.parts = (chunk, first, last)  # a tuple: not registered again as submodules
        self.log = log

    def train(self, mode: bool = True) -> _ChunkView:
        """Set the chunk's mode (chunk 0 and the last chunk are set by their own views)."""
        chunk = self.parts[0]
        if chunk.training != mode:  # the runner sets it before every step; a walk over the tree is not free
            chunk.train(mode)
        self.training = mode
        return self

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, finish: bool | None = None) -> torch.Tensor:
        """Run the chunk on token ids ``[B, T]`` or hidden states ``[B, T, d_model]``.

        Returns:
            Hidden states ``[B, T, d_model]``; where the path ends (``finish``, default: the chunk
            is the last), the scalar mean token cross-entropy with ``targets``, else the logits.
        """
        chunk, first, last = self.parts
        ends = chunk.is_last if finish is None else finish
        if not x.is_floating_point() and chunk.embed is None:
            assert first.embed is not None
            x = first.embed(x)
        if not ends:
            hidden: torch.Tensor = chunk(x, finish=False)
            return hidden
        out: torch.Tensor
        if chunk.norm is not None and chunk.head is not None:
            out = chunk(x, targets, finish=True)
        else:
            assert last.norm is not None and last.head is not None
            logits = last.head(last.norm(chunk(x, finish=False)))
            out = logits if targets is None else lm_loss(logits, targets)
        if targets is not None:
            self.log.losses[self.log.microbatch] = float(out.detach())
        return out


class _TracedRunner(StageRunner):
    """A :class:`StageRunner` that logs each forward and backward it is asked for."""

    def __init__(self, chunks: Mapping[int, nn.Module], loss_scale: float, device: torch.device, log: _RankLog) -> None:
        super().__init__(chunks, loss_scale, device)
        self.log = log

    def forward(self, stage: int, microbatch: int, x: torch.Tensor | None, ends_path: bool | None = None,
                keep: bool = True) -> torch.Tensor | None:
        self.log.actions.append(("F", stage, microbatch))
        self.log.microbatch = microbatch
        return super().forward(stage, microbatch, x, ends_path, keep)

    def recompute(self, stage: int, microbatch: int, ends_path: bool | None = None) -> None:
        self.log.actions.append(("R", stage, microbatch))
        self.log.microbatch = microbatch  # a recomputed loss is recorded again, for the same microbatch
        super().recompute(stage, microbatch, ends_path)

    def backward(self, stage: int, microbatch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        self.log.actions.append(("B", stage, microbatch))
        return super().backward(stage, microbatch, grad)


class _TracedTransport:
    """A :class:`Transport` wrapper that logs each message the executor posts."""

    def __init__(self, inner: Transport, log: _RankLog) -> None:
        self.inner = inner
        self.log = log

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        self.log.actions.append(("SEND", peer, tag))
        return self.inner.isend(tensor, peer, tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Handle:
        self.log.actions.append(("RECV", peer, tag))
        return self.inner.irecv(tensor, peer, tag)

    def abort(self) -> None:
        self.inner.abort()


class PipelineTrainer(LocalTrainer):
    """:class:`LocalTrainer` whose steps are played by the pipeline executor, every rank in this process.

    Clipping, the learning-rate schedule, the optimizer steps, the sum over replicas (in replica
    order, as an all-reduce) and evaluation are LocalTrainer's; only how one replica's
    microbatches are computed differs (:meth:`replica_losses`).

    Args:
        cfg: The job (validated).
        token_file: The :class:`~spotpipe.data.tokens.TokenFile` to train on.
        device: Where the chunks live (default CPU).
        schedule: The lowered schedule to play (default: the job's, ``job_schedule(cfg)``).
        measure_memory: Count, per rank, the bytes autograd saves for backward and the state its
            chunks hold (:mod:`spotpipe.runtime.pipeline.meter`); after each replica's step
            :attr:`last_memory` holds one :class:`MeasuredMemory` per rank.

    Raises:
        SpotpipeError: the schedule's stages are not the trainer's chunks, or (as LocalTrainer)
            the token file does not fit the model.
    """

    def __init__(self, cfg: JobConfig, token_file: Any, device: torch.device | str | None = None,
                 schedule: Schedule | None = None, measure_memory: bool = False) -> None:
        self.schedule: Schedule = job_schedule(cfg) if schedule is None else schedule
        chunks = default_num_chunks(cfg)
        if self.schedule.num_stages != chunks:
            raise SpotpipeError(
                f"the {self.schedule.name} schedule has {self.schedule.num_stages} stages but the model is cut into "
                f"{chunks} chunks (pipeline.stages x pipeline.virtual_stages)")
        if not self.schedule.is_lowered():
            raise SpotpipeError(f"the {self.schedule.name} schedule is not lowered: the executor needs its messages")
        super().__init__(cfg, token_file, device=device)
        sched = self.schedule
        s2r = sched.stage_to_rank
        self.programs: tuple[tuple[Instruction, ...], ...] = tuple(
            compile_rank(self.schedule, r, lambda stage: s2r[stage]) for r in range(self.schedule.num_ranks))
        self.last_trace: list[list[TraceEntry]] = []
        self._logs = [_RankLog() for _ in range(sched.num_ranks)]
        self._views: dict[int, _ChunkView] = {}
        self._viewed: tuple[int, ...] = ()  # ids of the chunks the views were made for
        self._hub: InProcessHub | None = None
        self.measure_memory = measure_memory
        self._meters: list[SavedTensorMeter] = []
        self._metered: tuple[int, ...] = ()  # ids of the chunks the meters were made for
        self.last_memory: list[MeasuredMemory] = []

    def build_chunk(self, index: int) -> StageModule:
        """Chunk ``index``; where the first or the last chunk sits inside a microbatch's path
        (CheckFree+: second, resp. second to last, on swapped paths) it is built as the workers'
        CheckFree+ chunk (``edge_copies``): chunk 0 then takes hidden states, and the embedding of
        chunk 0 and the final norm and head of the last chunk are its
        :meth:`~spotpipe.model.stages.StageModule.tied_parameters`, whose in-sync copies the
        in-process convergence mode keeps. Same initial weights either way.

        Args:
            index: Chunk index, 0-based.

        Returns:
            The chunk, on this trainer's device.
        """
        sched, last = self.schedule, self.num_chunks - 1
        paths = [sched.path(mb) for mb in range(sched.num_microbatches)]
        edge = ((index == 0 and any(path.index(0) > 0 for path in paths if 0 in path))
                or (index == last and any(path.index(last) < len(path) - 1 for path in paths if last in path)))
        return build_stage(self.cfg.model, self.cfg.train.seed, index, self.num_chunks, device=self.device, edge_copies=edge)

    @property
    def num_ranks(self) -> int:
        """Pipeline ranks of one replica (each played by its own executor)."""
        return self.schedule.num_ranks

    def _chunk_views(self) -> dict[int, _ChunkView]:
        """Stage -> the view its rank's runner gets (made again after a chunk was replaced)."""
        ids = tuple(id(c) for c in self.chunks)
        if ids != self._viewed:
            s2r = self.schedule.stage_to_rank
            self._views = {s: _ChunkView(c, self.chunks[0], self.chunks[-1], self._logs[s2r[s]])
                           for s, c in enumerate(self.chunks)}
            self._viewed = ids
        return self._views

    def _ready_hub(self) -> InProcessHub:
        """The hub the ranks play over; a new one after a step that failed (an aborted hub stays
        aborted, as a generation does)."""
        if self._hub is None or self._hub.aborted or self._hub.undelivered():
            sched = self.schedule
            self._hub = InProcessHub(sched.num_ranks, {r: f"rank {r} (stages {list(sched.stages_of_rank(r))})"
                                                       for r in range(sched.num_ranks)})
        return self._hub

    def _ready_meters(self) -> list[SavedTensorMeter]:
        """One meter per rank when measuring (made again after a chunk was replaced), else none."""
        if not self.measure_memory:
            return []
        ids = tuple(id(c) for c in self.chunks)
        if ids != self._metered:
            params = [q for c in self.chunks for q in c.parameters()]
            self._meters = [SavedTensorMeter(params) for _ in range(self.num_ranks)]
            self._metered = ids
        return self._meters

    def _measured(self, rank: int, activations_peak: int) -> MeasuredMemory:
        """What ``rank`` holds: its chunks' state (gradients as they stand now) and the peak."""
        own = {s: self.chunks[s] for s in self.schedule.stages_of_rank(rank)}
        state = state_bytes(own.values(), moment_tensors(self.state.optimizer, own), self.device)
        opt = self.state.optimizer
        by_chunk = getattr(opt, "streamed_by_chunk", {})  # offloaded moments on the device for their update
        streamed = max((int(by_chunk.get(s, 0)) for s in own), default=0)
        return MeasuredMemory(rank, activations_peak, state, streamed)

    def replica_losses(self, step_ids: Sequence[int], replica: int) -> list[float]:
        """Play one replica's step: every rank's executor, taking turns over an in-process hub.

        Returns:
            The unscaled loss of each microbatch, in microbatch order (recorded where its path
            ends); the gradients, scaled by ``1 / (replicas x microbatches)``, accumulate in the
            chunks' ``.grad``.

        Args:
            step_ids: The step's sample ids.
            replica: The replica, 0-based.

        Raises:
            CommError: a rank waited for a message that never comes (a broken schedule), naming
                the action and the step.
            SpotpipeError: a microbatch's path never reached its end, or a message was never received.
        """
        cfg, sched = self.cfg, self.schedule
        p, m = cfg.pipeline, cfg.model
        data = [self.microbatch(step_ids, replica, mb) for mb in range(p.microbatches)]
        inputs = [tokens for tokens, _ in data]
        targets = [target for _, target in data]
        losses: dict[int, float] = {}
        logs = self._logs
        for log in logs:
            log.reset(losses)
        views = self._chunk_views()
        hub = self._ready_hub()
        shape = (cfg.train.batch_size // (p.replicas * p.microbatches), m.context, m.d_model)
        dtype = next(self.chunks[0].parameters()).dtype
        label = f"step {self.step}" + (f" of replica {replica}" if p.replicas > 1 else "")

        meters = self._ready_meters()

        def rank_body(rank: int) -> tuple[float, int]:
            log = logs[rank]
            runner = _TracedRunner({s: views[s] for s in sched.stages_of_rank(rank)}, 1.0 / (p.replicas * p.microbatches),
                                   self.device, log)
            if meters:
                meters[rank].reset_peak()
                runner.meter = meters[rank]
            executor = Executor(self.programs[rank], runner, _TracedTransport(hub.transport(rank), log), shape, dtype,
                                cfg.run.timeout_s, device=self.device)
            return executor.run(inputs, targets, label=label)

        hub.play([functools.partial(rank_body, rank) for rank in range(self.num_ranks)])
        self.last_trace = [list(log.actions) for log in logs]
        if meters:
            self.last_memory = [self._measured(rank, meters[rank].peak) for rank in range(self.num_ranks)]
        extra = hub.undelivered()
        if extra:
            raise SpotpipeError(f"{label}: the {sched.name} schedule sent messages no rank received "
                                f"(source rank, destination rank, tag): {extra[:4]}")
        missing = [mb for mb in range(p.microbatches) if mb not in losses]
        if missing:
            raise SpotpipeError(f"{label}: the {sched.name} schedule never ended the path of microbatches {missing}")
        return [losses[mb] for mb in range(p.microbatches)]


__all__ = ["PipelineTrainer", "TraceEntry"]
