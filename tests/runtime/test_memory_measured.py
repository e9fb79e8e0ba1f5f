"""Measured memory: the saved-tensor meter, and the memory model's prediction against measurement."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from spotpipe.config import load_config
from spotpipe.data.tokens import TokenFile
from spotpipe.planner import predict_memory
from spotpipe.runtime.inprocess.player import PipelineTrainer
from spotpipe.runtime.pipeline.meter import SavedTensorMeter, state_bytes


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, word_corpus: Callable[..., TokenFile]) -> TokenFile:
    return word_corpus(tmp_path_factory.mktemp("meter"), ["bytes", "held", "for", "backward", "peak", "rank", "saved", "tensor"], seed=5)


@pytest.mark.timeout(30)
def test_meter_counts_each_storage_once_and_releases_after_backward() -> None:
    lin = torch.nn.Linear(16, 16, bias=False)
    meter = SavedTensorMeter(lin.parameters())
    x = torch.randn(4, 16, requires_grad=True)
    with meter.saving():
        h = lin(x)  # saves x (the weight is a parameter: not counted)
        y = (h * h).sum()  # saves h twice: counted once
    assert meter.current == meter.peak == 4 * 16 * 4 + 4 * 16 * 4
    y.backward()
    del y, h
    assert meter.current == 0 and meter.peak == 512
    meter.reset_peak()
    assert meter.peak == 0
    sb = state_bytes([lin], [torch.zeros(16, 16), torch.zeros(16, 16)])
    assert (sb.weights, sb.grads, sb.optimizer) == (1024, 1024, 2048)


SIZES = [("model.d_model=32", "model.heads=2", "model.context=16"),
         ("model.d_model=64", "model.heads=4", "model.context=32"),
         ("model.d_model=96", "model.heads=4", "model.context=32")]
SCHEDULES = [("pipeline.schedule=1f1b",), ("pipeline.schedule=interleaved",), ("pipeline.schedule=chronos",),
             ("pipeline.schedule=chronos", "pipeline.recompute=longest"), ("pipeline.schedule=1f1b", "pipeline.recompute=all"),
             ("pipeline.schedule=chronos", "pipeline.recompute=longest", "pipeline.offload=optimizer")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", SIZES, ids=["d32", "d64", "d96"])
def test_prediction_within_10_percent_of_measurement(corpus: TokenFile, size: tuple[str, ...]) -> None:
    for schedule in SCHEDULES:
        cfg = load_config(None, ["model.layers=8", "pipeline.stages=4", "pipeline.microbatches=4", "train.batch_size=8",
                                 *size, *schedule])
        trainer = PipelineTrainer(cfg, corpus, measure_memory=True)
        trainer.train_step()  # the optimizer state exists from the first update on
        trainer.train_step()
        predicted = predict_memory(cfg)
        for got, want in zip(trainer.last_memory, predicted):
            assert got.activations_peak > 0
            assert got.state.weights == want.weights  # exact: the parameters are what the shapes say
            assert got.peak == pytest.approx(want.peak, rel=0.10), f"{schedule} rank {got.rank}"
            if cfg.pipeline.offload == "optimizer":  # the moments left the device
                assert got.state.optimizer == 0 and want.optimizer == 0 and want.streamed > 0
            else:
                assert got.state.optimizer == want.optimizer  # AdamW's two moments, exactly


def test_the_final_line_gives_the_peak_per_rank() -> None:
    from pathlib import Path

    from spotpipe.runtime.control.progress import RunResult, format_result

    line = format_result(RunResult("finished", Path("runs/x"), last_step=4, wall_s=3.0, peak_bytes=[1_000_000, 1_520_000]))
    assert "peak memory per rank 1/1.52 MB" in line
    assert "peak memory" not in format_result(RunResult("finished", Path("runs/x"), last_step=4, wall_s=3.0))
