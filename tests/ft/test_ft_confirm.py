"""The pure confirmation rules (ft/confirm.py), and the simulator playing the same rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from spotpipe.config import load_config
from spotpipe.ft.confirm import (
    GROUPING_WINDOW_S,
    Failure,
    FailureKind,
    better_explanation,
    classify_report,
    confirm_silence,
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
