"""The schedule IR: actions, per-rank action lists, placements, and their text and CSV forms.

An :class:`Action` is one thing one pipeline rank does for one model chunk ("stage") and one
microbatch: compute forward ``F`` or backward ``B`` (or ``R``: re-run a forward whose saved
activations were dropped, before its backward; selective recompute), or move an activation
(``SEND_F``/``RECV_F``) or a gradient (``SEND_B``/``RECV_B``) to or from another stage. Actions print as ``1F0`` (stage 1,
forward, microbatch 0) and ``0SEND_F1`` (stage 0 sends the forward activation of microbatch 1).
A communication action names its peer stage; the text form shows it (``0SEND_F1>2``) only when
it is not the pipeline neighbour (stage + 1 for activations, stage - 1 for gradients).

A :class:`Schedule` holds one ordered action list per pipeline rank, which stages each rank owns,
and every microbatch's path through the stages (all stages in order unless a SkipPipe-style or
CheckFree+ schedule says otherwise). Generators emit compute-only schedules; passes lower them.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from spotpipe.errors import SpotpipeError


class Op(str, Enum):
    """What an action does. Compute ops first, then communication."""

    F = "F"  # forward of one chunk for one microbatch
    B = "B"  # backward (input and weight gradients)
    R = "R"  # recompute: re-run the forward of a chunk whose F kept only its input (added by a pass)
    SEND_F = "SEND_F"  # send forward activation to the next stage of the path
    RECV_F = "RECV_F"  # receive forward activation from the previous stage of the path
    SEND_B = "SEND_B"  # send input gradient to the previous stage of the path
    RECV_B = "RECV_B"  # receive output gradient from the next stage of the path

    @property
    def is_compute(self) -> bool:
        return self in (Op.F, Op.B, Op.R)

    @property
    def is_comm(self) -> bool:
        return not self.is_compute

    @property
    def is_send(self) -> bool:
        return self in (Op.SEND_F, Op.SEND_B)

    @property
    def is_recv(self) -> bool:
        return self in (Op.RECV_F, Op.RECV_B)


# Peer offsets that the text form leaves out.
_DEFAULT_PEER_OFFSET = {Op.SEND_F: +1, Op.RECV_F: -1, Op.SEND_B: -1, Op.RECV_B: +1}
# Which op on the peer matches a communication op.
MATCHING_OP = {Op.SEND_F: Op.RECV_F, Op.RECV_F: Op.SEND_F, Op.SEND_B: Op.RECV_B, Op.RECV_B: Op.SEND_B}


class ScheduleError(SpotpipeError):
    """A malformed action, schedule text or CSV."""


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: ``stage`` (model chunk), ``op``, ``microbatch``, and for
    communication the ``peer`` stage on the other end."""

    stage: int
    op: Op
    microbatch: int
    peer: int | None = None

    def __post_init__(self) -> None:
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(f"action {self.stage}{self.op.value}{self.microbatch}: negative index")
        if self.op.is_comm and self.peer is None:
            object.__setattr__(self, "peer", self.stage + _DEFAULT_PEER_OFFSET[self.op])
        if self.op.is_compute and self.peer is not None:
            raise ScheduleError(f"action {self.stage}{self.op.value}{self.microbatch}: compute actions have no peer")

    def __str__(self) -> str:
        text = f"{self.stage}{self.op.value}{self.microbatch}"
        if self.op.is_comm and self.peer != self.stage + _DEFAULT_PEER_OFFSET[self.op]:
            text += f">{self.peer}"
        return text

    def __repr__(self) -> str:
        return f"Action({self})"

    def matching(self) -> Action:
        """The action on the peer that completes this communication (send <-> recv)."""
        if not self.op.is_comm:
            raise ScheduleError(f"action {self}: only communication actions have a match")
        assert self.peer is not None
        return Action(self.peer, MATCHING_OP[self.op], self.microbatch, self.stage)

    def tag(self, num_microbatches: int) -> int:
        """Message identity for the transport, the same on sender and receiver.

        Unique per (direction, sending stage, microbatch) within one step.

        Args:
            num_microbatches: Microbatches per step of the schedule.

        Returns:
            ``(2 x sending stage + backward) x num_microbatches + microbatch``, a non-negative int.

        Raises:
            ScheduleError: for a compute action (it carries no message).
        """
        if not self.op.is_comm:
            raise ScheduleError(f"action {self}: compute actions carry no message")
        assert self.peer is not None
        sender = self.stage if self.op.is_send else self.peer
        backward = self.op in (Op.SEND_B, Op.RECV_B)
        return ((sender * 2 + int(backward)) * num_microbatches) + self.microbatch


