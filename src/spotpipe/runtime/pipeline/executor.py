"""The executor: ONE loop that plays one rank's lowered action list, for every schedule.

It decides nothing (DESIGN.md, "the executor decides nothing"): the order of actions, which
messages exist and their tags all come from the lowered :class:`~spotpipe.schedule.ir.Schedule`
(the lowering contract, :mod:`spotpipe.schedule.passes`). Per action it dispatches:

* ``RECV_F`` / ``RECV_B``: allocate the buffer and post the receive (non-blocking).
* ``F``: input = the microbatch's tokens (first stage of its path), a locally handed-over output
  (previous stage on this rank), or the posted receive, waited for here with a timeout. Where an
  ``R`` of the same stage and microbatch follows on this rank, the forward keeps only its input.
* ``R``: run that forward again with autograd on (selective recompute), right before its ``B``.
* ``B``: output gradient = nothing (last stage: the loss), a local hand-over, or a posted receive.
* ``SEND_F`` / ``SEND_B``: post the send of the output / input gradient and go on at once; all
  sends are waited for at the end of the step, before it can commit.

The action list is compiled once into tuples of small integers, so the per-action cost is a
tuple unpack and one branch. Tensors are sent as they are (no copies); receive buffers are fresh
tensors that become the next chunk's input directly.

A failed wait raises a :class:`~spotpipe.runtime.comm.transport.CommError` that names the peer worker,
the action and the step; the executor leaves the step half done, and :meth:`Executor.discard`
drops what it held so the worker can abort the step and replay it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from spotpipe.runtime.pipeline.stage_runner import StageRunner
from spotpipe.runtime.comm.transport import CommError, Handle, Transport
from spotpipe.schedule.ir import Action, Op, Schedule

# Compiled opcodes.
_F, _B, _SEND_F, _SEND_B, _RECV_F, _RECV_B, _R = range(7)
_OPCODES = {Op.F: _F, Op.B: _B, Op.SEND_F: _SEND_F, Op.SEND_B: _SEND_B, Op.RECV_F: _RECV_F, Op.RECV_B: _RECV_B, Op.R: _R}
# Where a compute action gets its input: from the batch / nothing, a local hand-over, a receive.
_SRC_NONE, _SRC_LOCAL, _SRC_RECV = range(3)


@dataclass(frozen=True, slots=True)
class Instruction:
    """One compiled action.

    Attributes:
        op: Opcode.
        stage: Stage (model chunk) the action belongs to.
        microbatch: Microbatch index.
        peer: World rank of the peer worker (communication), or -1.
        tag: Message tag (communication), or -1.
        source: For compute: where the input comes from (none / local / receive).
        local_next: For compute: the stage on THIS rank that consumes the result locally, or -1.
        action: The original action, for error messages.
        ends_path: For a forward or a recompute: the stage is the last of the microbatch's path
            (it computes the loss; under CheckFree+ that is chunk S-2 for a swapped microbatch).
        keeps_input_only: For a forward: an ``R`` of the same stage and microbatch follows on this
            rank, so the forward runs without autograd and keeps only its input.
    """

    op: int
    stage: int
    microbatch: int
    peer: int
    tag: int
    source: int
    local_next: int
    action: Action
    ends_path: bool = False
    keeps_input_only: bool = False


def compile_rank(
    schedule: Schedule,
    rank: int,
    peer_of_stage: Callable[[int], int],
    *,
    forward_only: bool = False,
) -> tuple[Instruction, ...]:
    """Compile ``schedule.ranks[rank]`` into instructions.

    Args:
        schedule: A lowered schedule.
        rank: The pipeline rank this worker plays.
        peer_of_stage: Stage -> world rank of the worker holding it (in this worker's replica).
        forward_only: Keep only forward actions and their messages (evaluation). Dropping the
            backward half of a deadlock-free schedule keeps it deadlock-free, since no forward
            waits on a backward.

    Returns:
        The rank's instructions in schedule order.
    """
    s2r = schedule.stage_to_rank
    out: list[Instruction] = []
    n_mb = schedule.num_microbatches
    again = set() if forward_only else {(a.stage, a.microbatch) for a in schedule.ranks[rank] if a.op is Op.R}
    for a in schedule.ranks[rank]:
        if forward_only and a.op in (Op.B, Op.SEND_B, Op.RECV_B, Op.R):
            continue
        path = schedule.path(a.microbatch)
        i = path.index(a.stage)
        pred = path[i - 1] if i > 0 else None
        succ = path[i + 1] if i + 1 < len(path) else None
        if a.op.is_comm:
            assert a.peer is not None
            out.append(
                Instruction(_OPCODES[a.op], a.stage, a.microbatch, peer_of_stage(a.peer), a.tag(n_mb), -1, -1, a)
            )
            continue
        if a.op is Op.F:
            source = _SRC_NONE if pred is None else (_SRC_LOCAL if s2r[pred] == rank else _SRC_RECV)
            local_next = succ if succ is not None and s2r[succ] == rank else -1
            out.append(Instruction(_F, a.stage, a.microbatch, -1, -1, source, local_next, a, succ is None,
                                   (a.stage, a.microbatch) in again))
            continue
        if a.op is Op.R:
            out.append(Instruction(_R, a.stage, a.microbatch, -1, -1, _SRC_NONE, -1, a, succ is None))
            continue
        source = _SRC_NONE if succ is None else (_SRC_LOCAL if s2r[succ] == rank else _SRC_RECV)
        local_next = pred if pred is not None and s2r[pred] == rank else -1
        out.append(Instruction(_B, a.stage, a.microbatch, -1, -1, source, local_next, a))
    return tuple(out)


class Executor:
    """Plays compiled action lists of one rank against a :class:`StageRunner` and a :class:`Transport`.

    Args:
        program: Training instructions (:func:`compile_rank`).
        runner: The stage runner holding this worker's chunks.
        transport: The generation's transport (possibly wrapped, e.g. by link-delay emulation).
        activation_shape: ``(microbatch_size, context, d_model)`` of every message.
        dtype: Dtype of activations and gradients.
        timeout_s: Limit of every wait.
        eval_program: Forward-only instructions for evaluation (optional).
        device: Where receive buffers live.
    """

    def __init__(
        self,
        program: Sequence[Instruction],
        runner: StageRunner,
        transport: Transport,
        activation_shape: tuple[int, ...],
        dtype: torch.dtype,
        timeout_s: float,
        eval_program: Sequence[Instruction] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.program = tuple(program)
        self.eval_program = tuple(eval_program) if eval_program is not None else None
        self.runner = runner
        self.transport = transport
        self.shape = tuple(activation_shape)
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.device = torch.device(device)
        self._recvs: dict[tuple[int, int, int], tuple[torch.Tensor, Handle, Instruction]] = {}
        self._local: dict[tuple[int, int, int], torch.Tensor] = {}
        self._outputs: dict[tuple[int, int, int], torch.Tensor] = {}
        self._sends: list[tuple[Handle, torch.Tensor, Instruction]] = []
        self.label = ""  # e.g. "step 17": appended to error messages

    def run(
        self,
        inputs: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
        targets: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
        *,
        train: bool = True,
        label: str = "",
        program: Sequence[Instruction] | None = None,
    ) -> tuple[float, int]:
        """Play one step (``train``) or one forward-only pass; return (loss sum, microbatch count)
        of the losses computed on this worker (non-zero only where the last stage lives).

        Args:
            inputs: Token ids ``[b, T]`` (int64) by microbatch index (a list of all, or a mapping of
                the microbatches whose path starts here); may be empty where this worker holds no
                chunk that starts a path.
            targets: Next-token ids ``[b, T]`` by microbatch index, likewise; may be empty where no
                chunk ends a path.
            train: Play the training program (forward and backward); ``False`` plays the forward-only
                program.
            label: Where this is (e.g. ``"step 17"``), appended to error messages.
            program: Training instructions to play instead of the executor's own (a SkipPipe
                node's full-path iterations); ignored with ``train=False``.

        Returns:
            ``(loss sum, count)``: the sum of the per-microbatch mean losses computed here (a float) and
            how many there were.

        Raises:
            ValueError: for ``train=False`` on an executor built without a forward-only program.
            CommError: a receive or send failed or timed out (naming the action and the peer).
        """
        program = (self.program if program is None else tuple(program)) if train else self.eval_program
        if program is None:
            raise ValueError("this executor has no forward-only program")
        self.label = label
        self.discard()
        self.runner.begin(inputs, targets, train=train)
        runner = self.runner
        transport = self.transport
        recvs, local, outputs = self._recvs, self._local, self._outputs
        for ins in program:
            op = ins.op
            if op == _RECV_F or op == _RECV_B:
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                recvs[(op, ins.stage, ins.microbatch)] = (buf, transport.irecv(buf, ins.peer, ins.tag), ins)
            elif op == _F:
                key = (_F, ins.stage, ins.microbatch)
                if ins.source == _SRC_NONE:
                    x = None
                elif ins.source == _SRC_LOCAL:
                    x = local.pop(key).detach()
                else:
                    x = self._wait_recv((_RECV_F, ins.stage, ins.microbatch), ins)
                out = runner.forward(ins.stage, ins.microbatch, x, ins.ends_path, keep=not ins.keeps_input_only)
                if out is not None:
                    if ins.local_next >= 0:
                        local[(_F, ins.local_next, ins.microbatch)] = out
                    else:
                        outputs[(_SEND_F, ins.stage, ins.microbatch)] = out.detach()
            elif op == _R:
                runner.recompute(ins.stage, ins.microbatch, ins.ends_path)
            elif op == _B:
                if ins.source == _SRC_NONE:
                    grad = None
                elif ins.source == _SRC_LOCAL:
                    grad = local.pop((_B, ins.stage, ins.microbatch))
                else:
                    grad = self._wait_recv((_RECV_B, ins.stage, ins.microbatch), ins)
                dx = runner.backward(ins.stage, ins.microbatch, grad)
                if dx is not None:
                    if ins.local_next >= 0:
                        local[(_B, ins.local_next, ins.microbatch)] = dx
                    else:
                        outputs[(_SEND_B, ins.stage, ins.microbatch)] = dx
            else:  # a send
                tensor = outputs.pop((op, ins.stage, ins.microbatch))
                self._sends.append((transport.isend(tensor, ins.peer, ins.tag), tensor, ins))
        self.finish_sends()
        return runner.loss()

    def _wait_recv(self, key: tuple[int, int, int], ins: Instruction) -> torch.Tensor:
        try:
            buf, handle, recv_ins = self._recvs.pop(key)
        except KeyError:
            raise CommError(
                peer=None, peer_name="no peer", action=self._where(ins), detail="its receive was never posted"
            ) from None
        try:
            handle.wait(self.timeout_s)
        except CommError as exc:
            raise exc.with_action(self._where(recv_ins)) from None
        return buf

    def finish_sends(self) -> None:
        """Wait for every posted send (the step cannot commit before they are delivered)."""
        sends, self._sends = self._sends, []
        for handle, _tensor, ins in sends:
            try:
                handle.wait(self.timeout_s)
            except CommError as exc:
                raise exc.with_action(self._where(ins)) from None

    def _where(self, ins: Instruction) -> str:
        return f"{ins.action}" + (f" of {self.label}" if self.label else "")

    def discard(self) -> None:
        """Forget every pending message and saved activation (an aborted or finished step)."""
        self._recvs.clear()
        self._local.clear()
        self._outputs.clear()
        self._sends.clear()
        self.runner.discard()


def stage_peers(schedule: Schedule, replica: int, world_rank_of: Mapping[tuple[int, int], int]) -> Callable[[int], int]:
    """Stage -> world rank of the worker that holds it in ``replica`` (pipeline rank = stage's rank).

    Args:
        schedule: The lowered schedule (its ``stage_to_rank``).
        replica: The data-parallel replica, 0-based.
        world_rank_of: ``(pipeline rank, replica)`` -> world rank.

    Returns:
        A function from stage to world rank (a ``KeyError`` for an unknown pair).
    """
    s2r = schedule.stage_to_rank

    def peer(stage: int) -> int:
        return world_rank_of[(s2r[stage], replica)]

    return peer
