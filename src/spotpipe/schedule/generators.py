"""Compute-only pipeline schedules: GPipe, 1F1B and interleaved 1F1B here, chronos in its own module.

Every generator takes integers only and returns a :class:`~spotpipe.schedule.ir.Schedule` whose
per-rank lists hold ``F`` and ``B`` actions and nothing else; :mod:`spotpipe.schedule.passes`
lowers them (adds send/recv) for the runtime executor and the simulator.

* GPipe (Huang et al., "GPipe: Efficient Training of Giant Neural Networks using Pipeline
  Parallelism", NeurIPS 2019): every rank runs all forwards, then all backwards. Activations of
  all ``M`` microbatches are resident at once; the bubble is ``(S-1)/(M+S-1)``.
* 1F1B, a.k.a. PipeDream-Flush (Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN
  Training", ICML 2021): rank ``r`` of ``S`` runs ``min(S-1-r, M)`` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards. Same bubble as
  GPipe, but at most ``S-r`` activations are resident on rank ``r``.
* Interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", SC 2021): each of ``P`` ranks holds ``V`` model chunks; chunk
  (stage) ``s`` lives on rank ``s % P``. Microbatches advance in groups of ``P`` through the
  chunks, which shrinks the bubble by a factor ``V``. The warm-up length and the chunk order follow
  Megatron-LM's ``forward_backward_pipelining_with_interleaving``.
* chronos (:mod:`spotpipe.schedule.chronos`; after ChronosPipe, Lin et al. 2025): two chunks per
  rank in a V, one repeating pattern per microbatch, shorter activation lifetimes than 1F1B.

:data:`REGISTRY` maps each schedule name to its generator and is the only list of names: the
config check of ``pipeline.schedule``, :func:`build_schedule`, the job builder
(:func:`spotpipe.schedule.build.job_schedule`) and ``spotpipe schedule show --schedule`` all read
it. Adding a schedule takes two things:

1. a generator: a function ``(stages, microbatches, virtual_stages) -> Schedule`` that returns a
   compute-only schedule (here, or in its own module of this package that imports only
   :mod:`spotpipe.schedule.ir` and never this module, so no import circle can form);
2. one registration line in :data:`REGISTRY`: ``"name": Generator(function, chunked=...)``,
   with ``chunked=True`` when it places ``virtual_stages`` model chunks on every rank.

Nothing else names schedules; the runtime and the simulator play what the builder returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from spotpipe.schedule.chronos import chronos_schedule
from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ScheduleError(f"{name} must be >= 1, got {value}")


def _plain(ranks: list[list[Action]], stages: int, microbatches: int, name: str) -> Schedule:
    return Schedule(
        ranks=tuple(tuple(acts) for acts in ranks),
        num_stages=stages,
        num_microbatches=microbatches,
        stage_to_rank=tuple(range(stages)),
        name=name,
    )


def gpipe_schedule(stages: int, microbatches: int) -> Schedule:
    """GPipe: all forwards, then all backwards, on every rank (Huang et al. 2019).

    Backwards run in microbatch order 0..M-1 (as ``torch.distributed.pipelining.ScheduleGPipe``).

    Args:
        stages: pipeline ranks ``S`` (one stage per rank).
        microbatches: microbatches ``M`` per step.

    Returns:
        A compute-only schedule, stage ``s`` on rank ``s``.
    """
    _check_positive("stages", stages)
    _check_positive("microbatches", microbatches)
    ranks = [
        [Action(s, Op.F, m) for m in range(microbatches)] + [Action(s, Op.B, m) for m in range(microbatches)]
        for s in range(stages)
    ]
    return _plain(ranks, stages, microbatches, "gpipe")


def one_f_one_b_schedule(stages: int, microbatches: int) -> Schedule:
    """1F1B / PipeDream-Flush (Narayanan et al., ICML 2021).

    Rank ``r`` runs ``w = min(S-1-r, M)`` warm-up forwards ``F0..F(w-1)``, then ``M-w`` steady
    pairs ``F(w+i) B(i)``, then the cool-down backwards ``B(M-w)..B(M-1)``.

    Args:
        stages: pipeline ranks ``S`` (one stage per rank).
        microbatches: microbatches ``M`` per step.

    Returns:
        A compute-only schedule, stage ``s`` on rank ``s``.
    """
    _check_positive("stages", stages)
    _check_positive("microbatches", microbatches)
    ranks: list[list[Action]] = []
    for s in range(stages):
        warmup = min(stages - 1 - s, microbatches)
        acts = [Action(s, Op.F, m) for m in range(warmup)]
        for i in range(microbatches - warmup):
            acts.append(Action(s, Op.F, warmup + i))
            acts.append(Action(s, Op.B, i))
        acts.extend(Action(s, Op.B, m) for m in range(microbatches - warmup, microbatches))
        ranks.append(acts)
    return _plain(ranks, stages, microbatches, "1f1b")


def _interleaved_action(k: int, rank: int, ranks: int, chunks: int, op: Op) -> Action:
    """The ``k``-th forward (``op`` F) or backward (``op`` B) of ``rank`` in Megatron-LM's order.

    Microbatches move in groups of ``P`` (= ``ranks``): a group runs through chunk 0, then chunk 1,
    ..., then the next group starts; backwards visit the chunks in reverse.
    """
    in_group = k % (ranks * chunks)
    chunk = in_group // ranks
    if op is Op.B:
        chunk = chunks - 1 - chunk
    microbatch = (k // (ranks * chunks)) * ranks + k % ranks
    return Action(chunk * ranks + rank, op, microbatch)


def interleaved_schedule(stages: int, virtual_stages: int, microbatches: int) -> Schedule:
    """Interleaved 1F1B with virtual stages (Narayanan et al., SC 2021; Megatron-LM's order).

    There are ``P = stages`` ranks and ``P*V`` model chunks; chunk ``s`` lives on rank ``s % P``,
    so rank ``r`` holds chunks ``r, r+P, ..., r+(V-1)P``. Rank ``r`` runs
    ``min((P-1-r)*2 + (V-1)*P, M*V)`` warm-up forwards (all ``M*V`` when ``M == P``), then
    alternates one forward and one backward, then drains the backwards. The ``k``-th forward of a
    rank is chunk ``(k mod PV) // P`` of microbatch ``(k // PV) * P + k mod P``; backwards use the
    chunks in reverse. With ``V == 1`` this is exactly :func:`one_f_one_b_schedule` (Megatron-LM
    also falls back to plain 1F1B without virtual stages), named ``interleaved``.

    Args:
        stages: pipeline ranks ``P``.
        virtual_stages: model chunks ``V`` per rank.
        microbatches: microbatches ``M`` per step; must be a multiple of ``P``.

    Returns:
        A compute-only schedule with ``P*V`` stages on ``P`` ranks.

    Raises:
        ScheduleError: when an argument is below 1 or ``M`` is not a multiple of ``P``.
    """
    _check_positive("stages", stages)
    _check_positive("virtual_stages", virtual_stages)
    _check_positive("microbatches", microbatches)
    if microbatches % stages:
        raise ScheduleError(
            f"interleaved schedule: microbatches ({microbatches}) must be a multiple of stages ({stages})"
        )
    if virtual_stages == 1:
        base = one_f_one_b_schedule(stages, microbatches)
        return base.with_ranks(base.ranks, name="interleaved")
    total = microbatches * virtual_stages
    ranks: list[list[Action]] = []
    for r in range(stages):
        if microbatches == stages:
            warmup = total
        else:
            warmup = min((stages - 1 - r) * 2 + (virtual_stages - 1) * stages, total)
        acts = [_interleaved_action(k, r, stages, virtual_stages, Op.F) for k in range(warmup)]
        for i in range(total - warmup):
            acts.append(_interleaved_action(warmup + i, r, stages, virtual_stages, Op.F))
            acts.append(_interleaved_action(i, r, stages, virtual_stages, Op.B))
        acts.extend(_interleaved_action(k, r, stages, virtual_stages, Op.B) for k in range(total - warmup, total))
        ranks.append(acts)
    num_stages = stages * virtual_stages
    return Schedule(
        ranks=tuple(tuple(acts) for acts in ranks),
        num_stages=num_stages,
        num_microbatches=microbatches,
        stage_to_rank=tuple(s % stages for s in range(num_stages)),
        name="interleaved",
    )


#: A generator's signature: ``(stages, microbatches, virtual_stages) -> compute-only Schedule``.
GenerateFn = Callable[[int, int, int], Schedule]


@dataclass(frozen=True)
class Generator:
    """A registered schedule generator.

    Attributes:
        generate: ``(stages, microbatches, virtual_stages) -> Schedule``, compute-only; a generator
            that does not use virtual stages ignores the third argument (the config keeps
            ``pipeline.virtual_stages`` set for every schedule).
        chunked: Whether every rank holds ``virtual_stages`` model chunks (then the schedule has
            ``stages * virtual_stages`` stages), else one.
    """

    generate: GenerateFn
    chunked: bool = False


#: Every schedule by name (the values of ``pipeline.schedule``): the only list of names.
REGISTRY: Mapping[str, Generator] = MappingProxyType({
    "gpipe": Generator(lambda stages, microbatches, _virtual: gpipe_schedule(stages, microbatches)),
    "1f1b": Generator(lambda stages, microbatches, _virtual: one_f_one_b_schedule(stages, microbatches)),
    "interleaved": Generator(lambda stages, microbatches, virtual: interleaved_schedule(stages, virtual, microbatches), chunked=True),
    "chronos": Generator(lambda stages, microbatches, virtual: chronos_schedule(stages, microbatches, virtual), chunked=True),
})


def _generator(name: str) -> Generator:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule {name!r}: allowed values are {', '.join(REGISTRY)}") from None


def model_chunks(name: str, stages: int, virtual_stages: int) -> int:
    """Model chunks (schedule stages) of schedule ``name`` over ``stages`` ranks.

    Args:
        name: A registered schedule name.
        stages: Pipeline ranks.
        virtual_stages: Chunks per rank, counted only by a ``chunked`` schedule.

    Returns:
        ``stages * virtual_stages`` for a chunked schedule (interleaved), else ``stages``.

    Raises:
        ScheduleError: for an unknown name (the message lists the allowed ones).
    """
    return stages * (virtual_stages if _generator(name).chunked else 1)


def build_schedule(name: str, stages: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """The compute-only schedule called ``name`` (the value of ``pipeline.schedule``).

    Args:
        name: A key of :data:`REGISTRY` (``"gpipe"``, ``"1f1b"``, ``"interleaved"``, ``"chronos"``).
        stages: pipeline ranks.
        microbatches: microbatches per step.
        virtual_stages: model chunks per rank; used by chunked schedules (interleaved; chronos needs 2) only and
            ignored by the others (the config keeps ``pipeline.virtual_stages`` set for every
            schedule).

    Returns:
        A compute-only :class:`Schedule` of ``F`` and ``B`` actions.

    Raises:
        ScheduleError: for an unknown name (the message lists the allowed ones) or bad sizes.
    """
    return _generator(name).generate(stages, microbatches, virtual_stages)
