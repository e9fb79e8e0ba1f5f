"""Peer mirrors: the previous stage's worker keeps this stage's state in its host memory.

Checkpointless training keeps a copy of every worker's state on a peer (SageMaker HyperPod,
2025); spotpipe puts the copy of stage ``s`` on the worker of stage ``s - 1`` (stage 0's on the
last stage, :func:`spotpipe.ft.policy.mirror_holder`), so the copy is lost only with the holder.
Two ways to keep it current, chosen by ``ft.mirror_every``:

- ``mirror_every = 1``: :class:`MirrorReplayer`. At the start of every generation the owner
  publishes its full state once (weights, AdamW moments, per-chunk step and lr factor); then, in
  every step, it publishes only its gradient (after the replica all-reduce) with the clip
  coefficient and the learning rate, *before* it votes on the commit decision. The holder's
  background thread replays the owner's update on its copy with the same function the owner uses
  (:meth:`spotpipe.runtime.state.stage_state.StageState.apply_update`), once the holder itself saw the step commit. So the
  copy is bit for bit the owner's state after every committed step, even when the owner dies
  inside its own optimizer step (the step was decided ``commit``, the gradient is already out),
  and a refresh moves a third of the bytes of a full state. The price is the holder's CPU time
  for one more optimizer step per step.
- ``mirror_every = N > 1``: :class:`MirrorKeeper`. The owner publishes its full state after every
  N-th committed step; the holder's thread fetches the newest. The copy is up to N - 1 steps
  behind (the policy then calls it inexact).

Both travel through the controller's store, off the training critical path of the holder.
"""

from __future__ import annotations

import queue
import struct
import threading
import time
from typing import Any

import numpy as np
import torch

from spotpipe.runtime import protocol
from spotpipe.runtime.state.stage_state import StageState

HEADER = struct.Struct("<qdd?")  # step, clip coefficient, base learning rate, apply (False: a skipped step)


# ----------------------------------------------------------------------------------------------
# Owner side


def _pack(step: int, flat: torch.Tensor) -> bytes:
    return struct.pack("<q", step) + flat.numpy().tobytes()


def _unpack(blob: bytes) -> tuple[int, np.ndarray]:
    (step,) = struct.unpack("<q", blob[:8])
    return step, np.frombuffer(blob[8:], dtype=np.float32).copy()


def publish_mirror(store: Any, stage: int, replica: int, step: int, flat: torch.Tensor, generation: int = 0) -> int:
    """Publish the full state after committed ``step`` (in ``generation``) for the holder.
    Returns the bytes published."""
    blob = _pack(step, flat)
    store.set(protocol.mirror_key(stage, replica), blob)
    store.set(protocol.mirror_seq_key(stage, replica), f"{generation}:{step}")
    return len(blob)


def publish_gradient(store: Any, generation: int, stage: int, replica: int, step: int, grad: torch.Tensor,
                     coef: float, lr: float, apply: bool = True) -> int:
    """Publish ``step``'s gradient, clip coefficient and base lr for the replaying holder (``apply``
    False: the owner skips the step's update, a non-finite step, and so does the holder).
    Returns the bytes published."""
    blob = HEADER.pack(step, coef, lr, apply) + grad.detach().float().cpu().numpy().tobytes()
    store.set(protocol.mirror_grad_key(generation, stage, replica, step), blob)
    return len(blob)


# ----------------------------------------------------------------------------------------------
# Holder side


class MirrorKeeper(threading.Thread):
    """``mirror_every > 1``: a background thread that fetches the owner's newest published state.

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
        key = protocol.mirror_seq_key(self.stage, self.replica)
        with self._lock:
            if not self._store.check([key]):
                return
            seq = bytes(self._store.get(key)).decode()
            if seq == self.seq or int(seq.split(":")[0]) < self.min_generation:
                return
            step, data = _unpack(self._store.get(protocol.mirror_key(self.stage, self.replica)))
            self.step, self.data, self.seq = step, data, seq
            self.bytes_received += data.nbytes + 8

    def settle(self, timeout_s: float) -> None:
        """Make the copy as current as it can be (before a recovery reads it)."""
        self.fetch()

    def committed(self, generation: int, step: int) -> None:
        """The holder committed ``step`` (nothing to do: the owner publishes after its update)."""

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
        """Stop the thread and wait for it (so its store client is not torn down under it)."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)


