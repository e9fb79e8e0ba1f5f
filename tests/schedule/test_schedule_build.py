"""One builder of a job's schedule (spotpipe.schedule.build): the runtime, the simulator and the
CLI get the same lowered schedule, CheckFree+ swapped paths included; one registry of names."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from spotpipe.config import JobConfig, apply_overrides, load_config
from spotpipe.errors import ConfigError
from spotpipe.schedule import cli as schedule_cli
from spotpipe.schedule.build import compute_schedule, job_schedule
from spotpipe.schedule.generators import REGISTRY, build_schedule, model_chunks
from spotpipe.schedule.ir import Op, Schedule, ScheduleError
from spotpipe.schedule.passes import lower
from spotpipe.schedule.swap import swap_permutation
from spotpipe.schedule.validate import validate_schedule

pytestmark = pytest.mark.timeout(60)


def job(*overrides: str) -> JobConfig:
    base = ["pipeline.stages=4", "pipeline.microbatches=4", "train.batch_size=8", "model.layers=8",
            "train.steps=3", "sim.device_tflops=0.01"]
    return apply_overrides(JobConfig(), base + list(overrides)).validate()


def test_simulator_plays_the_runtimes_checkfree_plus_schedule() -> None:
    from spotpipe.sim.job import prepare, simulate_job

    cfg = job("ft.strategy=checkfree+")
    runtime = job_schedule(cfg)
    setup = prepare(cfg)
    assert setup.schedule == runtime
    swapped = swap_permutation(4)
    assert [runtime.path(m) for m in range(4)] == [(0, 1, 2, 3), swapped, (0, 1, 2, 3), swapped]
    assert runtime.is_lowered() and runtime.name == "1f1b+swap"
    # ... which is not the plain schedule the simulator used to play
    assert runtime != job_schedule(cfg, swap=False) == job_schedule(job())
    assert simulate_job(setup).status == "finished"


def test_runtime_workers_and_preparation_use_the_builder() -> None:
    from spotpipe.runtime.control import job as control_job
    from spotpipe.runtime.worker import worker

    assert worker.job_schedule is job_schedule and control_job.job_schedule is job_schedule
    assert not hasattr(control_job, "build_pipeline_schedule")


@pytest.mark.parametrize("swap", [None, True, False])
def test_swap_follows_the_config_unless_forced(swap: bool | None) -> None:
    plain, edges = job(), job("ft.swap_edges=true")
    expect_plain = swap is True
    expect_edges = swap is not False
    assert (job_schedule(plain, swap).paths is not None) == expect_plain
    assert (job_schedule(edges, swap).paths is not None) == expect_edges


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_schedule_builds_for_a_job(name: str) -> None:
    cfg = job(f"pipeline.schedule={name}", "pipeline.virtual_stages=2")
    s = job_schedule(cfg)
    validate_schedule(s)
    assert s.num_stages == model_chunks(name, 4, 2) == (8 if REGISTRY[name].chunked else 4)
    assert s == lower(build_schedule(name, 4, 4, 2))
    assert {a.op for acts in compute_schedule(cfg.pipeline).ranks for a in acts} == {Op.F, Op.B}


def test_registry_is_the_only_list_of_names() -> None:
    assert tuple(REGISTRY) == ("gpipe", "1f1b", "interleaved", "chronos")
    allowed = ", ".join(REGISTRY)
    with pytest.raises(ConfigError, match=f"pipeline.schedule must be one of {allowed}, got 'zb'"):
        load_config(None, ["pipeline.schedule=zb"])
    with pytest.raises(ScheduleError, match=f"unknown schedule 'zb': allowed values are {allowed}"):
        build_schedule("zb", 4, 4)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        model_chunks("zb", 4, 2)
    parser = argparse.ArgumentParser(prog="spotpipe")
    schedule_cli.register(parser.add_subparsers(dest="command"))
    show = parser.parse_args(["schedule", "show"])
    assert show.schedule == "1f1b"
    with pytest.raises(SystemExit):
        parser.parse_args(["schedule", "show", "--schedule", "zb"])


def test_cli_shows_the_jobs_swapped_schedule(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="spotpipe")
    schedule_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "s.csv"
    args = parser.parse_args(["schedule", "show", "--stages", "4", "--microbatches", "4", "--swap", "--lowered",
                              "--format", "csv", "--out", str(out)])
    assert args.func(args) == 0
    shown = Schedule.from_csv(out.read_text())
    assert shown.to_csv() == job_schedule(job("ft.strategy=checkfree+")).to_csv()
    assert shown.path(1) == swap_permutation(4)


def test_swap_needs_four_stages() -> None:
    cfg = job("pipeline.stages=2", "model.layers=2")
    with pytest.raises(ScheduleError, match=">= 4 stages"):
        job_schedule(cfg, swap=True)
