"""Units shared by the reliability code: durations on the command line, failure rates, wording.

Failure rates follow Kokolis et al., "Revisiting Reliability in Large-Scale Machine Learning
Research Clusters" (Meta, 2025): ``r_f`` is failures per 1000 node-days, so a job on ``N``
nodes fails at ``N * r_f / 1000`` per day and its mean time to failure is ``1000 / (N * r_f)``
days. Everything inside the package works in seconds; hours and days appear only when printed.
"""

from __future__ import annotations

import math
import re

from spotpipe.errors import SpotpipeError

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
NODE_DAYS_PER_RF_UNIT = 1000.0  # r_f counts failures per this many node-days
MAX_DURATION_S = 1e10  # about 317 years: the longest duration any option takes

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": SECONDS_PER_HOUR, "d": SECONDS_PER_DAY}


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Parse ``60s``, ``5m``, ``2h``, ``1d`` or plain seconds into seconds.

    Args:
        text: the value as typed (a number is taken as seconds).
        what: the option or key it came from, named in the error.

    Returns:
        The duration in seconds, in ``[0, MAX_DURATION_S]`` (about 317 years).

    Raises:
        SpotpipeError: one line naming ``what``, the accepted forms and the range.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise SpotpipeError(
                f"{what}: {text!r} is not a duration; use e.g. 60s, 5m, 2h, 1d or plain seconds"
            )
        value = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not (math.isfinite(value) and 0 <= value <= MAX_DURATION_S):
        raise SpotpipeError(f"{what}: {text!r} is not a duration in [0, {MAX_DURATION_S:.0e} s] (about 317 years)")
    return value


def format_duration(seconds: float) -> str:
    """Short human form: ``45 s``, ``12.0 min``, ``1.80 h``, ``3.2 d``.

    Args:
        seconds: A duration.

    Returns:
        The text (``inf`` for a non-finite duration).
    """
    if not math.isfinite(seconds):
        return "inf"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * SECONDS_PER_HOUR:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * SECONDS_PER_DAY:
        return f"{seconds / SECONDS_PER_HOUR:.2f} h"
    return f"{seconds / SECONDS_PER_DAY:.1f} d"


def rate_per_second(nodes: float, rf: float) -> float:
    """Failures per second of a job on ``nodes`` nodes at ``rf`` failures per 1000 node-days.

    Args:
        nodes: Nodes N.
        rf: Failures per 1000 node-days (``r_f``).

    Returns:
        ``N r_f / (1000 x 86400)`` (Kokolis et al. 2025).
    """
    return nodes * rf / NODE_DAYS_PER_RF_UNIT / SECONDS_PER_DAY


def rf_from_counts(failures: int, node_seconds: float) -> float | None:
    """Observed ``r_f`` (failures per 1000 node-days); ``None`` when there is no exposure.

    Args:
        failures: Interruptions counted.
        node_seconds: Exposure: node-seconds of runtime.

    Returns:
        ``r_f``, or ``None`` for no exposure.
    """
    if node_seconds <= 0:
        return None
    return failures / (node_seconds / SECONDS_PER_DAY) * NODE_DAYS_PER_RF_UNIT


def mttf_text(mttf_hours: float | None, exposure_hours: float) -> str:
    """The MTTF as printed: a number of hours, or the exposure when nothing failed.

    A trace without failures has no finite MTTF estimate; it is never printed as ``inf`` or a
    division by zero but as ``no failures observed (> X h of exposure)``.

    Args:
        mttf_hours: Measured MTTF in hours, or ``None``/``inf`` when nothing failed.
        exposure_hours: Hours of exposure behind it.

    Returns:
        ``"1.8 h"`` or ``"no failures observed (> X h of exposure)"``.
    """
    if mttf_hours is None or not math.isfinite(mttf_hours):
        return f"no failures observed (> {exposure_hours:.3g} h of exposure)"
    return f"{mttf_hours:.3g} h"
