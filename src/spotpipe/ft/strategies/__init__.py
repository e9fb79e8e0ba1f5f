"""Recovery strategies by name: one pure module per strategy, registered once in :data:`REGISTRY`.

- :mod:`~spotpipe.ft.strategies.replica`: copy a live data-parallel replica (exact).
- :mod:`~spotpipe.ft.strategies.mirror`: copy the host-memory mirror a neighbour keeps (exact
  when refreshed every step).
- :mod:`~spotpipe.ft.strategies.checkfree_plus`: copy the swap partner of a lost edge stage
  (CheckFree+).
- :mod:`~spotpipe.ft.strategies.checkfree`: average the two neighbours of a lost middle stage,
  lr x1.1 (CheckFree).
- :mod:`~spotpipe.ft.strategies.checkpoint`: roll the whole job back to the last checkpoint.

:data:`REGISTRY` is the only list of strategy names. Its order is the priority order that
``ft.strategy = auto`` tries, from most to least exact; the checkpoint comes last, as the
fallback. ``auto`` and ``none`` are policy modes of :func:`spotpipe.ft.policy.plan_recovery`,
not strategies. Adding a strategy: a module with a :class:`~spotpipe.ft.strategies.base.Strategy`
named ``STRATEGY``, one line in ``_ALL`` below, and its name in
:data:`spotpipe.config.StrategyName` (a test checks the two agree).

Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from spotpipe.errors import SpotpipeError
from spotpipe.ft.strategies import checkfree, checkfree_plus, checkpoint, mirror, replica
from spotpipe.ft.strategies.base import Strategy

_ALL: tuple[Strategy, ...] = (
    replica.STRATEGY,
    mirror.STRATEGY,
    checkfree_plus.STRATEGY,
    checkfree.STRATEGY,
    checkpoint.STRATEGY,
)

REGISTRY: Final[Mapping[str, Strategy]] = MappingProxyType({s.name: s for s in _ALL})
"""Strategy name -> strategy, in priority order (most exact first); read-only."""


class UnknownStrategyError(SpotpipeError):
    """A name that is not in :data:`REGISTRY`."""


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``.

    Args:
        name: A strategy name, e.g. ``"checkfree"`` (a plan's ``strategy``).

    Returns:
        Its :class:`~spotpipe.ft.strategies.base.Strategy`.

    Raises:
        UnknownStrategyError: if ``name`` is not registered (``auto``, ``none`` and ``stop`` are
            not strategies).
    """
    found = REGISTRY.get(name)
    if found is None:
        raise UnknownStrategyError(f"no recovery strategy called {name!r}; known: {', '.join(REGISTRY)}")
    return found
