"""The learning-rate schedule every training mode shares (``runtime/state/optim.py: lr_at``)."""

from __future__ import annotations

import pytest

from spotpipe.config import TrainConfig
from spotpipe.runtime.state.optim import lr_at


def test_issue_example_rises_to_one_peak_and_ends_on_the_floor() -> None:
    train = TrainConfig(steps=6, warmup_steps=2, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(step, train) for step in range(6)]
    # warmup 1/2, 2/2 of the peak; cosine over steps 1..5 (4 intervals) down to 1e-4 at step 5
    assert lrs == pytest.approx([5e-4, 1e-3, 8.681980515e-4, 5.5e-4, 2.318019485e-4, 1e-4], rel=1e-9)
    assert lrs.count(max(lrs)) == 1
    assert lrs[-1] == 0.1 * 1e-3


@pytest.mark.parametrize("steps,warmup", [(1, 0), (2, 0), (5, 0), (6, 2), (30, 5), (500, 30), (7, 6)])
def test_last_step_is_at_the_floor_and_the_peak_is_held_once(steps: int, warmup: int) -> None:
    train = TrainConfig(steps=steps, warmup_steps=warmup, lr=3e-3, min_lr_ratio=0.25)
    lrs = [lr_at(step, train) for step in range(steps)]
    peak_step = max(warmup - 1, 0)
    assert lrs[peak_step] == 3e-3
    assert all(lr < 3e-3 for i, lr in enumerate(lrs) if i != peak_step)
    if steps - 1 > peak_step:
        assert lrs[-1] == 3e-3 * 0.25
    assert all(a < b for a, b in zip(lrs[:peak_step], lrs[1 : peak_step + 1]))  # rising warmup
    assert all(a > b for a, b in zip(lrs[peak_step:], lrs[peak_step + 1 :]))  # falling decay


def test_warmup_longer_than_the_run_only_warms_up() -> None:
    train = TrainConfig(steps=3, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert [lr_at(step, train) for step in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])


def test_min_lr_ratio_one_is_constant_after_warmup() -> None:
    train = TrainConfig(steps=10, warmup_steps=2, lr=1e-3, min_lr_ratio=1.0)
    assert [lr_at(step, train) for step in range(1, 10)] == pytest.approx([1e-3] * 9)
