"""Recovery rules on tiny modules with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spotpipe.runtime.state.rules import RecoveryError, checkfree_rebuild, checkfree_weights, complete_state


class Tiny(nn.Module):
    """A chunk-shaped module: two 'blocks', and optionally an embedding."""

    def __init__(self, fill: float, embed: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 2) if embed else None
        self.blocks = nn.ModuleList(nn.Linear(2, 2, bias=True) for _ in range(2))
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.fill_(fill + i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def test_checkfree_is_the_weighted_average_of_the_neighbours():
    prev, nxt = Tiny(1.0).state_dict(), Tiny(4.0).state_dict()
    out = checkfree_rebuild(prev, nxt, 1.0, 3.0)  # (1*W_prev + 3*W_next) / 4
    assert set(out) == set(prev)
    for k in out:
        assert torch.allclose(out[k], 0.25 * prev[k] + 0.75 * nxt[k])
    assert out["blocks.0.weight"][0, 0].item() == pytest.approx(0.25 * 1 + 0.75 * 4)
    # equal weights: the plain mean; named states are accepted too
    mean = checkfree_rebuild({"model": prev}, {"model": nxt}, 2.0, 2.0)
    assert torch.allclose(mean["blocks.1.bias"], (prev["blocks.1.bias"] + nxt["blocks.1.bias"]) / 2)


def test_checkfree_weights_and_fallbacks():
    assert checkfree_weights(1.0, 3.0) == pytest.approx((0.25, 0.75))
    assert checkfree_weights(5.0, 5.0) == (0.5, 0.5)
    assert checkfree_weights(float("nan"), 1.0) == (0.5, 0.5)
    assert checkfree_weights(0.0, 0.0) == (0.5, 0.5)
    # invariant under a common (global clipping) factor
    assert checkfree_weights(0.3 * 2.0, 0.3 * 6.0) == pytest.approx(checkfree_weights(2.0, 6.0))


def test_checkfree_refuses_mismatched_blocks():
    a = Tiny(1.0).state_dict()
    b = {k: v for k, v in Tiny(2.0).state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(RecoveryError, match="identical blocks"):
        checkfree_rebuild(a, b, 1.0, 1.0)


def test_complete_state_refuses_missing_unexpected_or_reshaped_keys():
    """A rebuilt state must cover the stage exactly (named or plain state dicts)."""
    edge = Tiny(7.0, embed=True).state_dict()
    complete_state(edge, {"model": Tiny(2.0, embed=True).state_dict()})  # covers the edge stage exactly
    with pytest.raises(RecoveryError, match="incomplete"):
        complete_state(edge, Tiny(2.0).state_dict())  # no embedding
    with pytest.raises(RecoveryError, match="incomplete"):
        complete_state(Tiny(2.0).state_dict(), edge)  # an unexpected embedding
    reshaped = {**edge, "blocks.0.bias": torch.zeros(3)}
    with pytest.raises(RecoveryError, match="blocks.0.bias"):
        complete_state(edge, reshaped)
