"""In-process convergence mode: failures wipe a stage, the shared recovery functions rebuild it."""

from __future__ import annotations

import math

import pytest
import torch

from spotpipe import events as ev
from spotpipe.config import load_config
from spotpipe.data.tokens import TokenFile, prepare_tokens
from spotpipe.runtime.inprocess.convergence import SwapTrainer, _Run, omega_preclip, run_inprocess
from spotpipe.runtime.state.rules import checkfree_weights
from spotpipe.model.transformer import lm_loss
from spotpipe.runtime.inprocess.local import LocalTrainer

TINY = ["model.layers=4", "model.d_model=32", "model.heads=4", "model.context=16", "pipeline.stages=4",
        "pipeline.microbatches=2", "train.batch_size=4", "train.steps=8", "train.warmup_steps=1",
        "train.lr=1e-2", "train.eval_every=4", "train.eval_batches=1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the CI box has two shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> TokenFile:
    d = tmp_path_factory.mktemp("ftcorpus")
    gen = torch.Generator().manual_seed(1)
    words = ["spot", "stage", "loss", "mirror", "free", "check", "pipe", "line"]
    (d / "t.txt").write_text(" ".join(words[int(i)] for i in torch.randint(0, 8, (6000,), generator=gen)))
    return prepare_tokens([d / "t.txt"], d / "tok")


def _cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


def _weights(trainer: LocalTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for c in trainer.chunks for p in c.parameters()]


@pytest.mark.timeout(60)
def test_mirror_every_step_recovers_exactly(corpus, tmp_path):
    """A stage lost mid-run and rebuilt from a mirror refreshed every step: the replayed step and
    everything after it equal a run without failures, bit for bit."""
    clean = _Run(_cfg("ft.strategy=mirror"), corpus, None, 1.0)
    for _ in range(6):
        clean.trainer.train_step()
    events = tmp_path / "events.jsonl"
    res = run_inprocess(_cfg("ft.strategy=mirror", "train.steps=6", 'ft.faults=["stage=2@step=3"]',
                             "ft.rate_step_time_s=1"), corpus, events=events)
    assert res.status == "finished" and res.steps == 6 and res.iterations == 7 and res.failures == 1
    assert res.recoveries == {"mirror": 1} and res.mirror_bytes > 0
    # events say what happened and why
    started = ev.read_events(events, ev.RECOVERY_STARTED)
    assert [(e["stage"], e["strategy"]) for e in started] == [(2, "mirror")] and "mirror held by stage 1" in started[0]["why"]
    finished = ev.read_events(events, ev.RECOVERY_FINISHED)
    assert finished[0]["bytes"] > 0 and finished[0]["strategy"] == "mirror"
    assert ev.read_events(events, ev.FAILURE_CONFIRMED)[0]["stage"] == 2
    assert [e["step"] for e in ev.read_events(events, ev.STEP_REPLAYED)] == [3]
    # same final weights as the clean run: rerun with the in-memory trainer to compare
    run = _Run(_cfg("ft.strategy=mirror"), corpus, None, 1.0)
    for _ in range(3):
        run.trainer.train_step()
        run.after_commit()
    assert run.fail([(2, 0)], omega_preclip) == "continue"
    for _ in range(3):
        run.trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(_weights(run.trainer), _weights(clean.trainer)))


@pytest.mark.timeout(60)
def test_checkfree_rebuilds_the_weighted_average_with_fresh_optimizer_and_lr_scale(corpus):
    run = _Run(_cfg("ft.strategy=checkfree"), corpus, None, 1.0)
    for _ in range(3):
        run.trainer.train_step()
        run.after_commit()
    tr = run.trainer
    norms = tr.last_grad_norms()
    a, b = checkfree_weights(norms[1], norms[3])
    assert 0 < a < 1 and a != pytest.approx(0.5, abs=1e-6)  # real gradient-norm weighting
    expected = {k: a * tr.chunks[1].state_dict()[k] + b * tr.chunks[3].state_dict()[k]
                for k in tr.chunks[2].state_dict()}
    assert run.fail([(2, 0)], omega_preclip) == "continue"
    got = tr.chunks[2].state_dict()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert not any(tr.optimizers[2].state.get(p) for p in tr.chunks[2].parameters())  # fresh
    assert tr.lr_scale[2] == pytest.approx(1.1) and tr.lr_scale[1] == 1.0
    assert math.isfinite(tr.train_step().loss)


