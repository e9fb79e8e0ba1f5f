"""Preparing a run before any process starts, and the rules every process of a job shares.

:func:`prepare_run` turns ``spotpipe train [--config] [--set] [--resume]`` into a resolved job:
the validated config (``model.vocab_size`` fitted to the data), the run directory, the token file,
the lowered schedule (from :func:`spotpipe.schedule.build.job_schedule`, the builder the workers
and the simulator use; built now, so a bad combination fails before a worker starts) and the
checkpoint to resume from. Every problem is one :class:`~spotpipe.errors.SpotpipeError` line.

The controller and the workers both call :func:`eval_due` and :func:`checkpoint_layout`, so they
agree without talking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spotpipe.config import AUTO_SCHEDULE, JobConfig, TrainConfig, load_config
from spotpipe.runtime.devices import resolve_hardware
from spotpipe.errors import SpotpipeError
from spotpipe.ft.policy import uses_mirrors
from spotpipe.fsutil import check_output
from spotpipe.planner import resolved
from spotpipe.ft.policy import swap_schedule_on
from spotpipe.schedule.build import job_schedule
from spotpipe.schedule.nodepaths import NodePlan

NODE_STRATEGIES = ("checkfree", "checkpoint", "none")
"""``ft.strategy`` values a SkipPipe node run takes. A node lost from a stage that keeps other nodes
is always planned around (:func:`spotpipe.runtime.control.nodeplan.replan_without`); the strategy
covers a stage that loses every node (:func:`spotpipe.runtime.control.nodeplan.stage_loss_plans`:
CheckFree for a middle stage, else the checkpoint). Mirrors and CheckFree+ assume one worker per
stage and are not wired to node groups."""


def node_strategy(cfg: JobConfig) -> tuple[JobConfig, str]:
    """The recovery a SkipPipe node run uses when a whole stage is lost: ``auto`` becomes
    ``checkfree`` (with the checkpoint for the edge stages); mirrors and CheckFree+ are refused.

    Args:
        cfg: A job with ``pipeline.stage_nodes``.

    Returns:
        The config (``ft.strategy`` resolved) and a note for the user ("" when nothing changed).

    Raises:
        SpotpipeError: for a strategy a node run cannot use yet, naming the ones it can.
    """
    f = cfg.ft
    if f.strategy == "auto":
        return replace(cfg, ft=replace(f, strategy="checkfree")), (
            "ft.strategy = auto in a SkipPipe node run (pipeline.stage_nodes) is checkfree: a lost node whose stage keeps "
            "other nodes is planned around; a middle stage that loses every node is rebuilt from its neighbours "
            "(CheckFree); stage 0 or the last block stage rolls the job back to the last checkpoint")
    if f.strategy not in NODE_STRATEGIES:
        raise SpotpipeError(f"ft.strategy = {f.strategy} does not run with pipeline.stage_nodes yet; use one of "
                            f"{', '.join(NODE_STRATEGIES)} (or auto)")
    return cfg, ""


def check_swap_layout(cfg: JobConfig) -> None:
    """Refuse a CheckFree+ job the pipeline runtime cannot run, naming the keys to change.

    A lost edge stage is rebuilt by copying its swap partner (0 <-> 1, S-1 <-> S-2), so the two
    must hold the same number of blocks, and each worker must hold one chunk.

    Args:
        cfg: The job.

    Raises:
        SpotpipeError: if the schedule puts more than one chunk on a worker, or a swap pair's block
            counts differ.
    """
    from spotpipe.model.partition import partition_layers
    from spotpipe.schedule.generators import model_chunks

    p = cfg.pipeline
    if not swap_schedule_on(cfg.ft):
        return
    what = "ft.swap_edges = true" if cfg.ft.swap_edges else f"ft.strategy = {cfg.ft.strategy}"
    if model_chunks(p.schedule, p.stages, p.virtual_stages) != p.stages:
        raise SpotpipeError(f"{what} needs one chunk per worker: pipeline.schedule = {p.schedule} with "
                            f"pipeline.virtual_stages = {p.virtual_stages} cannot run it (use 1f1b or gpipe)")
    sizes = [end - start for start, end in partition_layers(cfg.model.layers, p.stages)]
    for a, b in ((0, 1), (p.stages - 2, p.stages - 1)):
        if sizes[a] != sizes[b]:
            raise SpotpipeError(
                f"{what} needs swap partners with equal blocks, but model.layers = {cfg.model.layers} over "
                f"{p.stages} stages gives stage {a} {sizes[a]} blocks and stage {b} {sizes[b]}; make model.layers a multiple "
                "of pipeline.stages")


def mirrors_wanted(cfg: JobConfig) -> bool:
    """Whether the job keeps mirrors at all: ``ft.strategy`` uses them (``auto``, ``mirror``),
    ``ft.mirror_every > 0`` and there are at least two stages (a stage's holder is another stage).

    Args:
        cfg: The job.

    Returns:
        True when mirrors are kept.
    """
    return uses_mirrors(cfg.ft) and cfg.ft.mirror_every > 0 and cfg.pipeline.stages >= 2


def check_listen_host(host: str) -> None:
    """Refuse a ``run.host`` the controller cannot listen on, at once and in one line (the store
    would otherwise retry for ``run.timeout_s`` and print C++ warnings).

    Args:
        host: ``run.host`` (a name or an address of this machine; ``0.0.0.0`` = every interface).

    Raises:
        SpotpipeError: The name does not resolve, or no address of it belongs to this machine.
    """
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise SpotpipeError(f"run.host = {host!r} does not resolve ({exc}); use an address of this machine, "
                            "or 0.0.0.0 for every interface") from None
    reason = ""
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((addr[0], 0))
                return
            except OSError as exc:
                reason = "it is not an address of this machine" if exc.errno == errno.EADDRNOTAVAIL else (exc.strerror or str(exc))
    raise SpotpipeError(f"run.host = {host!r}: cannot listen there ({reason}); use an address of this machine, "
                        "or 0.0.0.0 for every interface")


def checkpoint_layout(cfg: JobConfig, num_chunks: int) -> dict[str, Any]:
    """What a checkpoint must agree on with the job that resumes it.

    Args:
        cfg: The job.
        num_chunks: Model chunks of the job's schedule.

    Returns:
        Key -> value (stages, chunks, model sizes and dtype, CheckFree+ copies), JSON values.
    """
    m = cfg.model
    nodes = {"pipeline.stage_nodes": list(cfg.pipeline.stage_nodes)} if cfg.pipeline.stage_nodes else {}
    return nodes | {
        "pipeline.stages": cfg.pipeline.stages,
        "chunks": num_chunks,
        "model.layers": m.layers,
        "model.d_model": m.d_model,
        "model.heads": m.heads,
        "model.kv_heads": m.kv_heads,
        "model.vocab_size": m.vocab_size,
        "model.ffn_hidden": m.ffn_hidden,
        "model.context": m.context,
        "model.dtype": m.dtype,
        "edge_copies": swap_schedule_on(cfg.ft),  # CheckFree+ copies on chunks 1 and S-2
    }


def eval_due(step: int, train: TrainConfig, stop: bool, stop_reason: str) -> bool:
    """Whether the workers evaluate right after committed step ``step`` (0-based).

    Every ``train.eval_every`` steps and after the last step; after a stop for the time limit
    (``train.max_minutes``) too, but not after a Ctrl-C, which should end the job promptly.

    Args:
        step: The committed step, 0-based.
        train: The ``[train]`` section (``steps``, ``eval_every``).
        stop: The job is stopping after this step.
        stop_reason: Why (``"time"`` for ``train.max_minutes``).

    Returns:
        True when the workers evaluate.
    """
    last = step + 1 == train.steps
    if stop and stop_reason != "time" and not last:
        return False
    if last or (stop and stop_reason == "time"):
        return True
    return train.eval_every > 0 and (step + 1) % train.eval_every == 0


def checkpoint_due(step: int, train: TrainConfig, stop: bool) -> bool:
    """Whether the workers save a checkpoint after step ``step``: every ``train.checkpoint_every``
    steps, and at the end or on a stop when checkpointing is on.

    Args:
        step: The committed step, 0-based.
        train: The ``[train]`` section (``steps``, ``checkpoint_every``; 0 turns checkpoints off).
        stop: The job is stopping after this step.

    Returns:
        True when the workers save a checkpoint.
    """
    if train.checkpoint_every <= 0:
        return False
    return (step + 1) % train.checkpoint_every == 0 or stop or step + 1 == train.steps


@dataclass(frozen=True)
class PreparedRun:
    """A job ready to start."""

    cfg: JobConfig
    run_dir: Path
    token_dir: str
    token_sha256: str
    layout: dict[str, Any]
    resume: Any  # checkpoint.Manifest | None
    notes: tuple[str, ...] = ()  # lines to show before the job starts (what was decided for the user)
    node_plan: NodePlan | None = None  # SkipPipe runs (pipeline.stage_nodes): what the nodes play


def prepare_run(config_path: str | None, overrides: list[str], resume_dir: str | None,
                faults: tuple[str, ...] = ()) -> PreparedRun:
    """Resolve config, run directory, data, schedule and checkpoint; raise one clear error if any
    of them is wrong.

    Args:
        config_path: ``--config`` (None: the built-in default job).
        overrides: ``--set section.key=value`` strings.
        resume_dir: ``--resume`` run directory, or None.
        faults: ``--fail`` / ``--fail-rate`` specs, appended to ``ft.faults`` before the config is
            checked, so they get the same range checks (stage, replica, step).

    Returns:
        The :class:`PreparedRun`.

    Raises:
        SpotpipeError: One line naming the key, file or option that is wrong.
    """
    from spotpipe.data.sampler import SequenceSampler
    from spotpipe.data.tokens import default_cache_dir, resolve_dataset
    from spotpipe.runtime.state.checkpoint import check_layout, latest_checkpoint

    notes: list[str] = []
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not run_dir.is_dir():
            raise SpotpipeError(f"--resume {run_dir}: no such run directory")
        if not (run_dir / "config.toml").is_file():
            raise SpotpipeError(f"--resume {run_dir}: not a spotpipe run directory (it has no config.toml)")
        if config_path is not None:
            raise SpotpipeError("--resume continues with the run's own config.toml; change values with --set, not --config")
        cfg = load_config(run_dir / "config.toml", overrides)
        saved = cfg.ft.faults
        if saved and not any(o.replace(" ", "").startswith("ft.faults=") for o in overrides):
            # Injected faults are an experiment's input, not the run's state: replayed on resume
            # they would kill the same worker at the same step again.
            saved = ()
            notes.append(f"the run's injected faults (ft.faults = {list(cfg.ft.faults)}) are not replayed on --resume; "
                         "pass --fail or --set ft.faults=[...] to inject faults again")
        cfg = replace(cfg, run=replace(cfg.run, dir=str(run_dir)), ft=replace(cfg.ft, faults=saved + faults)).validate()
        check_output(run_dir, "--resume", "dir")
    else:
        cfg = load_config(config_path, overrides)
        cfg = replace(cfg, ft=replace(cfg.ft, faults=cfg.ft.faults + faults)).validate()
        name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.dir) if cfg.run.dir else Path("runs") / name
        if (run_dir / "events.jsonl").exists():
            raise SpotpipeError(
                f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, "
                "or choose another run.name / run.dir"
            )
        cfg = replace(cfg, run=replace(cfg.run, name=name, dir=str(run_dir)))
        check_output(run_dir, "run.dir", "dir")  # not under a file, not read-only, before any worker starts
    token_file = resolve_dataset(cfg.data, default_cache_dir(), verify=True)  # a corrupt tokens.bin fails here
    if token_file.vocab_size != cfg.model.vocab_size:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=token_file.vocab_size))
    auto = cfg.pipeline.schedule == AUTO_SCHEDULE
    cfg = resolved(cfg.validate())  # pipeline.schedule = auto: the plan that fits the memory budget
    if auto:
        p = cfg.pipeline
        plan = p.schedule + (f", recompute {p.recompute}" if p.recompute != "none" else "") + (
            f", recompute chunks {list(p.recompute_chunks)}" if p.recompute_chunks else "") + (
            f", offload {p.offload}" if p.offload != "none" else "")
        notes.append(f"pipeline.schedule = auto picked {plan}: the fastest plan that fits "
                     f"pipeline.memory_budget_gb = {p.memory_budget_gb:g} GB per rank (spotpipe schedule memory lists them all)")
    for split in ("train", "val"):
        SequenceSampler(token_file.num_tokens, cfg.model.context, cfg.train.seed, split, cfg.data.val_fraction, name=str(token_file.dir))
    node_plan = None
    if cfg.pipeline.stage_nodes:
        cfg, note = node_strategy(cfg)
        notes += [note] if note else []
        from spotpipe.runtime.control.nodeplan import plan_nodes

        node_plan = plan_nodes(cfg)
        p = cfg.pipeline
        notes.append(f"SkipPipe: {p.ranks} nodes in stage groups {[list(g) for g in node_plan.groups]}, "
                     f"{node_plan.variant} paths; the simulator predicts {node_plan.predicted_s['train']:.3g} s per "
                     f"iteration ({node_plan.predicted_s['full']:.3g} s on full paths)")
    check_swap_layout(cfg)
    from spotpipe.runtime.control.reshape import elastic_floor_note

    notes += [n for n in [elastic_floor_note(cfg)] if n]
    check_listen_host(cfg.run.host)
    world = cfg.pipeline.ranks * cfg.pipeline.replicas
    cfg = resolve_hardware(cfg, world if cfg.run.local_workers < 0 else min(world, cfg.run.local_workers))
    schedule = job_schedule(cfg) if node_plan is None else node_plan.train
    from spotpipe.model.partition import partition_layers

    partition_layers(cfg.model.layers, cfg.pipeline.stages if node_plan is not None else schedule.num_stages)
    layout = checkpoint_layout(cfg, schedule.num_stages)
    manifest = None
    if resume_dir is not None:
        manifest = latest_checkpoint(run_dir)
        if manifest is None:
            raise SpotpipeError(
                f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'} "
                "(was train.checkpoint_every 0?)"
            )
        check_layout(manifest, layout)
        missing = sorted(set(range(cfg.pipeline.ranks)) - set(manifest.files))
        if missing:  # a SkipPipe run that lost nodes and went on without them
            raise SpotpipeError(
                f"--resume {run_dir}: the checkpoint of step {manifest.step} has no file of node{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} (lost and planned around); resuming a node run from it is not supported yet")
        if manifest.step + 1 >= cfg.train.steps:
            raise SpotpipeError(
                f"--resume {run_dir}: its checkpoint of step {manifest.step} already holds all train.steps={cfg.train.steps} steps; "
                "nothing to resume"
            )
    return PreparedRun(cfg, run_dir, str(Path(token_file.dir).resolve()), str(token_file.header.get("sha256", "")), layout, manifest,
                       tuple(notes), node_plan)
