"""In-process convergence mode: every stage in one process, failures re-initialise a stage.

This is how the CheckFree authors ran their convergence experiments (Blagoev, Ersoy, Chen 2025,
section 5): all stages train in one process on :class:`~spotpipe.runtime.inprocess.local.LocalTrainer`,
and a failure wipes one stage's weights and optimizer state (they are overwritten with NaN, so a
recovery that reads the lost state shows up at once), after which the stage is rebuilt by the
same :mod:`spotpipe.ft.policy` decision and :mod:`spotpipe.runtime.state.rules` functions the
multi-process runtime uses. The multi-process mode stays the reference for mechanics and timing.

Time. Failures come from a :class:`~spotpipe.ft.faults.FaultPlan` (``ft.faults``, e.g.
``"10%/h"``) converted to per-step probabilities with a *stated* step time (``ft.rate_step_time_s``;
0 = the measured one), and the run keeps a simulated clock: every executed step costs one step
time, a failure wastes the fraction of the step it interrupted, a stall adds its duration, and
the interrupted step is replayed with the same data (atomic steps). A checkpoint rollback replays
every step since the checkpoint. Checkpoint writes and recovery transfers are taken as free on
the simulated clock (their measured seconds are in the events), which favours checkpointing.

CheckFree+ (``ft.strategy = "checkfree+"`` or ``ft.swap_edges``): :class:`SwapTrainer` sends odd
microbatches through stages ``1, 0, 2, ..., S-1, S-2``. Chunk 1 then embeds with its copy of the
embedding and chunk S-2 ends with its copy of the final norm and LM head. In one process the
copies are kept identical to the originals by construction (the forward uses the original
module, which is what an in-sync copy computes; gradients of both uses land in one tensor, which
is the summed gradient an all-reduce between the two holders gives), and a named-state snapshot
of each copy is refreshed after every committed step: that snapshot is what a lost edge stage
is rebuilt from.

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
    CHECKFREE,
    CHECKFREE_PLUS,
    CHECKPOINT,
    MIRROR,
    REPLICA,
    RecoveryPlan,
    job_outcome,
    mirror_holder,
    plan_recovery,
    swap_schedule_on,
)
from spotpipe.runtime.state.optim import NonfiniteStep
from spotpipe.runtime.state.rules import (
    Mirror,
    NamedState,
    RecoveryError,
    checkfree_plus_copy,
    checkfree_rebuild,
    complete_state,
    copy_from_mirror,
    copy_from_replica,
    export_state,
    import_state,
    select,
    state_nbytes,
)
from spotpipe.model.transformer import lm_loss
from spotpipe.runtime.inprocess.local import LocalTrainer
from spotpipe.schedule.swap import swap_permutation

EMBED_KEYS = ("embed.",)
HEAD_KEYS = ("norm.", "head.")


def swap_on(cfg: JobConfig) -> bool:
    """Whether the CheckFree+ swap schedule is on for this job."""
    return swap_schedule_on(cfg.ft)


class SwapTrainer(LocalTrainer):
    """:class:`LocalTrainer` whose odd microbatches take the CheckFree+ swapped path.

    Only the forward routing differs; gradient accumulation, clipping and the optimizer step are
    LocalTrainer's. Evaluation uses the normal path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = swap_permutation(self.num_chunks)
        self._counting = False
        self._calls = 0

    def compute_gradients(self, step_ids: Any) -> list[float]:
        self._counting, self._calls = True, 0
        try:
            return super().compute_gradients(step_ids)
        finally:
            self._counting = False

    def forward_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self._counting:
            return super().forward_loss(tokens, targets)
        microbatch = self._calls % self.cfg.pipeline.microbatches  # LocalTrainer loops replicas, then microbatches
        self._calls += 1
        if microbatch % 2 == 0:
            return super().forward_loss(tokens, targets)
        first, last = self.chunks[0], self.chunks[-1]
        assert first.embed is not None and last.norm is not None and last.head is not None
        x = first.embed(tokens)  # chunk 1's in-sync copy of the embedding
        for c in self.path:
            chunk = self.chunks[c]
            cos, sin = chunk.rotary.tables(x.shape[1], x.device)
            for block in chunk.blocks:
                x = block(x, cos, sin)
        return lm_loss(last.head(last.norm(x)), targets)  # chunk S-2's copy of norm + head


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