_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|R)(\d+)(?:>(\d+))?$")


def parse_action(text: str) -> Action:
    """Parse ``1F0``, ``2B3``, ``1R2``, ``0SEND_F1`` or ``3RECV_F1>1`` into an :class:`Action`.

    Args:
        text: One action: stage, op (``F``, ``B``, ``R``, ``SEND_F``...), microbatch, and for
            communication an optional ``>PEER`` stage.

    Returns:
        The action (a communication action without a peer gets the adjacent stage).

    Raises:
        ScheduleError: for text that does not parse, a peer on a compute action, or a negative index.
    """
    m = _ACTION_RE.match(text.strip())
    if not m:
        raise ScheduleError(
            f"cannot parse action {text!r}: expected STAGE OP MICROBATCH like 1F0, 2B3, 0SEND_F1 or 3RECV_F1>1"
        )
    stage, op, mb, peer = m.groups()
    op_enum = Op(op)
    if peer is not None and op_enum.is_compute:
        raise ScheduleError(f"cannot parse action {text!r}: compute actions have no peer")
    return Action(int(stage), op_enum, int(mb), None if peer is None else int(peer))


def parse_actions(text: str) -> list[Action]:
    """Parse whitespace-separated actions.

    Args:
        text: Actions as :func:`parse_action` reads them, separated by whitespace.

    Returns:
        The actions, in order.

    Raises:
        ScheduleError: for the first action that does not parse.
    """
    return [parse_action(tok) for tok in text.split()]


