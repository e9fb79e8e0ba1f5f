"""In-process convergence mode: failures wipe a stage, the shared recovery functions rebuild it;
every step is the job's lowered schedule played by the pipeline executor."""

from __future__ import annotations

import ast
import math
import time
from pathlib import Path

import pytest
import torch

from spotpipe import events as ev
from spotpipe.config import load_config
from spotpipe.data.tokens import TokenFile, prepare_tokens
from spotpipe.model.stages import build_stage
from spotpipe.model.transformer import lm_loss
from spotpipe.schedule.build import job_schedule
from spotpipe.runtime.inprocess.convergence import _Run, omega_preclip, run_inprocess
from spotpipe.runtime.inprocess.local import LocalTrainer
from spotpipe.runtime.inprocess.player import PipelineTrainer
from spotpipe.runtime.state.pick import build_chunk_optimizer
from spotpipe.runtime.state.stage_state import StageState
from spotpipe.runtime.state.rules import checkfree_weights
from spotpipe.schedule.ir import Schedule
from spotpipe.schedule.swap import swapped_paths

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
def test_mirrors_are_the_flat_stage_state_and_restore_a_fresh_trainer_bit_for_bit(corpus):
    """Each mirror is its chunk's StageState.flat, the form a worker holds: a trainer built afresh
    from the mirrors (and the sampler position) trains on exactly as the original, lr scale included."""
    cfg = _cfg("ft.strategy=mirror")
    run = _Run(cfg, corpus, None, 1.0)
    tr = run.trainer
    tr.set_lr_scale(2, 1.1)  # a scale other than 1 travels in the flat form too
    for _ in range(3):
        tr.train_step()
        run.after_commit()
    sampler = tr.sampler.state_dict()
    copies = dict(run.mirrors)
    assert sorted(copies) == [0, 1, 2, 3] and {c.step for c in copies.values()} == {3}
    params = list(tr.chunks[2].parameters())
    n = sum(p.numel() for p in params)
    assert copies[2].nbytes == 4 * (3 * n + 1 + 2 * len(params))  # weights + 2 moments; lr scale, (step, has)
    assert torch.equal(copies[2].flat, tr.state.view([2]).flat())
    # a worker of stage 2 (a StageState of its own chunk, other initial weights) installs it exactly
    chunk = build_stage(cfg.model, 99, 2, 4)
    worker = StageState({2: chunk}, build_chunk_optimizer({2: chunk}, cfg.train))
    worker.load_flat(copies[2].flat)
    assert torch.equal(worker.flat(), copies[2].flat) and worker.lr_scale[2] == tr.lr_scale[2] != 1.0
    ahead = [tr.train_step() for _ in range(3)]
    assert not torch.equal(tr.chunk_state(2), copies[2].flat)  # the live stage moved on, the copy did not
    assert torch.equal(copies[2].flat, worker.flat())
    fresh = PipelineTrainer(cfg, corpus)
    for s, copy in copies.items():
        fresh.load_chunk_state(s, copy.flat)
    fresh.sampler.load_state_dict(sampler)
    fresh.step = 3
    again = [fresh.train_step() for _ in range(3)]
    assert [r.loss for r in again] == [r.loss for r in ahead] and [r.grad_norm for r in again] == [r.grad_norm for r in ahead]
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), _weights(tr)))
    assert all(torch.equal(fresh.chunk_state(s), tr.chunk_state(s)) for s in range(4))  # moments and scales too


