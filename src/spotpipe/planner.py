"""Memory planning: bytes per model chunk from the config, and the plans a per-rank budget allows.

:func:`chunk_bytes` turns the model's shapes (:func:`spotpipe.model.partition.model_shapes`) into
the per-chunk sizes :func:`spotpipe.schedule.memory.memory_profile` reads: parameters and their
gradients in ``model.dtype``, AdamW's two moments in the same dtype (``torch.optim.AdamW`` keeps
``exp_avg`` and ``exp_avg_sq`` like the parameter; Loshchilov and Hutter 2019), the activations one
microbatch keeps for backward, and the input a recomputed forward keeps (the previous chunk's
hidden state; token ids count as nothing).

:func:`predict_memory` is the job's prediction: its lowered schedule (with the ``R`` actions
``pipeline.recompute`` adds) through the memory model. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from spotpipe.config import JobConfig
from spotpipe.cost import num_chunks, sequences_per_microbatch
from spotpipe.model.partition import model_shapes
from spotpipe.schedule.build import job_schedule
from spotpipe.schedule.memory import ChunkBytes, RankMemory, memory_profile

#: AdamW state per parameter, in parameter elements: the first and second moments.
ADAMW_MOMENTS = 2


def chunk_bytes(cfg: JobConfig) -> list[ChunkBytes]:
    """Bytes of every model chunk of the job (one entry per schedule stage).

    Args:
        cfg: The job; ``[model]`` gives the shapes and dtype, ``[pipeline]`` how many chunks and
            the microbatch size (``train.batch_size / (replicas x microbatches)`` sequences).

    Returns:
        One :class:`~spotpipe.schedule.memory.ChunkBytes` per chunk, in bytes.
    """
    shapes = model_shapes(cfg.model, num_chunks(cfg))
    seqs = sequences_per_microbatch(cfg)
    out: list[ChunkBytes] = []
    for i, s in enumerate(shapes):
        param_bytes = float(s.params * s.dtype_bytes)
        out.append(ChunkBytes(
            weights=param_bytes,
            grads=param_bytes,
            optimizer=ADAMW_MOMENTS * param_bytes,
            activations=float(s.activation_bytes_per_sequence * seqs),
            input=float(shapes[i - 1].boundary_bytes_per_sequence * seqs) if i > 0 else 0.0,
        ))
    return out


def predict_memory(cfg: JobConfig, offload: Iterable[int] = ()) -> tuple[RankMemory, ...]:
    """Bytes per rank over one step of the job, as :func:`~spotpipe.schedule.memory.memory_profile` models them.

    Args:
        cfg: The job (its schedule, recompute keys and model).
        offload: chunks whose optimizer state lives in host memory.

    Returns:
        One :class:`~spotpipe.schedule.memory.RankMemory` per pipeline rank.

    Raises:
        ScheduleError: a bad schedule, recompute or offload choice.
    """
    return memory_profile(job_schedule(cfg), chunk_bytes(cfg), offload=offload)
