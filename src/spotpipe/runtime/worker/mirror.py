"""Peer mirrors over the data plane: the previous stage's worker keeps this stage's state in its host memory.

Checkpointless training keeps a copy of every worker's state on a peer (SageMaker HyperPod,
2025); spotpipe puts the copy of stage ``s`` on the worker of stage ``s - 1`` (stage 0's on the
last stage, :func:`spotpipe.ft.policy.mirror_holder`), so the copy is lost only with the holder.

Everything travels peer to peer, owner to holder, over the generation's host group (gloo, host
tensors; :mod:`spotpipe.runtime.comm.groups`), never through the controller's store (DESIGN.md,
"Control plane and data plane"). A message is a float64 header ``[kind, step, clip coefficient,
base lr]`` and, except for a skipped step, a payload (a state in float32, a gradient in the
model's dtype); the n-th message of a generation
has tags ``MIRROR_TAG_BASE + 2n`` and ``+ 2n + 1``, so owner and holder agree without asking.
A bf16 gradient is half the bytes of a float32 one. The owner stages a gradient in one reused host
buffer, and the holder receives it into a small pool of buffers and applies it from there
(:meth:`~spotpipe.runtime.state.stage_state.StageState.use_gradient`), so a step allocates and
copies nothing on either side but that staging copy.

- At the start of every generation the owner sends its full state once (weights, AdamW moments,
  per-chunk step and lr factor; 12 bytes per parameter): a rebuilt owner, a rebuilt holder and a
  rollback all start from it.
- ``ft.mirror_every = 1`` (replay): in every step the owner sends its gradient (after the replica
  all-reduce, 4 bytes per parameter) with the clip coefficient and the learning rate, *before* it
  votes on the commit. The holder replays the owner's update on its copy with the same function
  the owner uses (:meth:`~spotpipe.runtime.state.stage_state.StageState.apply_update`) once the
  holder itself saw the step commit, so the copy is bit for bit the owner's state after every
  committed step. The price is the holder's CPU time for one more optimizer step per step, in
  a background thread, off its critical path.
- ``ft.mirror_every = N > 1`` (periodic): the owner sends its full state after every N-th
  committed step; the copy is up to N - 1 steps behind (the policy then calls it inexact).

The owner (:class:`MirrorSender`) posts each message without waiting and waits for it only
before its next message or before it reports the step (:meth:`MirrorSender.drain`), so the
transfer overlaps its commit vote and optimizer step. The holder (:class:`MirrorHolder`) keeps a
receive posted in a background thread and applies in another. A copy whose owner died before a
committed step's gradient arrived stays at the step before; the holder reports that step, and
the recovery policy treats the copy as lagging (inexact), never as current.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from spotpipe.runtime.state.stage_state import StageState

MIRROR_TAG_BASE = 1_000_000_000
"""Tags of mirror messages start here (pipeline tags are far below, recovery tags at 900 000+)."""
_TAG_SPAN = 500_000_000  # messages per generation before the tags wrap (gloo tags are 32-bit ints)

KIND_STATE, KIND_GRADIENT, KIND_SKIPPED = 1, 2, 3
HEADER_LEN = 4  # float64: kind, step, clip coefficient, base learning rate
RECEIVE_WAIT = datetime.timedelta(days=7)


def mirror_tags(seq: int) -> tuple[int, int]:
    """The header and payload tags of the ``seq``-th message of a generation.

    Args:
        seq: Message sequence number in the generation, 0-based (tags wrap around).

    Returns:
        ``(header tag, payload tag)``.
    """
    n = MIRROR_TAG_BASE + 2 * (seq % _TAG_SPAN)
    return n, n + 1


# ----------------------------------------------------------------------------------------------
# Owner side


class MirrorSender:
    """Sends one owner's messages to its holder within one generation.

    Args:
        gen: The generation (its ``host`` group).
        holder_rank: The holder's world rank in ``gen``.
        timeout_s: Limit of a wait for a posted message (``run.timeout_s``).
    """

    def __init__(self, gen: Any, holder_rank: int, timeout_s: float) -> None:
        self.gen = gen
        self.holder_rank = holder_rank
        self.timeout_s = timeout_s
        self.seq = 0
        self.error = ""
        self._pending: list[tuple[list[Any], list[torch.Tensor]]] = []
        self._staging: torch.Tensor | None = None  # the host copy of the last gradient sent
        self.bytes_sent = 0

    def _stage(self, payload: torch.Tensor) -> torch.Tensor:
        """``payload``'s values in the reused host staging buffer (free: the previous send is drained)."""
        if self._staging is None or self._staging.shape != payload.shape or self._staging.dtype != payload.dtype:
            self._staging = torch.empty(payload.shape, dtype=payload.dtype)
        self._staging.copy_(payload.detach())
        return self._staging

    def send(self, kind: int, step: int, payload: torch.Tensor | None, coef: float = 1.0, lr: float = 0.0,
             owned: bool = False) -> int:
        """Post one message after the previous ones completed; returns its bytes (0 once broken).

        Args:
            kind: ``KIND_STATE``, ``KIND_GRADIENT`` or ``KIND_SKIPPED`` (no payload).
            step: The step the message belongs to (a state: the last step applied to it).
            payload: 1-D tensor, any device: a state in float32, a gradient in the model's dtype.
                It is copied to a host staging buffer kept until sent, unless ``owned``.
            coef: Clip coefficient of the step (gradients).
            lr: Base learning rate of the step (gradients).
            owned: ``payload`` is a host tensor nobody else writes (a fresh ``StageState.flat()``):
                it is sent as it is.

        Returns:
            Bytes posted (header and payload), or 0 when the link is broken.
        """
        self.drain()
        if self.error:
            return 0
        header = torch.tensor([float(kind), float(step), float(coef), float(lr)], dtype=torch.float64)
        body = [] if payload is None else [payload if owned and payload.device.type == "cpu" else self._stage(payload)]
        tensors = [header, *body]
        h_tag, p_tag = mirror_tags(self.seq)
        self.seq += 1
        try:
            works = [self.gen.host.send([tensors[0]], self.holder_rank, h_tag)]
            if len(tensors) > 1:
                works.append(self.gen.host.send([tensors[1]], self.holder_rank, p_tag))
        except Exception as exc:  # the generation is aborted or the holder is gone
            self.error = " ".join(str(exc).split())[:200]
            return 0
        self._pending.append((works, tensors))
        n = sum(t.numel() * t.element_size() for t in tensors)
        self.bytes_sent += n
        return n

    def drain(self) -> str:
        """Wait until every posted message has left; returns "" or why it could not (the holder
        or the generation is gone: the recovery machinery handles that, the owner goes on)."""
        pending, self._pending = self._pending, []
        for works, _ in pending:
            for work in works:
                try:
                    if not self.error:
                        work.wait(datetime.timedelta(seconds=self.timeout_s))
                except Exception as exc:
                    self.error = " ".join(str(exc).split())[:200]
        return self.error


