"""One stage's state and its one flat serialisation.

A :class:`StageState` is what a worker holds for its role (and what a mirror holds for the stage it
keeps): the model chunks, their optimizer (behind :class:`~spotpipe.runtime.state.optimizer.
StageOptimizer`) and the per-chunk learning-rate scales. It travels and rests in one form, a flat
float32 CPU tensor (:meth:`StageState.flat`):

    for each chunk, in order: every state-dict tensor, then per parameter AdamW's ``exp_avg`` and
    ``exp_avg_sq``; then a tail that holds, per chunk, its ``lr_scale`` and per parameter its
    ``(step, has_state)`` (a chunk's parameters may differ: a CheckFree-rebuilt chunk has fresh
    moments for its blocks but the exact, older ones for its CheckFree+ embedding or head copy).

Checkpoints (:mod:`spotpipe.runtime.worker.worker`), mirrors (:mod:`spotpipe.runtime.worker.mirror`)
and recovery transfers (:mod:`spotpipe.runtime.worker.strategies`) all use it, and so do the
single-process trainer and the in-process convergence mode (:mod:`spotpipe.runtime.inprocess`),
which hold every chunk in one state and move one chunk's part through :meth:`StageState.view`.
Both ends build the layout from their own chunks, which have identical shapes, so nothing but the
numbers moves (the path checkpointless training takes: SageMaker HyperPod, 2025). float32 holds
fp32, bf16 and fp16 values exactly, and AdamW's step count exactly up to 2**24 steps. A 16-bit
model's weights travel as their float32 masters (:mod:`spotpipe.runtime.state.master`), read and
written through the optimizer's ``master``, so a rebuilt stage continues bit for bit.

The CheckFree rebuild (Blagoev, Ersoy, Chen 2025, section 3.1) reads the neighbours' *blocks*
only (:meth:`StageState.blocks_flat`, with the gradient norm omega appended) and installs their
weighted average with fresh optimizer state and the plan's learning-rate factor
(:meth:`StageState.install_checkfree`). CheckFree+ copies of the embedding or norm + head
(section 3.2) travel with :meth:`StageState.tied_flat` / :meth:`StageState.install_tied`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from spotpipe.runtime.state.optimizer import StageOptimizer
from spotpipe.runtime.state.rules import BLOCK_PREFIX, checkfree_rebuild, complete_state

FORMAT = "spotpipe-stage-state/2"


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).float().cpu()


class StageState:
    """Chunks, optimizer and learning-rate scales of one worker (or one mirror).

    Args:
        chunks: Chunk index -> module (a :class:`~spotpipe.model.stages.StageModule`).
        optimizer: Their optimizer.
        lr_scale: Chunk index -> learning-rate factor (1.0; CheckFree's rebuilt chunk 1.1).
    """

    def __init__(self, chunks: Mapping[int, Any], optimizer: StageOptimizer, lr_scale: Mapping[int, float] | None = None) -> None:
        self.chunks: dict[int, Any] = dict(chunks)
        self.optimizer = optimizer
        self.lr_scale: dict[int, float] = {s: 1.0 for s in self.chunks} if lr_scale is None else dict(lr_scale)

    # -- the update ------------------------------------------------------------------------------

    def apply_update(self, flat_grad: torch.Tensor, coef: float, lr: float) -> None:
        """Clip (multiply ``flat_grad``, the buffer every ``.grad`` views, by ``coef`` < 1), then one
        optimizer step at base rate ``lr``. The one update rule of a worker and of the mirror that
        replays it, so the two stay bit for bit equal.

        Args:
            flat_grad: The flat gradient buffer of the stage; scaled in place.
            coef: The clip coefficient (:func:`~spotpipe.runtime.state.optim.clip_coefficient`).
            lr: Base learning rate of this step.
        """
        if coef < 1.0:
            flat_grad.mul_(coef)
        self.step(lr)

    def step(self, lr: float) -> None:
        """One optimizer step of every chunk at base rate ``lr`` times the chunk's :attr:`lr_scale`
        (gradients already clipped; the single-process reference clips its own ``.grad``).

        Args:
            lr: Base learning rate of this step.
        """
        self.optimizer.step(lr, self.lr_scale)

    def view(self, chunks: Iterable[int], part: str | None = None) -> StageState:
        """The state of some of these chunks, sharing their modules, the optimizer and the
        learning-rate scales: what the view loads or installs lands in this state.

        One process that holds every chunk (the single-process reference and the in-process
        convergence mode, :mod:`spotpipe.runtime.inprocess`) moves a chunk's state through a view in
        the one flat form: ``view([s]).flat()`` is what a worker of chunk ``s`` holds and sends.

        Args:
            chunks: Chunk indices, each held here.
            part: A submodule of every chunk to restrict the view to, or None for whole chunks.
                ``"blocks"`` is the transformer blocks with their moments: what a CheckFree+ swap
                partner shares with a lost edge stage (Blagoev, Ersoy, Chen 2025, section 3.2).
                A part view has no :meth:`tied_flat`.

        Returns:
            A :class:`StageState` over ``{s: chunk s (or its part)}``.

        Raises:
            KeyError: If a chunk is not held here.
            AttributeError: If a chunk has no submodule ``part``.
        """
        picked = {s: self.chunks[s] if part is None else getattr(self.chunks[s], part) for s in chunks}
        out = StageState(picked, self.optimizer)
        out.lr_scale = self.lr_scale  # the same dict: a view's load_flat sets this state's scales
        return out

    def attach_flat_gradient(self, device: torch.device | None = None) -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
        """One contiguous gradient buffer whose views are every trainable parameter's ``.grad``, so
        autograd accumulates in place, an all-reduce is one collective without copies, and a
        mirror replays the owner's update from the same layout.

        Args:
            device: Where the buffer lives (default: CPU).

        Returns:
            ``(flat_grad, params)``: the buffer (length = trainable elements, the parameters'
            dtype) and the parameters in its order (chunks ascending, module order within).
        """
        params = self._trainable()
        dtype = params[0].dtype if params else torch.float32
        flat = torch.zeros(sum(q.numel() for q in params), dtype=dtype, device=device)
        self.use_gradient(flat)
        return flat, params

    def _trainable(self) -> list[torch.nn.Parameter]:
        """Trainable parameters in the flat gradient's order (chunks ascending, module order within)."""
        return [q for s in sorted(self.chunks) for q in self.chunks[s].parameters() if q.requires_grad]

    def use_gradient(self, flat: torch.Tensor) -> None:
        """Make every trainable parameter's ``.grad`` a view of ``flat`` (the layout of
        :meth:`attach_flat_gradient`), so the next update reads it without a copy: a mirror holder
        applies an owner's gradient straight from the buffer it was received into.

        Args:
            flat: 1-D tensor of the trainable elements, in the parameters' dtype and device.

        Raises:
            ValueError: If ``flat`` has another length.
        """
        params = self._trainable()
        if flat.numel() != sum(q.numel() for q in params):
            raise ValueError(f"flat gradient has {flat.numel()} numbers, the chunks need {sum(q.numel() for q in params)}")
        offset = 0
        for q in params:
            q.grad = flat[offset : offset + q.numel()].view_as(q)
            offset += q.numel()

    def tied_parameters(self) -> list[torch.nn.Parameter]:
        """The CheckFree+ in-sync copies this state holds (embedding or norm + head), in order."""
        return [q for s in sorted(self.chunks) for q in self.chunks[s].tied_parameters()]

    # -- weights, through their float32 masters where the model has them ----------------------

    def _tensors(self, s: int) -> dict[str, torch.Tensor]:
        """Chunk ``s``'s state dict, parameters as themselves (not detached copies)."""
        return self.chunks[s].state_dict(keep_vars=True)

    def _read(self, s: int, v: torch.Tensor) -> torch.Tensor:
        """The values of weight or buffer ``v`` of chunk ``s`` as float32 CPU numbers: its float32
        master where the optimizer keeps one (:mod:`spotpipe.runtime.state.master`)."""
        m = self.optimizer.master(s, v)
        return _f32(v if m is None else m)

    def _write(self, s: int, v: torch.Tensor, values: torch.Tensor) -> None:
        """Set weight or buffer ``v`` of chunk ``s`` (and its float32 master) to ``values`` (same
        number of elements, float32)."""
        m = self.optimizer.master(s, v)
        with torch.no_grad():
            v.copy_(values.view_as(v).to(v.dtype))
            if m is not None:
                m.copy_(values.view_as(m))

    # -- the flat form ---------------------------------------------------------------------------

    def numel(self, blocks_only: bool = False) -> int:
        """Length of :meth:`flat` (or of :meth:`blocks_flat` with ``blocks_only``).

        Args:
            blocks_only: Count the blocks' tensors and the ``omega`` slot only.

        Returns:
            A number of float32 elements.
        """
        n = 0
        for s in sorted(self.chunks):
            for k, v in self.chunks[s].state_dict().items():
                if not blocks_only or k.startswith(BLOCK_PREFIX):
                    n += v.numel()
            if not blocks_only:
                n += 2 * sum(p.numel() for p in self.chunks[s].parameters())
        if blocks_only:
            return n + 1
        return n + len(self.chunks) + 2 * sum(1 for s in self.chunks for _ in self.chunks[s].parameters())

    def flat(self) -> torch.Tensor:
        """The whole state as one float32 CPU tensor of :meth:`numel` numbers (layout: module doc)."""
        parts: list[torch.Tensor] = []
        tail: list[float] = []
        for s in sorted(self.chunks):
            parts += [self._read(s, v) for v in self._tensors(s).values()]
            tail.append(float(self.lr_scale.get(s, 1.0)))
            for p in self.chunks[s].parameters():
                m = self.optimizer.moments(s, p)
                if m is None:
                    parts += [torch.zeros(p.numel()), torch.zeros(p.numel())]
                    tail += [0.0, 0.0]
                else:
                    parts += [_f32(m[0]), _f32(m[1])]
                    tail += [m[2], 1.0]
        parts.append(torch.tensor(tail, dtype=torch.float32))
        return torch.cat(parts)

    def load_flat(self, flat: torch.Tensor) -> None:
        """Install a :meth:`flat` tensor made from same-shaped chunks (in place: ``.grad`` views stay).

        Args:
            flat: A float32 tensor ``[numel()]``.

        Raises:
            ValueError: If ``flat`` does not have :meth:`numel` numbers.
        """
        if flat.numel() != self.numel():
            raise ValueError(f"flat stage state has {flat.numel()} numbers, the chunks need {self.numel()}")
        off = 0
        pending: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = []
        for s in sorted(self.chunks):
            for v in self._tensors(s).values():
                n = v.numel()
                self._write(s, v, flat[off : off + n])
                off += n
            moments = []
            for p in self.chunks[s].parameters():
                n = p.numel()
                moments.append((p, flat[off : off + n].view_as(p), flat[off + n : off + 2 * n].view_as(p)))
                off += 2 * n
            pending.append((s, moments))
        tail = [float(x) for x in flat[off:]]
        t = 0
        for s, moments in pending:
            self.lr_scale[s] = float(torch.tensor(tail[t], dtype=torch.float32))  # what the flat state carries, exactly
            t += 1
            for p, a, b in moments:
                step, has = tail[t], tail[t + 1]
                t += 2
                self.optimizer.clear(s, p)
                if has > 0:
                    self.optimizer.set_moments(s, p, a, b, step)

    # -- CheckFree: the neighbours' blocks -------------------------------------------------------

    def blocks_flat(self, omega: float) -> torch.Tensor:
        """The block tensors of every chunk, then the gradient norm ``omega`` (CheckFree's weight).

        Args:
            omega: The stage's gradient norm of its last step (before clipping).

        Returns:
            A float32 CPU tensor ``[numel(blocks_only=True)]``.
        """
        parts = [self._read(s, v) for s in sorted(self.chunks) for k, v in self._tensors(s).items() if k.startswith(BLOCK_PREFIX)]
        parts.append(torch.tensor([omega], dtype=torch.float32))
        return torch.cat(parts)

    def install_checkfree(self, prev: torch.Tensor, nxt: torch.Tensor, lr_factor: float) -> tuple[float, float]:
        """Rebuild every chunk's blocks as the omega-weighted average of the neighbours'
        (:func:`~spotpipe.runtime.state.rules.checkfree_rebuild`), with fresh optimizer state and
        learning-rate factor ``lr_factor`` (CheckFree, section 3.1).

        Args:
            prev: The previous stage's :meth:`blocks_flat`.
            nxt: The next stage's :meth:`blocks_flat`.
            lr_factor: The plan's learning-rate factor (1.1 for CheckFree).

        Returns:
            The two weights (omega_prev, omega_next).
        """
        w_prev, w_next = float(prev[-1]), float(nxt[-1])
        off = 0
        for s in sorted(self.chunks):
            sd = self._tensors(s)
            pa: dict[str, torch.Tensor] = {}
            pb: dict[str, torch.Tensor] = {}
            for k, v in sd.items():
                if k.startswith(BLOCK_PREFIX):
                    n = v.numel()
                    pa[k] = prev[off : off + n].view_as(v)
                    pb[k] = nxt[off : off + n].view_as(v)
                    off += n
            rebuilt = checkfree_rebuild({"model": pa}, {"model": pb}, w_prev, w_next)
            model = {k: (rebuilt[k] if k in rebuilt else v) for k, v in sd.items()}
            complete_state({"model": sd}, {"model": model})
            for k, v in rebuilt.items():
                self._write(s, sd[k], v.reshape(-1).float())
            self.optimizer.clear(s)
            self.lr_scale[s] = float(torch.tensor(lr_factor, dtype=torch.float32))  # what the flat state carries, exactly
        return w_prev, w_next

    # -- CheckFree+: the in-sync copies ----------------------------------------------------------

    def tied_numel(self) -> int:
        """Length of :meth:`tied_flat`."""
        return 3 * sum(q.numel() for q in self.tied_parameters()) + 2

    def tied_flat(self) -> torch.Tensor:
        """Weights and AdamW moments of the in-sync copies, then ``(step, has_state)``."""
        chunk = min(self.chunks)
        parts: list[torch.Tensor] = []
        step, has = 0.0, 0.0
        for q in self.tied_parameters():
            m = self.optimizer.moments(chunk, q)
            parts.append(self._read(chunk, q))
            if m is None:
                parts += [torch.zeros(q.numel()), torch.zeros(q.numel())]
            else:
                has = 1.0
                parts += [_f32(m[0]), _f32(m[1])]
                step = m[2]
        parts.append(torch.tensor([step, has], dtype=torch.float32))
        return torch.cat(parts)

    def install_tied(self, flat: torch.Tensor) -> None:
        """Install a :meth:`tied_flat` tensor of same-shaped copies.

        Args:
            flat: A float32 tensor ``[tied_numel()]``.

        Raises:
            ValueError: If the length does not match :meth:`tied_numel`.
        """
        if flat.numel() != self.tied_numel():
            raise ValueError(f"flat copy state has {flat.numel()} numbers, the copies need {self.tied_numel()}")
        chunk = min(self.chunks)
        step, has = (float(x) for x in flat[-2:])
        off = 0
        for q in self.tied_parameters():
            n = q.numel()
            self._write(chunk, q, flat[off : off + n])
            a, b = flat[off + n : off + 2 * n].view_as(q), flat[off + 2 * n : off + 3 * n].view_as(q)
            off += 3 * n
            self.optimizer.clear(chunk, q)
            if has > 0:
                self.optimizer.set_moments(chunk, q, a, b, step)

    # -- checkpoints -----------------------------------------------------------------------------

    def to_checkpoint(self) -> dict[str, Any]:
        """The picklable form a checkpoint file holds: the format tag, the chunk list and :meth:`flat`."""
        return {"format": FORMAT, "chunks": sorted(self.chunks), "flat": self.flat()}

    def load_checkpoint(self, saved: Mapping[str, Any], where: str) -> None:
        """Install :meth:`to_checkpoint` output.

        Args:
            saved: What the checkpoint file holds.
            where: The file, for errors.

        Raises:
            ValueError: If the format or the chunks do not match, naming ``where``.
        """
        if saved.get("format") != FORMAT:
            raise ValueError(f"{where}: not a spotpipe stage state of format {FORMAT} (found {saved.get('format')!r})")
        if list(saved.get("chunks", [])) != sorted(self.chunks):
            raise ValueError(f"{where} holds chunks {list(saved.get('chunks', []))}, this worker has {sorted(self.chunks)}")
        self.load_flat(saved["flat"])
