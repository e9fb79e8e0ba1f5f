"""The simulator plays spotpipe's own recovery policy (``sim.recovery = "policy"``).

:class:`PlannedRecovery` is a :class:`~spotpipe.sim.recovery.RecoveryPolicy` that asks the
pure policy the runtime and the in-process mode ship, :func:`spotpipe.ft.policy.plan_recovery`
and :func:`spotpipe.ft.policy.job_outcome`, what to do about the lost workers (DESIGN.md: "the
simulator measures the policy that ships"), and prices the answer on the simulated cluster:

* ``continue`` (every lost worker rebuilt from a live peer): training resumes at the committed
  step, and only the interrupted step is replayed (atomic steps, DESIGN.md). Once every lost
  position has a node (an idle spare at once, else a replacement ``sim.replace_s`` after the
  failure; the job simulation handles that wait), the restart costs the state transfer plus
  ``sim.regroup_s`` (fresh communicators and installing the state; the fast re-initialisation of
  checkpointless training, SageMaker HyperPod 2025). The transfer is the bytes moved over the
  link from each source to the new node, ``latency + bytes / bandwidth``
  (:class:`spotpipe.network.Link`, the alpha-beta model of Hockney 1994); transfers from
  different sources use different directed links and run in parallel (the slowest one counts).
  The bytes each source sends are the strategy's own rule
  (:meth:`spotpipe.ft.strategies.base.Strategy.source_bytes`, looked up in
  :data:`spotpipe.ft.strategies.REGISTRY`) applied to the per-rank state sizes that
  :func:`stage_bytes` takes from the model shapes of :mod:`spotpipe.model.partition`:

  - ``replica`` / ``mirror`` / ``checkfree+``: the stage's weights plus its two AdamW moments
    (3 x the parameter bytes; Loshchilov and Hutter 2019 keep two moments per parameter), from
    one source (the live replica, the mirror holder, the swap partner; CheckFree+, Blagoev,
    Ersoy, Chen 2025, s. 3.2, copies the partner's blocks and optimizer state);
  - ``checkfree``: each of the two neighbours sends its transformer-block weights (CheckFree,
    same paper, s. 3.1: the rebuilt stage is their gradient-norm-weighted average, with fresh
    optimizer state).
* ``rollback`` (some lost worker cannot be rebuilt, e.g. two adjacent stages with no replica or
  mirror): the whole job restarts from the newest checkpoint after ``sim.restart_s``, as
  :class:`~spotpipe.sim.recovery.CheckpointRestart` (Kokolis et al. 2025, s. 4).
* ``stop`` (no checkpoint to roll back to, or ``ft.strategy = "none"``): the job ends; the
  ``recovery_started`` event carries the policy's reason.

Inputs the policy reads, as the runtime builds them (:mod:`spotpipe.runtime.control.recovery`): the job's
``[ft]`` section (``ft.strategy``), one stage per pipeline rank (``pipeline.stages``; a rank of an
interleaved schedule holds all of its chunks), mirrors when a strategy tried needs them
(:func:`spotpipe.ft.policy.uses_mirrors`: ``ft.strategy`` is ``auto`` or ``mirror``; the holder of stage ``s`` is :func:`~spotpipe.ft.policy.mirror_holder`, refreshed
after every ``ft.mirror_every``-th committed step, so ``step % ft.mirror_every`` steps behind),
the CheckFree+ swap schedule when ``ft.swap_edges`` or ``ft.strategy = "checkfree+"``, and the
newest checkpoint.

Simplifications: a replacement node is taken to be in the lost node's location (a spare in
another location is priced as if it were there); a mirror holder that was itself replaced is
taken to have refreshed its mirror already.

Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spotpipe.config import JobConfig
from spotpipe.cost import num_chunks
from spotpipe.ft.policy import RecoveryPlan, job_outcome, mirror_holder, plan_recovery, swap_schedule_on, uses_mirrors
from spotpipe.ft.strategies import REGISTRY
from spotpipe.ft.strategies.base import StageBytes as StageBytes
from spotpipe.model.partition import DTYPE_BYTES, block_params, model_shapes
from spotpipe.sim.decision import FailureContext, RecoveryDecision, Worker, WorkerRecovery
from spotpipe.network import Link, Network, uniform_link


def stage_bytes(cfg: JobConfig) -> StageBytes:
    """Per-rank state bytes from the model shapes (chunk ``c`` runs on rank ``c % stages``).

    Args:
        cfg: The job (``model``, ``pipeline.stages``, ``pipeline.schedule`` for the chunk count).

    Returns:
        Per rank, the parameter bytes of its chunks in ``model.dtype`` and their transformer-block part.
    """
    ranks = cfg.pipeline.stages
    shapes = model_shapes(cfg.model, num_chunks(cfg))
    per_block = block_params(cfg.model) * DTYPE_BYTES.get(cfg.model.dtype, 4)
    weights, blocks = [0] * ranks, [0] * ranks
    for shape in shapes:
        rank = shape.index % ranks
        weights[rank] += shape.param_bytes
        blocks[rank] += shape.num_layers * per_block
    return StageBytes(tuple(weights), tuple(blocks))


def plan_bytes(plan: RecoveryPlan, sizes: StageBytes) -> tuple[int, ...]:
    """Bytes each of ``plan.sources`` sends to the rebuilt worker, by the plan's strategy's rule.

    Args:
        plan: One plan of :func:`spotpipe.ft.policy.plan_recovery`.
        sizes: Per-rank state bytes (:func:`stage_bytes`).

    Returns:
        One byte count per source; empty when nothing moves (a rollback, a stop).
    """
    strategy = REGISTRY.get(plan.strategy)
    return () if strategy is None else strategy.source_bytes(plan, sizes)


def _link(network: Network, a: str, b: str) -> Link:
    """The link between two locations (same location or no matrix: the uniform link)."""
    if network.matrix is None or a == b:
        return network.local
    return network.matrix.link(a, b)


@dataclass(frozen=True)
class PlannedRecovery:
    """Recovery by :func:`spotpipe.ft.policy.plan_recovery`, priced on the simulated cluster.

    Attributes:
        network: The cluster's links (``None``: the uniform link of ``[network]``).
        name: ``sim.recovery`` value.
    """

    network: Network | None = None
    name: str = "policy"

    def plans(self, ctx: FailureContext) -> tuple[RecoveryPlan, ...]:
        """The shipped policy's plan for every lost worker of ``ctx``.

        Args:
            ctx: The failure (lost workers, step, newest checkpoint step, config).

        Returns:
            One :class:`RecoveryPlan` per lost worker, from :func:`spotpipe.ft.policy.plan_recovery`.
        """
        cfg = ctx.config
        ft, ranks = cfg.ft, cfg.pipeline.stages
        mirrors: dict[Worker, Worker] = {}
        lags: dict[Worker, int] = {}
        if uses_mirrors(ft) and ft.mirror_every > 0:
            for stage, replica in ctx.lost:
                holder = mirror_holder(stage, replica, ranks)
                if holder != (stage, replica):
                    mirrors[(stage, replica)] = holder
                    lags[(stage, replica)] = ctx.step % ft.mirror_every
        return plan_recovery(
            sorted(set(ctx.lost)), ranks, replicas=cfg.pipeline.replicas, strategy=ft,
            mirrors=mirrors, mirror_lag=lags, checkpoint_step=ctx.checkpoint_step,
            swap_edges=swap_schedule_on(ft),
        )

    def transfer(self, plan: RecoveryPlan, ctx: FailureContext, sizes: StageBytes) -> tuple[int, float]:
        """``(bytes, seconds)`` of one rebuilt worker's state transfer.

        Args:
            plan: The worker's plan (its ``sources`` send state).
            ctx: The failure (locations of the workers, config).
            sizes: State bytes per rank of the job.

        Returns:
            Total bytes sent to the rebuilt worker, and the seconds until the slowest source's send
            ends (sources send in parallel); ``(0, 0.0)`` when nothing moves.
        """
        cfg = ctx.config
        network = self.network or Network(0, uniform_link(cfg.network.latency_ms, cfg.network.bandwidth_gbps))
        amounts = plan_bytes(plan, sizes)
        if not amounts:
            return 0, 0.0
        ranks = cfg.pipeline.stages
        target = _location(ctx.locations, network, plan.stage, plan.replica, ranks)
        seconds = 0.0
        for (stage, replica), nbytes in zip(plan.sources, amounts):
            source = _location(ctx.locations, network, stage, replica, ranks)
            seconds = max(seconds, _link(network, source, target).send_s(nbytes))
        return sum(amounts), seconds

    def decide(self, ctx: FailureContext) -> RecoveryDecision:
        """Plan every lost worker; continue, roll back to the checkpoint, or stop."""
        plans = self.plans(ctx)
        outcome = job_outcome(plans)
        strategy = "/".join(sorted({p.strategy for p in plans}))  # as the runtime names a recovery
        if outcome == "stop":
            return RecoveryDecision(
                strategy=strategy, resume_step=ctx.step, restart_s=0.0, replace_lost=False, why=plans[0].why, stop=True,
                workers=tuple(WorkerRecovery(p.stage, p.replica, p.strategy, p.why) for p in plans),
            )
        if outcome == "rollback":
            resume = plans[0].checkpoint_step or 0
            return RecoveryDecision(
                strategy=strategy, resume_step=resume, restart_s=ctx.config.sim.restart_s, replace_lost=True,
                why=f"{plans[0].why}; restart after sim.restart_s, replaying {ctx.step - resume} committed steps",
                workers=tuple(WorkerRecovery(p.stage, p.replica, p.strategy, p.why) for p in plans),
            )
        sizes = stage_bytes(ctx.config)
        workers: list[WorkerRecovery] = []
        slowest = 0.0
        for p in plans:
            nbytes, seconds = self.transfer(p, ctx, sizes)
            slowest = max(slowest, seconds)
            workers.append(WorkerRecovery(p.stage, p.replica, p.strategy, p.why, nbytes, p.exact))
        moved = sum(w.bytes for w in workers)
        regroup = ctx.config.sim.regroup_s
        why = (
            "; ".join(p.why for p in plans)
            + f"; resume at step {ctx.step} without rollback after moving {moved} bytes ({slowest:.3g} s)"
            f" and regrouping (sim.regroup_s = {regroup:g} s)"
        )
        return RecoveryDecision(
            strategy=strategy, resume_step=ctx.step, restart_s=slowest + regroup, replace_lost=True, why=why,
            bytes=moved, workers=tuple(workers),
        )


def _location(locations: Sequence[str], network: Network, stage: int, replica: int, ranks: int) -> str:
    """Location of worker ``(stage, replica)``: from the failure context (slot ``replica x ranks +
    stage``), else the initial dense placement's node, else ``local``."""
    slot = replica * ranks + stage
    if slot < len(locations):
        return locations[slot]
    if slot < len(network.node_locations):
        return network.node_locations[slot]
    return "local"
