"""The deterministic, resumable sequence sampler and the per-step data slicing.

The token stream is split once: the train split is the first ``1 - val_fraction`` of the tokens,
the validation split the rest. Each split is cut into non-overlapping windows of ``context + 1``
tokens (inputs are a window's first ``context`` tokens, targets its last ``context``); a sample id
is a window's index inside its split. Every epoch visits every window once, in a permutation drawn
from ``(seed, epoch)``, so the sampler's whole state is ``(seed, epoch, position)``: restoring it
gives exactly the same future ids, which is what lets a step be replayed with the same data after
a failure (atomic steps) and a run be resumed from a checkpoint.

Per step (the lowering contract of :mod:`spotpipe.schedule.passes`, "Data per step"): the sampler yields ``train.batch_size`` ids in
order; replica ``r`` of ``R`` takes ids ``[r B/R : (r+1) B/R]``; microbatch ``m`` of ``M`` takes the
``m``-th equal slice of that (:func:`microbatch_ids`, :func:`batch_for_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spotpipe.errors import SpotpipeError

SPLITS = ("train", "val")


def split_bounds(num_tokens: int, val_fraction: float, split: str) -> tuple[int, int]:
    """``[start, end)`` token range of ``split`` ("train": the first 1 - val_fraction, "val": the rest).

    Args:
        num_tokens: Tokens in the whole token file.
        val_fraction: Share of the tokens at the end that forms the validation split, in (0, 0.5).
        split: ``"train"`` or ``"val"``.

    Returns:
        ``(start, end)`` token offsets; the split boundary is ``int(num_tokens * (1 - val_fraction))``.

    Raises:
        ValueError: if ``split`` is neither ``"train"`` nor ``"val"``.
        SpotpipeError: if ``val_fraction`` is not in (0, 0.5).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 0.5:  # the range of data.val_fraction (config.validate)
        raise SpotpipeError(f"data.val_fraction must be in (0, 0.5), got {val_fraction}")
    cut = int(num_tokens * (1.0 - val_fraction))
    return (0, cut) if split == "train" else (cut, num_tokens)


class SequenceSampler:
    """Windows of ``context + 1`` tokens of one split, in a fresh permutation every epoch.

    Args:
        num_tokens: Tokens in the whole token file.
        context: Sequence length the model sees (``model.context``).
        seed: Permutation seed (``train.seed``).
        split: ``"train"`` or ``"val"``.
        val_fraction: Share of the tokens at the end that forms the validation split.
        name: What to call the token source in error messages (e.g. the token dir).

    Raises:
        SpotpipeError: if the split holds fewer than ``context + 1`` tokens.
    """

    def __init__(
        self,
        num_tokens: int,
        context: int,
        seed: int,
        split: str = "train",
        val_fraction: float = 0.05,
        name: str = "the token file",
    ) -> None:
        if context < 1:
            raise SpotpipeError(f"model.context must be >= 1, got {context}")
        self.num_tokens = num_tokens
        self.context = context
        self.window = context + 1
        self.seed = seed
        self.split = split
        self.val_fraction = val_fraction
        self.start, self.end = split_bounds(num_tokens, val_fraction, split)
        self.num_windows = (self.end - self.start) // self.window
        if self.num_windows < 1:
            raise SpotpipeError(
                f"{name} has {num_tokens} tokens; its {split} split ({self.end - self.start} tokens, "
                f"data.val_fraction={val_fraction}) holds no window of model.context + 1 = {self.window} tokens"
            )
        self.epoch = 0
        self.position = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def __len__(self) -> int:
        """Number of windows (samples) in one epoch."""
        return self.num_windows

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of window ids in ``epoch`` (drawn from ``(seed, epoch, split)``).

        Args:
            epoch: Epoch number, 0-based.

        Returns:
            A permutation of ``0 .. len(self) - 1`` (int64 array ``[len(self)]``), cached for the last
            epoch asked.
        """
        if self._perm_epoch != epoch or self._perm is None:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, SPLITS.index(self.split)])
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def next_ids(self, n: int) -> list[int]:
        """The next ``n`` sample ids; crosses into the next epoch (a new permutation) as needed.

        Args:
            n: How many ids, >= 0.

        Returns:
            ``n`` window ids of this split; the sampler's ``epoch`` and ``position`` advance past them.
        """
        ids: list[int] = []
        while len(ids) < n:
            perm = self.permutation(self.epoch)
            take = min(n - len(ids), self.num_windows - self.position)
            ids.extend(int(i) for i in perm[self.position : self.position + take])
            self.position += take
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
        return ids

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "seed"}``: everything needed to continue with the same ids."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly via JSON).

        Args:
            state: ``{"epoch", "position", "seed"}``, integers (or strings of them).

        Raises:
            SpotpipeError: if a key is missing or not an integer, or ``epoch``/``position`` are out of
                range for this split (another token file or context).
        """
        try:
            epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise SpotpipeError(f"sampler state {state!r} must hold integer epoch, position and seed") from None
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise SpotpipeError(
                f"sampler state {state!r} is out of range: position must be in [0, {self.num_windows}) for this "
                f"token file and context (was the run resumed with a different data.path or model.context?)"
            )
        self.epoch, self.position, self.seed = epoch, position, seed
        self._perm = None
        self._perm_epoch = -1

    def window_start(self, sample_id: int) -> int:
        """Offset in the token file of sample ``sample_id``'s first token.

        Args:
            sample_id: Window id in this split, ``0 .. len(self) - 1``.

        Returns:
            A token offset into the whole token file.

        Raises:
            IndexError: if ``sample_id`` is out of range.
        """
        if not 0 <= sample_id < self.num_windows:
            raise IndexError(f"sample id {sample_id} out of range [0, {self.num_windows}) of the {self.split} split")
        return self.start + sample_id * self.window

    def batch(self, token_file: Any, ids: Sequence[int]) -> np.ndarray:
        """Windows ``ids`` as an int64 array ``[len(ids), context + 1]``.

        Args:
            token_file: A :class:`~spotpipe.data.tokens.TokenFile` (or any object whose
                ``tokens`` is an array), or the token array itself.
            ids: Sample ids of this split.

        Returns:
            The windows, one row per id in order.

        Raises:
            IndexError: if an id is out of range for this split.
        """
        tokens = getattr(token_file, "tokens", token_file)
        out = np.empty((len(ids), self.window), dtype=np.int64)
        for row, sample_id in enumerate(ids):
            start = self.window_start(int(sample_id))
            out[row] = tokens[start : start + self.window]
        return out


