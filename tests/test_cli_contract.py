"""What every command line promises: a description on every ``--help`` page, help text on every
option, finite and in-range numbers, and one ``spotpipe: error:`` line for anything bad."""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Iterator

import pytest

from spotpipe.cli import build_parser, main
from spotpipe.cliargs import float_in, int_in
from spotpipe.progressline import ProgressLine


def _commands(parser: argparse.ArgumentParser, name: str = "spotpipe") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


COMMANDS = dict(_commands(build_parser()))


def test_the_walk_finds_every_command() -> None:
    expected = {
        "spotpipe", "spotpipe train", "spotpipe worker", "spotpipe eval", "spotpipe generate", "spotpipe schedule", "spotpipe schedule show",
        "spotpipe schedule validate", "spotpipe schedule plan", "spotpipe schedule memory", "spotpipe data",
        "spotpipe data prepare", "spotpipe data tokenizer", "spotpipe data info",
        "spotpipe simulate", "spotpipe reliability", "spotpipe reliability analyze", "spotpipe reliability plan",
        "spotpipe reliability simulate", "spotpipe reliability validate", "spotpipe reliability report",
    }
    assert set(COMMANDS) == expected


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_description_and_every_option_help(name: str) -> None:
    parser = COMMANDS[name]
    assert parser.description and len(parser.description) > 20, f"{name} --help has no description"
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        what = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: {what} has no help text"


NUMERIC = [
    (name, action)
    for name, parser in COMMANDS.items()
    for action in parser._actions
    if action.type is not None and getattr(action.type, "__name__", "") not in ("Path", "str")
]


def test_every_numeric_option_has_a_checked_type() -> None:
    assert NUMERIC, "no numeric options found"
    for name, action in NUMERIC:
        assert action.type.__name__ in ("integer", "number"), (
            f"{name} {action.option_strings}: type {action.type!r} is not from spotpipe.cliargs (no range check)"
        )


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "1e24", "-1", "x"])
def test_every_numeric_option_refuses_non_finite_huge_and_negative_values(text: str) -> None:
    for name, action in NUMERIC:
        with pytest.raises(argparse.ArgumentTypeError, match="^expected (an integer|a number)"):
            action.type(text)  # type: ignore[misc]


def test_every_numeric_default_passes_its_own_check() -> None:
    for name, action in NUMERIC:
        if action.default is not None:
            assert action.type(str(action.default)) == action.default, (name, action.option_strings)  # type: ignore[misc]


def test_range_types() -> None:
    gpus = int_in(1, 10**9)
    assert gpus("16384") == 16384 and gpus("1.6e4") == 16000 and gpus("1e9") == 10**9
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected an integer in 1\.\.1000000000, got 1e24$"):
        gpus("1e24")
    with pytest.raises(argparse.ArgumentTypeError, match="got '2.5'"):
        gpus("2.5")
    fraction = float_in(0.0, 0.5, lo_open=True, hi_open=True)
    assert fraction("0.25") == 0.25
    for bad in ("0", "0.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"^expected a number in \(0, 0\.5\), got"):
            fraction(bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reliability", "plan", "--gpus", "1e24", "--rf", "6.5"], "argument --gpus: expected an integer in 1..1000000000, got 1e24"),
        (["reliability", "plan", "--gpus", "64", "--rf", "inf"], "argument --rf: expected a number in (0, 1e+06], got inf"),
        (["reliability", "analyze", "--gpus-per-node", "0", "x.sacct"], "argument --gpus-per-node: expected an integer in 1..1024, got 0"),
        (["reliability", "analyze", "--min-intervals", "0", "x.sacct"], "argument --min-intervals: expected an integer in 2..1000000000, got 0"),
        (["reliability", "simulate", "--gpus", "8", "--rf", "6.5", "--trials", "1"], "argument --trials: expected an integer in 2..1000000, got 1"),
        (["reliability", "simulate", "--gpus", "8", "--rf", "6.5", "--shape", "0"], "argument --shape: expected a number in [0.05, 20], got 0"),
        (["reliability", "plan", "--gpus", "64", "--rf", "6.5", "--ckpt-write", "1e300"], "--ckpt-write: '1e300' is not a duration in [0, 1e+10 s]"),
        (["reliability", "simulate", "--gpus", "8", "--rf", "6.5", "--wall", "inf"], "--wall: 'inf' is not a duration"),
        (["worker", "--join", "127.0.0.1:1", "--timeout", "-1"], "argument --timeout: expected a number in (0, 1e+06], got -1"),
        (["worker", "--join", "127.0.0.1:1", "--timeout", "nan"], "argument --timeout: expected a number in (0, 1e+06], got nan"),
        (["data", "info", "x", "--val-fraction", "0.5"], "argument --val-fraction: expected a number in (0, 0.5), got 0.5"),
        (["schedule", "show", "--stages", "0"], "argument --stages: expected an integer in 1..1000000, got 0"),
    ],
)
def test_bad_numbers_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("spotpipe: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_extreme_valid_numbers_give_answers_not_overflow(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reliability", "plan", "--gpus", "1000000000", "--rf", "1e6", "--ckpt-write", "1e9",
                 "--recovery", "1e9", "--step", "1e9", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"ettr_at_interval_exact": 0.0' in out and '"ettr_checkpoint_free_exact": 0.0' in out


def test_val_fraction_range_of_data_info_is_the_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--set", "data.val_fraction=0.5"]) == 2
    assert "data.val_fraction must be in (0, 0.5), got 0.5" in capsys.readouterr().err
    assert main(["data", "info", "x", "--val-fraction", "0.5"]) == 2
    assert "(0, 0.5)" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_shows_the_rate_and_eta() -> None:
    stream = _Terminal()
    bar = ProgressLine("simulate", 1000, "steps", stream=stream)
    time.sleep(1.1)  # work that ends within a second draws no bar
    bar.update(100)
    time.sleep(0.6)  # a terminal is redrawn twice a second
    bar.update(250)
    bar.update(200)  # done never goes back
    bar.close()
    last = stream.getvalue().strip().split("\r")[-1]
    assert last.startswith("simulate:") and "250/1000" in last and "steps" in last and "25%" in last
    assert "<" in last  # elapsed<remaining: the time left is shown
    quiet = io.StringIO()
    off = ProgressLine("x", 10, "u", enabled=False, stream=quiet)
    off.update(5)
    off.close()
    assert quiet.getvalue() == ""


@pytest.mark.parametrize(("argv", "hint"), [
    (["generate", "RUN", "--prompt", "a", "--skip-fraction", "0.5"], "see `spotpipe generate --help`"),
    (["schedule", "show", "--bogus"], "see `spotpipe schedule show --help`"),
    (["train", "--set", "train.steps=3", "--bogus"], "see `spotpipe train --help`"),
    (["--bogus"], "see `spotpipe --help`"),
])
def test_an_unknown_option_points_at_its_own_commands_help(argv: list[str], hint: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: unrecognized arguments: ") and hint in err and err.count("\n") == 1
