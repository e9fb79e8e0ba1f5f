"""Checked value types for command-line options (argparse ``type=`` callables).

Every number on every command line goes through one of these, so it is finite and in its range,
and a bad value is argparse's usual one-line ``error: argument --x: ...`` (exit code 2) that
names the allowed range, never an ``OverflowError`` or a NaN carried into the work. Integers may
be written ``1e6`` when the value is a whole number.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"a number {'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either bound may be ``None``).

    Args:
        lo: Smallest allowed value, or ``None``.
        hi: Largest allowed value, or ``None``.

    Returns:
        A callable that parses ``"16384"`` or ``"1.6e4"`` and raises
        :class:`argparse.ArgumentTypeError` naming the range otherwise.
    """
    if lo is not None and hi is not None:
        wanted = f"an integer in {lo}..{hi}"
    elif lo is not None:
        wanted = f"an integer >= {lo}"
    else:
        wanted = "an integer" if hi is None else f"an integer <= {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
            if not (math.isfinite(number) and number.is_integer()):
                raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
            value = int(number)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number in the given range.

    Args:
        lo: Lower bound, or ``None``.
        hi: Upper bound, or ``None``.
        lo_open: Exclude ``lo`` itself.
        hi_open: Exclude ``hi`` itself.

    Returns:
        A callable that raises :class:`argparse.ArgumentTypeError` naming the range for
        anything else (``nan``, ``inf``, out of range, not a number).
    """
    wanted = _range_text(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    parse.__name__ = "number"
    return parse