@pytest.mark.timeout(60)
def test_replica_copy_is_the_flat_stage_state(corpus, tmp_path):
    """One replica of a stage lost: the live replica's flat state is installed and counted in bytes,
    and the run continues exactly as one without the loss."""
    extra = ("pipeline.replicas=2", "train.batch_size=8", "ft.strategy=replica")
    clean = _Run(_cfg(*extra), corpus, None, 1.0)
    for _ in range(5):
        clean.trainer.train_step()
    events = tmp_path / "events.jsonl"
    res = run_inprocess(_cfg(*extra, "train.steps=5", 'ft.faults=["stage=1,replica=1@step=2"]', "ft.rate_step_time_s=1"),
                        corpus, events=events)
    assert res.status == "finished" and res.recoveries == {"replica": 1}
    finished = ev.read_events(events, ev.RECOVERY_FINISHED)
    assert [(e["stage"], e["strategy"]) for e in finished] == [(1, "replica")]
    assert finished[0]["bytes"] == 4 * clean.trainer.chunk_state(1).numel()
    run = _Run(_cfg(*extra), corpus, None, 1.0)
    for _ in range(2):
        run.trainer.train_step()
        run.after_commit()
    assert run.fail([(1, 1)], omega_preclip) == "continue" and run.last_strategies == ["replica"]
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
    assert all(tr.state.optimizer.moments(2, p) is None for p in tr.chunks[2].parameters())  # fresh
    assert tr.lr_scale[2] == pytest.approx(1.1) and tr.lr_scale[1] == 1.0
    assert math.isfinite(tr.train_step().loss)


@pytest.mark.timeout(60)
def test_checkfree_plus_copies_the_partner_and_restores_edges_exactly(corpus):
    cfg = _cfg("ft.strategy=checkfree+")
    run = _Run(cfg, corpus, None, 1.0)
    assert isinstance(run.trainer, PipelineTrainer) and run.trainer.schedule.paths == swapped_paths(4, 2)
    for _ in range(3):
        run.trainer.train_step()
        run.after_commit()
    tr = run.trainer
    embed = tr.chunks[0].embed.weight.detach().clone()
    head = tr.chunks[3].head.weight.detach().clone()
    edge_moments = {p: tuple(m.clone() for m in tr.state.optimizer.moments(s, p)[:2])
                    for s in (0, 3) for p in tr.chunks[s].tied_parameters()}
    assert len(edge_moments) == 3  # the embedding; the final norm and the head
    assert run.fail([(0, 0), (3, 0)], omega_preclip) == "continue"
    assert run.last_strategies == ["checkfree+", "checkfree+"]
    assert torch.equal(tr.chunks[0].embed.weight, embed) and torch.equal(tr.chunks[3].head.weight, head)
    opt = tr.state.optimizer
    for p, (avg, avg_sq) in edge_moments.items():  # the copies come back with their own moments
        got = opt.moments(0 if p is tr.chunks[0].embed.weight else 3, p)
        assert torch.equal(got[0], avg) and torch.equal(got[1], avg_sq) and got[2] == 3.0
    for (a, b) in ((0, 1), (3, 2)):  # the partner's blocks and their moments
        for p, q in zip(tr.chunks[a].blocks.parameters(), tr.chunks[b].blocks.parameters()):
            assert torch.equal(p, q)
            assert torch.equal(opt.moments(a, p)[0], opt.moments(b, q)[0]) and torch.equal(opt.moments(a, p)[1], opt.moments(b, q)[1])
    assert tr.lr_scale[0] == tr.lr_scale[3] == 1.0


def test_the_convergence_mode_names_no_strategy():
    """Every plan is carried out by its strategy's runtime half, looked up by name; adding a
    strategy adds no branch to the convergence mode."""
    from spotpipe.ft.strategies import REGISTRY as PURE
    from spotpipe.runtime.inprocess import convergence
    from spotpipe.runtime.worker.strategies import REGISTRY as RUNTIME

    for name, transfer in RUNTIME.items():
        assert callable(getattr(transfer, "install_in_process", None)), name
    tree = ast.parse(Path(convergence.__file__).read_text(encoding="utf-8"))
    compares = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert not [c for c in compares if "strategy" in c], "a comparison of a strategy name"
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not imported & {"REPLICA", "MIRROR", "CHECKFREE", "CHECKFREE_PLUS"}
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings}
    assert not names & set(PURE), "a strategy named in code"


