"""`spotpipe data prepare | tokenizer | info`: make and inspect token directories, train a tokenizer (no torch import)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spotpipe.cliargs import float_in, int_in


def register(subparsers: Any) -> None:
    """Add the ``data`` command group to the top-level parser.

    Args:
        subparsers: The top-level parser's ``add_subparsers()`` object.
    """
    data = subparsers.add_parser(
        "data",
        help="prepare and inspect token files",
        description="Tokenize text into memory-mapped token directories and inspect them.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: _no_subcommand(data))

    prepare = sub.add_parser(
        "prepare",
        help="tokenize text files into a token dir",
        description="Tokenize text files (or directories of text, walked in sorted order) into DIR/tokens.bin + DIR/header.json.",
    )
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="text files or directories of text, concatenated in order")
    prepare.add_argument("--out", required=True, metavar="DIR", help="token directory to write (replaced atomically if it is one already)")
    prepare.add_argument(
        "--tokenizer",
        default="byte",
        metavar="byte|PATH",
        help="'byte' (built in, vocabulary 256) or the path of a Hugging Face tokenizer.json (needs `pip install tokenizers`)",
    )
    progress = prepare.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show progress")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress (default: only for inputs over 16 MiB)")
    prepare.set_defaults(func=_prepare)

    bpe = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer.json",
        description="Train a byte-level BPE tokenizer (any text round-trips) on text files, or on the built-in corpus "
                    "when no INPUT is given, and write a Hugging Face tokenizer.json for data.tokenizer. Input bytes that "
                    "are not UTF-8 are read as U+FFFD, as `data prepare` does with a Hugging Face tokenizer.",
    )
    bpe.add_argument("inputs", nargs="*", metavar="INPUT", help="text files or directories of text (default: the built-in corpus)")
    bpe.add_argument("--vocab-size", type=int_in(257, 1 << 20), default=16384, metavar="N",
                     help="largest vocabulary, 257 to 1048576 (default 16384; fewer when the text has fewer pairs to merge)")
    bpe.add_argument("--out", required=True, metavar="FILE", help="the tokenizer.json to write")
    bpe.set_defaults(func=_tokenizer)

    info = sub.add_parser("info", help="describe a token dir", description="Print a token dir's header, a sample and its unigram baseline.")
    info.add_argument("dir", metavar="DIR", help="token directory from `spotpipe data prepare`")
    info.add_argument("--verify", action="store_true", help="also check the SHA-256 of tokens.bin and that every id is in the vocabulary")
    info.add_argument("--val-fraction", type=float_in(0.0, 0.5, lo_open=True, hi_open=True), default=0.05, metavar="F",
                      help="validation share for the unigram baseline, in (0, 0.5) as data.val_fraction (default 0.05)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=_info)


def _no_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _tokenizer(args: argparse.Namespace) -> int:
    from spotpipe.data.tokenizer import train_bpe
    from spotpipe.data.tokens import collect_inputs, stdlib_corpus_files
    from spotpipe.errors import SpotpipeError
    from spotpipe.fsutil import check_output

    out = check_output(args.out, "--out")  # before the training, not after it
    files = collect_inputs([Path(p) for p in args.inputs]) if args.inputs else stdlib_corpus_files()
    size = sum(f.stat().st_size for f in files)
    if size == 0:
        raise SpotpipeError(f"data tokenizer: the input{'s hold' if len(files) > 1 else ' holds'} no text to learn merges from")
    tok = train_bpe(files, args.vocab_size, out)
    print(f"wrote {tok.path}: byte-level BPE, vocabulary {tok.vocab_size}, trained on {len(files)} "
          f"file{'s' if len(files) != 1 else ''} ({size / 2**20:.1f} MiB)")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from spotpipe.data.tokens import prepare_tokens

    tf = prepare_tokens([Path(p) for p in args.inputs], Path(args.out), args.tokenizer, progress=args.progress, what="--out")
    print(f"wrote {tf.dir}: {tf.num_tokens:,} tokens ({tf.dtype.name}), vocabulary {tf.vocab_size}, tokenizer {tf.tokenizer}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from spotpipe.data.stats import unigram_baseline
    from spotpipe.data.tokenizer import load_tokenizer
    from spotpipe.data.tokens import TokenFile
    from spotpipe.errors import SpotpipeError

    tf = TokenFile(Path(args.dir), verify=args.verify)
    base = unigram_baseline(tf, args.val_fraction)
    summary: dict[str, Any] = {
        "dir": str(tf.dir),
        "num_tokens": tf.num_tokens,
        "dtype": tf.dtype.name,
        "vocab_size": tf.vocab_size,
        "tokenizer": tf.tokenizer,
        "sources": tf.header.get("num_sources", len(tf.header.get("sources", []))),
        "sha256": tf.header["sha256"],
        "verified": bool(args.verify),
        "train_tokens": base.train_tokens,
        "val_tokens": base.val_tokens,
        "unigram_val_entropy_nats": round(base.val_entropy, 4),
        "unigram_val_cross_entropy_nats": round(base.val_cross_entropy, 4),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    for key, value in summary.items():
        print(f"{key:32s} {value}")
    try:
        sample = load_tokenizer(tf.tokenizer).decode(tf.tokens[:120])
        print(f"{'first tokens':32s} {sample!r}")
    except SpotpipeError:
        pass  # the tokenizer is not available here; the header is still useful
    return 0
