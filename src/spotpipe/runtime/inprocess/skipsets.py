"""Which pipeline stages inference may leave out, and the random subsets that `spotpipe eval` draws.

SkipPipe (Blagoev, Chen, Ersoy 2025) trains with microbatches that visit only some stages and then
measures the model with stages left out at inference: a skipped stage passes the hidden state on
unchanged (:func:`spotpipe.model.skipping.forward_skipping`). A *stage* here is a pipeline stage of
the run (a worker rank, ``0 .. pipeline.stages - 1``) with every model chunk it holds (one chunk for
GPipe and 1F1B, two for interleaved 1F1B and chronos). The stage that holds chunk 0 (the token
embedding) and the one that holds the last chunk (final norm and LM head) can never be skipped:
without them there is no hidden state to start from and no logits at the end (every SkipPipe path
starts and ends at stage 0, which holds both there). In a SkipPipe node run
(``pipeline.stage_nodes``) the stages are the model stages and the head is a chunk of its own on
the stage-0 nodes (:func:`spotpipe.runtime.inprocess.restore.stage_chunks` gives stage 0 the
chunks ``(0, S)``), so every stage but 0 may be skipped there, the last block stage included.

A skip fraction ``f`` leaves out ``round(f x S)`` of the ``S`` stages: SkipPipe's rule for the
stages a path skips (:func:`spotpipe.schedule.skippipe.path_stages`), applied at inference. Pure
Python: no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import combinations

from spotpipe.errors import SpotpipeError
from spotpipe.schedule.skippipe import path_stages


def fixed_stages(stage_chunks: Sequence[Sequence[int]], num_chunks: int) -> dict[int, str]:
    """The stages that can never be skipped, each with why.

    Args:
        stage_chunks: ``stage_chunks[s]`` = the model chunks pipeline stage ``s`` holds.
        num_chunks: Chunks of the model (the last one holds the LM head).

    Returns:
        Stage -> ``"the embedding"``, ``"the head"`` or ``"the embedding and the head"``.
    """
    out: dict[int, str] = {}
    for s, chunks in enumerate(stage_chunks):
        holds = [what for chunk, what in ((0, "the embedding"), (num_chunks - 1, "the head")) if chunk in chunks]
        if holds:
            out[s] = " and ".join(holds)
    return out


def skippable_stages(stage_chunks: Sequence[Sequence[int]], num_chunks: int) -> list[int]:
    """Stages that may be skipped: every stage that holds neither chunk 0 nor the last chunk, ascending.

    Args:
        stage_chunks: ``stage_chunks[s]`` = the chunks stage ``s`` holds.
        num_chunks: Chunks of the model.

    Returns:
        Stage indices.
    """
    fixed = fixed_stages(stage_chunks, num_chunks)
    return [s for s in range(len(stage_chunks)) if s not in fixed]


def _fixed_text(stage_chunks: Sequence[Sequence[int]], num_chunks: int) -> str:
    return ", ".join(f"stage {s} holds {what}" for s, what in fixed_stages(stage_chunks, num_chunks).items())


def parse_stage_list(text: str) -> list[int]:
    """``"2,4"`` -> ``[2, 4]`` (spaces allowed; an empty list is refused).

    Args:
        text: The ``--skip-stages`` value.

    Returns:
        The stage numbers, in the given order (not checked against the run).

    Raises:
        SpotpipeError: Naming ``--skip-stages`` when an item is not a whole number >= 0.
    """
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t.isdigit() for t in items):
        raise SpotpipeError(f"--skip-stages {text!r}: expected stage numbers separated by commas, e.g. --skip-stages 1,2")
    return [int(t) for t in items]


def check_skip_stages(stages: Sequence[int], stage_chunks: Sequence[Sequence[int]], num_chunks: int) -> tuple[int, ...]:
    """Check a user's list of stages to skip.

    Args:
        stages: Pipeline stages to leave out (repeats are merged).
        stage_chunks: ``stage_chunks[s]`` = the chunks stage ``s`` holds.
        num_chunks: Chunks of the model.

    Returns:
        The stages, sorted and without repeats.

    Raises:
        SpotpipeError: A stage out of ``0 .. S-1``, or one that holds the embedding or the head
            (the message lists the stages that may be skipped).
    """
    num_stages = len(stage_chunks)
    fixed = fixed_stages(stage_chunks, num_chunks)
    allowed = skippable_stages(stage_chunks, num_chunks)
    may = f"stages {allowed[0]}..{allowed[-1]} may be skipped" if allowed else "no stage may be skipped"
    for s in stages:
        if not 0 <= s < num_stages:
            raise SpotpipeError(f"--skip-stages: stage {s} is out of range: the run has {num_stages} stages (0..{num_stages - 1}); {may}")
        if s in fixed:
            raise SpotpipeError(f"--skip-stages: stage {s} holds {fixed[s]} and cannot be skipped; {may}")
    return tuple(sorted(set(stages)))


def skip_count(fraction: float, stage_chunks: Sequence[Sequence[int]], num_chunks: int) -> int:
    """How many stages a skip fraction leaves out: ``S - path_stages(S, fraction)`` = ``round(fraction x S)``.

    Args:
        fraction: Share of the ``S`` stages to skip, in ``[0, 1)``.
        stage_chunks: ``stage_chunks[s]`` = the chunks stage ``s`` holds.
        num_chunks: Chunks of the model.

    Returns:
        The number of stages to skip.

    Raises:
        SpotpipeError: More stages than may be skipped (naming the largest fraction that fits).
    """
    num_stages = len(stage_chunks)
    count = num_stages - path_stages(num_stages, fraction)
    allowed = skippable_stages(stage_chunks, num_chunks)
    if count > len(allowed):
        raise SpotpipeError(
            f"--skip-fraction {fraction:g} leaves out round({fraction:g} x {num_stages}) = {count} of {num_stages} stages, "
            f"but only {len(allowed)} may be skipped ({_fixed_text(stage_chunks, num_chunks)}); "
            f"a fraction that rounds to at most {len(allowed)} of {num_stages} fits, e.g. --skip-fraction "
            f"{len(allowed) / num_stages:.3g}")
    return count


def draw_skip_sets(candidates: Sequence[int], count: int, subsets: int, seed: int) -> list[tuple[int, ...]]:
    """Distinct sets of ``count`` stages out of ``candidates``, drawn from ``seed``.

    When there are at most ``subsets`` possible sets, every one of them, in lexicographic order;
    else ``subsets`` different sets drawn uniformly (each a sorted tuple) in the order drawn.
    The same arguments give the same sets.

    Args:
        candidates: The stages that may be skipped.
        count: Stages per set, ``0 .. len(candidates)``.
        subsets: How many sets at most (>= 1).
        seed: The draw's seed.

    Returns:
        ``min(subsets, C(len(candidates), count))`` distinct sorted tuples.

    Raises:
        ValueError: ``count`` out of range or ``subsets < 1``.
    """
    pool = sorted(candidates)
    if not 0 <= count <= len(pool) or subsets < 1:
        raise ValueError(f"cannot draw {subsets} sets of {count} out of {len(pool)} stages")
    if math.comb(len(pool), count) <= subsets:
        return list(combinations(pool, count))
    rng = random.Random(seed)
    seen: list[tuple[int, ...]] = []
    while len(seen) < subsets:  # more sets exist than asked for, so this ends
        pick = tuple(sorted(rng.sample(pool, count)))
        if pick not in seen:
            seen.append(pick)
    return seen
