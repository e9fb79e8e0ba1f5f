"""Golden CSV files of the generated schedules; refresh with UPDATE_GOLDEN=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotpipe.schedule.generators import build_schedule
from spotpipe.schedule.ir import Schedule
from spotpipe.schedule.passes import lower
from spotpipe.schedule.validate import check_schedule

pytestmark = pytest.mark.timeout(30)

GOLDEN = Path(__file__).resolve().parent / "golden"

CASES = {
    "gpipe_s4_m8": ("gpipe", 4, 8, 1, False),
    "1f1b_s4_m8": ("1f1b", 4, 8, 1, False),
    "interleaved_s4_v2_m8": ("interleaved", 4, 2, 8, False),
    "1f1b_s4_m8_lowered": ("1f1b", 4, 8, 1, True),
    "interleaved_s4_v2_m8_lowered": ("interleaved", 4, 2, 8, True),
}


def make(name: str, stages: int, a: int, b: int, lowered: bool) -> Schedule:
    if name == "interleaved":
        schedule = build_schedule(name, stages, b, virtual_stages=a)
    else:
        schedule = build_schedule(name, stages, a)
    return lower(schedule) if lowered else schedule


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_csv(case: str) -> None:
    schedule = make(*CASES[case])
    text = schedule.to_csv()
    path = GOLDEN / f"{case}.csv"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run UPDATE_GOLDEN=1 pytest tests/schedule"
    assert text == path.read_text(), f"{case} changed: inspect the diff, then refresh with UPDATE_GOLDEN=1"
    stored = Schedule.from_csv(path.read_text(), where=str(path))
    assert stored == schedule
    assert check_schedule(stored) == []
