"""chronos, recompute and optimizer offload on the real executor reproduce 1F1B's training exactly (fp32, CPU).

Every rank's executor plays the job's lowered schedule in this process
(:class:`~spotpipe.runtime.inprocess.player.PipelineTrainer`), so the check covers the schedule,
the lowering, the ``R`` action and the stage runner's recompute, without spawning processes.
"""

from __future__ import annotations

from collections.abc import Callable

import os

import pytest
import torch

from spotpipe.config import load_config
from spotpipe.data.tokens import TokenFile
from spotpipe.runtime.inprocess.player import PipelineTrainer
from spotpipe.schedule.build import job_schedule
from spotpipe.schedule.ir import Op

TINY = ("model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=4",
        "pipeline.microbatches=4", "pipeline.virtual_stages=2", "train.batch_size=8", "train.steps=30",
        "train.warmup_steps=3", "train.eval_every=0", "run.progress=false")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, word_corpus: Callable[..., TokenFile]) -> TokenFile:
    return word_corpus(tmp_path_factory.mktemp("chronos"), ["spot", "stage", "loss", "chronos", "recompute", "pipe", "line", "memory"], seed=3)


#: ``SPOTPIPE_TEST_DEVICE=cuda`` plays the same steps on the GPU (bench/gpu_check.sh); default CPU.
DEVICE = os.environ.get("SPOTPIPE_TEST_DEVICE", "cpu")


def _losses(corpus: TokenFile, *extra: str, steps: int = 30) -> list[float]:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("SPOTPIPE_TEST_DEVICE=cuda but no CUDA device")
    trainer = PipelineTrainer(load_config(None, [*TINY, *extra]), corpus, device=DEVICE)
    return [trainer.train_step().loss for _ in range(steps)]


@pytest.fixture(scope="module")
def reference(corpus: TokenFile) -> list[float]:
    return _losses(corpus, "pipeline.schedule=1f1b")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [
    ("pipeline.schedule=chronos",),
    ("pipeline.schedule=chronos", "pipeline.recompute=longest"),
    ("pipeline.schedule=chronos", "pipeline.recompute=all"),
    ("pipeline.schedule=1f1b", "pipeline.recompute=all"),
    ("pipeline.schedule=chronos", "pipeline.recompute=longest", "pipeline.offload=optimizer"),
])
def test_30_steps_equal_1f1b(corpus: TokenFile, reference: list[float], extra: tuple[str, ...]) -> None:
    cfg = load_config(None, [*TINY, *extra])
    sched = job_schedule(cfg)
    recomputes = sum(1 for acts in sched.ranks for a in acts if a.op is Op.R)
    if "recompute" in " ".join(extra):
        assert recomputes > 0  # the R actions are really in the schedule the executor plays
    losses = _losses(corpus, *extra)
    assert len(losses) == 30
    for step, (got, want) in enumerate(zip(losses, reference)):
        assert got == pytest.approx(want, rel=1e-5), f"step {step}: {got} vs 1f1b {want}"
    assert losses[-1] < losses[0]  # it trains


@pytest.mark.timeout(60)
def test_executor_plays_the_recomputes(corpus: TokenFile) -> None:
    cfg = load_config(None, [*TINY, "pipeline.schedule=chronos", "pipeline.recompute=longest"])
    trainer = PipelineTrainer(cfg, corpus, device=DEVICE if torch.cuda.is_available() else "cpu")
    trainer.train_step()
    want = trainer.schedule
    for rank in range(want.num_ranks):
        computes = [(a.op.value, a.stage, a.microbatch) for a in want.ranks[rank] if a.op.is_compute]
        assert [t for t in trainer.last_trace[rank] if t[0] in ("F", "B", "R")] == computes
