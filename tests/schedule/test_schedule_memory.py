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


# -- the full model: weights, gradients, optimizer state, activations; recompute and offload --------

from spotpipe.schedule.chronos import chronos_schedule  # noqa: E402
from spotpipe.schedule.ir import Action, Op  # noqa: E402
from spotpipe.schedule.memory import ChunkBytes, memory_profile  # noqa: E402
from spotpipe.schedule.passes import add_recompute  # noqa: E402

W, G, O, A, X = 1000.0, 1000.0, 2000.0, 300.0, 40.0


def _uniform(stages: int) -> list[ChunkBytes]:
    return [ChunkBytes(W, G, O, A, 0.0 if s == 0 else X) for s in range(stages)]


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 4), (4, 4), (4, 8), (6, 12)])
def test_profile_1f1b_known_peaks(stages: int, microbatches: int) -> None:
    prof = memory_profile(lower(one_f_one_b_schedule(stages, microbatches)), _uniform(stages))
    for r, rank in enumerate(prof):
        assert (rank.weights, rank.grads, rank.optimizer, rank.streamed) == (W, G, O, 0.0)
        assert rank.peak == W + G + O + (stages - r) * A  # S - r resident (Narayanan et al. 2021)
        # the peak is reached by the first steady-state forward, F(S-1-r)
        assert rank.peak_action == Action(r, Op.F, stages - 1 - r)


def test_profile_gpipe_holds_every_microbatch() -> None:
    prof = memory_profile(gpipe_schedule(3, 5), _uniform(3))
    assert [r.peak for r in prof] == [W + G + O + 5 * A] * 3
    assert [r.peak_action for r in prof] == [Action(s, Op.F, 4) for s in range(3)]


def test_profile_full_recompute_keeps_inputs_and_one_activation() -> None:
    stages = 4
    sched = add_recompute(lower(one_f_one_b_schedule(stages, 8)), range(stages))
    prof = memory_profile(sched, _uniform(stages))
    assert prof[0].peak == W + G + O + A  # token ids cost nothing: only the one being recomputed
    for r in range(1, stages):
        # S - r inputs kept; the oldest one grows back to its full activation in its R
        assert prof[r].peak == W + G + O + (stages - r - 1) * X + A
        assert prof[r].peak_action is not None and prof[r].peak_action.op is Op.R
    assert all(row.activations[-1] == 0 for row in prof)


def test_profile_offload_streams_one_chunk_back_for_the_step() -> None:
    sizes = [ChunkBytes(W, G, O * (s + 1), A, X) for s in range(8)]
    sched = chronos_schedule(4, 8)
    plain = memory_profile(sched, sizes)
    away = memory_profile(sched, sizes, offload=range(8))
    for r in range(4):
        own = sched.stages_of_rank(r)
        assert plain[r].optimizer == sum(O * (s + 1) for s in own)
        assert away[r].optimizer == 0.0 and away[r].streamed == max(O * (s + 1) for s in own)
        assert away[r].peak == max(2 * (W + G) + away[r].streamed, 2 * (W + G) + plain[r].peak_activations)
    # a tiny step-time budget: with huge optimizer states the optimizer step is the peak
    big = [ChunkBytes(1, 1, 1e9, 1, 0) for _ in range(2)]
    step = memory_profile(one_f_one_b_schedule(2, 2), big, offload=[0])
    assert step[0].peak_index == -1 and step[0].peak_action is None and step[0].peak == 2 + 1e9


def test_chronos_needs_less_than_1f1b_for_the_same_model() -> None:
    # The same model: a 1F1B stage is two chronos chunks (weights and activations split in two).
    stages, mbs = 4, 8
    ref = memory_profile(one_f_one_b_schedule(stages, mbs), [ChunkBytes(2 * W, 2 * G, 2 * O, 2 * A, X)] * stages)
    chronos = memory_profile(chronos_schedule(stages, mbs), [ChunkBytes(W, G, O, A, X)] * (2 * stages))
    assert [r.static for r in chronos] == [r.static for r in ref]
    assert max(r.peak_activations for r in chronos) <= 0.8 * max(r.peak_activations for r in ref)
    assert max(r.peak for r in chronos) < max(r.peak for r in ref)


def test_profile_errors_name_the_problem() -> None:
    s = one_f_one_b_schedule(2, 2)
    with pytest.raises(ScheduleError, match="3 chunk sizes for the 2 stages of the 1f1b schedule"):
        memory_profile(s, _uniform(3))
    with pytest.raises(ScheduleError, match=r"offload of chunk\(s\) \[5\]: the 1f1b schedule has chunks 0..1"):
        memory_profile(s, _uniform(2), offload=[5])
    with pytest.raises(ScheduleError, match="chunk 1 has negative bytes"):
        memory_profile(s, [ChunkBytes(1, 1, 1, 1), ChunkBytes(1, -1, 1, 1)])
