"""Lowering passes: pure functions ``Schedule -> Schedule`` that the players' schedules go through.

The lowering contract (what every player of a lowered schedule, the runtime executor, the
simulator's player and :func:`~spotpipe.schedule.validate.simulate_schedule`, agrees on):

* **Actions.** Each rank walks its action list in order. ``F`` / ``B`` compute one microbatch of
  one stage (chunk). Where the rank's list also holds ``R`` for that stage and microbatch, the
  ``F`` keeps only its input and the ``R`` (before the ``B``) runs the forward again with
  autograd on (:func:`add_recompute`). ``SEND_F`` / ``SEND_B`` post a message and never block. ``RECV_F`` /
  ``RECV_B`` only post a receive; the compute action that consumes the data waits for it, so a
  RECV may sit anywhere before its consumer. Every message's identity (stage, microbatch,
  direction) comes from its action; a transport invents no tags.
* **Loss.** The last stage of a microbatch's path computes the mean token cross-entropy; its
  backward starts from ``loss / (microbatches x replicas)``, so gradients summed over microbatches
  and over replicas (all-reduce SUM) are the gradient of the step's mean loss (GPipe, Huang et al.
  2019; Megatron-LM, Narayanan et al. 2021).
* **Clipping.** By the global norm over all stages: each rank contributes the squared norm of its
  own parameters (a copy held twice counts once) to one world all-reduce, and every rank applies
  the same coefficient (:func:`spotpipe.runtime.state.optim.clip_coefficient`).
* **Data per step.** ``train.batch_size`` sample ids in sampler order; replica ``r`` of ``R`` takes
  the ``r``-th equal slice, microbatch ``m`` of ``M`` the ``m``-th equal slice of that
  (:func:`spotpipe.data.sampler.microbatch_ids`).

:func:`add_communication` inserts the point-to-point
messages a compute-only schedule implies: for every forward whose path successor lives on another
rank a ``SEND_F`` right after it and a ``RECV_F`` right before the successor's forward; for every
backward whose path predecessor lives on another rank a ``SEND_B`` right after it and a
``RECV_B`` right before the predecessor's backward. Paths come from ``Schedule.path(m)``, so
partial and reordered paths (SkipPipe, Blagoev et al. 2025; CheckFree+ edge swaps, Blagoev et al.
2025) lower the same way as the default ``0, 1, ..., S-1``.

:func:`post_receives_early` moves each RECV a bounded number of compute actions earlier so the
transfer overlaps the compute before its consumer (the contract lets a pass do this; players
accept a RECV anywhere before its consumer). :func:`lower` is the full lowering the runtime
executor and the simulator play (add_communication; early receives only on request).
"""

from __future__ import annotations

from collections.abc import Iterable

from spotpipe.schedule.ir import Action, Op, Schedule, ScheduleError


def _path_neighbours(schedule: Schedule, stage: int, microbatch: int, where: Action) -> tuple[int | None, int | None]:
    """(predecessor, successor) of ``stage`` on the path of ``microbatch``."""
    path = schedule.path(microbatch)
    try:
        i = path.index(stage)
    except ValueError:
        raise ScheduleError(
            f"cannot lower {where}: the path of microbatch {microbatch} {list(path)} does not visit stage {stage}"
        ) from None
    pred = path[i - 1] if i > 0 else None
    succ = path[i + 1] if i + 1 < len(path) else None
    return pred, succ


def add_communication(schedule: Schedule) -> Schedule:
    """Insert SEND/RECV actions for every cross-rank edge of every microbatch's path.

    For ``F(s, m)`` with path successor ``n`` on another rank: ``SEND_F(s, m, peer=n)`` right
    after it on ``s``'s rank, ``RECV_F(n, m, peer=s)`` right before ``F(n, m)`` on ``n``'s rank.
    For ``B(n, m)`` with path predecessor ``s`` on another rank: ``SEND_B(n, m, peer=s)`` right
    after it, ``RECV_B(s, m, peer=n)`` right before ``B(s, m)``. Neighbours on the same rank hand
    the tensor over locally and get no action.

    Args:
        schedule: a compute-only schedule.

    Returns:
        The lowered schedule (same metadata).

    Raises:
        ScheduleError: when ``schedule`` already has communication actions, or runs a stage that a
            microbatch's path does not visit.
    """
    s2r = schedule.stage_to_rank
    lowered: list[list[Action]] = []
    for r, acts in enumerate(schedule.ranks):
        out: list[Action] = []
        for a in acts:
            if a.op.is_comm:
                raise ScheduleError(f"add_communication: rank {r} already has communication action {a}; pass a compute-only schedule")
            if a.op is Op.R:  # a recompute reads what its rank kept: no message
                out.append(a)
                continue
            if a.stage >= schedule.num_stages or a.microbatch >= schedule.num_microbatches:
                raise ScheduleError(f"cannot lower {a} on rank {r}: stage or microbatch out of range")
            pred, succ = _path_neighbours(schedule, a.stage, a.microbatch, a)
            m = a.microbatch
            if a.op is Op.F:
                if pred is not None and s2r[pred] != s2r[a.stage]:
                    out.append(Action(a.stage, Op.RECV_F, m, pred))
                out.append(a)
                if succ is not None and s2r[succ] != s2r[a.stage]:
                    out.append(Action(a.stage, Op.SEND_F, m, succ))
            else:
                if succ is not None and s2r[succ] != s2r[a.stage]:
                    out.append(Action(a.stage, Op.RECV_B, m, succ))
                out.append(a)
                if pred is not None and s2r[pred] != s2r[a.stage]:
                    out.append(Action(a.stage, Op.SEND_B, m, pred))
        lowered.append(out)
    return schedule.with_ranks(lowered)


