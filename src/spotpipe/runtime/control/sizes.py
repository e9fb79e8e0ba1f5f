"""What a job holds and does per step, for the start-up line and the run summary.

From the model's shapes alone (:func:`spotpipe.model.partition.model_shapes`; nothing is built):
the parameter count, the tokens and model FLOPs of one step, and per worker the bytes of its
stage state, of the mirror it keeps of the next stage, and of its checkpoint file. Model FLOPs
utilisation (MFU, Chowdhery et al. 2022, PaLM, appendix B: model FLOPs per second over the
devices' peak) is given only where the device's peak is known (:data:`PEAK_TFLOPS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from spotpipe.config import JobConfig
from spotpipe.ft.policy import swap_schedule_on
from spotpipe.model.partition import ADAMW_MOMENTS, DTYPE_BYTES, model_shapes, optimizer_bytes_per_param
from spotpipe.schedule.generators import model_chunks

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Dense tensor-core peaks from the vendors' data sheets (SXM parts); float32 = TF32.
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "L40S": {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0},
    "A10G": {"bfloat16": 70.0, "float16": 70.0, "float32": 35.0},
}


@dataclass(frozen=True)
class JobSizes:
    """Sizes of one job.

    Attributes:
        params: Parameters of the whole model.
        largest_stage_params: Parameters of the largest pipeline rank (all its chunks).
        tokens_per_step: Tokens of one optimizer step (all replicas).
        flops_per_step: Model FLOPs of one step: 3 x forward (forward + backward), no recompute.
        state_bytes: Bytes of the largest rank's state on its device: weights and gradients in
            ``model.dtype``, and the optimizer state (AdamW's moments in float32, plus float32
            master weights for a 16-bit model): 16 bytes per parameter either way.
        mirror_bytes: Host bytes of the mirror a worker keeps of the next stage (0 without mirrors).
        checkpoint_bytes: Bytes of the largest rank's checkpoint file (weights + moments).
    """

    params: int
    largest_stage_params: int
    tokens_per_step: int
    flops_per_step: float
    state_bytes: int
    mirror_bytes: int
    checkpoint_bytes: int


_TAIL_MARGIN = 64 * 2**10  # the flat form's per-chunk / per-parameter tail and a message header


def mirror_state_bytes(cfg: JobConfig) -> int:
    """Bytes of the largest rank's full mirror state: weights plus AdamW's two moments in float32
    (12 bytes per parameter, the runtime's flat stage state), with the CheckFree+ embedding and
    head copies where the swap schedule keeps them, plus a margin for the flat form's tail.

    Args:
        cfg: The job (model sizes, stages, schedule, ``ft``).

    Returns:
        Bytes, an upper estimate within a 64 KiB margin.
    """
    p, m = cfg.pipeline, cfg.model
    chunks = model_chunks(p.schedule, p.stages, p.virtual_stages)
    params = [s.params for s in model_shapes(m, chunks)]
    if swap_schedule_on(cfg.ft) and chunks >= 4:
        params[1] += m.vocab_size * m.d_model  # the embedding copy
        params[chunks - 2] += m.vocab_size * m.d_model + m.d_model  # the final norm and head copy
    per_rank = [sum(params[c] for c in range(rank, chunks, p.stages)) for rank in range(p.stages)]
    return 4 * (1 + ADAMW_MOMENTS) * max(per_rank) + _TAIL_MARGIN


def job_sizes(cfg: JobConfig, mirrors: bool) -> JobSizes:
    """The sizes of ``cfg``'s job (``mirrors``: whether workers keep mirrors).

    Args:
        cfg: The job.
        mirrors: Whether workers keep mirrors of the next stage.

    Returns:
        The sizes (counts, FLOPs and bytes); FLOPs per step are 3 x the forward FLOPs (PaLM
        accounting).

    Raises:
        ConfigError: if the model cannot be cut into the schedule's chunks.
    """
    p, m = cfg.pipeline, cfg.model
    chunks = model_chunks(p.schedule, p.stages, p.virtual_stages)
    shapes = model_shapes(m, chunks)
    per_rank = [sum(shapes[c].params for c in range(rank, chunks, p.stages)) for rank in range(p.stages)]
    tokens = cfg.train.batch_size * m.context
    largest = max(per_rank)
    return JobSizes(
        params=sum(s.params for s in shapes),
        largest_stage_params=largest,
        tokens_per_step=tokens,
        flops_per_step=3.0 * tokens * sum(s.forward_flops_per_token for s in shapes),
        state_bytes=(2 * DTYPE_BYTES[m.dtype] + optimizer_bytes_per_param(DTYPE_BYTES[m.dtype])) * largest,
        mirror_bytes=mirror_state_bytes(cfg) if mirrors else 0,
        checkpoint_bytes=12 * largest,
    )


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device named ``device_name`` (``torch.cuda.get_device_name``) for
    ``dtype``, or None when the device is not in :data:`PEAK_TFLOPS` (CPUs, unknown GPUs).

    Args:
        device_name: The device's name.
        dtype: ``model.dtype``; a dtype without an entry uses the float32 peak.

    Returns:
        FLOP/s, or None.
    """
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return peaks.get(dtype, peaks["float32"]) * 1e12
    return None


def mfu(sizes: JobSizes, step_s: float, device_name: str, dtype: str, devices: int) -> float | None:
    """Model FLOPs utilisation: ``flops_per_step / step_s`` over ``devices`` x the peak; None if unknown.

    Args:
        sizes: The job's sizes (:func:`job_sizes`).
        step_s: Seconds per step.
        device_name: The devices' name.
        dtype: ``model.dtype``.
        devices: How many devices the job uses.

    Returns:
        The fraction of the peak, or None when the peak is unknown or ``step_s`` or ``devices`` is
        not positive.
    """
    peak = peak_flops(device_name, dtype)
    if peak is None or step_s <= 0 or devices <= 0:
        return None
    return sizes.flops_per_step / step_s / (peak * devices)


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_sizes(sizes: JobSizes) -> str:
    """``model: 26.7 M parameters (largest stage 8.3 M), 512 tokens and 41.2 GFLOP per step; per
    worker: stage state 127 MiB, mirror of the next stage 95 MiB (host), checkpoint 95 MiB``.

    Args:
        sizes: The job's sizes.

    Returns:
        One line, no newline; the mirror part only with mirrors.
    """
    text = (f"model: {_count(sizes.params)} parameters (largest stage {_count(sizes.largest_stage_params)}), "
            f"{sizes.tokens_per_step} tokens and {sizes.flops_per_step / 1e9:.1f} GFLOP per step; per worker: "
            f"stage state {_bytes(sizes.state_bytes)}")
    if sizes.mirror_bytes:
        text += f", mirror of the next stage {_bytes(sizes.mirror_bytes)} (host)"
    return text + f", checkpoint {_bytes(sizes.checkpoint_bytes)}"
