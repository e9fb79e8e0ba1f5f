"""Config loading, overrides, validation messages and the TOML round trip."""

import tomllib

import pytest

from spotpipe.config import JobConfig, apply_overrides, config_from_mapping, config_to_toml, load_config
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