@dataclass(frozen=True)
class Placement:
    """Which workers hold each pipeline rank: ``workers[rank]`` lists one worker id per replica."""

    workers: tuple[tuple[int, ...], ...]

    @staticmethod
    def dense(ranks: int, replicas: int) -> Placement:
        """Worker ``replica * ranks + rank`` holds ``rank`` of replica ``replica``.

        Args:
            ranks: Pipeline ranks.
            replicas: Data-parallel replicas.

        Returns:
            The placement, ``workers[rank][replica]`` = worker id.
        """
        return Placement(tuple(tuple(r * ranks + k for r in range(replicas)) for k in range(ranks)))

    @property
    def num_ranks(self) -> int:
        return len(self.workers)

    def rank_of(self, worker: int) -> tuple[int, int]:
        """(pipeline rank, replica) of a worker id.

        Args:
            worker: Worker id.

        Returns:
            ``(pipeline rank, replica)`` of ``worker``.

        Raises:
            ScheduleError: if ``worker`` is not in the placement.
        """
        for rank, ws in enumerate(self.workers):
            if worker in ws:
                return rank, ws.index(worker)
        raise ScheduleError(f"worker {worker} is not in the placement")


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered action lists plus the metadata needed to play them.

    Attributes:
        ranks: ``ranks[r]`` is the ordered actions of pipeline rank ``r``.
        num_stages: model chunks (pipeline ranks x virtual stages).
        num_microbatches: microbatches per step.
        stage_to_rank: which rank runs each stage.
        paths: per microbatch, the stages it visits in order; ``None`` means every stage in order.
        name: the generator that made it, for display.
        chunk_stage: for a schedule over nodes (SkipPipe, :mod:`spotpipe.schedule.nodepaths`),
            the model stage that each schedule stage is a copy of (``num_model_stages`` marks the
            head: final norm, LM head and loss); ``None`` for a schedule over stages.
    """

    ranks: tuple[tuple[Action, ...], ...]
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...] | None = None
    name: str = "custom"
    chunk_stage: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.stage_to_rank) != self.num_stages:
            raise ScheduleError(
                f"schedule {self.name}: stage_to_rank has {len(self.stage_to_rank)} entries for {self.num_stages} stages"
            )
        if self.paths is not None and len(self.paths) != self.num_microbatches:
            raise ScheduleError(
                f"schedule {self.name}: {len(self.paths)} paths for {self.num_microbatches} microbatches"
            )
        if self.chunk_stage is not None and len(self.chunk_stage) != self.num_stages:
            raise ScheduleError(
                f"schedule {self.name}: chunk_stage has {len(self.chunk_stage)} entries for {self.num_stages} stages"
            )

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def path(self, microbatch: int) -> tuple[int, ...]:
        """Stages that ``microbatch`` visits, in order.

        Args:
            microbatch: Microbatch index, ``0 <= microbatch < num_microbatches``.

        Returns:
            Its stages; every stage in order when the schedule has no ``paths``.
        """
        if self.paths is None:
            return tuple(range(self.num_stages))
        return self.paths[microbatch]

    def stages_of_rank(self, rank: int) -> tuple[int, ...]:
        """Stages (model chunks) that ``rank`` owns, in increasing order.

        Args:
            rank: Pipeline rank.

        Returns:
            Stage indices mapped to ``rank`` by ``stage_to_rank``.
        """
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def with_ranks(self, ranks: Sequence[Sequence[Action]], name: str | None = None) -> Schedule:
        """Same metadata, new action lists (what a pass returns).

        Args:
            ranks: One action list per rank.
            name: New name; ``None`` keeps this one.

        Returns:
            A new :class:`Schedule` (nothing is checked: validate it).
        """
        return Schedule(
            ranks=tuple(tuple(r) for r in ranks),
            num_stages=self.num_stages,
            num_microbatches=self.num_microbatches,
            stage_to_rank=self.stage_to_rank,
            paths=self.paths,
            name=self.name if name is None else name,
            chunk_stage=self.chunk_stage,
        )

    def is_lowered(self) -> bool:
        """True when communication actions are present."""
        return any(a.op.is_comm for acts in self.ranks for a in acts)

    # -- text form ---------------------------------------------------------------------------

    def to_text(self) -> str:
        """One line per rank: ``rank 0: 0F0 0F1 0B0 ...``."""
        return "\n".join(f"rank {r}: " + " ".join(str(a) for a in acts) for r, acts in enumerate(self.ranks))

    @staticmethod
    def from_rank_texts(
        texts: Sequence[str],
        num_microbatches: int | None = None,
        stage_to_rank: Sequence[int] | None = None,
        paths: Sequence[Sequence[int]] | None = None,
        name: str = "custom",
    ) -> Schedule:
        """Build a schedule from one action string per rank (``"0F0 0F1 0B0 0B1"``).

        Missing metadata is derived: stages from the compute actions each rank holds, microbatches
        from the largest index.

        Args:
            texts: One action string per rank.
            num_microbatches: Microbatches per step; ``None``: largest index + 1.
            stage_to_rank: Rank of each stage; ``None``: derived from the compute actions.
            paths: Per-microbatch stage paths; ``None``: every stage in order.
            name: Name of the schedule.

        Returns:
            The schedule.

        Raises:
            ScheduleError: for an action that does not parse, or metadata that cannot be derived.
        """
        ranks = [parse_actions(t) for t in texts]
        return _with_derived_metadata(ranks, num_microbatches, stage_to_rank, paths, name)

    # -- CSV ---------------------------------------------------------------------------------

    def to_csv(self) -> str:
        """CSV with ``# key=value`` metadata lines, then ``rank,index,action`` rows."""
        out = io.StringIO()
        out.write(f"# name={self.name}\n")
        out.write(f"# num_stages={self.num_stages}\n")
        out.write(f"# num_microbatches={self.num_microbatches}\n")
        out.write("# stage_to_rank=" + " ".join(map(str, self.stage_to_rank)) + "\n")
        out.write(f"# num_ranks={self.num_ranks}\n")  # idle ranks (no rows) at the end count too
        if self.paths is not None:
            out.write("# paths=" + ";".join(" ".join(map(str, p)) for p in self.paths) + "\n")
        if self.chunk_stage is not None:
            out.write("# chunk_stage=" + " ".join(map(str, self.chunk_stage)) + "\n")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["rank", "index", "action"])
        for r, acts in enumerate(self.ranks):
            for i, a in enumerate(acts):
                writer.writerow([r, i, str(a)])
        return out.getvalue()

    @staticmethod
    def from_csv(text: str, where: str = "schedule CSV") -> Schedule:
        """Inverse of :meth:`to_csv`; errors name the line.

        Args:
            text: CSV as :meth:`to_csv` writes it (``# key = value`` metadata lines, then
                ``rank,index,action`` rows).
            where: Name of the source in error messages.

        Returns:
            The schedule.

        Raises:
            ScheduleError: for a bad header, row, action or metadata, naming the line.
        """
        meta: dict[str, str] = {}
        rows: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith("#"):
                key, _, value = line[1:].strip().partition("=")
                meta[key.strip()] = value.strip()
            elif line.strip():
                rows.append(line)
        reader = csv.reader(rows)
        header = next(reader, None)
        if header != ["rank", "index", "action"]:
            raise ScheduleError(f"{where}: expected header rank,index,action, got {header}")
        per_rank: dict[int, list[tuple[int, Action]]] = {}
        for number, row in enumerate(reader, 2):
            try:
                rank, index, action = int(row[0]), int(row[1]), parse_action(row[2])
            except (ValueError, IndexError, ScheduleError) as exc:
                raise ScheduleError(f"{where}: row {number}: {row}: {exc}") from None
            if rank < 0 or index < 0:
                raise ScheduleError(f"{where}: row {number}: {row}: rank and index must be >= 0")
            per_rank.setdefault(rank, []).append((index, action))
        if not per_rank:
            raise ScheduleError(f"{where}: no actions after the header; a schedule needs at least one rank with actions")
        try:
            n_ranks = max(max(per_rank) + 1, int(meta.get("num_ranks", 0)))
        except ValueError:
            raise ScheduleError(f"{where}: bad metadata line num_ranks={meta['num_ranks']!r}") from None
        ranks = [[a for _, a in sorted(per_rank.get(r, []))] for r in range(n_ranks)]
        try:
            s2r = [int(x) for x in meta["stage_to_rank"].split()] if "stage_to_rank" in meta else None
            mbs = int(meta["num_microbatches"]) if "num_microbatches" in meta else None
            paths = (
                [[int(x) for x in p.split()] for p in meta["paths"].split(";")] if meta.get("paths") else None
            )
            chunks = tuple(int(x) for x in meta["chunk_stage"].split()) if meta.get("chunk_stage") else None
        except ValueError as exc:
            raise ScheduleError(f"{where}: bad metadata line: {exc}") from None
        out = _with_derived_metadata(ranks, mbs, s2r, paths, meta.get("name", "custom"))
        if chunks is None:
            return out
        try:
            return replace(out, chunk_stage=chunks)
        except ScheduleError as exc:
            raise ScheduleError(f"{where}: {exc}") from None


