"""Job traces (sacct, AcmeTrace): parsing, bad rows with line numbers, metrics, taxonomy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spotpipe.cli import main
from spotpipe.errors import SpotpipeError
from spotpipe.reliability.analysis import analyze_path
from spotpipe.reliability.columns import int_column, time_column
from spotpipe.reliability.metrics import job_metrics
from spotpipe.reliability.taxonomy import Taxonomy, load_taxonomy
from spotpipe.reliability.traces import detect_format, read_acme, read_sacct

SACCT = """\
JobID|JobName|State|ExitCode|Submit|Start|End|NNodes|AllocTRES|Reason|Foo
100|train|COMPLETED|0:0|2024-03-01T00:00:00|2024-03-01T01:00:00|2024-03-01T11:00:00|2|cpu=8,gres/gpu=16,node=2|None|x
100.batch|batch|COMPLETED|0:0|2024-03-01T00:00:00|2024-03-01T01:00:00|2024-03-01T11:00:00|1|||x
101|train|NODE_FAIL|0:0|2024-03-01T00:00:00|2024-03-01T00:00:00|2024-03-02T00:00:00|4|gres/gpu=32|None|x
102|train|FAILED|1:0|2024-03-01T00:00:00|garbage|2024-03-02T00:00:00|1|gres/gpu=8|None|x
103|train|FAILED|1:0|2024-03-01
104|train|FAILED|1:0|2024-03-02T00:00:00|2024-03-02T00:00:00|2024-03-02T12:00:00|1|gres/gpu:a100=8|Xid 79: GPU has fallen off the bus|x
105|train|RUNNING|0:0|2024-03-02T00:00:00|2024-03-02T00:00:00|Unknown|1|gres/gpu=8|None|x
106|train|PENDING|0:0|2024-03-02T00:00:00|Unknown|Unknown|1|gres/gpu=8|Priority|x
107|train|COMPLETED|0:0|2024-03-02T00:00:00|2024-03-02T10:00:00|2024-03-02T09:00:00|1|gres/gpu=8|None|x
108|eval|CANCELLED by 4242|0:15|2024-03-02T00:00:00|2024-03-02T00:00:00|2024-03-02T06:00:00|1||None|x
109|train|FAILED|137:0|2024-03-02T00:00:00|2024-03-02T00:00:00|2024-03-02T06:00:00|2|gres/gpu=16|None|x

"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sacct_rows_are_used_skipped_or_reported_with_line_numbers(tmp_path):
    table, report = read_sacct(_write(tmp_path, "jobs.sacct", SACCT), gpus_per_node=8)
    assert [p.line for p in report.malformed] == [5, 6, 10]  # bad Start, 5 fields, End < Start
    assert "Start 'garbage'" in report.malformed[0].message and "102" in report.malformed[0].message
    assert "5 fields" in report.malformed[1].message
    assert "end is before Start" in report.malformed[2].message
    assert report.malformed_count == 3
    assert report.rows == 11
    assert report.skipped == {
        "job steps (JobID with '.')": 1,
        "not finished (no End)": 1,
        "never started": 1,
    }
    assert report.unknown_columns == ("Foo",)
    assert table.job_id.tolist() == ["100", "101", "104", "108", "109"]
    assert table.gpus.tolist() == [16, 32, 8, 8, 16]  # TRES, typed TRES, nodes x 8 without TRES
    assert table.state.tolist() == ["COMPLETED", "NODE_FAIL", "FAILED", "CANCELLED", "FAILED"]
    assert table.exit_code.tolist() == [0, 0, 1, 0, 137] and table.signal.tolist() == [0, 0, 0, 15, 0]
    assert table.runtime.tolist() == [36000.0, 86400.0, 43200.0, 21600.0, 21600.0]
    assert table.line.tolist() == [2, 4, 7, 11, 12]


