"""From a suspected failure to a confirmed loss (pure: no torch, no clock, no I/O).

The detector (:mod:`spotpipe.ft.detector`) says which workers *look* dead. This module holds the
rules that turn evidence into a decision, so that the controller (which feeds it
``time.monotonic()`` and what its store and process handles say) and the simulator (which feeds
it its virtual clock) run the same rules:

- **Kinds and priority.** A failure has a kind; when several explain one stop, the one with the
  lowest priority (then the earliest) is reported: a process that died (0) explains more than a
  worker's own error (1), which explains more than a timeout or silence (2), which explains more
  than a worker that merely lost a peer (3) and is itself a survivor.
- **Confirmation.** A local process that exited, a worker's own error report, and silence are
  confirmed losses; a report that a peer was lost is evidence against the peer only
  (:func:`classify_report`). Silence confirms a loss after ``run.timeout_s``, or after
  ``ft.detect_timeout_s`` (the detector's ``silent`` set) when the other members of the
  generation aborted their step while this worker did not (:func:`confirm_silence`): its peers lost
  their connections to it. A stalled worker, whose peers still wait on it, keeps its role until
  ``run.timeout_s``, so stragglers are not replaced (the HyperPod / torchft distinction between a
  slow and a dead member).
- **Recovery or stop.** Only a confirmed loss of a dead process or a silent worker starts a stage
  recovery (:func:`starts_recovery`); a worker's own error is a bug or bad input and stops the job.
- **One failure.** Losses confirmed within :data:`GROUPING_WINDOW_S` of the previous one are one
  failure (two adjacent stages killed together), planned together (:func:`same_failure`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class FailureKind(IntEnum):
    """What a failure is; the value is its priority (lower explains more)."""

    PROCESS_DIED = 0
    WORKER_ERROR = 1
    SILENCE = 2
    LOST_PEER = 3


GROUPING_WINDOW_S = 0.3
"""Losses closer together than this (seconds) are one failure and are planned together."""

PEER_REPORT_KINDS = ("error", "timeout", "aborted")
"""Error-report kinds by which a worker says it lost a peer or its generation, not that it failed."""


@dataclass(frozen=True)
class Failure:
    """One explanation of why the job (or a worker) stopped.

    Attributes:
        worker: The worker it concerns, or None for a job-level failure (e.g. a join timeout).
        reason: One line for the user.
        kind: What it is; ``kind.value`` is its priority.
        at: Wall-clock time of the failure (seconds since the epoch), for ordering ties.
    """

    worker: int | None
    reason: str
    kind: FailureKind
    at: float = field(default=0.0)

    @property
    def priority(self) -> int:
        """The kind's priority: 0 a process died, 1 a worker's own error, 2 silence, 3 a lost peer."""
        return int(self.kind)


def better_explanation(current: Failure | None, candidate: Failure) -> Failure:
    """The failure to report of two: lower priority first, then the earlier one.

    Args:
        current: The failure recorded so far, or None.
        candidate: A new one.

    Returns:
        ``candidate`` if there is no current failure or it explains more, else ``current``.
    """
    if current is None or (candidate.priority, candidate.at) < (current.priority, current.at):
        return candidate
    return current


def classify_report(kind: str | None, names_peer: bool) -> tuple[FailureKind, bool]:
    """What a worker's error report means.

    Args:
        kind: The report's ``kind`` (``error`` / ``timeout``: a transport failure; ``aborted``: its
            generation was aborted; anything else, or None: the worker's own fault).
        names_peer: Whether the report names the peer it waited for.

    Returns:
        ``(kind, confirmed)``: a lost peer reported with an ``error`` is :attr:`FailureKind.LOST_PEER`
        and a ``timeout`` is :attr:`FailureKind.SILENCE`, neither confirming the reporter's loss
        (it is a survivor; the report is evidence against the peer); an ``aborted`` report (or a
        transport failure naming no peer) is a lost peer, not confirmed; anything else is the
        worker's own error, confirmed.
    """
    if kind in PEER_REPORT_KINDS:
        if names_peer and kind == "timeout":
            return FailureKind.SILENCE, False
        return FailureKind.LOST_PEER, False
    return FailureKind.WORKER_ERROR, True


def confirm_silence(silence_s: float, silent: bool, peers_aborted_without_it: bool, run_timeout_s: float) -> str | None:
    """Whether a suspected worker's silence confirms its loss, and why.

    Args:
        silence_s: Seconds since its last heartbeat.
        silent: Whether the detector counts it silent (``>= ft.detect_timeout_s``).
        peers_aborted_without_it: Whether other members of its generation aborted their step while
            it did not post that it aborted.
        run_timeout_s: ``run.timeout_s``: silence that confirms a loss on its own.

    Returns:
        The reason (one line, without the worker's name) if the loss is confirmed, else None.

    Raises:
        ValueError: If a duration is negative or ``run_timeout_s`` is not positive.
    """
    if silence_s < 0 or run_timeout_s <= 0:
        raise ValueError(f"confirm_silence: silence_s must be >= 0 and run_timeout_s > 0, got {silence_s}, {run_timeout_s}")
    if silence_s >= run_timeout_s:
        return f"sent no heartbeat for {silence_s:.0f} s (run.timeout_s)"
    if silent and peers_aborted_without_it:
        return f"sent no heartbeat for {silence_s:.1f} s while the others aborted their step"
    return None


def starts_recovery(failure: Failure) -> bool:
    """Whether a confirmed loss can be recovered (a dead process or silence), rather than stop the job.

    Args:
        failure: A confirmed failure of one worker.

    Returns:
        True for :attr:`FailureKind.PROCESS_DIED` and :attr:`FailureKind.SILENCE`.
    """
    return failure.kind in (FailureKind.PROCESS_DIED, FailureKind.SILENCE)


def same_failure(last_loss_at: float, now: float, window_s: float = GROUPING_WINDOW_S) -> bool:
    """Whether a recovery should still wait for more losses of the same failure.

    Args:
        last_loss_at: When the last loss of the failure was confirmed (seconds, any monotonic clock).
        now: The same clock now.
        window_s: The grouping window (:data:`GROUPING_WINDOW_S`).

    Returns:
        True while ``now - last_loss_at < window_s``: a loss confirmed now belongs to the same
        failure, and the recovery must not be planned yet.
    """
    return now - last_loss_at < window_s
