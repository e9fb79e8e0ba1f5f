"""Bytes per chunk from the config, and the job's predicted memory per rank."""

from __future__ import annotations

import pytest

from spotpipe.config import load_config
from spotpipe.model.partition import model_shapes
from spotpipe.planner import chunk_bytes, predict_memory, resolved
from spotpipe.schedule.ir import Op

pytestmark = pytest.mark.timeout(30)

BASE = ("model.layers=8", "model.d_model=64", "model.heads=4", "model.context=32", "pipeline.stages=4",
        "pipeline.microbatches=8", "train.batch_size=16")


def test_chunk_bytes_from_the_shapes() -> None:
    cfg = load_config(None, list(BASE))
    sizes = chunk_bytes(cfg)
    shapes = model_shapes(cfg.model, 4)
    assert len(sizes) == 4
    for i, (c, s) in enumerate(zip(sizes, shapes)):
        assert c.weights == c.grads == 4 * s.params  # fp32
        assert c.optimizer == 2 * c.weights  # AdamW: two moments
        assert c.activations == 2 * s.activation_bytes_per_sequence  # 16 / 8 = 2 sequences per microbatch
        assert c.input == (0 if i == 0 else 2 * 32 * 64 * 4)  # the hidden state it receives


def test_a_bfloat16_model_keeps_float32_masters_and_moments() -> None:
    cfg = load_config(None, [*BASE, "model.dtype=bfloat16"])
    for c, s in zip(chunk_bytes(cfg), model_shapes(cfg.model, 4)):
        assert c.weights == c.grads == 2 * s.params
        assert c.optimizer == 12 * s.params  # float32 master + two float32 moments


def test_the_same_model_cut_in_twice_as_many_chunks_has_the_same_bytes() -> None:
    ref = chunk_bytes(load_config(None, list(BASE)))
    v = chunk_bytes(load_config(None, [*BASE, "pipeline.schedule=chronos"]))
    assert len(v) == 8
    for key in ("weights", "grads", "optimizer", "activations"):
        assert sum(getattr(c, key) for c in v) == pytest.approx(sum(getattr(c, key) for c in ref))


def test_predicted_peaks_follow_the_schedule() -> None:
    plain = predict_memory(load_config(None, list(BASE)))
    chronos = predict_memory(load_config(None, [*BASE, "pipeline.schedule=chronos"]))
    recomputed = predict_memory(load_config(None, [*BASE, "pipeline.schedule=chronos", "pipeline.recompute=longest"]))
    assert [r.peak_action.op for r in plain if r.peak_action] == [Op.F] * 4
    assert max(r.peak for r in chronos) < max(r.peak for r in plain)
    assert max(r.peak for r in recomputed) < max(r.peak for r in chronos)
    assert all(r.peak_activations < c.peak_activations for r, c in zip(recomputed, chronos))


# -- plans, the budget, auto and the CLI ----------------------------------------------------------

import argparse  # noqa: E402
from dataclasses import replace  # noqa: E402

from spotpipe.errors import ConfigError  # noqa: E402
from spotpipe.planner import GB, PLANS, evaluate_plan, evaluate_plans, parse_bytes, plan_config  # noqa: E402
from spotpipe.schedule import cli as schedule_cli  # noqa: E402


def test_parse_bytes() -> None:
    assert parse_bytes("4GB") == 4e9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2.5") == 2.5e9
    for bad in ("", "0GB", "-1GB", "4XB", "GB"):
        with pytest.raises(ConfigError, match="--budget: expected a positive size like 4GB"):
            parse_bytes(bad)


def test_plans_fit_and_the_largest_model_is_the_edge() -> None:
    cfg = load_config(None, list(BASE))
    roomy = {r.plan.name: r for r in evaluate_plans(cfg, 1.0 * GB, sizes=False, timing=False)}
    budget = 0.9 * roomy["chronos"].peak  # chronos alone does not fit: the fit plans must recompute
    results = evaluate_plans(cfg, budget)
    assert [r.plan for r in results] == list(PLANS)
    for r in results:
        assert not r.error
        assert r.fits == (max(r.peaks) <= budget)
        pcfg = plan_config(cfg, r.plan)
        if r.max_layers:  # the largest fits, one more layer does not
            assert evaluate_plan(replace(pcfg, model=replace(pcfg.model, layers=r.max_layers)), r.plan, budget,
                                 sizes=False, timing=False).fits
            assert not evaluate_plan(replace(pcfg, model=replace(pcfg.model, layers=r.max_layers + 1)), r.plan, budget,
                                     sizes=False, timing=False).fits
    by = {r.plan.name: r for r in results}
    # memory order: recompute < plain, chronos < 1f1b, offload < no offload
    assert by["1f1b+recompute"].peak < by["1f1b"].peak and by["chronos"].peak < by["1f1b"].peak
    assert not by["chronos"].fits and by["chronos+recompute"].fits
    assert by["chronos+recompute"].peak < by["chronos"].peak
    assert by["chronos+recompute"].max_layers > by["chronos"].max_layers
    assert by["chronos+recompute+offload"].peak < by["chronos+recompute"].peak
    assert by["chronos+recompute+offload"].max_layers > by["1f1b"].max_layers
    # recomputing every chunk of 1F1B costs time the chronos plans do not pay as much
    assert by["1f1b+recompute"].step_s > by["1f1b"].step_s


