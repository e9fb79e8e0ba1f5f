"""The decoder and its pipeline chunks: equal losses/gradients, seeded init, GQA, RoPE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spotpipe.config import ModelConfig
from spotpipe.errors import SpotpipeError
from spotpipe.model.stages import StageModule, build_stage, split_model
from spotpipe.model.transformer import Rotary, apply_rotary, build_model

CFG = ModelConfig(layers=4, d_model=32, heads=4, kv_heads=2, vocab_size=61, context=16)


def _batch(cfg: ModelConfig, b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (b, cfg.context + 1), generator=gen)
    return data[:, :-1], data[:, 1:]


def _chain(stages: list, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = tokens
    for stage in stages[:-1]:
        x = stage(x)
    return stages[-1](x, targets)


def _full_grads(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    return {layer: torch.cat([p.grad.flatten() for p in model.blocks[layer].parameters()]) for layer in range(len(model.blocks))}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cfg", [CFG, ModelConfig(layers=5, d_model=32, heads=2, vocab_size=50, context=8)])
def test_chained_stages_equal_full_model_for_every_chunk_count(cfg: ModelConfig) -> None:
    tokens, targets = _batch(cfg)
    model = build_model(cfg, seed=7)
    loss = model.loss(tokens, targets)
    loss.backward()
    block_grads = _full_grads(model)
    for n in range(1, cfg.layers + 1):
        stages = [build_stage(cfg, 7, i, n) for i in range(n)]
        chained = _chain(stages, tokens, targets)
        assert torch.allclose(chained, loss, rtol=1e-6, atol=0), (n, chained, loss)
        chained.backward()
        torch.testing.assert_close(stages[0].embed.weight.grad, model.embed.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stages[-1].head.weight.grad, model.head.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stages[-1].norm.weight.grad, model.norm.weight.grad, rtol=1e-5, atol=1e-7)
        for stage in stages:
            start, _ = stage.layer_range
            for j, block in enumerate(stage.blocks):
                got = torch.cat([p.grad.flatten() for p in block.parameters()])
                torch.testing.assert_close(got, block_grads[start + j], rtol=1e-5, atol=1e-7)


def test_build_stage_weights_equal_the_same_part_of_build_model() -> None:
    model = build_model(CFG, seed=3)
    other_seed = build_model(CFG, seed=4)
    stages = [build_stage(CFG, 3, i, 3) for i in range(3)]
    assert [s.layer_range for s in stages] == [(0, 2), (2, 3), (3, 4)]
    assert torch.equal(stages[0].embed.weight, model.embed.weight)
    assert torch.equal(stages[2].head.weight, model.head.weight)
    for stage in stages:
        for j, block in enumerate(stage.blocks):
            for (name, p), q in zip(block.named_parameters(), model.blocks[stage.layer_range[0] + j].parameters()):
                assert torch.equal(p, q), name
    assert not torch.equal(model.embed.weight, other_seed.embed.weight)
    # every block draws different weights
    assert not torch.equal(model.blocks[0].attn.wq.weight, model.blocks[1].attn.wq.weight)


def test_building_leaves_global_rng_untouched_and_init_scales() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = build_model(ModelConfig(layers=8, d_model=64, heads=4), seed=0)
    assert torch.equal(before, torch.get_rng_state())
    wq = model.blocks[0].attn.wq.weight
    wo = model.blocks[0].attn.wo.weight
    assert abs(wq.std().item() - 0.02) < 0.002
    assert abs(wo.std().item() - 0.02 / math.sqrt(16)) < 0.0005


def test_stage_flags_and_io_contract() -> None:
    stages = [build_stage(CFG, 0, i, 2) for i in range(2)]
    assert stages[0].is_first and not stages[0].is_last and stages[0].head is None
    assert stages[1].is_last and not stages[1].is_first and stages[1].embed is None
    assert stages[1].index == 1 and stages[1].num_chunks == 2
    tokens, targets = _batch(CFG, b=2)
    hidden = stages[0](tokens)
    assert hidden.shape == (2, CFG.context, CFG.d_model)
    logits = stages[1](hidden)
    assert logits.shape == (2, CFG.context, CFG.vocab_size)
    loss = stages[1](hidden, targets)
    assert loss.dim() == 0
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, CFG.vocab_size), targets.reshape(-1)))
    with pytest.raises(TypeError):
        stages[0](hidden)
    # equal-size neighbours have identical state-dict keys (CheckFree averaging)
    mid = [build_stage(ModelConfig(layers=6, d_model=32, heads=4), 0, i, 3) for i in range(3)]
    assert set(mid[1].state_dict()) == {k for k in mid[0].state_dict() if k.startswith("blocks.")}


def test_split_model_shares_parameters() -> None:
    model = build_model(CFG, seed=0)
    stages = split_model(model, 3)
    tokens, targets = _batch(CFG)
    expected = model.loss(tokens, targets)
    got = _chain(stages, tokens, targets)
    assert torch.equal(got, expected)
    ids = {id(p) for s in stages for p in s.parameters()}
    assert ids == {id(p) for p in model.parameters()}


def test_tied_embeddings_single_chunk_only() -> None:
    cfg = ModelConfig(layers=2, d_model=32, heads=4, vocab_size=40, context=8, tie_embeddings=True)
    model = build_model(cfg, 0)
    assert model.head.weight is model.embed.weight
    stage = build_stage(cfg, 0, 0, 1)
    assert stage.head.weight is stage.embed.weight
    tokens, targets = _batch(cfg)
    assert torch.equal(stage(tokens, targets), model.loss(tokens, targets))
    with pytest.raises(SpotpipeError, match="tie_embeddings"):
        build_stage(cfg, 0, 0, 2)


def _slow_attention(model_block, x: torch.Tensor, theta: float, heads: int, kv_heads: int) -> torch.Tensor:
    """Reference: explicit per-position 2x2 rotations, explicit GQA head mapping, explicit mask."""
    attn = model_block.attn
    b, t, d = x.shape
    hd = d // heads
    half = hd // 2
    q = attn.wq(x).view(b, t, heads, hd)
    k = attn.wk(x).view(b, t, kv_heads, hd)
    v = attn.wv(x).view(b, t, kv_heads, hd)

    def rotate(vec: torch.Tensor, pos: int) -> torch.Tensor:
        out = vec.clone()
        for i in range(half):
            angle = pos * theta ** (-2 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            a, bb = vec[..., i], vec[..., i + half]
            out[..., i] = a * c - bb * s
            out[..., i + half] = a * s + bb * c
        return out

    qr = torch.stack([rotate(q[:, p], p) for p in range(t)], dim=1)
    kr = torch.stack([rotate(k[:, p], p) for p in range(t)], dim=1)
    out = torch.zeros(b, t, heads, hd)
    for h in range(heads):
        g = h // (heads // kv_heads)
        for i in range(t):
            scores = torch.stack([(qr[:, i, h] * kr[:, j, g]).sum(-1) / math.sqrt(hd) for j in range(i + 1)], dim=-1)
            weights = scores.softmax(-1)
            out[:, i, h] = sum(weights[:, j, None] * v[:, j, g] for j in range(i + 1))
    return attn.wo(out.reshape(b, t, d))


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_attention_matches_slow_reference(kv: int) -> None:
    cfg = ModelConfig(layers=1, d_model=32, heads=4, kv_heads=kv, vocab_size=20, context=7, rope_theta=100.0)
    model = build_model(cfg, 5)
    block = model.blocks[0]
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rotary.tables(7, x.device)
    fast = block.attn(x, cos, sin)
    with torch.no_grad():
        slow = _slow_attention(block, x, 100.0, 4, kv)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    hd, t = 16, 12
    rot = Rotary(hd, 10000.0)
    cos, sin = rot.tables(t, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(hd, generator=gen).expand(1, 1, t, hd)
    k = torch.randn(hd, generator=gen).expand(1, 1, t, hd)
    scores = (apply_rotary(q, cos, sin)[0, 0] @ apply_rotary(k, cos, sin)[0, 0].T).double()
    for offset in range(-t + 1, t):
        diag = torch.diagonal(scores, offset)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-4), offset
    # and positions do matter: different offsets give different scores
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 3)[0])
    # position 0 is the identity rotation
    assert torch.equal(apply_rotary(q, cos, sin)[0, 0, 0], q[0, 0, 0])


def test_model_is_causal() -> None:
    model = build_model(CFG, 0)
    tokens, _ = _batch(CFG, b=1)
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % CFG.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_low_precision_builds_and_runs(dtype: str) -> None:
    cfg = ModelConfig(layers=2, d_model=32, heads=4, vocab_size=40, context=8, dtype=dtype)
    stage = build_stage(cfg, 0, 0, 1)
    assert all(p.dtype == torch.bfloat16 for p in stage.parameters())
    tokens, targets = _batch(cfg)
    loss = stage(tokens, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_checkfree_plus_edge_copies_start_and_end_swapped_paths() -> None:
    """With edge copies chunk 1 also embeds and chunk S-2 also finishes; the copies start equal to
    the originals, so a swapped path computes what the in-process PipelineTrainer does."""
    cfg = ModelConfig(layers=4, d_model=32, heads=4)
    chunks = [build_stage(cfg, 0, i, 4, edge_copies=True) for i in range(4)]
    assert torch.equal(chunks[1].embed.weight, chunks[0].embed.weight)
    assert torch.equal(chunks[2].head.weight, chunks[3].head.weight)
    assert [c.tie_partner for c in chunks] == [1, 0, 3, 2]
    assert [len(c.copy_parameters()) for c in chunks] == [0, 1, 2, 0]  # embedding; norm + head
    tokens, targets = _batch(cfg, b=2)
    x = chunks[1](tokens)  # the swapped path: 1, 0, 2, 3 ... ending on 2's copy of the head
    x = chunks[0](x)
    x = chunks[3](x, finish=False)
    loss = chunks[2](x, targets, finish=True)
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(TypeError, match="holds no embedding"):
        chunks[2](tokens)
    with pytest.raises(TypeError, match="cannot end a path"):
        chunks[1](chunks[0](tokens), finish=True)
    with pytest.raises(ValueError, match=r"embedding belongs to chunks \(0, 1\)"):
        StageModule(cfg, 1, 4, chunks[1].blocks, embed=None, edge_copies=True)
