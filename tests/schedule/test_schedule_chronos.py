"""The chronos schedule: V placement, validity, length against 1F1B, and shorter activation lifetimes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from spotpipe.schedule.chronos import FORWARD_UNITS, BACKWARD_UNITS, chronos_schedule, modulo_offsets, v_stage_to_rank
from spotpipe.schedule.generators import REGISTRY, build_schedule, model_chunks, one_f_one_b_schedule
from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError
from spotpipe.schedule.memory import resident_bytes
from spotpipe.schedule.passes import lower
from spotpipe.schedule.validate import check_schedule, simulate_schedule

pytestmark = pytest.mark.timeout(60)


def _chunk_units(action: Action) -> float:
    """A chronos chunk is half a 1F1B stage: forward 1, backward 2 units."""
    if not action.op.is_compute:
        return 0.0
    return float(FORWARD_UNITS if action.op is Op.F else BACKWARD_UNITS)


def _stage_units(action: Action) -> float:
    """A 1F1B stage holds two chronos chunks: forward 2, backward 4 units."""
    return 2 * _chunk_units(action)


def test_v_placement() -> None:
    assert v_stage_to_rank(4) == (0, 1, 2, 3, 3, 2, 1, 0)
    s = chronos_schedule(4, 8)
    assert s.num_stages == 8 and s.num_ranks == 4
    for r in range(4):
        assert s.stages_of_rank(r) == (r, 7 - r)  # one shallow and one deep chunk


def test_registered_and_chunked() -> None:
    assert "chronos" in REGISTRY
    assert model_chunks("chronos", 4, 2) == 8
    assert build_schedule("chronos", 3, 6, 2).to_text() == chronos_schedule(3, 6).to_text()


@pytest.mark.parametrize(("stages", "microbatches"), [(1, 1), (1, 4), (2, 3), (3, 7), (4, 4), (4, 8), (6, 12), (8, 16)])
def test_valid_and_deadlock_free(stages: int, microbatches: int) -> None:
    s = chronos_schedule(stages, microbatches)
    assert check_schedule(s) == []
    lowered = lower(s)
    assert check_schedule(lowered) == []
    assert check_schedule(lowered, blocking_recv=True) == []
    for r in range(stages):  # every chunk runs every forward and backward once, forwards in order
        for stage in s.stages_of_rank(r):
            fwd = [a.microbatch for a in s.ranks[r] if a.stage == stage and a.op is Op.F]
            bwd = [a.microbatch for a in s.ranks[r] if a.stage == stage and a.op is Op.B]
            assert fwd == list(range(microbatches)) and bwd == list(range(microbatches))


@pytest.mark.parametrize(("stages", "microbatches"), [(1, 4), (4, 4), (4, 8), (4, 16), (8, 16), (8, 32)])
def test_step_no_longer_than_1f1b(stages: int, microbatches: int) -> None:
    # Same model, same total work: a chronos chunk is half a 1F1B stage.
    chronos = simulate_schedule(chronos_schedule(stages, microbatches), _chunk_units).makespan
    reference = simulate_schedule(one_f_one_b_schedule(stages, microbatches), _stage_units).makespan
    assert chronos <= reference * 1.01


@pytest.mark.parametrize(("stages", "microbatches"), [(4, 8), (4, 16), (5, 10), (6, 12), (8, 16), (8, 32)])
def test_activation_peak_below_1f1b(stages: int, microbatches: int) -> None:
    # One microbatch's activations of the whole model = 1; a chunk holds 1/(2S), a stage 1/S.
    chronos = [max(row) for row in resident_bytes(chronos_schedule(stages, microbatches), 1 / (2 * stages))]
    ref = [max(row) for row in resident_bytes(one_f_one_b_schedule(stages, microbatches), 1 / stages)]
    assert ref[0] == pytest.approx(1.0)  # 1F1B: S microbatches of 1/S on rank 0 (Narayanan et al. 2021)
    assert max(chronos) <= 0.81 * max(ref)
    assert max(chronos) - min(chronos) <= 0.15  # the V evens the load over ranks; 1F1B's spread is 1 - 1/S
    assert max(ref) - min(ref) == pytest.approx(1 - 1 / stages)


def test_lifetimes_on_the_busiest_rank_shorter_than_1f1b() -> None:
    # Per rank: resident activation bytes integrated over the step's time (one microbatch of the
    # whole model = 1 byte), i.e. lifetimes weighted by size. 1F1B's rank 0 keeps every
    # microbatch for a whole round trip; the V splits each rank's load into a long-lived shallow
    # and a short-lived deep chunk of half the size.
    stages, microbatches = 4, 16

    def per_rank(schedule: Schedule, units: Callable[[Action], float], size: float) -> list[float]:
        tl = simulate_schedule(schedule, units)
        start = {t.action: t.start for row in tl.timings for t in row if t.action.op is Op.F}
        out = [0.0] * schedule.num_ranks
        for row in tl.timings:
            for t in row:
                if t.action.op is Op.B:
                    out[t.rank] += (t.end - start[Action(t.action.stage, Op.F, t.action.microbatch)]) * size
        return out

    chronos = per_rank(chronos_schedule(stages, microbatches), _chunk_units, 1 / (2 * stages))
    ref = per_rank(one_f_one_b_schedule(stages, microbatches), _stage_units, 1 / stages)
    assert max(chronos) < 0.7 * max(ref)
    assert sum(chronos) == pytest.approx(sum(ref), rel=0.15)  # the same total, spread evenly


def test_pattern_repeats_every_period() -> None:
    offsets = modulo_offsets(4, 6)
    assert offsets is not None and len(offsets) == 16
    ends = [o + (1 if k < 8 else 2) for k, o in enumerate(offsets)]
    assert all(offsets[k + 1] >= ends[k] for k in range(15))  # the chain's dependencies


def test_bad_arguments() -> None:
    with pytest.raises(ScheduleError, match="pipeline.virtual_stages must be 2"):
        chronos_schedule(4, 8, 3)
    with pytest.raises(ScheduleError, match="microbatches must be an integer >= 1"):
        chronos_schedule(4, 0)
    with pytest.raises(ScheduleError, match="period must be >= 6"):
        chronos_schedule(4, 8, 2, period=5)


def test_config_names_the_key() -> None:
    from spotpipe.config import load_config
    from spotpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="pipeline.virtual_stages must be 2 for the chronos schedule"):
        load_config(None, ["pipeline.schedule=chronos", "pipeline.virtual_stages=3", "model.layers=12"])
    cfg = load_config(None, ["pipeline.schedule=chronos"])
    assert cfg.pipeline.virtual_stages == 2


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 4), (4, 4), (4, 8), (8, 16)])
def test_lowered_chronos_sends_in_the_receivers_order(stages: int, microbatches: int) -> None:
    # The V makes each rank both feed and be fed by a neighbour; lowering delays sends so that an
    # order-matching transport (NCCL) sees one message order per rank pair.
    from spotpipe.schedule.passes import add_communication, order_sends_by_receives
    from spotpipe.schedule.validate import check_message_order

    compute = chronos_schedule(stages, microbatches)
    assert check_message_order(add_communication(compute))  # the V's raw lowering mixes them up
    lowered = lower(compute)
    assert check_message_order(lowered) == []
    assert check_schedule(lowered, blocking_recv=True) == []
    assert order_sends_by_receives(lowered) == lowered  # idempotent
    for name in ("gpipe", "1f1b", "interleaved"):  # the others already agree: nothing moves
        other = build_schedule(name, 4, 8, 2)
        assert lower(other) == add_communication(other)


def test_order_sends_names_a_send_nobody_receives() -> None:
    from spotpipe.schedule.ir import Schedule
    from spotpipe.schedule.passes import order_sends_by_receives

    s = Schedule.from_rank_texts(["0F0 0SEND_F0", "1F0 1B0"], num_microbatches=1)
    with pytest.raises(ScheduleError, match="rank 0 has 0SEND_F0 but rank 1 never receives it"):
        order_sends_by_receives(s)
