"""In-process convergence mode: every stage in one process, failures re-initialise a stage.

This is how the CheckFree authors ran their convergence experiments (Blagoev, Ersoy, Chen 2025,
section 5): all stages train in one process, and a failure wipes one stage's weights and
optimizer state (they are overwritten with NaN, so a recovery that reads the lost state shows up
at once), after which the stage is rebuilt by the same :mod:`spotpipe.ft.policy` decision and
the same :class:`~spotpipe.runtime.state.stage_state.StageState` operations the multi-process
runtime uses: each plan is carried out by its strategy's runtime half, looked up by name in
:data:`spotpipe.runtime.worker.strategies.REGISTRY` as the workers do
(:meth:`~spotpipe.runtime.worker.strategies.base.StateTransfer.install_in_process`), so this
module names no strategy. Every training step
is the job's lowered schedule played by the real pipeline executor, one executor per rank
(:class:`~spotpipe.runtime.inprocess.player.PipelineTrainer`), so the steps are those the workers
take. The multi-process mode stays the reference for mechanics and timing.

Time. Failures come from a :class:`~spotpipe.ft.faults.FaultPlan` (``ft.faults``, e.g.
``"10%/h"``) converted to per-step probabilities with a *stated* step time (``ft.rate_step_time_s``;
0 = the measured one), and the run keeps a simulated clock: every executed step costs one step
time, a failure wastes the fraction of the step it interrupted, a stall adds its duration, and
the interrupted step is replayed with the same data (atomic steps). A checkpoint rollback replays
every step since the checkpoint. Checkpoint writes and recovery transfers are taken as free on
the simulated clock (their measured seconds are in the events), which favours checkpointing.

State. The trainer holds one :class:`~spotpipe.runtime.state.stage_state.StageState` over every
chunk, and every copy this mode keeps or moves is a chunk's part of it in the one flat form
(:meth:`StageState.flat` of :meth:`StageState.view`), the form a worker checkpoints, mirrors and
sends: the in-memory checkpoint (:meth:`~spotpipe.runtime.inprocess.local.LocalTrainer.state_dict`),
the mirrors (refreshed every ``ft.mirror_every`` committed steps), a live replica's state (in one
process every replica of a stage is the same chunk: its state just before the loss). A CheckFree
rebuild is :meth:`StageState.install_checkfree` of the neighbours' :meth:`StageState.blocks_flat`,
as on the workers, so the omegas and the learning-rate factor pass through float32 there too.

CheckFree+ (``ft.strategy = "checkfree+"`` or ``ft.swap_edges``): the job's lowered schedule is
the swap schedule (:mod:`spotpipe.schedule.swap`), so odd microbatches take stages
``1, 0, 2, ..., S-1, S-2``; chunk 1 embeds them and chunk S-2 computes their loss with the
copies of the embedding and of the final norm and LM head, which in one process are the
originals themselves (see :mod:`spotpipe.runtime.inprocess.player`). A snapshot of each copy in
the form a worker sends it (:meth:`StageState.tied_flat` of chunk 0, resp. S-1) is refreshed
after every committed step. A lost edge stage gets its swap partner's blocks with their moments
(the ``"blocks"`` part view) and the snapshot of its copy: what the partner worker's whole state
holds (Blagoev, Ersoy, Chen 2025, section 3.2).

Events (JSONL, :mod:`spotpipe.events`, ``t`` on the simulated clock): ``run_start``, ``step``,
``eval``, ``checkpoint``, ``generation``, ``failure_confirmed``, ``recovery_started`` /
``recovery_finished`` (strategy, why, bytes, seconds), ``step_replayed``, ``run_end``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spotpipe import events as ev
from spotpipe.config import JobConfig
from spotpipe.faultspec import STALL
from spotpipe.ft.faults import FaultPlan
from spotpipe.ft.policy import (
    CHECKPOINT,
    RecoveryPlan,
    job_outcome,
    mirror_holder,
    plan_recovery,
    swap_schedule_on,
    uses_mirrors,
)
from spotpipe.ft.strategies import REGISTRY as STRATEGIES
from spotpipe.runtime.inprocess.player import PipelineTrainer
from spotpipe.runtime.state.optim import NonfiniteStep
from spotpipe.runtime.state.rules import RecoveryError
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.worker.strategies import transfer_for
from spotpipe.runtime.worker.strategies.base import nbytes


def swap_on(cfg: JobConfig) -> bool:
    """Whether the CheckFree+ swap schedule is on for this job.

    Args:
        cfg: The job (``[ft]``).

    Returns:
        True when the swap schedule is on.
    """
    return swap_schedule_on(cfg.ft)


@dataclass
class InProcessResult:
    """Outcome of :func:`run_inprocess`.

    Attributes:
        strategy: ``ft.strategy`` of the run.
        steps: Committed steps at the end.
        iterations: Executed steps, replays and rolled-back steps included.
        sim_seconds: Simulated wall time (see the module docstring).
        wall_seconds: Real seconds the run took here.
        step_time_s: Step time of the simulated clock and of the rate conversion.
        evals: ``(committed step, iterations, simulated seconds, val loss)`` per evaluation.
        failures: Workers lost.
        recoveries: Count per strategy used.
        lost_steps: Committed steps undone by checkpoint rollbacks.
        mirror_bytes: Host bytes one worker's mirror holds (0 without mirrors).
        target: Target validation loss, if any.
        target_at: The ``evals`` entry that first reached the target, if any.
        status: ``"finished"``, ``"target"`` (stopped at the target) or ``"failed"``.
        reason: Why a failed run stopped.
    """

    strategy: str
    steps: int = 0
    iterations: int = 0
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0
    step_time_s: float = 0.0
    evals: list[tuple[int, int, float, float]] = field(default_factory=list)
    failures: int = 0
    recoveries: dict[str, int] = field(default_factory=dict)
    lost_steps: int = 0
    mirror_bytes: int = 0
    target: float | None = None
    target_at: tuple[int, int, float, float] | None = None
    status: str = "finished"
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class HostCopy:
    """A mirror: one stage's state in the flat form as of a committed step, as the worker of the
    previous stage keeps it in host memory (checkpointless peer replication, SageMaker HyperPod 2025).

    Attributes:
        flat: :meth:`~spotpipe.runtime.inprocess.local.LocalTrainer.chunk_state` of the stage
            (float32, CPU; its own memory, so the live stage moving on leaves it as it was).
        step: Committed steps the copy has seen.
    """

    flat: torch.Tensor
    step: int

    @property
    def nbytes(self) -> int:
        """Host bytes held: weights, the two AdamW moments and the per-parameter step counts."""
        return nbytes(self.flat)


class _Run:
    """State of one in-process run (trainer, checkpoint, mirrors, copies, clock, log).

    Args:
        cfg: The job.
        token_file: Tokens to train on.
        log: Where events go (``None``: nowhere).
        step_time_s: Seconds one step costs on the simulated clock (``None``: the first measured).
    """

    def __init__(self, cfg: JobConfig, token_file: Any, log: ev.EventLog | None, step_time_s: float | None) -> None:
        self.cfg = cfg
        self.swap = swap_on(cfg)
        self.trainer = PipelineTrainer(cfg, token_file)
        self.S = self.trainer.num_chunks
        self.replicas = cfg.pipeline.replicas
        self.strategy = cfg.ft.strategy
        self.log = log
        self.sim = 0.0
        self.step_time_s = step_time_s
        self.generation = 0
        self.checkpoint: dict[str, Any] | None = None
        self.checkpoint_step: int | None = None
        self.use_mirrors = uses_mirrors(self.strategy)
        self.mirrors: dict[int, HostCopy] = {}  # stage -> its mirror
        self.copies: dict[int, torch.Tensor] = {}  # edge chunk -> tied_flat of its in-sync copy (CheckFree+)
        self.last_strategies: list[str] = []

    # -- bookkeeping -----------------------------------------------------------------------------

    def emit(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.write(event, t=self.sim, **fields)

    def after_commit(self) -> None:
        """Refresh checkpoint, mirrors and edge copies after a committed step (or a rollback)."""
        tr, step = self.trainer, self.trainer.step
        k = self.cfg.train.checkpoint_every
        if k > 0 and step % k == 0 and step != self.checkpoint_step:
            t0 = time.perf_counter()
            self.checkpoint, self.checkpoint_step = tr.state_dict(), step
            self.emit(ev.CHECKPOINT, step=step, path="memory", seconds=time.perf_counter() - t0)
        if self.use_mirrors and step % self.cfg.ft.mirror_every == 0:
            self.mirrors = {s: HostCopy(tr.chunk_state(s), step) for s in range(self.S)}
        if self.swap:
            self.refresh_copies()

    def refresh_copies(self) -> None:
        """Snapshot the CheckFree+ copies of the embedding (chunk 0's) and of the final norm and
        head (chunk S-1's) as their holders (chunks 1 and S-2) would send them."""
        state = self.trainer.state
        self.copies = {s: state.view([s]).tied_flat() for s in (0, self.S - 1)}

    # -- failure and recovery --------------------------------------------------------------------

    def wipe(self, stage: int) -> None:
        """Lose a stage: NaN weights, no optimizer state (a bug that reads them shows up)."""
        state = self.trainer.state
        with torch.no_grad():
            for p in state.chunks[stage].parameters():
                p.fill_(float("nan"))
        state.optimizer.clear(stage)
        state.lr_scale[stage] = float("nan")

    def fail(self, lost: list[tuple[int, int]], omega: Callable[[list[float], int], float]) -> str:
        """Handle one failure event; returns the job outcome ("continue", "rollback", "stop")."""
        tr = self.trainer
        self.generation += 1
        mirrors, lags = {}, {}
        for s, copy in self.mirrors.items():
            for r in range(self.replicas):
                mirrors[(s, r)] = mirror_holder(s, r, self.S)
                lags[(s, r)] = tr.step - copy.step
        plans = plan_recovery(lost, self.S, replicas=self.replicas, strategy=self.strategy, mirrors=mirrors,
                              mirror_lag=lags, checkpoint_step=self.checkpoint_step, swap_edges=self.swap)
        outcome = job_outcome(plans)
        self.last_strategies = [p.strategy for p in plans]
        # In one process every replica of a stage is the same chunk: a source that is a replica of
        # the lost stage itself is read as that chunk was before the wipe.
        before = {p.stage: tr.chunk_state(p.stage) for p in plans if any(src[0] == p.stage for src in p.sources)}
        view = _RunView(self, tr.last_grad_norms(), before, omega)
        lost_stages = sorted({s for s, r in lost if not any((s, o) not in lost for o in range(self.replicas))})
        for s in lost_stages:
            self.wipe(s)
        self.emit(ev.GENERATION, generation=self.generation, workers=self.S * self.replicas - len(lost), reason="failure")
        for plan in sorted(plans, key=_exact_first):
            self.emit(ev.RECOVERY_STARTED, stage=plan.stage, replica=plan.replica, strategy=plan.strategy, why=plan.why)
            if outcome != "continue":
                continue
            t0 = time.perf_counter()
            moved = self.apply(plan, view)
            self.emit(ev.RECOVERY_FINISHED, stage=plan.stage, replica=plan.replica, strategy=plan.strategy,
                      bytes=moved, seconds=time.perf_counter() - t0)
        if outcome == "rollback":
            assert self.checkpoint is not None and self.checkpoint_step is not None
            t0 = time.perf_counter()
            undone = tr.step - self.checkpoint_step
            tr.load_state_dict(self.checkpoint)
            for plan in plans:
                self.emit(ev.RECOVERY_FINISHED, stage=plan.stage, replica=plan.replica, strategy=CHECKPOINT,
                          bytes=nbytes(self.checkpoint["chunks"][plan.stage]), seconds=time.perf_counter() - t0,
                          steps_undone=undone)
            self.after_commit()
            return outcome
        if outcome == "continue":
            for s in lost_stages:
                self.check_finite(s)
            if self.swap:  # a lost holder of an edge copy gets it back from the (exact) original
                self.refresh_copies()
        return outcome

    def apply(self, plan: RecoveryPlan, view: _RunView) -> int:
        """Rebuild one stage according to ``plan`` by its strategy's runtime half.

        Args:
            plan: The stage's recovery plan (a strategy that rebuilds from peers).
            view: This run as the strategy sees it (:class:`_RunView`).

        Returns:
            The bytes read from the plan's sources.

        Raises:
            KeyError: If no runtime half is registered for ``plan.strategy``.
        """
        return transfer_for(plan.strategy).install_in_process(view, plan)

    def check_finite(self, stage: int) -> None:
        for name, p in self.trainer.chunks[stage].named_parameters():
            if not torch.isfinite(p).all():
                raise RecoveryError(f"stage {stage} still has non-finite {name} after recovery; refusing to train on it")


def _exact_first(plan: RecoveryPlan) -> tuple[bool, tuple[int, int]]:
    """Order of rebuilding: plans of exact strategies first (replica, mirror: an exact rebuild may
    serve as a later plan's source, as in :func:`spotpipe.ft.policy.plan_recovery`), then by worker."""
    rules = STRATEGIES.get(plan.strategy)  # None for stop
    return (rules is None or not rules.exact, plan.worker)


class _RunView:
    """A run as a strategy's :meth:`install_in_process` sees it
    (:class:`~spotpipe.runtime.worker.strategies.base.InProcessRun`).

    Args:
        run: The run.
        norms: Per-chunk gradient norms of the last step, before clipping.
        before: Chunk -> its flat state before the wipe, for the chunks a plan reads as a live replica.
        omega: CheckFree's omega from ``norms`` and a chunk.
    """

    def __init__(self, run: _Run, norms: list[float], before: dict[int, torch.Tensor],
                 omega: Callable[[list[float], int], float]) -> None:
        self._run = run
        self._norms = norms
        self._before = before
        self._omega = omega

    @property
    def state(self) -> StageState:
        """The trainer's stage state over every chunk."""
        return self._run.trainer.state

    def live_copy(self, stage: int) -> torch.Tensor:
        """Chunk ``stage``'s flat state before the wipe (a chunk that was not wiped: as it is now)."""
        return self._before[stage] if stage in self._before else self._run.trainer.chunk_state(stage)

    def mirror(self, stage: int) -> torch.Tensor:
        """The mirror of ``stage`` (refreshed every ``ft.mirror_every`` committed steps).

        Raises:
            KeyError: If the run keeps no mirror of ``stage``.
        """
        return self._run.mirrors[stage].flat

    def tied_copy(self, stage: int) -> torch.Tensor:
        """The snapshot of edge chunk ``stage``'s in-sync copy (refreshed after every committed step).

        Raises:
            KeyError: If ``stage`` is not an edge chunk or the swap schedule is off.
        """
        return self._run.copies[stage]

    def omega(self, stage: int) -> float:
        """CheckFree's omega of chunk ``stage`` from the last step's gradient norms."""
        return self._omega(self._norms, stage)

    def set_lr_scale(self, stage: int, scale: float) -> None:
        """Chunk ``stage``'s blocks train with ``scale`` x the learning rate from now on."""
        self._run.trainer.set_lr_scale(stage, scale)


def omega_preclip(norms: list[float], stage: int) -> float:
    """CheckFree omega: the stage's last gradient norm before clipping (spotpipe's choice).

    Args:
        norms: Each chunk's last gradient norm, before clipping.
        stage: The chunk.

    Returns:
        ``norms[stage]``.
    """
    return norms[stage]


def omega_stage_clipped(max_norm: float) -> Callable[[list[float], int], float]:
    """Omega as ``min(norm, max_norm)``: what per-stage clipping would leave (for comparison).

    Args:
        max_norm: ``train.grad_clip``; <= 0 leaves the norm as it is.

    Returns:
        A function ``(norms, stage) -> omega``, as :func:`omega_preclip`.
    """
    return lambda norms, stage: min(norms[stage], max_norm) if max_norm > 0 else norms[stage]


def run_inprocess(
    cfg: JobConfig,
    token_file: Any,
    *,
    events: str | Path | None = None,
    target_loss: float | None = None,
    stop_at_target: bool = False,
    max_iterations: int | None = None,
    omega: Callable[[list[float], int], float] = omega_preclip,
    progress: Callable[[str], None] | None = None,
) -> InProcessResult:
    """Train ``cfg`` in one process with the failures of ``cfg.ft.faults`` and recovery
    ``cfg.ft.strategy``; evaluate every ``train.eval_every`` committed steps.

    Args:
        cfg: The job; ``train.checkpoint_every`` is K for checkpoint rollbacks.
        token_file: Tokens to train on.
        events: Where to write the JSONL event log (``None``: no log).
        target_loss: Validation loss whose first crossing is reported.
        stop_at_target: End the run at the first evaluation at or below ``target_loss``.
        max_iterations: Give up after this many executed steps (default ``4 x train.steps``).
        omega: CheckFree's omega from the per-stage norms (default :func:`omega_preclip`).
        progress: Called with one line per recovery and evaluation.

    Returns:
        The :class:`InProcessResult`. A run that the policy stops has ``status = "failed"``.
    """
    t_start = time.perf_counter()
    log = ev.EventLog(events, clock=lambda: 0.0) if events is not None else None
    step_time = cfg.ft.rate_step_time_s or None
    run = _Run(cfg, token_file, log, step_time)
    res = InProcessResult(strategy=cfg.ft.strategy, target=target_loss)
    max_iterations = 4 * cfg.train.steps if max_iterations is None else max_iterations
    plan = FaultPlan.from_texts(cfg.ft.faults, run.S, cfg.pipeline.replicas, total_steps=max_iterations,
                                seed=cfg.train.seed, step_time_s=step_time)
    say = progress or (lambda line: None)
    run.emit(ev.RUN_START, name=cfg.run.name or "inprocess", config=dataclasses.asdict(cfg),
             world=run.S * run.replicas, mode="inprocess")
    tr = run.trainer
    run.after_commit()  # the step-0 checkpoint, mirrors and copies
    eval_every = cfg.train.eval_every or cfg.train.steps

    def evaluate() -> bool:
        loss = tr.evaluate()
        entry = (tr.step, res.iterations, run.sim, loss)
        res.evals.append(entry)
        run.emit(ev.EVAL, step=tr.step, val_loss=loss, iteration=res.iterations)
        say(f"step {tr.step:5d}  iter {res.iterations:5d}  sim {run.sim / 3600:7.2f} h  val {loss:.4f}")
        if target_loss is not None and res.target_at is None and loss <= target_loss:
            res.target_at = entry
            return stop_at_target
        return False

    try:
        while tr.step < cfg.train.steps and res.iterations < max_iterations:
            known = run.step_time_s is not None or not plan.needs_step_time
            faults = plan.faults_at(res.iterations) if known else ()  # rates start once a step is timed
            kills = [f for f in faults if f.kind != STALL]
            for f in faults:
                if f.kind == STALL:
                    run.sim += f.stall_s
            if kills:
                res.iterations += 1
                run.sim += min(f.at_fraction for f in kills) * (run.step_time_s or 0.0)
                lost = sorted({f.worker for f in kills})
                res.failures += len(lost)
                for f in kills:
                    run.emit(ev.FAILURE_CONFIRMED, worker=f.replica * run.S + f.stage, stage=f.stage,
                             replica=f.replica, reason=f"injected fault {f.spec!r} during step {tr.step}")
                before = tr.step
                outcome = run.fail(lost, omega)
                for strategy in run.last_strategies:
                    res.recoveries[strategy] = res.recoveries.get(strategy, 0) + 1
                if outcome == "stop":
                    res.status = "failed"
                    res.reason = f"stages {[s for s, _ in lost]} lost at step {before} and the policy stopped the job"
                    say(res.reason)
                    break
                if outcome == "rollback":
                    res.lost_steps += before - tr.step
                say(f"iter {res.iterations}: lost {lost} at step {before}: {outcome}, now at step {tr.step}")
                run.emit(ev.STEP_REPLAYED, step=tr.step, generation=run.generation)
                continue
            t0 = time.perf_counter()
            try:
                result = tr.train_step()
            except NonfiniteStep as exc:  # train.nonfinite = "stop": the update was not applied
                res.status, res.reason = "failed", str(exc)
                break
            measured = time.perf_counter() - t0
            if run.step_time_s is None:
                run.step_time_s = measured
                plan = plan.with_step_time(measured)
            res.iterations += 1
            run.sim += run.step_time_s
            run.emit(ev.STEP, step=result.step, loss=result.loss, tokens=result.tokens, step_time=run.step_time_s,
                     wall=measured, sampler=result.sampler_state, lr=result.lr, generation=run.generation,
                     grad_norm=result.grad_norm, stage_grad_norms=tr.last_grad_norms(), iteration=res.iterations)
            if not math.isfinite(result.loss):
                res.status, res.reason = "failed", f"loss became {result.loss} at step {result.step}"
                break
            run.after_commit()
            if tr.step % eval_every == 0 or tr.step == cfg.train.steps:
                if evaluate():
                    res.status = "target"
                    break
    finally:
        res.steps, res.sim_seconds = tr.step, run.sim
        res.step_time_s = run.step_time_s or 0.0
        res.mirror_bytes = max((m.nbytes for m in run.mirrors.values()), default=0)
        res.wall_seconds = time.perf_counter() - t_start
        run.emit(ev.RUN_END, steps=tr.step, wall=res.sim_seconds,
                 status="failed" if res.status == "failed" else "finished")
        if log is not None:
            log.close()
    return res


__all__ = ["InProcessResult", "omega_preclip", "omega_stage_clipped", "run_inprocess", "swap_on"]
