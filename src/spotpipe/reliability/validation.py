"""Where does the closed form hold? Monte Carlo against the ETTR formulas over a grid.

Meta's first-order model (Kokolis et al. 2025), ``E[ETTR] ~= (1 - N r_f (u0 + dt/2)) /
(1 + w/dt)``, drops every term of second order in the expected number of failures during a
restart plus half an interval, ``load = N r_f (u0 + dt/2)``. It should agree with a simulation
while ``load`` is small and drift below it as failures become frequent relative to ``dt`` and
``u0``: it charges each failure ``u0 + dt/2`` once, while in reality failures also strike during
restarts and during the redone work, and the job spends a larger share of its life in short
gaps. Daly's exact renewal form (2006) keeps agreeing at any load for exponential failures. This
module runs :func:`~spotpipe.reliability.montecarlo.simulate` at each grid point and reports
both errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import product

from spotpipe.reliability.models import (
    FIRST_ORDER_LIMIT,
    ettr_checkpoint,
    ettr_checkpoint_exact,
    model_load,
)
from spotpipe.reliability.montecarlo import CheckpointRestart, Exponential, simulate
from spotpipe.reliability.units import SECONDS_PER_DAY, rate_per_second

DEFAULT_NODES: tuple[int, ...] = (128, 512, 2048, 8192)
DEFAULT_INTERVALS_S: tuple[float, ...] = (300.0, 900.0, 3600.0, 10800.0)
DEFAULT_WRITES_S: tuple[float, ...] = (10.0, 60.0, 300.0)
DEFAULT_RESTARTS_S: tuple[float, ...] = (60.0, 600.0)


@dataclass(frozen=True)
class GridPoint:
    """One (N, dt, w, u0) point: the closed forms and the simulated ETTR."""

    nodes: int
    rf: float
    interval_s: float
    write_s: float
    restart_s: float
    load: float
    first_order: float
    exact: float
    mc: float
    mc_half_width: float

    @property
    def error_first_order(self) -> float:
        """``|first-order - MC| / MC`` (1.0 when the simulated job makes no progress)."""
        return abs(self.first_order - self.mc) / self.mc if self.mc > 0 else 1.0

    @property
    def error_exact(self) -> float:
        return abs(self.exact - self.mc) / self.mc if self.mc > 0 else 1.0


def default_grid() -> list[tuple[int, float, float, float]]:
    """Every combination of the default nodes, intervals, write and restart times."""
    return list(product(DEFAULT_NODES, DEFAULT_INTERVALS_S, DEFAULT_WRITES_S, DEFAULT_RESTARTS_S))


def compare_grid(
    points: Iterable[tuple[int, float, float, float]],
    rf: float = 6.5,
    wall_s: float = 30 * SECONDS_PER_DAY,
    trials: int = 48,
    step_s: float = 10.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[GridPoint]:
    """Simulate each (nodes, interval, write, restart) point with exponential failures.

    ``progress``, if given, is called with the number of points done after each point.

    Args:
        points: ``(nodes, interval_s, write_s, restart_s)`` tuples, times in seconds.
        rf: Failures per 1000 node-days (``r_f``).
        wall_s: Wall time of each simulated job, seconds.
        trials: Jobs per point.
        step_s: Step time, seconds.
        seed: Seed of the first point (point ``k`` uses ``seed + k``).
        progress: Called with the number of points done.

    Returns:
        One :class:`GridPoint` per point: Monte Carlo ETTR next to the first-order and exact forms.
    """
    out: list[GridPoint] = []
    for k, (nodes, interval, write, restart) in enumerate(points):
        lam = rate_per_second(nodes, rf)
        result = simulate(
            Exponential(1.0 / lam),
            CheckpointRestart(interval, write, restart),
            wall_s=wall_s,
            step_s=step_s,
            trials=trials,
            seed=seed + k,
        )
        out.append(
            GridPoint(
                nodes=nodes,
                rf=rf,
                interval_s=interval,
                write_s=write,
                restart_s=restart,
                load=model_load(nodes, rf, interval, restart),
                first_order=ettr_checkpoint(interval, write, restart, nodes, rf),
                exact=ettr_checkpoint_exact(interval, write, restart, lam),
                mc=result.ettr_mean,
                mc_half_width=(result.ettr_ci95[1] - result.ettr_ci95[0]) / 2.0,
            )
        )
        if progress is not None:
            progress(k + 1)
    return out


@dataclass(frozen=True)
class GridSummary:
    """Largest errors inside and outside the first-order model's validity region."""

    limit: float
    points: int
    valid_points: int
    max_error_valid: float
    max_error_exact: float
    smallest_load_over_3pct: float | None


def summarize(points: list[GridPoint], limit: float = FIRST_ORDER_LIMIT) -> GridSummary:
    """Max first-order error where ``load <= limit``; the smallest load where it exceeds 3%.

    Args:
        points: From :func:`compare_grid`.
        limit: Largest load ``N r_f (u0 + dt/2)`` counted as inside the first-order form's range.

    Returns:
        The :class:`GridSummary`.
    """
    valid = [p for p in points if p.load <= limit]
    over = [p.load for p in points if p.error_first_order > 0.03]
    return GridSummary(
        limit=limit,
        points=len(points),
        valid_points=len(valid),
        max_error_valid=max((p.error_first_order for p in valid), default=0.0),
        max_error_exact=max((p.error_exact for p in points if p.mc > 0.05), default=0.0),
        smallest_load_over_3pct=min(over) if over else None,
    )
