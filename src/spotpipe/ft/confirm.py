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
- **Plan now or wait.** A loss confirmed while a recovery runs joins it, by the recovery's phase
  (:func:`loss_action`): while it collects, the loss is added and the window starts again; once
  planned (replacements joining), it is planned again with the new loss at once; while the new
  generation installs, that generation is recovered in turn. A collecting recovery is planned
  when the window after its last loss has passed and no member it waits on is outstanding
  (:func:`collect_step`, :func:`plan_at`). Planning all losses of one failure together matters
  because the strategy of one lost stage depends on its neighbours: CheckFree rebuilds a middle
  stage from both neighbours (Blagoev, Ersoy, Chen 2025, s. 3.1), so two adjacent stages lost
  together need another source, which a plan made after the first loss alone would miss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Final, Literal


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


def plan_at(last_loss_at: float, window_s: float = GROUPING_WINDOW_S) -> float:
    """When the grouping window after the last loss of a failure closes.

    The first time at which :func:`same_failure` says a new loss no longer belongs to the failure,
    so a discrete-event caller (the simulator) can schedule its check exactly there.

    Args:
        last_loss_at: When the last loss of the failure was confirmed (seconds, any monotonic clock).
        window_s: The grouping window (:data:`GROUPING_WINDOW_S`), >= 0.

    Returns:
        ``last_loss_at + window_s``, on the same clock.

    Raises:
        ValueError: If ``window_s`` is negative.
    """
    if window_s < 0:
        raise ValueError(f"plan_at: window_s must be >= 0, got {window_s}")
    return last_loss_at + window_s


def same_failure(last_loss_at: float, now: float, window_s: float = GROUPING_WINDOW_S) -> bool:
    """Whether a recovery should still wait for more losses of the same failure.

    Args:
        last_loss_at: When the last loss of the failure was confirmed (seconds, any monotonic clock).
        now: The same clock now.
        window_s: The grouping window (:data:`GROUPING_WINDOW_S`).

    Returns:
        True while ``now < plan_at(last_loss_at, window_s)`` (``now - last_loss_at < window_s``):
        a loss confirmed now belongs to the same failure, and the recovery must not be planned yet.
        Written against :func:`plan_at` so that a caller that wakes exactly at that time plans.

    Raises:
        ValueError: If ``window_s`` is negative.
    """
    return now < plan_at(last_loss_at, window_s)


RecoveryPhase = Literal["collect", "replace", "install"]
"""Where a stage recovery stands: ``collect`` (losses are gathered and the survivors report the step
they aborted; nothing is planned yet), ``replace`` (planned: replacements take the lost roles),
``install`` (the new generation installs the rebuilt state)."""

RECOVERY_PHASES: Final[tuple[RecoveryPhase, ...]] = ("collect", "replace", "install")
"""The phases of a recovery, in order."""


class LossAction(Enum):
    """What a newly confirmed loss does to the recovery in progress (:func:`loss_action`)."""

    IGNORE = "ignore"  # already counted in the recovery
    START = "start"  # no recovery runs: start one, collecting
    JOIN = "join"  # the recovery collects: add the loss; the grouping window starts again
    REPLAN = "replan"  # the recovery is planned, replacements join: plan again at once with this loss
    RESTART = "restart"  # the new generation installs: abort it and recover it in turn (same resume step)


def loss_action(phase: RecoveryPhase | None, already_lost: bool) -> LossAction:
    """What a confirmed loss that starts a recovery (:func:`starts_recovery`) does.

    The rule both the controller (:class:`spotpipe.runtime.control.recovery.RecoverySupervisor`)
    and the simulator (:mod:`spotpipe.sim.job`) follow, so the simulator groups losses into
    recoveries as the runtime does. A loss never waits for the recovery in progress to end: the
    lost worker's role must be refilled, and a recovery that completed without it would publish a
    generation with a dead member, whose first step would fail and start another recovery anyway.

    Args:
        phase: The phase of the recovery in progress (:data:`RecoveryPhase`), or None if none runs.
        already_lost: Whether the worker is already counted lost in that recovery (a second piece
            of evidence of the same loss: its exit after its silence, its last words).

    Returns:
        :attr:`LossAction.START` with no recovery; :attr:`LossAction.IGNORE` for a worker already
        counted; else :attr:`LossAction.JOIN` while collecting, :attr:`LossAction.REPLAN` once
        planned, :attr:`LossAction.RESTART` while installing.

    Raises:
        ValueError: If ``phase`` is not a recovery phase.
    """
    if phase is None:
        return LossAction.START
    if phase not in RECOVERY_PHASES:
        raise ValueError(f"loss_action: phase must be one of {', '.join(RECOVERY_PHASES)} or None, got {phase!r}")
    if already_lost:
        return LossAction.IGNORE
    if phase == "collect":
        return LossAction.JOIN
    if phase == "replace":
        return LossAction.REPLAN
    return LossAction.RESTART


class CollectStep(Enum):
    """What a collecting recovery does now (:func:`collect_step`)."""

    WINDOW = "window"  # the grouping window is open: wait; more losses may belong to this failure
    MEMBERS = "members"  # wait for members (counts toward run.timeout_s)
    PLAN = "plan"  # plan the recovery now


def collect_step(last_loss_at: float, now: float, outstanding: bool, window_s: float = GROUPING_WINDOW_S) -> CollectStep:
    """Whether a collecting recovery is planned now or waits, and for what ("plan now or wait").

    A recovery is planned once the grouping window after its last loss has closed (so the losses
    of one failure are planned together, :func:`same_failure`) and nothing it waits on is
    outstanding: every surviving member has reported the step it aborted (the commit protocol
    needs all of them to agree on the step to resume at), which a dead member not yet confirmed
    never does; its confirmation then joins the recovery (:func:`loss_action`) and restarts the
    window.

    Args:
        last_loss_at: When the recovery's last loss was confirmed (seconds, any monotonic clock).
        now: The same clock now.
        outstanding: Whether a member the recovery waits on has not reported yet (the controller:
            a survivor's status is missing; the simulator: a dead member is not yet confirmed).
        window_s: The grouping window (:data:`GROUPING_WINDOW_S`).

    Returns:
        :attr:`CollectStep.WINDOW` while the window is open (the wait does not count toward a
        timeout), else :attr:`CollectStep.MEMBERS` while a member is outstanding, else
        :attr:`CollectStep.PLAN`.

    Raises:
        ValueError: If ``window_s`` is negative.
    """
    if same_failure(last_loss_at, now, window_s):
        return CollectStep.WINDOW
    return CollectStep.MEMBERS if outstanding else CollectStep.PLAN
