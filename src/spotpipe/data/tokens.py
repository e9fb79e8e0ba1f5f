"""Token directories: a memory-mapped ``tokens.bin`` plus a small ``header.json``.

A token directory holds ``tokens.bin``, the token ids of the whole corpus as one flat array
(``uint16`` when the vocabulary fits, else ``uint32``), read through ``numpy.memmap`` so every
worker maps the same pages instead of loading the corpus; and ``header.json`` with the format
version, dtype, token count, vocabulary size, tokenizer, sources and the SHA-256 of
``tokens.bin``. :func:`prepare_tokens` writes one atomically (temporary directory, fsync,
rename), :class:`TokenFile` opens and checks one, :func:`resolve_dataset` turns ``data.path``
into one, preparing and caching text on first use. With no ``data.path`` the corpus is the Python
standard library's own sources, so a first run downloads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from spotpipe.config import DataConfig
from spotpipe.data.tokenizer import load_tokenizer
from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import check_output, fsync_dir, output_error
from spotpipe.progressline import ProgressLine

FORMAT = "spotpipe-tokens"
VERSION = 1
TOKENS_NAME = "tokens.bin"
HEADER_NAME = "header.json"
READ_CHUNK = 1 << 20
PROGRESS_MIN_BYTES = 16 << 20  # show progress when the inputs are bigger than this
VERIFY_PROGRESS_BYTES = 1 << 30  # show progress while checking a tokens.bin bigger than this
STDLIB_MAX_BYTES = 4 << 20
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
)


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """``uint16`` when every id fits (vocab_size <= 65535), else ``uint32``.

    Args:
        vocab_size: Number of token ids.

    Returns:
        The numpy dtype ``tokens.bin`` is stored in (2 or 4 bytes per token).
    """
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------
# Reading


class TokenFile:
    """An opened, checked token directory.

    Args:
        path: The token directory (holding ``tokens.bin`` and ``header.json``).
        verify: Also recompute the SHA-256 of ``tokens.bin`` and check every id < vocab_size
            (reads the whole file; existence and size are always checked).

    Raises:
        SpotpipeError: one line naming the file, when anything is missing, malformed, truncated
            or (with ``verify``) corrupt.
    """

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.dir = Path(path)
        header_path = self.dir / HEADER_NAME
        tokens_path = self.dir / TOKENS_NAME
        if not self.dir.is_dir():
            raise SpotpipeError(f"token dir {self.dir} does not exist (make one with `spotpipe data prepare`)")
        if not header_path.is_file():
            raise SpotpipeError(f"{header_path} is missing: {self.dir} is not a token dir (make one with `spotpipe data prepare`)")
        self.header: dict[str, Any] = _read_header(header_path)
        if not tokens_path.is_file():
            raise SpotpipeError(f"{tokens_path} is missing (run `spotpipe data prepare` again)")
        self.dtype = np.dtype(self.header["dtype"])
        self.num_tokens: int = int(self.header["num_tokens"])
        self.vocab_size: int = int(self.header["vocab_size"])
        self.tokenizer: str = str(self.header["tokenizer"])
        expected = self.num_tokens * self.dtype.itemsize
        actual = tokens_path.stat().st_size
        if actual != expected:
            raise SpotpipeError(
                f"{tokens_path} has {actual} bytes but {HEADER_NAME} says {self.num_tokens} tokens x "
                f"{self.dtype.itemsize} bytes = {expected}: truncated or corrupt (run `spotpipe data prepare` again)"
            )
        if self.num_tokens == 0:
            raise SpotpipeError(f"{tokens_path} holds no tokens")
        if verify:
            digest = _sha256_file(tokens_path)
            if digest != self.header["sha256"]:
                raise SpotpipeError(
                    f"{tokens_path} is corrupt: its SHA-256 is {digest[:16]}..., {HEADER_NAME} says "
                    f"{str(self.header['sha256'])[:16]}... (run `spotpipe data prepare` again)"
                )
        self.tokens: np.memmap = np.memmap(tokens_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        if verify:
            top = _max_token(self.tokens)
            if top >= self.vocab_size:
                raise SpotpipeError(
                    f"{tokens_path} holds token id {top}, but {header_path} says vocab_size {self.vocab_size} "
                    f"(ids 0..{self.vocab_size - 1}): the header does not belong to these tokens "
                    "(run `spotpipe data prepare` again)"
                )

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenFile({str(self.dir)!r}, tokens={self.num_tokens}, vocab={self.vocab_size}, tokenizer={self.tokenizer!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the path: a worker process re-maps the file instead of copying it."""
        return (TokenFile, (str(self.dir),))


