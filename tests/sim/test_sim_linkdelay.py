"""The runtime's link-delay transport wrapper delays messages exactly as the simulator's links."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from spotpipe.config import JobConfig, apply_overrides  # noqa: E402
from spotpipe.runtime.comm.linkdelay import LinkDelayTransport, emulates_links, wrap_for_job  # noqa: E402
from spotpipe.runtime.comm.transport import GenerationAborted, LocalHub  # noqa: E402
from spotpipe.network import Link, Network  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def test_messages_arrive_after_latency_plus_serialisation() -> None:
    hub = LocalHub(2)
    sender, receiver = hub.transport(0), hub.transport(1)
    latency, nbytes, per_msg = 0.05, 4000 * 4, 0.02
    wrapped = LinkDelayTransport(sender, Network(2, Link(latency, nbytes / per_msg)), 0)
    t0 = time.monotonic()
    handles = [wrapped.isend(torch.full((4000,), float(i)), 1, tag=i) for i in range(3)]
    arrivals = []
    for i in range(3):
        buf = torch.empty(4000)
        receiver.irecv(buf, 0, tag=i).wait(5.0)
        arrivals.append(time.monotonic() - t0)
        assert float(buf[0]) == float(i)
    for h in handles:
        h.wait(5.0)
    expected = [latency + per_msg * (i + 1) for i in range(3)]  # serialised on the link, then latency
    for got, want in zip(arrivals, expected):
        assert want - 0.002 <= got <= want + 0.03
    assert wrapped.delayed_messages == 3
    wrapped.close()


def test_same_numbers_as_the_simulator_link_model() -> None:
    hub = LocalHub(3)
    now = [10.0]
    net = Network(3, Link(0.1, 1000.0))
    wrapped = LinkDelayTransport(hub.transport(0), net, 0, clock=lambda: now[0])
    assert wrapped.delay_of(1, 500, 10.0) == pytest.approx(10.0 + 0.5 + 0.1)
    assert wrapped.delay_of(1, 500, 10.2) == pytest.approx(10.0 + 1.0 + 0.1)  # queued behind the first
    assert wrapped.delay_of(2, 500, 10.2) == pytest.approx(10.2 + 0.5 + 0.1)  # another link is free
    wrapped.close()


def test_abort_fails_pending_sends_and_config_switch() -> None:
    hub = LocalHub(2)
    wrapped = LinkDelayTransport(hub.transport(0), Network(2, Link(30.0, float("inf"))), 0)
    handle = wrapped.isend(torch.zeros(3), 1, 0)
    wrapped.abort()
    with pytest.raises(GenerationAborted):
        handle.wait(1.0)
    with pytest.raises(GenerationAborted):
        wrapped.isend(torch.zeros(3), 1, 1)
    plain = apply_overrides(JobConfig(), [])
    assert not emulates_links(plain)
    inner = hub.transport(1)
    assert wrap_for_job(inner, plain, 0) is inner
    delayed = wrap_for_job(inner, apply_overrides(plain, ["network.latency_ms=20"]), 1)
    assert isinstance(delayed, LinkDelayTransport) and delayed.network.link(1, 0).latency_s == pytest.approx(0.02)
    delayed.close()
