"""Optimizer state in host memory: ChronosPipe's offload of the state with the poorest locality.

The AdamW moments of a chunk are touched once per step, by the optimizer, after every forward
and backward of the step: the poorest temporal locality a worker's memory holds (Chronos-Offload,
Lin et al. 2025, arXiv 2503.03182; the same observation as ZeRO-Offload, Ren et al. 2021).
:class:`OffloadedAdamW` keeps the moments of the offloaded chunks in host memory (pinned on CUDA)
and brings one chunk's moments to the device for its update, then sends them back, so at most one
chunk's moments are on the device at a time (what :func:`spotpipe.schedule.memory.memory_profile`
calls ``streamed``). On CUDA the next chunk's moments are copied on a side stream while the
current chunk updates. On CPU the host is the device: the same code runs (the copies are no-ops),
and :meth:`OffloadedAdamW.device_resident` tells the memory accounting what left the device.

The update is the same AdamW arithmetic on the same numbers, so training is exactly that of
:class:`~spotpipe.runtime.state.optimizer.ChunkAdamW`. It is a
:class:`~spotpipe.runtime.state.optimizer.StageOptimizer` by composition: every method but
:meth:`step` is the inner ChunkAdamW's, and moments read or installed between steps live on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from spotpipe.config import TrainConfig
from spotpipe.runtime.state.optim import set_lr
from spotpipe.runtime.state.optimizer import ChunkAdamW

_MOMENTS = ("exp_avg", "exp_avg_sq")


class OffloadedAdamW:
    """A :class:`ChunkAdamW` whose offloaded chunks keep their moments in host memory between updates.

    Args:
        chunks: Chunk index -> module (on the compute device).
        train: The ``[train]`` section.
        offloaded: Chunk indices whose moments live on the host (default: all).

    Attributes:
        offloaded: The chunks whose moments are host-resident between updates.
        streamed_peak: Bytes of the offloaded moments on the device at once in the last
            :meth:`step` (one chunk's; two while the next is prefetched on CUDA).
        streamed_by_chunk: Per offloaded chunk, the bytes on the device during its update.
    """

    def __init__(self, chunks: Mapping[int, torch.nn.Module], train: TrainConfig,
                 offloaded: Iterable[int] | None = None) -> None:
        self.inner = ChunkAdamW(chunks, train)
        self.offloaded = frozenset(chunks if offloaded is None else offloaded)
        first = next(iter(next(iter(chunks.values())).parameters()))
        self.device = first.device
        self.host = torch.device("cpu")
        self._pin = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._pin else None
        self.streamed_peak = 0
        self.streamed_by_chunk: dict[int, int] = {}

    # -- where the moments are -----------------------------------------------------------------

    def device_resident(self, chunk: int) -> bool:
        """Whether ``chunk``'s moments stay on the compute device between updates.

        Args:
            chunk: Global chunk index.

        Returns:
            False for the offloaded chunks (their moments live in host memory), else True.
        """
        return chunk not in self.offloaded

    def _moment_bytes(self, chunk: int) -> int:
        """Bytes of ``chunk``'s moments."""
        return sum(t.numel() * t.element_size() for st in self.inner.by_chunk[chunk].state.values()
                   for k, t in st.items() if k in _MOMENTS)

    def _move(self, chunk: int, device: torch.device, non_blocking: bool = False) -> None:
        """Move ``chunk``'s moments (not AdamW's scalar step count) to ``device``, in place in the state."""
        for state in self.inner.by_chunk[chunk].state.values():
            for key in _MOMENTS:
                t = state.get(key)
                if t is None or t.device == device:
                    continue
                if device.type == "cpu" and self._pin:
                    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                    host.copy_(t, non_blocking=non_blocking)
                    state[key] = host
                else:
                    state[key] = t.to(device, non_blocking=non_blocking)

    # -- StageOptimizer ------------------------------------------------------------------------

    def step(self, lr: float, lr_scale: Mapping[int, float]) -> None:
        """Update every chunk in index order; offloaded ones come to the device for their update
        (the next one prefetched on a side stream on CUDA) and go back to the host after it."""
        order = sorted(self.inner.by_chunk)
        away = [s for s in order if s in self.offloaded]
        streamed = 0
        if away and self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._move(away[0], self.device, non_blocking=True)
        for s in order:
            if s in self.offloaded:
                if self._stream is not None:
                    torch.cuda.current_stream(self.device).wait_stream(self._stream)
                else:
                    self._move(s, self.device)
                nxt = away.index(s) + 1
                if nxt < len(away) and self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        self._move(away[nxt], self.device, non_blocking=True)
            self._step_one(s, lr, lr_scale)
            if s in self.offloaded:
                nxt_bytes = self._moment_bytes(away[away.index(s) + 1]) if self._stream is not None and s != away[-1] else 0
                self.streamed_by_chunk[s] = self._moment_bytes(s) + nxt_bytes
                streamed = max(streamed, self.streamed_by_chunk[s])
                self._move(s, self.host)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).synchronize()
        self.streamed_peak = streamed

    def _step_one(self, chunk: int, lr: float, lr_scale: Mapping[int, float]) -> None:
        """One chunk's update, as :meth:`ChunkAdamW.step` does it for every chunk."""
        opt = self.inner.by_chunk[chunk]
        set_lr(opt, lr, lr_scale[chunk])
        opt.step()

    def moments(self, chunk: int, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return self.inner.moments(chunk, param)

    def set_moments(self, chunk: int, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float) -> None:
        self.inner.set_moments(chunk, param, exp_avg, exp_avg_sq, step)
        if chunk in self.offloaded:
            self._move(chunk, self.host)

    def clear(self, chunk: int, param: torch.Tensor | None = None) -> None:
        self.inner.clear(chunk, param)

    def state_dict(self) -> dict[int, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[int, Any]) -> None:
        self.inner.load_state_dict(state)
        for s in self.offloaded:
            self._move(s, self.host)

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        self.inner.add_step_hook(hook)

    def master(self, chunk: int, param: torch.Tensor) -> torch.Tensor | None:
        return None