def _read_header(path: Path) -> dict[str, Any]:
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SpotpipeError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the token dir is corrupt") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpotpipeError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SpotpipeError(f"{path}: not a spotpipe token header (expected \"format\": \"{FORMAT}\")")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SpotpipeError(f"{path}: format version {version!r} is not supported (this spotpipe reads <= {VERSION})")
    for key, kind in (("dtype", str), ("num_tokens", int), ("vocab_size", int), ("tokenizer", str), ("sha256", str)):
        if not isinstance(header.get(key), kind):
            raise SpotpipeError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if header["dtype"] not in ("uint16", "uint32"):
        raise SpotpipeError(f"{path}: dtype must be uint16 or uint32, got {header['dtype']!r}")
    if header["num_tokens"] < 0 or header["vocab_size"] < 2:
        raise SpotpipeError(f"{path}: num_tokens must be >= 0 and vocab_size >= 2")
    return header


def _sha256_file(path: Path) -> str:
    size = path.stat().st_size
    bar = ProgressLine(f"checking {path}", size / 2**20, "MiB", enabled=size >= VERIFY_PROGRESS_BYTES)
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while block := f.read(8 * READ_CHUNK):
            digest.update(block)
            done += len(block)
            bar.update(done / 2**20)
    bar.close()
    return digest.hexdigest()


def _max_token(tokens: np.ndarray) -> int:
    top = 0
    for i in range(0, len(tokens), 1 << 24):
        top = max(top, int(tokens[i : i + (1 << 24)].max()))
    return top


# ----------------------------------------------------------------------------------------------
# Writing


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Expand ``inputs`` into files: files as given, directories walked recursively in sorted order.

    Hidden files and directories (names starting with ``.``) and files that look binary (a NUL
    byte in the first 8 KiB) are skipped inside directories.

    Args:
        inputs: Text files and directories, in order.

    Returns:
        The files, inputs in order, each directory's files sorted by relative path.

    Raises:
        SpotpipeError: if an input does not exist or nothing is left.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            for sub in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix()):
                rel = sub.relative_to(path).parts
                if sub.is_file() and not any(part.startswith(".") for part in rel) and not _looks_binary(sub):
                    files.append(sub)
        else:
            raise SpotpipeError(f"input {path} does not exist (give text files or directories of text)")
    if not files:
        raise SpotpipeError(f"no text files found in {', '.join(str(p) for p in inputs)}")
    return files


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _read_pieces(path: Path, split_lines: bool) -> Iterator[bytes]:
    """The file in ~1 MiB pieces; with ``split_lines`` each piece ends at a newline (or EOF)."""
    carry = b""
    with open(path, "rb") as f:
        while block := f.read(READ_CHUNK):
            if not split_lines:
                yield block
                continue
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                carry = block
                continue
            carry = block[cut:]
            yield block[:cut]
    if carry:
        yield carry


class _Progress:
    """A progress line on stderr for big inputs (carriage-return updates on a terminal)."""

    def __init__(self, total_bytes: int, enabled: bool | None) -> None:
        self.total = max(1, total_bytes)
        self.enabled = total_bytes >= PROGRESS_MIN_BYTES if enabled is None else enabled
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done_bytes: int, tokens: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        line = (
            f"tokenizing: {100 * done_bytes / self.total:5.1f}% ({done_bytes / 2**20:.1f} of "
            f"{self.total / 2**20:.1f} MiB), {tokens:,} tokens, {now - self.start:.0f}s"
        )
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


