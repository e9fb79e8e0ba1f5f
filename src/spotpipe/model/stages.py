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
        edge_copies: bool = False,
        head_apart: bool = False,
    ) -> None:
        """Check the chunk's parts against its place in the cut and keep them.

        Args:
            cfg: Model sizes.
            index: Chunk number, 0-based.
            num_chunks: How many chunks the model is cut into.
            blocks: The chunk's blocks, ``layer_range[1] - layer_range[0]`` of them.
            embed: The token embedding, on the chunks that hold one (chunk 0; chunk 1 too with
                ``edge_copies``), else ``None``.
            norm: The final RMSNorm, on the chunks that end a path (the last; S-2 too with
                ``edge_copies``), else ``None``.
            head: The LM head, where ``norm`` is given, else ``None``.
            edge_copies: CheckFree+ copies of the embedding on chunk 1 and of the norm and head on
                chunk S-2.
            head_apart: The final norm and head are a :class:`HeadModule` of their own (SkipPipe:
                any chunk may end a path, the head runs on the path's origin); no chunk holds them.

        Raises:
            ConfigError: if ``index`` is not in ``[0, num_chunks)`` or the cut is impossible.
            ValueError: if the number of blocks, or where the embedding, norm and head are, does not
                fit the chunk.
        """
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
        self.edge_copies = edge_copies
        self.head_apart = head_apart
        embed_at = (0, 1) if edge_copies else (0,)
        head_at = (num_chunks - 2, num_chunks - 1) if edge_copies else (num_chunks - 1,)
        head_at = () if head_apart else head_at
        if (index in embed_at) != (embed is not None):
            raise ValueError(f"chunk {index}: the embedding belongs to chunk{'s' if edge_copies else ''} {embed_at} only")
        if (index in head_at) != (norm is not None and head is not None):
            raise ValueError(f"chunk {index}: the final norm and head belong to chunk{'s' if edge_copies else ''} {head_at} only")
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
        """True for the last chunk when it holds the head (it produces logits or the loss)."""
        return self.index == self.num_chunks - 1 and not self.head_apart

    @property
    def holds_copy(self) -> bool:
        """True for chunk 1 and chunk S-2 under CheckFree+: their embedding, resp. final norm and
        head, are in-sync copies of chunk 0's, resp. chunk S-1's (gradients summed every step)."""
        return self.edge_copies and self.index in (1, self.num_chunks - 2)

    def copy_parameters(self) -> list[nn.Parameter]:
        """The parameters of the CheckFree+ copies this chunk holds (empty for other chunks)."""
        if not self.holds_copy:
            return []
        mods = [self.embed] if self.index == 1 else []
        if self.index == self.num_chunks - 2:
            mods += [self.norm, self.head]
        return [p for m in mods if m is not None for p in m.parameters()]

    @property
    def tie_partner(self) -> int | None:
        """The chunk whose embedding or final norm and head this chunk's must equal (CheckFree+:
        0 <-> 1, S-2 <-> S-1); ``None`` without edge copies or for a middle chunk."""
        if not self.edge_copies:
            return None
        return {0: 1, 1: 0, self.num_chunks - 2: self.num_chunks - 1, self.num_chunks - 1: self.num_chunks - 2}.get(self.index)

    def tied_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient is summed with :attr:`tie_partner`'s every step (CheckFree+)."""
        if self.tie_partner is None:
            return []
        mods = [self.embed] if self.index in (0, 1) else [self.norm, self.head]
        return [p for m in mods if m is not None for p in m.parameters()]

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, finish: bool | None = None) -> torch.Tensor:
        """Run this chunk.

        Args:
            x: Token ids ``[B, T]`` (int64) where the chunk starts a microbatch's path (chunk 0,
                or chunk 1 on a CheckFree+ swapped path); hidden states ``[B, T, d_model]`` else.
            targets: Next-token ids ``[B, T]``; used where the chunk ends the path.
            finish: Apply the final norm and head (the chunk ends the microbatch's path). Default:
                the chunk is the last one. Chunk S-2 with CheckFree+ copies finishes swapped paths.

        Returns:
            Hidden states ``[B, T, d_model]`` unless the chunk finishes; then the scalar mean token
            cross-entropy when ``targets`` is given, else logits ``[B, T, vocab_size]``.
        """
        cos, sin = self.rotary.tables(x.shape[1], x.device)
        if x.is_floating_point() and self.index == 0 and not self.edge_copies:
            raise TypeError(f"chunk {self.index} is the first chunk: it takes token ids, got {x.dtype}")
        if not x.is_floating_point():
            if self.embed is None:
                raise TypeError(f"chunk {self.index} holds no embedding: it takes hidden states, got token ids ({x.dtype})")
            x = self.embed(x)
        for block in self.blocks:
            x = block(x, cos, sin)
        if not (self.is_last if finish is None else finish):
            return x
        if self.norm is None or self.head is None:
            raise TypeError(f"chunk {self.index} holds no final norm and head: it cannot end a path")
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
    edge_copies: bool = False,
    head_apart: bool = False,
) -> StageModule:
    """Build only chunk ``chunk`` of ``num_chunks``, with the weights ``build_model(cfg, seed)`` has there.

    With ``edge_copies`` (CheckFree+; Blagoev, Ersoy, Chen 2025, section 3.2) chunk 1 also holds a
    copy of the embedding and chunk S-2 a copy of the final norm and LM head, initialised equal to
    the originals, so a swapped microbatch can start on chunk 1 and end on chunk S-2.

    Args:
        cfg: Model sizes.
        seed: Run seed (``train.seed``).
        chunk: Which chunk, 0-based.
        num_chunks: How many chunks the model is cut into (1..model.layers).
        device: Where to put it (weights are drawn on the CPU, then moved).
        edge_copies: Build the CheckFree+ copies above (needs ``num_chunks >= 4``).
        head_apart: Leave the final norm and head out of the last chunk (SkipPipe node runs build
            them once per stage-0 node with :func:`build_head`).

    Returns:
        The chunk, cast to ``model.dtype`` and on ``device``.

    Raises:
        ConfigError: on an impossible cut, tied embeddings with more than one chunk, or edge
            copies with fewer than 4 chunks.
    """
    _check_tie(cfg, num_chunks)
    ranges = partition_layers(cfg.layers, num_chunks)
    if not 0 <= chunk < num_chunks:
        raise ConfigError(f"chunk index {chunk} out of range [0, {num_chunks})")
    start, end = ranges[chunk]
    if edge_copies and num_chunks < 4:
        raise ConfigError(f"CheckFree+ edge copies need >= 4 chunks, got {num_chunks}")
    first = chunk == 0 or (edge_copies and chunk == 1)
    last = (chunk == num_chunks - 1 or (edge_copies and chunk == num_chunks - 2)) and not head_apart
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
    stage = StageModule(cfg, chunk, num_chunks, blocks, embed=embed, norm=norm, head=head, edge_copies=edge_copies,
                        head_apart=head_apart)
    finish(stage, cfg, device)
    return stage


