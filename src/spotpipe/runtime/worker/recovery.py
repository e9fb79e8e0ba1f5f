"""Worker side of failures: abort a step, join the next generation, carry out a recovery.

:class:`RecoveryAgent` is owned by :class:`spotpipe.runtime.worker.worker.Worker` (the step loop is
there) and reaches it only through :class:`RecoveryHost`. The controller decides
(:mod:`spotpipe.runtime.control.recovery`); this is each worker's part.

- :meth:`enter_first_generation` takes a new worker into its first generation (a replacement
  then receives its state; a generation lost before its groups were built is survived like any).
- :meth:`abort_step` discards a failed step (activations, gradients, the data position).
- :meth:`on_failure` posts where this survivor stands, waits for the next generation, rebuilds
  the groups and calls :meth:`recover`; the loop then replays the step with the same data.
- :meth:`recover` runs the plans of ``gen/<g>/recovery`` in rounds (a plan whose source is
  itself rebuilt in this recovery waits for a later round). Per strategy the source sends
  (:mod:`spotpipe.runtime.worker.strategies`): ``replica`` and ``checkfree+`` its full state (CheckFree+:
  the swap partner's blocks, optimizer state and in-sync embedding or head copy; Blagoev, Ersoy,
  Chen 2025, section 3.2), ``mirror`` the copy it holds, ``checkfree`` both neighbours' blocks and
  gradient norms (section 3.1). Under the CheckFree+ swap schedule a chunk that holds a copy
  (1 or S-2) rebuilt by CheckFree also receives the exact embedding or norm and head, weights
  and moments, from its edge neighbour, so the two copies stay equal.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

import torch

from spotpipe.config import JobConfig
from spotpipe.errors import SpotpipeError
from spotpipe.ft.policy import recovery_enabled
from spotpipe.runtime import protocol
from spotpipe.runtime.comm.groups import Generation, GenerationCancelled
from spotpipe.runtime.comm.transfer import TAG_BASE, p2p, wait_key
from spotpipe.runtime.comm.transport import CommError, GenerationAborted
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.worker.strategies import RecoveryPlanView, transfer_for


class RecoveryHost(Protocol):
    """What :class:`RecoveryAgent` needs from its worker."""

    store: Any
    cfg: JobConfig
    id: int
    generation: Generation | None
    state: StageState
    mirror: Any
    last_grad_norm: float
    swap: bool
    num_stages: int
    sampler: Any
    start_step: int
    stop_requested: bool
    fault: Any
    grant: Any  # the role the controller granted (``info["replacement"]``: a new worker of a lost role)

    def enter_generation(self, after: int = 0) -> Generation | None:
        """Wait for a generation newer than ``after`` and build its groups (None: the job stops).

        Args:
            after: The newest generation already seen.

        Returns:
            The generation entered, or None.
        """
        ...

    def discard_step(self) -> None:
        """Abort the step's transport, drop its activations and zero the gradients."""
        ...

    def rebuild_executor(self, gen: Generation) -> None:
        """Build the executor of ``gen`` for this worker's (new) stage and schedule.

        Args:
            gen: The generation entered.
        """
        ...

    def zero_gradients(self) -> None:
        """Zero the gradient buffer only."""
        ...

    def load_checkpoint(self, resume: dict[str, Any]) -> None:
        """Load this worker's part of a checkpoint (and its sampler).

        Args:
            resume: The checkpoint's record (its directory and files), as the controller publishes it.
        """
        ...

    def log(self, text: str) -> None:
        """A line in the worker's log."""
        ...