def post_receives_early(schedule: Schedule, lookahead: int = 1) -> Schedule:
    """Move every RECV up to ``lookahead`` compute actions before its consumer.

    The receives for the ``j``-th compute action of a rank are posted right before its
    ``(j - lookahead)``-th compute action (or at the start of the list), after the receives already
    there; SENDs stay right after their producer. Under the lowering contract a RECV only
    posts the receive and the consumer waits for the data, so moving it earlier cannot deadlock;
    the tests also play the result with blocking receives.

    Args:
        schedule: a lowered schedule (a compute-only one comes back unchanged).
        lookahead: how many compute actions earlier; 0 leaves the schedule as it is.

    Returns:
        The schedule with its RECVs moved.

    Raises:
        ScheduleError: for a negative ``lookahead``.
    """
    if lookahead < 0:
        raise ScheduleError(f"post_receives_early: lookahead must be >= 0, got {lookahead}")
    ranks: list[list[Action]] = []
    for acts in schedule.ranks:
        # Split into (receives before compute j, compute j and the sends after it).
        recvs: list[list[Action]] = [[]]
        bodies: list[list[Action]] = []
        head: list[Action] = []  # actions before the first compute that are not receives
        for a in acts:
            if a.op.is_recv:
                recvs[-1].append(a)
            elif a.op.is_compute:
                bodies.append([a])
                recvs.append([])
            elif bodies:
                bodies[-1].append(a)
            else:
                head.append(a)
        trailing = recvs.pop()  # receives after the last compute (no consumer; keep in place)
        out: list[Action] = list(head)
        for j, body in enumerate(bodies):
            if j == 0:
                for k in range(min(lookahead, len(bodies) - 1) + 1):
                    out.extend(recvs[k])
            elif j + lookahead < len(bodies):
                out.extend(recvs[j + lookahead])
            out.extend(body)
        if not bodies:
            out.extend(r for group in recvs for r in group)
        out.extend(trailing)
        ranks.append(out)
    return schedule.with_ranks(ranks)


def add_recompute(schedule: Schedule, chunks: Iterable[int]) -> Schedule:
    """Recompute the activations of ``chunks``: an ``R`` right before every backward of those chunks.

    Under the lowering contract an ``F`` of a stage whose rank list holds the matching ``R`` keeps
    only its input (the boundary activation it received, or the token ids); the ``R`` re-runs the
    forward with autograd on, and the ``B`` after it frees everything (activation
    recomputation, Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; per chunk as
    Chronos-Recomp, Lin et al. 2025). Placed right before the ``B`` (after a ``RECV_B``, which only
    posts), the recompute overlaps the gradient's transfer. The executor, the simulator (which
    prices it as one more forward) and :mod:`spotpipe.schedule.memory` all read it from the list.

    Args:
        schedule: compute-only or lowered, without ``R`` actions.
        chunks: stage indices to recompute (any order, duplicates ignored).

    Returns:
        The schedule with the ``R`` actions (same metadata); unchanged for no chunks.

    Raises:
        ScheduleError: a chunk the schedule does not have (the message gives the range), or a
            schedule that already recomputes.
    """
    wanted = set(chunks)
    bad = sorted(c for c in wanted if not 0 <= c < schedule.num_stages)
    if bad:
        raise ScheduleError(
            f"recompute of chunk(s) {bad}: the {schedule.name} schedule has chunks 0..{schedule.num_stages - 1}"
        )
    ranks: list[list[Action]] = []
    for r, acts in enumerate(schedule.ranks):
        out: list[Action] = []
        for a in acts:
            if a.op is Op.R:
                raise ScheduleError(f"add_recompute: rank {r} already has recompute action {a}")
            if a.op is Op.B and a.stage in wanted:
                out.append(Action(a.stage, Op.R, a.microbatch))
            out.append(a)
        ranks.append(out)
    return schedule.with_ranks(ranks)


