"""Phase faults (runtime/phase_fault.py): the worker SIGKILLs itself at the planned point."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from spotpipe.runtime.worker.phase_fault import PhaseFault

SCRIPT = """
import sys
from spotpipe.runtime.worker.phase_fault import PhaseFault
fault = PhaseFault({3: "backward"}, microbatches=4)
for step in range(5):
    fault.begin_step(step)
    for mb in range(4):
        print(step, "forward", mb, flush=True); fault.hit("forward")
    for mb in range(4):
        print(step, "backward", mb, flush=True); fault.hit("backward")
    fault.hit("optimizer")
print("survived", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_backward_fault_kills_the_process_at_the_middle_microbatch_of_its_step() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=50)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-500:], proc.stderr[-500:])
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "3 backward 2", lines[-3:]  # microbatches 0 and 1 done, dies at the third
    assert "fault injected: SIGKILL in the backward phase of step 3" in proc.stdout


def test_other_phases_and_steps_are_no_ops() -> None:
    fault = PhaseFault({3: "optimizer"}, microbatches=4)
    for step in (2, 4):
        fault.begin_step(step)
        fault.hit("optimizer")
    fault.begin_step(3)
    for phase in ("forward", "backward", "allreduce"):
        fault.hit(phase)
    assert PhaseFault.from_grant({}, None, 0, 4).planned == {}
    assert PhaseFault.from_grant({"phase_faults": [[5, "allreduce"]]}, None, 0, 4).planned == {5: "allreduce"}
