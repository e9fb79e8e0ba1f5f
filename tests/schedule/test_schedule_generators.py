"""Generators as tables of text, derived by hand from each paper's rule."""

from __future__ import annotations

import pytest

from spotpipe.schedule.generators import (
    REGISTRY,
    build_schedule,
    gpipe_schedule,
    interleaved_schedule,
    one_f_one_b_schedule,
)
from spotpipe.schedule.ir import Op, Schedule, ScheduleError, actions_text

pytestmark = pytest.mark.timeout(30)


def rank_texts(schedule: Schedule) -> list[str]:
    return [actions_text(acts) for acts in schedule.ranks]


# 1F1B, S=4, M=8: rank r runs S-1-r warm-up forwards, then F/B pairs, then the remaining backwards.
ONE_F_ONE_B_S4_M8 = [
    "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7",
    "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 1B6 1B7",
    "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7",
    "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7",
]

# GPipe, S=3, M=4: all forwards, then all backwards.
GPIPE_S3_M4 = [
    "0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3",
    "1F0 1F1 1F2 1F3 1B0 1B1 1B2 1B3",
    "2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3",
]

# Interleaved, P=2 ranks, V=2 chunks (rank 0: stages 0, 2; rank 1: stages 1, 3), M=4.
# Warm-up = (P-1-r)*2 + (V-1)*P = 4 on rank 0, 2 on rank 1. The k-th forward is chunk
# (k mod 4) // 2 of microbatch (k // 4) * 2 + k mod 2; backwards take the chunks in reverse.
INTERLEAVED_P2_V2_M4 = [
    "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
    "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
]

# M == P: Megatron-LM runs every forward first.
INTERLEAVED_P2_V2_M2 = [
    "0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1",
    "1F0 1F1 3F0 3F1 3B0 3B1 1B0 1B1",
]


def test_one_f_one_b_table() -> None:
    s = one_f_one_b_schedule(4, 8)
    assert rank_texts(s) == ONE_F_ONE_B_S4_M8
    assert s.stage_to_rank == (0, 1, 2, 3)
    assert (s.num_stages, s.num_microbatches, s.name) == (4, 8, "1f1b")


def test_one_f_one_b_fewer_microbatches_than_stages() -> None:
    # warm-up is capped at M: every rank but the last runs all forwards first
    assert rank_texts(one_f_one_b_schedule(3, 1)) == ["0F0 0B0", "1F0 1B0", "2F0 2B0"]
    assert rank_texts(one_f_one_b_schedule(3, 2)) == ["0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1", "2F0 2B0 2F1 2B1"]


def test_gpipe_table() -> None:
    s = gpipe_schedule(3, 4)
    assert rank_texts(s) == GPIPE_S3_M4
    assert s.name == "gpipe"


def test_interleaved_tables() -> None:
    s = interleaved_schedule(2, 2, 4)
    assert rank_texts(s) == INTERLEAVED_P2_V2_M4
    assert s.stage_to_rank == (0, 1, 0, 1)
    assert s.num_stages == 4
    assert rank_texts(interleaved_schedule(2, 2, 2)) == INTERLEAVED_P2_V2_M2


def test_interleaved_places_stage_on_rank_modulo() -> None:
    s = interleaved_schedule(3, 3, 6)
    assert s.stage_to_rank == tuple(st % 3 for st in range(9))
    for r, acts in enumerate(s.ranks):
        assert {a.stage for a in acts} == {r, r + 3, r + 6}


def test_interleaved_with_one_virtual_stage_is_1f1b() -> None:
    s = interleaved_schedule(4, 1, 8)
    assert rank_texts(s) == ONE_F_ONE_B_S4_M8
    assert s.name == "interleaved"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_rank_runs_each_forward_and_backward_once(name: str) -> None:
    s = build_schedule(name, 3, 6, virtual_stages=2)
    for r, acts in enumerate(s.ranks):
        assert all(a.op in (Op.F, Op.B) for a in acts)
        expected = sorted((st, op, m) for st in s.stages_of_rank(r) for op in ("F", "B") for m in range(6))
        assert sorted((a.stage, a.op.value, a.microbatch) for a in acts) == expected


def test_build_schedule_dispatch() -> None:
    assert rank_texts(build_schedule("1f1b", 4, 8)) == ONE_F_ONE_B_S4_M8
    assert rank_texts(build_schedule("gpipe", 3, 4)) == GPIPE_S3_M4
    assert rank_texts(build_schedule("interleaved", 2, 4, virtual_stages=2)) == INTERLEAVED_P2_V2_M4
    # pipeline.virtual_stages stays set in the config for every schedule: the others ignore it
    assert rank_texts(build_schedule("1f1b", 4, 8, virtual_stages=3)) == ONE_F_ONE_B_S4_M8


def test_build_schedule_unknown_name_lists_allowed() -> None:
    with pytest.raises(ScheduleError, match="unknown schedule 'zb'.*gpipe, 1f1b, interleaved"):
        build_schedule("zb", 4, 8)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: gpipe_schedule(0, 4), "stages must be >= 1, got 0"),
        (lambda: one_f_one_b_schedule(2, 0), "microbatches must be >= 1, got 0"),
        (lambda: interleaved_schedule(2, 0, 4), "virtual_stages must be >= 1"),
        (lambda: interleaved_schedule(4, 2, 6), r"microbatches \(6\) must be a multiple of stages \(4\)"),
        (lambda: gpipe_schedule(2.0, 4), "stages must be an integer"),  # type: ignore[arg-type]
    ],
)
def test_bad_sizes(call: object, pattern: str) -> None:
    with pytest.raises(ScheduleError, match=pattern):
        call()  # type: ignore[operator]
