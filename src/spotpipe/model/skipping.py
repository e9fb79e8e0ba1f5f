"""The chunked model with some chunks left out: skipped-stage inference.

SkipPipe (Blagoev, Chen, Ersoy 2025) trains with microbatches whose paths skip some pipeline stages
and shows that the model still works with stages left out at inference. A left-out chunk acts as
the identity: the hidden state it would have received goes on to the next chunk unchanged, which
is what a residual stack of pre-norm blocks (:class:`~spotpipe.model.transformer.Block`) degrades
to when its blocks' updates are dropped. Chunk 0 (token embedding) and the last chunk (final norm,
LM head) are always run. With nothing skipped, :func:`forward_skipping` chains every chunk: it is
the single-process reference's forward
(:meth:`spotpipe.runtime.inprocess.local.LocalTrainer.forward_loss`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from spotpipe.model.stages import StageModule


def forward_skipping(
    chunks: Sequence[StageModule], tokens: torch.Tensor, skip: Collection[int] = (), targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the model's chunks in order, leaving out the chunks in ``skip``.

    Args:
        chunks: Every chunk of the model, in order (``chunks[i].index == i``).
        tokens: Token ids ``[B, T]`` (int64), ``T <= model.context``.
        skip: Chunk indices to leave out (their input passes through unchanged); never 0 nor the
            last chunk.
        targets: Next-token ids ``[B, T]``, or None.

    Returns:
        The scalar mean token cross-entropy (nats, float32) with ``targets``; else the logits
        ``[B, T, vocab_size]``.

    Raises:
        ValueError: ``skip`` names chunk 0, the last chunk or a chunk that does not exist.
    """
    last = len(chunks) - 1
    bad = sorted(i for i in skip if not 0 < i < last)
    if bad:
        raise ValueError(f"cannot skip chunk(s) {bad}: only chunks 1..{last - 1} of {len(chunks)} may be left out "
                         "(chunk 0 holds the embedding, the last chunk the head)")
    x = tokens
    for chunk in chunks[:-1]:
        if chunk.index not in skip:
            x = chunk(x)
    out: torch.Tensor = chunks[-1](x, targets)
    return out
