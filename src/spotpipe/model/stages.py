"""Pipeline chunks of the decoder: the model cut into contiguous runs of blocks.

Chunk ``i`` of ``n`` holds blocks ``partition_layers(layers, n)[i]``; chunk 0 also holds the token
embedding, the last chunk the final RMSNorm, the LM head and the loss (the layout of GPipe, Huang
et al. 2019, and of Megatron-LM's pipeline, Narayanan et al. 2021). Chaining the chunks computes
exactly what :class:`~spotpipe.model.transformer.Transformer` computes, operation for operation,
so losses and gradients agree to the last bit in fp32.

:func:`build_stage` builds only one chunk; thanks to per-module seeds its initial weights equal
the same part of :func:`~spotpipe.model.transformer.build_model`. Inside a chunk, blocks are
numbered locally (``blocks.0`` is global block ``layer_range[0]``), so neighbouring chunks of
equal size have identical state-dict keys (what CheckFree's neighbour averaging needs).
"""

from __future__ import annotations

import torch
from torch import nn

from spotpipe.config import ModelConfig
from spotpipe.errors import ConfigError
from spotpipe.model.partition import head_dim, partition_layers
from spotpipe.model.transformer import (
    RMSNorm,
    Rotary,
    Transformer,
    finish,
    lm_loss,
    make_block,
    make_embedding,
    make_head,
)


class StageModule(nn.Module):
    """One pipeline chunk.

    Attributes:
        cfg: Model sizes.
        index: Chunk number, 0-based.
        num_chunks: How many chunks the model is cut into.
        layer_range: ``(start, end)`` of the global block indices this chunk holds.
        embed: The token embedding (first chunk only, else ``None``).
        blocks: This chunk's blocks, numbered locally.
        norm: The final RMSNorm (last chunk only, else ``None``).
        head: The LM head (last chunk only, else ``None``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        index: int,
        num_chunks: int,
        blocks: nn.ModuleList,
        embed: nn.Embedding | None = None,
        norm: RMSNorm | None = None,
        head: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        ranges = partition_layers(cfg.layers, num_chunks)
        if not 0 <= index < num_chunks:
            raise ConfigError(f"chunk index {index} out of range [0, {num_chunks})")
        self.cfg = cfg
        self.index = index
        self.num_chunks = num_chunks
        self.layer_range: tuple[int, int] = ranges[index]
        if len(blocks) != self.layer_range[1] - self.layer_range[0]:
            raise ValueError(f"chunk {index} needs {self.layer_range[1] - self.layer_range[0]} blocks, got {len(blocks)}")
        if self.is_first != (embed is not None):
            raise ValueError(f"chunk {index}: the embedding belongs to the first chunk only")
        if self.is_last != (norm is not None and head is not None):
            raise ValueError(f"chunk {index}: the final norm and head belong to the last chunk only")
        self.embed = embed
        self.blocks = blocks
        self.norm = norm
        self.head = head
        self.rotary = Rotary(head_dim(cfg), cfg.rope_theta)

    @property
    def is_first(self) -> bool:
        """True for chunk 0 (it takes token ids)."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """True for the last chunk (it produces logits or the loss)."""
        return self.index == self.num_chunks - 1

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Run this chunk.

        Args:
            x: Token ids ``[B, T]`` (int64) for the first chunk; hidden states ``[B, T, d_model]``
                for the others.
            targets: Next-token ids ``[B, T]``; only the last chunk uses them.

        Returns:
            Hidden states ``[B, T, d_model]`` for every chunk but the last; for the last, the scalar
            mean token cross-entropy when ``targets`` is given, else logits ``[B, T, vocab_size]``.
        """
        cos, sin = self.rotary.tables(x.shape[1], x.device)
        if self.embed is not None:
            if x.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"chunk {self.index} is the first chunk: it takes token ids, got {x.dtype}")
            x = self.embed(x)
        for block in self.blocks:
            x = block(x, cos, sin)
        if self.norm is None or self.head is None:
            return x
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return lm_loss(logits, targets)


def _check_tie(cfg: ModelConfig, num_chunks: int) -> None:
    if cfg.tie_embeddings and num_chunks > 1:
        raise ConfigError(
            "model.tie_embeddings=true needs the embedding and the LM head on one chunk; "
            f"it cannot be used with {num_chunks} chunks (set model.tie_embeddings=false)"
        )


def build_stage(
    cfg: ModelConfig,
    seed: int,
    chunk: int,
    num_chunks: int,
    device: torch.device | str | None = None,
) -> StageModule:
    """Build only chunk ``chunk`` of ``num_chunks``, with the weights ``build_model(cfg, seed)`` has there.

    Args:
        cfg: Model sizes.
        seed: Run seed (``train.seed``).
        chunk: Which chunk, 0-based.
        num_chunks: How many chunks the model is cut into (1..model.layers).
        device: Where to put it (weights are drawn on the CPU, then moved).

    Raises:
        ConfigError: on an impossible cut, or tied embeddings with more than one chunk.
    """
    _check_tie(cfg, num_chunks)
    ranges = partition_layers(cfg.layers, num_chunks)
    if not 0 <= chunk < num_chunks:
        raise ConfigError(f"chunk index {chunk} out of range [0, {num_chunks})")
    start, end = ranges[chunk]
    first, last = chunk == 0, chunk == num_chunks - 1
    embed = make_embedding(cfg, seed) if first else None
    blocks = nn.ModuleList(make_block(cfg, seed, layer) for layer in range(start, end))
    norm = RMSNorm(cfg.d_model, cfg.norm_eps) if last else None
    head: nn.Linear | None = None
    if last:
        if cfg.tie_embeddings:  # single chunk: the head shares the embedding's weight
            assert embed is not None
            head = make_head(cfg, seed)
            head.weight = embed.weight
        else:
            head = make_head(cfg, seed)
    stage = StageModule(cfg, chunk, num_chunks, blocks, embed=embed, norm=norm, head=head)
    finish(stage, cfg, device)
    return stage


def split_model(model: Transformer, num_chunks: int) -> list[StageModule]:
    """Cut ``model`` into ``num_chunks`` chunks that SHARE its modules (and so its parameters).

    Training the chunks trains ``model``; use :func:`build_stage` for independent copies.
    """
    cfg = model.cfg
    _check_tie(cfg, num_chunks)
    stages: list[StageModule] = []
    for i, (start, end) in enumerate(partition_layers(cfg.layers, num_chunks)):
        last = i == num_chunks - 1
        stages.append(
            StageModule(
                cfg,
                i,
                num_chunks,
                nn.ModuleList(model.blocks[j] for j in range(start, end)),
                embed=model.embed if i == 0 else None,
                norm=model.norm if last else None,
                head=model.head if last else None,
            )
        )
    return stages
