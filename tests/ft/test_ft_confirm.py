"""The pure confirmation rules (ft/confirm.py), and the simulator playing the same rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from spotpipe.config import load_config
from spotpipe.ft.confirm import (
    GROUPING_WINDOW_S,
    RECOVERY_PHASES,
    CollectStep,
    Failure,
    FailureKind,
    LossAction,
    RecoveryPhase,
    better_explanation,
    classify_report,
    collect_step,
    confirm_silence,
    loss_action,
    plan_at,
    same_failure,
    starts_recovery,
)
from spotpipe.sim.recovery import detection_time


@pytest.mark.parametrize(
    ("kind", "names_peer", "want"),
    [
        ("error", True, (FailureKind.LOST_PEER, False)),
        ("timeout", True, (FailureKind.SILENCE, False)),
        ("timeout", False, (FailureKind.LOST_PEER, False)),
        ("aborted", True, (FailureKind.LOST_PEER, False)),
        ("aborted", False, (FailureKind.LOST_PEER, False)),
        ("fatal", False, (FailureKind.WORKER_ERROR, True)),
        (None, False, (FailureKind.WORKER_ERROR, True)),
    ],
)
def test_error_reports_confirm_only_the_reporters_own_fault(kind: str | None, names_peer: bool, want: tuple[FailureKind, bool]) -> None:
    assert classify_report(kind, names_peer) == want


def test_silence_confirms_at_the_run_timeout_or_when_the_others_aborted() -> None:
    assert confirm_silence(1.0, silent=True, peers_aborted_without_it=False, run_timeout_s=60) is None  # a straggler
    assert confirm_silence(2.5, silent=True, peers_aborted_without_it=True, run_timeout_s=60) == (
        "sent no heartbeat for 2.5 s while the others aborted their step")
    assert confirm_silence(2.5, silent=False, peers_aborted_without_it=True, run_timeout_s=60) is None
    assert confirm_silence(61.0, silent=False, peers_aborted_without_it=False, run_timeout_s=60) == (
        "sent no heartbeat for 61 s (run.timeout_s)")
    with pytest.raises(ValueError, match="run_timeout_s"):
        confirm_silence(1.0, True, True, 0.0)


def test_the_best_explanation_is_kept() -> None:
    died = Failure(1, "died", FailureKind.PROCESS_DIED, at=5.0)
    silent = Failure(2, "silent", FailureKind.SILENCE, at=1.0)
    peer = Failure(3, "lost peer", FailureKind.LOST_PEER, at=0.5)
    assert better_explanation(None, peer) is peer
    assert better_explanation(peer, silent) is silent
    assert better_explanation(silent, died) is died
    assert better_explanation(died, Failure(4, "died later", FailureKind.PROCESS_DIED, at=6.0)) is died
    assert better_explanation(died, Failure(4, "died earlier", FailureKind.PROCESS_DIED, at=4.0)).worker == 4


def test_only_dead_processes_and_silence_start_a_recovery() -> None:
    assert starts_recovery(Failure(1, "", FailureKind.PROCESS_DIED))
    assert starts_recovery(Failure(1, "", FailureKind.SILENCE))
    assert not starts_recovery(Failure(1, "", FailureKind.WORKER_ERROR))
    assert not starts_recovery(Failure(1, "", FailureKind.LOST_PEER))


def test_grouping_window() -> None:
    assert same_failure(10.0, 10.0 + GROUPING_WINDOW_S / 2)
    assert not same_failure(10.0, 10.0 + GROUPING_WINDOW_S)


@pytest.mark.parametrize("last", [0.0, 0.1, 1.05, 2.2, 1234.5678, 1e6 + 0.1])
def test_the_window_closes_exactly_at_plan_at(last: float) -> None:
    """A caller that wakes at plan_at() plans then, whatever the rounding of ``last + window``."""
    closes = plan_at(last)
    assert closes == last + GROUPING_WINDOW_S
    assert not same_failure(last, closes)
    assert same_failure(last, closes - 1e-9 * max(1.0, closes))
    assert collect_step(last, closes, outstanding=False) is CollectStep.PLAN


def test_plan_at_and_collect_step_refuse_a_negative_window() -> None:
    with pytest.raises(ValueError, match="window_s"):
        plan_at(1.0, -0.1)
    with pytest.raises(ValueError, match="window_s"):
        collect_step(1.0, 2.0, False, window_s=-0.1)


@pytest.mark.parametrize(
    ("since_last_loss", "outstanding", "want"),
    [
        (0.0, False, CollectStep.WINDOW),
        (GROUPING_WINDOW_S / 2, True, CollectStep.WINDOW),  # the window first: no timeout runs yet
        (GROUPING_WINDOW_S, True, CollectStep.MEMBERS),
        (GROUPING_WINDOW_S, False, CollectStep.PLAN),
        (5.0, True, CollectStep.MEMBERS),
        (5.0, False, CollectStep.PLAN),
    ],
)
def test_collect_plans_after_the_window_once_no_member_is_outstanding(
        since_last_loss: float, outstanding: bool, want: CollectStep) -> None:
    assert collect_step(10.0, 10.0 + since_last_loss, outstanding) is want


@pytest.mark.parametrize(
    ("phase", "already_lost", "want"),
    [
        (None, False, LossAction.START),
        ("collect", False, LossAction.JOIN),
        ("collect", True, LossAction.IGNORE),
        ("replace", False, LossAction.REPLAN),
        ("replace", True, LossAction.IGNORE),
        ("install", False, LossAction.RESTART),
        ("install", True, LossAction.IGNORE),
    ],
)
def test_a_loss_joins_the_recovery_by_its_phase(phase: RecoveryPhase | None, already_lost: bool, want: LossAction) -> None:
    assert loss_action(phase, already_lost) is want


def test_loss_action_names_the_phases() -> None:
    assert RECOVERY_PHASES == ("collect", "replace", "install")
    with pytest.raises(ValueError, match="collect, replace, install"):
        loss_action("planning", False)  # type: ignore[arg-type]


@dataclass
class _Found:
    suspects: tuple[int, ...]
    reasons: dict[int, str] = field(default_factory=dict)
    silent: frozenset[int] = frozenset()


def test_simulator_confirms_with_the_same_rule() -> None:
    """A detector that suspects at once but never calls the node silent: the shipped rule confirms
    only at run.timeout_s, and the simulator's detection time says so."""
    ft = load_config(None, []).ft

    def eager(now: float, beats: object, cfg: object) -> _Found:
        return _Found((7,), {7: "suspected by a transport report"})

    when, _ = detection_time(7, failed_at=100.0, alive=None, heartbeat_s=1.0, ft=ft, detector=eager, run_timeout_s=30.0)
    assert 129.0 <= when <= 131.0
    when_default, reason = detection_time(7, failed_at=100.0, alive=None, heartbeat_s=1.0, ft=ft, run_timeout_s=30.0)
    assert when_default < 100.0 + ft.detect_timeout_s + 1.5 and "heartbeat" in reason
