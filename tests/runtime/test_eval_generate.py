"""`spotpipe eval` and `spotpipe generate`: a trained run's validation perplexity with pipeline stages
skipped (SkipPipe's skipped-stage inference) and text sampled from it.

The run directories are written the way the runtime writes them (the resolved config.toml, one
checkpoint file per pipeline rank holding that rank's flat StageState, the manifest last), from a
LocalTrainer trained a few steps, so the tests take a few seconds. The loader is checked against a
real `spotpipe train` run's checkpoint in tests/integration/test_integration_training.py.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spotpipe.cli import main
from spotpipe.config import JobConfig, config_to_toml, load_config
from spotpipe.data.tokens import TokenFile
from spotpipe.errors import SpotpipeError
from spotpipe.model.sampling import next_token_distribution, sample_tokens
from spotpipe.model.skipping import forward_skipping
from spotpipe.runtime.control.job import checkpoint_layout
from spotpipe.runtime.inprocess.evaluate import evaluate_fraction, evaluate_skipping
from spotpipe.runtime.inprocess.local import LocalTrainer
from spotpipe.runtime.inprocess.restore import load_trained_run, stage_chunks
from spotpipe.runtime.inprocess.skipsets import (
    check_skip_stages,
    draw_skip_sets,
    fixed_stages,
    parse_stage_list,
    skip_count,
    skippable_stages,
)
from spotpipe.runtime.state.checkpoint import checkpoint_dir, rank_file_name, save_state, write_manifest

WORDS = ["alpha", "beta", "gamma", "delta", "pipeline", "stage", "spot", "skip"]
SIX = ["model.layers=6", "model.d_model=32", "model.heads=2", "model.context=16", "pipeline.stages=6",
       "pipeline.microbatches=2", "train.batch_size=8", "train.warmup_steps=1", "train.lr=1e-2", "train.eval_batches=3",
       "run.plot=false"]
STEPS = 4


def write_run(run_dir: Path, cfg: JobConfig, trainer: LocalTrainer) -> None:
    """Write ``trainer``'s state as a `spotpipe train` run directory: config.toml, one file per
    pipeline rank (what Worker.save_checkpoint writes) and the manifest (what the controller writes)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config_to_toml(cfg))
    step = trainer.step - 1
    directory = checkpoint_dir(run_dir, step)
    files = {}
    placement = stage_chunks(cfg)
    for rank, chunks in enumerate(placement):
        state = {"format": "spotpipe-stage-state", "step": step, "rank": rank,
                 "state": trainer.state.view(chunks).to_checkpoint(), "sampler": trainer.sampler.state_dict()}
        files[rank] = (rank_file_name(rank), save_state(directory / rank_file_name(rank), state))
    write_manifest(directory, step, files, checkpoint_layout(cfg, sum(len(c) for c in placement)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, word_corpus: Callable[..., TokenFile]) -> TokenFile:
    return word_corpus(tmp_path_factory.mktemp("evalcorpus"), WORDS, seed=7)


def _trained(tmp: Path, corpus: TokenFile, *sets: str) -> tuple[Path, LocalTrainer]:
    cfg = load_config(None, [*SIX, f"data.path={corpus.dir}", f"run.dir={tmp / 'run'}", *sets])
    torch.manual_seed(0)
    trainer = LocalTrainer(cfg, corpus)
    for _ in range(STEPS):
        trainer.train_step()
    write_run(tmp / "run", cfg, trainer)
    return tmp / "run", trainer


@pytest.fixture(scope="module")
def run6(tmp_path_factory: pytest.TempPathFactory, corpus: TokenFile, one_thread: None) -> tuple[Path, LocalTrainer]:
    """A 6-stage 1F1B run (one chunk per stage) trained 4 steps, and the trainer that wrote it."""
    return _trained(tmp_path_factory.mktemp("run6"), corpus)


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# -- which stages may be skipped (pure) ------------------------------------------------------------


def test_first_and_last_stage_are_fixed_for_every_placement() -> None:
    one_f_one_b = [(0,), (1,), (2,), (3,)]
    assert fixed_stages(one_f_one_b, 4) == {0: "the embedding", 3: "the head"}
    assert skippable_stages(one_f_one_b, 4) == [1, 2]
    interleaved = [(0, 4), (1, 5), (2, 6), (3, 7)]  # the last chunk sits on the last stage
    assert skippable_stages(interleaved, 8) == [1, 2]
    chronos = [(0, 7), (1, 6), (2, 5), (3, 4)]  # V placement: stage 0 holds both ends
    assert fixed_stages(chronos, 8) == {0: "the embedding and the head"}
    assert skippable_stages(chronos, 8) == [1, 2, 3]


def test_stage_lists_are_checked() -> None:
    placement = [(0,), (1,), (2,), (3,), (4,), (5,)]
    assert parse_stage_list(" 2, 4") == [2, 4]
    assert check_skip_stages([4, 2, 4], placement, 6) == (2, 4)
    for text in ("", "1,,2", "-1", "1.5", "a"):
        with pytest.raises(SpotpipeError, match="expected stage numbers"):
            parse_stage_list(text)
    with pytest.raises(SpotpipeError, match="stage 0 holds the embedding and cannot be skipped; stages 1..4 may be skipped"):
        check_skip_stages([0], placement, 6)
    with pytest.raises(SpotpipeError, match="stage 5 holds the head"):
        check_skip_stages([1, 5], placement, 6)
    with pytest.raises(SpotpipeError, match=r"stage 6 is out of range: the run has 6 stages \(0..5\)"):
        check_skip_stages([6], placement, 6)


def test_skip_fraction_follows_skippipes_rule() -> None:
    placement = [(0,), (1,), (2,), (3,), (4,), (5,)]
    assert [skip_count(f, placement, 6) for f in (0.0, 0.1, 0.25, 0.5, 0.66)] == [0, 1, 2, 3, 4]
    with pytest.raises(SpotpipeError, match=r"leaves out round\(0.75 x 6\) = 4|only 4 may be skipped"):
        skip_count(0.8, placement, 6)


def test_skip_sets_are_distinct_seeded_and_complete_when_few() -> None:
    assert draw_skip_sets([1, 2, 3, 4], 3, 10, seed=0) == [(1, 2, 3), (1, 2, 4), (1, 3, 4), (2, 3, 4)]
    a = draw_skip_sets(range(1, 11), 5, 6, seed=4)
    assert a == draw_skip_sets(range(1, 11), 5, 6, seed=4)
    assert len(set(a)) == 6 and all(len(s) == 5 and list(s) == sorted(s) for s in a)
    assert a != draw_skip_sets(range(1, 11), 5, 6, seed=5)
    assert draw_skip_sets([1, 2], 0, 3, seed=0) == [()]


# -- eval --------------------------------------------------------------------------------------------


def test_no_skip_equals_the_reference_evaluation(run6: tuple[Path, LocalTrainer]) -> None:
    run_dir, trainer = run6
    run = load_trained_run(run_dir)
    assert run.step == STEPS - 1 and run.stage_chunks == tuple((s,) for s in range(6))
    for mine, theirs in zip(run.chunks, trainer.chunks):  # every weight back, bit for bit
        for (k, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), k
    result = evaluate_skipping(run, ())
    assert result.samples == 3 * 8 and result.tokens == 3 * 8 * 16
    assert result.loss == trainer.evaluate()  # LocalTrainer.evaluate: the same windows, the same operations
    assert result.perplexity == pytest.approx(math.exp(trainer.evaluate()), rel=1e-12)


def test_a_skipped_stage_is_an_identity_chunk(run6: tuple[Path, LocalTrainer]) -> None:
    run_dir, trainer = run6
    run = load_trained_run(run_dir)
    full = evaluate_skipping(run, ())
    skipped = evaluate_skipping(run, (2,), samples=10)
    weighted = 0.0
    with torch.no_grad():  # by hand: chunks 0, 1, 3, 4, 5 of the trainer that wrote the run
        for start in range(0, 10, 8):
            ids = list(range(start, min(start + 8, 10)))
            batch = torch.from_numpy(trainer.val_sampler.batch(trainer.token_file, ids))
            x = batch[:, :-1]
            for i in (0, 1, 3, 4):
                x = trainer.chunks[i](x)
            weighted += float(trainer.chunks[5](x, batch[:, 1:])) * len(ids)
    assert skipped.samples == 10
    assert skipped.loss == pytest.approx(weighted / 10, rel=1e-6)
    assert abs(evaluate_skipping(run, (2,)).loss - full.loss) > 1e-4  # leaving a stage out changes the model


def test_skipping_a_stage_of_an_interleaved_run_skips_both_its_chunks(tmp_path: Path, corpus: TokenFile,
                                                                      one_thread: None) -> None:
    run_dir, trainer = _trained(tmp_path, corpus, "model.layers=6", "pipeline.stages=3", "pipeline.schedule=interleaved",
                                "pipeline.virtual_stages=2", "pipeline.microbatches=3", "train.batch_size=6")
    run = load_trained_run(run_dir)
    assert run.stage_chunks == ((0, 3), (1, 4), (2, 5)) and run.chunks_of((1,)) == (1, 4)
    assert evaluate_skipping(run, ()).loss == trainer.evaluate()
    tokens = torch.from_numpy(trainer.val_sampler.batch(trainer.token_file, range(8)))
    with torch.no_grad():
        x = tokens[:, :-1]
        for i in (0, 2, 3):
            x = trainer.chunks[i](x)
        want = float(trainer.chunks[5](x, tokens[:, 1:]))
    assert evaluate_skipping(run, (1,), samples=8).loss == pytest.approx(want, rel=1e-6)


def test_a_checkfree_plus_run_loads_with_its_edge_copies(tmp_path: Path, corpus: TokenFile, one_thread: None) -> None:
    from spotpipe.runtime.inprocess.restore import _RestoredTrainer

    cfg = load_config(None, [*SIX, f"data.path={corpus.dir}", "ft.swap_edges=true"])
    trainer = _RestoredTrainer(cfg, corpus, True, torch.device("cpu"))
    trainer.train_step()
    write_run(tmp_path / "run", cfg, trainer)
    run = load_trained_run(tmp_path / "run")
    assert run.chunks[1].embed is not None and run.chunks[4].head is not None
    assert evaluate_skipping(run, ()).loss == trainer.evaluate()


def test_skip_fraction_is_seeded_and_reports_the_spread(run6: tuple[Path, LocalTrainer], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = run6
    argv = ["eval", str(run_dir), "--skip-fraction", "0.5", "--subsets", "3", "--seed", "11", "--samples", "8", "--json"]
    first = _json(argv, capsys)
    assert first == _json(argv, capsys)
    frac = first["skip_fraction"]
    sets = [tuple(s["skipped"]) for s in frac["sets"]]
    assert frac["skipped_per_set"] == 3 and frac["possible_sets"] == 4 and len(sets) == 3 and len(set(sets)) == 3  # 3 of stages 1..4: 4 sets exist
    assert all(len(s) == 3 and 0 not in s and 5 not in s for s in sets)
    ppl = [s["perplexity"] for s in frac["sets"]]
    assert frac["mean_perplexity"] == pytest.approx(statistics.fmean(ppl))
    assert frac["std_perplexity"] == pytest.approx(statistics.pstdev(ppl)) and frac["std_perplexity"] > 0
    assert frac["min_perplexity"] == min(ppl) and frac["max_perplexity"] == max(ppl)
    assert first["full"]["skipped"] == [] and first["samples"] == 8
    other = _json([*argv[:-3], "--seed", "12", "--samples", "8", "--json"], capsys)
    assert other["full"] == first["full"]
    run = load_trained_run(run_dir)  # the API agrees with the command
    direct = evaluate_fraction(run, 0.5, 3, 11, samples=8)
    assert [r.skipped for r in direct.sets] == sets and direct.mean_perplexity == pytest.approx(frac["mean_perplexity"])


def test_a_moved_run_reads_its_data_from_data(bad_dirs: dict[str, Path], run6: tuple[Path, LocalTrainer],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(["eval", str(bad_dirs["moved"]), "--data", str(run6[1].token_file.dir), "--json"], capsys)
    assert out["full"]["loss"] == run6[1].evaluate()


def test_eval_text_output(run6: tuple[Path, LocalTrainer], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, trainer = run6
    assert main(["eval", str(run_dir), "--skip-stages", "2,3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{run_dir}: checkpoint after {STEPS} steps, 6 stages") and "24 validation windows x 16 tokens" in out[0]
    assert out[2].split()[:5] == ["none", "(full", "model)", f"{trainer.evaluate():.4f}", f"{math.exp(trainer.evaluate()):.3f}"]
    assert out[3].split()[0] == "2,3" and out[3].endswith("%")


# -- generate ----------------------------------------------------------------------------------------


def test_generate_is_reproducible_and_emits_n_tokens(run6: tuple[Path, LocalTrainer], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, trainer = run6
    argv = ["generate", str(run_dir), "--prompt", "alpha beta", "--tokens", "20", "--seed", "3", "--top-k", "5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == text
    assert text.startswith("alpha beta") and len(text.rstrip("\n").encode()) == len("alpha beta") + 20  # byte tokenizer
    prompt = list(b"alpha beta")
    new = sample_tokens(trainer.chunks, prompt, 20, top_k=5, seed=3)
    assert len(new) == 20 and bytes(prompt + new).decode("utf-8", "replace") == text.rstrip("\n")
    assert sample_tokens(trainer.chunks, prompt, 20, top_k=5, seed=4) != new
    long_prompt = list(b"gamma delta " * 4)  # longer than model.context: a sliding window
    assert len(sample_tokens(trainer.chunks, long_prompt, 5, skip=(2, 3))) == 5


def test_an_interrupted_generate_prints_what_it_generated(run6: tuple[Path, LocalTrainer], monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during a long generate prints the text so far and exits 130 (nothing is lost)."""
    from spotpipe.progressline import ProgressLine

    def interrupt_after_five(self: ProgressLine, done: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressLine, "update", interrupt_after_five)
    run_dir, trainer = run6
    assert main(["generate", str(run_dir), "--prompt", "alpha", "--tokens", "50", "--seed", "1"]) == 130
    out = capsys.readouterr()
    first_five = sample_tokens(trainer.chunks, list(b"alpha"), 5, seed=1)  # the same draws, in the same order
    assert out.out.rstrip("\n") == bytes(list(b"alpha") + first_five).decode("utf-8", "replace")
    assert "interrupted after 5 of 50 tokens" in out.err


def test_generate_decodes_with_the_runs_bpe_tokenizer(tmp_path: Path, corpus: TokenFile, one_thread: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokenizers")
    from spotpipe.data.tokenizer import train_bpe
    from spotpipe.data.tokens import prepare_tokens

    text = Path(corpus.dir).parent / "t.txt"
    bpe = train_bpe([text], 300, tmp_path / "bpe.json")
    tokens = prepare_tokens([text], tmp_path / "bpe-tok", str(tmp_path / "bpe.json"))
    run_dir, _ = _trained(tmp_path, tokens, "model.layers=3", "pipeline.stages=3", f"model.vocab_size={tokens.vocab_size}")
    argv = ["generate", str(run_dir), "--prompt", "gamma", "--tokens", "6", "--temperature", "0", "--skip-stages", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out.rstrip("\n")
    prompt = [int(t) for t in bpe.encode("gamma")]
    new = sample_tokens(load_trained_run(run_dir).chunks, prompt, 6, temperature=0, skip=(1,))
    assert len(new) == 6 and out == bpe.decode(prompt + new) and out.startswith("gamma")


def test_greedy_is_top_1_and_top_k_keeps_k_tokens() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.3])
    p = next_token_distribution(logits, 1.0, 2)
    assert float(p.sum()) == pytest.approx(1.0) and (p > 0).tolist() == [False, True, False, True, False]
    assert next_token_distribution(logits, 1.0, 1).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(next_token_distribution(logits, 1.0, 0), torch.softmax(logits, -1))


def test_forward_skipping_refuses_the_ends(run6: tuple[Path, LocalTrainer]) -> None:
    chunks = run6[1].chunks
    tokens = torch.zeros(1, 4, dtype=torch.int64)
    for bad in (0, 5, 6):
        with pytest.raises(ValueError, match="only chunks 1..4 of 6 may be left out"):
            forward_skipping(chunks, tokens, {bad})


# -- bad input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory: pytest.TempPathFactory, run6: tuple[Path, LocalTrainer]) -> dict[str, Path]:
    """Run directories that are wrong in one way each."""
    import shutil

    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "nockpt").mkdir()
    shutil.copy(run6[0] / "config.toml", root / "nockpt" / "config.toml")
    shutil.copytree(run6[0], root / "corrupt")
    rank = next((root / "corrupt" / "checkpoints").glob("step-*")) / "rank3.pt"
    raw = bytearray(rank.read_bytes())
    raw[-10] ^= 0xFF
    rank.write_bytes(bytes(raw))
    shutil.copytree(run6[0], root / "moved")
    text = (root / "moved" / "config.toml").read_text().replace(str(run6[1].token_file.dir), "gone/tokens")
    (root / "moved" / "config.toml").write_text(text)
    return {"run": run6[0], **{p.name: p for p in root.iterdir()}, "missing": root / "nope"}


BAD = [
    (["eval", "{missing}"], "run directory {missing} does not exist"),
    (["generate", "{missing}", "--prompt", "a"], "does not exist"),
    (["eval", "{run}/config.toml"], "run directory {run}/config.toml is not a directory"),
    (["eval", "{empty}"], "is not a spotpipe run directory: it has no config.toml"),
    (["eval", "{nockpt}"], "no complete checkpoint under"),
    (["generate", "{nockpt}", "--prompt", "a"], "train.checkpoint_every"),
    (["eval", "{corrupt}"], "rank3.pt is corrupt"),
    (["eval", "{moved}"], "data.path gone/tokens does not exist here (a relative path is read from this directory); give the data with --data PATH"),
    (["eval", "{moved}", "--data", "{missing}"], "--data {missing} does not exist"),
    (["eval", "{run}", "--skip-stages", "0"], "stage 0 holds the embedding and cannot be skipped"),
    (["eval", "{run}", "--skip-stages", "2,5"], "stage 5 holds the head and cannot be skipped"),
    (["eval", "{run}", "--skip-stages", "7"], "stage 7 is out of range: the run has 6 stages"),
    (["eval", "{run}", "--skip-stages", "one"], "expected stage numbers separated by commas"),
    (["generate", "{run}", "--prompt", "a", "--skip-stages", "0"], "stage 0 holds the embedding"),
    (["eval", "{run}", "--skip-stages", "1", "--skip-fraction", "0.5"], "give --skip-stages or --skip-fraction, not both"),
    (["eval", "{run}", "--skip-fraction", "1"], "argument --skip-fraction: expected a number in [0, 1), got 1"),
    (["eval", "{run}", "--skip-fraction", "-0.1"], "expected a number in [0, 1)"),
    (["eval", "{run}", "--skip-fraction", "0.8"], "only 4 may be skipped"),
    (["eval", "{run}", "--samples", "0"], "argument --samples: expected an integer in 1..1000000000, got 0"),
    (["eval", "{run}", "--subsets", "nan"], "argument --subsets"),
    (["eval", "{run}", "--device", "tpu"], "argument --device: invalid choice"),
    (["generate", "{run}"], "the following arguments are required: --prompt"),
    (["generate", "{run}", "--prompt", ""], "--prompt is empty"),
    (["generate", "{run}", "--prompt", "a", "--temperature", "inf"], "argument --temperature"),
    (["generate", "{run}", "--prompt", "a", "--tokens", "0"], "argument --tokens"),
    (["generate", "{run}", "--prompt", "a", "--tokens", "100001"], "argument --tokens: expected an integer in 1..100000"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a[:1] + a[2:]) or a[1] for a, _ in BAD])
def test_bad_input_is_one_line(argv: list[str], needle: str, bad_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(**bad_dirs) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("spotpipe: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle.format(**bad_dirs) in err, err