@pytest.mark.timeout(60)
def test_checkfree_plus_copies_the_partner_and_restores_edges_exactly(corpus):
    cfg = _cfg("ft.strategy=checkfree+")
    run = _Run(cfg, corpus, None, 1.0)
    assert isinstance(run.trainer, SwapTrainer)
    for _ in range(3):
        run.trainer.train_step()
        run.after_commit()
    tr = run.trainer
    embed = tr.chunks[0].embed.weight.detach().clone()
    head = tr.chunks[3].head.weight.detach().clone()
    assert run.fail([(0, 0), (3, 0)], omega_preclip) == "continue"
    assert run.last_strategies == ["checkfree+", "checkfree+"]
    assert torch.equal(tr.chunks[0].embed.weight, embed) and torch.equal(tr.chunks[3].head.weight, head)
    for p, q in zip(tr.chunks[0].blocks.parameters(), tr.chunks[1].blocks.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(tr.optimizers[0].state[p]["exp_avg"], tr.optimizers[1].state[q]["exp_avg"])
    for p, q in zip(tr.chunks[3].blocks.parameters(), tr.chunks[2].blocks.parameters()):
        assert torch.equal(p, q)


@pytest.mark.timeout(60)
def test_swap_trainer_routes_odd_microbatches_through_the_swapped_path(corpus):
    tr = SwapTrainer(_cfg("ft.strategy=checkfree+"), corpus)
    tokens = torch.randint(0, 256, (2, 16))
    targets = torch.randint(0, 256, (2, 16))

    def through(order):
        x = tr.chunks[0].embed(tokens)
        for c in order:
            cos, sin = tr.chunks[c].rotary.tables(16, x.device)
            for blk in tr.chunks[c].blocks:
                x = blk(x, cos, sin)
        return lm_loss(tr.chunks[3].head(tr.chunks[3].norm(x)), targets)

    with torch.no_grad():
        tr._counting, tr._calls = True, 0
        even, odd = tr.forward_loss(tokens, targets), tr.forward_loss(tokens, targets)
        tr._counting = False
        normal = tr.forward_loss(tokens, targets)
        assert torch.allclose(even, normal) and torch.allclose(odd, through([1, 0, 3, 2]))
        assert not torch.allclose(odd, normal)
        assert torch.allclose(normal, through([0, 1, 2, 3]))


@pytest.mark.timeout(60)
def test_adjacent_loss_rolls_back_to_the_checkpoint_or_stops(corpus, tmp_path):
    run = _Run(_cfg("ft.strategy=checkfree", "train.checkpoint_every=2"), corpus, None, 1.0)
    for _ in range(3):
        run.trainer.train_step()
        run.after_commit()
    saved = [t.clone() for t in run.checkpoint["chunks"][0]["model"].values()]
    assert run.fail([(1, 0), (2, 0)], omega_preclip) == "rollback"
    assert run.trainer.step == 2 and run.last_strategies == ["checkpoint", "checkpoint"]
    assert all(torch.equal(a, b) for a, b in zip(run.trainer.chunks[0].state_dict().values(), saved))
    assert all(torch.isfinite(p).all() for c in run.trainer.chunks for p in c.parameters())
    res = run_inprocess(_cfg("ft.strategy=checkfree", 'ft.faults=["stages=1+2@step=2"]', "ft.rate_step_time_s=1"),
                        corpus, events=tmp_path / "e.jsonl")
    assert res.status == "failed" and "stopped" in res.reason and res.steps == 2
    why = ev.read_events(tmp_path / "e.jsonl", ev.RECOVERY_STARTED)[0]["why"]
    assert "adjacent" in why and "no checkpoint" in why
    assert ev.read_events(tmp_path / "e.jsonl", ev.RUN_END)[0]["status"] == "failed"


@pytest.mark.timeout(60)
def test_rate_faults_and_target_in_a_short_run(corpus):
    res = run_inprocess(_cfg("ft.strategy=checkfree+", "train.checkpoint_every=2", 'ft.faults=["25%/step"]',
                             "ft.rate_step_time_s=60"), corpus, target_loss=99.0, stop_at_target=True)
    assert res.status == "target" and res.target_at is not None and res.target_at[0] == 4
    assert res.failures >= 1 and sum(res.recoveries.values()) >= res.failures - 1
    assert res.sim_seconds >= 60 * res.iterations * 0.5