class HeadModule(nn.Module):
    """The final RMSNorm, the LM head and the loss as a chunk of their own (SkipPipe).

    In a SkipPipe run a microbatch's path may end on any model stage and returns to its origin, a
    stage-0 node, which computes the loss (Blagoev, Chen, Ersoy 2025, section 3); every stage-0
    node holds one copy of the head (:mod:`spotpipe.schedule.nodepaths`). It follows the
    :class:`StageModule` contract the runtime uses: ``embed`` is ``None``, it always finishes.

    Attributes:
        cfg: Model sizes.
        index: ``num_chunks`` (the head comes after every chunk).
        num_chunks: Model chunks the blocks are cut into.
        norm: The final RMSNorm.
        head: The LM head.
    """

    embed = None
    edge_copies = False
    tie_partner = None
    holds_copy = False
    is_first = False
    is_last = True

    def __init__(self, cfg: ModelConfig, num_chunks: int, norm: RMSNorm, head: nn.Linear) -> None:
        """Keep the parts.

        Args:
            cfg: Model sizes.
            num_chunks: Model chunks the blocks are cut into.
            norm: The final RMSNorm.
            head: The LM head.
        """
        super().__init__()
        self.cfg = cfg
        self.index = num_chunks
        self.num_chunks = num_chunks
        self.layer_range = (cfg.layers, cfg.layers)
        self.blocks = nn.ModuleList()
        self.norm = norm
        self.head = head

    def copy_parameters(self) -> list[nn.Parameter]:
        """No CheckFree+ copies here.

        Returns:
            An empty list.
        """
        return []

    def tied_parameters(self) -> list[nn.Parameter]:
        """No tied gradients here.

        Returns:
            An empty list.
        """
        return []

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, finish: bool | None = None) -> torch.Tensor:
        """Norm, head and (with ``targets``) the loss.

        Args:
            x: Hidden states ``[B, T, d_model]``.
            targets: Next-token ids ``[B, T]``, or None.
            finish: Ignored (the head always finishes); kept for the chunk contract.

        Returns:
            The scalar mean token cross-entropy with ``targets``, else logits ``[B, T, vocab_size]``.

        Raises:
            TypeError: for token ids instead of hidden states.
        """
        if not x.is_floating_point():
            raise TypeError(f"the head takes hidden states, got token ids ({x.dtype})")
        logits = self.head(self.norm(x))
        return logits if targets is None else lm_loss(logits, targets)


def build_head(cfg: ModelConfig, seed: int, num_chunks: int, device: torch.device | str | None = None) -> HeadModule:
    """The final norm and LM head on their own, with the weights ``build_model(cfg, seed)`` has there.

    Args:
        cfg: Model sizes (``model.tie_embeddings`` must be false: the embedding is elsewhere).
        seed: Run seed (``train.seed``).
        num_chunks: Model chunks the blocks are cut into.
        device: Where to put it.

    Returns:
        The :class:`HeadModule`, cast to ``model.dtype`` and on ``device``.

    Raises:
        ConfigError: with tied embeddings.
    """
    if cfg.tie_embeddings:
        raise ConfigError("model.tie_embeddings = true needs the embedding and the LM head together; a head of its own "
                          "(SkipPipe, pipeline.stage_nodes) needs model.tie_embeddings = false")
    module = HeadModule(cfg, num_chunks, RMSNorm(cfg.d_model, cfg.norm_eps), make_head(cfg, seed))
    finish(module, cfg, device)
    return module


def split_model(model: Transformer, num_chunks: int) -> list[StageModule]:
    """Cut ``model`` into ``num_chunks`` chunks that SHARE its modules (and so its parameters).

    Training the chunks trains ``model``; use :func:`build_stage` for independent copies.

    Args:
        model: The whole model (:class:`~spotpipe.model.transformer.Transformer`).
        num_chunks: How many chunks to cut it into (1..model.layers).

    Returns:
        One :class:`StageModule` per chunk, in order.

    Raises:
        ConfigError: on an impossible cut, or tied embeddings with more than one chunk.
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
