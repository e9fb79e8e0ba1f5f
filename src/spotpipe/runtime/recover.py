"""Worker side of stage recovery without restarts (issue 5): state transfer, mirrors, replay.

The controller decides (:mod:`spotpipe.runtime.supervise`); this module carries the decision out
on each worker of the new generation. A rank's state travels as one flat float tensor (every
chunk's state-dict tensors, then AdamW's ``exp_avg`` and ``exp_avg_sq`` per parameter, then a
tail of per-chunk ``step``, ``lr_scale`` and "has optimizer state" flags). Both ends build the
same layout from their own chunks, which have identical shapes, so nothing but the numbers
moves. The transfers use the new generation's world group (gloo/NCCL point-to-point), the path
checkpointless training takes (SageMaker HyperPod, 2025: peer-to-peer state, fresh
communicators, processes kept).

Strategies, as the worker executes them (the rules are in :mod:`spotpipe.ft.policy`):

- ``replica``: the live replica of the same stage sends its full state (exact).
- ``mirror``: the previous stage's worker sends the mirror it keeps in host memory (exact when
  the mirror is of the last committed step). A mirror is refreshed after the optimizer step of
  every ``ft.mirror_every``-th step: the owner publishes its flat state under
  ``mirror/<stage>/<replica>`` and the holder's background thread fetches it into its own
  memory (so the copy is lost with the holder, as the policy assumes).
- ``checkfree``: both neighbours send their blocks and their last pre-clip gradient norm; the
  replacement installs :func:`spotpipe.ft.recovery.checkfree_rebuild`, fresh optimizer state and
  ``lr x 1.1`` (CheckFree; Blagoev, Ersoy, Chen 2025, section 3.1).
- ``checkpoint``: every worker loads the last complete checkpoint (the fallback when adjacent
  stages are lost together: never continue with garbage weights).
"""

from __future__ import annotations

import datetime
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from spotpipe.ft.recovery import BLOCK_PREFIX, checkfree_rebuild, complete_state
from spotpipe.runtime import control

TAG_BASE = 900_000


# ----------------------------------------------------------------------------------------------
# Flat rank state


