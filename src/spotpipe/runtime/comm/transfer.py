"""Point-to-point state transfers over a generation's world group, and waiting for a store key.

Recovery moves stage state worker to worker (:mod:`spotpipe.runtime.worker.recovery`), never
through the controller's store: each source posts its sends and each target its receives on the
new generation's host group (gloo point-to-point of host tensors, the data plane beside the
device group, :mod:`spotpipe.runtime.comm.groups`), and all are waited on with one timeout. A
device tensor is copied to the host first (NCCL would need one GPU per peer and device buffers on
both sides; state is installed from host memory anyway).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

TAG_BASE = 900_000
"""Tags of recovery transfers start here (pipeline messages use tags far below it)."""


def p2p(gen: Any, sends: Iterable[tuple[torch.Tensor, int, int]], recvs: Iterable[tuple[torch.Tensor, int, int]],
        timeout_s: float) -> None:
    """Post every send and receive, then wait for all of them.

    Args:
        gen: The generation (its ``host`` process group; ranks are world ranks).
        sends: ``(tensor, destination world rank, tag)``; any device (copied to the host).
        recvs: ``(host buffer, source world rank, tag)``; filled in place.
        timeout_s: Limit of each wait, seconds.

    Raises:
        RuntimeError: A peer is gone or the group was aborted (torch's error, or before anything
            is posted when the generation is already aborted).
    """
    if gen.aborted:
        raise RuntimeError(f"generation {gen.number} was aborted ({gen.abort_reason or 'no reason given'})")
    staged = [(t.detach().cpu().contiguous(), dst, tag) for t, dst, tag in sends]
    works = [gen.host.send([t], dst, tag) for t, dst, tag in staged]
    works += [gen.host.recv([t], src, tag) for t, src, tag in recvs]
    for w in works:
        w.wait(datetime.timedelta(seconds=timeout_s))


def wait_key(store: Any, key: str, timeout_s: float, stop: Callable[[], bool] | None = None) -> bytes:
    """Poll the store until ``key`` exists and return its value.

    Args:
        store: A ``torch.distributed`` store (``check``, ``get``).
        key: The key to wait for.
        timeout_s: Seconds to wait at most.
        stop: Polled every 5 ms; true ends the wait early.

    Returns:
        The key's value.

    Raises:
        TimeoutError: After ``timeout_s`` seconds, or as soon as ``stop()`` is true.
    """
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline or (stop is not None and stop()):
            raise TimeoutError(f"store key {key} did not appear within {timeout_s:g} s")
        time.sleep(0.005)
    return bytes(store.get(key))
