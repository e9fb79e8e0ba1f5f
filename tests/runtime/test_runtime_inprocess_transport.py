"""The in-process transport: ranks take turns in a fixed order, messages by (source, destination,
tag), a wait that can never end fails at once, and an abort or a failing rank stops every wait."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from spotpipe.runtime.comm.inprocess import Deadlock, InProcessHub
from spotpipe.runtime.comm.transport import GenerationAborted, PeerTimeout


def _exchange(hub: InProcessHub, order: list[str]):
    """Rank 0 waits for rank 1's message before answering it; rank 1 sends, then waits."""

    def rank0() -> float:
        t = hub.transport(0)
        buf = torch.zeros(3)
        order.append("0 posts")
        handle = t.irecv(buf, 1, 7)
        handle.wait(5.0)
        order.append("0 got")
        t.isend(buf * 2, 1, 8)
        return float(buf.sum())

    def rank1() -> float:
        t = hub.transport(1)
        order.append("1 starts")
        message = torch.ones(3)
        t.isend(message, 0, 7)
        message.fill_(5.0)  # the sender may reuse its tensor at once: the message was copied
        buf = torch.zeros(3)
        t.irecv(buf, 0, 8).wait(5.0)
        order.append("1 got")
        return float(buf.sum())

    return [rank0, rank1]


@pytest.mark.timeout(30)
def test_ranks_take_turns_in_a_fixed_order_and_messages_are_copies() -> None:
    hub = InProcessHub(2)
    for _ in range(3):  # the same order every time, also when the hub's threads are reused
        order: list[str] = []
        assert hub.play(_exchange(hub, order)) == [3.0, 6.0]
        assert order == ["0 posts", "1 starts", "0 got", "1 got"]
    assert hub.undelivered() == []


@pytest.mark.timeout(30)
def test_only_one_rank_runs_at_a_time() -> None:
    hub = InProcessHub(4)
    running, most = [0], [0]
    lock = threading.Lock()

    def body(rank: int):
        def run() -> int:
            t = hub.transport(rank)
            for i in range(3):
                with lock:
                    running[0] += 1
                    most[0] = max(most[0], running[0])
                time.sleep(0.002)
                with lock:
                    running[0] -= 1
                t.isend(torch.tensor([float(rank)]), (rank + 1) % 4, i)
                buf = torch.zeros(1)
                t.irecv(buf, (rank - 1) % 4, i).wait(5.0)
                assert float(buf) == (rank - 1) % 4
            return rank
        return run

    assert hub.play([body(r) for r in range(4)]) == [0, 1, 2, 3]
    assert most[0] == 1


@pytest.mark.timeout(30)
def test_messages_are_matched_by_source_and_tag_in_fifo_order() -> None:
    hub = InProcessHub(3)

    def sender(rank: int):
        def run() -> None:
            t = hub.transport(rank)
            for value in (1.0, 2.0):
                t.isend(torch.tensor([value + 10 * rank]), 2, 5)
            t.isend(torch.tensor([99.0 + rank]), 2, 6)
        return run

    def receiver() -> list[float]:
        t = hub.transport(2)
        got = []
        for src, tag in ((1, 6), (0, 5), (1, 5), (0, 6), (0, 5), (1, 5)):
            buf = torch.zeros(1)
            t.irecv(buf, src, tag).wait(5.0)
            got.append(float(buf))
        return got

    assert hub.play([sender(0), sender(1), receiver])[2] == [100.0, 1.0, 11.0, 99.0, 2.0, 12.0]


@pytest.mark.timeout(30)
def test_a_wait_that_can_never_end_fails_at_once_and_names_every_wait() -> None:
    hub = InProcessHub(2, {0: "stage zero", 1: "stage one"})
    seen: list[BaseException] = []

    def body(rank: int):
        def run() -> None:
            try:
                hub.transport(rank).irecv(torch.zeros(1), 1 - rank, 40 + rank).wait(3600.0)
            except BaseException as exc:
                seen.append(exc)
                raise
        return run

    t0 = time.monotonic()
    with pytest.raises(Deadlock) as err:
        hub.play([body(0), body(1)])
    assert time.monotonic() - t0 < 5.0  # not the hour of the timeout
    assert isinstance(err.value, PeerTimeout)
    text = str(err.value)
    assert "can never end" in text
    assert "stage zero waits for tag 40 from stage one" in text and "stage one waits for tag 41 from stage zero" in text
    assert [type(e) for e in seen] == [Deadlock, GenerationAborted]  # the other rank is released by the abort
    assert hub.aborted


@pytest.mark.timeout(30)
def test_a_failing_rank_aborts_the_others_and_its_error_is_raised() -> None:
    hub = InProcessHub(3)
    seen: dict[int, BaseException] = {}

    def waiter(rank: int):
        def run() -> None:
            try:
                hub.transport(rank).irecv(torch.zeros(1), 0, 1).wait(3600.0)
            except BaseException as exc:
                seen[rank] = exc
                raise
        return run

    def failing() -> None:
        raise ValueError("stage 0 broke")

    with pytest.raises(ValueError, match="stage 0 broke"):
        hub.play([failing, waiter(1), waiter(2)])
    assert {r: type(e) for r, e in seen.items()} == {1: GenerationAborted, 2: GenerationAborted}
    assert "rank 0 failed: ValueError: stage 0 broke" in str(seen[1])
    with pytest.raises(GenerationAborted):
        hub.transport(1).isend(torch.zeros(1), 2, 0)


@pytest.mark.timeout(30)
def test_abort_fails_later_sends_and_receives_and_the_wrong_peer_is_named() -> None:
    hub = InProcessHub(2)
    t = hub.transport(0)
    with pytest.raises(ValueError, match="rank 0 addressed rank 5"):
        t.isend(torch.zeros(1), 5, 0)
    t.isend(torch.ones(1), 1, 0)
    buf = torch.zeros(1)
    hub.transport(1).irecv(buf, 0, 0).wait(1.0)  # a message that is there needs no turn
    assert float(buf) == 1.0
    t.abort()
    assert hub.aborted and hub.transport(1).aborted
    with pytest.raises(GenerationAborted, match="rank 0 aborted"):
        t.isend(torch.zeros(1), 1, 0)
    with pytest.raises(GenerationAborted):
        hub.transport(1).irecv(torch.zeros(1), 0, 0)


def test_play_needs_one_body_per_rank() -> None:
    with pytest.raises(ValueError, match="one body per rank"):
        InProcessHub(2).play([lambda: None])
