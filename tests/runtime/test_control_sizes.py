"""Job sizes for the start-up line and the run summary (runtime/control/sizes.py), and config-relative data paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotpipe.config import load_config
from spotpipe.model.stages import build_stage
from spotpipe.runtime.control.sizes import format_sizes, job_sizes, mfu, peak_flops

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("sets", [[], ["pipeline.stages=2", "model.d_model=64"], ["pipeline.schedule=interleaved", "model.layers=8"]])
def test_parameter_counts_match_the_built_stages(sets: list[str]) -> None:
    cfg = load_config(None, sets)
    S = cfg.pipeline.stages
    built = [sum(p.numel() for p in build_stage(cfg.model, 0, s, S).parameters()) for s in range(S)]
    sizes = job_sizes(cfg, mirrors=True)
    if cfg.pipeline.schedule != "interleaved":  # interleaved ranks hold two chunks each: only the total compares
        assert sizes.largest_stage_params == max(built)
    assert sizes.params == sum(built)
    assert sizes.tokens_per_step == cfg.train.batch_size * cfg.model.context
    assert sizes.state_bytes == 16 * sizes.largest_stage_params
    assert 12 * sizes.largest_stage_params <= sizes.mirror_bytes <= 12 * sizes.largest_stage_params + 64 * 2**10
    assert job_sizes(cfg, mirrors=False).mirror_bytes == 0


@pytest.mark.parametrize("name, lo, hi", [("model-25m.toml", 20e6, 30e6), ("model-125m.toml", 110e6, 140e6),
                                          ("model-350m.toml", 300e6, 380e6)])
def test_the_real_size_configs_are_the_sizes_they_say(name: str, lo: float, hi: float) -> None:
    """The vocabulary comes from the tokenizer file (16 k), as prepare_run sets it."""
    cfg = load_config(CONFIGS / name, ["model.vocab_size=16384"])
    params = job_sizes(cfg, mirrors=False).params
    assert lo <= params <= hi, params
    assert (CONFIGS / "tokenizers" / "stdlib-bpe-16k.json").is_file()


def test_mfu_only_where_the_peak_is_known() -> None:
    sizes = job_sizes(load_config(None, []), mirrors=False)
    assert peak_flops("cpu", "float32") is None and mfu(sizes, 1.0, "cpu", "float32", 4) is None
    peak = peak_flops("NVIDIA H200", "bfloat16")
    assert peak == 989e12
    # at exactly the peak rate of 2 devices, MFU is 1
    assert mfu(sizes, sizes.flops_per_step / (2 * peak), "NVIDIA H200", "bfloat16", 2) == pytest.approx(1.0)


def test_the_sizes_line_names_parameters_tokens_and_memory() -> None:
    line = format_sizes(job_sizes(load_config(None, []), mirrors=True))
    assert line.startswith("model: 1.7 M parameters (largest stage") and "2048 tokens" in line
    assert "mirror of the next stage" in line and "checkpoint" in line


def test_file_paths_resolve_against_the_config_folder_when_not_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command reads a config the same way (train, schedule memory, simulate, plan)."""
    (tmp_path / "cfg" / "tok").mkdir(parents=True)
    (tmp_path / "cfg" / "tok" / "t.json").write_text("{}")
    (tmp_path / "cfg" / "links.csv").write_text("x")
    (tmp_path / "here.txt").write_text("x")
    (tmp_path / "cfg" / "job.toml").write_text(
        '[data]\ntokenizer = "tok/t.json"\npath = "here.txt"\n[network]\nmatrix = "links.csv"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "cfg" / "job.toml")
    assert cfg.data.tokenizer == str(tmp_path / "cfg" / "tok" / "t.json")  # not in the working directory: the config's folder
    assert cfg.network.matrix == str(tmp_path / "cfg" / "links.csv")
    assert cfg.data.path == "here.txt"  # in the working directory: that one, as given
    assert load_config(None, ["data.tokenizer=tok/t.json"]).data.tokenizer == "tok/t.json"  # no config file: as given