class MirrorReplayer(threading.Thread):
    """``mirror_every = 1``: a copy of the owner's chunks and optimizers that replays its updates.

    Args:
        store: A store client (cloned here).
        stage: The mirrored pipeline rank.
        replica: Its replica.
        state: A fresh :class:`~spotpipe.runtime.state.stage_state.StageState` of the owner's chunks
            (same shapes and order as the owner's, optimizer built the same way).
        timeout_s: Limit of every wait for a published state or gradient.
    """

    def __init__(self, store: Any, stage: int, replica: int, state: StageState, timeout_s: float) -> None:
        super().__init__(name=f"spotpipe-mirror-{stage}", daemon=True)
        self._store = store.clone()
        self.stage = stage
        self.replica = replica
        self.state = state
        self.timeout_s = timeout_s
        self.flat_grad, _ = state.attach_flat_gradient()  # the owner's layout: its published gradient fits
        self._todo: queue.Queue[tuple[int, int]] = queue.Queue()
        self._idle = threading.Condition()
        self._busy = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.state_generation = 0
        self.min_generation = 0
        self.step: int | None = None
        self.bytes_received = 0
        self.error = ""

    # -- main thread ---------------------------------------------------------------------------

    def committed(self, generation: int, step: int) -> None:
        """The holder committed ``step`` in ``generation``: replay the owner's update of it."""
        with self._idle:
            self._busy += 1
        self._todo.put((generation, step))

    def settle(self, timeout_s: float) -> None:
        """Wait until every committed step is replayed (before a recovery reads the copy)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._busy and time.monotonic() < deadline and self.is_alive():
                self._idle.wait(0.05)

    @property
    def nbytes(self) -> int:
        """Host bytes of the copy (weights and both AdamW moments)."""
        return 0 if self.step is None else 4 * 3 * self.flat_grad.numel()

    def tensor(self) -> torch.Tensor:
        with self._lock:
            return self.state.flat()

    def reset(self, min_generation: int) -> None:
        """Forget the copy (a rollback made its step void); the next state comes from ``min_generation``."""
        with self._lock:
            self.step, self.min_generation = None, min_generation

    def halt(self) -> None:
        """Stop the thread and wait for it (so its store client is not torn down under it)."""
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)

    # -- background thread ----------------------------------------------------------------------

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                generation, step = self._todo.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._replay(generation, step)
            except Exception as exc:  # the copy is unusable: say so, the policy then skips it
                self.error = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.step = None
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _wait(self, key: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        while not self._store.check([key]):
            if self._halt.is_set() or time.monotonic() > deadline:
                raise TimeoutError(f"mirror of stage {self.stage}: {key} did not appear within {self.timeout_s:g} s")
            time.sleep(0.002)
        return bytes(self._store.get(key))

    def _replay(self, generation: int, step: int) -> None:
        if generation > self.state_generation and generation >= self.min_generation:
            # The owner publishes its full state at the start of every generation, before its
            # first step there; take it (a rebuilt owner, a rollback, or the first step).
            seq_key = protocol.mirror_seq_key(self.stage, self.replica)
            while True:
                seq = self._wait(seq_key).decode()
                if int(seq.split(":")[0]) >= generation:
                    break
                time.sleep(0.002)
            base, data = _unpack(self._store.get(protocol.mirror_key(self.stage, self.replica)))
            with self._lock:
                self.state.load_flat(torch.from_numpy(data))
                self.step, self.state_generation = base, generation
            self.bytes_received += data.nbytes
        if self.step is None or step <= self.step:
            return
        if step != self.step + 1:
            raise RuntimeError(f"mirror of stage {self.stage} holds step {self.step}, cannot replay step {step}")
        key = protocol.mirror_grad_key(generation, self.stage, self.replica, step)
        blob = self._wait(key)
        at, coef, lr, apply = HEADER.unpack_from(blob)
        grad = np.frombuffer(blob, dtype=np.float32, offset=HEADER.size)
        with self._lock:
            if apply:
                self.flat_grad.copy_(torch.from_numpy(grad.copy()))
                self.state.apply_update(self.flat_grad, coef, lr)
            self.step = step
        self.bytes_received += len(blob)
        try:
            self._store.delete_key(key)
        except Exception:
            pass
