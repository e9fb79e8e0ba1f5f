"""Failure detector: a table of (now, heartbeats, reports) -> suspects."""

from __future__ import annotations

import pytest

from spotpipe.config import FTConfig
from spotpipe.ft.detector import DetectorConfig, TransportReport, detect, next_deadline

HB = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}


@pytest.mark.parametrize(
    "now, heartbeats, reports, expected",
    [
        (10.0, HB, [], ()),  # everyone just spoke
        (11.99, HB, [], ()),  # just under the 2 s timeout
        (12.0, HB, [], (0, 1, 2, 3)),  # exactly the timeout: all silent
        (12.5, {**HB, 0: 12.4, 1: 12.4, 3: 12.4}, [], (2,)),  # one silent worker
        (9.0, HB, [], ()),  # clock behind the last heartbeat: not negative-age suspects
        # a transport error about worker 2 at t=10.3, no heartbeat from 2 since: suspected at once
        (10.4, {**HB, 0: 10.4}, [TransportReport(1, 2, "error", 10.3, "recv 2F3")], (2,)),
        # the peer spoke after the report: alive, not suspected
        (10.6, {**HB, 2: 10.5}, [TransportReport(1, 2, "timeout", 10.3)], ()),
        # reports about an unknown (already removed) worker or about oneself are ignored
        (10.4, HB, [TransportReport(1, 9, "error", 10.3), TransportReport(1, 1, "error", 10.3)], ()),
    ],
)
def test_detect_table(now, heartbeats, reports, expected):
    got = detect(now, heartbeats, FTConfig(), reports)
    assert got.suspects == expected
    assert set(got.reasons) == set(expected)
    assert bool(got) == bool(expected)


def test_reasons_name_the_evidence_and_silence_is_marked():
    d = detect(13.0, {0: 13.0, 1: 10.5, 2: 12.9}, DetectorConfig(timeout_s=2.0),
               [TransportReport(0, 2, "timeout", 12.95, "wait for 2SEND_F1")])
    assert d.suspects == (1, 2)
    assert "no heartbeat for 2.50 s" in d.reasons[1] and "ft.detect_timeout_s = 2 s" in d.reasons[1]
    assert "transport timeout reported by worker 0" in d.reasons[2] and "2SEND_F1" in d.reasons[2]
    assert d.silent == frozenset({1})


def test_dead_worker_found_within_the_default_timeout():
    """A worker dying right after a heartbeat at t=100 (heartbeats every 0.5 s) is suspected by
    t = 102.0 at the latest: 2 s of ft.detect_timeout_s."""
    cfg = FTConfig()
    assert cfg.detect_timeout_s == 2.0
    beats = {0: 100.0, 1: 100.0}
    deadline = next_deadline(beats, cfg)
    assert deadline == pytest.approx(102.0)
    assert detect(deadline - 1e-6, beats, cfg).suspects == ()
    assert detect(deadline, beats, cfg).suspects == (0, 1)
    assert next_deadline({}, cfg) is None


def test_timeout_follows_the_config_and_bad_values_are_refused():
    assert detect(10.6, {0: 10.0}, FTConfig(detect_timeout_s=0.5)).suspects == (0,)
    assert detect(10.6, {0: 10.0}, FTConfig(detect_timeout_s=5.0)).suspects == ()
    with pytest.raises(Exception, match="ft.detect_timeout_s must be > 0"):
        DetectorConfig(timeout_s=0.0)
    with pytest.raises(ValueError, match="kind"):
        TransportReport(0, 1, "boom", 1.0)
