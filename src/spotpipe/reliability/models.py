"""Closed-form reliability models: MTTF, expected ETTR, the best checkpoint interval.

Symbols (seconds unless stated): ``N`` nodes, ``r_f`` failures per 1000 node-days, failure rate
of the job ``lam = N * r_f / (1000 * 86400)``, checkpoint interval ``dt`` (compute between two
checkpoints), checkpoint write time ``w``, restart overhead ``u0`` (detect, reschedule, reload),
step time ``s``, checkpoint-free recovery time ``r``.

Sources:
    * Kokolis et al., "Revisiting Reliability in Large-Scale Machine Learning Research Clusters"
      (Meta, 2025): ``MTTF = 1 / (N * r_f)`` and the first-order expected effective training time
      ratio ``E[ETTR] ~= (1 - N r_f (u0 + dt/2)) / (1 + w/dt)``.
    * J. W. Young, "A first order approximation to the optimum checkpoint interval", CACM 1974:
      ``dt* = sqrt(2 w M)``.
    * J. T. Daly, "A higher order estimate of the optimum checkpoint interval for restart dumps",
      FGCS 2006: the higher-order optimum and the exact renewal expression for exponential
      failures, ``E[T] = M e^{u0/M} (e^{(dt+w)/M} - 1)`` per ``dt`` of work.
    * Blagoev, Ersoy, Chen, "CheckFree" (2025): recovery without checkpoints, where a failure costs
      the recovery time and the step in flight but no progress since a checkpoint.

The first-order formulas hold while ``lam * (u0 + dt/2)`` is small (a few percent); the exact
renewal forms hold for exponential failures at any rate. :func:`model_load` gives the quantity to
check, and :mod:`spotpipe.reliability.montecarlo` measures where the first-order form breaks.
:func:`make_plan` evaluates them all for one job; :func:`render_plan` and :func:`plan_to_json`
are the plan's text and JSON forms (the CLI and the HTML report both use them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from spotpipe.errors import SpotpipeError
from spotpipe.reliability.units import SECONDS_PER_HOUR, format_duration, rate_per_second

# Above this value of lam * (u0 + dt/2) the first-order model is flagged as outside its validity.
FIRST_ORDER_LIMIT = 0.1
_EXP_LIMIT = 700.0  # exp() of more overflows a float; there expm1(x) = exp(x) to machine precision


def _ratio_over_expm1(scale: float, x: float) -> float:
    """``scale / (e^x - 1)`` for ``x > 0`` without overflow (0 where it underflows)."""
    if x <= _EXP_LIMIT:
        return scale / math.expm1(x)
    if scale <= 0:
        return 0.0
    log = math.log(scale) - x
    return math.exp(log) if log > -745.0 else 0.0


def _positive(value: float, what: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise SpotpipeError(f"{what} must be > 0, got {value!r}")
    return value


def _non_negative(value: float, what: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise SpotpipeError(f"{what} must be >= 0, got {value!r}")
    return value


def mttf_hours(nodes: float, rf: float) -> float:
    """MTTF of a job on ``nodes`` nodes: ``1000 days / (N * r_f)``, in hours (Kokolis et al. 2025).

    Example: 16,384 GPUs at 8 per node are 2,048 nodes; at ``r_f = 6.5`` the MTTF is 1.80 h.

    Args:
        nodes: Nodes N of the job (> 0; may be fractional: GPUs / GPUs per node).
        rf: Failures per 1000 node-days (``r_f``).

    Returns:
        The MTTF in hours.

    Raises:
        SpotpipeError: if ``nodes`` or ``rf`` is not > 0.
    """
    _positive(nodes, "nodes")
    _positive(rf, "r_f (failures per 1000 node-days)")
    return 1.0 / rate_per_second(nodes, rf) / SECONDS_PER_HOUR


def model_load(nodes: float, rf: float, interval_s: float, restart_s: float) -> float:
    """``N r_f (u0 + dt/2)``: expected failures in one restart plus half an interval.

    The first-order ETTR model (Kokolis et al. 2025) drops terms of order ``load**2``; it is
    accurate to about ``load**2 / 2`` and meaningless once ``load`` nears 1.

    Args:
        nodes: Nodes N.
        rf: Failures per 1000 node-days (``r_f``).
        interval_s: Checkpoint interval ``dt``, seconds.
        restart_s: Restart overhead ``u0``, seconds.

    Returns:
        The dimensionless load ``N r_f (u0 + dt/2)``.
    """
    return rate_per_second(nodes, rf) * (restart_s + interval_s / 2.0)


def ettr_checkpoint(
    interval_s: float, write_s: float, restart_s: float, nodes: float, rf: float
) -> float:
    """Meta's first-order expected ETTR with checkpoint/restart (Kokolis et al. 2025).

    ``E[ETTR] ~= (1 - N r_f (u0 + dt/2)) / (1 + w/dt)``, clipped at 0 where the first-order
    form would go negative (there the job makes almost no progress; use
    :func:`ettr_checkpoint_exact` or the Monte Carlo instead).

    Args:
        interval_s: Checkpoint interval ``dt``, seconds (> 0).
        write_s: Checkpoint write time ``w``, seconds (>= 0).
        restart_s: Restart overhead ``u0``, seconds (>= 0).
        nodes: Nodes N.
        rf: Failures per 1000 node-days (``r_f``).

    Returns:
        Expected ETTR in [0, 1].

    Raises:
        SpotpipeError: for a non-positive interval or a negative write or restart time.
    """
    _positive(interval_s, "checkpoint interval")
    _non_negative(write_s, "checkpoint write time")
    _non_negative(restart_s, "restart time")
    load = model_load(nodes, rf, interval_s, restart_s)
    return max(0.0, (1.0 - load) / (1.0 + write_s / interval_s))


def ettr_checkpoint_exact(
    interval_s: float, write_s: float, restart_s: float, rate_per_s: float
) -> float:
    """Exact long-run ETTR with checkpoint/restart under exponential failures (Daly 2006).

    Each inter-failure gap starts with a restart of ``u0`` (a failure during it starts it again),
    then cycles of ``dt`` compute and ``w`` write; a failure loses the unfinished cycle. Renewal
    reward: ``ETTR = lam dt e^{-lam u0} / (e^{lam (dt + w)} - 1)``.

    Args:
        interval_s: Checkpoint interval ``dt``, seconds (> 0).
        write_s: Checkpoint write time ``w``, seconds.
        restart_s: Restart overhead ``u0``, seconds.
        rate_per_s: Failure rate ``lam`` of the job, per second (<= 0: no failures).

    Returns:
        Long-run ETTR in [0, 1] (``dt / (dt + w)`` without failures).

    Raises:
        SpotpipeError: for a non-positive interval.
    """
    _positive(interval_s, "checkpoint interval")
    if rate_per_s <= 0:
        return interval_s / (interval_s + write_s)
    cycle = interval_s + write_s
    return _ratio_over_expm1(rate_per_s * interval_s, rate_per_s * cycle) * math.exp(-rate_per_s * restart_s)


def young_interval(write_s: float, mttf_s: float) -> float:
    """Young's first-order optimal checkpoint interval ``sqrt(2 w M)`` (Young 1974).

    Args:
        write_s: Checkpoint write time ``w``, seconds (>= 0).
        mttf_s: MTTF ``M``, seconds (> 0).

    Returns:
        The interval in seconds.

    Raises:
        SpotpipeError: for a negative ``write_s`` or a non-positive ``mttf_s``.
    """
    return math.sqrt(2.0 * _non_negative(write_s, "checkpoint write time") * _positive(mttf_s, "MTTF"))


def daly_interval(write_s: float, mttf_s: float) -> float:
    """Daly's higher-order optimal interval (Daly 2006, eq. 37).

    ``sqrt(2 w M) [1 + sqrt(w/(2M))/3 + (w/(2M))/9] - w`` for ``w < 2M``, else ``M``.

    Args:
        write_s: Checkpoint write time ``w``, seconds (>= 0).
        mttf_s: MTTF ``M``, seconds (> 0).

    Returns:
        The interval in seconds.

    Raises:
        SpotpipeError: for a negative ``write_s`` or a non-positive ``mttf_s``.
    """
    _non_negative(write_s, "checkpoint write time")
    _positive(mttf_s, "MTTF")
    if write_s >= 2.0 * mttf_s:
        return mttf_s
    ratio = write_s / (2.0 * mttf_s)
    return math.sqrt(2.0 * write_s * mttf_s) * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - write_s


def optimal_interval(write_s: float, restart_s: float, nodes: float, rf: float) -> float | None:
    """The interval that maximises Meta's first-order ETTR, in closed form.

    Setting the derivative of ``(1 - lam u0 - lam dt/2) dt / (dt + w)`` to zero gives
    ``lam dt^2 + 2 lam w dt - 2 (1 - lam u0) w = 0``, so
    ``dt* = -w + sqrt(w^2 + 2 (1 - lam u0) w / lam)``; for small ``w`` this is Young's
    ``sqrt(2 w M)``. Returns ``None`` when ``lam u0 >= 1`` (the restart alone outlasts the MTTF)
    or ``w == 0`` (checkpoints are free: any interval down to one step is best).

    Args:
        write_s: Checkpoint write time ``w``, seconds (>= 0).
        restart_s: Restart overhead ``u0``, seconds (>= 0).
        nodes: Nodes N (> 0).
        rf: Failures per 1000 node-days (``r_f``) (> 0).

    Returns:
        ``dt*`` in seconds, or ``None`` (see above).

    Raises:
        SpotpipeError: for non-positive ``nodes`` or ``rf``, or a negative time.
    """
    lam = rate_per_second(_positive(nodes, "nodes"), _positive(rf, "r_f"))
    a = 1.0 - lam * _non_negative(restart_s, "restart time")
    if a <= 0 or _non_negative(write_s, "checkpoint write time") == 0:
        return None
    return -write_s + math.sqrt(write_s * write_s + 2.0 * a * write_s / lam)


def optimal_interval_exact(write_s: float, restart_s: float, rate_per_s: float) -> float | None:
    """The interval that maximises :func:`ettr_checkpoint_exact` (golden-section search).

    The exact renewal ETTR (Daly 2006) is unimodal in ``dt``; it is searched on a log scale
    between a millisecond and a hundred MTTFs. ``None`` when ``w == 0`` (no interior optimum).

    Args:
        write_s: Checkpoint write time ``w``, seconds (>= 0).
        restart_s: Restart overhead ``u0``, seconds.
        rate_per_s: Failure rate ``lam`` of the job, per second (<= 0: ``None``).

    Returns:
        ``dt*`` in seconds, or ``None``.

    Raises:
        SpotpipeError: for a negative ``write_s``.
    """
    if _non_negative(write_s, "checkpoint write time") == 0 or rate_per_s <= 0:
        return None
    lo, hi = math.log(1e-3), math.log(100.0 / rate_per_s)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def f(log_dt: float) -> float:
        return ettr_checkpoint_exact(math.exp(log_dt), write_s, restart_s, rate_per_s)

    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(200):
        if hi - lo < 1e-9:
            break
        if fa < fb:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
        else:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = f(a)
    return math.exp(0.5 * (lo + hi))


def ettr_checkpoint_free(
    recovery_s: float, nodes: float, rf: float, step_s: float = 0.0, penalty_s: float = 0.0
) -> float:
    """First-order ETTR with checkpoint-free recovery (CheckFree, Blagoev et al. 2025).

    No checkpoints are written and a failure loses no committed progress: it costs the recovery
    time ``r``, on average half a step (the step in flight is discarded and replayed), and
    ``penalty_s`` of progress-equivalent (e.g. extra steps to recover quality after a stage is
    rebuilt from its neighbours). ``E[ETTR] ~= 1 - lam (r + s/2 + p)``, clipped at 0.

    Args:
        recovery_s: Recovery time ``r`` of one failure, seconds (>= 0).
        nodes: Nodes N.
        rf: Failures per 1000 node-days (``r_f``).
        step_s: Step time ``s``, seconds (>= 0).
        penalty_s: Progress lost per failure beyond the step, seconds (>= 0).

    Returns:
        Expected ETTR in [0, 1].

    Raises:
        SpotpipeError: for a negative time.
    """
    lam = rate_per_second(nodes, rf)
    cost = _non_negative(recovery_s, "recovery time") + _non_negative(step_s, "step time") / 2.0
    return max(0.0, 1.0 - lam * (cost + _non_negative(penalty_s, "penalty")))


def ettr_checkpoint_free_exact(
    recovery_s: float, rate_per_s: float, step_s: float = 0.0, penalty_s: float = 0.0
) -> float:
    """Exact long-run ETTR of checkpoint-free recovery under exponential failures.

    Renewal reward with gaps ``g ~ Exp(lam)``: progress ``s * floor((g - r)/s)`` for ``g > r``,
    so ``ETTR = lam s e^{-lam r} / (e^{lam s} - 1) - lam p`` (``e^{-lam r} - lam p`` as
    ``s -> 0``).

    Args:
        recovery_s: Recovery time ``r`` of one failure, seconds.
        rate_per_s: Failure rate ``lam`` of the job, per second (<= 0: ETTR 1).
        step_s: Step time ``s``, seconds (0: continuous progress).
        penalty_s: Progress lost per failure beyond the step, seconds.

    Returns:
        Long-run ETTR in [0, 1].
    """
    if rate_per_s <= 0:
        return 1.0
    base = math.exp(-rate_per_s * recovery_s)
    if step_s > 0:
        base *= _ratio_over_expm1(rate_per_s * step_s, rate_per_s * step_s)
    return max(0.0, base - rate_per_s * penalty_s)


@dataclass(frozen=True)
class Plan:
    """Answers of ``spotpipe reliability plan`` for one job size (all times in seconds)."""

    gpus: int
    gpus_per_node: int
    nodes: float
    rf: float
    mttf_hours: float
    failures_per_day: float
    write_s: float
    restart_s: float
    interval_s: float
    ettr_at_interval: float
    ettr_at_interval_exact: float
    model_load: float
    best_interval_s: float | None
    best_ettr: float | None
    best_interval_exact_s: float | None
    best_ettr_exact: float | None
    young_interval_s: float
    daly_interval_s: float
    recovery_s: float
    step_s: float
    penalty_s: float
    ettr_checkpoint_free: float
    ettr_checkpoint_free_exact: float

    @property
    def first_order_valid(self) -> bool:
        """Whether ``N r_f (u0 + dt/2)`` is small enough for the first-order model."""
        return self.model_load <= FIRST_ORDER_LIMIT


def make_plan(
    gpus: int,
    gpus_per_node: int,
    rf: float,
    write_s: float,
    restart_s: float,
    interval_s: float,
    recovery_s: float,
    step_s: float = 0.0,
    penalty_s: float = 0.0,
) -> Plan:
    """Evaluate every closed form for one job; see the module docstring for the sources.

    Args:
        gpus: GPUs of the job (> 0).
        gpus_per_node: GPUs per node (> 0); nodes N = gpus / gpus_per_node.
        rf: Failures per 1000 node-days (``r_f``) (> 0).
        write_s: Checkpoint write time ``w``, seconds.
        restart_s: Restart overhead ``u0``, seconds.
        interval_s: Checkpoint interval ``dt`` to evaluate, seconds.
        recovery_s: Checkpoint-free recovery time ``r``, seconds.
        step_s: Step time ``s``, seconds.
        penalty_s: Checkpoint-free progress lost per failure, seconds.

    Returns:
        The :class:`Plan`: MTTF, ETTR at ``interval_s`` (first order and exact), the Young, Daly and
        best intervals, and checkpoint-free ETTR.

    Raises:
        SpotpipeError: for non-positive ``gpus``, ``gpus_per_node``, ``rf`` or interval, or a negative time.
    """
    if gpus <= 0:
        raise SpotpipeError(f"--gpus must be > 0, got {gpus}")
    if gpus_per_node <= 0:
        raise SpotpipeError(f"--gpus-per-node must be > 0, got {gpus_per_node}")
    nodes = gpus / gpus_per_node
    lam = rate_per_second(nodes, _positive(rf, "--rf (failures per 1000 node-days)"))
    mttf_s = 1.0 / lam
    best = optimal_interval(write_s, restart_s, nodes, rf)
    best_exact = optimal_interval_exact(write_s, restart_s, lam)
    return Plan(
        gpus=gpus,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        rf=rf,
        mttf_hours=mttf_s / SECONDS_PER_HOUR,
        failures_per_day=lam * 86400.0,
        write_s=write_s,
        restart_s=restart_s,
        interval_s=interval_s,
        ettr_at_interval=ettr_checkpoint(interval_s, write_s, restart_s, nodes, rf),
        ettr_at_interval_exact=ettr_checkpoint_exact(interval_s, write_s, restart_s, lam),
        model_load=model_load(nodes, rf, interval_s, restart_s),
        best_interval_s=best,
        best_ettr=None if best is None else ettr_checkpoint(best, write_s, restart_s, nodes, rf),
        best_interval_exact_s=best_exact,
        best_ettr_exact=None if best_exact is None else ettr_checkpoint_exact(best_exact, write_s, restart_s, lam),
        young_interval_s=young_interval(write_s, mttf_s),
        daly_interval_s=daly_interval(write_s, mttf_s),
        recovery_s=recovery_s,
        step_s=step_s,
        penalty_s=penalty_s,
        ettr_checkpoint_free=ettr_checkpoint_free(recovery_s, nodes, rf, step_s, penalty_s),
        ettr_checkpoint_free_exact=ettr_checkpoint_free_exact(recovery_s, lam, step_s, penalty_s),
    )


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The ``--json`` form of a plan (stable keys; ``mttf_hours`` among them).

    Args:
        plan: From :func:`make_plan`.

    Returns:
        The plan's fields (seconds and hours as named) plus ``first_order_valid``.
    """
    out = dict(plan.__dict__)
    out["first_order_valid"] = plan.first_order_valid
    return out