def _with_derived_metadata(
    ranks: Sequence[Sequence[Action]],
    num_microbatches: int | None,
    stage_to_rank: Sequence[int] | None,
    paths: Sequence[Sequence[int]] | None,
    name: str,
) -> Schedule:
    if stage_to_rank is None:
        owner: dict[int, int] = {}
        for r, acts in enumerate(ranks):
            for a in acts:
                if a.op.is_compute:
                    if owner.setdefault(a.stage, r) != r:
                        raise ScheduleError(f"stage {a.stage} has compute actions on ranks {owner[a.stage]} and {r}")
        if owner and sorted(owner) != list(range(max(owner) + 1)):
            raise ScheduleError(f"stages {sorted(owner)} are not contiguous from 0")
        stage_to_rank = [owner[s] for s in sorted(owner)]
    if num_microbatches is None:
        num_microbatches = 1 + max((a.microbatch for acts in ranks for a in acts), default=-1)
    return Schedule(
        ranks=tuple(tuple(r) for r in ranks),
        num_stages=len(stage_to_rank),
        num_microbatches=num_microbatches,
        stage_to_rank=tuple(stage_to_rank),
        paths=None if paths is None else tuple(tuple(p) for p in paths),
        name=name,
    )


def actions_text(actions: Iterable[Action]) -> str:
    """Space-separated text of actions (the inverse of :func:`parse_actions`).

    Args:
        actions: Actions in order.

    Returns:
        Their texts joined by single spaces.
    """
    return " ".join(str(a) for a in actions)
