"""Cost model: seconds per compute action and bytes per message, analytic or profiled.

The simulator asks two questions of every action of a lowered schedule: how long does this
compute action take on a node of relative speed 1 (:meth:`CostModel.duration`), and how many
bytes does this message carry (:meth:`CostModel.message_bytes`). Link time per message comes from
:mod:`spotpipe.network` (latency + bytes / bandwidth).

* **Analytic** (:func:`analytic_cost`): forward FLOPs per token of each chunk from
  :func:`spotpipe.model.partition.model_shapes` (PaLM accounting, Chowdhery et al. 2022, app. B)
  times the tokens of one microbatch, divided by the achieved device throughput
  ``sim.device_tflops``; backward = ``sim.backward_ratio`` x forward (about 2, Narayanan et al.
  2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", s. 3).
  Messages carry one microbatch's hidden state (sequences x context x d_model x dtype bytes).
  Gradients all-reduced across replicas carry every parameter of the stage once.
* **Profiled** (:func:`read_profile`, :func:`fit_scale_and_overhead`): the ``step`` events of
  short ``spotpipe train`` runs give their measured step times; the analytic per-chunk times are
  scaled by one factor (and, with two or more runs, a fixed per-step overhead is added) so that
  the simulator, playing those same runs, reproduces them. Relative chunk costs keep the FLOP
  ratios; the factor absorbs the machine's real throughput. No torch is needed.

Pure Python: this module never imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spotpipe.config import JobConfig, config_from_mapping
from spotpipe.errors import ConfigError, SpotpipeError
from spotpipe.events import RUN_START, STEP, iter_events
from spotpipe.model.partition import model_shapes
from spotpipe.schedule.generators import model_chunks
from spotpipe.schedule.ir import Action, Op


def num_chunks(cfg: JobConfig) -> int:
    """Model chunks (schedule stages): pipeline ranks x virtual stages for a chunked schedule
    (interleaved; :func:`spotpipe.schedule.generators.model_chunks`).

    Args:
        cfg: The job (``pipeline.schedule``, ``stages``, ``virtual_stages``).

    Returns:
        The number of model chunks.
    """
    p = cfg.pipeline
    return model_chunks(p.schedule, p.stages, p.virtual_stages)


def sequences_per_microbatch(cfg: JobConfig) -> int:
    """Sequences in one microbatch of one replica (``batch_size / (replicas x microbatches)``).

    Args:
        cfg: The job (``train.batch_size``, ``pipeline.replicas``, ``pipeline.microbatches``).

    Returns:
        Sequences per microbatch, at least 1.
    """
    p = cfg.pipeline
    return max(1, cfg.train.batch_size // (p.replicas * p.microbatches))


@dataclass(frozen=True)
class CostModel:
    """Per-stage costs of one job, at relative node speed 1.

    Attributes:
        forward_s: Forward time of one microbatch, per stage (model chunk).
        backward_s: Backward time of one microbatch, per stage.
        boundary_bytes: Bytes of one microbatch's hidden state leaving stage ``s`` forward (the
            gradient sent back to ``s`` has the same size).
        activation_bytes: Bytes stage ``s`` keeps for backward per microbatch.
        grad_bytes: Gradient bytes of stage ``s`` all-reduced across replicas per step.
        param_count: Parameters of stage ``s``.
        optimizer_s: Optimizer step time per iteration.
        overhead_s: Other fixed time per iteration (profiled: whatever the pipeline does not explain).
        source: "analytic" or "profiled:<events file>".
    """

    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    boundary_bytes: tuple[int, ...]
    activation_bytes: tuple[int, ...]
    grad_bytes: tuple[int, ...]
    param_count: tuple[int, ...]
    optimizer_s: float = 0.0
    overhead_s: float = 0.0
    source: str = "analytic"

    @property
    def num_stages(self) -> int:
        return len(self.forward_s)

    def duration(self, action: Action, speed: float = 1.0) -> float:
        """Seconds of a compute action on a node of relative ``speed`` (communication: 0).

        Args:
            action: A schedule action (``F``, ``R`` and ``B`` cost time; others 0).
            speed: Relative node speed (1.0 = nominal; 0.5 takes twice as long).

        Returns:
            Seconds.
        """
        if action.op is Op.F or action.op is Op.R:  # a recompute is the forward once more
            return self.forward_s[action.stage] / speed
        if action.op is Op.B:
            return self.backward_s[action.stage] / speed
        return 0.0

    def message_bytes(self, action: Action) -> int:
        """Bytes a communication action moves: the hidden state at the boundary it crosses.

        Args:
            action: A schedule action.

        Returns:
            Bytes; 0 for a compute action. A boundary of 0 bytes (the last stage) counts as the largest
            boundary.
        """
        if not action.op.is_comm:
            return 0
        assert action.peer is not None
        # The forward sender of this boundary: the sending stage for SEND_F, the peer for RECV_F,
        # and for gradients the stage that receives them (RECV_B) / the peer of SEND_B.
        sender = action.stage if action.op in (Op.SEND_F, Op.RECV_B) else action.peer
        nbytes = self.boundary_bytes[sender]
        return nbytes if nbytes > 0 else max(self.boundary_bytes)

    def scaled(self, factor: float, source: str | None = None) -> CostModel:
        """Compute times (and optimizer time) multiplied by ``factor``.

        Args:
            factor: Multiplier of every compute time (> 0).
            source: New :attr:`source`; ``None`` keeps it.

        Returns:
            A new cost model.
        """
        return replace(
            self,
            forward_s=tuple(t * factor for t in self.forward_s),
            backward_s=tuple(t * factor for t in self.backward_s),
            optimizer_s=self.optimizer_s * factor,
            source=self.source if source is None else source,
        )

    def with_overhead(self, overhead_s: float) -> CostModel:
        """The same model with a fixed per-iteration overhead.

        Args:
            overhead_s: Seconds per iteration.

        Returns:
            A new cost model.
        """
        return replace(self, overhead_s=overhead_s)


def analytic_cost(cfg: JobConfig) -> CostModel:
    """Cost model from model shapes and ``sim.device_tflops`` / ``sim.backward_ratio``.

    Forward seconds per stage are the chunk's forward FLOPs for one microbatch over
    ``sim.device_tflops x 1e12`` FLOP/s (PaLM FLOP accounting, :mod:`spotpipe.model.partition`);
    backward is ``sim.backward_ratio`` times that.

    Args:
        cfg: The job.

    Returns:
        The cost model, ``source = "analytic"``.

    Raises:
        ConfigError: if the model cannot be cut into the schedule's chunks.
    """
    shapes = model_shapes(cfg.model, num_chunks(cfg))
    seqs = sequences_per_microbatch(cfg)
    tokens = seqs * cfg.model.context
    flops_per_s = cfg.sim.device_tflops * 1e12
    forward = tuple(s.forward_flops_per_token * tokens / flops_per_s for s in shapes)
    return CostModel(
        forward_s=forward,
        backward_s=tuple(t * cfg.sim.backward_ratio for t in forward),
        boundary_bytes=tuple(s.boundary_bytes_per_sequence * seqs for s in shapes),
        activation_bytes=tuple(s.activation_bytes_per_sequence * seqs for s in shapes),
        grad_bytes=tuple(s.param_bytes for s in shapes),
        param_count=tuple(s.params for s in shapes),
        optimizer_s=cfg.sim.optimizer_s,
    )


# ----------------------------------------------------------------------------------------------
# Profiled cost


@dataclass(frozen=True)
class RunProfile:
    """What a short runtime run measured.

    Attributes:
        config: The run's resolved config (from its ``run_start`` event).
        step_times: ``step_time`` of every ``step`` event, in order.
        skip: Leading steps left out as warm-up.
        source: The events file.
        compute_times: ``compute_s`` of every step (the slowest worker's forward/backward and
            all-reduce phase, measured by the runtime), or empty when the run did not record it.
    """

    config: JobConfig
    step_times: tuple[float, ...]
    skip: int
    source: str
    compute_times: tuple[float, ...] = ()

    @property
    def overhead_s(self) -> float | None:
        """Time of a step outside its compute phase (optimizer, report, commit): trimmed mean of
        ``step_time - compute_s`` after warm-up, or None without ``compute_s``."""
        if len(self.compute_times) != len(self.step_times):
            return None
        diffs = [s - c for s, c in zip(self.step_times[self.skip :], self.compute_times[self.skip :])]
        return max(0.0, trimmed_mean(diffs))

    @property
    def step_time(self) -> float:
        """Step time after warm-up: the mean of the middle half (a 25% trimmed mean).

        Trimming drops steps slowed by something else on the machine; averaging (rather than a
        median) keeps the runtime's poll quantisation small: the controller stamps a step when
        it sees its commit, so one ``step_time`` is off by up to a poll interval, and those
        errors cancel between neighbouring steps.
        """
        return trimmed_mean(self.step_times[self.skip :])


def trimmed_mean(values: Sequence[float], trim: float = 0.25) -> float:
    """Mean of ``values`` without the ``trim`` share of smallest and of largest ones.

    Args:
        values: Samples (e.g. step times in seconds), not empty.
        trim: Share cut at each end, in [0, 0.5).

    Returns:
        The trimmed mean; the plain mean when trimming would leave nothing.
    """
    ordered = sorted(values)
    k = int(len(ordered) * trim)
    kept = ordered[k : len(ordered) - k] or ordered
    return sum(kept) / len(kept)


def read_profile(path: str | Path, skip: int | None = None) -> RunProfile:
    """Read a runtime ``events.jsonl``: its config and the step times.

    Args:
        path: The events file.
        skip: Warm-up steps to leave out; default 2 when the run has at least 5 steps, 1 when it
            has 3 or 4 (the first step includes start-up).

    Returns:
        A :class:`RunProfile` with the run's config and step times (seconds).

    Raises:
        SpotpipeError: the file is missing, has no ``run_start`` with a config, or no steps.
    """
    if not Path(path).is_file():
        raise SpotpipeError(f"sim.profile: events file {path} does not exist (give the events.jsonl of a spotpipe train run)")
    config: Mapping[str, Any] | None = None
    times: list[float] = []
    compute: list[float] = []
    for record in iter_events(path):
        if record["event"] == RUN_START and config is None:
            config = record.get("config")
        elif record["event"] == STEP and isinstance(record.get("step_time"), (int, float)):
            times.append(float(record["step_time"]))
            if isinstance(record.get("compute_s"), (int, float)):
                compute.append(float(record["compute_s"]))
    if not isinstance(config, Mapping):
        raise SpotpipeError(f"sim.profile: {path} has no run_start event with a config")
    if not times:
        raise SpotpipeError(f"sim.profile: {path} has no step events with step_time")
    known = {k: v for k, v in config.items() if isinstance(v, Mapping)}
    try:
        cfg = config_from_mapping(_known_keys(known), where=f"{path} run_start config")
    except ConfigError as exc:
        raise SpotpipeError(f"sim.profile: {exc}") from None
    if skip is None:
        skip = 2 if len(times) >= 5 else 1 if len(times) >= 3 else 0
    if skip >= len(times):
        raise SpotpipeError(f"sim.profile: {path} has {len(times)} steps; need more than the {skip} warm-up steps")
    return RunProfile(cfg, tuple(times), skip, str(path), tuple(compute) if len(compute) == len(times) else ())


def _known_keys(config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Drop sections/keys this version does not know (a run from a newer or older spotpipe)."""
    hints = typing.get_type_hints(JobConfig)
    out: dict[str, dict[str, Any]] = {}
    for section, table in config.items():
        if section not in hints:
            continue
        keys = {f.name for f in dataclasses.fields(hints[section])}
        out[section] = {k: v for k, v in table.items() if k in keys}
    return out


