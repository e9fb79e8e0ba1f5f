"""Vectorised conversion of text columns (times, integers) with a mask of the bad cells.

Trace readers split a file into rows and transpose them into columns, then convert each column
at once with numpy (a million ISO timestamps parse in well under a second). When a column holds a
value numpy cannot parse, the column is converted again cell by cell to find exactly which rows
are bad, so the reader can report them with their line numbers instead of failing the file.
"""

from __future__ import annotations

import gc
import math
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


def _iso_column(cleaned: list[str]) -> NDArray[np.float64]:
    """numpy's ISO-8601 parser on a clean column ("NaT" for missing); raises if any cell is bad."""
    n = len(cleaned)
    offsets: NDArray[np.float64] | float | None = None
    tails = set(map(_TAIL, cleaned))
    tails.discard("NaT")
    if any(t.endswith("Z") or (len(t) == 6 and t[0] in "+-" and t[3] == ":") for t in tails):
        only = next(iter(tails)) if len(tails) == 1 else ""
        if len(only) == 6 and _offset_seconds("0" * 19 + only)[0] == "0" * 19:
            offsets = _offset_seconds("0" * 19 + only)[1]  # one offset for the whole column
            cleaned = [v if v == "NaT" else v[:-6] for v in cleaned]
        else:
            pairs = [_offset_seconds(v) if v != "NaT" else ("NaT", 0.0) for v in cleaned]
            cleaned = [pair[0] for pair in pairs]
            offsets = np.fromiter((pair[1] for pair in pairs), dtype=np.float64, count=n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stamps = np.array(cleaned, dtype="datetime64[ms]")
    secs = stamps.astype(np.int64).astype(np.float64) / 1000.0
    if offsets is not None:
        secs -= offsets
    secs[np.isnat(stamps)] = np.nan
    if secs.size and not np.all(np.isnan(secs)):
        if float(np.nanmin(secs)) < -2.2e9 or float(np.nanmax(secs)) > 7.3e9:
            raise ValueError("implausible year")  # e.g. an epoch number read as a year
    return secs


_PARSE_ERRORS = (ValueError, TypeError, OverflowError, UserWarning, DeprecationWarning)


def time_column(values: Sequence[str]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Parse a column of times; returns (seconds since the epoch, NaN if missing; bad mask).

    Fast path: numpy's ISO-8601 parser on the whole column (offsets applied separately). When
    some cell fails, the column is parsed again in chunks, and only the chunks that fail are
    parsed cell by cell with :func:`parse_time`, so a few bad rows cost little.
    """
    n = len(values)
    out = np.full(n, np.nan)
    bad = np.zeros(n, dtype=bool)
    cleaned = [v if v[:1].isdigit() else ("NaT" if v.lower() in MISSING_TIMES else v)
               for v in (x.strip() for x in values)]
    sample = next((v for v in cleaned if v != "NaT"), None)
    if sample is None:
        return out, bad
    if not (len(sample) >= 10 and sample[4] == "-"):  # numbers: seconds since the epoch
        for i, v in enumerate(cleaned):
            if v != "NaT":
                try:
                    out[i] = parse_time(v)
                except (ValueError, OverflowError):
                    bad[i] = True
        return out, bad
    try:
        return _iso_column(cleaned), bad
    except _PARSE_ERRORS:
        pass
    for lo in range(0, n, _CHUNK):
        chunk = cleaned[lo : lo + _CHUNK]
        try:
            out[lo : lo + len(chunk)] = _iso_column(chunk)
            continue
        except _PARSE_ERRORS:
            pass
        for k, v in enumerate(chunk):
            if v == "NaT":
                continue
            try:
                out[lo + k] = parse_time(v)
            except (ValueError, OverflowError):
                bad[lo + k] = True
    return out, bad


def factorize(values: Sequence[Any]) -> tuple[list[Any], NDArray[np.int64]]:
    """Distinct values in first-seen order and each cell's index into them (C-speed loops)."""
    uniques = list(dict.fromkeys(values))
    position = {v: i for i, v in enumerate(uniques)}
    codes = np.fromiter(map(position.__getitem__, values), dtype=np.int64, count=len(values))
    return uniques, codes


def map_column(values: Sequence[str], convert: Callable[[str], Any]) -> list[Any]:
    """``[convert(v) for v in values]``, calling ``convert`` once per distinct value."""
    table = {v: convert(v) for v in dict.fromkeys(values)}
    return list(map(table.__getitem__, values))


def _to_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None


def int_column(values: Sequence[str]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Parse a column of integers (``8``, `` 8 `` or ``8.0``); returns (values, bad mask).

    Each distinct text is converted once, which suits counts of nodes and GPUs.
    """
    parsed = map_column(values, _to_int)
    bad = np.fromiter((v is None for v in parsed), dtype=bool, count=len(parsed))
    out = np.fromiter((0 if v is None else v for v in parsed), dtype=np.int64, count=len(parsed))
    return out, bad


def object_column(values: Sequence[str]) -> NDArray[np.object_]:
    """Stripped strings as a numpy object array."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = [v.strip() for v in values]
    return arr
