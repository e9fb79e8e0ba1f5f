"""Kills aimed at one phase of a step: the worker SIGKILLs itself at the planned point.

A timed signal from the controller (:mod:`spotpipe.runtime.control.inject`) lands wherever the victim
happens to be; a test that must show survival of a kill *during the backward pass* or *during
the all-reduce* needs the kill to land there. A fault spec with ``phase=`` (``stage=2@step=40,
phase=backward``, :mod:`spotpipe.faultspec`) is handed to the victim with its role, and the worker
sends itself a real ``SIGKILL`` when it gets there:

- ``forward`` / ``backward``: at the forward / backward of the middle microbatch of the step, so
  some microbatches of that pass are done and some are not;
- ``allreduce``: a timer fires 2 ms after the worker enters the step's world all-reduce, while
  the collective runs (peers that arrived first are blocked in it);
- ``optimizer``: right after its optimizer step, before it reports the step: the step was
  decided ``commit``, the survivors apply it, and the victim's update is lost with it.
- ``recovery``: as a source of the state transfer of a recovery that resumes at the step (a
  second loss while the new generation installs its state).

Before it dies the worker records the fault under ``fault/<worker>`` in the store, so the
controller's event log says which fault killed it, and a replacement is not handed it again.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from spotpipe.runtime import protocol

ALLREDUCE_DELAY_S = 0.002


class PhaseFault:
    """The phase faults planned for one worker (``{step: phase}``); :meth:`hit` is called at the
    hook points and kills the process at the planned one. Without a plan every call is a no-op."""

    def __init__(self, planned: dict[int, str], store: Any = None, worker: int = -1, microbatches: int = 1) -> None:
        """Keep the plan.

        Args:
            planned: Step (0-based) -> phase (``forward``, ``backward``, ``allreduce``, ``optimizer``,
                ``recovery``).
            store: The controller's store, where the fault is recorded before the kill (``None``: not
                recorded).
            worker: This worker's id.
            microbatches: Microbatches per step; the forward and backward faults fire at the middle one.
        """
        self.planned = dict(planned)
        self.store = store
        self.worker = worker
        self.middle = max(1, microbatches // 2 + 1)  # the middle microbatch's forward / backward
        self.step = -1
        self.count = 0

    @staticmethod
    def from_grant(info: dict[str, Any], store: Any, worker: int, microbatches: int) -> PhaseFault:
        """The plan a worker's grant carries (``info["phase_faults"]``: ``[step, phase]`` pairs).

        Args:
            info: The grant's ``info``.
            store: The controller's store.
            worker: This worker's id.
            microbatches: Microbatches per step.

        Returns:
            The plan (empty when the grant has none).
        """
        return PhaseFault({int(step): str(phase) for step, phase in info.get("phase_faults", [])}, store, worker, microbatches)

    def begin_step(self, step: int) -> None:
        """Start counting the forward and backward hits of ``step``.

        Args:
            step: The step, 0-based.
        """
        self.step, self.count = step, 0

    def hit(self, phase: str, step: int | None = None) -> None:
        """The worker reached ``phase`` of the current step (or of ``step``).

        Args:
            phase: The phase reached.
            step: The step, 0-based, when it is not the current one (a recovery's step).
        """
        if not self.planned or self.planned.get(self.step if step is None else step) != phase:
            return
        if phase in ("forward", "backward"):
            self.count += 1
            if self.count < self.middle:
                return
        self.fire(phase, self.step if step is None else step)

    def fire(self, phase: str, step: int) -> None:
        """Record the fault in the store and SIGKILL this process: at once, or 2 ms later for

        ``allreduce`` (the kill then lands inside the collective).

        Args:
            phase: The planned phase.
            step: The step, 0-based.
        """
        if self.store is not None:
            self.store.set(protocol.fault_key(self.worker), json.dumps({"step": step, "phase": phase, "time": time.time()}))
        print(f"[{time.strftime('%H:%M:%S')}] worker {self.worker}: fault injected: SIGKILL in the {phase} phase of step {step}",
              flush=True)
        if phase == "allreduce":
            timer = threading.Timer(ALLREDUCE_DELAY_S, os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
            return
        os.kill(os.getpid(), signal.SIGKILL)
