"""A trained run brought back into one process: its config, data and last checkpoint.

A run directory (written by :mod:`spotpipe.runtime.control.controller`) holds the resolved
``config.toml`` and, with ``train.checkpoint_every > 0``, ``checkpoints/step-<k>/``: one file per
pipeline rank (the rank's :meth:`~spotpipe.runtime.state.stage_state.StageState.to_checkpoint`,
the one flat form of its chunks, with the step and sampler) and a ``manifest.json`` written last
(:mod:`spotpipe.runtime.state.checkpoint`). :func:`load_trained_run` builds the single-process
reference, :class:`~spotpipe.runtime.inprocess.local.LocalTrainer`, whose one
:class:`~spotpipe.runtime.state.stage_state.StageState` holds every chunk, and installs each rank's
file through ``state.view(chunks_of_rank).load_checkpoint(...)``, the path the in-process modes
move a chunk's state by. The chunks are built as the workers built them (with CheckFree+ edge
copies when the run had them), so every number lands where it was.

The validation data are the run's own: the last ``data.val_fraction`` of its token file (the split
of :mod:`spotpipe.data.sampler`, which training never samples from).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from spotpipe.config import DeviceName, JobConfig, load_config
from spotpipe.errors import SpotpipeError
from spotpipe.model.stages import StageModule, build_stage
from spotpipe.runtime.inprocess.local import LocalTrainer


class _RestoredTrainer(LocalTrainer):
    """A LocalTrainer whose chunks are built as the run's workers built them (CheckFree+ edge copies
    on every chunk when the run used the swap schedule), so the checkpoint's flat states fit."""

    def __init__(self, cfg: JobConfig, token_file: Any, edge_copies: bool, device: torch.device) -> None:
        self.edge_copies = edge_copies
        super().__init__(cfg, token_file, device=device)

    def build_chunk(self, index: int) -> StageModule:
        return build_stage(self.cfg.model, self.cfg.train.seed, index, self.num_chunks, device=self.device,
                           edge_copies=self.edge_copies)


@dataclass
class TrainedRun:
    """A run's model as of its last checkpoint, in this process.

    Attributes:
        run_dir: The run directory.
        cfg: Its config (``data.path`` replaced when given to :func:`load_trained_run`).
        step: 0-based index of the last training step the checkpoint holds.
        trainer: The single-process reference holding every chunk (optimizer moments dropped).
        stage_chunks: ``stage_chunks[s]`` = the chunks pipeline stage ``s`` held.
    """

    run_dir: Path
    cfg: JobConfig
    step: int
    trainer: LocalTrainer
    stage_chunks: tuple[tuple[int, ...], ...]

    @property
    def chunks(self) -> list[StageModule]:
        """Every chunk, in order."""
        return self.trainer.chunks

    @property
    def num_stages(self) -> int:
        """Pipeline stages of the run."""
        return len(self.stage_chunks)

    @property
    def token_file(self) -> Any:
        """The run's :class:`~spotpipe.data.tokens.TokenFile`."""
        return self.trainer.token_file

    def chunks_of(self, stages: tuple[int, ...]) -> tuple[int, ...]:
        """The chunks the given stages hold, ascending.

        Args:
            stages: Pipeline stages.

        Returns:
            Chunk indices.
        """
        return tuple(sorted(c for s in stages for c in self.stage_chunks[s]))


