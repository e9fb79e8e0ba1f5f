"""Which device each worker computes on and which backend carries its tensors.

``run.device`` (``auto``: CUDA when this machine has it) and ``run.backend`` (``auto``: NCCL when
every local worker gets a GPU of its own, else gloo) are resolved once, by the controller, before
any worker starts (:func:`resolve_hardware`), so a bad combination is one line and every local
worker gets the same answer. The combinations:

- ``cpu`` + ``gloo``: the default on a machine without a GPU.
- ``cuda`` + ``nccl``: one GPU per local worker (local index ``i`` takes ``cuda:i``); activations,
  gradients and all-reduces stay on the devices. NCCL cannot put two ranks of one communicator on
  one GPU, so fewer GPUs than local workers is refused.
- ``cuda`` + ``gloo``: the workers share the GPUs (``cuda:i mod n``) and compute there; gloo
  moves the pipeline's messages through host memory (the transport stages device tensors,
  :class:`spotpipe.runtime.comm.transport.ProcessGroupTransport`). The single-GPU case.

State transfers (mirrors, recovery) always go through the generation's gloo host group with host
tensors, whatever the backend (:mod:`spotpipe.runtime.comm.groups`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from spotpipe.config import JobConfig
from spotpipe.errors import ConfigError


def resolve_hardware(cfg: JobConfig, local_workers: int, gpus: int | None = None) -> JobConfig:
    """``cfg`` with ``run.device`` and ``run.backend`` made concrete for this machine.

    Args:
        cfg: The job.
        local_workers: Worker processes that will run on this machine (pipeline roles here).
        gpus: CUDA devices of this machine (default: ``torch.cuda.device_count()`` when CUDA is
            available, else 0).

    Returns:
        The config with ``run.device`` in {cpu, cuda} and ``run.backend`` in {gloo, nccl}.

    Raises:
        ConfigError: ``run.device = cuda`` without a GPU; ``run.backend = nccl`` on the CPU or with
            fewer GPUs than local workers (naming both counts and what to set instead).
    """
    r = cfg.run
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if r.device == "cuda" and gpus == 0:
        raise ConfigError("run.device = cuda, but this machine has no CUDA device; use run.device = cpu or auto")
    device = "cuda" if r.device == "cuda" or (r.device == "auto" and gpus > 0) else "cpu"
    backend = r.backend
    if backend == "auto":
        backend = "nccl" if device == "cuda" and gpus >= local_workers else "gloo"
    if backend == "nccl":
        if device != "cuda":
            raise ConfigError("run.backend = nccl needs CUDA, which this machine does not have; use run.backend = gloo or auto")
        if gpus < local_workers:
            raise ConfigError(
                f"run.backend = nccl needs one GPU per local worker: {local_workers} local workers, {gpus} GPU"
                f"{'s' if gpus != 1 else ''}; use run.backend = gloo (the workers share the GPU{'s' if gpus != 1 else ''}, "
                "messages cross through host memory) or fewer workers on this machine (run.local_workers)"
            )
    return replace(cfg, run=replace(r, device=device, backend=backend))


def worker_hardware(cfg: JobConfig, local_index: int) -> tuple[str, torch.device]:
    """The backend and device of the worker with ``local_index`` on its machine.

    ``run.device`` and ``run.backend`` come resolved from the controller (:func:`resolve_hardware`)
    for its own machine; a worker that joined from another machine resolves an ``auto`` left in
    them on its own: ``cuda:local_index mod n`` or the CPU, NCCL when it computes on CUDA.

    Args:
        cfg: The job (``run.device``, ``run.backend``).
        local_index: The worker's index among the workers on its machine, 0-based.

    Returns:
        ``(backend, device)``: ``"gloo"`` or ``"nccl"``, and the torch device.

    Raises:
        ConfigError: CUDA (or NCCL) asked for on a machine without it.
    """
    cuda = torch.cuda.is_available()
    r = cfg.run
    if (r.device == "cuda" or r.backend == "nccl") and not cuda:
        raise ConfigError("run.device = cuda / run.backend = nccl, but this machine has no CUDA device; "
                          "use run.device = cpu (or auto) and run.backend = gloo (or auto)")
    on_cuda = r.device == "cuda" or r.backend == "nccl" or (r.device == "auto" and cuda)
    device = torch.device("cuda", local_index % torch.cuda.device_count()) if on_cuda else torch.device("cpu")
    backend = r.backend if r.backend != "auto" else ("nccl" if on_cuda else "gloo")
    return backend, device
