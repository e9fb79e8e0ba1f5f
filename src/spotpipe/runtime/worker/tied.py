"""CheckFree+ tied copies across workers: which gradient ranges, and their exchange each step.

Under the CheckFree+ swap schedule (Blagoev, Ersoy, Chen 2025, section 3.2) chunk 1 keeps a copy
of the embedding and chunk S-2 a copy of the final norm and LM head, so swapped microbatches can
start on chunk 1 and end on chunk S-2. The copies must stay equal to the originals on chunks 0
and S-1, as tied weights do: after the replica all-reduce each holder sends its gradient of the
copy to its partner and adds the partner's (``a + b`` and ``b + a`` are the same float), so both
optimizers take the same step. The gradient norm counts each tied parameter once (the copy's
range is left out), so clipping is that of the one-model run (the in-process ``PipelineTrainer``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from spotpipe.runtime.comm.transport import CommError, Transport

TIE_TAG = 800_000  # message tag of the tied-gradient exchange


def flat_ranges(params: Iterable[torch.nn.Parameter], chosen: set[int]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges of the flat gradient buffer (parameters laid out in order) that
    hold the parameters whose ``id`` is in ``chosen``, adjacent ranges merged.

    Args:
        params: The parameters, in the flat buffer's order.
        chosen: ``id()`` of the parameters to keep.

    Returns:
        The ranges, in elements, in order.
    """
    ranges: list[tuple[int, int]] = []
    offset = 0
    for q in params:
        n = q.numel()
        if id(q) in chosen:
            if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
            else:
                ranges.append((offset, n))
        offset += n
    return ranges


def sum_tied_gradients(flat_grad: torch.Tensor, ranges: list[tuple[int, int]], transport: Transport, partner: int,
                       timeout_s: float, what: str) -> None:
    """Add the partner's gradient of the tied parameters to this worker's, in place.

    Args:
        flat_grad: This worker's flat gradient buffer.
        ranges: ``(offset, length)`` ranges of the tied parameters (:func:`flat_ranges`).
        transport: The generation's point-to-point transport.
        partner: World rank of the swap partner.
        timeout_s: Seconds to wait for each message.
        what: What the exchange is, named in errors.

    Raises:
        CommError: naming ``what``, when the partner is lost.
    """
    mine = torch.cat([flat_grad[o : o + n] for o, n in ranges])
    theirs = torch.empty_like(mine)
    send = transport.isend(mine, partner, TIE_TAG)
    recv = transport.irecv(theirs, partner, TIE_TAG)
    for handle in (recv, send):
        try:
            handle.wait(timeout_s)
        except CommError as exc:
            raise exc.with_action(what) from None
    off = 0
    for o, n in ranges:
        flat_grad[o : o + n].add_(theirs[off : off + n])
        off += n
