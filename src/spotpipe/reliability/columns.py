"""Vectorised conversion of text columns (times, integers) with a mask of the bad cells.

Trace readers split a file into rows and transpose them into columns, then convert each column
at once with numpy (a million ISO timestamps parse in well under a second). When a column holds a
value numpy cannot parse, the column is converted again cell by cell to find exactly which rows
are bad, so the reader can report them with their line numbers instead of failing the file.
"""

from __future__ import annotations

import gc
import math
from collections import Counter
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

import numpy as np
from numpy.typing import NDArray

@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of small objects are created.

    Reading a trace allocates millions of strings, lists and tuples and frees none of them in
    cycles; without this the collector rescans them over and over (20x slower on 1M rows).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


MISSING_TIMES = frozenset({"", "unknown", "none", "n/a", "nan", "nat", "null"})


def parse_time(text: str) -> float:
    """Seconds since the epoch from ISO-8601 (``T`` or space, optional offset) or a number.

    Returns NaN for the placeholders Slurm and pandas write for "no time" (``Unknown``,
    ``None``, empty); raises ``ValueError`` for anything else that is not a time. Naive times are
    read as UTC (only differences matter).

    Args:
        text: One cell.

    Returns:
        Seconds since the epoch, or NaN for a placeholder.

    Raises:
        ValueError: for text that is neither a time, a number nor a placeholder.
    """
    s = text.strip()
    if s.lower() in MISSING_TIMES:
        return math.nan
    if len(s) >= 10 and s[4] == "-":
        dt = datetime.fromisoformat(s)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    value = float(s)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a time")
    return value


def _offset_seconds(s: str) -> tuple[str, float]:
    """Split ``...+08:00`` into the local time and its UTC offset in seconds."""
    if len(s) > 19 and s[-6] in "+-" and s[-3] == ":" and s[-5:-3].isdigit() and s[-2:].isdigit():
        sign = 1.0 if s[-6] == "+" else -1.0
        return s[:-6], sign * (int(s[-5:-3]) * 3600 + int(s[-2:]) * 60)
    if s.endswith("Z"):
        return s[:-1], 0.0
    return s, 0.0


_CHUNK = 4096
_TAIL = itemgetter(slice(-6, None))


def _is_offset(tail: str) -> bool:
    """Whether a 6-character tail is a UTC offset like ``+08:00``."""
    return (
        len(tail) == 6 and tail[0] in "+-" and tail[3] == ":" and tail[1:3].isdigit() and tail[4:].isdigit()
    )


def _strip_offset(cells: Sequence[str]) -> tuple[NDArray[np.str_], float]:
    """The column as a numpy string array without its most common UTC offset, and that offset.

    Works on the UTF-32 code points of the array (no Python loop per cell): the cells whose last
    six characters are the offset (``+08:00``) or whose last is ``Z`` get them zeroed, which
    numpy reads as a shorter string. Cells with another offset keep it, and numpy refuses them.
    """
    arr = np.asarray(cells, dtype=str)
    sample = [v for v in cells[:256] if len(v) > 19]
    if not sample or arr.dtype.itemsize == 0:
        return arr, 0.0
    zulu = sum(v.endswith("Z") for v in sample) * 2 > len(sample)
    tails = Counter(t for t in map(_TAIL, sample) if _is_offset(t))
    if not zulu and not tails:
        return arr, 0.0
    main = "Z" if zulu else tails.most_common(1)[0][0]
    offset = 0.0 if zulu else (1.0 if main[0] == "+" else -1.0) * (int(main[1:3]) * 3600 + int(main[4:]) * 60)
    width = arr.dtype.itemsize // 4
    codes = arr.view(np.uint32).reshape(arr.size, width).copy()
    length = np.count_nonzero(codes, axis=1)
    target = np.frombuffer(main.encode("utf-32-le"), dtype=np.uint32)
    k = target.size
    for size in np.unique(length[length > k]).tolist():
        rows = np.flatnonzero(length == size)
        hit = rows[np.all(codes[rows, size - k : size] == target, axis=1)]
        codes[hit, size - k : size] = 0
    return codes.view(f"<U{width}").reshape(arr.size), offset


def _iso_column(cells: Sequence[str]) -> NDArray[np.float64]:
    """numpy's ISO-8601 parser on a column ("", "NaT" for missing); raises if any cell is bad."""
    arr, offset = _strip_offset(cells)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stamps = arr.astype("datetime64[ms]")
    secs = stamps.astype(np.int64).astype(np.float64) / 1000.0 - offset
    secs[np.isnat(stamps)] = np.nan
    if secs.size and not np.all(np.isnan(secs)):
        if float(np.nanmin(secs)) < -2.2e9 or float(np.nanmax(secs)) > 7.3e9:
            raise ValueError("implausible year")  # e.g. an epoch number read as a year
    return secs