@pytest.mark.timeout(60)
def test_a_registered_strategy_is_applied_without_a_branch(corpus, monkeypatch):
    """A strategy the convergence mode has never heard of, registered by name (only for this test),
    is applied through the registry: its in-process install runs and its bytes are returned."""
    from spotpipe.ft.policy import RecoveryPlan
    from spotpipe.runtime.inprocess.convergence import _RunView
    from spotpipe.runtime.worker import strategies

    class CopyNextStage:
        name = "toy"

        def install_in_process(self, run, plan):
            flat = run.state.view([plan.sources[0][0]], part="blocks").flat()
            run.state.view([plan.stage], part="blocks").load_flat(flat)
            return 7

    monkeypatch.setitem(strategies.REGISTRY, "toy", CopyNextStage())
    run = _Run(_cfg("ft.strategy=checkfree"), corpus, None, 1.0)
    run.trainer.train_step()
    plan = RecoveryPlan(stage=1, replica=0, strategy="toy", why="test", sources=((2, 0),))
    view = _RunView(run, run.trainer.last_grad_norms(), {}, omega_preclip)
    assert run.apply(plan, view) == 7
    for p, q in zip(run.trainer.chunks[1].blocks.parameters(), run.trainer.chunks[2].blocks.parameters()):
        assert torch.equal(p, q)


@pytest.mark.timeout(60)
def test_swap_schedule_routes_odd_microbatches_through_the_swapped_path(corpus):
    """The played swap schedule: microbatch 0 takes stages 0, 1, 2, 3; microbatch 1 takes 1, 0, 3, 2,
    embedded with chunk 0's embedding and finished with chunk 3's norm and head."""
    tr = PipelineTrainer(_cfg("ft.strategy=checkfree+"), corpus)
    step_ids = tr.sampler.next_ids(tr.cfg.train.batch_size)
    even, odd = tr.compute_gradients(step_ids)  # per-microbatch losses where each path ended

    def through(order, m):
        tokens, targets = tr.microbatch(step_ids, 0, m)
        x = tr.chunks[0].embed(tokens)
        for c in order:
            cos, sin = tr.chunks[c].rotary.tables(16, x.device)
            for blk in tr.chunks[c].blocks:
                x = blk(x, cos, sin)
        return float(lm_loss(tr.chunks[3].head(tr.chunks[3].norm(x)), targets))

    with torch.no_grad():
        normal = float(tr.forward_loss(*tr.microbatch(step_ids, 0, 1)))
        assert even == pytest.approx(float(tr.forward_loss(*tr.microbatch(step_ids, 0, 0))), rel=1e-6)
        assert even == pytest.approx(through([0, 1, 2, 3], 0), rel=1e-6)
        assert odd == pytest.approx(through([1, 0, 3, 2], 1), rel=1e-6)
        assert odd != pytest.approx(normal, rel=1e-4)
        assert normal == pytest.approx(through([0, 1, 2, 3], 1), rel=1e-6)
    # both uses of the embedding and of the head land in the originals' one gradient
    assert tr.chunks[1].embed is None and tr.chunks[2].head is None
    assert tr.chunks[0].embed.weight.grad is not None and tr.chunks[3].head.weight.grad is not None


def _trace(schedule: Schedule, rank: int) -> list[tuple[str, int, int]]:
    """A rank's lowered actions as the player records them: computes by (op, stage, microbatch),
    messages by (direction, peer rank, tag)."""
    out = []
    for a in schedule.ranks[rank]:
        if a.op.is_comm:
            out.append(("SEND" if a.op.is_send else "RECV", schedule.stage_to_rank[a.peer], a.tag(schedule.num_microbatches)))
        else:
            out.append((a.op.value, a.stage, a.microbatch))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [("ft.strategy=checkfree+", "pipeline.schedule=1f1b"),
                                   ("pipeline.schedule=interleaved", "pipeline.virtual_stages=2", "model.layers=8",
                                    "pipeline.stages=2", "pipeline.microbatches=4"),
                                   ("pipeline.schedule=gpipe", "pipeline.replicas=2", "train.batch_size=8")])
