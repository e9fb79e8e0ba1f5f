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

A SkipPipe node run (``pipeline.stage_nodes``) writes one file per *node*: node ``n`` holds
schedule stage ``n`` (a copy of model stage ``chunk_stage[n]``, without the head) and, on a stage-0
node, schedule stage ``N + i`` (the head; :mod:`spotpipe.schedule.nodepaths`). Its model is
restored into a :class:`~spotpipe.runtime.inprocess.paths.NodePathTrainer` (chunks ``0..S-1``,
the head ``S``): the node plan is recomputed from the run's config
(:func:`~spotpipe.runtime.control.nodeplan.plan_nodes` is deterministic), and each model stage is
read from the file of the first node of its group (a group's nodes hold the same weights after
every step), the head from that of the first stage-0 node, with the file's schedule-stage keys
renamed to the model's chunk indices before the same ``view(...).load_checkpoint`` installs them.

The validation data are the run's own: the last ``data.val_fraction`` of its token file (the split
of :mod:`spotpipe.data.sampler`, which training never samples from).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from spotpipe.config import DeviceName, JobConfig, load_config
from spotpipe.errors import SpotpipeError
from spotpipe.model.stages import StageModule, build_stage
from spotpipe.runtime.inprocess.local import LocalTrainer
from spotpipe.schedule.nodepaths import NodePlan


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
        stage_chunks: ``stage_chunks[s]`` = the chunks pipeline stage ``s`` held (in a node run:
            model stage ``s``'s chunk, and stage 0 also the head, chunk ``S``).
        nodes: In a SkipPipe node run, the nodes of each model stage (stage 0 first); else empty.
    """

    run_dir: Path
    cfg: JobConfig
    step: int
    trainer: LocalTrainer
    stage_chunks: tuple[tuple[int, ...], ...]
    nodes: tuple[tuple[int, ...], ...] = ()

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

    In a SkipPipe node run (``pipeline.stage_nodes``) the stages are the model stages and the
    head is a chunk of its own (``S``) that the stage-0 nodes hold: stage 0 -> ``(0, S)``,
    stage ``s`` -> ``(s,)``; so every stage but 0 may be skipped at inference.

    Args:
        cfg: The job.

    Returns:
        ``stage_chunks[s]``, the chunk indices of stage ``s``.

    Raises:
        SpotpipeError: The config's schedule cannot be built.
    """
    from spotpipe.schedule.build import job_schedule

    if cfg.pipeline.stage_nodes:
        S = cfg.pipeline.stages
        return ((0, S),) + tuple((s,) for s in range(1, S))

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


@dataclass(frozen=True)
class _Source:
    """One checkpoint file to read.

    Attributes:
        rank: The pipeline rank (in a node run: the node) that wrote it.
        keys: The chunk keys its state holds (a node's schedule stages), ascending.
        chunks: The model chunks they are here, in the same order.
        kind: What a rank is: ``pipeline stage``, or ``node`` in a node run.
        stage: In a node run the model stage the node holds, else None.
    """

    rank: int
    keys: tuple[int, ...]
    chunks: tuple[int, ...]
    kind: str = "pipeline stage"
    stage: int | None = None

    @property
    def what(self) -> str:
        """The writer in words, for errors: ``pipeline stage 2``, ``node 6 (model stage 1)``."""
        return f"{self.kind} {self.rank}" + ("" if self.stage is None else f" (model stage {self.stage})")


def _node_sources(plan: NodePlan, saved: Collection[int] = ()) -> list[_Source]:
    """The files a node run's model is read from: per model stage the first node of its group
    (as the run started) that the checkpoint has a file of, whose schedule stages (its copy of
    the stage, and on a stage-0 node its head) are renamed to model chunks (``chunk_stage``:
    ``S`` is the head). Nodes of a stage hold the same weights.

    Args:
        plan: The run's node plan.
        saved: The nodes the checkpoint has files of (a node lost and planned around has none);
            empty: take the first node of each group.

    Returns:
        One source per model stage, stage 0 first; together they hold chunks ``0..S``.

    Raises:
        ValueError: A node whose schedule stages do not rename in order (a plan the lowering
            never makes: the flat state is ordered by key).
    """
    sched = plan.train
    chunk_stage = sched.chunk_stage
    assert chunk_stage is not None
    out: list[_Source] = []
    for s, group in enumerate(plan.start_groups):
        node = next((n for n in group if n in saved), group[0])
        keys = tuple(sorted(sched.stages_of_rank(node)))
        chunks = tuple(chunk_stage[k] for k in keys)
        if list(chunks) != sorted(chunks):
            raise ValueError(f"node {node} holds schedule stages {list(keys)}, model chunks {list(chunks)}: not in order")
        out.append(_Source(node, keys, chunks, "node", s))
    return out


def _renamed(state: Any, src: _Source) -> Any:
    """A node's saved stage state with its schedule-stage keys renamed to model chunks (the flat
    form, ordered by key, stays as it is: :func:`_node_sources` keeps the order)."""
    if src.keys == src.chunks:
        return state
    held = list(state.get("chunks", []))
    if held != list(src.keys):
        raise ValueError(f"it holds schedule stages {held}, but {src.what} of the run's plan holds {list(src.keys)}")
    return {**state, "chunks": list(src.chunks)}


def _node_plan(d: Path, cfg: JobConfig) -> NodePlan:
    """The node plan of a node run: the one the controller last wrote (``node_plan.json``), else
    recomputed from its config as the controller made it."""
    from spotpipe.runtime.control.nodeplan import plan_nodes

    saved = d / "node_plan.json"
    if saved.is_file():
        try:
            return NodePlan.from_json(saved.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise SpotpipeError(f"{saved} cannot be read: {' '.join(str(exc).split())[:200]}") from None
    try:
        return plan_nodes(cfg)
    except SpotpipeError as exc:
        raise SpotpipeError(f"{d}: cannot recompute the node plan of this SkipPipe run from its config.toml: {exc}") from None


def load_trained_run(run_dir: str | Path, data: str | None = None, device: str | None = None) -> TrainedRun:
    """Load a run's last complete checkpoint, every stage of it, into one process.

    A SkipPipe node run is restored into a
    :class:`~spotpipe.runtime.inprocess.paths.NodePathTrainer` (see the module docstring).

    Args:
        run_dir: The run directory (``run.dir`` of the training job).
        data: The token dir or text to read instead of the run's ``data.path`` (when it moved).
        device: ``cpu``, ``cuda``, ``auto`` or None (the run's ``run.device``).

    Returns:
        The :class:`TrainedRun`.

    Raises:
        SpotpipeError: One line naming what is wrong: no run directory, no config.toml, the data
            are missing, no complete checkpoint, a missing or corrupt checkpoint file (its
            checksum), a node plan that cannot be recomputed, or a checkpoint that does not fit
            the config.
    """
    from spotpipe.data.tokens import default_cache_dir, resolve_dataset
    from spotpipe.ft.policy import swap_schedule_on
    from spotpipe.runtime.control.job import checkpoint_layout
    from spotpipe.runtime.inprocess.paths import NodePathTrainer
    from spotpipe.runtime.state.checkpoint import check_layout, latest_checkpoint, load_state

    d = Path(run_dir)
    cfg = run_config(d, data)
    manifest = latest_checkpoint(d)
    if manifest is None:
        raise SpotpipeError(f"{d}: no complete checkpoint under {d / 'checkpoints'} (train with "
                            "--set train.checkpoint_every=N to keep the weights)")
    placement = stage_chunks(cfg)
    plan = _node_plan(d, cfg) if cfg.pipeline.stage_nodes else None
    if plan is None:
        sources = [_Source(rank, chunks, chunks) for rank, chunks in enumerate(placement)]
        check_layout(manifest, checkpoint_layout(cfg, sum(len(c) for c in placement)))
    else:
        try:
            sources = _node_sources(plan, manifest.files)
        except ValueError as exc:
            raise SpotpipeError(f"{d}: the run's node plan cannot be read back: {exc}") from None
        check_layout(manifest, checkpoint_layout(cfg, plan.train.num_stages))
    if data is not None and not Path(data).expanduser().exists():
        raise SpotpipeError(f"--data {data} does not exist (give the token dir or text the run trained on)")
    if cfg.data.path and data is None and not Path(cfg.data.path).expanduser().exists():
        raise SpotpipeError(f"{d}: the run's data.path {cfg.data.path} does not exist here (a relative path is read "
                            "from this directory); give the data with --data PATH")
    token_file = resolve_dataset(cfg.data, default_cache_dir())
    dev = pick_device(cfg, device)
    trainer: LocalTrainer
    if plan is None:
        trainer = _RestoredTrainer(cfg, token_file, swap_schedule_on(cfg.ft), dev)
    else:
        trainer = NodePathTrainer(cfg, token_file, plan, device=dev)
    for src in sources:
        if src.rank not in manifest.files:
            raise SpotpipeError(f"checkpoint {manifest.dir} has no file for {src.what}")
        name, sha = manifest.files[src.rank]
        path = manifest.dir / name
        saved = load_state(path, expected_sha256=sha)
        try:
            if int(saved.get("rank", -1)) != src.rank:
                raise ValueError(f"it holds {src.kind} {saved.get('rank')!r}, the manifest says {src.rank}")
            trainer.state.view(src.chunks).load_checkpoint(_renamed(saved["state"], src), str(path))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise SpotpipeError(f"checkpoint file {path} cannot be loaded: {exc}") from None
        for c in src.chunks:  # inference needs no AdamW moments
            trainer.state.optimizer.clear(c)
    trainer.step = manifest.step + 1
    return TrainedRun(d, cfg, manifest.step, trainer, placement, () if plan is None else plan.groups)
