"""`spotpipe schedule show | validate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from spotpipe.schedule import cli as schedule_cli
from spotpipe.schedule.generators import one_f_one_b_schedule
from spotpipe.schedule.ir import Schedule, ScheduleError
from spotpipe.schedule.passes import add_communication

pytestmark = pytest.mark.timeout(30)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotpipe")
    schedule_cli.register(p.add_subparsers(dest="command"))
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


def test_show_prints_the_grid_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["schedule", "show", "--schedule", "1f1b", "--stages", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[2:] for line in out.splitlines() if line.startswith("rank ")]
    assert len(rows) == 4
    assert rows[0][:5] == ["0F0", "0F1", "0F2", "0F3", "."]
    assert rows[3][:5] == [".", ".", ".", "3F0", "3B0"]
    assert "bubble 27.3%" in out  # (S-1)/(M+S-1) = 3/11


def test_show_formats(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["schedule", "show", "--stages", "2", "--microbatches", "2", "--lowered", "--format", "text"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "rank 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1",
        "rank 1: 1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1",
    ]
    out = tmp_path / "s.csv"
    assert run(["schedule", "show", "--schedule", "interleaved", "--stages", "2", "--virtual-stages", "2",
                "--microbatches", "4", "--format", "csv", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert Schedule.from_csv(out.read_text()).num_stages == 4
    assert run(["schedule", "show", "--format", "chrome", "--lowered"]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert any(e["ph"] == "X" for e in trace["traceEvents"])


def test_validate_good_and_bad(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text(add_communication(one_f_one_b_schedule(3, 4)).to_csv())
    assert run(["schedule", "validate", str(good)]) == 0
    assert "valid schedule 1f1b: 3 ranks, 3 stages, 4 microbatches, lowered" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text(Schedule.from_rank_texts(["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"]).to_csv())
    with pytest.raises(ScheduleError, match=r"(?s)^deadlock: .*\[0B0\].*\[1F1\]"):
        run(["schedule", "validate", str(bad)])


def test_errors_through_the_main_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from spotpipe.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text(Schedule.from_rank_texts(["0B0 0F0", "1F0 1B0"]).to_csv())
    assert main(["schedule", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: 0B0 runs before its forward 0F0 on rank 0\n")
    assert "[0B0]" in err and "Traceback" not in err
    assert main(["schedule", "validate", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert main(["schedule", "show", "--schedule", "interleaved", "--stages", "4", "--microbatches", "6"]) == 2
    assert "must be a multiple of stages (4)" in capsys.readouterr().err
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("rank,index,action\n0,0,0X0\n")
    assert main(["schedule", "validate", str(garbage)]) == 2
    assert f"{garbage}: row 2" in capsys.readouterr().err


def test_every_option_has_help() -> None:
    top = parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    group = sub.choices["schedule"]
    inner = next(a for a in group._actions if isinstance(a, argparse._SubParsersAction))
    assert set(inner.choices) == {"show", "validate", "plan", "memory"}
    for name, command in inner.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"schedule {name} {action.dest} has no help"
    with pytest.raises(SystemExit):
        top.parse_args(["schedule", "show", "--stages", "0"])