def run_config(run_dir: str | Path, data: str | None = None) -> JobConfig:
    """The config of a run directory (its ``config.toml``), with ``data.path`` replaced by ``data``.

    Args:
        run_dir: The run directory.
        data: A new ``data.path``, or None to keep the run's.

    Returns:
        The validated config.

    Raises:
        SpotpipeError: The directory does not exist or holds no ``config.toml``; its config is bad.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise SpotpipeError(f"run directory {d} {'is not a directory' if d.exists() else 'does not exist'}")
    if not (d / "config.toml").is_file():
        raise SpotpipeError(f"{d} is not a spotpipe run directory: it has no config.toml")
    cfg = load_config(d / "config.toml")
    if data is not None:
        cfg = replace(cfg, data=replace(cfg.data, path=str(data))).validate()
    return cfg


def stage_chunks(cfg: JobConfig) -> tuple[tuple[int, ...], ...]:
    """Pipeline stage -> the model chunks it holds, from the job's schedule (as the workers place them).

    Args:
        cfg: The job.

    Returns:
        ``stage_chunks[s]``, the chunk indices of stage ``s``.

    Raises:
        SpotpipeError: The config's schedule cannot be built.
    """
    from spotpipe.schedule.build import job_schedule

    sched = job_schedule(cfg)
    return tuple(sched.stages_of_rank(r) for r in range(sched.num_ranks))


def pick_device(cfg: JobConfig, device: str | None) -> torch.device:
    """Where to compute: ``device`` (``cpu``, ``cuda``, ``auto``) or else the run's ``run.device``,
    resolved as a worker resolves it (:func:`spotpipe.runtime.devices.worker_hardware`, local index 0).

    Args:
        cfg: The run's config (``run.device``).
        device: ``--device``, or None to use the run's.

    Returns:
        The torch device.

    Raises:
        SpotpipeError: CUDA asked for (by ``device`` or the run) on a machine without it.
    """
    from spotpipe.runtime.devices import worker_hardware

    want = cfg.run.device if device is None else cast(DeviceName, device)
    if want == "cuda" and not torch.cuda.is_available():
        told = "--device cuda" if device else "the run's run.device = cuda"
        raise SpotpipeError(f"{told}, but this machine has no CUDA device; use --device cpu")
    return worker_hardware(replace(cfg, run=replace(cfg.run, device=want, backend="gloo")), 0)[1]


def load_trained_run(run_dir: str | Path, data: str | None = None, device: str | None = None) -> TrainedRun:
    """Load a run's last complete checkpoint, every stage of it, into one process.

    Args:
        run_dir: The run directory (``run.dir`` of the training job).
        data: The token dir or text to read instead of the run's ``data.path`` (when it moved).
        device: ``cpu``, ``cuda``, ``auto`` or None (the run's ``run.device``).

    Returns:
        The :class:`TrainedRun`.

    Raises:
        SpotpipeError: One line naming what is wrong: no run directory, no config.toml, the data
            are missing, no complete checkpoint, a corrupt checkpoint file (its checksum), or a
            checkpoint that does not fit the config.
    """
    from spotpipe.data.tokens import default_cache_dir, resolve_dataset
    from spotpipe.ft.policy import swap_schedule_on
    from spotpipe.runtime.control.job import checkpoint_layout
    from spotpipe.runtime.state.checkpoint import check_layout, latest_checkpoint, load_state

    d = Path(run_dir)
    cfg = run_config(d, data)
    manifest = latest_checkpoint(d)
    if manifest is None:
        raise SpotpipeError(f"{d}: no complete checkpoint under {d / 'checkpoints'} (train with "
                            "--set train.checkpoint_every=N to keep the weights)")
    placement = stage_chunks(cfg)
    num_chunks = sum(len(c) for c in placement)
    check_layout(manifest, checkpoint_layout(cfg, num_chunks))
    if data is not None and not Path(data).expanduser().exists():
        raise SpotpipeError(f"--data {data} does not exist (give the token dir or text the run trained on)")
    if cfg.data.path and data is None and not Path(cfg.data.path).expanduser().exists():
        raise SpotpipeError(f"{d}: the run's data.path {cfg.data.path} does not exist here (a relative path is read "
                            "from this directory); give the data with --data PATH")
    token_file = resolve_dataset(cfg.data, default_cache_dir())
    dev = pick_device(cfg, device)
    trainer = _RestoredTrainer(cfg, token_file, swap_schedule_on(cfg.ft), dev)
    for rank, chunks in enumerate(placement):
        if rank not in manifest.files:
            raise SpotpipeError(f"checkpoint {manifest.dir} has no file for pipeline stage {rank}")
        name, sha = manifest.files[rank]
        path = manifest.dir / name
        saved = load_state(path, expected_sha256=sha)
        try:
            if int(saved.get("rank", -1)) != rank:
                raise ValueError(f"it holds pipeline stage {saved.get('rank')!r}, the manifest says {rank}")
            trainer.state.view(chunks).load_checkpoint(saved["state"], str(path))
        except (KeyError, ValueError, TypeError) as exc:
            raise SpotpipeError(f"checkpoint file {path} cannot be loaded: {exc}") from None
        for c in chunks:  # inference needs no AdamW moments
            trainer.state.optimizer.clear(c)
    trainer.step = manifest.step + 1
    return TrainedRun(d, cfg, manifest.step, trainer, placement)
