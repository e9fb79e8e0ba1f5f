"""Reliability analytics: failure rates, MTTF, ETTR and checkpoint planning.

Pure Python + numpy (matplotlib only for the HTML report); reads job traces and spotpipe event
logs, never the runtime or the simulator (Kokolis et al., "Revisiting Reliability in
Large-Scale Machine Learning Research Clusters", Meta, 2025).

Entry points:
    * :func:`spotpipe.reliability.analysis.analyze_path` - measure a trace or an events.jsonl;
    * :mod:`spotpipe.reliability.models` - closed forms (MTTF, E[ETTR], best interval);
    * :func:`spotpipe.reliability.montecarlo.simulate` - Monte Carlo ETTR with CIs;
    * :func:`spotpipe.reliability.runs.read_runs` - ETTR of spotpipe runs from their events.
"""

from spotpipe.reliability.models import (
    ettr_checkpoint,
    ettr_checkpoint_exact,
    ettr_checkpoint_free,
    make_plan,
    mttf_hours,
    optimal_interval,
)
from spotpipe.reliability.units import parse_duration

__all__ = [
    "ettr_checkpoint",
    "ettr_checkpoint_exact",
    "ettr_checkpoint_free",
    "make_plan",
    "mttf_hours",
    "optimal_interval",
    "parse_duration",
]
