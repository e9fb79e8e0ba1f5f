"""Control-plane pieces without processes: tokens, addresses, plans, shared rules, progress."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from spotpipe.config import TrainConfig
from spotpipe.errors import SpotpipeError
from spotpipe.runtime import protocol
from spotpipe.runtime.control.job import checkpoint_due, eval_due
from spotpipe.runtime.control.launch import describe_exit
from spotpipe.runtime.control.progress import Progress, format_duration, format_rate


def test_join_proof_needs_the_token_and_is_bound_to_the_nonce() -> None:
    token = protocol.new_token()
    assert protocol.TOKEN_RE.match(token)
    proof = protocol.join_proof(token, "job1", "n1")
    assert protocol.check_proof(token, "job1", "n1", proof)
    assert not protocol.check_proof(token, "job1", "n2", proof)  # a replayed proof for another nonce
    assert not protocol.check_proof(token, "job2", "n1", proof)
    assert not protocol.check_proof(protocol.new_token(), "job1", "n1", proof)
    assert not protocol.check_proof(token, "job1", "n1", "")
    assert token not in proof


def test_read_token_from_file_env_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = protocol.new_token()
    path = tmp_path / "job.token"
    protocol.write_private_file(path, token)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert protocol.read_token(str(path)) == token
    monkeypatch.setenv(protocol.TOKEN_ENV, token)
    assert protocol.read_token(None) == token
    monkeypatch.delenv(protocol.TOKEN_ENV)
    assert protocol.read_token(None) is None
    with pytest.raises(SpotpipeError, match="does not exist"):
        protocol.read_token(str(tmp_path / "nope"))
    path.write_text("zz\n")
    with pytest.raises(SpotpipeError, match="malformed"):
        protocol.read_token(str(path))
    monkeypatch.setenv(protocol.TOKEN_ENV, "not hex")
    with pytest.raises(SpotpipeError, match="SPOTPIPE_TOKEN is malformed"):
        protocol.read_token(None)


@pytest.mark.parametrize("text,want", [("127.0.0.1:29400", ("127.0.0.1", 29400)), ("host.example:1", ("host.example", 1)), ("[::1]:80", ("::1", 80))])
def test_parse_address(text: str, want: tuple[str, int]) -> None:
    assert protocol.parse_address(text) == want


@pytest.mark.parametrize("text", ["nohost", ":80", "h:0", "h:99999", "h:x"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(SpotpipeError, match="HOST:PORT"):
        protocol.parse_address(text)


def test_generation_plan_round_trip_and_ranks() -> None:
    from spotpipe.runtime.comm.groups import GenerationPlan, Member

    members = tuple(Member(10 + r * 2 + s, s, r, "h", 100 + s) for r in range(2) for s in range(2))
    plan = GenerationPlan(3, 2, 2, members)
    again = GenerationPlan.from_json(plan.to_json())
    assert again == plan
    assert plan.world_rank(1, 1) == 3 and plan.rank_of_worker(13) == 3
    assert members[3].name() == "worker 13 (stage 1, replica 1)"
    with pytest.raises(SpotpipeError):
        GenerationPlan(1, 2, 2, members[:3])
    with pytest.raises(SpotpipeError, match="world rank"):
        GenerationPlan(1, 2, 2, (members[1], members[0], members[2], members[3]))


def test_eval_and_checkpoint_rules() -> None:
    t = TrainConfig(steps=10, eval_every=4, checkpoint_every=3)
    assert [s for s in range(10) if eval_due(s, t, False, "")] == [3, 7, 9]
    assert eval_due(5, t, True, "time") and not eval_due(5, t, True, "interrupt")
    assert eval_due(9, t, True, "interrupt")  # the last step always evaluates
    assert [s for s in range(10) if checkpoint_due(s, t, False)] == [2, 5, 8, 9]
    assert checkpoint_due(4, t, True)
    assert not checkpoint_due(2, TrainConfig(checkpoint_every=0), True)


def test_progress_line_on_tty_and_plain_lines_elsewhere() -> None:
    tty = io.StringIO()
    p = Progress(100, tty, tty=True)
    p.step(0, 3.5, 0.5, 1000)
    p.message("step 1: validation loss 3.4")
    p.step(1, 3.0, 0.5, 1000)
    p.close()
    text = tty.getvalue()
    assert "\rstep 2/100  loss 3.0000  2.0k tok/s  ETA 49s" in text
    assert "validation loss 3.4\n" in text and text.endswith("\n")
    plain = io.StringIO()
    p = Progress(3, plain, tty=False, every_s=3600)
    for i in range(3):
        p.step(i, 2.0, 1.0, 10)
    lines = plain.getvalue().splitlines()
    assert lines == ["step 1/3  loss 2.0000  10 tok/s  ETA 2s", "step 3/3  loss 2.0000  10 tok/s  ETA 0s"]
    assert "\r" not in plain.getvalue()


def test_final_step_line_is_written_once() -> None:
    """Issue 10, section 5: `make run` showed its final `step N/N` line twice (drawn, then redrawn
    under the last evaluation's message). The final line ends the live line: written once."""
    tty = io.StringIO()
    p = Progress(3, tty, tty=True)
    for i in range(3):
        p.step(i, 2.0, 1.0, 10)
    p.message("step 3: validation loss 1.9")
    p.close()
    text = tty.getvalue()
    assert text.count("step 3/3") == 1, text
    assert text.endswith("step 3/3  loss 2.0000  10 tok/s  ETA 0s\nstep 3: validation loss 1.9\n"), repr(text)
    plain = io.StringIO()
    p = Progress(3, plain, tty=False, every_s=0.0)
    for i in range(3):
        p.step(i, 2.0, 1.0, 10)
    p.message("step 3: validation loss 1.9")
    p.close()
    assert plain.getvalue().count("step 3/3") == 1


def test_formatting_helpers() -> None:
    assert format_duration(75) == "1m15s" and format_duration(4000) == "1h06m" and format_duration(9) == "9s"
    assert format_rate(1_500_000) == "1.50M" and format_rate(12_345) == "12.3k"
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit code 3"


def test_training_configs_load_and_default_matches_builtin() -> None:
    from spotpipe.config import JobConfig, load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("default", "tinyshakespeare", "replicas", "interleaved"):
        load_config(root / f"{name}.toml")
    assert load_config(root / "default.toml") == JobConfig().validate()
