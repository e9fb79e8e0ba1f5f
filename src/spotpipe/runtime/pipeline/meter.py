"""Measured memory of one worker: the bytes autograd holds for backward, and the resident state.

What :mod:`spotpipe.schedule.memory` predicts from the IR, measured on the running model:

* **Saved activations.** :class:`SavedTensorMeter` counts the tensors autograd saves for backward
  through ``torch.autograd.graph.saved_tensors_hooks`` (PyTorch, "Hooks for saved tensors"): the
  pack hook wraps every saved tensor in a small handle that counts its storage's bytes once
  (several ops may save one tensor, views share a storage), and the handle's release, when
  autograd frees the graph after the backward, takes them off again. Parameters saved by an op
  (a linear layer's weight) are state, not activations, and are not counted here. The meter
  keeps the current total and its peak since :meth:`SavedTensorMeter.reset_peak`.
* **State.** :func:`state_bytes` adds up parameters, their gradients and optimizer-state tensors
  resident on the compute device (host-resident optimizer state, ChronosPipe's offload, does not
  count).

On CUDA, ``torch.cuda.max_memory_allocated`` measures everything the caching allocator handed
out; the worker reports it next to these numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch


class _Held:
    """One saved tensor as autograd keeps it; dropping the handle releases its storage's count."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: SavedTensorMeter, key: int) -> None:
        self.tensor = tensor
        self.meter = meter
        self.key = key

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward while :meth:`saving` is active.

    Args:
        exclude: Tensors (the parameters of the chunks) whose storage is state, not activation.

    Attributes:
        current: Bytes held now (each storage once).
        peak: Most bytes held at once since the last :meth:`reset_peak`.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._held: dict[int, list[int]] = {}  # storage pointer -> [handles, bytes]
        self.current = 0
        self.peak = 0

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Add tensors (e.g. the parameters of a replaced chunk) whose storage is not counted.

        Args:
            tensors: Tensors whose storages are left out of the count from now on.
        """
        self._exclude.update(t.untyped_storage().data_ptr() for t in tensors)

    def reset_peak(self) -> None:
        """Start a new measurement window (a step): the peak becomes what is held now."""
        self.peak = self.current

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Count what autograd saves inside this block (a forward or a recompute)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _pack(self, tensor: torch.Tensor) -> object:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._exclude:
            return tensor
        entry = self._held.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            self._held[key] = [1, nbytes]
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
        else:
            entry[0] += 1
        return _Held(tensor, self, key)

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        if isinstance(packed, _Held):
            return packed.tensor
        assert isinstance(packed, torch.Tensor)
        return packed

    def _release(self, key: int) -> None:
        entry = self._held.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._held[key]
            self.current -= entry[1]


@dataclass(frozen=True)
class StateBytes:
    """Bytes of a worker's state on its compute device.

    Attributes:
        weights: parameters.
        grads: gradients (``.grad`` tensors, or the flat buffer they view, counted once).
        optimizer: optimizer-state tensors on the device.
    """

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """All three together."""
        return self.weights + self.grads + self.optimizer


def _storage_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type != device.type:
            continue
        if t.dim() == 0:  # a scalar (AdamW's step count): its own few bytes
            seen[id(t)] = t.element_size()
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_bytes(modules: Iterable[torch.nn.Module], optimizer_state: Iterable[torch.Tensor],
                device: torch.device | str = "cpu", grads: Iterable[torch.Tensor] | None = None) -> StateBytes:
    """Parameter, gradient and optimizer-state bytes resident on ``device``.

    Args:
        modules: The chunks a worker holds.
        optimizer_state: Every tensor of their optimizer state (moments; host-resident ones are
            skipped by their device).
        device: The compute device.
        grads: The gradient tensors; default the parameters' ``.grad``. A flat buffer the
            gradients view counts once.

    Returns:
        The three byte counts, each storage counted once.
    """
    dev = torch.device(device)
    params = [p for m in modules for p in m.parameters()]
    grad_list = [p.grad for p in params if p.grad is not None] if grads is None else list(grads)
    return StateBytes(_storage_bytes(params, dev), _storage_bytes(grad_list, dev), _storage_bytes(optimizer_state, dev))


def moment_tensors(optimizer: Any, chunks: Mapping[int, torch.nn.Module]) -> list[torch.Tensor]:
    """The AdamW moments of every parameter of ``chunks`` on the device (none before a parameter's
    first update, none of a chunk the optimizer offloads to host memory), and the float32 master
    weights of a 16-bit model (:mod:`spotpipe.runtime.state.master`).

    Args:
        optimizer: A :class:`~spotpipe.runtime.state.optimizer.StageOptimizer` (its ``moments``).
        chunks: Chunk index -> module.

    Returns:
        The tensors, in chunk and parameter order.
    """
    out: list[torch.Tensor] = []
    resident = getattr(optimizer, "device_resident", None)
    for index, chunk in chunks.items():
        # offloaded moments are in host memory between updates (on CPU too, where host = device)
        away = resident is not None and not resident(index)
        for param in chunk.parameters():
            found = None if away else optimizer.moments(index, param)
            if found is not None:
                out.extend(found[:2])
            master = optimizer.master(index, param)
            if master is not None:
                out.append(master)
    return out


@dataclass(frozen=True)
class MeasuredMemory:
    """One rank's measured memory over one step.

    Attributes:
        rank: Pipeline rank.
        activations_peak: Most bytes autograd held for backward at once during the step.
        state: Parameters, gradients and optimizer state on the device (taken after the
            backwards, when every gradient exists; the workers keep them for the whole step).
        streamed: Offloaded optimizer state brought to the device at once for the update
            (:class:`~spotpipe.runtime.state.offload.OffloadedAdamW`; 0 without offload).
    """

    rank: int
    activations_peak: int
    state: StateBytes
    streamed: int = 0

    @property
    def peak(self) -> int:
        """State plus the larger of the activation peak and the optimizer update's streamed state:
        the quantity :mod:`spotpipe.schedule.memory` predicts."""
        return self.state.total + max(self.activations_peak, self.streamed)


def step_memory_report(rank: int, meter: SavedTensorMeter, chunks: Mapping[int, torch.nn.Module], optimizer: Any,
                       device: torch.device, flat_grad: torch.Tensor) -> dict[str, Any]:
    """What a worker held in the step just played, as its step report carries it.

    Args:
        rank: The worker's pipeline rank.
        meter: Its saved-tensor meter (peak since the step began).
        chunks: Its chunks.
        optimizer: Its :class:`~spotpipe.runtime.state.optimizer.StageOptimizer`.
        device: The compute device.
        flat_grad: The flat gradient buffer every ``.grad`` views.

    Returns:
        ``rank``; ``activations`` (the saved-tensor peak), ``weights``, ``grads``, ``optimizer``
        (device-resident bytes), ``streamed`` (offloaded moments on the device during the last
        update) and ``peak`` = weights + grads + optimizer + max(activations, streamed), in bytes;
        on CUDA also ``cuda_max_allocated`` (``torch.cuda.max_memory_allocated``).
    """
    streamed = int(getattr(optimizer, "streamed_peak", 0))
    state = state_bytes(chunks.values(), moment_tensors(optimizer, chunks), device, grads=[flat_grad])
    out: dict[str, Any] = {"rank": rank, "activations": meter.peak, "weights": state.weights, "grads": state.grads,
                           "optimizer": state.optimizer, "streamed": streamed,
                           "peak": state.total + max(meter.peak, streamed)}
    if device.type == "cuda":
        out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(device))
    return out