def _optim_tensors(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    st = optimizer.state.get(p) or {}
    return st.get("exp_avg"), st.get("exp_avg_sq")


def rank_numel(chunks: dict[int, Any], blocks_only: bool = False) -> int:
    """Length of the flat state of these chunks (full, or blocks only for CheckFree)."""
    n = 0
    for s in sorted(chunks):
        sd = chunks[s].state_dict()
        for k, v in sd.items():
            if not blocks_only or k.startswith(BLOCK_PREFIX):
                n += v.numel()
        if not blocks_only:
            n += 2 * sum(p.numel() for p in chunks[s].parameters())
    return n + (3 * len(chunks) if not blocks_only else 1)


def flatten_rank(chunks: dict[int, Any], optimizers: dict[int, Any], lr_scale: dict[int, float]) -> torch.Tensor:
    """Weights, AdamW moments and per-chunk (step, lr_scale, has_state) as one float32 CPU tensor."""
    parts: list[torch.Tensor] = []
    tail: list[float] = []
    for s in sorted(chunks):
        parts += [v.detach().reshape(-1).float().cpu() for v in chunks[s].state_dict().values()]
        step, has = 0.0, 0.0
        for p in chunks[s].parameters():
            a, b = _optim_tensors(optimizers[s], p)
            if a is None or b is None:
                parts += [torch.zeros(p.numel()), torch.zeros(p.numel())]
            else:
                has = 1.0
                parts += [a.detach().reshape(-1).float().cpu(), b.detach().reshape(-1).float().cpu()]
                st = optimizers[s].state[p].get("step", 0.0)
                step = float(st.item() if isinstance(st, torch.Tensor) else st)
        tail += [step, float(lr_scale.get(s, 1.0)), has]
    parts.append(torch.tensor(tail, dtype=torch.float32))
    return torch.cat(parts)


def unflatten_rank(flat: torch.Tensor, chunks: dict[int, Any], optimizers: dict[int, Any], lr_scale: dict[int, float]) -> None:
    """Install a flat state made by :func:`flatten_rank` (in place: ``.grad`` views stay)."""
    off = 0
    pending: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = []
    with torch.no_grad():
        for s in sorted(chunks):
            for v in chunks[s].state_dict().values():
                n = v.numel()
                v.copy_(flat[off : off + n].view_as(v).to(v.dtype))
                off += n
            moments = []
            for p in chunks[s].parameters():
                n = p.numel()
                a = flat[off : off + n].view_as(p).to(p.dtype).clone()
                b = flat[off + n : off + 2 * n].view_as(p).to(p.dtype).clone()
                off += 2 * n
                moments.append((p, a, b))
            pending.append((s, moments))
    for j, (s, moments) in enumerate(pending):
        step, scale, has = (float(x) for x in flat[off + 3 * j : off + 3 * j + 3])
        lr_scale[s] = scale
        opt = optimizers[s]
        for p, a, b in moments:
            opt.state.pop(p, None)
            if has > 0:
                opt.state[p] = {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": a, "exp_avg_sq": b}
    if off + 3 * len(pending) != flat.numel():
        raise ValueError(f"flat state has {flat.numel()} numbers, the chunks need {off + 3 * len(pending)}")


def flatten_blocks(chunks: dict[int, Any], omega: float) -> torch.Tensor:
    """The block tensors of every chunk, then the gradient norm omega (CheckFree's weight)."""
    parts = [v.detach().reshape(-1).float().cpu() for s in sorted(chunks)
             for k, v in chunks[s].state_dict().items() if k.startswith(BLOCK_PREFIX)]
    parts.append(torch.tensor([omega], dtype=torch.float32))
    return torch.cat(parts)


def install_checkfree(prev: torch.Tensor, nxt: torch.Tensor, chunks: dict[int, Any], optimizers: dict[int, Any],
                      lr_scale: dict[int, float], scale: float) -> tuple[float, float]:
    """CheckFree rebuild of every chunk from the neighbours' flat blocks; fresh AdamW state."""
    w_prev, w_next = float(prev[-1]), float(nxt[-1])
    off = 0
    for s in sorted(chunks):
        sd = chunks[s].state_dict()
        pa: dict[str, torch.Tensor] = {}
        pb: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if k.startswith(BLOCK_PREFIX):
                n = v.numel()
                pa[k] = prev[off : off + n].view_as(v)
                pb[k] = nxt[off : off + n].view_as(v)
                off += n
        rebuilt = checkfree_rebuild({"model": pa}, {"model": pb}, w_prev, w_next)
        model = {k: (rebuilt[k] if k in rebuilt else v) for k, v in sd.items()}
        complete_state({"model": sd}, {"model": model})
        with torch.no_grad():
            for k, v in rebuilt.items():
                sd[k].copy_(v.to(sd[k].dtype))
        optimizers[s].state.clear()
        lr_scale[s] = scale
    return w_prev, w_next


# ----------------------------------------------------------------------------------------------
# Point-to-point over the new generation's world group


def p2p(gen: Any, sends: Iterable[tuple[torch.Tensor, int, int]], recvs: Iterable[tuple[torch.Tensor, int, int]],
        timeout_s: float) -> None:
    """Post every send and receive ``(tensor, world rank, tag)``, then wait for all of them."""
    works = [gen.world.send([t], dst, tag) for t, dst, tag in sends]
    works += [gen.world.recv([t], src, tag) for t, src, tag in recvs]
    for w in works:
        w.wait(datetime.timedelta(seconds=timeout_s))


# ----------------------------------------------------------------------------------------------
# Mirrors (host memory of the previous stage's worker)


def _pack(step: int, flat: torch.Tensor) -> bytes:
    return struct.pack("<q", step) + flat.numpy().tobytes()


def _unpack(blob: bytes) -> tuple[int, np.ndarray]:
    (step,) = struct.unpack("<q", blob[:8])
    return step, np.frombuffer(blob[8:], dtype=np.float32).copy()


def publish_mirror(store: Any, stage: int, replica: int, step: int, flat: torch.Tensor, generation: int = 0) -> int:
    """Owner side: publish the state after committed ``step`` (in ``generation``) for the holder.
    Returns the bytes published."""
    blob = _pack(step, flat)
    store.set(control.mirror_key(stage, replica), blob)
    store.set(control.mirror_seq_key(stage, replica), f"{generation}:{step}")
    return len(blob)


class MirrorKeeper(threading.Thread):
    """Holder side: a background thread that fetches the next stage's published state into this
    process's memory (off the training critical path).

    Args:
        store: A store client (cloned here).
        stage: The mirrored stage (the next pipeline rank, wrapping around).
        replica: Its replica.
        poll_s: How often to look for a new refresh.
    """

    def __init__(self, store: Any, stage: int, replica: int, poll_s: float = 0.05) -> None:
        super().__init__(name=f"spotpipe-mirror-{stage}", daemon=True)
        self._store = store.clone()
        self.stage = stage
        self.replica = replica
        self.poll_s = poll_s
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.step: int | None = None
        self.data: np.ndarray | None = None
        self.seq = ""
        self.min_generation = 0  # after a rollback: ignore states published before it
        self.bytes_received = 0

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.fetch()
            except Exception:
                pass
            self._halt.wait(self.poll_s)

    def fetch(self) -> None:
        """Take the newest published state if it is newer than the one held."""
        key = control.mirror_seq_key(self.stage, self.replica)
        with self._lock:
            if not self._store.check([key]):
                return
            seq = bytes(self._store.get(key)).decode()
            if seq == self.seq or int(seq.split(":")[0]) < self.min_generation:
                return
            step, data = _unpack(self._store.get(control.mirror_key(self.stage, self.replica)))
            self.step, self.data, self.seq = step, data, seq
            self.bytes_received += data.nbytes + 8

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else int(self.data.nbytes)

    def tensor(self) -> torch.Tensor:
        with self._lock:
            assert self.data is not None
            return torch.from_numpy(self.data.copy())

    def reset(self, min_generation: int) -> None:
        """Forget the held state (a rollback made its step void)."""
        with self._lock:
            self.step, self.data, self.seq, self.min_generation = None, None, "", min_generation

    def halt(self) -> None:
        self._halt.set()


def wait_key(store: Any, key: str, timeout_s: float, stop: Any = None) -> bytes:
    """Poll ``key`` until it exists (``stop()`` true or timeout: raise TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline or (stop is not None and stop()):
            raise TimeoutError(f"store key {key} did not appear within {timeout_s:g} s")
        time.sleep(0.005)
    return bytes(store.get(key))
