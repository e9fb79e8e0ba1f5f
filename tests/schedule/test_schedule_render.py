"""Renderers: the ideal-time grid and its bubble, CSV round trip, Chrome trace."""

from __future__ import annotations

import json

import pytest

from spotpipe.schedule.generators import build_schedule, gpipe_schedule, interleaved_schedule, one_f_one_b_schedule
from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError
from spotpipe.schedule.passes import lower
from spotpipe.schedule.render import (
    FORMATS,
    bubble_fraction,
    chrome_trace,
    chrome_trace_json,
    render,
    render_grid,
    unit_timeline,
)

pytestmark = pytest.mark.timeout(30)


def grid_rows(text: str) -> list[list[str]]:
    """The grid's cells per rank (the header and footer left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("rank "):
            rows.append(line.split()[2:])
    return rows


def test_gpipe_grid() -> None:
    text = render_grid(gpipe_schedule(2, 2))
    assert grid_rows(text) == [
        ["0F0", "0F1", ".", ".", "0B0", "0B1"],
        [".", "1F0", "1F1", "1B0", "1B1", "."],
    ]
    assert text.splitlines()[0].split() == ["time", "0", "1", "2", "3", "4", "5"]
    assert text.splitlines()[-1].endswith("makespan 6 steps, bubble 33.3%")


def test_1f1b_grid() -> None:
    rows = grid_rows(render_grid(one_f_one_b_schedule(3, 3)))
    assert rows == [
        ["0F0", "0F1", "0F2", ".", ".", "0B0", ".", "0B1", ".", "0B2"],
        [".", "1F0", "1F1", ".", "1B0", "1F2", "1B1", ".", "1B2", "."],
        [".", ".", "2F0", "2B0", "2F1", "2B1", "2F2", "2B2", ".", "."],
    ]


def test_lowered_grid_matches_compute_only() -> None:
    for s in (one_f_one_b_schedule(4, 8), interleaved_schedule(2, 3, 4)):
        assert grid_rows(render_grid(lower(s))) == grid_rows(render_grid(s))


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("microbatches", [1, 2, 5, 8, 12])
def test_bubble_fraction_gpipe_and_1f1b(stages: int, microbatches: int) -> None:
    expected = (stages - 1) / (microbatches + stages - 1)
    for s in (gpipe_schedule(stages, microbatches), one_f_one_b_schedule(stages, microbatches)):
        assert bubble_fraction(s) == pytest.approx(expected, abs=1e-12)
        assert bubble_fraction(lower(s)) == pytest.approx(expected, abs=1e-12)
        timeline = unit_timeline(s)
        assert timeline.makespan == 2 * (microbatches + stages - 1)


@pytest.mark.parametrize(("ranks", "virtual", "microbatches"), [(2, 2, 4), (4, 2, 8), (4, 3, 8), (3, 2, 9), (4, 2, 4)])
def test_bubble_fraction_interleaved(ranks: int, virtual: int, microbatches: int) -> None:
    # Narayanan et al. SC'21: the bubble shrinks by V, (P-1)/(V*M + P-1) in chunk-sized steps
    s = interleaved_schedule(ranks, virtual, microbatches)
    expected = (ranks - 1) / (virtual * microbatches + ranks - 1)
    assert bubble_fraction(s) == pytest.approx(expected, abs=1e-12)
    assert bubble_fraction(s) < bubble_fraction(one_f_one_b_schedule(ranks, microbatches))


def test_csv_round_trip_every_kind() -> None:
    schedules = [
        gpipe_schedule(3, 5),
        lower(one_f_one_b_schedule(4, 8)),
        lower(interleaved_schedule(2, 3, 4)),
        lower(Schedule.from_rank_texts(["0F0 0F1 0B0 0B1", "1F0 1B0", "2F0 2F1 2B0 2B1"], paths=[(0, 1, 2), (0, 2)])),
    ]
    for s in schedules:
        text = render(s, "csv")
        back = Schedule.from_csv(text)
        assert back == s
        assert back.to_csv() == text


def test_chrome_trace_parses_and_covers_every_action() -> None:
    s = lower(one_f_one_b_schedule(3, 4))
    trace = json.loads(chrome_trace_json(s))
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(len(acts) for acts in s.ranks)
    assert {e["pid"] for e in events} == {0, 1, 2}
    names = {(e["pid"], e["name"]) for e in events}
    assert (1, "1RECV_F2") in names and (2, "2B3") in names
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert sorted(e["args"]["name"] for e in meta) == ["rank 0", "rank 1", "rank 2"]
    # compute events of one rank never overlap and follow the list order
    for r in range(3):
        compute = [e for e in events if e["pid"] == r and e["tid"] == 0]
        assert [e["name"] for e in compute] == [str(a) for a in s.ranks[r] if a.op.is_compute]
        for a, b in zip(compute, compute[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-9
    assert trace["otherData"]["microbatches"] == 4


def test_chrome_trace_uses_given_durations() -> None:
    def duration(a: Action) -> float:
        return {Op.F: 0.002, Op.B: 0.004}.get(a.op, 0.001 if a.op.is_send else 0.0)

    trace = chrome_trace(lower(one_f_one_b_schedule(2, 1)), duration)
    by_name = {e["name"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    assert by_name["0F0"]["ts"] == pytest.approx(0.0) and by_name["0F0"]["dur"] == pytest.approx(2000.0)
    assert by_name["0SEND_F0"]["dur"] == pytest.approx(1000.0)
    assert by_name["1F0"]["ts"] == pytest.approx(3000.0)
    assert by_name["0B0"]["ts"] == pytest.approx(10000.0)  # 1B0 ends at 9 ms, the gradient takes 1 ms


def test_render_formats_and_errors() -> None:
    s = build_schedule("1f1b", 2, 2)
    assert render(s, "text") == "rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1B0 1F1 1B1"
    assert set(FORMATS) == {"grid", "text", "csv", "chrome"}
    with pytest.raises(ScheduleError, match="unknown format 'svg': allowed values are grid, text, csv, chrome"):
        render(s, "svg")
    with pytest.raises(ScheduleError, match="deadlock"):
        render_grid(Schedule.from_rank_texts(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"]))