def calibrate_scale(
    measured_s: float,
    simulate: Callable[[float], float],
    rel_tol: float = 1e-4,
    max_iter: int = 100,
) -> float:
    """Factor ``f`` with ``simulate(f) == measured_s`` for a non-decreasing ``simulate``.

    ``simulate(f)`` plays the profiled run with every compute time multiplied by ``f``. It grows
    with ``f`` (compute only ever lengthens the critical path), so bisection on ``log f`` finds the
    factor. Raises SpotpipeError when even ``f -> 0`` is slower than measured (communication
    alone explains more than the measured time: the network settings disagree with the run).

    Args:
        measured_s: The measured step time, seconds, > 0.
        simulate: Simulated step time (seconds) as a function of the compute factor.
        rel_tol: Relative width of the final bracket.
        max_iter: Most bisection steps.

    Returns:
        The factor, the middle of the final bracket.

    Raises:
        SpotpipeError: if ``measured_s <= 0``, communication alone is slower than ``measured_s``,
            or the simulated time does not reach ``measured_s`` for any factor up to 1e15.
    """
    if measured_s <= 0:
        raise SpotpipeError(f"sim.profile: measured step time must be > 0, got {measured_s}")
    lo, hi = 1e-12, 1.0
    if simulate(lo) > measured_s * (1 + rel_tol):
        raise SpotpipeError(
            f"sim.profile: the run's measured step time {measured_s:.4g} s is shorter than its simulated "
            f"communication alone ({simulate(lo):.4g} s); check network settings against the profiled run"
        )
    while simulate(hi) < measured_s:
        hi *= 4.0
        if hi > 1e15:
            raise SpotpipeError("sim.profile: cannot calibrate compute scale (simulated time does not grow)")
    for _ in range(max_iter):
        mid = (lo * hi) ** 0.5
        if simulate(mid) < measured_s:
            lo = mid
        else:
            hi = mid
        if hi - lo <= rel_tol * hi:
            break
    return (lo + hi) / 2


