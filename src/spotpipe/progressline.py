"""A progress bar with an ETA on stderr for long pure-Python work, drawn by tqdm.

A thin adapter: the callers report how much is *done* (not increments), and a bar that is not
enabled prints nothing; nor does work that ends within a second. On a terminal tqdm redraws the line twice a second; in a log file it
writes a new state at most every 10 s. The rate is the average since the start (``smoothing=0``),
so the ETA assumes the rest goes at the average rate so far.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class ProgressLine:
    """Report ``done`` of ``total`` units of work, with the rate and the time left.

    Args:
        label: What is being done, printed first (``simulate``).
        total: Units of work in all (> 0).
        unit: Name of a unit (``steps``).
        enabled: Print anything at all.
        stream: Where to print (default: stderr).
    """

    def __init__(self, label: str, total: float, unit: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        out = stream if stream is not None else sys.stderr
        tty = bool(getattr(out, "isatty", lambda: False)())
        self._bar = tqdm(total=total if total > 0 else 1, desc=label, unit=f" {unit}", file=out, disable=not enabled,
                         mininterval=0.5 if tty else 10.0, delay=1.0, smoothing=0.0, dynamic_ncols=tty, ascii=not tty, leave=True)

    def update(self, done: float) -> None:
        """Move the bar to ``done`` units (it is redrawn only as often as the interval allows).

        Args:
            done: Units done so far (the bar's ``unit``), cumulative; a smaller value than before
                is ignored.
        """
        step = done - self._bar.n
        if step > 0:
            self._bar.update(step)

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._bar.close()
