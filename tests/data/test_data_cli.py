"""`spotpipe data prepare | info` through the real command-line entry point."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from spotpipe.cli import main
from spotpipe.data import cli as data_cli


def test_prepare_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question\n" * 40)
    out = tmp_path / "tok"
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(out), "--tokenizer", "byte"]) == 0
    assert "1,640 tokens" in capsys.readouterr().out
    assert main(["data", "info", str(out), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_tokens"] == 1640 and info["vocab_size"] == 256 and info["verified"] is True
    assert info["train_tokens"] + info["val_tokens"] == 1640
    assert 0 < info["unigram_val_entropy_nats"] <= info["unigram_val_cross_entropy_nats"] < 5.6
    assert main(["data", "info", str(out)]) == 0
    assert "first tokens" in capsys.readouterr().out


def test_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spotpipe: error: token dir") and "\n" not in err
    assert main(["data", "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_every_option_has_help() -> None:
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers())
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    data = groups[0].choices["data"]
    sub = [a for a in data._actions if isinstance(a, argparse._SubParsersAction)][0]
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"data {name}: {action.dest} has no help"


def test_data_tokenizer_trains_a_byte_level_bpe_that_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`spotpipe data tokenizer`: the vocabulary has the asked size, frequent words become single
    tokens, and any text (bytes the corpus never had) decodes back exactly."""
    pytest.importorskip("tokenizers")
    from spotpipe.cli import main
    from spotpipe.data.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the pipeline stage sends the activation to the next stage\n" * 200)
    out = tmp_path / "tok" / "bpe.json"
    assert main(["data", "tokenizer", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = load_tokenizer(str(out))
    assert 256 < tok.vocab_size <= 300  # at most the asked size: this small text has fewer pairs to merge
    assert f"vocabulary {tok.vocab_size}" in capsys.readouterr().out
    assert len(tok.encode("the pipeline stage")) < len("the pipeline stage") / 2
    odd = "naïve — 日本 \x00 tabs\tand\nnewlines"
    assert tok.decode(tok.encode(odd)) == odd


def test_data_tokenizer_refuses_a_vocabulary_below_the_byte_alphabet(capsys: pytest.CaptureFixture[str]) -> None:
    from spotpipe.cli import main

    assert main(["data", "tokenizer", "--vocab-size", "100", "--out", "x.json"]) == 2
    assert "--vocab-size" in capsys.readouterr().err
