"""Bytes per chunk from the config, and the job's predicted memory per rank."""

from __future__ import annotations

import pytest

from spotpipe.config import load_config
from spotpipe.model.partition import model_shapes
from spotpipe.planner import chunk_bytes, predict_memory
from spotpipe.schedule.ir import Op

pytestmark = pytest.mark.timeout(30)

BASE = ("model.layers=8", "model.d_model=64", "model.heads=4", "model.context=32", "pipeline.stages=4",
        "pipeline.microbatches=8", "train.batch_size=16")


def test_chunk_bytes_from_the_shapes() -> None:
    cfg = load_config(None, list(BASE))
    sizes = chunk_bytes(cfg)
    shapes = model_shapes(cfg.model, 4)
    assert len(sizes) == 4
    for i, (c, s) in enumerate(zip(sizes, shapes)):
        assert c.weights == c.grads == 4 * s.params  # fp32
        assert c.optimizer == 2 * c.weights  # AdamW: two moments
        assert c.activations == 2 * s.activation_bytes_per_sequence  # 16 / 8 = 2 sequences per microbatch
        assert c.input == (0 if i == 0 else 2 * 32 * 64 * 4)  # the hidden state it receives


def test_the_same_model_cut_in_twice_as_many_chunks_has_the_same_bytes() -> None:
    ref = chunk_bytes(load_config(None, list(BASE)))
    v = chunk_bytes(load_config(None, [*BASE, "pipeline.schedule=chronos"]))
    assert len(v) == 8
    for key in ("weights", "grads", "optimizer", "activations"):
        assert sum(getattr(c, key) for c in v) == pytest.approx(sum(getattr(c, key) for c in ref))


def test_predicted_peaks_follow_the_schedule() -> None:
    plain = predict_memory(load_config(None, list(BASE)))
    chronos = predict_memory(load_config(None, [*BASE, "pipeline.schedule=chronos"]))
    recomputed = predict_memory(load_config(None, [*BASE, "pipeline.schedule=chronos", "pipeline.recompute=longest"]))
    assert [r.peak_action.op for r in plain if r.peak_action] == [Op.F] * 4
    assert max(r.peak for r in chronos) < max(r.peak for r in plain)
    assert max(r.peak for r in recomputed) < max(r.peak for r in chronos)
    assert all(r.peak_activations < c.peak_activations for r, c in zip(recomputed, chronos))
