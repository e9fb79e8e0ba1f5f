"""partition_layers / model_shapes: balanced cuts, counts that match the real modules, purity."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spotpipe.config import ModelConfig
from spotpipe.errors import SpotpipeError
from spotpipe.model.partition import ffn_hidden_size, model_shapes, partition_layers


@pytest.mark.parametrize("layers", range(1, 13))
def test_partition_is_contiguous_balanced_and_front_loaded(layers: int) -> None:
    for chunks in range(1, layers + 1):
        ranges = partition_layers(layers, chunks)
        assert len(ranges) == chunks
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        for (a, b), (c, _) in zip(ranges, ranges[1:]):
            assert b == c
        sizes = [e - s for s, e in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)


def test_partition_examples() -> None:
    assert partition_layers(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert partition_layers(8, 8) == [(i, i + 1) for i in range(8)]


@pytest.mark.parametrize("layers,chunks", [(4, 5), (4, 0), (1, 2)])
def test_partition_rejects_impossible_cuts(layers: int, chunks: int) -> None:
    with pytest.raises(SpotpipeError, match="chunks"):
        partition_layers(layers, chunks)


def test_ffn_hidden_default_and_override() -> None:
    assert ffn_hidden_size(ModelConfig(d_model=128)) == 352  # ceil(341.33) -> 342 -> 352
    assert ffn_hidden_size(ModelConfig(d_model=96)) == 256
    assert ffn_hidden_size(ModelConfig(d_model=128, ffn_hidden=100)) == 100
    for d in range(8, 400, 8):
        f = ffn_hidden_size(ModelConfig(d_model=d, heads=1))
        assert f % 32 == 0 and f >= 8 * d / 3 and f - 8 * d / 3 < 32


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kv", [0, 2])
def test_shapes_param_counts_match_modules(kv: int) -> None:
    from spotpipe.model.stages import build_stage

    cfg = ModelConfig(layers=5, d_model=64, heads=4, kv_heads=kv, vocab_size=97, context=32)
    for n in (1, 2, 5):
        shapes = model_shapes(cfg, n)
        for i, shape in enumerate(shapes):
            stage = build_stage(cfg, 0, i, n)
            assert shape.params == sum(p.numel() for p in stage.parameters())
            assert (shape.layer_start, shape.layer_end) == stage.layer_range
        assert shapes[-1].boundary_bytes_per_sequence == 0
        assert all(s.boundary_bytes_per_sequence == 64 * 32 * 4 for s in shapes[:-1])


def test_shapes_flops_follow_palm_accounting() -> None:
    cfg = ModelConfig(layers=4, d_model=64, heads=4, vocab_size=100, context=16)
    one = model_shapes(cfg, 1)[0]
    four = model_shapes(cfg, 4)
    assert sum(s.forward_flops_per_token for s in four) == one.forward_flops_per_token
    non_embedding = one.params - 2 * 100 * 64 - 64 - 4 * 2 * 64  # minus embed, norms
    matmul = non_embedding + 100 * 64  # the head is a matmul
    assert one.forward_flops_per_token == 2 * matmul + 4 * 4 * 64 * 16
    # bf16 halves bytes but not counts
    half = model_shapes(ModelConfig(layers=4, d_model=64, heads=4, vocab_size=100, context=16, dtype="bfloat16"), 1)[0]
    assert half.activation_bytes_per_sequence * 2 == one.activation_bytes_per_sequence
    assert half.params == one.params


@pytest.mark.timeout(60)
def test_activation_estimate_is_close_to_saved_tensors() -> None:
    """The estimate is within 15% of the bytes autograd actually saves for backward."""
    import torch

    from spotpipe.model.stages import build_stage

    for cfg in (ModelConfig(layers=2, d_model=64, context=32), ModelConfig(layers=2, d_model=64, kv_heads=2, context=32)):
        shapes = model_shapes(cfg, 2)
        for i in range(2):
            stage = build_stage(cfg, 0, i, 2)
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                if t.is_floating_point():
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            b = 2
            x = torch.randint(0, 256, (b, 32)) if i == 0 else torch.randn(b, 32, 64, requires_grad=True)
            targets = torch.randint(0, 256, (b, 32)) if stage.is_last else None
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                stage(x, targets)
            params = {p.untyped_storage().data_ptr() for p in stage.parameters()}
            measured = sum(v for k, v in storages.items() if k not in params) / b
            ratio = measured / shapes[i].activation_bytes_per_sequence
            assert 0.85 < ratio < 1.15, (i, ratio)


def test_partition_module_does_not_import_torch() -> None:
    code = "import sys, spotpipe.model.partition, spotpipe.model; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