def microbatch_slice(batch_size: int, replicas: int, microbatches: int, replica: int, microbatch: int) -> slice:
    """Positions in the step's id list of microbatch ``microbatch`` of replica ``replica``.

    Args:
        batch_size: Sample ids per step (``train.batch_size``).
        replicas: Data-parallel replicas ``R`` (``pipeline.replicas``).
        microbatches: Microbatches ``M`` per replica (``pipeline.microbatches``).
        replica: Which replica, ``0 .. R - 1``.
        microbatch: Which microbatch, ``0 .. M - 1``.

    Returns:
        A slice of ``batch_size / (R M)`` positions.

    Raises:
        SpotpipeError: if ``batch_size`` is not a multiple of ``replicas x microbatches``.
        IndexError: if ``replica`` or ``microbatch`` is out of range.
    """
    if batch_size % (replicas * microbatches):
        raise SpotpipeError(
            f"train.batch_size ({batch_size}) must be a multiple of pipeline.replicas x pipeline.microbatches ({replicas * microbatches})"
        )
    if not (0 <= replica < replicas and 0 <= microbatch < microbatches):
        raise IndexError(f"replica {replica} / microbatch {microbatch} out of range ({replicas} x {microbatches})")
    per_replica = batch_size // replicas
    per_mb = per_replica // microbatches
    start = replica * per_replica + microbatch * per_mb
    return slice(start, start + per_mb)


def microbatch_ids(step_ids: Sequence[int], replicas: int, microbatches: int, replica: int, microbatch: int) -> list[int]:
    """The sample ids of one microbatch of one replica, out of the step's ids.

    Args:
        step_ids: The step's ``train.batch_size`` sample ids, in sampler order.
        replicas: Data-parallel replicas ``R``.
        microbatches: Microbatches ``M`` per replica.
        replica: Which replica, ``0 .. R - 1``.
        microbatch: Which microbatch, ``0 .. M - 1``.

    Returns:
        ``len(step_ids) / (R M)`` sample ids (see :func:`microbatch_slice`).

    Raises:
        SpotpipeError: if ``len(step_ids)`` is not a multiple of ``R M``.
        IndexError: if ``replica`` or ``microbatch`` is out of range.
    """
    return list(step_ids[microbatch_slice(len(step_ids), replicas, microbatches, replica, microbatch)])


def batch_for_step(
    sampler: SequenceSampler,
    token_file: Any,
    step_ids: Sequence[int],
    replicas: int,
    microbatches: int,
    replica: int,
) -> list[np.ndarray]:
    """The ``microbatches`` arrays ``[B/(R M), context + 1]`` (int64) that replica ``replica`` trains on.

    Inputs are ``arr[:, :-1]``, targets ``arr[:, 1:]``.

    Args:
        sampler: The split's sampler (it maps ids to windows).
        token_file: A :class:`~spotpipe.data.tokens.TokenFile`, or the token array itself.
        step_ids: The step's ``train.batch_size`` sample ids.
        replicas: Data-parallel replicas ``R``.
        microbatches: Microbatches ``M`` per replica.
        replica: Which replica, ``0 .. R - 1``.

    Returns:
        ``M`` arrays, microbatch order.

    Raises:
        SpotpipeError: if ``len(step_ids)`` is not a multiple of ``R M``.
    """
    return [
        sampler.batch(token_file, microbatch_ids(step_ids, replicas, microbatches, replica, m))
        for m in range(microbatches)
    ]
