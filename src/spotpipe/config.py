"""Job configuration: frozen dataclasses, TOML files, ``--set section.key=value`` overrides.

Every key has a default, so ``JobConfig()`` is the built-in job that ``spotpipe train`` runs with
no arguments. :func:`load_config` reads a TOML file, applies overrides and validates; every
problem is a :class:`~spotpipe.errors.ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from spotpipe.errors import ConfigError
from spotpipe.fsutil import read_text, resolve_path
from spotpipe.faultspec import FaultSpecError, parse_fault_specs
from spotpipe.schedule.generators import REGISTRY as SCHEDULE_REGISTRY
from spotpipe.schedule.generators import model_chunks
from spotpipe.schedule.recompute import RecomputeName
from spotpipe.schedule.skippipe import Variant as PathsName

# Closed choices: each is one Literal type, the only list of its values; the checks in
# :func:`validate` and their messages take the allowed values from it (``typing.get_args``).
DtypeName = Literal["float32", "bfloat16", "float16"]
"""``model.dtype``: the floating-point type of weights, activations and optimizer state."""
BackendName = Literal["auto", "gloo", "nccl"]
"""``run.backend``: the collective backend (``auto``: NCCL when CUDA is available, else gloo)."""
DeviceName = Literal["auto", "cpu", "cuda"]
"""``run.device``: where workers compute (``auto``: CUDA when available, else the CPU)."""
StrategyName = Literal["auto", "replica", "mirror", "checkfree", "checkfree+", "checkpoint", "none"]
"""``ft.strategy``: the policy modes ``auto`` and ``none``, and the name of every recovery strategy
in :data:`spotpipe.ft.strategies.REGISTRY` (a test checks that the two lists agree)."""
NonfiniteName = Literal["stop", "skip"]
"""``train.nonfinite``: what a step whose global gradient norm or loss is not finite does; its
update is never applied: ``stop`` ends the job with one line naming the step, ``skip`` counts the
step (same data order) without updating anything."""
OffloadName = Literal["none", "optimizer"]
"""``pipeline.offload``: what lives in host memory and comes to the device when used (``optimizer``:
the AdamW moments, fetched one chunk at a time for the update)."""
SimRecoveryName = Literal["checkpoint", "policy"]
"""``sim.recovery``: how the simulator handles a failure (restart from the checkpoint, or the shipped
recovery policy)."""

AUTO_SCHEDULE = "auto"
"""``pipeline.schedule = "auto"``: the fastest plan that fits ``pipeline.memory_budget_gb``. The
commands that run a job resolve it into a named schedule (:func:`spotpipe.planner.resolved`); this
module only checks the budget, so it never imports the planner, which reads it."""

FT_STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)
SIM_RECOVERY: tuple[SimRecoveryName, ...] = get_args(SimRecoveryName)
MAX_WAIT_S = 1e6  # the longest timeout or heartbeat period (about 11 days); more overflows the store's timedelta


@dataclass(frozen=True)
class ModelConfig:
    """LLaMA-style decoder sizes."""

    vocab_size: int = 256  # 256 = the built-in byte tokenizer; set from the token file otherwise
    layers: int = 8
    d_model: int = 128
    heads: int = 4
    kv_heads: int = 0  # 0 = same as heads; fewer = grouped-query attention
    ffn_hidden: int = 0  # 0 = SwiGLU default: 8/3 * d_model rounded up to a multiple of 32
    context: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: DtypeName = "float32"


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from."""

    path: str = ""  # token dir from `spotpipe data prepare`, or a text file/dir; "" = built-in corpus
    tokenizer: str = "byte"  # "byte" or the path of a Hugging Face tokenizer.json
    val_fraction: float = 0.05


