"""Device and backend resolution (runtime/devices.py) and host staging of device tensors over gloo."""

from __future__ import annotations

import pytest
import torch

from spotpipe.config import load_config
from spotpipe.errors import ConfigError
from spotpipe.runtime.devices import resolve_hardware


@pytest.mark.parametrize("sets, gpus, local, want", [
    ([], 0, 4, ("cpu", "gloo")),
    ([], 4, 4, ("cuda", "nccl")),
    ([], 1, 4, ("cuda", "gloo")),  # one GPU, four workers: they share it over gloo
    (["run.backend=gloo"], 8, 4, ("cuda", "gloo")),
    (["run.device=cpu"], 8, 4, ("cpu", "gloo")),
    (["run.device=cuda", "run.backend=nccl"], 2, 2, ("cuda", "nccl")),
])
def test_auto_resolves_to_what_the_machine_can_run(sets: list[str], gpus: int, local: int, want: tuple[str, str]) -> None:
    run = resolve_hardware(load_config(None, sets), local, gpus=gpus).run
    assert (run.device, run.backend) == want


@pytest.mark.parametrize("sets, gpus, message", [
    (["run.backend=nccl"], 1, "run.backend = nccl needs one GPU per local worker: 4 local workers, 1 GPU; use run.backend = gloo"),
    (["run.backend=nccl"], 0, "run.backend = nccl needs CUDA"),
    (["run.device=cuda"], 0, "run.device = cuda, but this machine has no CUDA device"),
])
def test_impossible_combinations_are_one_line(sets: list[str], gpus: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_hardware(load_config(None, sets), 4, gpus=gpus)


def test_nccl_on_the_cpu_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match="run.backend = nccl needs run.device = cuda"):
        load_config(None, ["run.backend=nccl", "run.device=cpu"])


class _Group:
    """Records what a gloo group would be handed (gloo's point-to-point takes host tensors)."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []
        self.recv_buffers: list[torch.Tensor] = []

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> object:
        self.sent.append(tensors[0])
        return _Done()

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> object:
        tensors[0].fill_(7.0)  # the message arrives
        self.recv_buffers.append(tensors[0])
        return _Done()


class _Done:
    def wait(self, timeout: object = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_tensors_cross_gloo_through_host_copies() -> None:
    from spotpipe.runtime.comm.transport import ProcessGroupTransport

    group = _Group()
    transport = ProcessGroupTransport(group, {}, stage_through_host=True)
    x = torch.arange(4.0, device="cuda")
    transport.isend(x, 1, 3).wait(1.0)
    assert group.sent[0].device.type == "cpu" and torch.equal(group.sent[0], x.cpu())
    y = torch.zeros(4, device="cuda")
    transport.irecv(y, 1, 3).wait(1.0)
    assert group.recv_buffers[0].device.type == "cpu" and torch.equal(y.cpu(), torch.full((4,), 7.0))


def test_host_tensors_are_not_copied_when_staging_is_on() -> None:
    from spotpipe.runtime.comm.transport import ProcessGroupTransport

    group = _Group()
    transport = ProcessGroupTransport(group, {}, stage_through_host=True)
    x = torch.arange(4.0)
    transport.isend(x, 1, 3).wait(1.0)
    y = torch.zeros(4)
    transport.irecv(y, 1, 3).wait(1.0)
    assert group.sent[0] is x and group.recv_buffers[0] is y and torch.equal(y, torch.full((4,), 7.0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_worker_without_cuda_computes_on_the_cpu_over_gloo_and_refuses_cuda() -> None:
    from spotpipe.runtime.devices import worker_hardware

    assert worker_hardware(load_config(None, []), 3) == ("gloo", torch.device("cpu"))
    for sets in (["run.device=cuda"], ["run.backend=nccl"]):
        with pytest.raises(ConfigError, match="this machine has no CUDA device"):
            worker_hardware(load_config(None, sets), 0)