def render_plan(plan: Plan) -> str:
    """Text form of a plan, as ``spotpipe reliability plan`` prints it and the HTML report shows it.

    Args:
        plan: From :func:`make_plan`.

    Returns:
        The text, lines joined by newlines.
    """
    fd = format_duration
    lines = [
        f"job: {plan.gpus} GPUs = {plan.nodes:g} nodes x {plan.gpus_per_node} GPUs; "
        f"r_f {plan.rf:g} failures per 1000 node-days",
        f"MTTF: {plan.mttf_hours:.3g} h ({plan.failures_per_day:.3g} failures per day)",
        f"checkpoint/restart (write w {fd(plan.write_s)}, restart u0 {fd(plan.restart_s)}):",
        f"  at interval {fd(plan.interval_s)}: ETTR {plan.ettr_at_interval:.4f} (first order, Meta); "
        f"{plan.ettr_at_interval_exact:.4f} exact for exponential failures",
    ]
    if not plan.first_order_valid:
        lines.append(
            f"  note: N r_f (u0 + dt/2) = {plan.model_load:.3g} > {FIRST_ORDER_LIMIT}: failures are frequent "
            "relative to the interval; trust the exact figure (or `simulate`), not the first-order one"
        )
    if plan.best_interval_s is None or plan.best_ettr is None:
        lines.append("  best interval: none (zero write time, or the restart alone outlasts the MTTF)")
    else:
        lines.append(
            f"  best interval {fd(plan.best_interval_s)} (Young {fd(plan.young_interval_s)}, "
            f"Daly {fd(plan.daly_interval_s)}): ETTR {plan.best_ettr:.4f} (first order)"
        )
    if plan.best_interval_exact_s is not None and plan.best_ettr_exact is not None:
        lines.append(
            f"  best interval, exact form: {fd(plan.best_interval_exact_s)}: ETTR {plan.best_ettr_exact:.4f}"
        )
    lines.append(
        f"checkpoint-free (recovery {fd(plan.recovery_s)}, step {fd(plan.step_s)}, penalty "
        f"{fd(plan.penalty_s)}): ETTR {plan.ettr_checkpoint_free:.4f} (exact {plan.ettr_checkpoint_free_exact:.4f})"
    )
    return "\n".join(lines)