# ----------------------------------------------------------------------------------------------
# Holder side


@dataclass
class _Message:
    generation: int
    kind: int
    step: int
    coef: float
    lr: float
    payload: torch.Tensor | None


class _Receiver(threading.Thread):
    """Receives one generation's messages from the owner, in order, until the group fails or halts."""

    def __init__(self, holder: MirrorHolder, gen: Any, owner_rank: int) -> None:
        super().__init__(name=f"spotpipe-mirror-recv-g{gen.number}", daemon=True)
        self.holder = holder
        self.gen = gen
        self.owner_rank = owner_rank
        self.halted = threading.Event()
        self.finished = threading.Event()

    def _recv(self, buf: torch.Tensor, tag: int) -> bool:
        """Receive one tensor; False when halted meanwhile. Gloo tells a receive's completion only
        through ``wait``, so this blocks until the message comes or the group fails (an aborted
        generation's sockets are shut down, :meth:`~spotpipe.runtime.comm.groups.Generation.abort`);
        messages may be a long time apart (periodic mirrors, slow steps), hence no short timeout."""
        work = self.gen.host.recv([buf], self.owner_rank, tag)
        work.wait(RECEIVE_WAIT)
        return not self.halted.is_set()

    def run(self) -> None:
        seq = 0
        try:
            while not self.halted.is_set():
                h_tag, p_tag = mirror_tags(seq)
                header = torch.zeros(HEADER_LEN, dtype=torch.float64)
                if not self._recv(header, h_tag):
                    return
                kind, step, coef, lr = int(header[0]), int(header[1]), float(header[2]), float(header[3])
                payload = self.holder.receive_buffer(kind)
                if payload is not None and not self._recv(payload, p_tag):
                    return
                seq += 1
                self.holder.deliver(_Message(self.gen.number, kind, step, coef, lr, payload))
        except Exception:  # the owner or the generation is gone: nothing more comes in this generation
            return
        finally:
            self.finished.set()
            self.holder.wake()


