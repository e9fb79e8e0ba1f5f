"""Sampling text from the chunked model, one token at a time, optionally with chunks left out.

Autoregressive decoding: the model reads the sequence so far (its last ``model.context`` tokens
when it is longer: a sliding window, the positions counted from the window's start), and the
next token is drawn from the softmax of the last position's logits divided by the temperature,
restricted to the ``top_k`` most likely tokens (top-k sampling, Fan, Lewis, Dauphin 2018,
"Hierarchical Neural Story Generation"); temperature 0 takes the most likely token. Draws use a
CPU ``torch.Generator``, so a seed gives the same text on any device. There is no key/value
cache: each token recomputes the window, which is fine for the small models this is for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from spotpipe.model.skipping import forward_skipping
from spotpipe.model.stages import StageModule


def next_token_distribution(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Probabilities ``[V]`` (float32, CPU) of the next token from the last position's ``logits [V]``.

    Args:
        logits: Unnormalised scores of the vocabulary, ``[V]``.
        temperature: > 0; below 1 sharpens, above 1 flattens.
        top_k: Keep only the ``top_k`` largest scores (0 or >= V: all).

    Returns:
        A probability vector that sums to 1, zero outside the kept tokens.
    """
    scores = logits.detach().float().cpu() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.softmax(scores, dim=-1)


@torch.no_grad()
def sample_tokens(
    chunks: Sequence[StageModule],
    prompt: Sequence[int],
    new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    skip: Collection[int] = (),
    progress: Callable[[int], None] | None = None,
    out: list[int] | None = None,
) -> list[int]:
    """Continue ``prompt`` by ``new_tokens`` tokens.

    Args:
        chunks: Every chunk of the model, in order, on one device.
        prompt: Token ids to start from (at least one, each < ``model.vocab_size``).
        new_tokens: Tokens to generate (>= 0).
        temperature: >= 0; 0 = always the most likely token (greedy).
        top_k: Sample among the ``top_k`` most likely tokens only (0 = all).
        seed: Seed of the draws.
        skip: Chunks to leave out (:func:`~spotpipe.model.skipping.forward_skipping`).
        progress: Called with the number of tokens generated so far, after each one.
        out: A list the generated ids are appended to as they come (a caller interrupted midway
            keeps what was generated); a new one by default.

    Returns:
        The ``new_tokens`` generated ids (the prompt not included): ``out``.

    Raises:
        ValueError: An empty prompt, an id outside the vocabulary, or a negative count or temperature.
    """
    cfg = chunks[0].cfg
    if not prompt:
        raise ValueError("the prompt holds no token")
    if any(not 0 <= int(t) < cfg.vocab_size for t in prompt):
        raise ValueError(f"the prompt holds token ids outside the model's vocabulary 0..{cfg.vocab_size - 1}")
    if new_tokens < 0 or temperature < 0:
        raise ValueError(f"new_tokens and temperature must be >= 0, got {new_tokens} and {temperature}")
    device = next(chunks[0].parameters()).device
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    ids = [int(t) for t in prompt]
    out = [] if out is None else out
    for n in range(new_tokens):
        window = torch.tensor([ids[-cfg.context:]], dtype=torch.int64, device=device)
        logits = forward_skipping(chunks, window, skip)[0, -1]
        if temperature == 0:
            token = int(torch.argmax(logits.float()))
        else:
            probs = next_token_distribution(logits, temperature, top_k)
            token = int(torch.multinomial(probs, 1, generator=gen))
        ids.append(token)
        out.append(token)
        if progress is not None:
            progress(n + 1)
    return out
