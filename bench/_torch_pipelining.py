"""The reference side of bench/runtime_vs_torch.py: torch.distributed.pipelining.Schedule1F1B.

Runs ``steps`` training steps of the same spotpipe model chunks (``build_stage``), the same
microbatches and the same optimiser work (global grad-norm all-reduce, clipping, AdamW) on
``stages`` gloo ranks over 127.0.0.1, and returns the interval between consecutive step ends on rank 0 (the same
measure as spotpipe's ``step_time``: commit to commit).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spotpipe.config import JobConfig
from spotpipe.data.sampler import SequenceSampler
from spotpipe.data.tokens import TokenFile
from spotpipe.model.stages import build_stage
from spotpipe.model.transformer import lm_loss
from spotpipe.runtime.state.optim import build_optimizer, clip_coefficient, grad_sq_norm, lr_at, set_lr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, cfg: JobConfig, token_dir: str, steps: int, port: int, threads: int, out: Any) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.set_num_threads(threads)
    stages = cfg.pipeline.stages
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=stages)
    chunk = build_stage(cfg.model, cfg.train.seed, rank, stages)
    chunk.train()
    optimizer = build_optimizer(chunk.parameters(), cfg.train)
    stage = PipelineStage(chunk, rank, stages, torch.device("cpu"))

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets)

    schedule = Schedule1F1B(stage, cfg.pipeline.microbatches, loss_fn=loss_fn)
    token_file = TokenFile(token_dir)
    sampler = SequenceSampler(len(token_file.tokens), cfg.model.context, cfg.train.seed, "train", cfg.data.val_fraction)
    times: list[float] = []
    dist.barrier()
    last = time.perf_counter()
    for step in range(steps):
        batch = torch.from_numpy(sampler.batch(token_file, sampler.next_ids(cfg.train.batch_size)))
        tokens, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if rank == 0:
            schedule.step(tokens)
        elif rank == stages - 1:
            schedule.step(target=targets, losses=[])
        else:
            schedule.step()
        norm = torch.tensor([grad_sq_norm(chunk.parameters())], dtype=torch.float64)
        dist.all_reduce(norm)
        coef = clip_coefficient(float(norm.sqrt()), cfg.train.grad_clip)
        if coef < 1.0:
            for p in chunk.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        set_lr(optimizer, lr_at(step, cfg.train))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - last)  # end-to-end interval between step ends, data loading included
        last = now
    if rank == 0:
        out.put(times)
    dist.barrier()
    dist.destroy_process_group()


def run_torch_pipelining(cfg: JobConfig, token_dir: str, steps: int, threads: int = 1) -> list[float]:
    """Per-step wall times (seconds) of ``steps`` Schedule1F1B steps on ``cfg.pipeline.stages`` ranks."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, cfg, token_dir, steps, port, threads, out), daemon=True)
        for r in range(cfg.pipeline.stages)
    ]
    for p in procs:
        p.start()
    try:
        times: list[float] = out.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return times
