"""Per-generation gloo groups between two real processes: timeouts name the peer, abort wakes
pending waits here and at the peer at once, and the next generation works after an abort."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time, datetime
    import torch
    from torch.distributed import TCPStore
    from spotpipe.runtime.comm.groups import Generation, GenerationPlan
    from spotpipe.runtime.comm.transport import CommError

    rank, port = int(sys.argv[1]), int(sys.argv[2])
    store = TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=30))
    out = {}

    def wait(h, timeout):
        t0 = time.monotonic()
        try:
            h.wait(timeout)
            return {"ok": True, "s": time.monotonic() - t0}
        except CommError as exc:
            return {"error": type(exc).__name__, "text": str(exc), "s": time.monotonic() - t0}

    def barrier(name):
        store.add(name, 1)
        while int(store.add(name, 0)) < 2:
            time.sleep(0.01)

    gen = Generation(store, GenerationPlan.from_json(store.get("plan1")), rank, "gloo", 5.0)
    # 1. A message that never comes: PeerTimeout naming the peer. A gloo timeout breaks the
    #    generation's connections, so both sides move on to a new one (as workers do).
    if rank == 0:
        out["timeout"] = wait(gen.transport.irecv(torch.empty(3), 1, 99), 0.5)
    barrier("b1")
    gen.abort("timed out")
    gen = Generation(store, GenerationPlan.from_json(store.get("plan2")), rank, "gloo", 5.0)
    # 2. Rank 0 aborts its generation while both wait: both wake long before the 10 s timeout.
    if rank == 0:
        h = gen.transport.irecv(torch.empty(3), 1, 5)
        threading.Timer(0.5, gen.abort, args=("test abort",)).start()
    else:
        h = gen.transport.irecv(torch.empty(3), 0, 6)
    out["abort"] = wait(h, 10.0)
    # 3. Generation 3 works: P2P and all-reduce.
    gen2 = Generation(store, GenerationPlan.from_json(store.get("plan3")), rank, "gloo", 5.0)
    x = torch.full((3,), float(rank + 1))
    if rank == 1:
        gen2.transport.isend(x, 0, 7).wait(5.0)
    else:
        buf = torch.empty(3)
        gen2.transport.irecv(buf, 1, 7).wait(5.0)
        out["received"] = buf.tolist()
    gen2.all_reduce(x, "world", "test all-reduce")
    out["reduced"] = x.tolist()
    print("RESULT " + json.dumps(out), flush=True)
    import os
    os._exit(0)  # as workers do: no interpreter teardown of aborted gloo groups
    """
)


@pytest.mark.timeout(120)
def test_generation_timeout_abort_and_rebuild() -> None:
    from torch.distributed import TCPStore

    from spotpipe.runtime.comm.groups import GenerationPlan, Member

    store = TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=30), wait_for_workers=False)
    members = (Member(5, 0, 0), Member(8, 1, 0))
    store.set("plan1", GenerationPlan(1, 2, 1, members).to_json())
    store.set("plan2", GenerationPlan(2, 2, 1, members).to_json())
    store.set("plan3", GenerationPlan(3, 2, 1, members).to_json())
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(r), str(store.port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=100)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    r0, r1 = results
    assert r0["timeout"]["error"] == "PeerTimeout"
    assert "worker 8 (stage 1, replica 0)" in r0["timeout"]["text"] and "run.timeout_s" in r0["timeout"]["text"]
    assert r0["abort"]["error"] == "GenerationAborted" and r0["abort"]["s"] < 3.0
    assert r1["abort"]["error"] == "PeerLost" and r1["abort"]["s"] < 4.0
    assert "worker 5 (stage 0, replica 0)" in r1["abort"]["text"]
    assert r0["received"] == [2.0, 2.0, 2.0]
    assert r0["reduced"] == r1["reduced"] == [3.0, 3.0, 3.0]


def _store() -> Any:
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=30), wait_for_workers=False)


@pytest.mark.timeout(60)
def test_a_member_that_never_arrives_cancels_at_once_or_is_named() -> None:
    """Issue 10, section 1: a member lost before the groups of its generation are built. A
    cancellation (the controller aborted the generation) ends the wait at once; without one the
    wait ends after the timeout with a line naming the member that did not arrive."""
    from spotpipe.errors import SpotpipeError
    from spotpipe.runtime.comm.groups import Generation, GenerationCancelled, GenerationPlan, Member

    store = _store()
    plan = GenerationPlan(4, 2, 1, (Member(5, 0, 0), Member(8, 1, 0)))
    t0 = time.monotonic()
    with pytest.raises(GenerationCancelled) as info:
        Generation(store, plan, 0, "gloo", 30.0, cancelled=lambda: "lost worker 8" if time.monotonic() - t0 > 0.3 else "")
    assert time.monotonic() - t0 < 5.0
    assert info.value.generation == 4 and "lost worker 8" in str(info.value)
    with pytest.raises(SpotpipeError, match=r"worker 8 \(stage 1, replica 0\) did not arrive within run.timeout_s=1 s"):
        Generation(store, GenerationPlan(5, 2, 1, plan.members), 0, "gloo", 1.0)


@pytest.mark.timeout(60)
def test_a_member_lost_while_the_groups_connect_cancels_at_once() -> None:
    """Every member arrived, then one vanished before it built its half of the groups: the
    rendezvous would wait for run.timeout_s; the cancellation ends it at once."""
    from spotpipe.runtime.comm.groups import Generation, GenerationCancelled, GenerationPlan, Member

    store = _store()
    plan = GenerationPlan(7, 2, 1, (Member(5, 0, 0), Member(8, 1, 0)))
    store.set("gen/7/arrived/1", "1")  # worker 8 arrived and died
    t0 = time.monotonic()
    with pytest.raises(GenerationCancelled):
        Generation(store, plan, 0, "gloo", 30.0, cancelled=lambda: "aborted" if time.monotonic() - t0 > 0.5 else "")
    assert time.monotonic() - t0 < 5.0


def _counts() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_released_generations_give_back_their_sockets_and_threads() -> None:
    """Issue 10, section 6: a retired (aborted) generation's groups are freed once the worker
    entered the next one, so the descriptors and threads of a process that lived through many
    generations stay those of one generation. Two members as two threads of this process."""
    from spotpipe.runtime.comm.groups import Generation, GenerationPlan, Member, release_retired, retired_count

    store = _store()
    members = (Member(5, 0, 0), Member(8, 1, 0))

    def build_both(number: int) -> list[Generation]:
        plan = GenerationPlan(number, 2, 1, members)
        out: list[Any] = [None, None]

        def build(rank: int) -> None:
            out[rank] = Generation(store, plan, rank, "gloo", 20.0)

        threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def settle(target: tuple[int, int]) -> tuple[int, int]:
        deadline = time.monotonic() + 20
        now = _counts()
        while (now[0] > target[0] or now[1] > target[1]) and time.monotonic() < deadline:
            time.sleep(0.05)
            now = _counts()
        return now

    gens = build_both(1)
    base = _counts()
    for number in range(2, 8):
        x = torch.ones(4)
        for g in gens:
            g.abort("test")
        new = build_both(number)
        done = threading.Thread(target=lambda: new[1].all_reduce(torch.ones(4), "world", "test"))
        done.start()
        new[0].all_reduce(x, "world", "test")
        done.join()
        assert x.tolist() == [2.0] * 4
        assert release_retired(keep=new[0]) == 2 and retired_count() == 0
        gens = new
    fds, threads = settle(base)
    assert fds <= base[0] + 2 and threads <= base[1] + 1, (base, (fds, threads))
