"""Checkpoint files and manifests: atomic writes, checksums, corruption, incomplete saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spotpipe.runtime.state.checkpoint import (
    CheckpointError,
    check_layout,
    checkpoint_dir,
    latest_checkpoint,
    load_state,
    save_state,
    write_manifest,
)


def state(seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3, generator=g)).sum().backward()
    opt.step()
    return {"step": seed, "chunks": {1: model.state_dict()}, "optimizers": {1: opt.state_dict()}, "sampler": {"epoch": 0, "position": 8, "seed": 0}}


def test_round_trip_is_exact(tmp_path: Path) -> None:
    s = state(4)
    sha = save_state(tmp_path / "rank0.pt", s)
    back = load_state(tmp_path / "rank0.pt", expected_sha256=sha)
    assert back["step"] == 4 and back["sampler"] == s["sampler"]
    for k, v in s["chunks"][1].items():  # type: ignore[index]
        assert torch.equal(back["chunks"][1][k], v)
    assert back["optimizers"][1]["state"][0]["step"] == s["optimizers"][1]["state"][0]["step"]  # type: ignore[index]
    assert not list(tmp_path.glob(".*.tmp")), "temporary files must be gone"


def test_corruption_and_mismatch_are_named(tmp_path: Path) -> None:
    path = tmp_path / "rank0.pt"
    sha = save_state(path, state(1))
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        load_state(path, expected_sha256="0" * 64)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank0.pt is corrupt: its SHA-256"):
        load_state(path, expected_sha256=sha)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad header"):
        load_state(path)
    with pytest.raises(CheckpointError, match="is missing"):
        load_state(tmp_path / "nope.pt")


def save_checkpoint(run_dir: Path, step: int, ranks: int, manifest: bool = True) -> None:
    d = checkpoint_dir(run_dir, step)
    files = {r: (f"rank{r}.pt", save_state(d / f"rank{r}.pt", state(step * 10 + r))) for r in range(ranks)}
    if manifest:
        write_manifest(d, step, files, {"chunks": ranks, "model.d_model": 32})


def test_latest_skips_incomplete_and_checks_files(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 4, 2)
    save_checkpoint(tmp_path, 9, 2)
    save_checkpoint(tmp_path, 14, 2, manifest=False)  # crashed while saving: ignored
    m = latest_checkpoint(tmp_path)
    assert m is not None and m.step == 9 and sorted(m.files) == [0, 1]
    assert m.to_grant()["files"]["1"][0] == "rank1.pt"
    check_layout(m, {"chunks": 2, "model.d_model": 32, "other": 1})
    with pytest.raises(CheckpointError, match="model.d_model = 32, this job has 64"):
        check_layout(m, {"model.d_model": 64})
    (m.dir / "rank1.pt").unlink()
    with pytest.raises(CheckpointError, match="file rank1.pt of rank 1 is missing"):
        latest_checkpoint(tmp_path)
    (m.dir / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest .* is corrupt"):
        latest_checkpoint(tmp_path)
