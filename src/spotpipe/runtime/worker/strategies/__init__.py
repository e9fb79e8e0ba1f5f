"""The runtime half of each recovery strategy, registered by name (the plan's ``strategy``).

Adding a strategy: one module here with a :class:`~spotpipe.runtime.worker.strategies.base.
StateTransfer` and one line in :data:`REGISTRY` (its pure half is registered in :mod:`spotpipe.ft`).
The transfer serves both runtimes: the workers (``send`` / ``receive_sizes`` / ``install``) and the
in-process convergence mode (``install_in_process``), which looks it up here too.
``checkpoint`` is not here: a rollback reloads the last checkpoint on every worker instead.
"""

from __future__ import annotations

from spotpipe.runtime.worker.strategies.base import InProcessRun, RecoveryPlanView, StateTransfer, WorkerView
from spotpipe.runtime.worker.strategies.checkfree import CHECKFREE
from spotpipe.runtime.worker.strategies.copy import CHECKFREE_PLUS, MIRROR, REPLICA

REGISTRY: dict[str, StateTransfer] = {t.name: t for t in (REPLICA, MIRROR, CHECKFREE, CHECKFREE_PLUS)}


def transfer_for(strategy: str) -> StateTransfer:
    """The runtime half of ``strategy``.

    Args:
        strategy: A strategy name (``RecoveryPlanView.strategy``).

    Returns:
        The registered :class:`StateTransfer`.

    Raises:
        KeyError: If no runtime half is registered under that name (a plan the runtime cannot run).
    """
    try:
        return REGISTRY[strategy]
    except KeyError:
        raise KeyError(f"no runtime recovery for strategy {strategy!r}; registered: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "InProcessRun", "RecoveryPlanView", "StateTransfer", "WorkerView", "transfer_for"]