def recomputed(schedule: Schedule) -> frozenset[tuple[int, int]]:
    """``(stage, microbatch)`` pairs whose forward keeps only its input (an ``R`` follows it).

    Args:
        schedule: Any schedule.

    Returns:
        The ``(stage, microbatch)`` of every ``R`` action.
    """
    return frozenset((a.stage, a.microbatch) for acts in schedule.ranks for a in acts if a.op is Op.R)


def order_sends_by_receives(schedule: Schedule) -> Schedule:
    """Delay SENDs so that every rank pair sends in the order the receiving rank posts its RECVs.

    Transports that match messages by issue order and ignore tags (NCCL) need one order per rank
    pair on both ends (:func:`~spotpipe.schedule.validate.check_message_order`). A receiver's
    RECVs follow its compute order, which is fixed; a SEND may go later without harm (it never
    blocks its rank, and the receiver consumes the messages in its RECV order anyway), so each
    SEND whose predecessors in the receiver's order are not sent yet waits right after the last of
    them. A schedule whose orders already agree (GPipe, 1F1B, interleaved) comes back unchanged;
    the V placement of chronos needs it, because a rank both feeds and is fed by each neighbour.

    Args:
        schedule: a lowered schedule.

    Returns:
        The schedule with SENDs moved later where needed (same metadata).

    Raises:
        ScheduleError: a SEND with no matching RECV on the peer's rank.
    """
    s2r = schedule.stage_to_rank

    def key(a: Action) -> tuple[bool, int, int, int]:  # (gradient?, sending stage, receiving stage, microbatch)
        assert a.peer is not None
        backward = a.op in (Op.SEND_B, Op.RECV_B)
        return (backward, a.stage, a.peer, a.microbatch) if a.op.is_send else (backward, a.peer, a.stage, a.microbatch)

    wanted: dict[tuple[int, int], list[tuple[bool, int, int, int]]] = {}  # (src rank, dst rank) -> RECV order
    for r, acts in enumerate(schedule.ranks):
        for a in acts:
            if a.op.is_recv:
                assert a.peer is not None
                wanted.setdefault((s2r[a.peer], r), []).append(key(a))
    ranks: list[list[Action]] = []
    for r, acts in enumerate(schedule.ranks):
        out: list[Action] = []
        held: dict[tuple[bool, int, int, int], Action] = {}
        nxt: dict[int, int] = {}  # destination rank -> index of the next message it expects
        for a in acts:
            if not a.op.is_send:
                out.append(a)
                continue
            assert a.peer is not None
            dst = s2r[a.peer]
            order = wanted.get((r, dst), [])
            if key(a) not in order:
                raise ScheduleError(f"order_sends_by_receives: rank {r} has {a} but rank {dst} never receives it")
            held[key(a)] = a
            i = nxt.get(dst, 0)
            while i < len(order) and order[i] in held:
                out.append(held.pop(order[i]))
                i += 1
            nxt[dst] = i
        if held:  # cannot happen when every message is received: the last send releases the rest
            raise ScheduleError(f"order_sends_by_receives: rank {r} could not order {sorted(map(str, held.values()))}")
        ranks.append(out)
    return schedule.with_ranks(ranks)


def lower(schedule: Schedule, *, early_receives: int = 0) -> Schedule:
    """The full lowering the runtime executor and the simulator play.

    :func:`add_communication` and :func:`order_sends_by_receives`, then :func:`post_receives_early` with ``lookahead=early_receives``
    when that is above 0. Early receives are off by default: they are valid under the
    lowering contract (the consumer waits, not the RECV), but a transport whose receive
    blocks (a posted NCCL receive holds its stream) would deadlock on them, e.g. a rank that
    posts the gradient receive of microbatch 0 before sending that microbatch's activation.

    Args:
        schedule: A compute-only schedule.
        early_receives: ``lookahead`` of :func:`post_receives_early`; 0 skips that pass.

    Returns:
        The lowered schedule (SEND/RECV pairs between ranks, sends ordered by the peer's receives).

    Raises:
        ScheduleError: for a negative ``early_receives``.
    """
    lowered = order_sends_by_receives(add_communication(schedule))
    return post_receives_early(lowered, early_receives) if early_receives else lowered