@dataclass(frozen=True)
class PipelineConfig:
    """How the model is cut and scheduled."""

    stages: int = 4  # pipeline ranks
    replicas: int = 1  # data-parallel replicas of every stage
    schedule: str = "1f1b"  # a name in spotpipe.schedule.generators.REGISTRY: gpipe | 1f1b | interleaved | chronos; or "auto"
    virtual_stages: int = 2  # model chunks per rank, used by the interleaved schedule (and chronos, which needs 2)
    microbatches: int = 4  # per pipeline; with stage_nodes: per stage-0 node
    recompute: RecomputeName = "none"  # chunks that drop activations after F and recompute them before B: none | all | longest (per rank, its longest-lived chunk)
    recompute_chunks: tuple[int, ...] = ()  # chunk indices recomputed in any mode (0 .. stages x chunks per rank - 1)
    offload: OffloadName = "none"  # "optimizer": AdamW moments in host memory between updates (ChronosPipe's offload)
    memory_budget_gb: float = 0.0  # per-rank device memory budget (1 GB = 1e9 bytes) for schedule = "auto"; 0 = none
    stage_nodes: tuple[int, ...] = ()  # SkipPipe: nodes per stage group, e.g. [2, 2, 2, 2]; one worker per node; () = full pipelines over stages
    paths: PathsName = "skippipe"  # SkipPipe: which paths train: full | random | skippipe-nca | skippipe (see `spotpipe schedule plan`)
    plan_file: str = ""  # SkipPipe: train on the node schedule in this CSV (`spotpipe schedule plan --csv`); "" = plan now
    full_every: int = 0  # SkipPipe: every n-th iteration runs full paths (the reference trains every 10th so); 0 = never
    skip_ratio: float = 0.0  # SkipPipe: share of stages a microbatch skips; k = stages - round(skip_ratio x stages) visited
    max_swaps: int = 0  # SkipPipe: adjacent stage swaps allowed per microbatch path
    node_memory: int = 3  # SkipPipe: most microbatches' activations one node holds at once
    plan_budget: int = 6000  # SkipPipe planner: simulated plans the collision-aware search scores

    @property
    def ranks(self) -> int:
        """Pipeline ranks (worker roles of one replica): one per node with ``stage_nodes``
        (SkipPipe), else one per stage."""
        return sum(self.stage_nodes) if self.stage_nodes else self.stages


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation."""

    steps: int = 500  # the default job: ~3-5 min on 2 CPU cores (`make run`)
    batch_size: int = 16  # sequences per step, all replicas together
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    seed: int = 0
    checkpoint_every: int = 0  # 0 = never
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 8
    max_minutes: float = 0.0  # 0 = no wall-time limit; otherwise stop after this many minutes
    nonfinite: NonfiniteName = "stop"  # a step with a NaN/inf gradient norm or loss: stop the job, or skip its update


@dataclass(frozen=True)
class RunConfig:
    """Where results go and how processes talk."""

    name: str = ""  # "" = a timestamp
    dir: str = ""  # "" = runs/<name>
    host: str = "127.0.0.1"  # controller listen address
    port: int = 0  # 0 = any free port
    backend: BackendName = "auto"
    device: DeviceName = "auto"  # where workers compute: auto = CUDA when available (one GPU per local worker, shared with gloo)
    timeout_s: float = 60.0  # every wait on a peer or the store gives up after this
    heartbeat_s: float = 0.5
    progress: bool = True
    plot: bool = True
    local_workers: int = -1  # workers `spotpipe train` starts here; -1 = all; the rest join with `spotpipe worker --join`


@dataclass(frozen=True)
class FTConfig:
    """Failure detection and recovery."""

    strategy: StrategyName = "auto"
    detect_timeout_s: float = 2.0
    mirror_every: int = 1  # 1: the holder replays every step's update (exact); N > 1: full state every N steps
    faults: tuple[str, ...] = ()  # fault specs, see spotpipe.faultspec (e.g. "stage=2@step=40", "10%/h")
    swap_edges: bool = False  # CheckFree+ swap schedule (always on with strategy = "checkfree+")
    rate_step_time_s: float = 0.0  # step time that converts "P%/h" fault rates; 0 = measured
    spares: int = 1  # warm standby worker processes that take a lost role at once (multi-process runtime)
    elastic: bool = False  # keep training on fewer workers when no replacement comes, grow when workers join (spotpipe.ft.elastic)
    min_workers: int = 1  # elastic: the fewest workers the job shrinks to; below it, it waits for replacements
    replace_wait_s: float = 0.0  # elastic: how long a lost worker waits for a joiner before the job shrinks (0: at once; a joiner grows it back)


@dataclass(frozen=True)
class NetworkConfig:
    """Emulated link delays (latency + bytes / bandwidth)."""

    matrix: str = ""  # links.csv-style file; "" = uniform links below
    locations: tuple[str, ...] = ()  # one location per pipeline rank when matrix is set
    latency_ms: float = 0.0
    bandwidth_gbps: float = 0.0  # 0 = unlimited


@dataclass(frozen=True)
class SimConfig:
    """Simulator (`spotpipe simulate`): device speed, node speeds, failures, recovery costs."""

    device_tflops: float = 10.0  # achieved (not peak) TFLOP/s of one worker, analytic cost model
    backward_ratio: float = 2.0  # backward time / forward time (analytic cost model)
    speed_factors: tuple[float, ...] = ()  # relative speed per rank or per node; () = all 1.0
    profile: tuple[str, ...] = ()  # events.jsonl of short `spotpipe train` runs: calibrate the cost from them
    host_cores: int = 0  # 0 = a device per worker; N = all workers share one host's N cores (emulation)
    optimizer_s: float = 0.0  # optimizer step time per iteration (analytic cost model)
    spares: int = 0  # extra nodes (beyond stages x replicas) that replace failed workers
    failures: tuple[str, ...] = ()  # "NODE@SECONDS" failures at given virtual times, e.g. "3@120"
    failure_rate: float = 0.0  # failures per node-day (Poisson per node); 0 = none
    failure_trace: str = ""  # preemption trace "<ms>,<add|remove>,<node>" (Bamboo format)
    seed: int = 0  # random failures
    recovery: SimRecoveryName = "checkpoint"  # recovery policy: checkpoint = restart from last checkpoint; policy = ft.strategy via spotpipe.ft.policy
    checkpoint_write_s: float = 0.0  # time to write one checkpoint (blocks training)
    restart_s: float = 60.0  # time to restart the job and load the last checkpoint
    replace_s: float = 300.0  # time to obtain a replacement node when no spare is free
    regroup_s: float = 1.0  # recovery = "policy", no rollback: rebuild communicators and install the state (plus the transfer)
    delay_collectives: bool = True  # false: all-reduces cost nothing on the links (as under link-delay emulation)
    layer_forward_s: float = 0.0  # forward seconds per layer per sequence (SkipPipe's measured 0.055); 0 = analytic from device_tflops
    head_ratio: float = 0.25  # SkipPipe plans: head (norm, LM head, loss, their backward) / stage forward
    message_overhead_s: float = 0.0  # SkipPipe plans: fixed seconds added to every activation or gradient message (0.35 in SkipPipe's simulator)
    compute_gap_s: float = 0.0  # SkipPipe plans: a node stays busy this long after every compute (0.13 in SkipPipe's simulator)


@dataclass(frozen=True)
class JobConfig:
    """The whole job. Sections mirror the TOML tables."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ft: FTConfig = field(default_factory=FTConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    def validate(self) -> JobConfig:
        """Check ranges and cross-section rules; return self or raise ConfigError.

        With ``pipeline.schedule = "auto"`` only the budget is checked here; the job is returned
        as it is, and :func:`spotpipe.planner.resolved` (called by the commands that run a job)
        turns it into the plan it picks, validated in full.
        """
        if self.pipeline.schedule == AUTO_SCHEDULE:
            p = self.pipeline
            _check(math.isfinite(p.memory_budget_gb) and p.memory_budget_gb >= 0,
                   f"pipeline.memory_budget_gb must be >= 0 (0 = none), got {p.memory_budget_gb}")
            return self
        validate(self)
        return self