def prepare_tokens(
    inputs: list[Path],
    out_dir: Path,
    tokenizer: str = "byte",
    progress: bool | None = None,
    overwrite: bool = True,
    what: str = "token dir",
) -> TokenFile:
    """Tokenize text files into a token directory, atomically.

    Files are concatenated in order (directories expand to their files in sorted order). The
    directory is built under a temporary name next to ``out_dir``, fsynced and renamed into
    place, so a reader never sees half a token dir.

    Args:
        inputs: Text files or directories of text.
        out_dir: The token directory to create.
        tokenizer: ``"byte"`` or the path of a Hugging Face ``tokenizer.json``.
        progress: Show progress on stderr; ``None`` = only for inputs over 16 MiB.
        overwrite: Replace an existing token dir at ``out_dir``; with ``False`` an existing one
            (for example written meanwhile by another process) is kept and returned.
        what: The option or key that named ``out_dir`` (``--out``), for errors.

    Returns:
        The new :class:`TokenFile`.

    Raises:
        SpotpipeError: for missing inputs, no text, an ``out_dir`` that exists and is not a
            token dir, or one that cannot be written (checked before tokenizing; a full disk is
            reported when it happens), each naming ``what`` and the path.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, what, "dir")
    tok = load_tokenizer(tokenizer)
    files = collect_inputs([Path(p) for p in inputs])
    dtype = token_dtype(tok.vocab_size)
    _check_destination(out_dir)
    try:
        return _write_tokens(files, ", ".join(str(p) for p in inputs), out_dir, tok, dtype, progress, overwrite)
    except OSError as exc:
        raise output_error(out_dir, what, exc.strerror or str(exc)) from None


def _write_tokens(
    files: list[Path], inputs_label: str, out_dir: Path, tok: Any, dtype: np.dtype[Any], progress: bool | None,
    overwrite: bool,
) -> TokenFile:
    """Tokenize ``files`` into a temporary directory next to ``out_dir`` and rename it there."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        total_bytes = sum(f.stat().st_size for f in files)
        bar = _Progress(total_bytes, progress)
        digest = hashlib.sha256()
        num_tokens = 0
        done_bytes = 0
        sources: list[dict[str, Any]] = []
        split_lines = tok.name != "byte"
        with open(tmp / TOKENS_NAME, "wb") as out:
            for path in files:
                file_tokens = 0
                for piece in _read_pieces(path, split_lines):
                    ids = tok.encode_bytes(piece)
                    if len(ids) and int(ids.max()) >= tok.vocab_size:
                        raise SpotpipeError(f"tokenizer {tok.name} produced id {int(ids.max())} >= its vocabulary size {tok.vocab_size}")
                    buf = np.ascontiguousarray(ids, dtype=dtype).tobytes()
                    out.write(buf)
                    digest.update(buf)
                    file_tokens += len(ids)
                    done_bytes += len(piece)
                    bar.update(done_bytes, num_tokens + file_tokens)
                num_tokens += file_tokens
                sources.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "tokens": file_tokens})
            out.flush()
            os.fsync(out.fileno())
        bar.update(done_bytes, num_tokens, final=True)
        if num_tokens == 0:
            raise SpotpipeError(f"inputs {inputs_label} contain no text")
        header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "num_tokens": num_tokens,
            "vocab_size": tok.vocab_size,
            "tokenizer": tok.name,
            "tokenizer_sha256": getattr(tok, "sha256", None),
            "sha256": digest.hexdigest(),
            "num_sources": len(sources),
            "sources": sources if len(sources) <= 1000 else sources[:1000],
        }
        with open(tmp / HEADER_NAME, "w", encoding="utf-8") as f:
            json.dump(header, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenFile(out_dir)


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / HEADER_NAME).exists())):
        raise SpotpipeError(f"--out {out_dir} exists and is not a token dir; refusing to overwrite it")


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an old token dir there is moved away first."""
    fsync_dir(tmp)
    if out_dir.exists():
        if not overwrite:
            return
        _check_destination(out_dir)
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, trash)
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / HEADER_NAME).exists():  # not a concurrent writer that won the race
                raise
    fsync_dir(out_dir.parent)


# ----------------------------------------------------------------------------------------------
# data.path -> TokenFile


def stdlib_corpus_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[Path]:
    """The built-in corpus: the standard library's ``.py`` sources, sorted, up to ``max_bytes``.

    Files are sorted by relative path; test suites, site-packages, codec tables and the pydoc
    topic dump are left out; whole files are taken in order while the total stays within
    ``max_bytes``.

    Args:
        max_bytes: Size budget in bytes (default 4 MiB).

    Returns:
        The chosen files (at least one).

    Raises:
        SpotpipeError: if no Python source is found.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(dirpath) / filename
                candidates.append((path.relative_to(root).as_posix(), path))
    candidates.sort()
    chosen: list[Path] = []
    total = 0
    for _, path in candidates:
        size = path.stat().st_size
        if total + size > max_bytes:
            if chosen:
                break
            continue
        chosen.append(path)
        total += size
    if not chosen:
        raise SpotpipeError(f"no Python sources found under {root} for the built-in corpus; set data.path")
    return chosen


