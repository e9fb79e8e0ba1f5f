"""The `spotpipe` command line: one sub-command group per part of the package.

Each group lives next to the code it drives and exposes ``register(subparsers)``; this module only
collects them, so `spotpipe --help` stays fast (no group imports torch at module level) and every
user-facing :class:`~spotpipe.errors.SpotpipeError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from spotpipe import __version__
from spotpipe.errors import SpotpipeError

# Modules that each define `register(subparsers)`; order is the order in `--help`.
COMMAND_MODULES: tuple[str, ...] = (
    "spotpipe.runtime.cli",  # train, worker
    "spotpipe.runtime.inprocess.cli",  # eval, generate
    "spotpipe.schedule.cli",  # schedule
    "spotpipe.data.cli",  # data
    "spotpipe.sim.cli",  # simulate
    "spotpipe.reliability.cli",  # reliability
)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``spotpipe: error:`` line (exit code 2), like every
    other error of the command line; sub-command parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        """Print ``spotpipe: error: <message> (see `<prog> --help`)`` and exit with code 2.

        Args:
            message: argparse's description of the bad argument.

        Returns:
            Never: it raises ``SystemExit(2)`` (through ``self.exit``).
        """
        self.exit(2, f"spotpipe: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered command group."""
    parser = OneLineErrorParser(
        prog="spotpipe",
        description="Pipeline-parallel LLM training that survives failures, slow links and small memory.",
    )
    parser.add_argument("--version", action="version", version=f"spotpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a group not written yet; the others still work
                continue
            raise
        module.register(sub)
    return parser


def chosen_command(parser: argparse.ArgumentParser, words: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)command parser that ``words`` select: ``spotpipe schedule show ...`` -> the parser
    of ``schedule show``; the top-level parser when no command is named.

    Args:
        parser: The top-level parser (:func:`build_parser`).
        words: The command-line words after the program name.

    Returns:
        The deepest parser whose command names follow each other at the start of ``words``
        (options between them are skipped).
    """
    current = parser
    for word in words:
        if word.startswith("-"):
            continue
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        current = subs[0].choices[word]
    return current


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spotpipe` console script.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: the command's (0 on success), 2 for a bad argument or a
        :class:`~spotpipe.errors.SpotpipeError` (printed as one ``spotpipe: error:`` line), 130 on
        Ctrl-C, 1 when stdout's reader went away.
    """
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(words)
        if extra:  # named by the command that got them, so the hint points at its own --help
            chosen_command(parser, words).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or a bad argument (its one line is printed)
        return exc.code if isinstance(exc.code, int) else 2
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SpotpipeError as exc:
        print(f"spotpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spotpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`spotpipe ... | head`): nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