# ----------------------------------------------------------------------------------------------
# Loading, overrides, saving


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in fields(JobConfig)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a TOML or --set value to the field's type, or raise ConfigError naming key."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not -(2**63) <= number < 2**63:
            raise ConfigError(f"{key}: expected a 64-bit integer, got {value!r}")
        return number
    if annotation is float:
        return _finite_float(key, value)
    if origin is Literal:  # a closed choice: read as a string here, checked against its values by validate()
        return _coerce(key, value, str)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(key, v, item_type) for v in value)
    raise ConfigError(f"{key}: unsupported type {annotation!r}")  # pragma: no cover


def _finite_float(key: str, value: Any) -> float:
    """A TOML or --set value as a finite float (``inf`` and ``nan`` are refused), naming ``key``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


def _parse_override_value(text: str) -> Any:
    """Read a --set value as TOML when it parses (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply(cfg: JobConfig, section: str, key: str, value: Any, where: str) -> JobConfig:
    sections = _section_types()
    if section not in sections:
        raise ConfigError(f"{where}: unknown section [{section}]; known: {', '.join(sections)}")
    section_cls = sections[section]
    hints = typing.get_type_hints(section_cls)
    if key not in hints:
        raise ConfigError(
            f"{where}: unknown key {section}.{key}; known keys of [{section}]: {', '.join(hints)}"
        )
    new_value = _coerce(f"{section}.{key}", value, hints[key])
    return replace(cfg, **{section: replace(getattr(cfg, section), **{key: new_value})})


def apply_overrides(cfg: JobConfig, overrides: Iterable[str]) -> JobConfig:
    """Apply ``section.key=value`` strings (from ``--set``) in order.

    Args:
        cfg: The config to start from.
        overrides: ``section.key=value`` strings; values are parsed as TOML values where they can be.

    Returns:
        A new config with the overrides applied (not validated).

    Raises:
        ConfigError: on a malformed item, an unknown section or key, or a value of the wrong type.
    """
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        cfg = _apply(cfg, section, key, _parse_override_value(raw.strip()), f"--set {dotted}")
    return cfg


def config_from_mapping(data: Mapping[str, Any], where: str = "config") -> JobConfig:
    """Build a JobConfig from nested TOML tables; unknown tables or keys are errors.

    Args:
        data: Parsed TOML: ``{section: {key: value}}``.
        where: What to call the source in error messages (e.g. the file's path).

    Returns:
        The defaults with ``data`` applied (not validated).

    Raises:
        ConfigError: on a section that is not a table, an unknown section or key, or a value of the
            wrong type.
    """
    cfg = JobConfig()
    for section, table in data.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: top-level key {section!r} must be a table like [{section}]")
        for key, value in table.items():
            cfg = _apply(cfg, section, key, value, where)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> JobConfig:
    """Read an optional TOML file, apply overrides, validate.

    ``data.path``, a ``data.tokenizer`` file and ``network.matrix`` are looked up in the working
    directory first, then in the file's folder.

    Args:
        path: A TOML config file; ``None`` starts from the defaults.
        overrides: ``section.key=value`` strings (``--set``), applied after the file.

    Returns:
        The validated config.

    Raises:
        ConfigError: if the file is missing or not valid TOML, on a bad key or value, or when
            :meth:`JobConfig.validate` fails.
    """
    cfg = JobConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(read_text(p, "config file"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: not valid TOML: {exc}") from None
        cfg = config_from_mapping(data, where=str(p))
    cfg = apply_overrides(cfg, overrides)
    if path is not None:
        cfg = _paths_from(cfg, Path(path).resolve().parent)
    return cfg.validate()


def _paths_from(cfg: JobConfig, base_dir: Path) -> JobConfig:
    """``data.path``, a ``data.tokenizer`` file, ``network.matrix`` and ``pipeline.plan_file``: looked up in the working
    directory first, then in the config file's folder (:func:`spotpipe.fsutil.resolve_path`); one
    found there is made absolute, so every process and every command reads the same file."""
    from dataclasses import replace

    def where(value: str) -> str:
        if not value or value == "byte":
            return value
        found = resolve_path(value, base_dir)
        return value if found == Path(value).expanduser() else str(found.resolve())

    return replace(cfg, data=replace(cfg.data, path=where(cfg.data.path), tokenizer=where(cfg.data.tokenizer)),
                   network=replace(cfg.network, matrix=where(cfg.network.matrix)),
                   pipeline=replace(cfg.pipeline, plan_file=where(cfg.pipeline.plan_file)))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def config_to_toml(cfg: JobConfig) -> str:
    """Serialise the resolved config; :func:`load_config` reads it back to an equal JobConfig.

    Args:
        cfg: The config, every section and key written.

    Returns:
        TOML text, one ``[section]`` table per config section.
    """
    lines: list[str] = []
    for section in fields(JobConfig):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(key: str, value: str, choices: Any, *, listed: bool = True) -> None:
    """Check ``value`` against the closed choice ``choices`` (a ``Literal`` type).

    Args:
        key: Dotted config key, e.g. ``"ft.strategy"``.
        value: The configured value.
        choices: The key's ``Literal[...]`` type alias; its arguments are the allowed values.
        listed: Phrase the message as ``one of a, b, c`` (True) or as ``a, b or c`` (False).

    Raises:
        ConfigError: naming the key, the allowed values and the value given.
    """
    allowed: tuple[str, ...] = get_args(choices)
    if value in allowed:
        return
    if listed:
        text = "one of " + ", ".join(allowed)
    else:
        text = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
    raise ConfigError(f"{key} must be {text}, got {value!r}")


def validate(cfg: JobConfig) -> None:
    """Range and cross-section checks; each message names the key and the allowed values.

    Args:
        cfg: The config to check.

    Raises:
        ConfigError: on the first rule broken.
    """
    m, p, t, r, f = cfg.model, cfg.pipeline, cfg.train, cfg.run, cfg.ft
    _check(m.layers >= 1, f"model.layers must be >= 1, got {m.layers}")
    _check(m.d_model >= 8, f"model.d_model must be >= 8, got {m.d_model}")
    _check(m.heads >= 1, f"model.heads must be >= 1, got {m.heads}")
    _check(m.d_model % m.heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.heads ({m.heads})")
    _check((m.d_model // m.heads) % 2 == 0, f"model.d_model / model.heads must be even for rotary embeddings, got {m.d_model // m.heads}")
    kv = m.kv_heads or m.heads
    _check(1 <= kv <= m.heads and m.heads % kv == 0, f"model.kv_heads must divide model.heads ({m.heads}), got {m.kv_heads}")
    _check(m.context >= 2, f"model.context must be >= 2, got {m.context}")
    _check(m.vocab_size >= 2, f"model.vocab_size must be >= 2, got {m.vocab_size}")
    _check(m.ffn_hidden >= 0, f"model.ffn_hidden must be >= 0 (0 = default), got {m.ffn_hidden}")
    _check_choice("model.dtype", m.dtype, DtypeName, listed=False)
    _check(m.rope_theta > 1, f"model.rope_theta must be > 1, got {m.rope_theta}")
    _check(0 < m.norm_eps < 1, f"model.norm_eps must be in (0, 1), got {m.norm_eps}")
    _check(p.schedule in SCHEDULE_REGISTRY,
           f"pipeline.schedule must be one of {', '.join(SCHEDULE_REGISTRY)}, got {p.schedule!r} "
           f"(or {AUTO_SCHEDULE}, with pipeline.memory_budget_gb)")
    _check(math.isfinite(p.memory_budget_gb) and p.memory_budget_gb >= 0,
           f"pipeline.memory_budget_gb must be >= 0 (0 = none), got {p.memory_budget_gb}")
    _check(p.stages >= 1, f"pipeline.stages must be >= 1, got {p.stages}")
    _check(p.replicas >= 1, f"pipeline.replicas must be >= 1, got {p.replicas}")
    _check(p.microbatches >= 1, f"pipeline.microbatches must be >= 1, got {p.microbatches}")
    _check(p.virtual_stages >= 1, f"pipeline.virtual_stages must be >= 1, got {p.virtual_stages}")
    validate_skippipe(cfg)
    chunks = model_chunks(p.schedule, p.stages, p.virtual_stages)
    _check(
        chunks <= m.layers,
        f"pipeline.stages ({p.stages})"
        + (f" x pipeline.virtual_stages ({p.virtual_stages})" if SCHEDULE_REGISTRY[p.schedule].chunked else "")
        + f" must be <= model.layers ({m.layers}): every stage needs at least one block",
    )
    _check(not (m.tie_embeddings and chunks > 1),
           f"model.tie_embeddings = true needs the embedding and the LM head in one model chunk, but pipeline.stages = "
           f"{p.stages} cuts the model into {chunks} chunks on different workers; set model.tie_embeddings = false "
           "(or pipeline.stages = 1)")
    _check_choice("pipeline.recompute", p.recompute, RecomputeName)
    _check_choice("pipeline.offload", p.offload, OffloadName)
    _check(all(0 <= c < chunks for c in p.recompute_chunks),
           f"pipeline.recompute_chunks must name chunks in 0..{chunks - 1} (the model is cut into {chunks} chunks), "
           f"got {list(p.recompute_chunks)}")
    if p.schedule == "chronos":
        _check(p.virtual_stages == 2, f"pipeline.virtual_stages must be 2 for the chronos schedule (two chunks per rank in a V), got {p.virtual_stages}")
    if p.schedule == "interleaved":
        _check(p.microbatches % p.stages == 0, f"pipeline.microbatches ({p.microbatches}) must be a multiple of pipeline.stages ({p.stages}) for the interleaved schedule")
    _check(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    per_step = p.replicas * p.microbatches
    _check(t.batch_size >= per_step and t.batch_size % per_step == 0,
           f"train.batch_size ({t.batch_size}) must be a positive multiple of pipeline.replicas x pipeline.microbatches ({per_step})")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(0 <= t.beta1 < 1, f"train.beta1 must be in [0, 1), got {t.beta1}")
    _check(0 <= t.beta2 < 1, f"train.beta2 must be in [0, 1), got {t.beta2}")
    _check(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    _check(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (0 = never), got {t.checkpoint_every}")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _check(t.eval_batches >= 1, f"train.eval_batches must be >= 1, got {t.eval_batches}")
    _check(t.max_minutes >= 0, f"train.max_minutes must be >= 0, got {t.max_minutes}")
    _check_choice("train.nonfinite", t.nonfinite, NonfiniteName, listed=False)
    _check(0 < cfg.data.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {cfg.data.val_fraction}")
    _check(r.name == "" or (r.name not in (".", "..") and "/" not in r.name and "\\" not in r.name and "\0" not in r.name),
           f"run.name must be a plain folder name under runs/ (no '/', not '.' or '..'), got {r.name!r}; "
           "use run.dir for another place")
    _check(0 <= r.port <= 65535, f"run.port must be in [0, 65535], got {r.port}")
    _check_choice("run.backend", r.backend, BackendName, listed=False)
    _check_choice("run.device", r.device, DeviceName, listed=False)
    if r.backend == "nccl" and r.device == "cpu":
        raise ConfigError("run.backend = nccl needs run.device = cuda (or auto); NCCL moves device tensors only")
    _check(0 < r.timeout_s <= MAX_WAIT_S, f"run.timeout_s must be in (0, {MAX_WAIT_S:g}] seconds, got {r.timeout_s}")
    _check(0 < r.heartbeat_s <= MAX_WAIT_S, f"run.heartbeat_s must be in (0, {MAX_WAIT_S:g}] seconds, got {r.heartbeat_s}")
    _check(-1 <= r.local_workers <= p.ranks * p.replicas,
           f"run.local_workers must be -1 (all) or in [0, {'the nodes of pipeline.stage_nodes' if p.stage_nodes else 'pipeline.stages x pipeline.replicas'} "
           f"= {p.ranks * p.replicas}], got {r.local_workers}")
    _check_choice("ft.strategy", f.strategy, StrategyName)
    _check(0 < f.detect_timeout_s <= MAX_WAIT_S, f"ft.detect_timeout_s must be in (0, {MAX_WAIT_S:g}] seconds, got {f.detect_timeout_s}")
    _check(f.mirror_every >= 1, f"ft.mirror_every must be >= 1, got {f.mirror_every}")
    _check(0 <= f.spares <= 64, f"ft.spares must be in 0..64, got {f.spares}")
    _check(1 <= f.min_workers <= p.stages * p.replicas,
           f"ft.min_workers must be in [1, pipeline.stages x pipeline.replicas = {p.stages * p.replicas}], got {f.min_workers}")
    _check(0 <= f.replace_wait_s <= MAX_WAIT_S, f"ft.replace_wait_s must be in [0, {MAX_WAIT_S:g}] seconds, got {f.replace_wait_s}")
    if f.elastic:
        _check(not p.stage_nodes, "ft.elastic reshapes jobs over pipeline stages; a pipeline.stage_nodes run plans its paths "
                                  "around lost nodes and takes joiners back by itself (leave ft.elastic = false)")
        _check(chunks == p.stages, f"ft.elastic re-partitions one model chunk per stage, but pipeline.schedule = {p.schedule} "
                                   f"holds {chunks} chunks on {p.stages} stages (use gpipe or 1f1b)")
        _check(f.strategy != "none", "ft.elastic needs recovery on: ft.strategy = none stops the job at the first loss")
        _check(not (f.swap_edges or f.strategy == "checkfree+"),
               "ft.elastic cannot keep CheckFree+ edge copies across a re-partition (ft.swap_edges / ft.strategy = checkfree+)")
        _check(not p.recompute_chunks, "ft.elastic: pipeline.recompute_chunks names chunks of the configured cut, which a "
                                       "re-partition changes; use pipeline.recompute = all or longest")
    _check(f.rate_step_time_s >= 0, f"ft.rate_step_time_s must be >= 0 (0 = measured), got {f.rate_step_time_s}")
    _check(f.strategy != "replica" or p.replicas >= 2,
           f"ft.strategy = replica copies a live data-parallel replica and needs pipeline.replicas >= 2, got {p.replicas}; "
           "use ft.strategy = auto, mirror or checkfree")
    if f.swap_edges or f.strategy == "checkfree+":
        _check(chunks >= 4, f"ft.swap_edges / ft.strategy = checkfree+ needs >= 4 pipeline stages (model chunks), got {chunks}")
    if f.faults:
        try:
            specs = parse_fault_specs(f.faults)
        except FaultSpecError as exc:
            raise ConfigError(f"ft.faults: {exc}") from None
        for spec in specs:
            for s in spec.stages or ():
                if p.stage_nodes:  # one worker per node: stage=N names node N
                    _check(s < p.ranks, f"ft.faults: {spec.text!r} names node {s}, but pipeline.stage_nodes has nodes 0..{p.ranks - 1}")
                else:
                    _check(s < chunks, f"ft.faults: {spec.text!r} names stage {s}, but stages are 0..{chunks - 1}")
            if spec.step is not None:
                _check(spec.step < t.steps, f"ft.faults: {spec.text!r} is at step {spec.step}, but train.steps = {t.steps} "
                                            f"runs steps 0..{t.steps - 1} (fault specs count steps from 0)")
            if spec.replica is not None:
                _check(spec.replica < p.replicas, f"ft.faults: {spec.text!r} names replica {spec.replica}, but replicas are 0..{p.replicas - 1}")
    n = cfg.network
    _check(n.latency_ms >= 0, f"network.latency_ms must be >= 0, got {n.latency_ms}")
    _check(n.bandwidth_gbps >= 0, f"network.bandwidth_gbps must be >= 0 (0 = unlimited), got {n.bandwidth_gbps}")
    validate_sim(cfg)



def validate_skippipe(cfg: JobConfig) -> None:
    """Range checks of the SkipPipe planning keys of ``[pipeline]``.

    Args:
        cfg: The config to check (``[pipeline]`` and ``train.batch_size``).

    Raises:
        ConfigError: on the first rule broken.
    """
    p = cfg.pipeline
    _check(0 <= p.skip_ratio < 1, f"pipeline.skip_ratio must be in [0, 1), got {p.skip_ratio}")
    _check(0 <= p.max_swaps <= 64, f"pipeline.max_swaps must be in 0..64, got {p.max_swaps}")
    _check(1 <= p.node_memory <= 1_000_000, f"pipeline.node_memory must be in 1..1000000, got {p.node_memory}")
    _check(1 <= p.plan_budget <= 10_000_000, f"pipeline.plan_budget must be in 1..10000000, got {p.plan_budget}")
    _check_choice("pipeline.paths", p.paths, PathsName)
    _check(0 <= p.full_every <= 1_000_000, f"pipeline.full_every must be in 0..1000000 (0 = never), got {p.full_every}")
    if not p.stage_nodes:
        return
    _check(p.replicas == 1, f"pipeline.stage_nodes sets the nodes of every stage group (its data parallelism), so "
                            f"pipeline.replicas must be 1, got {p.replicas}")
    _check(len(p.stage_nodes) == p.stages,
           f"pipeline.stage_nodes lists {len(p.stage_nodes)} stage groups, but pipeline.stages = {p.stages}: "
           "give one node count per stage")
    for i, n in enumerate(p.stage_nodes):
        _check(1 <= n <= 4096, f"pipeline.stage_nodes[{i}] must be in 1..4096, got {n}")
    seqs = p.stage_nodes[0] * p.microbatches
    _check(cfg.train.batch_size % seqs == 0,
           f"train.batch_size ({cfg.train.batch_size}) must be a multiple of pipeline.stage_nodes[0] x "
           f"pipeline.microbatches ({seqs}): every stage-0 node feeds pipeline.microbatches equal microbatches")


def validate_sim(cfg: JobConfig) -> None:
    """Range checks of the [sim] section (owned by the simulator).

    Args:
        cfg: The config to check (``[sim]``).

    Raises:
        ConfigError: on the first rule broken.
    """
    s = cfg.sim
    _check(s.device_tflops > 0, f"sim.device_tflops must be > 0, got {s.device_tflops}")
    _check(s.backward_ratio > 0, f"sim.backward_ratio must be > 0, got {s.backward_ratio}")
    for i, v in enumerate(s.speed_factors):
        _check(v > 0, f"sim.speed_factors[{i}] must be > 0, got {v}")
    for name in ("optimizer_s", "failure_rate", "checkpoint_write_s", "restart_s", "replace_s", "regroup_s"):
        value = getattr(s, name)
        _check(value >= 0, f"sim.{name} must be >= 0, got {value}")
    _check(s.spares >= 0, f"sim.spares must be >= 0, got {s.spares}")
    _check(s.host_cores >= 0, f"sim.host_cores must be >= 0 (0 = a device per worker), got {s.host_cores}")
    for name in ("layer_forward_s", "head_ratio", "message_overhead_s", "compute_gap_s"):
        value = getattr(s, name)
        _check(value >= 0, f"sim.{name} must be >= 0, got {value}")
    _check_choice("sim.recovery", s.recovery, SimRecoveryName)