_PARSE_ERRORS = (ValueError, TypeError, OverflowError, UserWarning, DeprecationWarning)


def _cell_by_cell(cells: Sequence[str], out: NDArray[np.float64], bad: NDArray[np.bool_], lo: int) -> None:
    for k, v in enumerate(cells):
        try:
            out[lo + k] = parse_time(v)
        except (ValueError, OverflowError):
            bad[lo + k] = True


def time_column(values: Sequence[str]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Parse a column of times; returns (seconds since the epoch, NaN if missing; bad mask).

    Fast path: numpy's ISO-8601 parser on the whole column. If some cell fails, the column is
    parsed in chunks; a chunk that fails again has its placeholders (``Unknown``, ``None``)
    mapped to NaT, and if it still fails it is parsed cell by cell with :func:`parse_time`, so a
    few bad rows cost little. Columns of plain numbers are seconds since the epoch.

    Args:
        values: The cells of one column.

    Returns:
        ``(seconds since the epoch, NaN where missing or bad; True where a cell is bad)``.
    """
    n = len(values)
    out = np.full(n, np.nan)
    bad = np.zeros(n, dtype=bool)
    sample = next((v.strip() for v in values if v.strip().lower() not in MISSING_TIMES), None)
    if sample is None:
        return out, bad
    if not (len(sample) >= 10 and sample[4] == "-"):  # numbers: seconds since the epoch
        _cell_by_cell(values, out, bad, 0)
        return out, bad
    try:
        return _iso_column(values), bad
    except _PARSE_ERRORS:
        pass
    for lo in range(0, n, _CHUNK):
        chunk = values[lo : lo + _CHUNK]
        try:
            out[lo : lo + len(chunk)] = _iso_column(chunk)
            continue
        except _PARSE_ERRORS:
            pass
        cleaned = ["NaT" if v.lower() in MISSING_TIMES else v for v in (x.strip() for x in chunk)]
        try:
            out[lo : lo + len(chunk)] = _iso_column(cleaned)
        except _PARSE_ERRORS:
            _cell_by_cell(chunk, out, bad, lo)
    return out, bad


def factorize(values: Sequence[Any]) -> tuple[list[Any], NDArray[np.int64]]:
    """Distinct values in first-seen order and each cell's index into them (C-speed loops).

    Args:
        values: Hashable cells.

    Returns:
        ``(uniques, codes)`` with ``uniques[codes[i]] == values[i]``.
    """
    uniques = list(dict.fromkeys(values))
    position = {v: i for i, v in enumerate(uniques)}
    codes = np.fromiter(map(position.__getitem__, values), dtype=np.int64, count=len(values))
    return uniques, codes


def map_column(values: Sequence[str], convert: Callable[[str], Any]) -> Iterator[Any]:
    """``convert(v) for v in values``, calling ``convert`` once per distinct value.

    Args:
        values: The cells.
        convert: Conversion of one cell.

    Returns:
        An iterator of the converted cells, in order (every distinct value is converted at
        once, so ``convert``'s errors come from this call).
    """
    table = {v: convert(v) for v in dict.fromkeys(values)}
    return map(table.__getitem__, values)


_BAD_INT = -(2**62)  # marks a cell that is not an integer


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return _BAD_INT
    return int(f) if math.isfinite(f) and f.is_integer() else _BAD_INT


def int_column(values: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Parse a column of integers (``8``, `` 8 `` or ``8.0``); returns (values, bad mask).

    Each distinct text is converted once, which suits counts of nodes and GPUs.

    Args:
        values: The cells of one column.

    Returns:
        ``(values, 0 where bad; True where a cell is not an integer)``.
    """
    out = np.fromiter(map_column(values, _to_int), dtype=np.int64, count=len(values))
    bad = out == _BAD_INT
    out[bad] = 0
    return out, bad


def strip_column(values: Sequence[str]) -> list[str]:
    """The cells without surrounding whitespace (a copy only when some cell has any).

    Args:
        values: The cells of one column.

    Returns:
        The stripped cells, as a new list.
    """
    joined = "".join(values)
    if joined == joined.strip() and not any(c in joined for c in " \t\r\n\x0b\x0c"):
        return list(values)
    return [v.strip() for v in values]
