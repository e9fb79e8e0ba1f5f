"""Bad input that used to get through (issue 10, section 3): each kind on every command, as the
user meets it, through the real command line. Every case is one ``spotpipe: error:`` line, exit
code 2, no traceback, and nothing started or written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotpipe.cli import main
from spotpipe.config import JobConfig, load_config
from spotpipe.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def spotpipe(*args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def one_line(proc: subprocess.CompletedProcess[str], *parts: str) -> str:
    """Assert exit code 2 and exactly one ``spotpipe: error:`` line holding every part."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    err = proc.stderr
    assert err.startswith("spotpipe: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    return err


def one_line_main(capsys: pytest.CaptureFixture[str], argv: list[str], *parts: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)
    return err


@pytest.fixture()
def blocker(tmp_path: Path) -> Path:
    """A regular file that output paths are put under (root ignores chmod, not this)."""
    path = tmp_path / "README.md"
    path.write_text("a file, not a directory\n")
    return path


@pytest.fixture(scope="module")
def sacct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "jobs.sacct"
    path.write_text("JobID|State|NNodes|Start|End\n1|NODE_FAIL|2|2024-01-01T00:00:00|2024-01-01T10:00:00\n"
                    "2|COMPLETED|2|2024-01-01T00:00:00|2024-01-02T00:00:00\n")
    return path


# -- outputs that cannot be written -------------------------------------------------------------


def test_issue_examples_of_unwritable_outputs(blocker: Path, tmp_path: Path) -> None:
    text = tmp_path / "in.txt"
    text.write_text("some text to tokenize\n" * 10)
    one_line(spotpipe("data", "prepare", str(text), "--out", str(blocker / "x")),
             f"cannot write --out {blocker / 'x'}: {blocker} is not a directory")
    t0 = time.monotonic()
    proc = spotpipe("train", "--set", f"run.dir={blocker / 'run'}", "--set", "train.steps=2")
    one_line(proc, f"cannot write run.dir {blocker / 'run'}: {blocker} is not a directory")
    assert time.monotonic() - t0 < 30  # before any worker starts (it took 45 s and a traceback)


OUTPUT_CASES = [
    (["schedule", "show", "--out", "{bad}"], "--out"),
    (["schedule", "plan", "--config", "{geo}", "--trace", "{bad}"], "--trace"),
    (["schedule", "plan", "--config", "{geo}", "--csv", "{bad}"], "--csv"),
    (["simulate", "--set", "train.steps=3", "--trace", "{bad}"], "--trace"),
    (["simulate", "--set", "train.steps=3", "--events", "{bad}"], "--events"),
    (["reliability", "report", "--gpus", "64", "--rf", "6.5", "--trials", "2", "-o", "{bad}"], "--output"),
    (["data", "prepare", "{text}", "--out", "{bad}"], "--out"),
    (["data", "tokenizer", "{text}", "--vocab-size", "300", "--out", "{bad}"], "--out"),
]
"""One command line per option that names a file or folder to write."""

INPUT_FILE_OPTIONS = {("reliability simulate", "--trace")}
"""Options whose names look like outputs but that name a file to read."""


def test_every_output_option_of_every_command_is_checked_below() -> None:
    """A new option that writes a file must join :data:`OUTPUT_CASES` (and so be checked first)."""
    import argparse

    from spotpipe.cli import build_parser

    def walk(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, str]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    found += walk(sub, f"{name} {sub_name}".strip())
            elif action.dest in ("out", "output", "trace", "events", "csv") and action.option_strings:
                found.append((name, max(action.option_strings, key=len)))
        return found

    written = {cmd_opt for cmd_opt in walk(build_parser(), "") if cmd_opt not in INPUT_FILE_OPTIONS}
    cases = {(" ".join(a for a in argv[:2] if not a.startswith("-") and "{" not in a), option) for argv, option in OUTPUT_CASES}
    assert written == cases


@pytest.mark.parametrize("argv, option", OUTPUT_CASES)
@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_every_output_option_is_checked_before_the_work(
    argv: list[str], option: str, where: str, blocker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = blocker / "out" if where == "under a file" else Path("/proc/spotpipe-out")
    reason = f"{blocker} is not a directory" if where == "under a file" else "cannot create anything in /proc"
    text = tmp_path / "in.txt"
    text.write_text("text\n")
    geo = ROOT / "configs" / "skippipe-paper.toml"
    args = [a.replace("{bad}", str(bad)).replace("{text}", str(text)).replace("{geo}", str(geo)) for a in argv]
    one_line_main(capsys, args, f"cannot write {option} {bad}: {reason}")


def test_run_dir_on_a_read_only_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_main(capsys, ["train", "--set", "run.dir=/proc/spotpipe-run"],
                  "cannot write run.dir /proc/spotpipe-run: cannot create anything in /proc")


def test_token_cache_that_cannot_be_written(blocker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("text to be cached\n" * 20)
    monkeypatch.setenv("SPOTPIPE_CACHE", str(blocker / "cache"))
    one_line_main(capsys, ["train", "--set", f"data.path={text}", "--set", f"run.dir={tmp_path / 'run'}"],
                  f"cannot write the token cache ($SPOTPIPE_CACHE) {blocker / 'cache'}/corpus-", f"{blocker} is not a directory")
    assert not (tmp_path / "run").exists()


# -- text inputs that are not UTF-8 --------------------------------------------------------------


def _latin1(path: Path, text: str) -> Path:
    """``text`` with its first 'é' written as the single byte 0xE9 (Latin-1)."""
    path.write_bytes(text.encode("utf-8").replace("é".encode(), b"\xe9", 1))
    return path


def test_issue_example_schedule_csv_with_byte_e9(tmp_path: Path) -> None:
    csv = _latin1(tmp_path / "s.csv", "rank,index,action\n0,0,0F0\n# café\n")
    one_line(spotpipe("schedule", "validate", str(csv)),
             f"schedule {csv} is not UTF-8 text: byte 0xE9 at offset 31 (line 3)")


@pytest.mark.parametrize(
    "name, text, argv",
    [
        ("c.toml", "# café\n[train]\nsteps = 3\n", ["simulate", "--config", "{f}"]),
        ("j.sacct", "JobID|State|NNodes|Start|End\n1|COMPLETED|1|2024-01-01T00:00:00|2024-01-01T01:00:00|é\n",
         ["reliability", "analyze", "{f}"]),
        ("a.csv", "job_id,node_num,gpu_num,state,start_time,end_time\né,1,8,COMPLETED,2024-01-01 00:00:00,2024-01-01 01:00:00\n",
         ["reliability", "analyze", "--format", "acme", "{f}"]),
        ("e.jsonl", '{"event":"run_start","t":0,"name":"é"}\n', ["reliability", "analyze", "{f}"]),
        ("l.csv", "System,nodes,Prob Started\n20,512,é\n", ["reliability", "analyze", "--format", "lanl", "{f}"]),
        ("b.csv", "1000,add,é\n", ["reliability", "analyze", "--format", "bamboo", "{f}"]),
        ("r.toml", "# é\n", ["reliability", "analyze", "--rules", "{f}", "{sacct}"]),
        ("links.csv", "location_a,location_b,latency_ms,bandwidth_GiB_per_s\né,b,1,1\n",
         ["simulate", "--set", "network.matrix={f}", "--set", "train.steps=2"]),
        ("t.txt", "1000,remove,é\n", ["simulate", "--set", "sim.failure_trace={f}", "--set", "train.steps=2"]),
    ],
)
def test_every_text_input_names_the_file_and_byte_offset(
    name: str, text: str, argv: list[str], tmp_path: Path, sacct: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _latin1(tmp_path / name, text)
    offset = text.encode().index("é".encode())
    line = text[: text.index("é")].count("\n") + 1
    args = [a.replace("{f}", str(path)).replace("{sacct}", str(sacct)) for a in argv]
    one_line_main(capsys, args, f"{path} is not UTF-8 text: byte 0xE9 at offset {offset} (line {line})")


def test_token_file_that_is_not_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = _latin1(tmp_path / "job.token", "é" + "a" * 31)
    monkeypatch.delenv("SPOTPIPE_TOKEN", raising=False)
    from spotpipe.errors import SpotpipeError
    from spotpipe.runtime.protocol import read_token

    with pytest.raises(SpotpipeError, match=f"^token file {token} is not UTF-8 text: byte 0xE9 at offset 0"):
        read_token(str(token))


# -- numbers that are not finite or overflow -----------------------------------------------------


def _float_keys() -> list[str]:
    import typing
    from dataclasses import fields

    keys = []
    for section in fields(JobConfig):
        hints = typing.get_type_hints(type(getattr(JobConfig(), section.name)))
        keys += [f"{section.name}.{k}" for k, t in hints.items() if t is float or t == tuple[float, ...]]
    return keys


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_every_float_of_the_config_is_finite(value: str) -> None:
    keys = _float_keys()
    assert "train.lr" in keys and "sim.speed_factors" in keys and len(keys) >= 20
    for key in keys:
        raw = f"[{value}]" if key == "sim.speed_factors" else value
        with pytest.raises(ConfigError, match=f"^{key}: expected a finite number, got"):
            load_config(None, [f"{key}={raw}"])


def test_issue_example_lr_inf_is_refused_before_training() -> None:
    one_line(spotpipe("train", "--set", "train.lr=inf"), "train.lr: expected a finite number, got inf")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=1e24", "train.steps: expected an integer, got 1e+24"),
        ("train.steps=99999999999999999999999", "train.steps: expected a 64-bit integer"),
        ("train.beta2=1", "train.beta2 must be in [0, 1), got 1.0"),
        ("train.beta1=-0.1", "train.beta1 must be in [0, 1), got -0.1"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
        ("model.norm_eps=0", "model.norm_eps must be in (0, 1)"),
        ("model.rope_theta=0", "model.rope_theta must be > 1"),
        ("run.timeout_s=1e300", "run.timeout_s must be in (0, 1e+06] seconds"),
        ("ft.detect_timeout_s=1e7", "ft.detect_timeout_s must be in (0, 1e+06] seconds"),
        ("train.seed=-1", "train.seed must be >= 0"),
    ],
)
def test_config_numbers_out_of_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_failure_times_of_the_simulator_are_finite(capsys: pytest.CaptureFixture[str]) -> None:
    one_line_main(capsys, ["simulate", "--set", 'sim.failures=["3@inf"]'],
                  "sim.failures[0]: expected NODE@SECONDS (finite) like 3@120.5, got '3@inf'")


def test_issue_example_gpus_1e24(capsys: pytest.CaptureFixture[str]) -> None:
    one_line(spotpipe("reliability", "plan", "--gpus", "1e24", "--rf", "6.5"),
             "argument --gpus: expected an integer in 1..1000000000, got 1e24")
    one_line(spotpipe("reliability", "plan", "--gpus", "1000000000000000000000000", "--rf", "6.5"),
             "argument --gpus: expected an integer in 1..1000000000")
    assert main(["reliability", "plan", "--gpus", "1.6e4", "--rf", "6.5"]) == 0  # a whole number in e-notation
    assert "16000 GPUs" in capsys.readouterr().out


# -- degenerate values ---------------------------------------------------------------------------


def test_schedule_csv_with_only_its_header_is_invalid(tmp_path: Path) -> None:
    csv = tmp_path / "empty.csv"
    csv.write_text("rank,index,action\n")
    one_line(spotpipe("schedule", "validate", str(csv)), f"{csv}: no actions after the header")


def test_degenerate_schedules_and_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spotpipe.schedule.ir import Schedule, ScheduleError
    from spotpipe.schedule.validate import validate_schedule

    negative = tmp_path / "neg.csv"
    negative.write_text("rank,index,action\n-1,0,0F0\n")
    one_line_main(capsys, ["schedule", "validate", str(negative)], "row 2", "rank and index must be >= 0")
    with pytest.raises(ScheduleError, match="^the schedule has no actions"):
        validate_schedule(Schedule.from_rank_texts(["", ""]))
    with pytest.raises(ScheduleError, match="^rank 1 has no actions"):
        validate_schedule(Schedule.from_rank_texts(["0F0 0B0", ""]))
    header_only = tmp_path / "h.sacct"
    header_only.write_text("JobID|State|NNodes|Start|End\n")
    one_line_main(capsys, ["reliability", "analyze", str(header_only)], f"{header_only}: a header and no job rows")
    lanl = tmp_path / "l.csv"
    lanl.write_text("System,nodes,Prob Started,Facilities,Hardware,Human Error,Network,Undetermined,Software\n")
    one_line_main(capsys, ["reliability", "analyze", "--format", "lanl", str(lanl)], "a header and no failure records")


def test_issue_examples_of_degenerate_options(sacct: Path) -> None:
    one_line(spotpipe("reliability", "analyze", "--gpus-per-node", "0", str(sacct)),
             "argument --gpus-per-node: expected an integer in 1..1024, got 0")
    one_line(spotpipe("worker", "--join", "127.0.0.1:29400", "--timeout", "-1"),
             "argument --timeout: expected a number in (0, 1e+06], got -1")


# -- unbounded work ------------------------------------------------------------------------------


def test_issue_example_huge_schedule_is_refused_with_its_cost(tmp_path: Path) -> None:
    t0 = time.monotonic()
    one_line(spotpipe("schedule", "show", "--stages", "4", "--microbatches", "1000000", "--format", "csv",
                      "--out", str(tmp_path / "x.csv")),
             "makes 8,000,000 actions", "s and", "GiB", "the limit is --max-actions 100000")
    assert time.monotonic() - t0 < 20 and not (tmp_path / "x.csv").exists()


def test_max_actions_allows_what_it_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_main(capsys, ["schedule", "show", "--microbatches", "20", "--max-actions", "100"], "makes 160 actions")
    assert main(["schedule", "show", "--microbatches", "20", "--max-actions", "160", "--format", "csv"]) == 0


def test_issue_example_simulation_of_1e8_steps_is_refused_with_its_cost() -> None:
    one_line(spotpipe("simulate", "--set", "train.steps=100000000", "--set", "sim.failure_rate=1"),
             "train.steps = 100,000,000 steps are played one by one", "GiB", "the limit is --max-steps 10000000")


def test_simulation_of_a_huge_iteration_is_refused_with_its_cost(capsys: pytest.CaptureFixture[str]) -> None:
    one_line_main(capsys, ["simulate", "--set", "pipeline.microbatches=1000000", "--set", "train.batch_size=1000000"],
                  "an iteration plays 20,000,000 actions", "GiB", "the limit is --max-actions 4000000")


def test_simulation_that_rolls_back_forever_is_stopped_at_max_steps(capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_main(capsys, ["simulate", "--set", "train.steps=20000", "--set", "sim.failure_rate=5000",
                                 "--set", "sim.restart_s=1", "--set", "sim.replace_s=1", "--max-steps", "30000"],
                        "simulate: stopped after playing 30,000 steps", "again after rollbacks", "--max-steps 30000")
    assert "of train.steps = 20,000 committed" in err


def test_issue_example_monte_carlo_is_refused_with_its_cost() -> None:
    err = one_line(spotpipe("reliability", "simulate", "--gpus", "131072", "--rf", "6.5", "--wall", "100000d",
                            "--trials", "5"),
                   "reliability simulate (5 trials x 2 policies", "the limit is --max-failures 10000000")
    # 16,384 nodes at 6.5 per 1000 node-days fail every 811 s: 1.065e7 failures per job, x 10 jobs
    count = int(err.split("about ")[1].split(" failures")[0].replace(",", ""))
    assert 1.0e8 < count < 1.1e8


@pytest.mark.parametrize("argv", [
    ["reliability", "validate", "--trials", "100000"],
    ["reliability", "report", "--gpus", "64", "--rf", "100000", "--trials", "100000", "-o", "{out}"],
])
def test_every_monte_carlo_command_is_bounded(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.replace("{out}", str(tmp_path / "r.html")) for a in argv]
    one_line_main(capsys, args, "would draw and play about", "--max-failures 10000000")
    assert not (tmp_path / "r.html").exists()


def test_monte_carlo_reports_progress_per_chunk() -> None:
    from spotpipe.reliability import montecarlo as mc

    seen: list[int] = []
    mc.simulate(mc.Exponential(100.0), mc.CheckpointFree(1.0), 3e7, 1.0, trials=8, progress=seen.append)
    assert seen[-1] == 8 and seen == sorted(seen) and len(seen) > 1  # 300,000 failures a job: chunks of trials


# -- a timeout that is not honoured --------------------------------------------------------------


def test_issue_example_worker_join_to_a_port_that_never_answers() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (the kernel does), never answers
        port = silent.getsockname()[1]
        env = dict(os.environ, SPOTPIPE_TOKEN="a" * 32)
        t0 = time.monotonic()
        proc = spotpipe("worker", "--join", f"127.0.0.1:{port}", "--timeout", "5", timeout=90, env=env)
        took = time.monotonic() - t0
    one_line(proc, f"cannot reach the controller at 127.0.0.1:{port} within 5 s")
    assert took < 20, took  # 5 s plus starting Python and torch


# -- corrupt data and late refusals --------------------------------------------------------------


@pytest.fixture()
def token_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    assert main(["data", "prepare", str(text), "--out", str(tmp_path / "tok")]) == 0
    capsys.readouterr()
    return tmp_path / "tok"


def test_issue_example_flipped_byte_is_caught_before_workers_start(token_dir: Path, tmp_path: Path) -> None:
    tokens = token_dir / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[100] ^= 0x01
    tokens.write_bytes(bytes(data))
    run = tmp_path / "run"
    t0 = time.monotonic()
    one_line(spotpipe("train", "--set", f"data.path={token_dir}", "--set", f"run.dir={run}"),
             f"{tokens} is corrupt: its SHA-256 is")
    assert time.monotonic() - t0 < 30 and not run.exists()  # no worker started, nothing written


def test_issue_example_header_vocabulary_below_the_largest_id(token_dir: Path, tmp_path: Path) -> None:
    header = token_dir / "header.json"
    body = json.loads(header.read_text())
    body["vocab_size"] = 100  # 'z' is 122, the largest id of the text
    header.write_text(json.dumps(body))
    run = tmp_path / "run"
    one_line(spotpipe("train", "--set", f"data.path={token_dir}", "--set", f"run.dir={run}"),
             f"{token_dir / 'tokens.bin'} holds token id 122, but {header} says vocab_size 100")
    assert not run.exists()


def test_issue_example_tied_embeddings_across_workers_is_refused_at_validation(tmp_path: Path) -> None:
    t0 = time.monotonic()
    one_line(spotpipe("train", "--set", "model.tie_embeddings=true", "--set", f"run.dir={tmp_path / 'run'}"),
             "model.tie_embeddings = true needs the embedding and the LM head in one model chunk",
             "pipeline.stages = 4")
    assert time.monotonic() - t0 < 20 and not (tmp_path / "run").exists()
    assert load_config(None, ["model.tie_embeddings=true", "pipeline.stages=1"]).model.tie_embeddings


# -- SkipPipe node runs (`spotpipe train` with pipeline.stage_nodes) ----------------------------------

GEO_TRAIN = ROOT / "configs" / "skippipe-geo.toml"


def test_a_plan_file_that_does_not_match_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.csv"
    assert main(["schedule", "plan", "--config", str(GEO_TRAIN), "--csv", str(plan), "--no-progress",
                 "--set", "pipeline.plan_budget=100"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    base = ["train", "--config", str(GEO_TRAIN), "--set", f"pipeline.plan_file={plan}", "--set", f"run.dir={run}"]
    one_line_main(capsys, base + ["--set", "pipeline.stage_nodes=[2,3,2,1]"],
                  f"pipeline.plan_file {plan} plans 8 nodes in stage groups [2, 2, 2, 2], but pipeline.stage_nodes = "
                  "[2, 3, 2, 1]: plan again with this config")
    one_line_main(capsys, base + ["--set", "pipeline.microbatches=3", "--set", "train.batch_size=12"],
                  "has 12 microbatches per iteration, but pipeline.stage_nodes[0] x pipeline.microbatches = 6")
    one_line_main(capsys, base + ["--set", "pipeline.node_memory=1"], "over pipeline.node_memory = 1")
    one_line_main(capsys, base + ["--set", "pipeline.skip_ratio=0.5"],
                  "its paths visit 3 of 4 stages, but pipeline.skip_ratio = 0.5 gives k = 2: plan again with this config")
    from spotpipe.schedule.generators import build_schedule

    flat = tmp_path / "flat.csv"  # a schedule over stages, not nodes
    flat.write_text(build_schedule("1f1b", 4, 4, 1).to_csv())
    one_line_main(capsys, ["train", "--config", str(GEO_TRAIN), "--set", f"pipeline.plan_file={flat}", "--set",
                           f"run.dir={run}"], "not a SkipPipe node schedule")
    one_line_main(capsys, ["train", "--config", str(GEO_TRAIN), "--set", f"pipeline.plan_file={tmp_path / 'none.csv'}",
                           "--set", f"run.dir={run}"], "none.csv")
    assert not (run / "events.jsonl").exists(), "nothing may start"


@pytest.mark.parametrize("sets, message", [
    (["pipeline.stage_nodes=[2,2,2]"], "pipeline.stage_nodes lists 3 stage groups, but pipeline.stages = 4"),
    (["pipeline.stage_nodes=[2,9,2,2]", "network.matrix=''", "network.locations=[]"], "stage 1 has 9 nodes (pipeline.stage_nodes[1]) but gets only 8 microbatch visits"),
    (["pipeline.replicas=2"], "pipeline.replicas must be 1, got 2"),
    (["ft.strategy=mirror"], "ft.strategy = mirror does not run with pipeline.stage_nodes yet"),
    (["pipeline.paths=fastest"], "pipeline.paths must be one of full, random, skippipe-nca, skippipe, got 'fastest'"),
    (["pipeline.full_every=-1"], "pipeline.full_every must be in 0..1000000"),
    (["ft.faults=['stage=9@step=3']"], "names node 9, but pipeline.stage_nodes has nodes 0..7"),
])
def test_node_counts_and_keys_a_node_run_cannot_use(sets: list[str], message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--config", str(GEO_TRAIN), "--set", f"run.dir={tmp_path / 'run'}"]
    for s in sets:
        argv += ["--set", s]
    one_line_main(capsys, argv, message)
    assert not (tmp_path / "run" / "events.jsonl").exists()