class _Run:
    """State of one in-process run (trainer, checkpoint, mirrors, copies, clock, log)."""

    def __init__(self, cfg: JobConfig, token_file: Any, log: ev.EventLog | None, step_time_s: float | None) -> None:
        self.cfg = cfg
        self.swap = swap_on(cfg)
        self.trainer: LocalTrainer = (SwapTrainer if self.swap else LocalTrainer)(cfg, token_file)
        self.S = self.trainer.num_chunks
        self.replicas = cfg.pipeline.replicas
        self.strategy = cfg.ft.strategy
        self.log = log
        self.sim = 0.0
        self.step_time_s = step_time_s
        self.generation = 0
        self.checkpoint: dict[str, Any] | None = None
        self.checkpoint_step: int | None = None
        use_mirrors = self.strategy in ("auto", MIRROR)
        self.mirrors: list[Mirror] | None = [Mirror(s) for s in range(self.S)] if use_mirrors else None
        self.copies: dict[str, NamedState] = {}
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
        if self.mirrors is not None and step % self.cfg.ft.mirror_every == 0:
            for s, mirror in enumerate(self.mirrors):
                mirror.capture(tr.chunks[s], tr.optimizers[s], step, meta={"lr_scale": tr.lr_scale[s]})
        if self.swap:
            self.copies["embed"] = select(export_state(tr.chunks[0], tr.optimizers[0]), EMBED_KEYS)
            self.copies["head"] = select(export_state(tr.chunks[-1], tr.optimizers[-1]), HEAD_KEYS)

    # -- failure and recovery --------------------------------------------------------------------

    def wipe(self, stage: int) -> None:
        """Lose a stage: NaN weights, no optimizer state (a bug that reads them shows up)."""
        chunk, opt = self.trainer.chunks[stage], self.trainer.optimizers[stage]
        with torch.no_grad():
            for p in chunk.parameters():
                p.fill_(float("nan"))
                opt.state.pop(p, None)
        self.trainer.lr_scale[stage] = float("nan")

    def fail(self, lost: list[tuple[int, int]], omega: Callable[[list[float], int], float]) -> str:
        """Handle one failure event; returns the job outcome ("continue", "rollback", "stop")."""
        tr = self.trainer
        self.generation += 1
        mirrors, lags = {}, {}
        if self.mirrors is not None:
            for s in range(self.S):
                if self.mirrors[s].ready:
                    for r in range(self.replicas):
                        mirrors[(s, r)] = mirror_holder(s, r, self.S)
                        lags[(s, r)] = self.mirrors[s].lag(tr.step)
        plans = plan_recovery(lost, self.S, replicas=self.replicas, strategy=self.strategy, mirrors=mirrors,
                              mirror_lag=lags, checkpoint_step=self.checkpoint_step, swap_edges=self.swap)
        outcome = job_outcome(plans)
        self.last_strategies = [p.strategy for p in plans]
        norms = tr.last_grad_norms()
        # In one process every replica of a stage is the same chunk: a live replica's state is
        # the chunk's state before the wipe.
        replica_states = {p.stage: export_state(tr.chunks[p.stage], tr.optimizers[p.stage])
                          for p in plans if p.strategy == REPLICA}
        lost_stages = sorted({s for s, r in lost if not any((s, o) not in lost for o in range(self.replicas))})
        for s in lost_stages:
            self.wipe(s)
        self.emit(ev.GENERATION, generation=self.generation, workers=self.S * self.replicas - len(lost), reason="failure")
        for plan in sorted(plans, key=lambda p: (p.strategy not in (REPLICA, MIRROR), p.worker)):
            self.emit(ev.RECOVERY_STARTED, stage=plan.stage, replica=plan.replica, strategy=plan.strategy, why=plan.why)
            if outcome != "continue":
                continue
            t0 = time.perf_counter()
            nbytes = self.apply(plan, norms, replica_states, omega)
            self.emit(ev.RECOVERY_FINISHED, stage=plan.stage, replica=plan.replica, strategy=plan.strategy,
                      bytes=nbytes, seconds=time.perf_counter() - t0)
        if outcome == "rollback":
            assert self.checkpoint is not None and self.checkpoint_step is not None
            t0 = time.perf_counter()
            undone = tr.step - self.checkpoint_step
            tr.load_state_dict(self.checkpoint)
            for plan in plans:
                self.emit(ev.RECOVERY_FINISHED, stage=plan.stage, replica=plan.replica, strategy=CHECKPOINT,
                          bytes=state_nbytes(self.checkpoint["chunks"][plan.stage]), seconds=time.perf_counter() - t0,
                          steps_undone=undone)
            self.after_commit()
            return outcome
        if outcome == "continue":
            for s in lost_stages:
                self.check_finite(s)
            if self.swap:  # a lost holder of an edge copy gets it back from the (exact) original
                self.copies["embed"] = select(export_state(tr.chunks[0], tr.optimizers[0]), EMBED_KEYS)
                self.copies["head"] = select(export_state(tr.chunks[-1], tr.optimizers[-1]), HEAD_KEYS)
        return outcome

    def apply(self, plan: RecoveryPlan, norms: list[float], replica_states: dict[int, NamedState],
              omega: Callable[[list[float], int], float]) -> int:
        """Rebuild one stage according to ``plan``; returns the bytes read from peers."""
        tr, s = self.trainer, plan.stage
        chunk, opt = tr.chunks[s], tr.optimizers[s]
        template = chunk.state_dict()
        scale = 1.0
        if plan.strategy == REPLICA:
            state = copy_from_replica(replica_states[s])
            scale = 1.0 if math.isnan(tr.lr_scale[s]) else tr.lr_scale[s]
        elif plan.strategy == MIRROR:
            assert self.mirrors is not None
            state = copy_from_mirror(self.mirrors[s])
            scale = float(state.get("meta", {}).get("lr_scale", 1.0))
        elif plan.strategy == CHECKFREE:
            prev, nxt = plan.sources[0][0], plan.sources[1][0]
            blocks = checkfree_rebuild(tr.chunks[prev].state_dict(), tr.chunks[nxt].state_dict(),
                                       omega(norms, prev), omega(norms, nxt))
            state = {"model": blocks, "optim": {}}
            scale = plan.lr_scale
        elif plan.strategy == CHECKFREE_PLUS:
            partner = plan.sources[0][0]
            extras = self.copies["embed"] if s == 0 else self.copies["head"]
            state = checkfree_plus_copy(export_state(tr.chunks[partner], tr.optimizers[partner]), extras)
            scale = plan.lr_scale
        else:  # pragma: no cover - checkpoint and stop are handled by the caller
            raise AssertionError(plan.strategy)
        complete_state(template, state)
        import_state(chunk, opt, state)
        tr.set_lr_scale(s, scale)
        return state_nbytes(state)

    def check_finite(self, stage: int) -> None:
        for name, p in self.trainer.chunks[stage].named_parameters():
            if not torch.isfinite(p).all():
                raise RecoveryError(f"stage {stage} still has non-finite {name} after recovery; refusing to train on it")


def omega_preclip(norms: list[float], stage: int) -> float:
    """CheckFree omega: the stage's last gradient norm before clipping (spotpipe's choice)."""
    return norms[stage]


def omega_stage_clipped(max_norm: float) -> Callable[[list[float], int], float]:
    """Omega as ``min(norm, max_norm)``: what per-stage clipping would leave (for comparison)."""
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
        res.mirror_bytes = max((m.nbytes for m in run.mirrors), default=0) if run.mirrors else 0
        res.wall_seconds = time.perf_counter() - t_start
        run.emit(ev.RUN_END, steps=tr.step, wall=res.sim_seconds,
                 status="failed" if res.status == "failed" else "finished")
        if log is not None:
            log.close()
    return res


__all__ = ["InProcessResult", "SwapTrainer", "omega_preclip", "omega_stage_clipped", "run_inprocess", "swap_on"]
