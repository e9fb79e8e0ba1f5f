"""Recovery rules on tiny modules with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spotpipe.runtime.state.rules import (
    Mirror,
    RecoveryError,
    checkfree_plus_copy,
    checkfree_rebuild,
    checkfree_weights,
    clone_state,
    complete_state,
    copy_from_mirror,
    copy_from_replica,
    export_state,
    import_state,
    merge,
    select,
    state_nbytes,
)


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


def _trained(module: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    x = torch.ones(4, 2)
    for _ in range(2):
        opt.zero_grad()
        h = module(x) if getattr(module, "embed", None) is None else module(x) + module.embed.weight.sum()
        h.pow(2).sum().backward()
        opt.step()
    return opt


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


def test_export_import_round_trip_keeps_optimizer_moments_by_name():
    src = Tiny(0.5, embed=True)
    opt = _trained(src)
    state = export_state(src, opt)
    assert set(state["optim"]) == {n for n, _ in src.named_parameters()}
    dst = Tiny(9.0, embed=True)
    dst_opt = torch.optim.AdamW(dst.parameters(), lr=0.1)
    import_state(dst, dst_opt, state)
    for (n, p), q in zip(src.named_parameters(), dst.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], dst_opt.state[q]["exp_avg"])
    # one more identical step from identical states gives identical weights
    for m, o in ((src, opt), (dst, dst_opt)):
        o.zero_grad()
        (m(torch.ones(1, 2)) + m.embed.weight.sum()).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(src.parameters(), dst.parameters()))


def test_checkfree_plus_copies_partner_blocks_and_moments_with_extras():
    partner = Tiny(2.0)
    popt = _trained(partner)
    edge_embedding = select(export_state(Tiny(0.0, embed=True)), ("embed.",))
    rebuilt = checkfree_plus_copy(export_state(partner, popt), extras=edge_embedding)
    assert set(rebuilt["model"]) == {"embed.weight", *partner.state_dict()}
    assert torch.equal(rebuilt["model"]["blocks.1.weight"], partner.blocks[1].weight)
    assert torch.equal(rebuilt["optim"]["blocks.0.weight"]["exp_avg_sq"], popt.state[partner.blocks[0].weight]["exp_avg_sq"])
    lost = Tiny(7.0, embed=True)
    complete_state(lost.state_dict(), rebuilt)  # covers the edge stage exactly
    import_state(lost, None, rebuilt)
    assert torch.equal(lost.blocks[0].weight, partner.blocks[0].weight)
    with pytest.raises(RecoveryError, match="incomplete"):
        complete_state(lost.state_dict(), checkfree_plus_copy(export_state(partner, popt)))
    with pytest.raises(RecoveryError, match="two parts"):
        merge(edge_embedding, edge_embedding)


def test_replica_and_mirror_copies_are_exact_and_independent():
    m = Tiny(1.0)
    opt = _trained(m)
    rep = copy_from_replica(export_state(m, opt))
    mirror = Mirror(stage=3)
    assert not mirror.ready and mirror.nbytes == 0
    mirror.capture(m, opt, step=10)
    expected = sum(p.numel() * 4 * 3 for p in m.parameters()) + sum(
        s["step"].numel() * s["step"].element_size() for s in opt.state.values())  # weights + 2 moments + step
    assert mirror.nbytes == expected == state_nbytes(export_state(m, opt))
    assert mirror.lag(12) == 2 and mirror.refreshes == 1 and mirror.bytes_sent == expected
    restored = copy_from_mirror(mirror)
    with torch.no_grad():
        m.blocks[0].weight.add_(1.0)  # the live stage moves on; copies must not
    assert not torch.equal(restored["model"]["blocks.0.weight"], m.blocks[0].weight)
    assert torch.equal(restored["model"]["blocks.0.weight"], rep["model"]["blocks.0.weight"])
    restored["model"]["blocks.0.weight"].zero_()
    assert not torch.equal(copy_from_mirror(mirror)["model"]["blocks.0.weight"], restored["model"]["blocks.0.weight"])
    with pytest.raises(RecoveryError, match="never filled"):
        Mirror(1).state()
    assert clone_state(rep)["model"].keys() == rep["model"].keys()


def test_import_refuses_a_state_that_does_not_fit():
    with pytest.raises(RecoveryError, match="does not fit"):
        import_state(Tiny(1.0, embed=True), None, export_state(Tiny(1.0)))