def test_job_metrics_rf_taxonomy_and_buckets(tmp_path):
    table, _ = read_sacct(_write(tmp_path, "jobs.sacct", SACCT))
    metrics = job_metrics(table, Taxonomy(), buckets=(1, 16))
    categories = dict((s.name, s.jobs) for s in metrics.by_category)
    assert categories == {"completed": 1, "hardware": 2, "cancelled": 1, "user": 1}
    node_days = (2 * 10 + 4 * 24 + 1 * 12 + 1 * 6 + 2 * 6) / 24
    assert metrics.node_days == pytest.approx(node_days)
    assert metrics.interruptions == 2  # NODE_FAIL and the Xid failure
    assert metrics.rf == pytest.approx(2 / node_days * 1000)
    small, large = metrics.buckets
    assert (small.label, small.jobs, small.failed, small.interrupted) == ("1-15", 2, 1, 1)
    assert (large.label, large.jobs, large.failed, large.interrupted) == (">=16", 3, 2, 1)
    assert small.mttf_measured_h == pytest.approx(12 + 6)
    assert large.mttf_model_h == pytest.approx(24000 / (2 * metrics.rf))
    gpu_share = {s.name: s.gpu_time_share for s in metrics.by_state}
    total = 16 * 10 + 32 * 24 + 8 * 12 + 8 * 6 + 16 * 6
    assert gpu_share["NODE_FAIL"] == pytest.approx(32 * 24 / total)


def test_custom_taxonomy_rules_and_counted_categories(tmp_path):
    rules = _write(tmp_path, "rules.toml", """
failure_categories = ["hardware", "infrastructure", "user"]
[[rule]]
state = "FAILED"
exit_code = [137]
category = "infrastructure"
""")
    tax = load_taxonomy(rules)
    table, _ = read_sacct(_write(tmp_path, "jobs.sacct", SACCT))
    metrics = job_metrics(table, tax)
    categories = dict((s.name, s.jobs) for s in metrics.by_category)
    assert categories["infrastructure"] == 1 and categories["hardware"] == 2 and "user" not in categories
    assert metrics.interruptions == 3
    bad = _write(tmp_path, "bad.toml", "[[rule]]\nstate = 'X'\ncategory = 'gremlins'\n")
    with pytest.raises(SpotpipeError, match="gremlins"):
        load_taxonomy(bad)
    with pytest.raises(SpotpipeError, match="unknown keys colour"):
        load_taxonomy(_write(tmp_path, "bad2.toml", "colour = 1\n"))


