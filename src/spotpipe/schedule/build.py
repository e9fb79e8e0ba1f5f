"""The one builder of a job's lowered schedule, shared by the runtime, the simulator and the CLI.

A job's schedule is made in three steps, always the same:

1. the generator named by ``pipeline.schedule`` (:data:`spotpipe.schedule.generators.REGISTRY`)
   produces the compute-only schedule for ``pipeline.stages`` ranks, ``pipeline.microbatches``
   microbatches and, for a chunked schedule, ``pipeline.virtual_stages`` chunks per rank;
2. with the CheckFree+ swap schedule on (``ft.swap_edges``, always with
   ``ft.strategy = "checkfree+"``; :func:`spotpipe.ft.policy.swap_schedule_on`) odd microbatches
   take the swapped path, stages 0<->1 and S-2<->S-1 exchanged
   (:func:`spotpipe.schedule.swap.swap_edges`; Blagoev, Ersoy, Chen 2025, section 3.2);
3. :func:`spotpipe.schedule.passes.lower` adds the point-to-point messages;
4. with ``pipeline.recompute`` / ``pipeline.recompute_chunks`` set,
   :func:`spotpipe.schedule.passes.add_recompute` adds an ``R`` before every backward of the
   chunks :func:`spotpipe.schedule.recompute.recompute_plan` picks.

The runtime workers play what :func:`job_schedule` returns and the simulator times the same
schedule, so a simulated job runs exactly the actions, paths and messages of the real one (see
DESIGN.md, "One schedule IR, two players"). Pure: no torch.
"""

from __future__ import annotations

from typing import Any, Protocol

from spotpipe.ft.policy import swap_schedule_on
from spotpipe.schedule.generators import build_schedule
from spotpipe.schedule.ir import Schedule
from spotpipe.schedule.passes import add_recompute, lower
from spotpipe.schedule.recompute import recompute_plan
from spotpipe.schedule.swap import swap_edges


class PipelineShape(Protocol):
    """The fields of a ``[pipeline]`` section the builder reads (:class:`spotpipe.config.PipelineConfig`,
    or the ``spotpipe schedule show`` arguments, which carry the same names)."""

    @property
    def schedule(self) -> str: ...

    @property
    def stages(self) -> int: ...

    @property
    def microbatches(self) -> int: ...

    @property
    def virtual_stages(self) -> int: ...


def _recompute_keys(pipeline: PipelineShape) -> tuple[str, tuple[int, ...]]:
    """``pipeline.recompute`` and ``pipeline.recompute_chunks`` (a shape without them: none)."""
    return str(getattr(pipeline, "recompute", "none")), tuple(getattr(pipeline, "recompute_chunks", ()))


class JobShape(Protocol):
    """The sections of a job the builder reads (:class:`spotpipe.config.JobConfig`)."""

    @property
    def pipeline(self) -> PipelineShape: ...

    @property
    def ft(self) -> Any: ...


def compute_schedule(pipeline: PipelineShape, swap: bool = False) -> Schedule:
    """The compute-only schedule of a ``[pipeline]`` section, swapped for CheckFree+ on request.

    Args:
        pipeline: ``schedule`` (a registered name), ``stages`` (ranks), ``microbatches`` (per
            step and replica) and ``virtual_stages`` (chunks per rank, chunked schedules only).
        swap: Give odd microbatches the CheckFree+ swapped path (needs >= 4 schedule stages).

    Returns:
        A schedule of ``F`` and ``B`` actions only, with per-microbatch paths when swapped.

    Raises:
        ScheduleError: for an unknown schedule name, bad sizes, or a swap over < 4 stages.
    """
    schedule = build_schedule(pipeline.schedule, pipeline.stages, pipeline.microbatches, pipeline.virtual_stages)
    return swap_edges(schedule) if swap else schedule


def job_schedule(cfg: JobShape, swap: bool | None = None) -> Schedule:
    """The lowered schedule a job runs: what every runtime worker plays and the simulator times.

    Args:
        cfg: The job; ``[pipeline]`` picks the generator, sizes and recomputed chunks, ``[ft]``
            whether the CheckFree+ swap schedule is on.
        swap: ``None`` (default) follows the config (:func:`spotpipe.ft.policy.swap_schedule_on`);
            ``False`` gives the model's own stage order for every microbatch (evaluation passes
            use it), ``True`` forces the swapped paths.

    Returns:
        The lowered schedule (compute plus SEND/RECV actions, and ``R`` where recomputed).

    Raises:
        ScheduleError: for an unknown schedule name, bad sizes, a swap over < 4 stages, or a
            recomputed chunk the schedule does not have.
    """
    on = swap_schedule_on(cfg.ft) if swap is None else swap
    compute = compute_schedule(cfg.pipeline, on)
    mode, chunks = _recompute_keys(cfg.pipeline)
    plan = recompute_plan(compute, mode, chunks) if (mode != "none" or chunks) else ()
    lowered = lower(compute)
    return add_recompute(lowered, plan) if plan else lowered
