"""Worker side of failures: abort a step, join the next generation, carry out a recovery, mirrors.

:class:`WorkerRecoveryMixin` is part of :class:`spotpipe.runtime.worker.worker.Worker` (the step loop is
there). The controller decides (:mod:`spotpipe.runtime.control.recovery`); this is each worker's part.

- :meth:`abort_step` discards a failed step (activations, gradients, the data position).
- :meth:`on_failure` posts where this survivor stands, waits for the next generation, rebuilds
  the groups and calls :meth:`recover`; the loop then replays the step with the same data.
- :meth:`recover` runs the plans of ``gen/<g>/recovery`` in rounds (a plan whose source is
  itself rebuilt in this recovery waits for a later round). Per strategy the source sends
  (:mod:`spotpipe.runtime.state.flat`): ``replica`` and ``checkfree+`` its full state (CheckFree+:
  the swap partner's blocks, optimizer state and in-sync embedding or head copy; Blagoev, Ersoy,
  Chen 2025, section 3.2), ``mirror`` the copy it holds, ``checkfree`` both neighbours' blocks and
  gradient norms (section 3.1). Under the CheckFree+ swap schedule a chunk that holds a copy
  (1 or S-2) rebuilt by CheckFree also receives the exact embedding or norm and head, weights
  and moments, from its edge neighbour, so the two copies stay equal.
- Mirrors (:mod:`spotpipe.runtime.worker.mirror`): the owner publishes its state at the start of each
  generation and its gradient each step (``ft.mirror_every = 1``), or its full state every N
  steps; the holder keeps the copy current in a background thread.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from spotpipe.errors import SpotpipeError
from spotpipe.runtime import protocol
from spotpipe.runtime.comm.groups import Generation
from spotpipe.runtime.comm.transport import CommError, GenerationAborted

EXTRA_TAG = 4  # tag offset of the tied-copy state a CheckFree rebuild of chunk 1 or S-2 also gets


class WorkerRecoveryMixin:
    """Failure handling of a worker (see the module docstring). Mixed into the Worker."""

    # Attributes of the Worker this mixin uses (declared for readers and type checkers).
    cfg: Any
    store: Any
    id: int
    stage: int
    replica: int
    generation: Generation | None
    mirror: Any
    chunks: dict[int, Any]
    optimizers: dict[int, Any]
    lr_scale: dict[int, float]
    flat_grad: torch.Tensor
    sampler: Any
    executor: Any
    recoverable: bool
    stop_requested: bool
    start_step: int
    last_grad_norm: float
    swap: bool
    _mirror_gen: int
    _resume_step: int
    fault: Any
    schedule: Any
    num_chunks: int

    def abort_step(self, snapshot: dict[str, Any], reason: str) -> None:
        """Discard a failed step: abort the generation, drop activations and gradients, rewind data."""
        if self.generation is not None:
            self.generation.abort(reason)
        self.executor.transport.abort()  # the injected transport (a wrapper fails its queued sends)
        self.executor.discard()
        self.flat_grad.zero_()
        self.sampler.load_state_dict(snapshot)

    def on_failure(self, exc: CommError, step: int) -> int:
        """Stage recovery after an aborted step (issue 5); returns the step to run next.

        The survivor tells the controller where it stands (``gen/<g>/survivor/<id>``: the
        step it aborted, its sampler position, its mirror), waits for the next generation,
        rebuilds the groups (:meth:`enter_generation`), does its part of the recovery the
        controller published, and returns: the loop replays the step with the same data.
        With ``ft.strategy = none`` the error ends the worker.
        """
        gen = self.generation
        if not self.recoverable or gen is None:
            raise exc
        while True:
            self._post_survivor_status(gen, exc, step)
            self.log(f"step {step} aborted ({' '.join(str(exc).split())[:160]}); waiting for the next generation")
            new = self.enter_generation(after=gen.number)
            if new is None:  # the job stops (time limit, Ctrl-C) while it waits: leave cleanly
                self.log(f"the job stops during a recovery; step {step} is not run")
                return self.cfg.train.steps
            try:
                return self.recover(new)
            except CommError as again:  # another worker was lost during this recovery: start over
                new.abort(str(again))
                self.flat_grad.zero_()
                gen, exc, step = new, again, self._resume_step

    def _post_survivor_status(self, gen: Generation, exc: CommError, step: int) -> None:
        """``gen/<g>/survivor/<id>``: the step this survivor resumes at, its data position, the step
        of the mirror it holds, and the error that stopped it."""
        if self.mirror is not None:
            try:
                self.mirror.settle(self.cfg.run.timeout_s)
            except Exception:
                pass
        status = {
            "step": step,
            "sampler": self.sampler.state_dict(),
            "mirror_step": None if self.mirror is None else self.mirror.step,
            "mirror_bytes": 0 if self.mirror is None else self.mirror.nbytes,
            "error": str(exc)[:300],
        }
        self.store.set(protocol.survivor_key(gen.number, self.id), json.dumps(status))

    def recover(self, gen: Generation) -> int:
        """Carry out the controller's recovery decision for ``gen`` (this worker's part)."""
        from spotpipe.runtime.state import flat as rc

        t0 = time.perf_counter()
        record = json.loads(rc.wait_key(self.store, protocol.recovery_key(gen.number), self.cfg.run.timeout_s,
                                        lambda: self.stop_requested))
        moved = 0
        if record["outcome"] == "rollback":
            self._load_checkpoint(record["checkpoint"])
            step = self._resume_step = self.start_step
            if self.mirror is not None:  # the mirror is of a step that no longer exists
                self.mirror.reset(gen.number)
        else:
            step = self._resume_step = int(record["resume_step"])
            rank_of = {m.worker: r for r, m in enumerate(gen.plan.members)}
            pending = list(enumerate(record["plans"]))
            while pending:
                # A plan may read a worker rebuilt by another plan (CheckFree next to a mirror
                # copy): run it in a later round, after its sources are installed.
                targets = {int(p["worker"]) for _, p in pending}
                ready = [(i, p) for i, p in pending if not targets & {int(w) for w in p["sources"]}]
                if not ready:
                    raise SpotpipeError(f"generation {gen.number}: the recovery plans depend on each other in a cycle")
                pending = [(i, p) for i, p in pending if (i, p) not in ready]
                try:
                    moved += self._recovery_round(gen, ready, rank_of, float(record.get("lr_scale", 1.1)))
                except (RuntimeError, TimeoutError) as err:  # a peer of the transfer is gone
                    raise GenerationAborted(peer=None, peer_name=f"the world group of generation {gen.number}",
                                            action=f"the state transfer of the recovery to step {step}",
                                            detail=" ".join(str(err).split())[:200]) from None
            if self.id in record.get("new_workers", []):
                self.sampler.load_state_dict(record["sampler"])
        self.flat_grad.zero_()
        seconds = time.perf_counter() - t0
        self.store.set(protocol.recovered_key(gen.number, self.id), json.dumps({"bytes": moved, "seconds": seconds}))
        self.log(f"generation {gen.number}: recovery part done in {seconds:.3f} s ({moved} bytes), resuming at step {step}")
        return step

    def _recovery_round(self, gen: Generation, plans: list[tuple[int, dict[str, Any]]], rank_of: dict[int, int],
                        lr_scale: float) -> int:
        """Send and receive the state of ``plans`` (in parallel), then install what this worker
        received. Returns the bytes this worker sent or received."""
        from spotpipe.runtime.state import flat as rc

        moved = 0
        sends: list[tuple[torch.Tensor, int, int]] = []
        recvs: list[tuple[torch.Tensor, int, int]] = []
        installs: list[tuple[str, list[torch.Tensor], torch.Tensor | None]] = []
        for i, plan in plans:
            target, sources, strat = int(plan["worker"]), [int(w) for w in plan["sources"]], plan["strategy"]
            tag = rc.TAG_BASE + 8 * i
            extra_from = self._tied_source(strat, int(plan["stage"]))
            for j, src in enumerate(sources):
                if src == self.id and target != self.id:
                    if strat in ("replica", "checkfree+"):
                        t = rc.flatten_rank(self.chunks, self.optimizers, self.lr_scale)
                    elif strat == "mirror":
                        assert self.mirror is not None and self.mirror.step is not None
                        t = self.mirror.tensor()
                    else:
                        t = rc.flatten_blocks(self.chunks, self.last_grad_norm)
                    sends.append((t, rank_of[target], tag + j))
                    moved += t.numel() * 4
                    if j == extra_from:
                        t = rc.flatten_params(self._tied(), self._tied_optimizer())
                        sends.append((t, rank_of[target], tag + EXTRA_TAG))
                        moved += t.numel() * 4
            if target == self.id:
                blocks = strat == "checkfree"
                bufs = [torch.zeros(rc.rank_numel(self.chunks, blocks_only=blocks)) for _ in sources]
                for j, src in enumerate(sources):
                    recvs.append((bufs[j], rank_of[src], tag + j))
                extra = None
                if extra_from is not None:
                    extra = torch.zeros(rc.params_numel(self._tied()))
                    recvs.append((extra, rank_of[sources[extra_from]], tag + EXTRA_TAG))
                installs.append((strat, bufs, extra))
        if sends:
            self.fault.hit("recovery", self._resume_step)
        rc.p2p(gen, sends, recvs, self.cfg.run.timeout_s)
        for strat, bufs, extra in installs:
            if strat == "checkfree":
                w = rc.install_checkfree(bufs[0], bufs[1], self.chunks, self.optimizers, self.lr_scale, lr_scale)
                self.log(f"rebuilt by CheckFree from the neighbours (omega {w[0]:.4g}, {w[1]:.4g}), lr x{lr_scale:g}")
            else:
                rc.unflatten_rank(bufs[0], self.chunks, self.optimizers, self.lr_scale)
                if strat == "checkfree+":
                    self.log("rebuilt by CheckFree+ from the swap partner's blocks and in-sync copies")
            if extra is not None:
                rc.install_params(extra, self._tied(), self._tied_optimizer())
                moved += extra.numel() * 4
            moved += sum(b.numel() * 4 for b in bufs)
        return moved

    def _tied_source(self, strategy: str, stage: int) -> int | None:
        """Which source of a CheckFree plan for ``stage`` also sends the exact state of the copy
        that stage holds under the swap schedule (0: the previous stage, 1: the next), or None."""
        S = self.cfg.pipeline.stages
        if not self.swap or strategy != "checkfree":
            return None
        return {1: 0, S - 2: 1}.get(stage)

    def _tied(self) -> list[torch.nn.Parameter]:
        return [q for s in sorted(self.chunks) for q in self.chunks[s].tied_parameters()]

    def _tied_optimizer(self) -> Any:
        return self.optimizers[min(self.chunks)]

    # -- mirrors --------------------------------------------------------------------------------

    def _mirror_mode(self) -> str:
        """``replay`` (mirror_every = 1), ``periodic`` (every N steps) or ``""`` (no mirrors)."""
        ft = self.cfg.ft
        if ft.strategy not in ("auto", "mirror") or ft.mirror_every <= 0 or self.cfg.pipeline.stages < 2:
            return ""
        return "replay" if ft.mirror_every == 1 else "periodic"

    def _start_mirror(self) -> None:
        """Start the background keeper of the next stage's copy (this worker is its holder)."""
        from spotpipe.model.stages import build_stage
        from spotpipe.runtime.worker.mirror import MirrorKeeper, MirrorReplayer
        from spotpipe.runtime.state.optim import build_stage_optimizer

        mode = self._mirror_mode()
        owner = (self.stage + 1) % self.cfg.pipeline.stages
        if mode == "replay":
            m, seed = self.cfg.model, self.cfg.train.seed
            stages = self.schedule.stages_of_rank(owner)
            chunks = {s: build_stage(m, seed, s, self.num_chunks, edge_copies=self.swap) for s in stages}
            optimizers = {s: build_stage_optimizer(chunks[s], self.cfg.train) for s in stages}
            self.mirror = MirrorReplayer(self.store, owner, self.replica, chunks, optimizers, self.cfg.run.timeout_s)
        elif mode == "periodic":
            self.mirror = MirrorKeeper(self.store, owner, self.replica)
        if self.mirror is not None:
            self.mirror.start()

    def mirror_generation_start(self, step: int) -> None:
        """Owner side, ``replay`` mode: publish the full state once per generation (the holder's
        copy starts from it) before the generation's first step ``step``."""
        from spotpipe.runtime.state import flat as rc
        from spotpipe.runtime.worker.mirror import publish_mirror

        gen = self.generation
        if self._mirror_mode() != "replay" or gen is None or self._mirror_gen == gen.number:
            return
        publish_mirror(self.store, self.stage, self.replica, step - 1, rc.flatten_rank(self.chunks, self.optimizers, self.lr_scale),
                       gen.number)
        self._mirror_gen = gen.number

    def mirror_gradient(self, step: int, coef: float, lr: float) -> None:
        """Owner side, ``replay`` mode: publish the step's gradient before voting on its commit."""
        from spotpipe.runtime.worker.mirror import publish_gradient

        gen = self.generation
        if self._mirror_mode() == "replay" and gen is not None:
            publish_gradient(self.store, gen.number, self.stage, self.replica, step, self.flat_grad, coef, lr)

    def mirror_committed(self, step: int) -> None:
        """After committed ``step``: the holder replays it (``replay``) or the owner publishes its
        full state if due (``periodic``)."""
        from spotpipe.runtime.state import flat as rc
        from spotpipe.runtime.worker.mirror import publish_mirror

        gen = self.generation.number if self.generation is not None else 0
        if self.mirror is not None:
            self.mirror.committed(gen, step)
        if self._mirror_mode() == "periodic" and (step + 1) % self.cfg.ft.mirror_every == 0:
            publish_mirror(self.store, self.stage, self.replica, step, rc.flatten_rank(self.chunks, self.optimizers, self.lr_scale), gen)
