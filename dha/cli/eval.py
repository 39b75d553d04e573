"""`dha eval`: held-out perplexity, KV bytes, decode speed, lm-eval tasks and long-context measures
of one model or several (ratios to the first)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UserError
from .common import add_json_option, add_source, int_list, load_dtype, old_spelling


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out perplexity, KV-cache bytes per token and decode speed (of one or several models)",
        description="Evaluate SOURCE (and --compare models, on the same data, with interleaved timing runs): "
        "perplexity on held-out documents, KV-cache bytes per token (analytic and measured), "
        "prefill and decode tokens/s and peak memory. Prints a table, then one JSON line.",
    )
    add_source(p)
    add_eval_data_options(p)
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="OTHER",
        help="more models to evaluate in the same run; ratios are to SOURCE",
    )
    add_perplexity_options(p)
    add_speed_options(p)
    add_lm_eval_options(p)
    add_long_context_options(p)
    add_json_option(p)
    p.set_defaults(func=run_eval)


def add_eval_data_options(p: argparse.ArgumentParser) -> None:
    """The text the perplexities are measured on: its held-out documents."""
    p.add_argument(
        "--data",
        default="pydoc",
        help="text: .txt, .jsonl, .parquet, a saved `datasets` directory, "
        "or 'pydoc' (default: Python's own reference topics)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field / parquet or dataset column holding the text")
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="share of documents held out (by a stable hash of each document)",
    )


def add_perplexity_options(p: argparse.ArgumentParser) -> None:
    """How held-out perplexity is scored: window length, token budget, windows per pass."""
    p.add_argument("--eval-block-size", type=int, default=512, help="perplexity window length in tokens (default 512)")
    old_spelling(p, "--block-size", "--eval-block-size", "eval_block_size", int)
    p.add_argument(
        "--max-eval-tokens", type=int, default=16384, help="score at most this many held-out tokens (0: all)"
    )
    p.add_argument("--eval-batch-size", type=int, default=8, help="windows per forward pass for perplexity")


def add_speed_options(p: argparse.ArgumentParser) -> None:
    """The decode-speed timing runs: batch sizes, prompt and decode lengths, repeats, CPU threads."""
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8], help="decode-speed batch sizes, comma-separated")
    p.add_argument("--context", type=int, default=512, help="prompt tokens prefilled before timing decode")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per timing run")
    p.add_argument("--repeats", type=int, default=2, help="timing runs per model and batch size (the fastest is kept)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own; 1 is faster on a busy machine)",
    )


def add_lm_eval_options(p: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness tasks run on the models too (optional)."""
    p.add_argument(
        "--tasks",
        default="",
        help="also run these lm-evaluation-harness tasks, comma-separated (needs `pip install lm-eval`)",
    )
    p.add_argument(
        "--include-path",
        default=None,
        help="folder of local lm-eval task YAMLs (e.g. dataset_path: json over a local JSONL)",
    )
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many examples per task")
    p.add_argument(
        "--task-metadata",
        default=None,
        metavar="JSON",
        help="lm-eval task metadata, e.g. '{\"max_seq_lengths\": [4096]}' for the RULER tasks (docs/longcontext.md)",
    )


def add_long_context_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("long context (off unless asked for)")
    g.add_argument(
        "--long-context",
        type=int,
        default=0,
        metavar="N",
        help="perplexity by position over windows of N held-out tokens "
        "(buckets 0-256, 256-1k, 1k-2k, 2k-4k, 4k-8k, ...)",
    )
    g.add_argument("--long-windows", type=int, default=4, help="windows of --long-context tokens scored (default 4)")
    g.add_argument(
        "--retrieval",
        type=int_list,
        default=None,
        metavar="LENGTHS",
        help="passkey retrieval through the KV cache at these prompt lengths, e.g. 2048,4096,8192",
    )
    g.add_argument(
        "--retrieval-depths", type=int, default=5, help="needle depths per length, evenly from 8%% to 92%% (default 5)"
    )
    g.add_argument(
        "--retrieval-per-depth",
        type=int,
        default=4,
        help="prompts (keys) per depth and length (default 4: 20 per length)",
    )
    g.add_argument(
        "--haystack",
        choices=["synthetic", "text"],
        default="synthetic",
        help="what the needle hides in: repeated filler sentences, or slices of the held-out text",
    )
    g.add_argument("--plot-dir", default=None, help="write by_position.png and retrieval.png here")


def long_context_options(args) -> tuple[int, int, object]:
    """(window, windows, RetrievalOptions or None) from add_long_context_options' flags."""
    from ..longctx import RetrievalOptions

    retrieval = None
    if args.retrieval:
        retrieval = RetrievalOptions(
            lengths=args.retrieval,
            depths=args.retrieval_depths,
            per_depth=args.retrieval_per_depth,
            haystack=args.haystack,
        )
        retrieval.validate()
    return args.long_context, args.long_windows, retrieval


def write_long_context_plots(report: dict, directory: str) -> list[str]:
    from ..plots import plot_position_ratio, plot_retrieval

    models, written = report["models"], []
    names = [os.path.basename(m["source"].rstrip("/")) or m["source"] for m in models]
    if "by_position" in models[0]:
        written.append(os.path.join(directory, "by_position.png"))
        plot_position_ratio(names, [m["by_position"] for m in models], written[-1])
    if "retrieval" in models[0]:
        written.append(os.path.join(directory, "retrieval.png"))
        plot_retrieval(names, [m["retrieval"] for m in models], written[-1])
    return written


def run_eval(args) -> int:
    import os

    from ..checkpoint import load
    from ..data import check_data, load_tokens
    from ..evaluate import EvalOptions, evaluate_models, flatten, print_report

    check_data(args.data)  # before loading models
    if args.max_eval_tokens < 0:
        raise UserError("--max-eval-tokens must be 0 (all) or positive")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    options = EvalOptions(
        block_size=args.eval_block_size,
        max_eval_tokens=args.max_eval_tokens or None,
        eval_batch_size=args.eval_batch_size,
        batch_sizes=args.batch_sizes,
        context=args.context,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        progress=sys.stderr.isatty(),
        tasks=[t for t in args.tasks.split(",") if t.strip()],
        include_path=args.include_path,
        limit=args.limit,
        task_metadata=args.task_metadata,
    )
    options.long_context, options.long_windows, options.retrieval = long_context_options(args)
    dtype = load_dtype(args)
    models = [load(source, dtype, device=args.device) for source in [args.source, *args.compare]]
    splits = load_tokens(
        args.data, models[0].tokenizer, text_field=args.text_field, heldout_fraction=args.heldout_fraction
    )
    report = flatten(evaluate_models(models, splits, options))
    if args.plot_dir:
        os.makedirs(args.plot_dir, exist_ok=True)
        report["plots"] = write_long_context_plots(report, args.plot_dir)
    if not args.json:
        print_report(report)
    print(json.dumps(report))
    return 0
