"""Discrete-event simulator of pipeline-parallel training on a modelled cluster (pure Python).

- :mod:`spotpipe.sim.engine`: the virtual clock and event queue.
- :mod:`spotpipe.network`: per-link latency and bandwidth (uniform or a location matrix);
  also used by the runtime's link-delay transport wrapper.
- :mod:`spotpipe.sim.cluster`: nodes, speeds, failure processes and preemption-trace replay.
- :mod:`spotpipe.sim.player`: one iteration of a lowered schedule, action by action.
- :mod:`spotpipe.sim.decision`: what a recovery policy knows and decides (the policy seam).
- :mod:`spotpipe.sim.recovery`: the failure-detector and recovery-policy hooks.
- :mod:`spotpipe.sim.ftpolicy`: ``sim.recovery = "policy"``, the shipped recovery policy priced on
  the cluster.
- :mod:`spotpipe.sim.job`: a whole job (steps, checkpoints, failures, restarts, events).
- :mod:`spotpipe.sim.elastic`: a preemption trace replayed elastic / wait / checkpoint, playing
  the elastic reshape policy of :mod:`spotpipe.ft.elastic`.
- :mod:`spotpipe.sim.report` / :mod:`spotpipe.sim.cli`: `spotpipe simulate`.

Nothing here imports torch.
"""
