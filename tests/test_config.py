"""Config loading, overrides, validation messages and the TOML round trip."""

import tomllib
import typing

import pytest

from spotpipe.config import (
    FT_STRATEGIES,
    SIM_RECOVERY,
    BackendName,
    DtypeName,
    JobConfig,
    SimRecoveryName,
    StrategyName,
    apply_overrides,
    config_from_mapping,
    config_to_toml,
    load_config,
)
from spotpipe.errors import ConfigError


def test_defaults_validate_and_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["train.steps=7", "pipeline.schedule=gpipe", 'ft.faults=["stage=1@step=3"]'])
    assert cfg.train.steps == 7 and cfg.pipeline.schedule == "gpipe" and cfg.ft.faults == ("stage=1@step=3",)
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg


def test_override_types_are_coerced():
    cfg = apply_overrides(JobConfig(), ["train.lr=1e-3", "run.progress=false", "network.locations=a,b"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.run.progress is False
    assert cfg.network.locations == ("a", "b")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.nope=1", "unknown key train.nope"),
        ("nosection.x=1", "unknown section [nosection]"),
        ("pipeline.stages=9", "pipeline.stages (9) must be <= model.layers (8)"),
        ("pipeline.microbatches=0", "pipeline.microbatches must be >= 1"),
        ("pipeline.schedule=zigzag", "pipeline.schedule must be one of gpipe, 1f1b, interleaved"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.batch_size=6", "train.batch_size (6) must be a positive multiple"),
        ("model.heads=3", "model.d_model (128) must be divisible by model.heads (3)"),
        ("run.port=70000", "run.port must be in [0, 65535]"),
        ("ft.min_workers=5", "ft.min_workers must be in [1, pipeline.stages x pipeline.replicas = 4], got 5"),
        ("ft.replace_wait_s=-1", "ft.replace_wait_s must be in [0, 1e+06] seconds, got -1"),
    ],
)
def test_bad_values_name_the_key_and_range(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(JobConfig(), ["steps=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_file_with_unknown_table_is_refused():
    with pytest.raises(ConfigError, match="unknown section"):
        config_from_mapping(tomllib.loads("[trian]\nsteps = 3\n"), where="x.toml")


CLOSED_CHOICES = [("model.dtype", DtypeName), ("run.backend", BackendName), ("ft.strategy", StrategyName),
                  ("sim.recovery", SimRecoveryName)]


@pytest.mark.parametrize("key, choice", CLOSED_CHOICES, ids=[k for k, _ in CLOSED_CHOICES])
def test_closed_choices_are_literal_types_and_checked_against_them(key, choice):
    section, name = key.split(".")
    assert typing.get_type_hints(type(getattr(JobConfig(), section)))[name] == choice  # the field is typed by it
    allowed = typing.get_args(choice)
    for value in allowed:  # every value of the type is accepted (replica where replicas exist) ...
        extra = ["pipeline.replicas=2"] if (key, value) == ("ft.strategy", "replica") else []
        assert getattr(getattr(load_config(None, [f"{key}={value}", *extra]), section), name) == value
    with pytest.raises(ConfigError) as info:  # ... and the message lists exactly those
        load_config(None, [f"{key}=bogus"])
    message = str(info.value)
    assert message.startswith(f"{key} must be ") and "'bogus'" in message
    assert all(value in message for value in allowed)


def test_closed_choice_messages_and_derived_tuples():
    with pytest.raises(ConfigError, match="run.backend must be auto, gloo or nccl, got 'mpi'"):
        load_config(None, ["run.backend=mpi"])
    with pytest.raises(ConfigError, match="model.dtype must be float32, bfloat16 or float16, got 'int8'"):
        load_config(None, ["model.dtype=int8"])
    with pytest.raises(ConfigError, match="ft.strategy must be one of auto, replica, mirror, checkfree, checkfree\\+, checkpoint, none"):
        load_config(None, ["ft.strategy=magic"])
    assert FT_STRATEGIES == typing.get_args(StrategyName) and SIM_RECOVERY == typing.get_args(SimRecoveryName)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "."])
def test_run_name_stays_under_runs(name: str) -> None:
    with pytest.raises(ConfigError, match="run.name must be a plain folder name"):
        load_config(None, [f"run.name={name}"])


def test_run_host_that_is_not_this_machine_is_refused_at_once() -> None:
    from spotpipe.errors import SpotpipeError
    from spotpipe.runtime.control.job import check_listen_host

    check_listen_host("127.0.0.1")
    with pytest.raises(SpotpipeError, match="does not resolve"):
        check_listen_host("no.such.host.invalid")
    with pytest.raises(SpotpipeError, match="not an address of this machine"):
        check_listen_host("10.255.255.1")


def test_replica_strategy_needs_replicas():
    with pytest.raises(ConfigError, match="ft.strategy = replica .* needs pipeline.replicas >= 2, got 1"):
        load_config(None, ["ft.strategy=replica"])


def test_fault_steps_must_run():
    with pytest.raises(ConfigError, match="'stage=2@step=40' is at step 40, but train.steps = 5"):
        load_config(None, ["train.steps=5", 'ft.faults=["stage=2@step=40"]'])


def test_fail_option_gets_the_configs_checks(tmp_path):
    """--fail specs are checked with the config (stage, replica, step) before anything starts."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "spotpipe.cli", "train", "--fail", "stage=2@step=40", "--set", "train.steps=5",
                           "--set", f"run.dir={run_dir}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "spotpipe: error: ft.faults: 'stage=2@step=40' is at step 40, but train.steps = 5 runs steps 0..4 "
        "(fault specs count steps from 0)"]
    assert not run_dir.exists()
