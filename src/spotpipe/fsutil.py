"""Files in and out: checked output paths, crash-safe writes, UTF-8 text inputs.

Every command writes through these helpers, so a path that cannot be written (under a regular
file, on a read-only or full file system, without permission) ends in one
:class:`~spotpipe.errors.SpotpipeError` line naming the path and the reason, before any work is
done where that can be checked, and at the write otherwise. Writes go through a temporary name,
fsync and rename, so a crash leaves either the old file or the new one. Text inputs are read as
UTF-8; a file that is not ends in one line naming the file, the byte offset and the line.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

from spotpipe.errors import SpotpipeError

UTF8_BOM = "\ufeff"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (best effort where unsupported).

    Args:
        path: The directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def output_error(path: str | Path, what: str, reason: str) -> SpotpipeError:
    """The one-line error of an output that cannot be written.

    Args:
        path: The output path as the user gave it.
        what: The option or key it came from (``--out``, ``run.dir``), or a short description.
        reason: Why, e.g. ``README.md is not a directory`` or ``No space left on device``.

    Returns:
        A :class:`SpotpipeError` to raise.
    """
    return SpotpipeError(f"cannot write {what} {path}: {reason}")


def check_output(path: str | Path, what: str, kind: Literal["file", "dir"] = "file") -> Path:
    """Check, before any work, that ``path`` can be written; create nothing.

    The path's nearest existing ancestor must be a directory in which an entry can be created
    (probed with a temporary directory that is removed at once, so read-only file systems,
    missing permissions and pseudo file systems are caught), on a file system with free space.
    An existing ``path`` must be of the right kind (a directory for ``kind="dir"``, not a
    directory for ``kind="file"``) and writable.

    Args:
        path: The file or directory to be written.
        what: The option or key that named it, used in the error.
        kind: ``"file"`` or ``"dir"``.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        SpotpipeError: one line naming ``what``, the path and the reason.
    """
    p = Path(path)
    if str(path) == "":
        raise output_error("''", what, "the path is empty")
    if p.exists():
        if kind == "file" and p.is_dir():
            raise output_error(p, what, "it is a directory")
        if kind == "dir" and not p.is_dir():
            raise output_error(p, what, "it exists and is not a directory")
        if not os.access(p, os.W_OK):
            raise output_error(p, what, "permission denied")
    ancestor = (p if kind == "dir" and p.is_dir() else p.parent).absolute()
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        shown = ancestor if p.is_absolute() else os.path.relpath(ancestor)
        raise output_error(p, what, f"{shown} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".spotpipe-probe-", dir=ancestor)
    except OSError as exc:
        raise output_error(p, what, f"cannot create anything in {ancestor} ({_reason(exc)})") from None
    os.rmdir(probe)
    try:
        st = os.statvfs(ancestor)
    except OSError:
        return p
    if st.f_blocks > 0 and st.f_bavail == 0:
        raise output_error(p, what, f"no space left on the file system of {ancestor}")
    return p


def write_atomic(path: Path, data: bytes, what: str | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename.

    A symbolic link is followed (its target is replaced, the link stays); an existing path that is
    not a regular file (a device such as ``/dev/stdout``, a FIFO) is written into directly.

    Args:
        path: Destination; missing parent directories are created.
        data: The bytes to write.
        what: When given, an :class:`OSError` (full disk, read-only file system, ...) becomes one
            :class:`SpotpipeError` line naming ``what`` and the path; when ``None`` it propagates.
    """
    path = Path(os.path.realpath(path)) if path.is_symlink() else path  # write the link's target, keep the link
    if path.exists() and not path.is_file():  # a device, FIFO or socket: write into it, never replace it
        try:
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
        except OSError as exc:
            if what is None:
                raise
            raise output_error(path, what, _reason(exc)) from None
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    except OSError as exc:
        if what is None:
            raise
        raise output_error(path, what, _reason(exc)) from None
    fsync_dir(path.parent)


def write_output(path: str | Path, data: str | bytes, what: str) -> Path:
    """Check ``path`` (:func:`check_output`) and write ``data`` to it atomically.

    Args:
        path: The output file.
        data: Text (written as UTF-8) or bytes.
        what: The option or key that named the file, used in errors.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        SpotpipeError: one line naming ``what``, the path and the reason.
    """
    p = check_output(path, what)
    write_atomic(p, data.encode("utf-8") if isinstance(data, str) else data, what)
    return p


@contextmanager
def open_output(path: str | Path, what: str, mode: Literal["w", "a"] = "w") -> Iterator[IO[str]]:
    """Open a text output for streaming writes; an :class:`OSError` while opening, writing or
    closing becomes one :class:`SpotpipeError` line naming ``what`` and the path.

    Args:
        path: The output file (its parent directories are created).
        what: The option or key that named the file.
        mode: ``"w"`` (replace) or ``"a"`` (append).

    Yields:
        The open text file (UTF-8).

    Raises:
        SpotpipeError: if ``path`` cannot be written (checked first by :func:`check_output`), or
            on an OSError while opening, writing or closing.
    """
    p = check_output(path, what)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, mode, encoding="utf-8") as fh:
            yield fh
    except OSError as exc:
        raise output_error(p, what, _reason(exc)) from None


# ----------------------------------------------------------------------------------------------
# Text inputs


def decode_utf8(data: bytes, path: str | Path, what: str = "") -> str:
    """``data`` (the contents of ``path``) as text; a leading byte-order mark is dropped.

    Args:
        data: Raw file contents.
        path: The file they came from, named in errors.
        what: What the file is (``config file``), named in errors.

    Returns:
        The decoded text.

    Raises:
        SpotpipeError: naming the file, the first offending byte, its offset and line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        label = f"{what} {path}" if what else str(path)
        raise SpotpipeError(
            f"{label} is not UTF-8 text: byte 0x{data[exc.start]:02X} at offset {exc.start} (line {line}); "
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return text[1:] if text.startswith(UTF8_BOM) else text


def read_text(path: str | Path, what: str = "") -> str:
    """Read a UTF-8 text file (see :func:`decode_utf8`).

    Args:
        path: The file.
        what: What it is (``config file``, ``schedule``), named in errors.

    Returns:
        The text, without a leading byte-order mark.

    Raises:
        SpotpipeError: the file is missing, unreadable or not UTF-8.
    """
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SpotpipeError(f"{label} does not exist") from None
    except IsADirectoryError:
        raise SpotpipeError(f"{label} is a directory, not a file") from None
    except OSError as exc:
        raise SpotpipeError(f"cannot read {label}: {_reason(exc)}") from None
    return decode_utf8(data, p, what)


def resolve_path(value: str, base_dir: str | Path | None = None) -> Path:
    """A path from a config value: absolute, else relative to the working directory if it exists
    there, else relative to ``base_dir`` (the config file's folder) if it exists there.

    Args:
        value: The configured path.
        base_dir: The folder of the config file that named it (None: no such file).

    Returns:
        The path to open (``value`` itself when it exists nowhere: the caller names it in its error).
    """
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or base_dir is None:
        return p
    alt = Path(base_dir) / p
    return alt if alt.exists() else p
