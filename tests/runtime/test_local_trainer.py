"""LocalTrainer, the single-process reference for pipeline training."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from spotpipe.config import JobConfig, load_config
from spotpipe.data.sampler import SequenceSampler
from spotpipe.data.stats import unigram_baseline
from spotpipe.data.tokens import TokenFile, prepare_tokens
from spotpipe.errors import SpotpipeError
from spotpipe.model.stages import build_stage
from spotpipe.model.transformer import build_model
from spotpipe.runtime.inprocess.local import LocalTrainer, default_num_chunks, fit_vocab
from spotpipe.runtime.state.optim import build_optimizer, lr_at, set_lr

SHAKESPEARE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"

TINY = [
    "model.layers=4", "model.d_model=32", "model.heads=4", "model.context=32",
    "pipeline.stages=2", "pipeline.microbatches=2", "train.batch_size=8", "train.steps=20",
    "train.warmup_steps=2", "train.lr=1e-2",
]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> TokenFile:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    return prepare_tokens([SHAKESPEARE], tmp_path_factory.mktemp("data") / "ts")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> TokenFile:
    """A synthetic corpus for the exactness tests (no external data needed)."""
    d = tmp_path_factory.mktemp("small")
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "pipeline", "stage", "spot", "loss"]
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (20_000,), generator=gen))
    (d / "t.txt").write_text(text)
    return prepare_tokens([d / "t.txt"], d / "tok")


def _cfg(*extra: str) -> JobConfig:
    return load_config(None, [*TINY, *extra])


def _losses(trainer: LocalTrainer, steps: int) -> list[float]:
    return [trainer.train_step().loss for _ in range(steps)]


@pytest.mark.timeout(150)
def test_loss_falls_below_unigram_baseline_on_tinyshakespeare(shakespeare: TokenFile) -> None:
    cfg = load_config(None, [
        "model.layers=2", "model.d_model=64", "model.context=64", "pipeline.stages=2",
        "pipeline.microbatches=2", "train.batch_size=16", "train.steps=30", "train.warmup_steps=5", "train.lr=1e-2",
    ])
    trainer = LocalTrainer(cfg, shakespeare)
    results = [trainer.train_step() for _ in range(30)]
    losses = [r.loss for r in results]
    assert abs(losses[0] - math.log(256)) < 0.1  # starts near uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    baseline = unigram_baseline(shakespeare, cfg.data.val_fraction).val_cross_entropy
    val = trainer.evaluate(2)
    assert val < baseline, (val, baseline)
    assert trainer.evaluate(2) == val  # deterministic
    assert [r.step for r in results] == list(range(30))
    assert all(r.tokens == 16 * 64 for r in results)
    assert results[0].lr == pytest.approx(lr_at(0, cfg.train)) and results[-1].lr == pytest.approx(lr_at(29, cfg.train))


@pytest.mark.timeout(60)
def test_resume_reproduces_later_losses_exactly(small: TokenFile) -> None:
    cfg = _cfg()
    run = LocalTrainer(cfg, small)
    _losses(run, 3)
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)  # as a checkpoint would
    later = _losses(run, 4)
    resumed = LocalTrainer(cfg, small)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.step == 3
    assert _losses(resumed, 4) == later
    # chunk-wise state alone (the per-stage checkpoint) does the same
    fresh = LocalTrainer(cfg, small)
    states = [run.chunk_state(i) for i in range(run.num_chunks)]
    sampler_state = run.sampler.state_dict()
    ahead = _losses(run, 2)
    for i, state in enumerate(states):
        fresh.load_chunk_state(i, state)
    fresh.sampler.load_state_dict(sampler_state)
    fresh.step = run.step - 2
    assert _losses(fresh, 2) == ahead


@pytest.mark.timeout(60)
def test_one_chunk_and_four_chunks_give_the_same_losses(small: TokenFile) -> None:
    cfg = _cfg()
    one = _losses(LocalTrainer(cfg, small, num_chunks=1), 5)
    four = _losses(LocalTrainer(cfg, small, num_chunks=4), 5)
    for a, b in zip(one, four):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert one[-1] < one[0]
    assert default_num_chunks(cfg) == 2
    assert default_num_chunks(_cfg("pipeline.schedule=interleaved")) == 4


@pytest.mark.timeout(60)
def test_replicas_split_the_same_samples_the_same_way(small: TokenFile) -> None:
    """R=2 x M=2 and R=1 x M=4 cut a step into the same four microbatches: same losses."""
    a = _losses(LocalTrainer(_cfg("pipeline.replicas=2", "pipeline.microbatches=2"), small), 4)
    b = _losses(LocalTrainer(_cfg("pipeline.replicas=1", "pipeline.microbatches=4"), small), 4)
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x)


@pytest.mark.timeout(60)
def test_matches_a_plain_torch_training_loop(small: TokenFile) -> None:
    """One whole model, clip_grad_norm_, AdamW, lr schedule: the reference the trainer must equal."""
    cfg = _cfg("train.grad_clip=0.5")
    trainer = LocalTrainer(cfg, small, num_chunks=2)
    got = _losses(trainer, 4)
    model = build_model(cfg.model, cfg.train.seed)
    opt = build_optimizer(model.parameters(), cfg.train)
    sampler = SequenceSampler(small.num_tokens, cfg.model.context, cfg.train.seed, "train", cfg.data.val_fraction)
    expected, norms = [], []
    for step in range(4):
        ids = sampler.next_ids(cfg.train.batch_size)
        data = torch.from_numpy(sampler.batch(small, ids))
        losses = []
        for mb in data.chunk(cfg.pipeline.microbatches):
            loss = model.loss(mb[:, :-1], mb[:, 1:])
            (loss / cfg.pipeline.microbatches).backward()
            losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)))
        set_lr(opt, lr_at(step, cfg.train))
        opt.step()
        opt.zero_grad()
        expected.append(sum(losses) / len(losses))
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert sum(trainer.last_grad_norms()[i] ** 2 for i in range(2)) == pytest.approx(norms[-1] ** 2, rel=1e-4)


@pytest.mark.timeout(60)
def test_hooks_replace_chunk_and_lr_scale(small: TokenFile) -> None:
    cfg = _cfg()
    control, patient = LocalTrainer(cfg, small), LocalTrainer(cfg, small)
    _losses(control, 2)
    _losses(patient, 2)
    norms = patient.last_grad_norms()
    assert len(norms) == 2 and all(n > 0 for n in norms)
    # rebuild chunk 1 (other initial weights) from its state: training continues exactly as before
    replacement = build_stage(cfg.model, 123, 1, 2)
    patient.replace_chunk(1, replacement, patient.chunk_state(1))
    assert patient.chunks[1] is replacement
    assert _losses(patient, 2) == _losses(control, 2)
    # without a state the new chunk starts with fresh optimizer state; the others keep theirs
    fresh = LocalTrainer(cfg, small)
    _losses(fresh, 2)
    kept = fresh.chunk_state(0)
    fresh.replace_chunk(1, build_stage(cfg.model, cfg.train.seed, 1, 2))
    assert torch.equal(fresh.chunk_state(0), kept)
    assert all(fresh.state.optimizer.moments(1, p) is None for p in fresh.chunks[1].parameters())
    with pytest.raises(ValueError):
        patient.replace_chunk(0, build_stage(cfg.model, 0, 1, 2))
    # a per-chunk lr scale changes the update of that chunk only
    scaled = LocalTrainer(cfg, small)
    scaled.set_lr_scale(1, 1.1)
    _losses(scaled, 1)
    base = LocalTrainer(cfg, small)
    _losses(base, 1)
    assert torch.equal(scaled.chunks[0].embed.weight, base.chunks[0].embed.weight)
    assert not torch.equal(scaled.chunks[1].blocks[0].attn_norm.weight, base.chunks[1].blocks[0].attn_norm.weight)
    # ... of its blocks: the final norm and head keep the base rate (build_stage_optimizer)
    assert torch.equal(scaled.chunks[1].head.weight, base.chunks[1].head.weight)


def test_vocabulary_must_fit(small: TokenFile) -> None:
    cfg = _cfg("model.vocab_size=100")
    with pytest.raises(SpotpipeError, match="model.vocab_size=256"):
        LocalTrainer(cfg, small)
    assert fit_vocab(cfg, small).model.vocab_size == 256


def test_nonfinite_rule_names_what_is_not_finite() -> None:
    from spotpipe.runtime.state.optim import nonfinite_reason

    assert nonfinite_reason(1.5, 2.0) == ""
    assert nonfinite_reason(float("nan"), 2.0) == "the gradient norm is nan"
    assert nonfinite_reason(float("inf"), 2.0) == "the gradient norm is inf"
    assert nonfinite_reason(1.0, float("nan")) == "the loss is nan"


def test_train_nonfinite_is_a_closed_choice() -> None:
    from spotpipe.errors import ConfigError

    assert load_config(None, []).train.nonfinite == "stop"
    assert load_config(None, ["train.nonfinite=skip"]).train.nonfinite == "skip"
    with pytest.raises(ConfigError, match=r"^train.nonfinite must be stop or skip, got 'ignore'$"):
        load_config(None, ["train.nonfinite=ignore"])


@pytest.mark.timeout(120)
def test_a_nonfinite_step_is_never_applied(small: TokenFile) -> None:
    """Issue 10, section 6: lr = 1e8 makes step 1's gradient norm NaN. ``stop`` raises one line
    naming the step with the weights of step 0 intact; ``skip`` counts the step (the sampler moves
    on) and keeps every weight finite."""
    from spotpipe.runtime.state.optim import NonfiniteStep

    huge = ["train.lr=1e8", "train.warmup_steps=0", "train.steps=5"]
    stop = LocalTrainer(_cfg(*huge), small)
    stop.train_step()
    before = [p.detach().clone() for c in stop.chunks for p in c.parameters()]
    with pytest.raises(NonfiniteStep, match=r"^step 2/5: the (gradient norm|loss) is (nan|inf); its update was not applied"):
        stop.train_step()
    after = [p.detach() for c in stop.chunks for p in c.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and stop.step == 1
    skip = LocalTrainer(_cfg(*huge, "train.nonfinite=skip"), small)
    results = [skip.train_step() for _ in range(5)]
    assert results[0].skipped == "" and all(r.skipped for r in results[1:]), [r.skipped for r in results]
    assert skip.step == 5 and results[-1].sampler_state != results[1].sampler_state
    assert all(torch.isfinite(p).all() for c in skip.chunks for p in c.parameters())
