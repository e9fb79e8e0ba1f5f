"""A worker process: one (stage, replica) role of a pipeline-parallel job.

Started by the controller (``python -m spotpipe.runtime.worker.worker --join HOST:PORT``) or by hand on
another machine (``spotpipe worker --join HOST:PORT``). It joins with the job token, gets a role
and the job's config, builds its model chunks, enters the current generation (its process
groups), and trains step by step until the job ends.

One step is atomic (DESIGN.md, "Atomic steps"):

1. **Snapshot**: the sampler state before the step (the data of the step is a pure function of
   it, so a replay reads the same samples).
2. **Compute** (may fail): the executor plays the schedule; the replica group all-reduces the
   gradients (SUM); under CheckFree+ the holders of the embedding (chunks 0, 1) and of the final
   norm and head (S-2, S-1) add each other's gradient of them (:mod:`spotpipe.runtime.worker.tied`);
   the world group all-reduces ``[squared grad norm, loss sum, microbatches, stop flag]``. That
   world all-reduce is the barrier: when it returns, every worker has finished its forward and
   backward of the step. With a replaying mirror the worker then sends its gradient to the
   mirror holder (peer to peer, :mod:`spotpipe.runtime.worker.mirror`).
3. **Decide** (:meth:`Worker.decide`): an all-reduce is not atomic across ranks (with a dead
   member some ranks may complete it while others fail), so before anyone touches its weights
   the workers agree through the store: the last of the world to count itself ready sets
   ``gen/<g>/step/<k>/decide = commit``; a worker that sees the generation aborted first sets
   ``abort``; compare_set lets only the first writer win. Either every survivor applies step k
   or none does, and no worker needs a pre-step copy of its weights.
4. **Apply** (local, cannot fail on a peer): clip with the global norm, set the scheduled learning
   rate, step the optimizers, keep the mirror current, save a checkpoint if one is due.
5. **Report**: the step report goes to the store; the last worker to report sets the commit key,
   and the controller writes the ``step`` event.

A communication failure in phases 2-3 raises :class:`~spotpipe.runtime.comm.transport.CommError`.
:meth:`RecoveryAgent.abort_step` then aborts the generation (so the peers wake at once), drops the
step's activations and gradients and restores the sampler snapshot; :meth:`RecoveryAgent.on_failure`
tells the controller where it stands, waits for the next generation, rebuilds the groups, does
its part of the recovery (:meth:`RecoveryAgent.recover`, :mod:`spotpipe.runtime.worker.strategies`) and returns
the step to replay, with the same data. ``ft.strategy = none`` keeps the old behaviour: the
error ends the worker and the job. A replacement (a new process, or a warm spare that was handed
the role) enters the new generation and receives its state the same way.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spotpipe.config import JobConfig, config_from_mapping
from spotpipe.errors import SpotpipeError
from spotpipe.ft.policy import swap_schedule_on
from spotpipe.runtime import protocol
from spotpipe.runtime.state.checkpoint import checkpoint_dir, load_state, rank_file_name, save_state
from spotpipe.runtime.pipeline.executor import Executor, compile_rank, stage_peers
from spotpipe.runtime.comm.groups import Generation, GenerationCancelled, GenerationPlan, release_retired
from spotpipe.runtime.devices import worker_hardware
from spotpipe.runtime.control.job import checkpoint_due, eval_due
from spotpipe.runtime.state.optim import clip_coefficient, lr_at, nonfinite_reason, nonfinite_step_error
from spotpipe.runtime.state.pick import build_chunk_optimizer
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.worker.heartbeat import ControllerLost, Heartbeat
from spotpipe.runtime.worker.phase_fault import PhaseFault
from spotpipe.runtime.pipeline.stage_runner import StageRunner
from spotpipe.runtime.pipeline.meter import SavedTensorMeter, step_memory_report
from spotpipe.runtime.worker.tied import flat_ranges, sum_tied_gradients
from spotpipe.runtime.comm.transport import CommError, GenerationAborted
from spotpipe.runtime.worker.mirror_link import MirrorLink
from spotpipe.runtime.worker.nodes import NodeRole
from spotpipe.runtime.worker.recovery import RecoveryAgent
from spotpipe.runtime.worker.reshape import Parked
from spotpipe.schedule.nodepaths import NodePlan
from spotpipe.schedule.build import job_schedule

DECIDE_POLL_MIN_S = 0.0002
DECIDE_POLL_MAX_S = 0.004
"""How often a worker waiting for a step's commit decision looks again (doubling from the first to
the second): a worker that arrives last decides at once, one that waits costs the store and the
busy workers on its cores little."""
EXIT_ERROR = 3
EXIT_PARKED = 4  # the worker left a reshaped job's generations: its process waits as a standby (entry.py)


class Worker:
    """State and main loop of one worker.

    Args:
        store: Client of the controller's store.
        grant: The role the controller granted.
        listen_host: Address peers reach this worker on.
        controller: The controller's ``HOST:PORT`` (named when it is lost).
    """

    def __init__(self, store: Any, grant: protocol.Grant, listen_host: str, controller: str = "") -> None:
        self.store = store
        self.grant = grant
        self.id = grant.worker
        self.stage = grant.stage  # pipeline rank
        self.replica = grant.replica
        self.listen_host = listen_host
        self.cfg: JobConfig = config_from_mapping(tomllib.loads(grant.info["config"]), where="job config").validate()
        self.run_dir = Path(grant.info["run_dir"])
        self.name = (f"worker {self.id} (node {self.stage})" if self.cfg.pipeline.stage_nodes
                     else f"worker {self.id} (stage {self.stage}, replica {self.replica})")
        self.lost_controller = ControllerLost(self.name, controller or "an unknown address")
        self.stop_requested = False
        self.generation: Generation | None = None
        self.heartbeat: Heartbeat | None = None
        self.start_step = 0
        self.last_grad_norm = float("nan")  # this rank's pre-clip gradient norm of the last step (CheckFree's omega)
        self.num_stages = self.cfg.pipeline.stages
        self.mirror_link: MirrorLink | None = None  # set up in setup()
        self.recovery = RecoveryAgent(self)
        self.fault = PhaseFault.from_grant(grant.info, store, self.id, self.cfg.pipeline.microbatches)
        self.job = self.cfg  # the configured job; self.cfg is the shape this worker plays (ft.elastic reshapes it)
        M = self.cfg.pipeline.microbatches
        self.deal: Sequence[int] = range(self.replica * M, (self.replica + 1) * M)  # this replica's microbatches of the global batch

    # ------------------------------------------------------------------------------------------
    # Setup

    def setup(self) -> None:
        """Build chunks, optimizers, gradient buffer, data and schedule; load a checkpoint."""
        from spotpipe.data.sampler import SequenceSampler
        from spotpipe.model.stages import build_stage

        cfg, p = self.cfg, self.cfg.pipeline
        threads = int(self.grant.info.get("threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        env = os.environ.get(protocol.LOCAL_INDEX_ENV) or os.environ.get("LOCAL_RANK")
        index = int(env) if env and env.isdigit() else int(self.grant.info.get("local_index", 0))
        self.backend, self.device = worker_hardware(cfg, index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.swap = swap_schedule_on(cfg.ft)
        node_plan = self.grant.info.get("node_plan")
        self.nodes: NodeRole | None = None
        if node_plan:  # SkipPipe: one schedule per kind of iteration, full paths to evaluate
            self._use_node_plan(node_plan)
            assert self.nodes is not None
            self.microbatches, self.replicas = self.nodes.microbatches, 1
        else:
            self.schedule = job_schedule(cfg)
            self.eval_schedule = job_schedule(cfg, swap=False) if self.swap else self.schedule
            self.microbatches, self.replicas = p.microbatches, p.replicas
        self.global_microbatches = self.replicas * self.microbatches  # of a step, every shape alike (ft.elastic reshapes)
        if self.backend == "nccl":
            from spotpipe.schedule.validate import check_message_order

            # NCCL ignores tags and matches messages by order: both ends must agree on it.
            problems = check_message_order(self.schedule)
            if problems:
                raise SpotpipeError(f"schedule {cfg.pipeline.schedule} cannot run on NCCL: {problems[0]}; use run.backend=gloo")
        self.my_stages = self.schedule.stages_of_rank(self.stage)
        self.num_chunks = self.schedule.num_stages
        if self.nodes is not None:
            chunks = self.nodes.build_chunks(self.device)
        else:
            chunks = {s: build_stage(cfg.model, cfg.train.seed, s, self.num_chunks, device=self.device, edge_copies=self.swap)
                      for s in self.my_stages}
        self.meter = SavedTensorMeter()
        self._hold(StageState(chunks, build_chunk_optimizer(chunks, cfg.train, cfg.pipeline.offload == "optimizer")))
        self.token_file = self._open_data()
        name = str(self.token_file.dir)
        self.sampler = SequenceSampler(self.token_file.num_tokens, cfg.model.context, cfg.train.seed, "train", cfg.data.val_fraction, name=name)
        self.val_sampler = SequenceSampler(self.token_file.num_tokens, cfg.model.context, cfg.train.seed, "val", cfg.data.val_fraction, name=name)
        resume = self.grant.info.get("resume")
        if resume:
            self.load_checkpoint(resume)

    def _use_node_plan(self, text: str) -> None:
        """Play the SkipPipe node plan ``text`` (JSON) from now on: its train and full schedules.
        A re-plan keeps every node's schedule stages, so the chunks stay as they are."""
        self._node_plan_text = text
        self.nodes = NodeRole(self.cfg, NodePlan.from_json(text), self.stage)
        self.schedule, self.eval_schedule = self.nodes.plan.train, self.nodes.plan.full

    def _hold(self, state: StageState) -> None:
        """Make ``state`` this worker's stage: its mirror link (owner and holder of the next stage's
        copy), flat gradient buffer, stage runner (each microbatch's loss is scaled by one over the
        configured global batch's microbatches, whatever the shape) and what it reads from the data."""
        self.state = state
        self.chunks = state.chunks
        if getattr(self, "mirror_link", None) is not None:
            self.mirror_link.halt()
        self.mirror_link = MirrorLink(self.cfg, self.stage, self.replica, state)
        self._make_flat_grads()
        self.runner = StageRunner(self.chunks, 1.0 / self.global_microbatches, self.device)
        self.runner.meter = self.meter
        if self.fault.planned:
            self.runner.hook = self.fault.hit
            state.optimizer.add_step_hook(self._optimizer_fault)
        self.holds_first = any(c.embed is not None for c in self.chunks.values())  # reads token ids
        self.holds_last = any(c.head is not None for c in self.chunks.values())  # reads targets
        self.dtype = next(next(iter(self.chunks.values())).parameters()).dtype

    @property
    def reshaped(self) -> bool:
        """Whether this worker plays another shape than the configured one (``ft.elastic``)."""
        p, q = self.cfg.pipeline, self.job.pipeline
        return (p.stages, p.replicas) != (q.stages, q.replicas)

    def take_stage(self, stage: int, replica: int, state: StageState, shape: Any) -> None:
        """Play ``stage`` of ``replica`` in a reshaped job (:mod:`spotpipe.runtime.worker.reshape`)
        with ``state``: the config of the new shape, its schedule (from the one builder), this
        replica's microbatches of the global batch, a new mirror of the next stage.

        Args:
            stage: The new stage.
            replica: The new replica.
            state: The stage's state, moved in.
            shape: The :class:`~spotpipe.runtime.worker.reshape.ReshapeRecord`.
        """
        from spotpipe.runtime.worker.reshape import reshaped_config

        self.stage, self.replica, self.deal = stage, replica, shape.deal[replica]
        self.cfg = reshaped_config(self.job, len(shape.layers), len(shape.deal), len(self.deal))
        self.num_stages = self.cfg.pipeline.stages
        self.name = f"worker {self.id} (stage {stage}, replica {replica})"
        self.schedule = self.eval_schedule = job_schedule(self.cfg)
        self.my_stages = self.schedule.stages_of_rank(stage)
        self.num_chunks = self.schedule.num_stages
        self.microbatches, self.replicas = len(self.deal), len(shape.deal)
        self._hold(state)
        self._start_mirror()

    def _make_flat_grads(self) -> None:
        """The flat gradient buffer (:meth:`StageState.attach_flat_gradient`) and its ranges: the
        parameters counted in the gradient norm (a CheckFree+ copy counts once) and the tied copies."""
        self.flat_grad, params = self.state.attach_flat_gradient(self.device)
        self.params = params
        copies = {id(q) for c in self.chunks.values() for q in c.copy_parameters()}
        self.counted = flat_ranges(params, {id(q) for q in params} - copies)  # in the gradient norm (copies count once)
        self.tied = flat_ranges(params, {id(q) for c in self.chunks.values() for q in c.tied_parameters()})  # CheckFree+

    def _open_data(self) -> Any:
        from spotpipe.data.tokens import TokenFile, default_cache_dir, resolve_dataset

        info = self.grant.info
        token_dir = info.get("token_dir", "")
        want = info.get("token_sha256", "")
        if token_dir and Path(token_dir).is_dir():
            tf = TokenFile(token_dir)
        else:  # another machine: prepare the same corpus locally
            tf = resolve_dataset(self.cfg.data, default_cache_dir())
        if want and tf.header.get("sha256") != want:
            raise SpotpipeError(
                f"{self.name}: the token file {tf.dir} differs from the controller's (SHA-256 mismatch); "
                "give every host the same data.path"
            )
        return tf

    def load_checkpoint(self, resume: dict[str, Any]) -> None:
        """Load this rank's file of a checkpoint (state and sampler) and continue after its step.

        Raises:
            SpotpipeError: The file does not hold this rank's chunks (or is of another format).
        """
        name, sha = resume["files"][str(self.stage)]
        path = Path(resume["dir"]) / name
        saved = load_state(path, expected_sha256=sha, map_location="cpu")
        if int(saved.get("rank", -1)) != self.stage:
            raise SpotpipeError(f"checkpoint file {path} does not hold the chunks of pipeline rank {self.stage}")
        try:
            self.state.load_checkpoint(saved["state"], str(path))
        except (KeyError, ValueError) as exc:
            raise SpotpipeError(f"checkpoint file {path} cannot be loaded: {exc}") from None
        self.sampler.load_state_dict(saved["sampler"])
        self.start_step = int(saved["step"]) + 1

    @property
    def mirror(self) -> Any:
        """The copy of the next stage this worker holds (MirrorKeeper / MirrorReplayer), or None."""
        return None if self.mirror_link is None else self.mirror_link.holder

    def discard_step(self) -> None:
        """Abort the injected transport (a wrapper fails its queued sends), drop the step's
        activations and zero the gradients."""
        self.executor.transport.abort()
        self.executor.discard()
        self.flat_grad.zero_()

    def zero_gradients(self) -> None:
        """Zero the gradient buffer (a new generation's executor is left alone)."""
        self.flat_grad.zero_()

    def _start_mirror(self) -> None:
        """Start holding the next stage's copy (in a fresh state shaped like it)."""
        from spotpipe.model.stages import build_stage

        assert self.mirror_link is not None
        if not self.mirror_link.mode:
            return
        m, seed = self.cfg.model, self.cfg.train.seed
        owner = (self.stage + 1) % self.cfg.pipeline.stages
        chunks = {s: build_stage(m, seed, s, self.num_chunks, edge_copies=self.swap) for s in self.schedule.stages_of_rank(owner)}
        self.mirror_link.start_holder(StageState(chunks, build_chunk_optimizer(chunks, self.cfg.train)))

    def _optimizer_fault(self) -> None:
        """The ``optimizer`` phase fault: the step was decided ``commit`` and its gradient sent to
        the mirror holder (let it leave first: the fault models a loss after the data is out)."""
        if self.mirror_link is not None:
            self.mirror_link.flush()
        self.fault.hit("optimizer")

    # ------------------------------------------------------------------------------------------
    # Generations

    def enter_generation(self, after: int = 0) -> Generation | None:
        """Wait for a generation newer than ``after`` and build its groups (None: the job stops).

        The first call takes the first generation; a recovery handler passes the number of the
        generation it aborted, so it joins the one the controller publishes next. Once in, the
        groups of the generations this worker left are released and the old executor's
        transport is closed, so recoveries leave no descriptors or threads behind.

        Raises:
            GenerationCancelled: The controller aborted the generation before its groups were
                built (a member was lost meanwhile): this worker is a survivor of it.
        """
        number = 0
        after = max(after, int(self.grant.info.get("generation", 1)) - 1)
        while not self.stop_requested:
            if self.store.check([protocol.GEN_CURRENT]):
                number = int(self.store.get(protocol.GEN_CURRENT))
                if number > after:
                    break
            time.sleep(0.02)
        if self.stop_requested:
            return None
        plan = GenerationPlan.from_json(self.store.get(protocol.plan_key(number)))
        reshape = self._reshape_record(number)
        if reshape is not None and self.id in reshape["shape"]["parked"]:
            raise Parked(f"generation {number} has no place for this worker: it stands by")
        rank = plan.rank_of_worker(self.id)
        if self.nodes is not None:  # the paths may have been planned again around a lost node
            text = self.store.get(protocol.node_plan_key(number)).decode()
            if text != self._node_plan_text:
                self._use_node_plan(text)
        abort_key = protocol.abort_key(number)

        def cancelled() -> str:
            if self.stop_requested:
                return "the job stops"
            if self.store.check([abort_key]):
                return self.store.get(abort_key).decode() or "aborted by the controller"
            return ""

        try:
            gen = Generation(self.store, plan, rank, self.backend, self.cfg.run.timeout_s, self.listen_host, self.device,
                             cancelled=cancelled)
        except GenerationCancelled:
            if self.stop_requested:
                return None
            raise
        self.generation = gen
        if self.heartbeat is not None:
            self.heartbeat.generation = number
        if reshape is None:  # a reshape builds it once the new stage is in place (RecoveryAgent.recover)
            self.rebuild_executor(gen)
        release_retired(keep=gen)
        return gen

    def _reshape_record(self, number: int) -> dict[str, Any] | None:
        """Generation ``number``'s recovery record when it reshapes the job (``ft.elastic``), else None."""
        key = protocol.recovery_key(number)
        if not self.job.ft.elastic or self.nodes is not None or not self.store.check([key]):
            return None
        record = json.loads(self.store.get(key))
        return record if record.get("outcome") == "reshape" else None

    def rebuild_executor(self, gen: Generation) -> None:
        """Build the executor of ``gen`` (its transport, this worker's schedule and stage) and close
        the previous one's transport.

        Args:
            gen: The generation entered.
        """
        old = getattr(self, "executor", None)
        self._build_executor(gen)
        if old is not None:
            old.transport.close()

    def _build_executor(self, gen: Generation) -> None:
        m = self.cfg.model
        world_rank_of = {(mem.stage, mem.replica): r for r, mem in enumerate(gen.plan.members)}
        peers = stage_peers(self.schedule, self.replica, world_rank_of)
        partners = [c.tie_partner for c in self.chunks.values() if c.tie_partner is not None]
        self.tie_peer = peers(partners[0]) if partners else -1
        rows = self.cfg.train.batch_size // self.global_microbatches
        from spotpipe.runtime.comm.linkdelay import collective_delay, wrap_for_job  # [network] link-delay emulation

        self.programs = {"train": compile_rank(self.schedule, self.stage, peers)}
        if self.nodes is not None:
            self.programs["full"] = compile_rank(self.nodes.plan.full, self.stage, peers)
        group = gen.plan.gradient_group(gen.world_rank)
        self.leads_group = group[0] == gen.world_rank  # counts the group's gradient once in the global norm
        node_of = [mem.stage if self.nodes is not None else r for r, mem in enumerate(gen.plan.members)]  # world rank -> network node
        nbytes = self.flat_grad.numel() * self.flat_grad.element_size()
        self.allreduce_delay_s = collective_delay(self.cfg, [node_of[r] for r in group], nbytes) if self.nodes else 0.0
        self.executor = Executor(
            self.programs["train"],
            self.runner,
            wrap_for_job(gen.transport, self.cfg, gen.world_rank, node_of.__getitem__),
            (rows, m.context, m.d_model),
            self.dtype,
            self.cfg.run.timeout_s,
            eval_program=compile_rank(self.eval_schedule, self.stage, stage_peers(self.eval_schedule, self.replica, world_rank_of),
                                      forward_only=True),
            device=self.device,
        )

    # ------------------------------------------------------------------------------------------
    # Steps

    def _microbatches(self, sampler: Any, step_ids: Sequence[int],
                      schedule: str = "train") -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Token ids and targets ``[b, T]`` of the microbatches this worker starts or ends (all of
        its replica's; in a SkipPipe run those of which it is the origin), by microbatch index."""
        from spotpipe.data.sampler import microbatch_ids

        inputs: dict[int, torch.Tensor] = {}
        targets: dict[int, torch.Tensor] = {}
        if not (self.holds_first or self.holds_last):
            return inputs, targets
        R, M = self.job.pipeline.replicas, self.job.pipeline.microbatches
        mine = range(self.microbatches) if self.nodes is None else self.nodes.origin_microbatches(schedule)
        for mb in mine:
            if self.nodes is None:  # microbatch g of the global batch: the same samples in every shape
                g = self.deal[mb]
                ids = microbatch_ids(step_ids, R, M, g // M, g % M)
            else:
                ids = microbatch_ids(step_ids, self.replicas, self.microbatches, self.replica, mb)
            data = torch.from_numpy(sampler.batch(self.token_file, ids)).to(self.device)
            inputs[mb] = data[:, :-1]
            targets[mb] = data[:, 1:]
        return inputs, targets

    def compute_step(self, step: int) -> dict[str, Any]:
        """Phase 2: forward/backward, gradient all-reduce, world all-reduce. May raise CommError.

        Args:
            step: The step, 0-based.

        Returns:
            The step's outcome: ``step``, ``loss`` (mean over the world), ``grad_norm`` (global, before
            clipping), ``nonfinite``, ``coef``, ``lr``, ``stop``, and seconds (``pipe_s``,
            ``compute_s``, ...).
        """
        gen = self.generation
        assert gen is not None
        t0 = time.perf_counter()
        self.fault.begin_step(step)
        kind = "train" if self.nodes is None else self.nodes.schedule_name(step)
        step_ids = self.sampler.next_ids(self.cfg.train.batch_size)
        inputs, targets = self._microbatches(self.sampler, step_ids, kind)
        self.flat_grad.zero_()
        self.meter.exclude(q for c in self.runner.chunks.values() for q in c.parameters())  # chunks may be new
        self.meter.reset_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        loss_sum, count = self.executor.run(inputs, targets, label=f"step {step}", program=self.programs[kind])
        t_pipe = time.perf_counter()
        memory = step_memory_report(self.stage, self.meter, self.runner.chunks, self.state.optimizer, self.device,
                                    self.flat_grad)
        t_reduce = time.perf_counter()
        gen.all_reduce(self.flat_grad, "replica", f"the gradient all-reduce of step {step}")  # no-op alone
        if self.allreduce_delay_s > 0:  # the emulated WAN's ring all-reduce time, where the real one was quicker
            time.sleep(max(0.0, self.allreduce_delay_s - (time.perf_counter() - t_reduce)))
        if self.nodes is not None and (scale := self.nodes.gradient_scale(kind)) != 1.0:
            self.flat_grad.mul_(scale)  # the mean over the microbatches that visited the stage (nodes.py)
        if self.tied:
            sum_tied_gradients(self.flat_grad, self.tied, self.executor.transport, self.tie_peer, self.cfg.run.timeout_s,
                               f"the CheckFree+ tied-gradient exchange of step {step}")
        local_sq = sum(float(self.flat_grad[o : o + n].double().pow(2).sum()) for o, n in self.counted)
        self.last_grad_norm = math.sqrt(local_sq)
        sq = local_sq if self.leads_group else 0.0
        vec = torch.tensor([sq, loss_sum, float(count), 1.0 if self.stop_requested else 0.0], dtype=torch.float64)
        if self.backend == "nccl":
            vec = vec.to(self.device)
        self.fault.hit("allreduce")
        gen.all_reduce(vec, "world", f"the step barrier (world all-reduce) of step {step}")
        sq_total, loss_total, n_total, stop = (float(v) for v in vec.cpu())
        grad_norm = math.sqrt(sq_total) if not sq_total < 0 else 0.0  # NaN stays NaN
        loss = loss_total / max(n_total, 1.0)
        return {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": nonfinite_reason(grad_norm, loss),
            "coef": clip_coefficient(grad_norm, self.cfg.train.grad_clip),
            "lr": lr_at(step, self.cfg.train),
            "stop": stop > 0,
            "pipe_s": t_pipe - t0,
            "schedule": kind,
            "compute_s": time.perf_counter() - t0,
            "reduced": [sq_total, loss_total, n_total, stop],
            "memory": memory,
        }

    def decide(self, step: int) -> None:
        """Phase 2b: agree that ``step`` commits before anyone applies it.

        Every worker whose step barrier returned adds 1 to ``step/<k>/ready``; the one that
        makes it the world size sets ``step/<k>/decide = commit``. A worker that sees its
        generation aborted first tries to set ``abort``. The store's compare_set lets only the
        first writer win, so either every survivor applies step k or none does, and a step that
        was decided ``commit`` is applied even by a worker that hears of a failure right after.

        Raises:
            CommError: the step was decided ``abort``.
        """
        from spotpipe.runtime.comm.transport import GenerationAborted

        gen = self.generation
        assert gen is not None
        if not self.recovery.recoverable:
            return
        key = protocol.step_decide_key(gen.number, step)
        abort = protocol.abort_key(gen.number)
        if self.store.add(protocol.step_ready_key(gen.number, step), 1) >= gen.plan.world_size:
            self.store.compare_set(key, "", "commit")
        delay = DECIDE_POLL_MIN_S
        while True:
            if self.store.check([key]):
                value = self.store.get(key)
                break
            if gen.aborted or self.store.check([abort]):
                value = self.store.compare_set(key, "", "abort")
                break
            time.sleep(delay)  # backing off: the waiting workers must not keep the store busy
            delay = min(2 * delay, DECIDE_POLL_MAX_S)
        if value != b"commit":
            raise GenerationAborted(peer=None, peer_name=f"the world group of generation {gen.number}",
                                    action=f"the commit decision of step {step}", detail="step aborted after a failure")

    def apply_step(self, outcome: dict[str, Any]) -> float:
        """Phase 3: clip, set the lr, step the optimizers (local only). Returns the base lr.

        Args:
            outcome: :meth:`compute_step`'s result (``coef``, ``lr``).

        Returns:
            The step's base learning rate.
        """
        self.state.apply_update(self.flat_grad, outcome["coef"], outcome["lr"])
        return float(outcome["lr"])

    def save_checkpoint(self, step: int) -> dict[str, Any]:
        """Save this worker's stage state and sampler into the checkpoint of ``step``.

        Args:
            step: The last step the state holds, 0-based.

        Returns:
            ``{"rank", "file", "sha256", "seconds"}`` for the manifest and the log.

        Raises:
            OSError: if the file cannot be written.
        """
        t0 = time.perf_counter()
        state = {
            "format": "spotpipe-stage-state",
            "step": step,
            "rank": self.stage,
            "state": self.state.to_checkpoint(),
            "sampler": self.sampler.state_dict(),
        }
        directory = checkpoint_dir(self.run_dir, step)
        name = rank_file_name(self.stage)
        sha = save_state(directory / name, state)
        return {"rank": self.stage, "file": name, "sha256": sha, "seconds": time.perf_counter() - t0}

    def report_step(self, step: int, report: dict[str, Any]) -> None:
        """Phase 4: publish the report; the last of the world to report commits the step.

        Args:
            step: The step, 0-based.
            report: The worker's report of the step, JSON-serialisable.
        """
        gen = self.generation
        assert gen is not None
        self.store.set(protocol.step_report_key(step, self.id), json.dumps(report))
        done = self.store.add(protocol.step_done_key(step), 1)
        if done == gen.plan.world_size:
            self.store.set(protocol.step_commit_key(step), str(gen.number))

    def evaluate(self, step: int) -> float | None:
        """Validation loss over the first ``train.eval_batches`` batches of the val split (the
        same windows as :meth:`LocalTrainer.evaluate`, whole batches only).

        Args:
            step: The step evaluated after, 0-based (named in errors).

        Returns:
            The mean validation loss (nats per token), or None when nothing was evaluated.

        Raises:
            CommError: if a peer is lost during the evaluation.
        """
        gen = self.generation
        assert gen is not None
        t = self.cfg.train
        size = t.batch_size
        per = self.global_microbatches
        windows = self.val_sampler.num_windows
        batches = [list(range(b * size, (b + 1) * size)) for b in range(min(t.eval_batches, windows // size))]
        if not batches and windows >= per:
            batches = [list(range((windows // per) * per))]
        loss_sum, count = 0.0, 0
        for ids in batches:
            inputs, targets = self._microbatches(self.val_sampler, ids, "full")
            rows = len(ids) // per
            self.executor.shape = (rows, self.cfg.model.context, self.cfg.model.d_model)
            s, n = self.executor.run(inputs, targets, train=False, label=f"the evaluation after step {step}")
            loss_sum += s
            count += n
        self.executor.shape = (size // per, self.cfg.model.context, self.cfg.model.d_model)
        vec = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
        if self.backend == "nccl":
            vec = vec.to(self.device)
        gen.all_reduce(vec, "world", f"the evaluation all-reduce after step {step}")
        total, n = (float(v) for v in vec.cpu())
        return total / n if n > 0 else None

    def train(self) -> None:
        """The step loop (see the module docstring)."""
        t = self.cfg.train
        step = self.start_step
        while step < t.steps:
            snapshot = self.sampler.state_dict()
            gen_number = self.generation.number if self.generation is not None else 0
            if self._leave_due(step):  # a planned change (an elastic grow) at this step boundary
                # Nothing to discard, and the groups stay open: the mirror copies take in the
                # last committed step before the next generation replaces them.
                left = GenerationAborted(peer=None, peer_name="the controller", action=f"step {step}",
                                         detail="the generation ends here for a grow")
                step = self.recovery.on_failure(left, step)
                continue
            self.mirror_link.generation_started(self.generation, step)
            try:
                outcome = self.compute_step(step)
                nonfinite = outcome["nonfinite"]
                self.mirror_link.gradient(step, self.flat_grad, outcome["coef"], outcome["lr"], apply=not nonfinite)
                self.decide(step)
            except CommError as exc:
                self.recovery.abort_step(snapshot, str(exc))
                step = self.recovery.on_failure(exc, step)
                continue
            if nonfinite and t.nonfinite == "stop":  # every worker decides the same: the all-reduced values
                raise nonfinite_step_error(step, t.steps, nonfinite)
            if nonfinite:
                self.log(f"step {step + 1}: {nonfinite}: update skipped (train.nonfinite = skip)")
                lr = float(outcome["lr"])
            else:
                lr = self.apply_step(outcome)
            self.mirror_link.committed(gen_number, step)
            stop = outcome["stop"]
            report: dict[str, Any] = {
                "worker": self.id,
                "loss": outcome["loss"],
                "grad_norm": outcome["grad_norm"],
                "lr": lr,
                "tokens": t.batch_size * self.cfg.model.context,
                "sampler": self.sampler.state_dict(),
                "compute_s": outcome["compute_s"],
                "pipe_s": outcome["pipe_s"],
                "schedule": outcome["schedule"],
                "reduced": outcome["reduced"],
                "stop": stop,
                "skipped": nonfinite,
                "memory": outcome["memory"],
                "store_bytes": self.store.written.total if hasattr(self.store, "written") else 0,
                "mirror_bytes": self.mirror_link.bytes_sent,
            }
            if checkpoint_due(step, t, stop) and self.replica == 0 and not self.reshaped:  # a checkpoint restores the configured shape
                report["checkpoint"] = self.save_checkpoint(step)
            report["t"] = time.time()  # when this worker finished the step (the last one commits it)
            self.report_step(step, report)
            if eval_due(step, t, stop, self._stop_reason() if stop else ""):
                try:
                    val = self.evaluate(step)
                except CommError as exc:  # step is committed; recover and go on with the next one
                    self.recovery.abort_step(self.sampler.state_dict(), str(exc))
                    step = self.recovery.on_failure(exc, step + 1)
                    continue
                if self.generation is not None and self.generation.world_rank == 0:
                    self.store.set(f"eval/{step}", json.dumps({"val_loss": val}))
            if stop:
                return
            step += 1

    def _leave_due(self, step: int) -> bool:
        """Whether the controller asked this generation to end before ``step`` (:func:`protocol.leave_key`)."""
        gen = self.generation
        if not self.job.ft.elastic or gen is None or not self.store.check([protocol.leave_key(gen.number)]):
            return False
        return step >= int(self.store.get(protocol.leave_key(gen.number)))

    def _stop_reason(self) -> str:
        try:
            return self.store.get(protocol.STOP).decode()
        except Exception:
            return ""

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def _abort_generation(self, number: int, reason: str) -> None:
        gen = self.generation
        if gen is not None and gen.number == number:
            gen.abort(reason or "aborted by the controller")

    def _request_stop(self) -> None:
        self.stop_requested = True

    def run(self) -> int:
        """Set up, train, report. Returns the process exit code."""
        self.heartbeat = Heartbeat(
            self.store, self.id, self.cfg.run.heartbeat_s, self._request_stop, self._abort_generation, self.lost_controller
        )
        self.heartbeat.start()
        try:
            t0 = time.perf_counter()
            self.setup()
            self._start_mirror()
            held = (f"model stage {self.nodes.model_stage}" + (" and a head" if self.holds_last else "")
                    if self.nodes is not None else f"stages {list(self.my_stages)}")
            self.log(f"set up in {time.perf_counter() - t0:.2f} s ({held}, backend {self.backend})")
            if self.recovery.enter_first_generation():
                self.train()
            self.store.set(protocol.bye_key(self.id), "1")
            self.log("finished")
            return 0
        except Parked as exc:
            self.log(f"{exc}")
            return EXIT_PARKED
        except CommError as exc:
            self.lost_controller.check(self.store)  # a dead controller explains every other error
            self.report_error(str(exc), exc)
            return EXIT_ERROR
        except SpotpipeError as exc:
            self.lost_controller.check(self.store)
            self.report_error(str(exc))
            return EXIT_ERROR
        except Exception as exc:  # a bug: still tell the controller, with the type
            self.lost_controller.check(self.store)
            self.report_error(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            raise
        finally:
            self.heartbeat.halt()
            if self.mirror_link is not None:
                self.mirror_link.halt()

    def log(self, text: str) -> None:
        """A line in the worker's log (stdout; the controller sends it to RUN_DIR/logs/)."""
        print(f"[{time.strftime('%H:%M:%S')}] {self.name}: {text}", flush=True)

    def report_error(self, message: str, comm: CommError | None = None) -> None:
        """Tell the controller why this worker gives up (and print it to the log).

        A communication error carries its kind and the peer's worker id, which the controller's
        failure detector takes as evidence against that peer.

        Args:
            message: One line; ``worker ...`` is prefixed with this worker's name unless it starts so.
            comm: The communication error behind it, if any.
        """
        text = message if message.startswith("worker ") else f"{self.name}: {message}"
        print(f"spotpipe worker: error: {text}", file=sys.stderr, flush=True)
        body: dict[str, Any] = {"message": text, "time": time.time(), "kind": "fatal"}
        if comm is not None:
            body["kind"] = comm.kind
            gen = self.generation
            if comm.peer is not None and gen is not None and 0 <= comm.peer < gen.plan.world_size:
                body["peer"] = gen.plan.members[comm.peer].worker
        try:
            self.store.set(protocol.error_key(self.id), json.dumps(body))
        except Exception:
            pass
