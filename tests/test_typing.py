"""The pure packages type-check under ``mypy --strict`` (DESIGN.md, conventions).

Settings live in ``[tool.mypy]`` of pyproject.toml (python_version 3.11, ``mypy_path = "src"``);
mypy comes with the ``test`` extra (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRICT_FOLDERS = ("src/spotpipe/schedule", "src/spotpipe/sim", "src/spotpipe/reliability", "src/spotpipe/ft")


@pytest.mark.timeout(300)
def test_pure_packages_pass_mypy_strict() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not importable in this environment; install the test extra: pip install -e '.[test]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"), *STRICT_FOLDERS],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, f"mypy --strict failed:\n{proc.stdout}{proc.stderr}"
