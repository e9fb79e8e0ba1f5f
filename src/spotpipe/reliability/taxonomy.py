"""Failure taxonomy: configurable rules map (state, exit code, signal, reason) to a category.

Kokolis et al. (Meta, 2025) attribute each job interruption to a cause (hardware such as GPUs
and memory, infrastructure such as the network and file systems, the user's own code,
preemption by the scheduler) and compute the failure rate ``r_f`` only from the causes a
training job cannot avoid. Schroeder and Gibson (DSN 2006) use the same kind of root-cause
classes for the LANL records (hardware, software, network, facilities, human error,
undetermined). Rules here are tried in order and the first match wins, so site-specific rules
go first. A rules file is TOML::

    failure_categories = ["hardware", "infrastructure"]   # what counts toward r_f

    [[rule]]
    state = "FAILED"              # regular expression, whole state, case-insensitive
    reason = "(?i)xid|ecc"        # regular expression searched in the reason text
    exit_code = [1, 137]          # optional: any of these exit codes
    signal = [9]                  # optional: any of these signals
    category = "hardware"

A file's rules come before the defaults unless it sets ``replace_defaults = true``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import read_text
from spotpipe.reliability.columns import factorize

CATEGORIES: tuple[str, ...] = (
    "completed",
    "cancelled",
    "timeout",
    "user",
    "software",
    "hardware",
    "infrastructure",
    "preemption",
    "unknown",
    "running",
)
# Categories that end a job without the user asking for it (for "job failure rate").
FAILED_CATEGORIES = frozenset(
    {"timeout", "user", "software", "hardware", "infrastructure", "preemption", "unknown"}
)
# Categories that count toward r_f by default: what a job cannot avoid (Kokolis et al. 2025).
DEFAULT_FAILURE_CATEGORIES = frozenset({"hardware", "infrastructure"})


@dataclass(frozen=True)
class Rule:
    """One rule; every field that is set must match."""

    category: str
    state: str | None = None
    reason: str | None = None
    exit_code: tuple[int, ...] | None = None
    signal: tuple[int, ...] | None = None
    _state_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)
    _reason_re: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise SpotpipeError(
                f"taxonomy rule category {self.category!r} is not one of {', '.join(CATEGORIES)}"
            )
        try:
            if self.state is not None:
                object.__setattr__(self, "_state_re", re.compile(self.state, re.IGNORECASE))
            if self.reason is not None:
                object.__setattr__(self, "_reason_re", re.compile(self.reason))
        except re.error as exc:
            raise SpotpipeError(f"taxonomy rule for {self.category!r}: bad regular expression: {exc}") from None

    def matches(self, state: str, exit_code: int, signal: int, reason: str) -> bool:
        """Whether the record matches every field this rule sets.

        Args:
            state: Job state (``FAILED``, ``NODE_FAIL``...).
            exit_code: Exit code.
            signal: Signal number (0: none).
            reason: Free-text reason.

        Returns:
            True if every set field matches (regexes on state and reason).
        """
        if self._state_re is not None and self._state_re.fullmatch(state) is None:
            return False
        if self._reason_re is not None and self._reason_re.search(reason) is None:
            return False
        if self.exit_code is not None and exit_code not in self.exit_code:
            return False
        return self.signal is None or signal in self.signal


_HW = r"(?i)\b(xid|ecc|nvlink|gpu|hbm|dimm|memory error|uncorrectable|fell off the bus|hardware|hw)\b"
_INFRA = r"(?i)\b(nccl|infiniband|ib|rdma|network|link down|filesystem|file system|lustre|nfs|gpfs|mount|dns|health ?check)\b"

DEFAULT_RULES: tuple[Rule, ...] = (
    # Slurm job states (sacct --parsable2, AcmeTrace).
    Rule("hardware", state=r"NODE_FAIL"),
    Rule("infrastructure", state=r"BOOT_FAIL"),
    Rule("preemption", state=r"PREEMPTED"),
    Rule("hardware", state=r"FAILED", reason=_HW),
    Rule("infrastructure", state=r"FAILED", reason=_INFRA),
    Rule("user", state=r"FAILED|OUT_OF_MEMORY|DEADLINE"),
    Rule("timeout", state=r"TIMEOUT"),
    Rule("cancelled", state=r"CANCELLED.*|REVOKED"),  # REVOKED: a federation sibling started elsewhere
    Rule("completed", state=r"COMPLETED"),
    # An earlier run of a requeued job (sacct --duplicates): interrupted, the cause in the reason
    # columns if anywhere; without one it is a failure of unknown cause (not counted toward r_f).
    Rule("hardware", state=r"REQUEUED", reason=_HW),
    Rule("infrastructure", state=r"REQUEUED", reason=_INFRA),
    Rule("unknown", state=r"REQUEUED"),
    Rule("running", state=r"RUNNING|PENDING|RESIZING|SUSPENDED|REQUEUE_.*|SIGNALING|STAGE_OUT|STOPPED"
         r"|CONFIGURING|COMPLETING|RESV_DEL_HOLD|SPECIAL_EXIT"),
    # LANL root-cause columns (Schroeder & Gibson 2006).
    Rule("hardware", state=r"Hardware"),
    Rule("software", state=r"Software"),
    Rule("infrastructure", state=r"Network|Facilities"),
    Rule("user", state=r"Human Error"),
    Rule("unknown", state=r"Undetermined"),
    # Spot traces: every removal is a preemption.
    Rule("preemption", state=r"remove|preempt(ed|ion)?"),
)


@dataclass(frozen=True)
class Taxonomy:
    """Ordered rules plus the categories that count toward ``r_f``."""

    rules: tuple[Rule, ...] = DEFAULT_RULES
    failure_categories: frozenset[str] = DEFAULT_FAILURE_CATEGORIES

    def classify(self, state: str, exit_code: int = 0, signal: int = 0, reason: str = "") -> str:
        """Category of one record; ``unknown`` when no rule matches.

        Args:
            state: Job state.
            exit_code: Exit code.
            signal: Signal number (0: none).
            reason: Free-text reason.

        Returns:
            The category of the first matching rule, or ``unknown``.
        """
        for rule in self.rules:
            if rule.matches(state, exit_code, signal, reason):
                return rule.category
        return "unknown"

    def classify_arrays(
        self,
        state: NDArray[Any],
        exit_code: NDArray[np.int64],
        signal: NDArray[np.int64],
        reason: NDArray[Any],
    ) -> NDArray[Any]:
        """Vectorised :meth:`classify`: rules run once per distinct combination of fields.

        Args:
            state: Job states, shape ``(n,)``.
            exit_code: Exit codes, shape ``(n,)``.
            signal: Signal numbers, shape ``(n,)``.
            reason: Reasons, shape ``(n,)``.

        Returns:
            Categories, object array of shape ``(n,)``.
        """
        n = len(state)
        if n == 0:
            return np.empty(0, dtype=object)
        key = np.zeros(n, dtype=np.int64)
        levels: list[list[Any]] = []
        for column in (state, exit_code, signal, reason):
            uniques, codes = factorize(column.tolist())
            key = key * len(uniques) + codes
            levels.append(uniques)
        combos, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        categories = np.empty(combos.size, dtype=object)
        for k, i in enumerate(first.tolist()):
            categories[k] = self.classify(str(state[i]), int(exit_code[i]), int(signal[i]), str(reason[i]))
        return categories[inverse.ravel()]


def _int_tuple(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise SpotpipeError(f"{where}: must be an integer or a list of integers, got {value!r}")
    return tuple(items)


def load_taxonomy(path: str | Path | None) -> Taxonomy:
    """Read a rules file (see the module docstring); ``None`` gives the default taxonomy.

    Args:
        path: A TOML rules file, or ``None``.

    Returns:
        The taxonomy.

    Raises:
        SpotpipeError: for a file that is missing, not TOML, or has unknown keys or bad rules.
    """
    if path is None:
        return Taxonomy()
    p = Path(path)
    try:
        data = tomllib.loads(read_text(p, "taxonomy rules file"))
    except tomllib.TOMLDecodeError as exc:
        raise SpotpipeError(f"{p}: not valid TOML: {exc}") from None
    known = {"rule", "failure_categories", "replace_defaults"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpotpipeError(f"{p}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    rules: list[Rule] = []
    for i, entry in enumerate(data.get("rule", []), 1):
        where = f"{p}: rule {i}"
        if not isinstance(entry, dict) or "category" not in entry:
            raise SpotpipeError(f"{where}: needs a 'category'")
        extra = sorted(set(entry) - {"category", "state", "reason", "exit_code", "signal"})
        if extra:
            raise SpotpipeError(f"{where}: unknown fields {', '.join(extra)}")
        rules.append(
            Rule(
                category=str(entry["category"]),
                state=entry.get("state"),
                reason=entry.get("reason"),
                exit_code=_int_tuple(entry.get("exit_code"), f"{where}.exit_code"),
                signal=_int_tuple(entry.get("signal"), f"{where}.signal"),
            )
        )
    if not data.get("replace_defaults", False):
        rules.extend(DEFAULT_RULES)
    failure = data.get("failure_categories", sorted(DEFAULT_FAILURE_CATEGORIES))
    bad = [c for c in failure if c not in CATEGORIES]
    if bad:
        raise SpotpipeError(f"{p}: failure_categories {bad} not among {', '.join(CATEGORIES)}")
    return Taxonomy(rules=tuple(rules), failure_categories=frozenset(failure))


def with_failure_categories(taxonomy: Taxonomy, categories: str) -> Taxonomy:
    """The same rules counting a comma-separated list of categories toward ``r_f``.

    Args:
        taxonomy: The rules.
        categories: Comma-separated names from :data:`CATEGORIES`.

    Returns:
        A taxonomy with the same rules and those categories counted.

    Raises:
        SpotpipeError: for an empty list or an unknown category.
    """
    chosen = [c.strip() for c in categories.split(",") if c.strip()]
    bad = [c for c in chosen if c not in CATEGORIES]
    if bad or not chosen:
        raise SpotpipeError(
            f"--count {categories!r}: categories must be among {', '.join(CATEGORIES)}"
        )
    return Taxonomy(rules=taxonomy.rules, failure_categories=frozenset(chosen))
