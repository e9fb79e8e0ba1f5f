"""A progress line with an ETA on stderr, for long pure-Python work (no dependency).

On a terminal the line is redrawn in place twice a second; otherwise (a log file, CI) a plain
line is printed every 10 s. The ETA assumes the rest goes at the average rate so far.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_eta(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h20m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class ProgressLine:
    """Report ``done`` of ``total`` units of work, with the rate and the time left.

    Args:
        label: What is being done, printed first (``simulate``).
        total: Units of work in all (> 0).
        unit: Name of a unit (``steps``).
        enabled: Print anything at all.
        stream: Where to print (default: stderr).
        clock: Seconds, monotonic (for tests).
    """

    def __init__(self, label: str, total: float, unit: str, enabled: bool = True,
                 stream: TextIO | None = None, clock: object = time.monotonic) -> None:
        self.label = label
        self.total = max(float(total), 1.0)
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self._now()
        self.last = self.start
        self.printed = False

    def _now(self) -> float:
        return float(self.clock())  # type: ignore[operator]

    def line(self, done: float) -> str:
        """The text of the line for ``done`` units."""
        elapsed = self._now() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = format_eta((self.total - done) / rate) if rate > 0 else "?"
        return (f"{self.label}: {100.0 * done / self.total:5.1f}% ({done:,.0f} of {self.total:,.0f} {self.unit}, "
                f"{rate:,.0f}/s), ETA {eta}")

    def update(self, done: float) -> None:
        """Print the line if enough time passed since the last one."""
        if not self.enabled:
            return
        now = self._now()
        if now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        self.printed = True
        text = self.line(done)
        print(("\r" + text) if self.tty else text, end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        """End a redrawn line, so what follows starts on a fresh line."""
        if self.enabled and self.printed and self.tty:
            print(file=self.stream, flush=True)