def test_every_rank_plays_exactly_its_lowered_action_list(corpus, extra):
    """What each rank's executor did, in order (computes seen by its stage runner, messages by its
    transport), is the job's lowered schedule for that rank: no hand-written loop plays a step."""
    cfg = _cfg(*extra)
    want = job_schedule(cfg)
    tr = PipelineTrainer(cfg, corpus)
    assert tr.schedule == want
    tr.train_step()
    assert len(tr.last_trace) == want.num_ranks > 1
    for rank in range(want.num_ranks):
        assert tr.last_trace[rank] == _trace(want, rank), f"rank {rank}"
        assert tr.last_trace[rank] == [
            (i.action.op.value, i.stage, i.microbatch) if i.action.op.is_compute
            else ("SEND" if i.action.op.is_send else "RECV", i.peer, i.tag) for i in tr.programs[rank]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [("pipeline.schedule=1f1b",),
                                   ("pipeline.schedule=interleaved", "pipeline.virtual_stages=2", "model.layers=8",
                                    "pipeline.stages=2", "pipeline.microbatches=4"),
                                   ("pipeline.schedule=1f1b", "pipeline.replicas=2", "train.batch_size=8")])
def test_played_steps_equal_the_single_process_reference(corpus, extra):
    """Without CheckFree+ the executor-played steps are LocalTrainer's: same losses and weights."""
    cfg = _cfg(*extra)
    played, ref = PipelineTrainer(cfg, corpus), LocalTrainer(cfg, corpus)
    for _ in range(3):
        a, b = played.train_step(), ref.train_step()
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for p, q in zip(_weights(played), _weights(ref)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert played.evaluate() == pytest.approx(ref.evaluate(), rel=1e-5)


@pytest.mark.timeout(60)
def test_played_swap_steps_are_deterministic_bit_for_bit(corpus):
    """The ranks take turns in an order fixed by the schedule, so two runs agree in every bit."""
    cfg = _cfg("ft.strategy=checkfree+", "pipeline.microbatches=4")
    a, b = PipelineTrainer(cfg, corpus), PipelineTrainer(cfg, corpus)
    for _ in range(2):
        assert a.train_step().loss == b.train_step().loss
    assert all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b)))


@pytest.mark.timeout(60)
def test_a_schedule_that_deadlocks_fails_at_once_naming_the_action(corpus):
    """A broken schedule (rank 0 waits for microbatch 0's gradient before it sends the activation
    rank 1 waits for) raises at once a CommError naming the action and the step, instead of hanging."""
    from spotpipe.runtime.comm.transport import CommError
    from spotpipe.schedule.ir import parse_actions

    cfg = _cfg("pipeline.stages=2", "model.layers=2")
    good = job_schedule(cfg)
    r0 = parse_actions("0F0 0RECV_B0 0B0 0SEND_F0 0F1 0SEND_F1 0RECV_B1 0B1")
    bad = good.with_ranks([r0, good.ranks[1]])
    tr = PipelineTrainer(cfg, corpus, schedule=bad)
    t0 = time.monotonic()
    with pytest.raises(CommError, match="0RECV_B0 of step 0") as err:
        tr.train_step()
    assert "can never end" in str(err.value) and time.monotonic() - t0 < tr.cfg.run.timeout_s / 2


@pytest.mark.timeout(60)
def test_adjacent_loss_rolls_back_to_the_checkpoint_or_stops(corpus, tmp_path):
    run = _Run(_cfg("ft.strategy=checkfree", "train.checkpoint_every=2"), corpus, None, 1.0)
    for _ in range(3):
        run.trainer.train_step()
        run.after_commit()
    saved = run.checkpoint["chunks"][0].clone()  # chunk 0's flat state at step 2
    assert run.fail([(1, 0), (2, 0)], omega_preclip) == "rollback"
    assert run.trainer.step == 2 and run.last_strategies == ["checkpoint", "checkpoint"]
    assert torch.equal(run.trainer.chunk_state(0), saved)
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