class RecoveryAgent:
    """A worker's part of failures and recoveries (see the module docstring).

    Args:
        worker: The worker it serves (:class:`RecoveryHost`).
    """

    def __init__(self, worker: RecoveryHost) -> None:
        self.w = worker
        self.recoverable = recovery_enabled(worker.cfg.ft)
        self.resume_step = 0  # the step the recovery under way resumes at
        self.transfer_s = 0.0  # seconds the last recovery spent in its peer-to-peer state transfers
        self.round_bytes = 0  # bytes this worker sends and receives in the transfer round under way

    def enter_first_generation(self) -> bool:
        """Enter this worker's first generation; a replacement then receives its state. Returns
        False when the job stops first. Sets the worker's ``start_step``.

        Raises:
            SpotpipeError: A replacement's generation was aborted before it received its state
                (the controller counts it lost and gives its role to another worker).
        """
        w = self.w
        t0 = time.perf_counter()
        try:
            gen = w.enter_generation()
        except GenerationCancelled as exc:  # a member was lost before the groups were built
            if w.grant.info.get("replacement"):
                raise SpotpipeError(f"generation {exc.generation} was aborted before this replacement received its state "
                                    f"({exc.detail}); its role goes to another worker") from None
            w.start_step = self.on_failure(exc, w.start_step)
            return True
        if gen is None:
            return False
        w.log(f"entered generation {gen.number} in {time.perf_counter() - t0:.2f} s")
        if w.grant.info.get("replacement"):
            try:
                w.start_step = self.recover(gen)
            except CommError as exc:  # lost a peer while installing: the controller decides again
                gen.abort(str(exc))
                w.start_step = self.on_failure(exc, self.resume_step)
        return True

    def abort_step(self, snapshot: dict[str, Any], reason: str) -> None:
        """Discard a failed step: abort the generation, drop activations and gradients, rewind data.

        Args:
            snapshot: The sampler's state from before the step.
            reason: Why, passed to the generation's abort.
        """
        if self.w.generation is not None:
            self.w.generation.abort(reason)
        self.w.discard_step()
        self.w.sampler.load_state_dict(snapshot)

    def on_failure(self, exc: CommError, step: int) -> int:
        """Stage recovery after an aborted step; returns the step to run next.

        The survivor tells the controller where it stands (``gen/<g>/survivor/<id>``: the
        step it aborted, its sampler position, its mirror), waits for the next generation,
        rebuilds the groups, does its part of the recovery the controller published, and
        returns: the loop replays the step with the same data. A generation that is lost in turn
        (a member lost while its groups are built or its state installed) is survived the same
        way, again and again. With ``ft.strategy = none`` the error ends the worker.

        Args:
            exc: What stopped the step; a :class:`GenerationCancelled` names the generation this
                worker never finished entering.
            step: The step this worker resumes at with its current state.

        Returns:
            The step to run next, 0-based.

        Raises:
            CommError: ``exc`` itself when recovery is off or there is no generation.
        """
        gen = self.w.generation
        if isinstance(exc, GenerationCancelled):
            number = exc.generation
        elif gen is not None:
            number = gen.number
        else:
            raise exc
        if not self.recoverable:
            raise exc
        while True:
            self._post_survivor_status(number, exc, step)
            self.w.log(f"step {step} aborted ({' '.join(str(exc).split())[:160]}); waiting for the next generation")
            try:
                new = self.w.enter_generation(after=number)
            except GenerationCancelled as again:  # lost a member before its groups were built
                step = self._local_part(again.generation, step)
                number, exc = again.generation, again
                continue
            if new is None:  # the job stops (time limit, Ctrl-C) while it waits: leave cleanly
                self.w.log(f"the job stops during a recovery; step {step} is not run")
                return self.w.cfg.train.steps
            try:
                return self.recover(new)
            except CommError as again:  # another worker was lost during this recovery: start over
                new.abort(str(again))
                self.w.zero_gradients()
                number, exc, step = new.number, again, self.resume_step

    def _local_part(self, number: int, step: int) -> int:
        """The part of generation ``number``'s recovery that needs no peer, for a worker that
        never built its groups: a rollback reloads the checkpoint, so that every survivor of
        ``number`` stands at the same step when the controller plans again. Returns the step
        this worker resumes at."""
        key = protocol.recovery_key(number)
        if not self.w.store.check([key]):
            return step
        record = json.loads(self.w.store.get(key))
        if record.get("outcome") != "rollback":
            return step
        self.w.load_checkpoint(record["checkpoint"])
        if self.w.mirror is not None:  # the mirror is of a step that no longer exists
            self.w.mirror.reset(number)
        self.resume_step = self.w.start_step
        return self.resume_step

    def _post_survivor_status(self, number: int, exc: CommError, step: int) -> None:
        """``gen/<g>/survivor/<id>``: the step this survivor resumes at, its data position, the step
        of the mirror it holds, and the error that stopped it."""
        mirror = self.w.mirror
        if mirror is not None:
            try:
                mirror.settle(self.w.cfg.run.timeout_s)
            except Exception:
                pass
        status = {
            "step": step,
            "sampler": self.w.sampler.state_dict(),
            "mirror_step": None if mirror is None else mirror.step,
            "mirror_bytes": 0 if mirror is None else mirror.nbytes,
            "error": str(exc)[:300],
        }
        self.w.store.set(protocol.survivor_key(number, self.w.id), json.dumps(status))

    def recover(self, gen: Generation) -> int:
        """Carry out the controller's recovery decision for ``gen`` (this worker's part); returns the
        step to run next.

        Args:
            gen: The generation whose recovery record to carry out.

        Returns:
            The step to run next, 0-based.

        Raises:
            GenerationAborted: A peer of the state transfer was lost (the controller decides again).
            SpotpipeError: The plans depend on each other in a cycle.
        """
        w = self.w
        t0 = time.perf_counter()
        record = json.loads(wait_key(w.store, protocol.recovery_key(gen.number), w.cfg.run.timeout_s, lambda: w.stop_requested))
        moved = 0
        self.transfer_s = 0.0  # seconds in the peer-to-peer state transfers alone
        if record["outcome"] == "reshape":  # ft.elastic: a new shape, the blocks moved peer to peer
            from spotpipe.runtime.worker.reshape import apply_reshape

            step = self.resume_step = int(record["resume_step"])
            try:
                moved, self.transfer_s = apply_reshape(w, gen, record)
            except (RuntimeError, TimeoutError) as err:  # a peer of the transfer is gone
                raise GenerationAborted(peer=None, peer_name=f"the host group of generation {gen.number}",
                                        action=f"the block moves of the reshape to step {step}",
                                        detail=" ".join(str(err).split())[:200]) from None
            w.rebuild_executor(gen)
            if w.id in record.get("new_workers", []):
                w.sampler.load_state_dict(record["sampler"])
        elif record["outcome"] == "rollback":
            w.load_checkpoint(record["checkpoint"])
            step = self.resume_step = w.start_step
            if w.mirror is not None:  # the mirror is of a step that no longer exists
                w.mirror.reset(gen.number)
        else:
            step = self.resume_step = int(record["resume_step"])
            rank_of = {m.worker: r for r, m in enumerate(gen.plan.members)}
            pending = [(i, RecoveryPlanView.from_record(p)) for i, p in enumerate(record["plans"])]
            while pending:
                # A plan may read a worker rebuilt by another plan (CheckFree next to a mirror
                # copy): run it in a later round, after its sources are installed.
                targets = {p.target for _, p in pending}
                ready = [(i, p) for i, p in pending if not targets & set(p.sources)]
                if not ready:
                    raise SpotpipeError(f"generation {gen.number}: the recovery plans depend on each other in a cycle")
                pending = [(i, p) for i, p in pending if (i, p) not in ready]
                try:
                    moved += self._recovery_round(gen, ready, rank_of)
                except (RuntimeError, TimeoutError) as err:  # a peer of the transfer is gone
                    raise GenerationAborted(peer=None, peer_name=f"the host group of generation {gen.number}",
                                            action=f"the state transfer of the recovery to step {step} "
                                                   f"({self.round_bytes / 1e6:.1f} MB, run.timeout_s={w.cfg.run.timeout_s:g})",
                                            detail=" ".join(str(err).split())[:200]) from None
            if w.id in record.get("new_workers", []):
                w.sampler.load_state_dict(record["sampler"])
        w.zero_gradients()
        seconds = time.perf_counter() - t0
        w.store.set(protocol.recovered_key(gen.number, w.id),
                    json.dumps({"bytes": moved, "seconds": seconds, "transfer_s": self.transfer_s}))
        w.log(f"generation {gen.number}: recovery part done in {seconds:.3f} s ({moved} bytes), resuming at step {step}")
        return step

    def _recovery_round(self, gen: Generation, plans: list[tuple[int, RecoveryPlanView]], rank_of: dict[int, int]) -> int:
        """Send and receive the state of ``plans`` (in parallel), then install what this worker
        received (each strategy's :class:`~spotpipe.runtime.worker.strategies.StateTransfer`).
        Returns the bytes this worker sent or received."""
        w = self.w
        moved = 0
        sends: list[tuple[torch.Tensor, int, int]] = []
        recvs: list[tuple[torch.Tensor, int, int]] = []
        installs: list[tuple[RecoveryPlanView, list[torch.Tensor]]] = []
        for i, plan in plans:
            transfer = transfer_for(plan.strategy)
            tag = TAG_BASE + 8 * i
            for j, src in enumerate(plan.sources):
                if src == w.id and plan.target != w.id:
                    t = transfer.send(w, plan, j)
                    sends.append((t, rank_of[plan.target], tag + j))
                    moved += t.numel() * 4
            if plan.target == w.id:
                bufs = [torch.zeros(n) for n in transfer.receive_sizes(w, plan)]
                recvs += [(buf, rank_of[src], tag + j) for j, (buf, src) in enumerate(zip(bufs, plan.sources))]
                installs.append((plan, bufs))
        self.round_bytes = sum(t.numel() * t.element_size() for t, _, _ in sends) + sum(b.numel() * 4 for b, _, _ in recvs)
        if sends:
            w.fault.hit("recovery", self.resume_step)
        t0 = time.perf_counter()
        p2p(gen, sends, recvs, w.cfg.run.timeout_s)
        self.transfer_s += time.perf_counter() - t0
        for plan, bufs in installs:
            transfer_for(plan.strategy).install(w, plan, bufs)
            moved += sum(b.numel() * 4 for b in bufs)
        return moved
