"""The pure packages import without torch (DESIGN.md: ``schedule/``, ``sim/``, ``reliability/``
and ``ft/`` must not import torch), so the simulator, the planners and the policy run anywhere.

One fresh interpreter walks every module of the four packages (``pkgutil.walk_packages``, so a
new module is covered the day it lands) and imports it (``__main__`` modules excepted: importing
one runs its program); torch must not be in ``sys.modules``
afterwards. The first module after whose import torch appears is named in the failure.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE_PACKAGES = ("spotpipe.ft", "spotpipe.schedule", "spotpipe.sim", "spotpipe.reliability")

CODE = """
import importlib, json, pkgutil, sys

def torch_loaded():
    return any(m == "torch" or m.startswith("torch.") for m in sys.modules)

seen, culprit = [], None
for package in PACKAGES:
    pkg = importlib.import_module(package)
    walked = [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
    names = [package] + [n for n in walked if not n.endswith(".__main__")]  # __main__ runs a program
    for name in names:
        importlib.import_module(name)
        seen.append(name)
        if culprit is None and torch_loaded():
            culprit = name
print(json.dumps({"modules": seen, "culprit": culprit, "torch": torch_loaded()}))
"""


def _walk(packages: tuple[str, ...]) -> dict[str, object]:
    code = f"PACKAGES = {packages!r}\n" + CODE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(150)
def test_pure_packages_import_without_torch() -> None:
    result = _walk(PURE_PACKAGES)
    modules = result["modules"]
    assert isinstance(modules, list)
    # The walk really covered the packages (an empty walk would pass vacuously).
    for name in ("spotpipe.schedule.build", "spotpipe.schedule.generators", "spotpipe.schedule.cli",
                 "spotpipe.sim.job", "spotpipe.sim.ftpolicy", "spotpipe.ft.policy", "spotpipe.ft.faults",
                 "spotpipe.reliability.report", "spotpipe.reliability.cli"):
        assert name in modules, f"{name} was not walked: {modules}"
    assert result["culprit"] is None and result["torch"] is False, f"importing {result['culprit']} imported torch"


@pytest.mark.timeout(150)
def test_the_check_sees_torch() -> None:
    """The same walk over a package that does import torch reports it (the check can fail)."""
    result = _walk(("spotpipe.runtime.comm",))
    assert result["torch"] is True and isinstance(result["culprit"], str)
    assert str(result["culprit"]).startswith("spotpipe.runtime.comm")
