"""`spotpipe.schedule` and all its modules stay free of torch (DESIGN.md: the package is pure)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import importlib, pkgutil, sys
import spotpipe.schedule as pkg
names = [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
assert "spotpipe.schedule.generators" in sys.modules, names
assert "spotpipe.schedule.cli" in sys.modules, names
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(len(names), bad[:5])
sys.exit(1 if bad else 0)
"""


@pytest.mark.timeout(60)
def test_schedule_package_does_not_import_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("[]")
