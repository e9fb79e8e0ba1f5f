"""``spotpipe eval`` and ``spotpipe generate``: what a trained run learned, with or without stages.

``spotpipe eval RUN_DIR [--skip-stages 2,4 | --skip-fraction 0.5]`` prints the validation loss and
perplexity of the run's last checkpoint with those pipeline stages left out (SkipPipe's
skipped-stage inference; :mod:`spotpipe.runtime.inprocess.evaluate`); ``spotpipe generate RUN_DIR
--prompt TEXT`` samples text from it with the run's tokenizer (:mod:`spotpipe.model.sampling`).
Both load every stage into this process (:mod:`spotpipe.runtime.inprocess.restore`). torch is
imported only inside the commands, so ``spotpipe --help`` stays fast; every bad input is one
``spotpipe: error:`` line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from spotpipe.cliargs import float_in, int_in
from spotpipe.errors import SpotpipeError

MAX_NEW_TOKENS = 100_000
"""Most tokens ``generate`` takes (each is one forward pass of the whole model over its window:
at a few tokens per second on a CPU, this bound is already hours)."""

DEVICES = ("auto", "cpu", "cuda")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory of a `spotpipe train` job with a checkpoint (train.checkpoint_every > 0)")
    parser.add_argument("--skip-stages", default=None, metavar="S,S,...",
                        help="pipeline stages to leave out (their chunks pass the hidden state on unchanged), e.g. 1,2; "
                             "never stage 0 (embedding) nor the stage of the head (the last; in a SkipPipe node run, "
                             "pipeline.stage_nodes, the head is apart on the stage-0 nodes, so stages 1..S-1 may be skipped)")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="the run's data (token dir or text) when its data.path has moved (default: the run's data.path)")
    parser.add_argument("--device", choices=DEVICES, default=None, help="where to compute (default: the run's run.device)")


def register(subparsers: Any) -> None:
    """Add ``eval`` and ``generate`` to the top-level parser.

    Args:
        subparsers: The top-level parser's ``add_subparsers()`` object.
    """
    ev = subparsers.add_parser(
        "eval",
        help="validation perplexity of a trained run, optionally with stages skipped",
        description=(
            "Load every stage of a run's last checkpoint into this process and print the validation loss and "
            "perplexity (exp of the mean token cross-entropy) on the run's validation split (the last data.val_fraction "
            "of its tokens). With --skip-stages those pipeline stages are left out; with --skip-fraction F, "
            "--subsets distinct random sets of round(F x stages) skippable stages are, and the mean, spread and "
            "extremes over the sets are printed next to the full model (SkipPipe's skipped-stage inference)."
        ),
    )
    _run_arguments(ev)
    ev.add_argument("--skip-fraction", type=float_in(0.0, 1.0, hi_open=True), default=None, metavar="F",
                    help="share of the stages to skip, in [0, 1): round(F x stages) of the skippable ones (all but stage 0 and "
                         "the stage of the head; in a SkipPipe node run all but stage 0), in random sets")
    ev.add_argument("--subsets", type=int_in(1, 10_000), default=5, metavar="N",
                    help="distinct random sets of stages with --skip-fraction (default 5; all of them when fewer exist)")
    ev.add_argument("--samples", type=int_in(1, 10**9), default=None, metavar="N",
                    help="validation windows of model.context tokens to read (default: the run's own evaluation, "
                         "train.eval_batches x train.batch_size; at most the split's)")
    ev.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, metavar="S", help="seed of the random sets (default 0)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ev.set_defaults(func=cmd_eval)

    gen = subparsers.add_parser(
        "generate",
        help="sample text from a trained run",
        description=(
            "Load every stage of a run's last checkpoint into this process and continue --prompt by --tokens tokens, "
            "drawn with --temperature and --top-k from a seeded generator, with the run's tokenizer (byte-level or "
            "a BPE tokenizer.json); prints the prompt and the continuation. --skip-stages leaves stages out."
        ),
    )
    _run_arguments(gen)
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (at least one token)")
    gen.add_argument("--tokens", type=int_in(1, MAX_NEW_TOKENS), default=200, metavar="N",
                     help=f"tokens to generate, 1..{MAX_NEW_TOKENS} (default 200; Ctrl-C prints what was generated so far)")
    gen.add_argument("--temperature", type=float_in(0.0, 100.0), default=1.0, metavar="T",
                     help="softmax temperature, 0 to 100; 0 takes the most likely token (default 1.0)")
    gen.add_argument("--top-k", type=int_in(0, 10**9), default=0, metavar="K",
                     help="sample among the K most likely tokens only (default 0: all)")
    gen.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, metavar="S", help="seed of the draws (default 0)")
    gen.set_defaults(func=cmd_generate)


def _load(args: argparse.Namespace) -> tuple[Any, tuple[int, ...]]:
    """The restored run and the checked stages to skip. Bad stages or a fraction that skips too
    many fail on the config and the placement alone, before any weights load."""
    from spotpipe.runtime.inprocess.restore import load_trained_run, run_config, stage_chunks
    from spotpipe.runtime.inprocess.skipsets import check_skip_stages, parse_stage_list, skip_count

    skip: tuple[int, ...] = ()
    fraction = getattr(args, "skip_fraction", None)
    if args.skip_stages is not None or fraction is not None:
        stages = parse_stage_list(args.skip_stages) if args.skip_stages is not None else []
        placement = stage_chunks(run_config(args.run_dir, args.data))
        num_chunks = sum(len(c) for c in placement)
        skip = check_skip_stages(stages, placement, num_chunks)
        if fraction is not None:
            skip_count(fraction, placement, num_chunks)
    return load_trained_run(args.run_dir, data=args.data, device=args.device), skip


def _stages_text(stages: tuple[int, ...]) -> str:
    return ",".join(map(str, stages)) if stages else "none"


def _evaluate(args: argparse.Namespace, run: Any, skip: tuple[int, ...]) -> tuple[Any, list[Any], Any]:
    """``(full, rows, fraction result or None)``, with a progress line over every evaluation."""
    from spotpipe.progressline import ProgressLine
    from spotpipe.runtime.inprocess.evaluate import eval_samples, evaluate_fraction, evaluate_skipping, fraction_sets

    n = eval_samples(run, args.samples)
    sets = fraction_sets(run, args.skip_fraction, args.subsets, args.seed)[1] if args.skip_fraction is not None else []
    bar = ProgressLine("eval", n * (1 + sum(1 for s in sets if s) + bool(skip)), "samples")
    try:
        if args.skip_fraction is not None:
            result = evaluate_fraction(run, args.skip_fraction, args.subsets, args.seed, n, bar.update)
            return result.full, list(result.sets), result
        full = evaluate_skipping(run, (), n, bar.update)
        return full, [evaluate_skipping(run, skip, n, lambda k: bar.update(n + k))] if skip else [], None
    finally:
        bar.close()


def _entry(r: Any, full: Any) -> dict[str, Any]:
    return {"skipped": list(r.skipped), "loss": r.loss, "perplexity": r.perplexity,
            "perplexity_increase": r.perplexity / full.perplexity - 1.0}


def _eval_json(args: argparse.Namespace, run: Any, full: Any, rows: list[Any], result: Any) -> dict[str, Any]:
    cfg = run.cfg
    out: dict[str, Any] = {
        "run_dir": str(run.run_dir), "step": run.step, "steps_trained": run.step + 1, "stages": run.num_stages,
        "chunks": len(run.chunks), "layers": cfg.model.layers, "samples": full.samples, "tokens": full.tokens,
        "context": cfg.model.context, "val_fraction": cfg.data.val_fraction, "full": _entry(full, full),
    }
    if run.nodes:  # a SkipPipe node run: the nodes of each stage (the first one's file was read)
        out["stage_nodes"] = [list(g) for g in run.nodes]
    if result is not None:
        out["skip_fraction"] = {
            "fraction": result.fraction, "skipped_per_set": result.count, "possible_sets": result.possible,
            "seed": args.seed, "sets": [_entry(r, full) for r in rows], "mean_loss": result.mean_loss,
            "mean_perplexity": result.mean_perplexity, "std_perplexity": result.std_perplexity,
            "min_perplexity": result.min_perplexity, "max_perplexity": result.max_perplexity,
            "mean_perplexity_increase": result.mean_perplexity / full.perplexity - 1.0,
        }
    elif rows:
        out["skipped"] = _entry(rows[0], full)
    return out


def _eval_text(args: argparse.Namespace, run: Any, full: Any, rows: list[Any], result: Any) -> list[str]:
    cfg = run.cfg
    shape = f"{run.num_stages} stages ({len(run.chunks)} chunks, "
    if run.nodes:  # a SkipPipe node run: one file per stage was read, the first node's of its group
        shape = (f"{run.num_stages} stages on {sum(len(g) for g in run.nodes)} nodes (SkipPipe, the stages read from "
                 f"nodes {','.join(str(g[0]) for g in run.nodes)}; {len(run.chunks)} chunks with the head apart, ")
    lines = [f"{run.run_dir}: checkpoint after {run.step + 1} steps, {shape}"
             f"{cfg.model.layers} blocks); {full.samples} validation windows x {cfg.model.context} tokens "
             f"(the last {cfg.data.val_fraction:g} of the tokens)"]
    width = max([len(_stages_text(r.skipped)) for r in rows] + [4]) + 16
    lines.append(f"  {'skipped stages':<{width}} {'loss':>8} {'perplexity':>11}")
    lines.append(f"  {'none (full model)':<{width}} {full.loss:8.4f} {full.perplexity:11.3f}")
    for r in rows:
        lines.append(f"  {_stages_text(r.skipped):<{width}} {r.loss:8.4f} {r.perplexity:11.3f}  "
                     f"{100 * (r.perplexity / full.perplexity - 1):+.1f}%")
    if result is not None:
        if len(rows) == result.possible:
            drawn = "the only set" if result.possible == 1 else f"all {result.possible} sets"
        else:
            drawn = f"{len(rows)} random sets of {result.possible} (seed {args.seed})"
        lines.append(
            f"skip fraction {result.fraction:g}: {result.count} of {run.num_stages} stages left out, {drawn}: "
            f"perplexity mean {result.mean_perplexity:.3f} ({100 * (result.mean_perplexity / full.perplexity - 1):+.1f}%), "
            f"std {result.std_perplexity:.3f}, min {result.min_perplexity:.3f}, max {result.max_perplexity:.3f}")
    return lines


def cmd_eval(args: argparse.Namespace) -> int:
    """``spotpipe eval``: print the validation loss and perplexity (text or JSON).

    Args:
        args: Parsed ``spotpipe eval`` arguments.

    Returns:
        0.

    Raises:
        SpotpipeError: on both ``--skip-stages`` and ``--skip-fraction``, a bad run directory,
            checkpoint or stage list.
    """
    if args.skip_stages is not None and args.skip_fraction is not None:
        raise SpotpipeError("give --skip-stages or --skip-fraction, not both")
    run, skip = _load(args)
    full, rows, result = _evaluate(args, run, skip)
    if args.json:
        print(json.dumps(_eval_json(args, run, full, rows, result), indent=1))
    else:
        print("\n".join(_eval_text(args, run, full, rows, result)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``spotpipe generate``: print the prompt and its sampled continuation (on Ctrl-C, what was
    generated so far).

    Args:
        args: Parsed ``spotpipe generate`` arguments.

    Returns:
        0, or 130 when interrupted (the partial text is printed first).

    Raises:
        SpotpipeError: on an empty prompt, a prompt token outside the model's vocabulary, or a bad
            run directory or checkpoint.
    """
    from spotpipe.data.tokenizer import load_tokenizer

    run, skip = _load(args)
    tokenizer = load_tokenizer(run.token_file.tokenizer)
    prompt = [int(t) for t in tokenizer.encode(args.prompt)]
    if not prompt:
        raise SpotpipeError("--prompt is empty: give at least one character to continue")
    vocab = run.cfg.model.vocab_size
    if max(prompt) >= vocab:
        raise SpotpipeError(f"--prompt: the tokenizer {tokenizer.name} gives id {max(prompt)}, outside the model's vocabulary "
                            f"0..{vocab - 1}")
    from spotpipe.model.sampling import sample_tokens
    from spotpipe.progressline import ProgressLine
    from spotpipe.runtime.cli import EXIT_INTERRUPTED

    bar = ProgressLine("generate", args.tokens, "tokens")
    new: list[int] = []
    interrupted = False
    try:
        sample_tokens(run.chunks, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, skip=run.chunks_of(skip), progress=bar.update, out=new)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    print(tokenizer.decode(prompt + new), flush=True)
    if interrupted:
        print(f"spotpipe generate: interrupted after {len(new)} of {args.tokens} tokens", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0
