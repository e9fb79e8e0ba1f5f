"""Per-generation gloo groups between two real processes: timeouts name the peer, abort wakes
pending waits here and at the peer at once, and the next generation works after an abort."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap

import pytest

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
