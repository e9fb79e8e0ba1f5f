"""Tokenizers: the built-in byte tokenizer and any Hugging Face ``tokenizer.json``.

The byte tokenizer maps every UTF-8 byte to its value (vocabulary 256), so it needs no files and
round-trips any text exactly. :class:`HFTokenizer` wraps the optional ``tokenizers`` package
(``pip install tokenizers``), imported only when one is used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from spotpipe.errors import SpotpipeError


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def name(self) -> str:
        """Spec string that :func:`load_tokenizer` accepts ("byte" or a path)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids (every id is < vocab_size)."""
        ...

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D integer array.

        Args:
            text: Any text.

        Returns:
            A 1-D array of ids, each < ``vocab_size``.
        """
        ...

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Token ids of raw file contents (UTF-8 text).

        Args:
            data: File contents.

        Returns:
            A 1-D array of ids, each < ``vocab_size``.
        """
        ...

    def decode(self, ids: Any) -> str:
        """Text of a sequence of ids.

        Args:
            ids: Token ids, any array-like (flattened).

        Returns:
            The decoded text.
        """
        ...


class ByteTokenizer:
    """Token id = UTF-8 byte value; vocabulary 256."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as uint16 ids."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes as uint16 ids (no decoding, so any file round-trips exactly)."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Any) -> str:
        """Bytes back to text; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        return bytes(int(i) for i in np.asarray(ids).ravel()).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the optional ``tokenizers`` package."""

    def __init__(self, path: str | Path) -> None:
        """Load ``path`` and hash it (``sha256``).

        Args:
            path: A ``tokenizer.json`` file.

        Raises:
            SpotpipeError: if the file does not exist, ``tokenizers`` is not installed, or the file does
                not load.
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise SpotpipeError(f"tokenizer file {self.path} does not exist (data.tokenizer must be 'byte' or a tokenizer.json path)")
        try:
            import tokenizers
        except ImportError:
            raise SpotpipeError(
                f"tokenizer {self.path} needs the Hugging Face 'tokenizers' package: "
                "pip install tokenizers (or pip install 'spotpipe[hf]')"
            ) from None
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises its own exception types
            raise SpotpipeError(f"tokenizer file {self.path} could not be loaded: {exc}") from None
        self.vocab_size: int = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def name(self) -> str:
        """The tokenizer.json path."""
        return str(self.path)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no special tokens added)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Decode ``data`` as UTF-8 (invalid bytes replaced) and encode it."""
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids: Any) -> str:
        """Text of ``ids``."""
        return str(self._tok.decode([int(i) for i in np.asarray(ids).ravel()]))


def train_bpe(files: list[Path], vocab_size: int, out: Path) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style: bytes as the base alphabet, so any text
    round-trips) on ``files`` with the ``tokenizers`` package and save it as a ``tokenizer.json``.

    Args:
        files: UTF-8 text files (invalid bytes are replaced).
        vocab_size: Size of the vocabulary, 257 to 1 048 576 (the 256 bytes plus merges).
        out: The ``tokenizer.json`` to write.

    Returns:
        The saved tokenizer, loaded back.

    Raises:
        SpotpipeError: ``tokenizers`` is missing, or ``out`` cannot be written.

    Source: Sennrich et al. 2016 (BPE); Radford et al. 2019 (byte-level BPE, GPT-2).
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise SpotpipeError("training a tokenizer needs the Hugging Face 'tokenizers' package: pip install tokenizers "
                            "(or pip install 'spotpipe[hf]')") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)

    def texts() -> Any:
        for f in files:
            yield f.read_bytes().decode("utf-8", errors="replace")

    tok.train_from_iterator(texts(), trainer=trainer)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
    except OSError as exc:
        raise SpotpipeError(f"--out {out}: cannot write the tokenizer: {exc.strerror or exc}") from None
    return HFTokenizer(out)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is the path of a ``tokenizer.json``.

    Args:
        spec: ``data.tokenizer``: ``"byte"`` (or ``""``), or a ``tokenizer.json`` path.

    Returns:
        The tokenizer.

    Raises:
        SpotpipeError: as :class:`HFTokenizer` for a path.
    """
    if spec == "" or spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
