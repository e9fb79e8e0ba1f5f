"""Checkpoints: per-stage state files and a manifest, written atomically with checksums.

Layout under the run directory::

    checkpoints/step-000049/rank0.pt ... rank3.pt   one file per pipeline rank (its replica 0)
    checkpoints/step-000049/manifest.json           written last, by the controller

A state file is ``SPOTPIPE-CKPT 1\\n``, the SHA-256 of the payload in hex and ``\\n``, then the
payload (``torch.save`` of the rank's model chunks, optimizers, learning-rate scales, sampler
state and step). Every file is written to a temporary name, fsynced and renamed, and the directory
fsynced, so a crash leaves either the old state or the new one, never a torn file. The manifest
appears only when every rank's file is in place: a checkpoint without a manifest is incomplete and
ignored. Loading checks both the file's own checksum and the manifest's.

``step`` in a checkpoint is the 0-based index of the last step it contains; a resumed run starts
at ``step + 1`` with the saved sampler state, so its losses equal the uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import write_atomic

MAGIC = b"SPOTPIPE-CKPT 1\n"
MANIFEST = "manifest.json"
FORMAT = "spotpipe-checkpoint"


class CheckpointError(SpotpipeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the job."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint of ``step``: ``<run_dir>/checkpoints/step-NNNNNN``.

    Args:
        run_dir: The run's folder (``run.dir``).
        step: 0-based index of the last step the checkpoint holds.

    Returns:
        The path (not created).
    """
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def rank_file_name(rank: int) -> str:
    """The state file name of one pipeline rank inside a checkpoint folder.

    Args:
        rank: Pipeline rank, 0-based.

    Returns:
        ``rank<rank>.pt``.
    """
    return f"rank{rank}.pt"


def save_state(path: str | Path, state: dict[str, Any]) -> str:
    """Serialise ``state`` (tensors, numbers, strings, dicts, lists) to ``path``; return its SHA-256.

    The file is the magic header, the hex SHA-256 of the payload and a newline, then the
    ``torch.save`` payload, written atomically.

    Args:
        path: Destination file.
        state: The state to save.

    Returns:
        The payload's SHA-256, 64 hex digits.

    Raises:
        OSError: if the file cannot be written.
    """
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    write_atomic(Path(path), MAGIC + digest.encode() + b"\n" + payload)
    return digest


