"""Fixtures of the integration tests: real `spotpipe train` jobs with worker processes over gloo
on 127.0.0.1, on a tiny model and the tinyshakespeare token file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"

# A tiny model that every schedule can cut: 8 blocks = 4 stages x 2 virtual stages.
TINY = [
    "model.layers=8",
    "model.d_model=32",
    "model.heads=2",
    "model.context=16",
    "pipeline.stages=4",
    "pipeline.microbatches=4",
    "train.batch_size=8",
    "train.steps=30",
    "train.warmup_steps=5",
    "train.eval_every=10",
    "train.eval_batches=2",
    "run.plot=false",
    "run.timeout_s=60",
]


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinyshakespeare as a byte-level token dir (skips when the reference data is absent)."""
    if not DATA.is_file():
        pytest.skip(f"reference data {DATA} is absent")
    from spotpipe.data.tokens import prepare_tokens

    out = tmp_path_factory.mktemp("tokens") / "tinyshakespeare"
    prepare_tokens([DATA], out, "byte")
    return out


@pytest.fixture(scope="session")
def spotpipe_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env["SPOTPIPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    env.pop("SPOTPIPE_TOKEN", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spotpipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "spotpipe.cli", *args]


@pytest.fixture(scope="session")
def train(token_dir: Path, spotpipe_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `spotpipe train` on the tiny model to completion; returns the finished process."""

    def run(run_dir: Path, *sets: str, resume: bool = False, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        args = ["train"]
        if resume:
            args += ["--resume", str(run_dir)]
            overrides = list(sets)
        else:
            overrides = [*TINY, f"data.path={token_dir}", f"run.dir={run_dir}", *sets]
        for s in overrides:
            args += ["--set", s]
        return subprocess.run(
            spotpipe_cmd(*args), capture_output=True, text=True, timeout=timeout, env=spotpipe_env, cwd=run_dir.parent
        )

    return run


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "events.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def step_losses(run_dir: Path, after_last_start: bool = False) -> dict[int, float]:
    """step -> loss of the step events (of the last run_start only, with ``after_last_start``)."""
    records = read_events(run_dir)
    if after_last_start:
        starts = [i for i, r in enumerate(records) if r["event"] == "run_start"]
        records = records[starts[-1]:]
    return {r["step"]: r["loss"] for r in records if r["event"] == "step"}


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The process failed with exit code 2 and one `spotpipe: error:` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def helpers() -> Any:
    """The helper functions above, for the test modules (they do not import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        read_events=read_events,
        step_losses=step_losses,
        alive=alive,
        assert_one_line_error=assert_one_line_error,
        spotpipe_cmd=spotpipe_cmd,
        tiny=list(TINY),
    )
