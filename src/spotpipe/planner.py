"""Memory planning: bytes per model chunk from the config, and the plans a per-rank budget allows.

A *plan* is a schedule with its memory decisions: 1F1B, 1F1B with full recompute, interleaved
1F1B, chronos, chronos with Chronos-Recomp (as few chunks recomputed as the budget needs, the
longest-lived first), and chronos with that recompute and the optimizer state offloaded to host memory (Lin et al. 2025,
arXiv 2503.03182). :func:`evaluate_plans` gives, for each plan and a per-rank budget, the
predicted peak per rank (:mod:`spotpipe.schedule.memory`), whether it fits, the largest model that
fits (layers at the job's width, and width at the job's layers), and the predicted step time (the
simulator's iteration, :func:`spotpipe.sim.player.play_iteration`, on the job's network and
analytic cost). ``pipeline.schedule = "auto"`` is resolved by :func:`resolve_auto`: the fastest
runnable plan that fits ``pipeline.memory_budget_gb``. ``spotpipe schedule memory`` prints the
table (:func:`format_plans`).

:func:`chunk_bytes` turns the model's shapes (:func:`spotpipe.model.partition.model_shapes`) into
the per-chunk sizes :func:`spotpipe.schedule.memory.memory_profile` reads: parameters and their
gradients in ``model.dtype``, AdamW's two moments in the same dtype (``torch.optim.AdamW`` keeps
``exp_avg`` and ``exp_avg_sq`` like the parameter; Loshchilov and Hutter 2019), the activations one
microbatch keeps for backward, and the input a recomputed forward keeps (the previous chunk's
hidden state; token ids count as nothing).

:func:`predict_memory` is the job's prediction: its lowered schedule (with the ``R`` actions
``pipeline.recompute`` adds) through the memory model. Pure Python: no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from spotpipe.config import AUTO_SCHEDULE, JobConfig
from spotpipe.cost import analytic_cost, num_chunks, sequences_per_microbatch
from spotpipe.errors import ConfigError, SpotpipeError
from spotpipe.ft.policy import swap_schedule_on
from spotpipe.model.partition import model_shapes, optimizer_bytes_per_param
from spotpipe.network import build_network
from spotpipe.schedule.build import job_schedule
from spotpipe.schedule.ir import Placement, Schedule
from spotpipe.schedule.memory import ChunkBytes, RankMemory, memory_profile
from spotpipe.schedule.passes import add_recompute
from spotpipe.schedule.recompute import RecomputeName, chunks_by_lifetime
from spotpipe.sim.player import play_iteration

def chunk_bytes(cfg: JobConfig) -> list[ChunkBytes]:
    """Bytes of every model chunk of the job (one entry per schedule stage).

    Args:
        cfg: The job; ``[model]`` gives the shapes and dtype, ``[pipeline]`` how many chunks and
            the microbatch size (``train.batch_size / (replicas x microbatches)`` sequences);
            under the CheckFree+ swap schedule chunk 1 also holds a copy of the embedding and
            chunk S-2 of the final norm and head (Blagoev, Ersoy, Chen 2025), with their
            gradients and moments.

    Returns:
        One :class:`~spotpipe.schedule.memory.ChunkBytes` per chunk, in bytes.
    """
    shapes = model_shapes(cfg.model, num_chunks(cfg))
    seqs = sequences_per_microbatch(cfg)
    m = cfg.model
    copies = [0] * len(shapes)  # CheckFree+ in-sync copies: the embedding on chunk 1, norm and head on chunk S-2
    if swap_schedule_on(cfg.ft) and len(shapes) >= 4:
        copies[1] += m.vocab_size * m.d_model
        copies[-2] += m.vocab_size * m.d_model + m.d_model
    out: list[ChunkBytes] = []
    for i, s in enumerate(shapes):
        params = s.params + copies[i]
        param_bytes = float(params * s.dtype_bytes)
        out.append(ChunkBytes(
            weights=param_bytes,
            grads=param_bytes,
            optimizer=float(params * optimizer_bytes_per_param(s.dtype_bytes)),
            activations=float(s.activation_bytes_per_sequence * seqs),
            input=float(shapes[i - 1].boundary_bytes_per_sequence * seqs) if i > 0 else 0.0,
        ))
    return out


def predict_memory(cfg: JobConfig, offload: Iterable[int] | None = None) -> tuple[RankMemory, ...]:
    """Bytes per rank over one step of the job, as :func:`~spotpipe.schedule.memory.memory_profile` models them.

    Args:
        cfg: The job (its schedule, recompute and offload keys, and model).
        offload: chunks whose optimizer state lives in host memory (default: the job's
            ``pipeline.offload``).

    Returns:
        One :class:`~spotpipe.schedule.memory.RankMemory` per pipeline rank.

    Raises:
        ScheduleError: a bad schedule, recompute or offload choice.
    """
    return memory_profile(job_schedule(cfg), chunk_bytes(cfg), offload=offloaded_chunks(cfg) if offload is None else offload)


# -- plans ----------------------------------------------------------------------------------------

#: Host link for offloaded optimizer state (PCIe 4.0 x16 achieves about 25 GB/s; a conservative
#: 16 GB/s). The state goes to the device and back once per step, not overlapped in the prediction.
HOST_LINK_BYTES_PER_S = 16e9
GB = 1e9


@dataclass(frozen=True)
class Plan:
    """A schedule and its memory decisions.

    Attributes:
        name: How the planner prints it.
        schedule: ``pipeline.schedule``.
        recompute: ``pipeline.recompute``.
        offload: The optimizer state of every chunk lives in host memory.
        fit: Recompute as few chunks as the budget needs, the longest-lived first
            (:func:`fit_recompute`; Chronos-Recomp), instead of ``recompute``.
        runnable: The runtime can run it (``pipeline.schedule = "auto"`` picks only these).
    """

    name: str
    schedule: str
    recompute: RecomputeName = "none"
    offload: bool = False
    fit: bool = False
    runnable: bool = True


PLANS: tuple[Plan, ...] = (
    Plan("1f1b", "1f1b"),
    Plan("1f1b+recompute", "1f1b", "all"),
    Plan("interleaved", "interleaved"),
    Plan("chronos", "chronos"),
    Plan("chronos+recompute", "chronos", "longest", fit=True),
    Plan("chronos+recompute+offload", "chronos", "longest", offload=True, fit=True),
)


def plan_config(cfg: JobConfig, plan: Plan, budget: float | None = None) -> JobConfig:
    """The job with ``plan``'s schedule, recompute and offload (``virtual_stages`` 2 for chronos, the
    job's own, at least 2, for interleaved), validated.

    Args:
        cfg: The job.
        plan: The plan.
        budget: Bytes per rank, for a ``fit`` plan: its recomputed chunks are those
            :func:`fit_recompute` picks (``pipeline.recompute_chunks``); without a budget it
            recomputes ``plan.recompute``.

    Returns:
        The validated job.

    Raises:
        ConfigError, ScheduleError: the plan does not fit the job (e.g. fewer layers than chunks).
    """
    p = cfg.pipeline
    virtual = 2 if plan.schedule == "chronos" else (max(2, p.virtual_stages) if plan.schedule == "interleaved" else p.virtual_stages)
    pipeline = replace(p, schedule=plan.schedule, recompute=plan.recompute, recompute_chunks=(), virtual_stages=virtual,
                       offload="optimizer" if plan.offload else "none")
    out = replace(cfg, pipeline=pipeline).validate()
    if plan.fit and budget is not None:
        bare = replace(out, pipeline=replace(out.pipeline, recompute="none"))
        chunks, _ = fit_recompute(job_schedule(bare), chunk_bytes(bare), offloaded_chunks(bare), budget)
        out = replace(bare, pipeline=replace(bare.pipeline, recompute_chunks=chunks)).validate()
    return out


def fit_recompute(schedule: Schedule, sizes: Sequence[ChunkBytes], offload: Sequence[int],
                  budget: float) -> tuple[tuple[int, ...], float]:
    """The fewest chunks to recompute for every rank to fit ``budget``, longest-lived first.

    While some rank is over the budget, the longest-lived chunk (:func:`chunks_by_lifetime`, the
    Chronos-Recomp order: the worst temporal locality first) among the over-budget ranks' chunks
    not yet recomputed is added.

    Args:
        schedule: The lowered schedule without ``R`` actions.
        sizes: Bytes per chunk.
        offload: Chunks whose optimizer state is in host memory.
        budget: Bytes per rank.

    Returns:
        (the chunks, sorted; the highest peak over ranks with them). When even recomputing every
        chunk is over the budget, all chunks and that peak.
    """
    order = chunks_by_lifetime(schedule)
    chosen: list[int] = []
    while True:
        ranks = memory_profile(add_recompute(schedule, chosen) if chosen else schedule, sizes, offload=offload)
        over = {r.rank for r in ranks if r.peak > budget}
        peak = max(r.peak for r in ranks)
        left = [c for c in order if c not in chosen and schedule.stage_to_rank[c] in over]
        if not over or not left:
            return tuple(sorted(chosen)), peak
        chosen.append(left[0])


def offloaded_chunks(cfg: JobConfig) -> tuple[int, ...]:
    """Chunks whose optimizer state lives in host memory: all with ``pipeline.offload = "optimizer"``.

    Args:
        cfg: The job.

    Returns:
        Chunk indices, all of them or none.
    """
    return tuple(range(num_chunks(cfg))) if cfg.pipeline.offload == "optimizer" else ()


def step_time(cfg: JobConfig, plan: Plan | None = None) -> float:
    """Predicted seconds of one step: the simulator's iteration of the job's schedule on its
    network with the analytic cost (:mod:`spotpipe.cost`), plus, for an offload plan, the optimizer
    state's trip to the device and back over :data:`HOST_LINK_BYTES_PER_S`.

    Args:
        cfg: The job (a concrete schedule, not ``auto``).
        plan: The plan the job was made from; only its ``offload`` matters here.

    Returns:
        Seconds per step.
    """
    p = cfg.pipeline
    net = build_network(cfg.network, p.stages, p.stages * p.replicas)
    result = play_iteration(job_schedule(cfg), analytic_cost(cfg), net, Placement.dense(p.stages, p.replicas),
                            collectives=cfg.sim.delay_collectives)
    extra = 0.0
    if plan is not None and plan.offload:
        per_rank = [r.streamed for r in predict_memory(cfg)]
        extra = 2 * max(sum(c.optimizer for c in chunk_bytes(cfg)) / p.stages, max(per_rank, default=0.0)) / HOST_LINK_BYTES_PER_S
    return result.iteration_s + extra


@dataclass(frozen=True)
class PlanResult:
    """What one plan needs and allows under a budget.

    Attributes:
        plan: The plan.
        error: Why the plan does not apply to this job ("" when it does); the rest is then empty.
        peaks: Predicted peak bytes per rank.
        peak_rank: The rank with the highest peak.
        peak_action: The action there that hits it (``"optimizer step"`` when that is the peak).
        fits: ``max(peaks) <= budget``.
        step_s: Predicted step time in seconds.
        max_layers: Most ``model.layers`` at the job's width that fit (0: none).
        max_width: Largest ``model.d_model`` at the job's layers that fits (0: none).
    """

    plan: Plan
    error: str = ""
    peaks: tuple[float, ...] = ()
    peak_rank: int = -1
    peak_action: str = ""
    fits: bool = False
    step_s: float = math.inf
    max_layers: int = 0
    max_width: int = 0

    @property
    def peak(self) -> float:
        """The highest peak over ranks (bytes)."""
        return max(self.peaks, default=math.inf)


def _peak_of(schedule: Schedule, cfg: JobConfig, offload: Sequence[int]) -> float:
    return max(r.peak for r in memory_profile(schedule, chunk_bytes(cfg), offload=offload))


def _largest(fits: Callable[[int], bool], low: int, step: int, limit: int) -> int:
    """Largest ``low + k * step`` (``k >= 0``, at most ``limit``) for which the monotone ``fits``
    holds, or 0 when even ``low`` does not fit."""
    if not fits(low):
        return 0
    good, k = 0, 1
    while low + k * step <= limit and fits(low + k * step):  # grow by doubling
        good, k = k, 2 * k
    bad = min(k, (limit - low) // step + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(low + mid * step):
            good = mid
        else:
            bad = mid
    return low + good * step


def _with_model(cfg: JobConfig, layers: int | None = None, d_model: int | None = None) -> JobConfig | None:
    """The job with another depth or width, or None when that is not a valid model for it."""
    model = cfg.model
    model = replace(model, layers=model.layers if layers is None else layers,
                    d_model=model.d_model if d_model is None else d_model)
    try:
        return replace(cfg, model=model).validate()
    except ConfigError:
        return None


def evaluate_plan(cfg: JobConfig, plan: Plan, budget: float, *, sizes: bool = True, timing: bool = True) -> PlanResult:
    """Peaks, fit, largest model and step time of ``plan`` for the job under ``budget`` bytes per rank.

    Args:
        cfg: The job (its model, pipeline sizes, network).
        plan: The plan to evaluate.
        budget: Bytes per rank.
        sizes: Also search the largest model that fits (layers, then width).
        timing: Also predict the step time.

    Returns:
        A :class:`PlanResult` (``error`` set when the plan does not apply).
    """
    try:
        pcfg = plan_config(cfg, plan, budget)
        schedule = job_schedule(pcfg)
        bare = job_schedule(replace(pcfg, pipeline=replace(pcfg.pipeline, recompute="none", recompute_chunks=())))
    except SpotpipeError as exc:
        return PlanResult(plan, error=str(exc))
    offload = offloaded_chunks(pcfg)

    def peak_at(c: JobConfig) -> float:
        if plan.fit:  # the recomputed chunks follow the size
            return fit_recompute(bare, chunk_bytes(c), offload, budget)[1]
        return _peak_of(schedule, c, offload)

    ranks = memory_profile(schedule, chunk_bytes(pcfg), offload=offload)
    peaks = tuple(r.peak for r in ranks)
    top = max(range(len(ranks)), key=lambda i: peaks[i])
    action = "optimizer step" if ranks[top].peak_action is None else str(ranks[top].peak_action)
    max_layers = max_width = 0
    if sizes:
        chunks = schedule.num_stages

        def layers_fit(layers: int) -> bool:
            c = _with_model(pcfg, layers=layers)
            return c is not None and peak_at(c) <= budget

        heads = pcfg.model.heads
        width_step = 2 * heads  # d_model / heads must be even (rotary embeddings)

        def width_fits(width: int) -> bool:
            c = _with_model(pcfg, d_model=width)
            return c is not None and peak_at(c) <= budget

        max_layers = _largest(layers_fit, chunks, 1, 1 << 20)
        max_width = _largest(width_fits, width_step * max(1, -(-8 // width_step)), width_step, 1 << 20)
    step_s = step_time(pcfg, plan) if timing else math.inf
    return PlanResult(plan, "", peaks, top, action, max(peaks) <= budget, step_s, max_layers, max_width)


def evaluate_plans(cfg: JobConfig, budget: float, *, sizes: bool = True, timing: bool = True) -> list[PlanResult]:
    """:func:`evaluate_plan` for every plan of :data:`PLANS`, in that order.

    Args:
        cfg: The job.
        budget: Bytes per rank.
        sizes: Also search the largest model that fits each plan.
        timing: Also predict each plan's step time.

    Returns:
        One :class:`PlanResult` per plan.
    """
    return [evaluate_plan(cfg, plan, budget, sizes=sizes, timing=timing) for plan in PLANS]


def resolve_auto(cfg: JobConfig) -> JobConfig:
    """``pipeline.schedule = "auto"``: the job with the fastest runnable plan that fits
    ``pipeline.memory_budget_gb`` (predicted step time; ties keep the order of :data:`PLANS`).

    Args:
        cfg: The job, with ``pipeline.schedule = "auto"``.

    Returns:
        The job with the chosen plan's schedule, recompute and offload, validated.

    Raises:
        ConfigError: no budget set, or no plan fits (naming the smallest budget that would).
    """
    gb = cfg.pipeline.memory_budget_gb
    if not gb > 0:
        raise ConfigError("pipeline.schedule = auto picks the fastest plan that fits pipeline.memory_budget_gb: "
                          "set pipeline.memory_budget_gb > 0 (GB per rank), or name a schedule")
    results = [evaluate_plan(cfg, plan, gb * GB, sizes=False, timing=False) for plan in PLANS if plan.runnable]
    usable = [r for r in results if not r.error]
    fitting = [r for r in usable if r.fits]
    if not fitting:
        if not usable:
            raise ConfigError("pipeline.schedule = auto: no plan applies to this job: " + "; ".join(r.error for r in results))
        best = min(usable, key=lambda r: r.peak)
        raise ConfigError(
            f"pipeline.memory_budget_gb = {gb:g}: no plan fits; the smallest peak is {best.peak / GB:.3g} GB per rank "
            f"({best.plan.name}); set pipeline.memory_budget_gb >= {math.ceil(best.peak / GB * 1000) / 1000:g}, or "
            "make the model smaller")
    chosen = min(fitting, key=lambda r: (step_time(plan_config(cfg, r.plan, gb * GB), r.plan), PLANS.index(r.plan)))
    return plan_config(cfg, chosen.plan, gb * GB)


def resolved(cfg: JobConfig) -> JobConfig:
    """The job with a named schedule: ``cfg`` itself, or with ``pipeline.schedule = "auto"`` the
    plan :func:`resolve_auto` picks. Every command that runs or simulates a job calls this once,
    after loading its config.

    Args:
        cfg: A validated job.

    Returns:
        A job whose ``pipeline.schedule`` names a registered schedule.

    Raises:
        ConfigError: as :func:`resolve_auto` (no budget, or no plan fits).
    """
    return resolve_auto(cfg) if cfg.pipeline.schedule == AUTO_SCHEDULE else cfg


_UNITS = {"": GB, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2.0**10, "mib": 2.0**20,
          "gib": 2.0**30, "tib": 2.0**40}


MIN_BUDGET = 1e6
MAX_BUDGET = 1e15
"""Budgets per rank that ``parse_bytes`` takes (bytes): 1 MB to 1000 TB."""


def parse_bytes(text: str, what: str = "--budget") -> float:
    """``"4GB"``, ``"512MiB"``, ``"2.5"`` (GB) -> bytes.

    Args:
        text: A number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; none means GB).
        what: The option it came from, named in errors.

    Returns:
        Bytes, between 1 MB and 1000 TB.

    Raises:
        ConfigError: not a positive size with a known unit (naming ``what`` and the units).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or not float(m.group(1)) > 0:
        raise ConfigError(f"{what}: expected a positive size like 4GB, 512MiB or 2.5 (GB), got {text!r}; "
                          "units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    size = float(m.group(1)) * _UNITS[unit]
    if not MIN_BUDGET <= size <= MAX_BUDGET:
        raise ConfigError(f"{what}: {text!r} is out of range; a budget per rank is 1 MB to 1000 TB")
    return size


def format_plans(results: Sequence[PlanResult], budget: float, cfg: JobConfig) -> str:
    """The planner's table: one line per plan, then the plan ``auto`` would pick.

    Args:
        results: One result per plan (:func:`evaluate_plans`).
        budget: Bytes per rank.
        cfg: The job (its sizes go in the header line).

    Returns:
        The table, lines joined by newlines, no trailing newline.
    """
    m = cfg.model
    peaks_all = [p for r in results if not r.error for p in r.peaks]
    unit, scale = ("GB", GB) if max(peaks_all, default=GB) >= GB else ("MB", GB / 1000)  # short numbers
    lines = [f"budget {budget / GB:.3g} GB per rank; model {m.layers} layers x d_model {m.d_model}, "
             f"{cfg.pipeline.stages} ranks, {cfg.pipeline.microbatches} microbatches",
             f"{'plan':<26} {f'peak {unit} per rank':<28} {'max at':<18} {'fits':<5} {'step ms':>9} "
             f"{'max layers':>10} {'max d_model':>11}"]
    for r in results:
        if r.error:
            lines.append(f"{r.plan.name:<26} n/a: {r.error}")
            continue
        peaks = "/".join(f"{p / scale:.3g}" for p in r.peaks)
        where = f"rank {r.peak_rank} {r.peak_action}"
        note = "" if r.plan.runnable else "  (predicted only: the runtime cannot run it)"
        lines.append(f"{r.plan.name:<26} {peaks:<28} {where:<18} {'yes' if r.fits else 'no':<5} {1e3 * r.step_s:>9.4g} "
                     f"{r.max_layers:>10} {r.max_width:>11}{note}")
    fitting = [r for r in results if not r.error and r.fits and r.plan.runnable]
    if fitting:
        best = min(fitting, key=lambda r: (r.step_s, PLANS.index(r.plan)))
        lines.append(f"auto picks {best.plan.name} (the fastest runnable plan that fits)")
    else:
        usable = [r for r in results if not r.error]
        if usable:
            best = min(usable, key=lambda r: r.peak)
            lines.append(f"no plan fits; the smallest peak is {best.peak / GB:.3g} GB per rank ({best.plan.name})")
    return "\n".join(lines)
