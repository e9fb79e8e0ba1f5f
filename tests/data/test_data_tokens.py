"""Token directories: prepare round trip, atomic replace, corrupt/missing files, dataset resolution."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spotpipe.config import DataConfig
from spotpipe.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from spotpipe.data.tokens import TokenFile, collect_inputs, prepare_tokens, resolve_dataset, stdlib_corpus_files, token_dtype
from spotpipe.errors import SpotpipeError

SHAKESPEARE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")


@needs_shakespeare
def test_prepare_round_trip_tinyshakespeare(tmp_path: Path) -> None:
    out = tmp_path / "ts"
    tf = prepare_tokens([SHAKESPEARE], out)
    raw = SHAKESPEARE.read_bytes()
    assert tf.num_tokens == len(raw) == len(tf.tokens)
    assert tf.tokens.dtype == np.uint16 and tf.vocab_size == 256 and tf.tokenizer == "byte"
    assert bytes(np.asarray(tf.tokens, dtype=np.uint8)) == raw
    assert ByteTokenizer().decode(tf.tokens[:14]) == "First Citizen:"
    header = json.loads((out / "header.json").read_text())
    assert header["num_tokens"] == len(raw) and header["dtype"] == "uint16"
    assert header["sources"][0]["path"] == str(SHAKESPEARE.resolve())
    TokenFile(out, verify=True)  # checksum and id range hold
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = load_tokenizer("byte")
    text = "héllo, wörld — ∑ 🙂\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_directory_inputs_are_sorted_and_skip_hidden_and_binary(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "2.txt").write_text("two\n")
    (src / "a.txt").write_text("one\n")
    (src / ".hidden.txt").write_text("secret\n")
    (src / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "z.txt").write_text("last")
    files = collect_inputs([src, tmp_path / "z.txt"])
    assert [f.name for f in files] == ["a.txt", "2.txt", "z.txt"]
    tf = prepare_tokens([src, tmp_path / "z.txt"], tmp_path / "out")
    assert ByteTokenizer().decode(tf.tokens) == "one\ntwo\nlast"
    assert len(tf.header["sources"]) == 3


def test_prepare_replaces_a_token_dir_but_not_other_dirs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first version")
    (tmp_path / "b.txt").write_text("second")
    out = tmp_path / "tok"
    prepare_tokens([tmp_path / "a.txt"], out)
    tf = prepare_tokens([tmp_path / "b.txt"], out)
    assert ByteTokenizer().decode(tf.tokens) == "second"
    kept = prepare_tokens([tmp_path / "a.txt"], out, overwrite=False)
    assert ByteTokenizer().decode(kept.tokens) == "second"
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SpotpipeError, match="not a token dir"):
        prepare_tokens([tmp_path / "a.txt"], other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(SpotpipeError, match="does not exist"):
        prepare_tokens([tmp_path / "missing.txt"], tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SpotpipeError, match="no text"):
        prepare_tokens([tmp_path / "empty.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


@pytest.fixture()
def small_dir(tmp_path: Path) -> Path:
    (tmp_path / "t.txt").write_text("abcdefghij" * 50)
    prepare_tokens([tmp_path / "t.txt"], tmp_path / "tok")
    return tmp_path / "tok"


def test_missing_and_truncated_files_name_the_file(small_dir: Path) -> None:
    with pytest.raises(SpotpipeError, match="does not exist"):
        TokenFile(small_dir.parent / "nope")
    tokens = small_dir / "tokens.bin"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    with pytest.raises(SpotpipeError, match=r"tokens\.bin has 998 bytes .* 500 tokens x 2 bytes = 1000") as err:
        TokenFile(small_dir)
    assert str(tokens) in str(err.value) and "\n" not in str(err.value)
    tokens.unlink()
    with pytest.raises(SpotpipeError, match=r"tokens\.bin is missing"):
        TokenFile(small_dir)
    tokens.write_bytes(data)
    (small_dir / "header.json").unlink()
    with pytest.raises(SpotpipeError, match=r"header\.json is missing"):
        TokenFile(small_dir)


def test_corrupt_header_and_checksum(small_dir: Path) -> None:
    header_path = small_dir / "header.json"
    good = header_path.read_text()
    header_path.write_text(good[:-10])
    with pytest.raises(SpotpipeError, match=r"header\.json: not valid JSON"):
        TokenFile(small_dir)
    header = json.loads(good)
    for key, value in (("format", "other"), ("version", 99), ("dtype", "float32"), ("num_tokens", "many")):
        header_path.write_text(json.dumps({**header, key: value}))
        with pytest.raises(SpotpipeError, match="header.json"):
            TokenFile(small_dir)
    header_path.write_text(good)
    tokens = small_dir / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[10] ^= 1
    tokens.write_bytes(bytes(data))
    TokenFile(small_dir)  # size still right: the cheap check passes
    with pytest.raises(SpotpipeError, match="corrupt: its SHA-256"):
        TokenFile(small_dir, verify=True)


def test_token_file_pickles_as_its_path(small_dir: Path) -> None:
    tf = TokenFile(small_dir)
    blob = pickle.dumps(tf)
    assert len(blob) < 500  # the tokens are not copied
    again = pickle.loads(blob)
    assert again.num_tokens == tf.num_tokens and np.array_equal(again.tokens, tf.tokens)


def test_token_dtype_boundary() -> None:
    assert token_dtype(256) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(100_000) == np.uint32


def test_hf_tokenizer_missing_package_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(SpotpipeError, match="pip install tokenizers"):
        load_tokenizer(str(path))
    with pytest.raises(SpotpipeError, match="does not exist"):
        HFTokenizer(tmp_path / "nope.json")


def test_hf_tokenizer_round_trip(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "to": 1, "be": 2, "or": 3, "not": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    (tmp_path / "t.txt").write_text("to be or not to be\n" * 3)
    tf = prepare_tokens([tmp_path / "t.txt"], tmp_path / "tok", tokenizer=str(path))
    assert tf.vocab_size == 5 and tf.tokenizer == str(path)
    assert list(tf.tokens[:6]) == [1, 2, 3, 4, 1, 2]


@pytest.mark.timeout(60)
def test_resolve_builtin_corpus_is_cached_and_deterministic(tmp_path: Path) -> None:
    files = stdlib_corpus_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and len(files) > 10
    assert all(p.suffix == ".py" and "test" not in p.parts and "site-packages" not in p.parts for p in files)
    assert sum(p.stat().st_size for p in files) <= 4 << 20
    tf = resolve_dataset(DataConfig(), tmp_path)
    assert tf.dir.parent == tmp_path and tf.dir.name.startswith("stdlib-")
    assert tf.num_tokens > 1_000_000
    mtime = (tf.dir / "tokens.bin").stat().st_mtime_ns
    again = resolve_dataset(DataConfig(), tmp_path)
    assert again.dir == tf.dir and (tf.dir / "tokens.bin").stat().st_mtime_ns == mtime
    assert len(list(tmp_path.iterdir())) == 1


def test_resolve_text_file_token_dir_and_missing(tmp_path: Path, small_dir: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 20)
    cache = tmp_path / "cache"
    first = resolve_dataset(DataConfig(path=str(text)), cache)
    assert first.dir.parent == cache and first.dir.name.startswith("corpus-")
    assert resolve_dataset(DataConfig(path=str(text)), cache).dir == first.dir
    text.write_text("changed text\n" * 20)
    os.utime(text, ns=(1, 1))
    changed = resolve_dataset(DataConfig(path=str(text)), cache)
    assert changed.dir != first.dir and ByteTokenizer().decode(changed.tokens[:7]) == "changed"
    direct = resolve_dataset(DataConfig(path=str(small_dir)), cache)
    assert direct.dir == small_dir
    with pytest.raises(SpotpipeError, match="data.path .* does not exist"):
        resolve_dataset(DataConfig(path=str(tmp_path / "missing")), cache)


def test_data_modules_do_not_import_torch() -> None:
    code = (
        "import sys, spotpipe.data.cli, spotpipe.data.tokens, spotpipe.data.sampler, spotpipe.data.stats; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progress_is_shown_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("x" * 3000)
    prepare_tokens([tmp_path / "a.txt"], tmp_path / "quiet")
    assert capsys.readouterr().err == ""  # small inputs: silent by default
    prepare_tokens([tmp_path / "a.txt"], tmp_path / "loud", progress=True)
    assert "tokenizing: 100.0%" in capsys.readouterr().err
