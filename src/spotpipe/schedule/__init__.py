"""Pure pipeline schedules: the IR, generators, lowering passes, validation and rendering.

Nothing in this package imports torch (a test enforces it): the runtime executor and the
simulator both play the same lowered :class:`~spotpipe.schedule.ir.Schedule`.
"""

from spotpipe.schedule.ir import Action, Op, Placement, Schedule, parse_action, parse_actions

__all__ = ["Action", "Op", "Placement", "Schedule", "parse_action", "parse_actions"]
