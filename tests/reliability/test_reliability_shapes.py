"""Time at each shape of an elastic run and the throughput lost to shrinking (reliability.shapes)."""

from __future__ import annotations

import pytest

from spotpipe.reliability.shapes import shape_times


def step(step: int, shape: str, t: float, gen: int) -> dict[str, object]:
    return {"event": "step", "step": step, "shape": shape, "step_time": t, "generation": gen}


def test_the_smaller_shape_is_priced_against_the_configured_median() -> None:
    records = [step(0, "4x1", 5.0, 1), step(1, "4x1", 1.0, 1), step(2, "4x1", 1.0, 1), step(3, "4x1", 3.0, 1),
               {"event": "reshape", "kind": "shrink"},
               step(4, "3x1", 9.0, 2), step(5, "3x1", 1.5, 2), step(6, "3x1", 2.0, 2), step(7, "4x1", 1.0, 3)]
    got = shape_times(records, "4x1")
    assert got is not None
    assert got.seconds == (("4x1", 11.0, 5), ("3x1", 12.5, 3))
    assert got.median_step_s["4x1"] == pytest.approx(1.0)  # steady steps 1, 2, 3 (the first of a generation excluded)
    assert got.shrink_lost_s == pytest.approx(0.5 + 1.0)  # steps 5 and 6 over the median; step 4 (set-up) is not steady
    slower = shape_times([*records[:5], step(4, "3x1", 9.0, 2), step(5, "3x1", 4.0, 2), step(6, "3x1", 3.5, 2)], "4x1")
    assert slower is not None and slower.shrink_lost_s == pytest.approx(3.0 + 2.5)
    assert "3x1 16.5 s (3 steps)" in slower.line() and "5.5 s lost to shrinking" in slower.line()


def test_a_run_that_never_reshaped_has_no_shape_times() -> None:
    assert shape_times([step(0, "4x1", 1.0, 1), step(1, "4x1", 1.0, 1)], "4x1") is None
    assert shape_times([{"event": "step", "step": 0, "step_time": 1.0}], "4x1") is None