def test_auto_picks_the_fastest_plan_that_fits_and_names_the_smallest_budget() -> None:
    roomy = resolved(load_config(None, [*BASE, "pipeline.schedule=auto", "pipeline.memory_budget_gb=10"]))
    fastest = min((r for r in evaluate_plans(load_config(None, list(BASE)), 10 * GB, sizes=False)
                   if r.plan.runnable and not r.error), key=lambda r: r.step_s)
    assert roomy.pipeline.schedule == fastest.plan.schedule and roomy.pipeline.recompute == fastest.plan.recompute
    # a budget below every plan without recompute but above the best with it: auto must recompute
    peaks = {r.plan.name: r.peak for r in evaluate_plans(load_config(None, list(BASE)), 1.0, sizes=False, timing=False)}
    plain = min(peaks[n] for n in ("1f1b", "interleaved", "chronos"))
    least = min(peaks[n] for n in ("1f1b+recompute", "chronos+recompute"))
    assert least < plain
    tight_gb = (least + plain) / 2 / GB
    tight = resolved(load_config(None, [*BASE, "pipeline.schedule=auto", f"pipeline.memory_budget_gb={tight_gb}"]))
    assert tight.pipeline.recompute != "none" or tight.pipeline.recompute_chunks
    assert max(r.peak for r in predict_memory(tight)) <= tight_gb * GB
    with pytest.raises(ConfigError, match=r"pipeline.memory_budget_gb = 0.001: no plan fits; the smallest peak is .* "
                                          r"set pipeline.memory_budget_gb >= (\S+), or") as info:
        resolved(load_config(None, [*BASE, "pipeline.schedule=auto", "pipeline.memory_budget_gb=0.001"]))
    smallest = str(info.value).split(">= ")[1].split(",")[0]
    resolved(load_config(None, [*BASE, "pipeline.schedule=auto", f"pipeline.memory_budget_gb={smallest}"]))  # that one fits
    with pytest.raises(ConfigError, match="set pipeline.memory_budget_gb > 0"):
        resolved(load_config(None, [*BASE, "pipeline.schedule=auto"]))
    with pytest.raises(ConfigError, match="pipeline.memory_budget_gb must be >= 0"):
        load_config(None, [*BASE, "pipeline.memory_budget_gb=-1"])


def test_cli_prints_every_plan(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="spotpipe")
    schedule_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["schedule", "memory", "--budget", "30MB", *[x for o in BASE for x in ("--set", o)]])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for plan in PLANS:
        assert f"\n{plan.name} " in out
    assert "auto picks " in out and "budget 0.03 GB per rank" in out


def test_fit_recompute_takes_the_longest_lived_chunks_of_the_ranks_over_budget() -> None:
    from spotpipe.planner import fit_recompute
    from spotpipe.schedule.build import job_schedule
    from spotpipe.schedule.memory import memory_profile
    from spotpipe.schedule.recompute import chunk_lifetimes

    cfg = load_config(None, [*BASE, "pipeline.schedule=chronos"])
    sched, sizes = job_schedule(cfg), chunk_bytes(cfg)
    plain = memory_profile(sched, sizes)
    budget = 0.95 * max(r.peak for r in plain)
    over = {r.rank for r in plain if r.peak > budget}
    chunks, peak = fit_recompute(sched, sizes, (), budget)
    assert peak <= budget and chunks
    life = chunk_lifetimes(sched)
    first = max((c for c in range(8) if sched.stage_to_rank[c] in over), key=lambda c: life[c])
    assert first in chunks  # the worst locality first
    assert all(sched.stage_to_rank[c] in over for c in chunks)  # nothing on ranks that already fit
    assert fit_recompute(sched, sizes, (), 1e12) == ((), max(r.peak for r in plain))  # fits: recompute nothing
