"""Output paths, crash-safe writes and UTF-8 inputs (``spotpipe.fsutil``), the helpers every
command writes and reads text through."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from spotpipe.errors import SpotpipeError
from spotpipe.events import EventLog, read_events
from spotpipe.fsutil import check_output, decode_utf8, open_output, read_text, write_atomic, write_output


@pytest.fixture()
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a regular file\n")
    return path


def test_output_under_a_regular_file_is_refused_naming_both(a_file: Path) -> None:
    for kind in ("file", "dir"):
        with pytest.raises(SpotpipeError) as info:
            check_output(a_file / "deeper" / "x", "--out", kind)  # type: ignore[arg-type]
        assert str(info.value) == f"cannot write --out {a_file / 'deeper' / 'x'}: {a_file} is not a directory"


def test_output_on_a_file_system_that_takes_no_files_is_refused() -> None:
    # /proc takes no new entries, even for root (chmod would not stop root).
    with pytest.raises(SpotpipeError, match=r"^cannot write run.dir /proc/spotpipe-run: cannot create anything in /proc \("):
        check_output("/proc/spotpipe-run", "run.dir", "dir")


def test_output_of_the_wrong_kind_is_refused(tmp_path: Path, a_file: Path) -> None:
    with pytest.raises(SpotpipeError, match="it is a directory"):
        check_output(tmp_path, "--output")
    with pytest.raises(SpotpipeError, match="it exists and is not a directory"):
        check_output(a_file, "run.dir", "dir")
    with pytest.raises(SpotpipeError, match="the path is empty"):
        check_output("", "--out")


def test_a_good_output_creates_nothing_until_written(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dirs" / "out.csv"
    assert check_output(target, "--out") == target
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == []  # the probe is gone too
    write_output(target, "x,y\n", "--out")
    assert target.read_text() == "x,y\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.csv"]  # no temporary left


def test_a_full_disk_during_a_write_is_one_line_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "report.html"
    with pytest.raises(SpotpipeError) as info:
        write_atomic(target, b"<html>", "--output")
    assert str(info.value) == f"cannot write --output {target}: No space left on device"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_event_log_on_a_full_device_is_one_line() -> None:
    log = EventLog("/dev/full")
    with pytest.raises(SpotpipeError, match=r"^cannot write event log /dev/full: No space left on device$"):
        log.write("step", step=0)
    log.close()
    with pytest.raises(SpotpipeError, match=r"^cannot write --trace /dev/full: No space left on device$"):
        with open_output("/dev/full", "--trace") as fh:
            fh.write("x" * 10_000)
            fh.flush()


def test_event_log_that_cannot_be_created_names_the_file(a_file: Path) -> None:
    with pytest.raises(SpotpipeError, match=f"^cannot write event log {a_file}/events.jsonl: "):
        EventLog(a_file / "events.jsonl")


def test_utf8_inputs_name_the_byte_its_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"rank,index,action\n0,0,caf\xe9\n")  # the 0xE9 is byte 18 + 7 = 25
    with pytest.raises(SpotpipeError) as info:
        read_text(path, "schedule")
    assert str(info.value) == (
        f"schedule {path} is not UTF-8 text: byte 0xE9 at offset 25 (line 2); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )
    with pytest.raises(SpotpipeError, match="^config file .*missing.toml does not exist$"):
        read_text(tmp_path / "missing.toml", "config file")
    with pytest.raises(SpotpipeError, match="is a directory, not a file"):
        read_text(tmp_path, "trace")
    assert decode_utf8("\ufeffJobID|State\n".encode(), "x") == "JobID|State\n"  # a byte-order mark is dropped


def test_events_written_and_read_back(tmp_path: Path) -> None:
    with EventLog(tmp_path / "e" / "events.jsonl", clock=lambda: 1.0) as log:
        log.write("step", step=3)
    assert read_events(tmp_path / "e" / "events.jsonl") == [{"event": "step", "t": 1.0, "step": 3}]


def test_outputs_follow_links_and_never_replace_devices(tmp_path: Path) -> None:
    """A symlinked output is written at its target (the link stays); a device or FIFO is written
    into, never replaced by a regular file (``--out /dev/null`` must leave /dev/null a device)."""
    import os
    import stat

    from spotpipe.fsutil import write_output

    target = tmp_path / "target.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    write_output(link, "new", "--out")
    assert link.is_symlink() and target.read_text() == "new"
    write_output("/dev/null", "discarded", "--out")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_simulate_events_to_a_device_keeps_the_device() -> None:
    import os
    import stat
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "spotpipe.cli", "simulate", "--config", str(root / "configs" / "sim-local.toml"),
                           "--events", "/dev/null"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
