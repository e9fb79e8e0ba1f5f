"""The JSONL event log: records survive, bad lines are named, a torn last line is skipped."""

import pytest

from spotpipe.errors import SpotpipeError
from spotpipe.events import STEP, EventLog, read_events


def test_write_and_read_back(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path, clock=lambda: 12.5) as log:
        log.write(STEP, step=1, loss=2.0)
        log.write("eval", step=1, val_loss=3.0, t=99.0)
    records = read_events(path)
    assert records == [
        {"event": "step", "t": 12.5, "step": 1, "loss": 2.0},
        {"event": "eval", "t": 99.0, "step": 1, "val_loss": 3.0},
    ]
    assert [r["step"] for r in read_events(path, STEP)] == [1]


def test_torn_last_line_is_skipped_but_bad_middle_line_is_named(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event":"step","t":1}\n{"event":"st')
    assert len(read_events(path)) == 1
    path.write_text('{"event":"step","t":1}\nnot json\n{"event":"step","t":2}\n')
    with pytest.raises(SpotpipeError, match=r"events.jsonl:2"):
        read_events(path)
    with pytest.raises(SpotpipeError, match="does not exist"):
        read_events(tmp_path / "none.jsonl")