def test_analyze_cli_names_bad_rows_and_unknown_columns(tmp_path, capsys):
    path = _write(tmp_path, "jobs.sacct", SACCT)
    assert main(["reliability", "analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 malformed rows at lines 5, 6, 10" in out
    assert "line 5: job 102: Start 'garbage' is not valid" in out
    assert "unknown columns (ignored): Foo" in out
    assert "failures per 1000 node-days" in out


def test_trace_without_failures_gets_a_clear_answer(tmp_path, capsys):
    text = "JobID|State|Start|End|NNodes\n" + "".join(
        f"{i}|COMPLETED|2024-01-01T00:00:00|2024-01-01T05:00:00|2\n" for i in range(4)
    )
    path = _write(tmp_path, "ok.sacct", text)
    assert main(["reliability", "analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no failures observed (> 20 h of exposure)" in out
    assert "inf" not in out.lower().replace("infrastructure", "")
    assert main(["reliability", "analyze", str(path), "--json"]) == 0
    raw = capsys.readouterr().out
    assert "Infinity" not in raw and "NaN" not in raw
    jobs = json.loads(raw)["files"][0]["jobs"]
    assert jobs["rf_per_1000_node_days"] == 0.0
    assert jobs["mttf_cluster_hours"] is None
    assert jobs["mttf_cluster_text"] == "no failures observed (> 20 h of exposure)"
    assert jobs["by_size"][0]["mttf_measured_hours"] is None
    assert jobs["by_size"][0]["mttf_model_hours"] is None


ACME = """\
job_id,user,node_num,gpu_num,cpu_num,type,state,submit_time,start_time,end_time,duration,queue,gpu_time,fail_time,colour
a1,u1,1,8,128,Other,FAILED,2023-03-01 00:18:22+08:00,2023-03-01 00:18:54+08:00,2023-03-01 00:20:51+08:00,117,32,936.0,,red
a2,u1,1,8,128,Other,COMPLETED,2023-03-01 00:23:58+08:00,2023-03-01 00:24:11+08:00,2023-03-01 01:09:04+08:00,2693,13,21544.0,,red
a3,u2,16,128,1920,Pretrain,NODE_FAIL,2023-03-02 00:00:00+08:00,2023-03-02 00:00:10+08:00,2023-03-03 00:00:10+08:00,86400,10,11059200.0,2023-03-03 00:00:10+08:00,blue
a4,u2,x,8,16,Other,COMPLETED,2023-03-02 00:00:00+08:00,2023-03-02 00:00:10+08:00,2023-03-02 00:10:10+08:00,600,10,4800.0,,blue
a5,u3,1,8,16,Other,CANCELLED,2023-03-02 00:00:00+08:00,,,0,0,0,,blue
"""


def test_acme_trace_with_offsets_and_extra_columns(tmp_path):
    path = _write(tmp_path, "trace_seren.csv", ACME)
    assert detect_format(path) == "acme"
    table, report = read_acme(path)
    assert report.unknown_columns == ("colour",)  # fail_time is a known Kalos column
    assert [(p.line, "node_num 'x'" in p.message) for p in report.malformed] == [(5, True)]
    assert report.skipped == {"never started": 1}
    assert table.runtime.tolist() == [117.0, 2693.0, 86400.0]  # equals the trace's duration column
    assert table.start[0] == pytest.approx(1677601134.0)  # 2023-02-28T16:18:54Z
    metrics = job_metrics(table, Taxonomy())
    assert metrics.interruptions == 1
    assert {s.name: s.jobs for s in metrics.by_category} == {"user": 1, "completed": 1, "hardware": 1}


def test_format_detection_and_missing_columns(tmp_path):
    with pytest.raises(SpotpipeError, match="--format"):
        detect_format(_write(tmp_path, "x.txt", "hello world\n"))
    with pytest.raises(SpotpipeError, match="does not exist"):
        detect_format(tmp_path / "missing.csv")
    with pytest.raises(SpotpipeError, match="NNodes or AllocNodes"):
        read_sacct(_write(tmp_path, "a.sacct", "JobID|State|Start|End\n1|COMPLETED|x|y\n"))
    with pytest.raises(SpotpipeError, match="lacks columns gpu_num"):
        read_acme(_write(tmp_path, "b.csv", "job_id,node_num,state,start_time,end_time\n"))
    assert main(["reliability", "analyze", str(tmp_path / "nope.sacct")]) == 2


def test_time_and_int_columns_find_exactly_the_bad_cells():
    values = ["2024-01-01T00:00:00"] * 5000 + ["Unknown", "2024-13-01T00:00:00", "", "2024-01-01 00:00:01.5"]
    secs, bad = time_column(values)
    assert np.flatnonzero(bad).tolist() == [5001]
    assert np.isnan(secs[5000]) and np.isnan(secs[5002])
    assert secs[5003] - secs[0] == pytest.approx(1.5)
    mixed, bad = time_column(["2024-01-01T08:00:00+08:00", "2024-01-01T00:00:00Z", "2024-01-01T01:00:00-01:00"])
    assert not bad.any() and mixed.tolist() == [1704067200.0, 1704067200.0, 1704074400.0]
    epoch, bad = time_column(["1700000000", "1700000060.5", "soon"])
    assert epoch[:2].tolist() == [1700000000.0, 1700000060.5] and bad.tolist() == [False, False, True]
    ints, bad = int_column(["4", " 8 ", "2.0", "2.5", "four"])
    assert ints[:3].tolist() == [4, 8, 2] and bad.tolist() == [False, False, False, True, True]


def test_requeued_jobs_give_an_ettr_upper_bound(tmp_path):
    text = (
        "JobID|State|Start|End|NNodes\n"
        "7|NODE_FAIL|2024-01-01T00:00:00|2024-01-01T06:00:00|4\n"
        "7|COMPLETED|2024-01-01T08:00:00|2024-01-01T10:00:00|4\n"
        "8|COMPLETED|2024-01-01T00:00:00|2024-01-01T01:00:00|1\n"
    )
    metrics = analyze_path(_write(tmp_path, "r.sacct", text)).jobs
    assert metrics is not None
    assert metrics.requeued_jobs == 1
    assert metrics.ettr_upper_mean == pytest.approx(8 / 10)


ISSUE_REQUEUES = """\
JobID|State|NNodes|Start|End|Elapsed|AllocTRES
4711|REQUEUED|1|2024-01-01T00:00:00|2024-01-01T01:04:49|01:04:49|gres/gpu=8
4711|REQUEUED|1|2024-01-01T02:00:00|2024-01-01T03:14:33|01:14:33|gres/gpu=8
4711|COMPLETED|1|2024-01-01T04:00:00|2024-01-01T05:00:00|01:00:00|gres/gpu=8
"""


def test_requeued_runs_listed_by_sacct_duplicates_are_all_used(tmp_path, capsys):
    path = _write(tmp_path, "requeue.sacct", ISSUE_REQUEUES)
    a = analyze_path(path)
    assert (a.report.rows, a.report.used, a.report.skipped) == (3, 3, {})
    m = a.jobs
    assert m is not None
    run_s = (3600 + 4 * 60 + 49) + (3600 + 14 * 60 + 33) + 3600
    assert m.exposure_hours == pytest.approx(run_s / 3600) and round(m.exposure_hours, 4) == 3.3228
    assert round(m.gpu_hours, 2) == 26.58
    assert m.requeued_jobs == 1
    assert m.ettr_upper_mean == pytest.approx(run_s / (5 * 3600)) and round(m.ettr_upper_min, 3) == 0.665
    assert dict((s.name, s.jobs) for s in m.by_category) == {"unknown": 2, "completed": 1}
    assert main(["reliability", "analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 rows, 3 used" in out and "3.3228 job-hours" in out and "26.58 GPU-hours" in out
    assert "ETTR of 1 requeued jobs (upper bound, run time / wall time): mean 0.665, min 0.665" in out


def test_requeue_gives_the_same_numbers_as_node_fail_earlier_runs(tmp_path):
    requeued = analyze_path(_write(tmp_path, "a.sacct", ISSUE_REQUEUES)).jobs
    node_fail = analyze_path(_write(tmp_path, "b.sacct", ISSUE_REQUEUES.replace("REQUEUED", "NODE_FAIL"))).jobs
    assert requeued is not None and node_fail is not None
    for key in ("jobs", "exposure_hours", "gpu_hours", "requeued_jobs", "ettr_upper_mean"):
        assert getattr(requeued, key) == getattr(node_fail, key), key


def test_requeued_run_with_a_hardware_reason_counts_toward_rf(tmp_path):
    text = "JobID|State|NNodes|Start|End|Reason\n" \
        "9|REQUEUED|2|2024-01-01T00:00:00|2024-01-01T12:00:00|Xid 79 on node a1\n" \
        "9|COMPLETED|2|2024-01-01T13:00:00|2024-01-02T00:00:00|None\n"
    m = analyze_path(_write(tmp_path, "hw.sacct", text)).jobs
    assert m is not None and m.interruptions == 1 and m.requeued_jobs == 1


@pytest.mark.parametrize("state", [
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED",
    "NODE_FAIL", "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD",
    "REQUEUE_FED", "REQUEUE_HOLD", "REQUEUED", "RESIZING", "REVOKED", "SIGNALING", "SPECIAL_EXIT",
    "STAGE_OUT", "STOPPED", "SUSPENDED", "TIMEOUT",
])
def test_a_record_with_an_end_is_a_finished_run_whatever_its_state(tmp_path, state):
    from spotpipe.reliability.traces import SLURM_JOB_STATES

    assert state in SLURM_JOB_STATES
    text = (
        "JobID|State|NNodes|Start|End\n"
        f"1|{state}|1|2024-01-01T00:00:00|2024-01-01T02:00:00\n"
        f"2|{state}|1|2024-01-01T00:00:00|Unknown\n"
    )
    table, report = read_sacct(_write(tmp_path, "s.sacct", text))
    assert table.job_id.tolist() == ["1"] and table.runtime.tolist() == [7200.0]
    assert report.skipped == {"not finished (no End)": 1}
    category = Taxonomy().classify(state)
    assert category != "unknown" or state == "REQUEUED", category  # every documented state has a rule


def test_elapsed_stands_in_for_end_only_for_states_that_ended(tmp_path):
    text = (
        "JobID|State|NNodes|Start|End|Elapsed\n"
        "1|REQUEUED|1|2024-01-01T00:00:00||01:00:00\n"
        "2|RUNNING|1|2024-01-01T00:00:00||01:00:00\n"
    )
    table, report = read_sacct(_write(tmp_path, "e.sacct", text))
    assert table.job_id.tolist() == ["1"] and table.runtime.tolist() == [3600.0]
    text = "JobID|State|NNodes|Elapsed\n1|PREEMPTED|1|02:00:00\n2|SUSPENDED|1|01:00:00\n"
    table, report = read_sacct(_write(tmp_path, "f.sacct", text))
    assert table.job_id.tolist() == ["1"] and table.runtime.tolist() == [7200.0]
    assert report.skipped == {"not finished (no End)": 1}