def load_state(path: str | Path, expected_sha256: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a state file written by :func:`save_state`, checking its checksum(s).

    Args:
        path: A file written by :func:`save_state`.
        expected_sha256: The manifest's checksum of the payload, or ``None`` to check only the header's.
        map_location: Where ``torch.load`` puts the tensors (CPU by default).

    Returns:
        The saved state (loaded with ``weights_only=True``).

    Raises:
        CheckpointError: missing file, bad header, checksum mismatch, or unreadable payload.
    """
    import torch

    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {p} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {p}: {exc.strerror}") from None
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 65 or raw[len(MAGIC) + 64 : len(MAGIC) + 65] != b"\n":
        raise CheckpointError(f"checkpoint file {p} is corrupt: not a spotpipe checkpoint (bad header)")
    stored = raw[len(MAGIC) : len(MAGIC) + 64].decode("ascii", "replace")
    payload = raw[len(MAGIC) + 65 :]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != stored:
        raise CheckpointError(f"checkpoint file {p} is corrupt: its SHA-256 is {actual[:12]}..., the header says {stored[:12]}...")
    if expected_sha256 is not None and actual != expected_sha256:
        raise CheckpointError(
            f"checkpoint file {p} does not match its manifest: SHA-256 {actual[:12]}..., manifest {expected_sha256[:12]}..."
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {p} is corrupt: {' '.join(str(exc).split())[:120]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {p} is corrupt: expected a state dict")
    return state


@dataclass(frozen=True)
class Manifest:
    """A complete checkpoint.

    Attributes:
        dir: Its directory.
        step: 0-based index of the last step it holds.
        files: Pipeline rank -> (file name, SHA-256).
        layout: What must match to resume: chunk count, layers, model sizes, stages.
    """

    dir: Path
    step: int
    files: dict[int, tuple[str, str]]
    layout: dict[str, Any]

    def path(self, rank: int) -> Path:
        """The state file of pipeline rank ``rank``.

        Args:
            rank: Pipeline rank, a key of :attr:`files`.

        Returns:
            ``dir / file name``.

        Raises:
            KeyError: if the checkpoint has no file for ``rank``.
        """
        return self.dir / self.files[rank][0]

    def to_grant(self) -> dict[str, Any]:
        """What a worker needs to load its part (sent in its role grant)."""
        return {"dir": str(self.dir), "step": self.step, "files": {str(r): list(v) for r, v in self.files.items()}}


def write_manifest(directory: Path, step: int, files: dict[int, tuple[str, str]], layout: dict[str, Any]) -> Manifest:
    """Write the manifest last, atomically: from now on the checkpoint is complete.

    Args:
        directory: The checkpoint folder, holding the rank files already.
        step: 0-based index of the last step the checkpoint holds.
        files: Pipeline rank -> (file name, SHA-256 of its payload).
        layout: What must match to resume (:func:`check_layout`), JSON values.

    Returns:
        The manifest as written.

    Raises:
        OSError: if the manifest cannot be written.
    """
    body = {
        "format": FORMAT,
        "version": 1,
        "step": step,
        "layout": layout,
        "files": {str(rank): {"name": name, "sha256": sha} for rank, (name, sha) in sorted(files.items())},
    }
    write_atomic(directory / MANIFEST, (json.dumps(body, indent=1) + "\n").encode())
    return Manifest(directory, step, dict(files), dict(layout))


def read_manifest(directory: Path) -> Manifest:
    """Read the manifest of a checkpoint folder (its files are not checked; see :func:`verify_files`).

    Args:
        directory: The checkpoint folder.

    Returns:
        The manifest.

    Raises:
        CheckpointError: if the manifest is missing (an incomplete checkpoint) or corrupt.
    """
    path = directory / MANIFEST
    try:
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT:
            raise ValueError("not a spotpipe checkpoint manifest")
        files = {int(r): (str(v["name"]), str(v["sha256"])) for r, v in body["files"].items()}
        return Manifest(directory, int(body["step"]), files, dict(body.get("layout", {})))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {MANIFEST} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: {exc}") from None


def latest_checkpoint(run_dir: str | Path) -> Manifest | None:
    """The complete checkpoint with the highest step under ``run_dir`` (``None`` if there is none).

    Incomplete checkpoints (no manifest: a crash while saving) are skipped. The chosen one's files
    are checked for presence and checksum.

    Args:
        run_dir: The run's folder (``run.dir``).

    Returns:
        The manifest of that checkpoint, or ``None``.

    Raises:
        CheckpointError: the newest complete checkpoint is corrupt or has a missing file.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted((d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")), reverse=True)
    for d in candidates:
        if not (d / MANIFEST).exists():
            continue
        manifest = read_manifest(d)
        verify_files(manifest)
        return manifest
    return None


def verify_files(manifest: Manifest) -> None:
    """Check that every rank file exists and matches its checksum (reads them).

    Args:
        manifest: The checkpoint.

    Raises:
        CheckpointError: if a file is missing, has a bad header or does not match its checksum.
    """
    for rank, (name, sha) in sorted(manifest.files.items()):
        p = manifest.dir / name
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {manifest.dir}: file {name} of rank {rank} is missing") from None
        if not raw.startswith(MAGIC):
            raise CheckpointError(f"checkpoint file {p} is corrupt: not a spotpipe checkpoint (bad header)")
        actual = hashlib.sha256(raw[len(MAGIC) + 65 :]).hexdigest()
        if actual != sha:
            raise CheckpointError(
                f"checkpoint file {p} is corrupt: SHA-256 {actual[:12]}... does not match the manifest's {sha[:12]}..."
            )


def check_layout(manifest: Manifest, layout: dict[str, Any]) -> None:
    """Raise naming the first key where the job differs from what the checkpoint holds.

    Args:
        manifest: The checkpoint.
        layout: The job's layout (same keys as the manifest's; keys only one side has are ignored).

    Raises:
        CheckpointError: on the first key whose value differs.
    """
    for key, value in manifest.layout.items():
        if key in layout and layout[key] != value:
            raise CheckpointError(
                f"checkpoint {manifest.dir} was saved with {key} = {value!r}, this job has {layout[key]!r}; "
                f"resume with the same value"
            )