def default_cache_dir() -> Path:
    """``$SPOTPIPE_CACHE``, else ``$XDG_CACHE_HOME/spotpipe``, else ``~/.cache/spotpipe``."""
    if os.environ.get("SPOTPIPE_CACHE"):
        return Path(os.environ["SPOTPIPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spotpipe"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _cached(out_dir: Path, files: list[Path], tokenizer: str, verify: bool = False) -> TokenFile:
    if (out_dir / HEADER_NAME).exists():
        try:
            return TokenFile(out_dir, verify=verify)
        except SpotpipeError:
            pass  # a damaged cache entry is rebuilt
    return prepare_tokens(files, out_dir, tokenizer, overwrite=(out_dir / HEADER_NAME).exists(),
                          what="the token cache ($SPOTPIPE_CACHE)")


def resolve_dataset(data_cfg: DataConfig, cache_dir: Path, verify: bool = False) -> TokenFile:
    """Turn ``data.path`` into an opened :class:`TokenFile`.

    * ``""``: the built-in corpus (:func:`stdlib_corpus_files`), prepared once into
      ``cache_dir/stdlib-<hash>``.
    * a token dir (it holds ``header.json``): opened as is; its own tokenizer wins.
    * a text file or a directory of text: prepared once into ``cache_dir/<name>-<hash>``, the hash
      covering the absolute path, sizes and mtimes of the files, and the tokenizer.

    With ``verify`` an existing token dir or cache entry is checked in full (SHA-256 of
    ``tokens.bin`` against its header, every id below the header's vocabulary; about a second
    per GiB), so a corrupt file is one error line naming it, before any worker starts; a
    damaged cache entry is rebuilt from its text.

    Args:
        data_cfg: The ``data`` section (``path``, ``tokenizer``).
        cache_dir: Where prepared corpora are kept (callers pass :func:`default_cache_dir`).
        verify: Check an existing token dir or cache entry in full.

    Returns:
        The opened token file.

    Raises:
        SpotpipeError: naming ``data.path`` when it does not exist or cannot be read, or the
            token file when it is corrupt.
    """
    cache_dir = Path(cache_dir)
    tokenizer = data_cfg.tokenizer or "byte"
    if data_cfg.path == "":
        files = stdlib_corpus_files()
        key = _key("stdlib", sys.version, tokenizer, [(f.name, f.stat().st_size) for f in files])
        return _cached(cache_dir / f"stdlib-{key}", files, tokenizer, verify)
    path = Path(data_cfg.path).expanduser()
    if path.is_dir() and (path / HEADER_NAME).exists():
        return TokenFile(path, verify=verify)
    if not path.exists():
        raise SpotpipeError(
            f"data.path {path} does not exist (give a token dir from `spotpipe data prepare`, a text file or a directory of text)"
        )
    files = collect_inputs([path])
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = _key(str(path.resolve()), tokenizer, stats)
    return _cached(cache_dir / f"{path.stem or 'data'}-{key}", files, tokenizer, verify)
