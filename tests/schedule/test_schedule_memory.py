"""Resident activations and peak bytes per rank, against the papers' known answers."""

from __future__ import annotations

import pytest

from spotpipe.schedule.generators import gpipe_schedule, interleaved_schedule, one_f_one_b_schedule
from spotpipe.schedule.ir import Schedule, ScheduleError
from spotpipe.schedule.memory import activation_profile, peak_activations, peak_memory_bytes, resident_bytes
from spotpipe.schedule.passes import lower

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("microbatches", [1, 3, 4, 8, 12])
def test_1f1b_peaks_at_stages_minus_rank(stages: int, microbatches: int) -> None:
    s = one_f_one_b_schedule(stages, microbatches)
    expected = [min(stages - r, microbatches) for r in range(stages)]  # S - r when M >= S
    assert peak_activations(s) == expected
    assert peak_activations(lower(s)) == expected


@pytest.mark.parametrize(("stages", "microbatches"), [(1, 1), (3, 4), (4, 8), (6, 12)])
def test_gpipe_peaks_at_microbatches(stages: int, microbatches: int) -> None:
    assert peak_activations(gpipe_schedule(stages, microbatches)) == [microbatches] * stages


def test_profile_over_the_action_sequence() -> None:
    profile = activation_profile(one_f_one_b_schedule(2, 3))
    # rank 0: 0F0 0F1 0B0 0F2 0B1 0B2; rank 1: 1F0 1B0 1F1 1B1 1F2 1B2
    assert profile.counts == ((1, 2, 1, 2, 1, 0), (1, 0, 1, 0, 1, 0))
    assert profile.peaks == (2, 1)
    lowered = activation_profile(lower(one_f_one_b_schedule(2, 3)))
    assert lowered.peaks == (2, 1)
    assert all(row[-1] == 0 for row in lowered.counts)


def test_peak_bytes() -> None:
    s = one_f_one_b_schedule(2, 3)
    # rank 0: 100 + 1000 + 2 x 10; rank 1: 200 + 2000 + 1 x 20
    assert peak_memory_bytes(s, [10, 20], [100, 200], [1000, 2000]) == [1120.0, 2220.0]
    assert resident_bytes(s, [10, 20]) == ((10, 20, 10, 20, 10, 0), (20, 0, 20, 0, 20, 0))


def test_peak_bytes_interleaved_sums_the_chunks_of_a_rank() -> None:
    s = interleaved_schedule(2, 2, 2)  # M == P: all forwards first, every activation resident
    assert peak_activations(s) == [4, 4]
    # rank 0 holds stages 0 and 2: 2 x (1 + 3) activations + 2 x 5 static
    assert peak_memory_bytes(s, [1, 2, 3, 4], 5, 0) == [18.0, 22.0]


def test_errors_name_the_problem() -> None:
    s = one_f_one_b_schedule(2, 2)
    with pytest.raises(ScheduleError, match="activation_bytes has 3 entries, the schedule has 2 stages"):
        peak_memory_bytes(s, [1, 2, 3], 0, 0)
    with pytest.raises(ScheduleError, match="weight_bytes must be >= 0"):
        peak_memory_bytes(s, 1, [-1, 0], 0)
    with pytest.raises(ScheduleError, match="rank 0 step 0: 0B0 frees an activation its forward never made"):
        peak_activations(Schedule.from_rank_texts(["0B0 0F0"]))