class MirrorHolder(threading.Thread):
    """The copy of the next stage's state that this worker keeps, kept current from the owner's messages.

    Args:
        stage: The mirrored stage.
        replica: Its replica.
        state: A fresh :class:`~spotpipe.runtime.state.stage_state.StageState` of the owner's chunks
            (same shapes and order, optimizer built the same way).
        replay: True for ``ft.mirror_every = 1`` (replay gradients), False for periodic full states.

    Attributes:
        step: The last step the copy holds (None: no copy yet, or it was reset).
        bytes_received: Bytes received from the owner.
        error: Why the copy stopped following the owner (empty while it follows).
    """

    def __init__(self, stage: int, replica: int, state: StageState, replay: bool) -> None:
        super().__init__(name=f"spotpipe-mirror-{stage}", daemon=True)
        self.stage = stage
        self.replica = replica
        self.state = state
        self.replay = replay
        flat_grad, _ = state.attach_flat_gradient()  # the owner's layout: its gradient fits
        self._free_gradients: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # receive buffers
        self._free_gradients.put(flat_grad)
        self.gradient_numel, self.gradient_dtype = flat_grad.numel(), flat_grad.dtype
        self.state_numel = state.numel()
        self._inbox: queue.Queue[_Message] = queue.Queue()
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # guards the copy (state, step)
        self._halt = threading.Event()
        self._receiver: _Receiver | None = None
        self._generation = 0  # the holder's current generation
        self._committed: dict[int, int] = {}  # generation -> last step the holder committed in it
        self._closed: set[int] = set()  # generations in which no more steps will commit here
        self._busy = False
        self.min_generation = 0
        self.step: int | None = None
        self.bytes_received = 0
        self.error = ""

    def receive_buffer(self, kind: int) -> torch.Tensor | None:
        """Where the payload of a ``kind`` message is received (None: it has none). Gradients reuse
        the buffers the applier gave back (two or three are in use at most: one applied, one
        waiting for its commit, one arriving); a state gets a new one (the copy loads it).

        Args:
            kind: The message's kind (``KIND_STATE``, ``KIND_GRADIENT``, ``KIND_SKIPPED``).

        Returns:
            A float32 tensor ``[state_numel]`` for a state, a ``[gradient_numel]`` tensor in the
            gradient dtype for a gradient, else None.
        """
        if kind == KIND_STATE:
            return torch.empty(self.state_numel, dtype=torch.float32)
        if kind != KIND_GRADIENT:
            return None
        try:
            return self._free_gradients.get_nowait()
        except queue.Empty:
            return torch.empty(self.gradient_numel, dtype=self.gradient_dtype)

    # -- main thread ---------------------------------------------------------------------------

    def generation_started(self, gen: Any, owner_rank: int) -> None:
        """Follow the owner in ``gen`` (world rank ``owner_rank``); the previous generation is over.

        Args:
            gen: The new generation (its ``number`` and host group).
            owner_rank: World rank of the owner of the mirrored stage in ``gen``.
        """
        with self._cond:
            if self._receiver is not None:
                self._receiver.halted.set()
                self._closed.add(self._receiver.gen.number)
            self._generation = gen.number
            self._receiver = _Receiver(self, gen, owner_rank)
            self._cond.notify_all()
        self._receiver.start()

    def committed(self, generation: int, step: int) -> None:
        """The holder committed ``step`` in ``generation``: the owner's update of it may be replayed.

        Args:
            generation: The generation the step was committed in.
            step: The committed step, 0-based.
        """
        with self._cond:
            self._committed[generation] = step
            self._cond.notify_all()

    def settle(self, timeout_s: float) -> None:
        """The current generation is over (aborted): apply what arrived for committed steps, drop
        the rest, and return when nothing more can change the copy (or after ``timeout_s``).

        Args:
            timeout_s: Seconds to wait at most.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closed.add(self._generation)
            self._cond.notify_all()
            while time.monotonic() < deadline and self.is_alive():
                if self._inbox.empty() and not self._busy and (self._caught_up() or self._receiver_done()):
                    return
                self._cond.wait(0.05)

    def _caught_up(self) -> bool:
        """Nothing the holder committed is missing (periodic copies lag by design: always true)."""
        if not self.replay or self.error:
            return True
        last = self._committed.get(self._generation)
        return last is None or (self.step is not None and self.step >= last)

    def _receiver_done(self) -> bool:
        return self._receiver is None or self._receiver.finished.is_set()

    @property
    def nbytes(self) -> int:
        """Host bytes of the copy (weights and both AdamW moments)."""
        return 0 if self.step is None else 4 * self.state_numel

    def tensor(self) -> torch.Tensor:
        with self._lock:
            return self.state.flat()

    def reset(self, min_generation: int) -> None:
        """Forget the copy (a rollback made its step void); the next state comes from ``min_generation``.

        Args:
            min_generation: The first generation whose state message is accepted.
        """
        with self._lock:
            self.step, self.min_generation = None, min_generation

    def halt(self) -> None:
        """Stop applying and wait for the applier thread. The receiver thread (a daemon, blocked in
        a receive that will not come) is told to stop and left to end with the group or the process."""
        self._halt.set()
        if self._receiver is not None:
            self._receiver.halted.set()
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)

    # -- receiver thread -----------------------------------------------------------------------

    def deliver(self, message: _Message) -> None:
        """Queue one received message for the applier thread and count its bytes.

        Args:
            message: The message (header fields and payload).
        """
        self.bytes_received += HEADER_LEN * 8 + (0 if message.payload is None else message.payload.numel() * message.payload.element_size())
        self._inbox.put(message)
        self.wake()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- applier thread ------------------------------------------------------------------------

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                message = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            with self._cond:
                self._busy = True
            try:
                self._apply(message)
                if message.kind == KIND_GRADIENT and message.payload is not None:
                    self._free_gradients.put(message.payload)
            except Exception as exc:  # the copy is unusable: say so, the policy then skips it
                self.error = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.step = None
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _commit_known(self, message: _Message) -> bool | None:
        """True: the holder committed the message's step; False: it never will; None: not yet."""
        g = message.generation
        if self._committed.get(g, -1) >= message.step:
            return True
        if g in self._closed or self._generation > g or self._halt.is_set():
            return False
        return None

    def _apply(self, message: _Message) -> None:
        if message.generation < self.min_generation:
            return  # sent before a rollback made it void
        if message.kind == KIND_STATE:
            assert message.payload is not None
            with self._lock:
                self.state.load_flat(message.payload)
                self.step = message.step
            return
        with self._cond:  # a gradient is sent before the vote: replay it only once the step commits here
            while (known := self._commit_known(message)) is None:
                self._cond.wait(0.1)
        if not known:
            return
        with self._lock:
            if self.step is None:
                return
            if message.step <= self.step:
                return
            if message.step != self.step + 1:
                raise RuntimeError(f"mirror of stage {self.stage} holds step {self.step}, cannot replay step {message.step}")
            if message.kind == KIND_GRADIENT:
                assert message.payload is not None
                self.state.use_gradient(message.payload)
                self.state.apply_update(message.payload, message.coef, message.lr)
            self.step = message.step