def _golden_log(error: Callable[[float], float], lower: float, upper: float, rel_tol: float) -> float:
    """The ``f`` in ``[lower, upper]`` minimising a unimodal ``error(f)``, searching on ``log f``."""
    golden = (math.sqrt(5) - 1) / 2
    a, b = math.log(lower), math.log(upper)
    x1, x2 = b - golden * (b - a), a + golden * (b - a)
    f1, f2 = error(math.exp(x1)), error(math.exp(x2))
    while b - a > rel_tol:
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - golden * (b - a)
            f1 = error(math.exp(x1))
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + golden * (b - a)
            f2 = error(math.exp(x2))
    return math.exp((a + b) / 2)


def fit_scale_and_overhead(
    measured_s: Sequence[float],
    simulate: Callable[[float], Sequence[float]],
    overhead_s: float | None = None,
    rel_tol: float = 1e-5,
) -> tuple[float, float]:
    """Compute factor ``f`` and per-iteration overhead ``c`` that best explain the profiled runs.

    ``simulate(f)`` plays every profiled run with compute times multiplied by ``f`` (overhead 0).

    * ``overhead_s`` known (the runtime measured it, :attr:`RunProfile.overhead_s`): ``c`` is
      that, and ``f`` minimises ``sum_i (measured_i - c - simulate(f)_i)^2``.
    * Unknown, and runs that differ in work per step (microbatches, stages): ``c`` is the mean
      residual (clamped at 0) and ``f`` minimises the remaining squared error; this separates
      time that scales with compute from time that does not (optimizer step, commit, barrier).
    * Unknown, one run (or repeats of one job): ``c = 0`` and ``f`` from :func:`calibrate_scale`.

    Args:
        measured_s: Measured step time of every profiled run, seconds.
        simulate: Simulated step time of every run (seconds, same order) as a function of the
            compute factor.
        overhead_s: The measured per-iteration overhead in seconds, or ``None`` to fit it.
        rel_tol: Relative tolerance of the golden-section search on ``log f``.

    Returns:
        ``(f, c)``: the compute factor and the overhead in seconds.

    Raises:
        SpotpipeError: from :func:`calibrate_scale`, when no factor explains the runs.
    """
    n = len(measured_s)
    unit = simulate(1.0)
    same_job = max(unit) - min(unit) <= 1e-9 * max(unit)
    c_known = overhead_s if overhead_s is not None else 0.0
    if n == 1 or same_job:
        mean = sum(measured_s) / n - c_known
        return calibrate_scale(mean, lambda f: simulate(f)[0]), c_known

    def residuals(f: float) -> tuple[float, float]:
        sims = simulate(f)
        c = overhead_s if overhead_s is not None else max(0.0, sum(m - s for m, s in zip(measured_s, sims)) / n)
        return sum((m - s - c) ** 2 for m, s in zip(measured_s, sims)), c

    upper = calibrate_scale(max(1e-9, min(measured_s) - c_known), lambda f: min(simulate(f))) * 1.5
    factor = _golden_log(lambda f: residuals(f)[0], upper / 1e3, upper, rel_tol)
    return factor, residuals(factor)[1]


def speeds_per_node(factors: Sequence[float], ranks: int, num_nodes: int) -> tuple[float, ...]:
    """Relative speed of every node from ``sim.speed_factors``: empty = all 1.0; one per rank
    (node ``n`` is rank ``n % ranks``) or one per node.

    Args:
        factors: ``sim.speed_factors`` (relative speeds, 1.0 = nominal).
        ranks: Pipeline ranks.
        num_nodes: Nodes of the job (ranks x replicas, with spares).

    Returns:
        One speed per node.

    Raises:
        ConfigError: if ``factors`` has neither ``ranks`` nor ``num_nodes`` entries.
    """
    if not factors:
        return (1.0,) * num_nodes
    if len(factors) == num_nodes:
        return tuple(float(f) for f in factors)
    if len(factors) == ranks:
        return tuple(float(factors[n % ranks]) for n in range(num_nodes))
    raise ConfigError(
        f"sim.speed_factors has {len(factors)} entries; expected {ranks} (one per pipeline rank)"
        + (f" or {num_nodes} (one per node)" if num_nodes != ranks else "")
    )
