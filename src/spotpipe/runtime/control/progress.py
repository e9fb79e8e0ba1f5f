"""The progress display of ``spotpipe train``: one live line on a terminal, plain lines otherwise.

On a TTY the line ``step 120/600  loss 2.314  12.3k tok/s  ETA 2m41s`` is redrawn in place after
every committed step; messages (evaluations, checkpoints) are printed above it. The final step's
line ends the live line, so later messages (the last evaluation) come below it and it is written
once, never redrawn (a redraw would print the final ``step 500/500`` line twice). Anywhere else
(a pipe, a log file, CI) a plain line is printed at most every ``every_s`` seconds, plus the
final step's and every message, so logs stay short.

The run ends with one summary line (:func:`format_result` of a :class:`RunResult`): status,
steps, losses, time, and what the user should know of failures, skipped non-finite steps and
suspected failures that were cleared.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``.

    Args:
        seconds: A duration; negative counts as 0.

    Returns:
        Seconds under a minute, minutes and seconds under an hour, else hours and minutes.
    """
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(tokens_per_s: float) -> str:
    """A rate with an ``M`` or ``k`` suffix: ``1234567`` -> ``1.23M``.

    Args:
        tokens_per_s: Tokens per second.

    Returns:
        The number as text.
    """
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


class Progress:
    """Live progress for ``total`` steps.

    Args:
        total: Steps of the run.
        stream: Where to write (default stdout).
        enabled: ``run.progress``; when False only messages are printed.
        every_s: Interval of plain lines when ``stream`` is not a terminal.
        tty: Force terminal / non-terminal behaviour (default: ``stream.isatty()``).
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        enabled: bool = True,
        every_s: float = 10.0,
        tty: bool | None = None,
    ) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.every_s = every_s
        self.tty = self.stream.isatty() if tty is None else tty
        self._ema: float | None = None
        self._last_plain = -math.inf
        self._line_len = 0
        self.last_line = ""

    def step(self, step: int, loss: float, step_time: float, tokens: int) -> None:
        """Record committed step ``step`` (0-based) and redraw.

        ``step_time <= 0`` means "not representative" (the first step of a run includes start-up);
        it does not enter the moving average of the step time.

        Args:
            step: The committed step, 0-based.
            loss: Its training loss, nats per token.
            step_time: Its duration in seconds; <= 0 when not representative.
            tokens: Tokens per step.
        """
        if step_time > 0:
            self._ema = step_time if self._ema is None else 0.9 * self._ema + 0.1 * step_time
        ema = self._ema
        if ema:
            speed = f"{format_rate(tokens / ema)} tok/s  ETA {format_duration((self.total - step - 1) * ema)}"
        else:
            speed = "starting"
        self.last_line = f"step {step + 1}/{self.total}  loss {loss:.4f}  {speed}"
        if not self.enabled:
            return
        if self.tty:
            self._draw(self.last_line)
            if step + 1 >= self.total:  # the last step: end the live line, it is not redrawn
                self.close()
        else:
            now = time.monotonic()
            if now - self._last_plain >= self.every_s or step + 1 == self.total:
                self._last_plain = now
                self.stream.write(self.last_line + "\n")
                self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line above the live line.

        Args:
            text: One line, without a newline.
        """
        if self.tty and self._line_len:
            self.stream.write("\r" + " " * self._line_len + "\r")
        self.stream.write(text + "\n")
        if self.tty and self._line_len and self.enabled:
            self.stream.write(self.last_line)
        self.stream.flush()

    def close(self) -> None:
        """End the live line."""
        if self.tty and self._line_len:
            self.stream.write("\n")
            self.stream.flush()
            self._line_len = 0

    def _draw(self, line: str) -> None:
        pad = max(0, self._line_len - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._line_len = len(line)


@dataclass
class RunResult:
    """How ``spotpipe train`` ended.

    Attributes:
        status: ``finished``, ``interrupted`` or ``failed``.
        run_dir: The run directory.
        last_step: 0-based index of the last committed step (-1: none).
        train_loss: Loss of the last committed step.
        val_loss: Last validation loss.
        wall_s: Seconds this invocation ran.
        message: One line for the user (the failure's cause for ``failed``).
        checkpoint: The last complete checkpoint's step, or None.
        skipped: Steps whose update was skipped for a non-finite gradient norm or loss
            (``train.nonfinite = "skip"``).
        mfu: Model FLOPs utilisation of the steady steps, where the device's peak is known.
        suspicions_cleared: Workers suspected of a failure (late heartbeats) that beat again:
            ``failure_suspected`` events that were no failure.
        peak_bytes: Per pipeline rank, the most memory measured in any step (state on the device
            plus the bytes autograd held for backward; the ``step`` events' ``peak_bytes``).
        step_s: Median seconds per step (iteration) over the steady steps (not the first of a
            generation), or None.
        tokens_per_s: Training tokens per second at that median.
        shapes: With ``ft.elastic``, the time at each shape and the throughput lost to shrinking
            (:class:`spotpipe.reliability.shapes.ShapeTimes`), when the run reshaped; else None.
    """

    status: str
    run_dir: Path
    last_step: int = -1
    train_loss: float | None = None
    val_loss: float | None = None
    wall_s: float = 0.0
    message: str = ""
    checkpoint: int | None = None
    first_loss: float | None = None
    failures: int = 0
    ettr: float | None = None
    lost_s: float = 0.0
    skipped: int = 0
    mfu: float | None = None
    suspicions_cleared: int = 0
    peak_bytes: list[int] | None = None
    step_s: float | None = None
    tokens_per_s: float | None = None
    shapes: Any = None  # ft.elastic: spotpipe.reliability.shapes.ShapeTimes, when the run reshaped


def format_result(result: RunResult) -> str:
    """The last line ``spotpipe train`` prints.

    Args:
        result: The run's result.

    Returns:
        One line, its parts joined by commas, no newline.
    """
    parts = [f"{result.status}: {result.last_step + 1} steps in {format_duration(result.wall_s)}"]
    if result.train_loss is not None:
        parts.append(f"train loss {result.train_loss:.4f}")
    if result.val_loss is not None:
        parts.append(f"val loss {result.val_loss:.4f}")
    if result.step_s is not None and result.tokens_per_s is not None:
        parts.append(f"{result.step_s:.3g} s per step (median), {format_rate(result.tokens_per_s)} tok/s")
    if result.mfu is not None:
        parts.append(f"MFU {100 * result.mfu:.1f}%")
    if result.skipped:
        parts.append(f"{result.skipped} step{'s' if result.skipped > 1 else ''} skipped (non-finite, train.nonfinite = skip)")
    if result.suspicions_cleared:
        n = result.suspicions_cleared
        parts.append(f"{n} suspected failure{'s' if n > 1 else ''} cleared (late heartbeat{'s' if n > 1 else ''}, "
                     "no failure; see failure_suspected in events.jsonl)")
    if result.peak_bytes:
        # MB = 1e6 bytes, the unit of pipeline.memory_budget_gb and `schedule memory --budget`
        parts.append("peak memory per rank " + "/".join(f"{b / 1e6:.3g}" for b in result.peak_bytes) + " MB")
    if result.failures and result.ettr is not None:
        parts.append(f"ETTR {result.ettr:.3f} ({format_duration(result.lost_s)} lost, {result.failures} "
                     f"failure{'s' if result.failures > 1 else ''})")
    if result.shapes is not None:
        parts.append(result.shapes.line())
    parts.append(f"run dir {result.run_dir}")
    return ", ".join(parts)
