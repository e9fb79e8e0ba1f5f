"""Fault tolerance: failure detection and recovery policy (pure), recovery rules, fault injection.

- :mod:`spotpipe.ft.detector` (pure): which workers are suspected dead, from heartbeats and
  transport errors; the runtime feeds it ``time.monotonic()``, the simulator its virtual clock.
- :mod:`spotpipe.ft.policy` (pure): which recovery strategy rebuilds each lost stage, and why.
- :mod:`spotpipe.ft.strategies` (pure): one module per recovery strategy (replica, mirror,
  CheckFree, CheckFree+, checkpoint) with its sources, why it applies or not, the bytes it moves,
  its exactness and learning-rate factor; ``REGISTRY`` is the only list of their names.
- :mod:`spotpipe.ft.elastic` (pure): elastic reshape, the next shape (stages x replicas, the
  layers of each stage, who holds what) when workers are lost for good or join, and the layers
  and bytes that move.
- :mod:`spotpipe.ft.faults` (no torch): a seeded per-step fault plan from fault specs (their
  grammar is :mod:`spotpipe.faultspec`), and delivery of real signals (SIGKILL, SIGSTOP/SIGCONT)
  to real processes.
- :mod:`spotpipe.runtime.state` (torch): a stage's state and its one flat form, which every copy
  (replica, mirror, CheckFree+ partner, checkpoint) moves, and the CheckFree tensor rule
  (:mod:`spotpipe.runtime.state.rules`).
- :mod:`spotpipe.runtime.inprocess.convergence` (torch): the in-process convergence mode.

This package's ``__init__`` imports nothing, so importing the pure modules never pulls in torch.
"""
