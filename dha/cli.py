"""The `dha` command: wiring only. Each verb parses its options and calls one function elsewhere.

Bad input (UserError) prints one line `dha: error: ...` and exits 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from .errors import UserError

SOURCE_HELP = "model: a dha checkpoint dir, a Hugging Face model dir, a .gguf file, or a hub id (default: smollm2-135m, built in)"
DEVICE_HELP = "where the work runs: auto (CUDA when a GPU is present, else the CPU; default) | cpu | cuda | cuda:N"
DTYPE_HELP = ("float32 | bfloat16 | float16 | auto (default): the checkpoint's own, except bfloat16 on a GPU "
              "for inference and calibration (generate, eval, analyze, convert without --tokens; not with --offload)")
FIT_CHECK = ("Before any work, the device memory it needs is estimated from SOURCE's config and compared with what "
             "--device has free: too little, or on a GPU room only for one layer at a time without --offload, is "
             "refused with the numbers (docs/scaling.md, the fit check).")
OFFLOAD_HELP = ("keep the model in CPU memory (memory-mapped, in the checkpoint's own dtype unless --dtype) and bring one "
                "decoder layer at a time to --device, in float32, for the calibration sweeps{merges}; the result is written "
                "from the CPU. For a model larger than the GPU's memory: the GPU then holds one layer and its activations")


DTYPES = ("auto", "float32", "bfloat16", "float16")


class _OldSpelling(argparse.Action):
    """A flag's earlier name, kept for users' scripts: it sets the new flag's value and says so once
    on stderr. Hidden from --help."""

    def __init__(self, option_strings, dest, new: str, **kw):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"dha: note: {option_string} is spelled {self.new} now (the old spelling still works)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def old_spelling(p: argparse.ArgumentParser, old: str, new: str, dest: str, type=None) -> None:
    p.add_argument(old, dest=dest, action=_OldSpelling, new=new, type=type)


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print only the JSON line (the last line of the output)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    """--device, on every verb (build_parser); main() resolves it (dha.device) before the verb runs."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)


def _inference_dtype(args):
    """The load dtype of a verb that runs the model for inference or calibration (--dtype, dha.device),
    on the device it is loaded onto (`_load_device`)."""
    import torch

    from .checkpoint import parse_dtype
    from .device import inference_dtype

    return inference_dtype(parse_dtype(args.dtype), torch.device(_load_device(args)))


def _load_device(args) -> str:
    """Where a verb loads its model: --device, or the CPU with --offload (its work still runs on
    --device, one decoder layer at a time)."""
    return "cpu" if getattr(args, "offload", False) else args.device


def _compute_device(args) -> str | None:
    """The device the layer-by-layer work is sent to with --offload; None: the model's own (--device)."""
    return args.device if getattr(args, "offload", False) else None


def check_fits(args, work, dtype) -> None:
    """The fit check (dha.memory) of `work` on --device for SOURCE loaded in `dtype` (None: its own),
    from SOURCE's config and weights headers: before the model is loaded."""
    import torch

    from .checkpoint import DEFAULT_SOURCE, source_shape
    from .memory import check_fit, estimate

    cfg, own = source_shape(args.source)
    check_fit(torch.device(args.device), estimate(cfg, dtype or own, work), getattr(args, "offload", False),
              args.source or DEFAULT_SOURCE)


# ---- inspect -------------------------------------------------------------------------------------

def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's shape: heads per layer, parameters, KV-cache bytes per token",
                       description="Show family, layers, query/key/value heads per layer, parameters and KV-cache bytes per token.")
    _add_source(p)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from .checkpoint import load, parse_dtype
    from .summary import inspect_model, print_inspect

    loaded = load(args.source, parse_dtype(args.dtype), tokenizer=False, device=args.device)
    info = inspect_model(loaded)
    if args.json:
        print(json.dumps(info))
    else:
        print_inspect(info)
    return 0


# ---- generate ------------------------------------------------------------------------------------

def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (greedy or sampled), from the KV cache",
                       description="Prefill the prompt, then decode token by token from the compact KV cache.")
    _add_source(p)
    p.add_argument("--prompt", default="The Python interpreter", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    add_json_option(p)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import time

    import torch

    from .checkpoint import load
    from .device import synchronize
    from .model import generate

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    device = torch.device(args.device)
    loaded = load(args.source, _inference_dtype(args), device=device)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer")
    ids = torch.tensor([loaded.tokenizer(args.prompt)["input_ids"]], device=device)
    synchronize(device)
    t0 = time.perf_counter()
    out = generate(loaded.model, ids, args.max_new_tokens, args.temperature, torch.Generator(device).manual_seed(args.seed))
    synchronize(device)
    seconds = time.perf_counter() - t0
    text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "seconds": seconds}))
    else:
        print(args.prompt + text)
        print(f"[{args.max_new_tokens} tokens in {seconds:.2f}s]", file=sys.stderr)
    return 0


# ---- eval ----------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out perplexity, KV-cache bytes per token and decode speed (of one or several models)",
                       description="Evaluate SOURCE (and --compare models, on the same data, with interleaved timing runs): "
                                   "perplexity on held-out documents, KV-cache bytes per token (analytic and measured), "
                                   "prefill and decode tokens/s and peak memory. Prints a table, then one JSON line.")
    _add_source(p)
    p.add_argument("--data", default="pydoc", help="text: .txt, .jsonl, .parquet, a saved `datasets` directory, or 'pydoc' (default: Python's own reference topics)")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet or dataset column holding the text")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of documents held out (by a stable hash of each document)")
    p.add_argument("--compare", nargs="+", default=[], metavar="OTHER", help="more models to evaluate in the same run; ratios are to SOURCE")
    p.add_argument("--eval-block-size", type=int, default=512, help="perplexity window length in tokens (default 512)")
    old_spelling(p, "--block-size", "--eval-block-size", "eval_block_size", int)
    p.add_argument("--max-eval-tokens", type=int, default=16384, help="score at most this many held-out tokens (0: all)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="windows per forward pass for perplexity")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 8], help="decode-speed batch sizes, comma-separated")
    p.add_argument("--context", type=int, default=512, help="prompt tokens prefilled before timing decode")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per timing run")
    p.add_argument("--repeats", type=int, default=2, help="timing runs per model and batch size (the fastest is kept)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own; 1 is faster on a busy machine)")
    p.add_argument("--tasks", default="", help="also run these lm-evaluation-harness tasks, comma-separated (needs `pip install lm-eval`)")
    p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs (e.g. dataset_path: json over a local JSONL)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many examples per task")
    p.add_argument("--task-metadata", default=None, metavar="JSON",
                   help='lm-eval task metadata, e.g. \'{"max_seq_lengths": [4096]}\' for the RULER tasks (docs/longcontext.md)')
    add_long_context_options(p)
    add_json_option(p)
    p.set_defaults(func=run_eval)


def add_long_context_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("long context (off unless asked for)")
    g.add_argument("--long-context", type=int, default=0, metavar="N",
                   help="perplexity by position over windows of N held-out tokens (buckets 0-256, 256-1k, 1k-2k, 2k-4k, 4k-8k, ...)")
    g.add_argument("--long-windows", type=int, default=4, help="windows of --long-context tokens scored (default 4)")
    g.add_argument("--retrieval", type=_int_list, default=None, metavar="LENGTHS",
                   help="passkey retrieval through the KV cache at these prompt lengths, e.g. 2048,4096,8192")
    g.add_argument("--retrieval-depths", type=int, default=5, help="needle depths per length, evenly from 8%% to 92%% (default 5)")
    g.add_argument("--retrieval-per-depth", type=int, default=4, help="prompts (keys) per depth and length (default 4: 20 per length)")
    g.add_argument("--haystack", choices=["synthetic", "text"], default="synthetic",
                   help="what the needle hides in: repeated filler sentences, or slices of the held-out text")
    g.add_argument("--plot-dir", default=None, help="write by_position.png and retrieval.png here")


def long_context_options(args) -> tuple[int, int, object]:
    """(window, windows, RetrievalOptions or None) from add_long_context_options' flags."""
    from .longctx import RetrievalOptions

    retrieval = None
    if args.retrieval:
        retrieval = RetrievalOptions(lengths=args.retrieval, depths=args.retrieval_depths, per_depth=args.retrieval_per_depth,
                                     haystack=args.haystack)
        retrieval.validate()
    return args.long_context, args.long_windows, retrieval


def write_long_context_plots(report: dict, directory: str) -> list[str]:
    from .plots import plot_position_ratio, plot_retrieval

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

    from .checkpoint import load
    from .data import DEFAULT_DATA, DataError, load_tokens
    from .evaluate import EvalOptions, evaluate_models, flatten, print_report

    if args.data != DEFAULT_DATA and not os.path.exists(args.data):  # fail before loading models
        raise DataError(f"data not found: {args.data}")
    if args.max_eval_tokens < 0:
        raise UserError("--max-eval-tokens must be 0 (all) or positive")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    options = EvalOptions(
        block_size=args.eval_block_size, max_eval_tokens=args.max_eval_tokens or None, eval_batch_size=args.eval_batch_size,
        batch_sizes=args.batch_sizes, context=args.context, new_tokens=args.new_tokens, repeats=args.repeats,
        progress=sys.stderr.isatty(), tasks=[t for t in args.tasks.split(",") if t.strip()],
        include_path=args.include_path, limit=args.limit, task_metadata=args.task_metadata,
    )
    options.long_context, options.long_windows, options.retrieval = long_context_options(args)
    dtype = _inference_dtype(args)
    models = [load(source, dtype, device=args.device) for source in [args.source, *args.compare]]
    splits = load_tokens(args.data, models[0].tokenizer, text_field=args.text_field, heldout_fraction=args.heldout_fraction)
    report = flatten(evaluate_models(models, splits, options))
    if args.plot_dir:
        os.makedirs(args.plot_dir, exist_ok=True)
        report["plots"] = write_long_context_plots(report, args.plot_dir)
    if not args.json:
        print_report(report)
    print(json.dumps(report))
    return 0


# ---- export --------------------------------------------------------------------------------------

def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face checkpoint (stock class when the layout allows, else with its own code)",
                       description="Write SOURCE as a Hugging Face checkpoint: the family's stock class (e.g. LlamaForCausalLM) "
                                   "when every layer is GQA with the same number of equal groups (query heads are reordered to "
                                   "make groups contiguous), otherwise a checkpoint carrying its modeling code "
                                   "(trust_remote_code=True). The export is reloaded with transformers and its logits compared "
                                   "with ours before it is kept. --format gguf / nemotron-nas write layouts serving engines run with "
                                   "each layer's own key/value head count (llama.cpp, vLLM). Prints a summary, then one JSON line.")
    _add_source(p)
    p.add_argument("--out", required=True, metavar="OUT", help="new (or empty) output directory; with --format gguf a new .gguf file")
    p.add_argument("--format", default="hf", choices=("hf", "gguf", "nemotron-nas"),
                   help="hf: transformers checkpoint (default); gguf: a llama.cpp file (llama, or deci for per-layer "
                        "head counts); nemotron-nas: a DeciLMForCausalLM directory for vLLM (see README, Serving)")
    p.add_argument("--outtype", default="f32", choices=("f32", "f16", "q8_0"), help="gguf: weight type (default f32)")
    p.add_argument("--pad", action="store_true", help="gguf, nemotron-nas: duplicate heads to hold a decoupled or "
                                                      "uneven layout exactly (a larger KV cache; the summary says how much)")
    p.add_argument("--force-remote-code", action="store_true", help="write the remote-code kind even when a stock class fits")
    p.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| (fp32) accepted in the reload check")
    add_json_option(p)
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from .checkpoint import check_out, load, parse_dtype
    from .export import ExportMismatch, export, summary_lines

    if not args.atol >= 0:
        raise UserError("--atol must be 0 or positive")
    if args.format != "hf":
        return run_export_serving(args)
    if args.pad or args.outtype != "f32":
        raise UserError("--pad and --outtype are for --format gguf / nemotron-nas")
    check_out(args.out)  # before loading: a large model takes a while
    loaded = load(args.source, parse_dtype(args.dtype), device=args.device)
    try:
        result = export(loaded, args.out, force_remote_code=args.force_remote_code, atol=args.atol)
    except ExportMismatch as e:  # our failure, not the user's input: exit 1
        print(f"dha: error: {e}", file=sys.stderr)
        return 1
    if not args.json:
        for line in summary_lines(result):
            print(line)
    print(json.dumps({"out": result.out, "kind": result.kind, "max_abs_diff": result.max_abs_diff, **result.to_dict()}))
    return 0


def run_export_serving(args) -> int:
    """export --format gguf | nemotron-nas: layouts serving engines run (dha.gguf, dha.nemotron)."""
    from .checkpoint import check_out, load, parse_dtype

    if args.force_remote_code:
        raise UserError("--force-remote-code is for --format hf")
    if args.format == "gguf":
        from .gguf import check_gguf_out, export_gguf, summary_lines

        check_gguf_out(args.out)
        result = export_gguf(load(args.source, parse_dtype(args.dtype), device=args.device), args.out, args.outtype, pad=args.pad)
    else:
        from .nemotron import export_nemotron, summary_lines

        if args.outtype != "f32":
            raise UserError("--outtype is for --format gguf (nemotron-nas keeps the model's dtype; use --dtype)")
        check_out(args.out)
        result = export_nemotron(load(args.source, parse_dtype(args.dtype), device=args.device), args.out, pad=args.pad)
    if not args.json:
        for line in summary_lines(result):
            print(line)
    print(json.dumps({"format": args.format, **result.to_dict()}))
    return 0


# ---- analyze and convert: calibration text ------------------------------------------------------

def _add_calibration(p: argparse.ArgumentParser, default_tokens: int) -> None:
    p.add_argument("--data", default="pydoc", help="calibration text (its TRAIN split is used): .txt, .jsonl, .parquet, a saved `datasets` directory, or 'pydoc' (default)")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet or dataset column holding the text")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of documents held out (never used for calibration)")
    p.add_argument("--calib-tokens", type=int, default=default_tokens, help="calibration tokens, from the train split")
    p.add_argument("--calib-block-size", type=int, default=256, help="tokens per calibration block (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed for token subsampling (convert: also the search and the training data order)")
    p.add_argument("--metric", default=None, choices=("cka", "cosine"),
                   help="head similarity of analyze, gqa-similar and svd --grouping similar: cka (linear CKA, default) | cosine")


def _check_calibration_args(args) -> None:
    """Fail on bad options before any model is loaded."""
    import os

    from .data import DEFAULT_DATA, DataError

    if args.data != DEFAULT_DATA and not os.path.exists(args.data):
        raise DataError(f"data not found: {args.data}")
    if args.calib_tokens < 1:
        raise UserError("--calib-tokens must be at least 1")
    if args.calib_block_size < 1:
        raise UserError("--calib-block-size must be at least 1")


def _calibration_blocks(args, tokenizer):
    """(n, block_size) token blocks from the TRAIN split, about --calib-tokens tokens in all."""
    from .data import calibration_blocks, load_tokens

    if tokenizer is None:
        raise UserError("this model has no tokenizer, so calibration text cannot be tokenised")
    splits = load_tokens(args.data, tokenizer, text_field=args.text_field, heldout_fraction=args.heldout_fraction)
    return calibration_blocks(splits.train, args.calib_tokens, args.calib_block_size)


# ---- analyze -------------------------------------------------------------------------------------

def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="similarity of key heads and of value heads per layer: heatmaps, clusters, redundancy",
                       description="Measure how similar the key heads and the value heads of every layer are on calibration "
                                   "tokens (cosine and linear CKA of pre-RoPE head outputs), cluster them for every group "
                                   "count, and write analysis.json, per-layer heatmaps and a redundancy chart to --out. " + FIT_CHECK)
    _add_source(p)
    _add_calibration(p, default_tokens=4096)
    old_spelling(p, "--block-size", "--calib-block-size", "calib_block_size", int)
    add_json_option(p)
    p.add_argument("--threshold", type=float, default=0.5,
                   help="redundancy: the fewest groups keeping every within-group similarity >= this (default 0.5)")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--offload", action="store_true", help=OFFLOAD_HELP.format(merges=""))
    p.set_defaults(func=run_analyze)


def run_analyze(args) -> int:
    from .analyze import analyze, summary_table, write_report
    from .atomic import atomic_dir
    from .checkpoint import check_out, load
    from .memory import Work

    _check_calibration_args(args)
    check_out(args.out)
    check_fits(args, Work(calib_tokens=args.calib_tokens, calib_block=args.calib_block_size), _inference_dtype(args))
    loaded = load(args.source, _inference_dtype(args), device=_load_device(args))
    calib = _calibration_blocks(args, loaded.tokenizer)
    args.metric = args.metric or "cka"  # analyze's own default, named here for the JSON line
    result = analyze(loaded.model, calib, metric=args.metric, threshold=args.threshold,
                     max_tokens=args.calib_tokens, seed=args.seed, device=_compute_device(args))
    result["source"] = loaded.source
    result["data"] = args.data
    with atomic_dir(args.out) as tmp:
        files = write_report(result, tmp)
    if not args.json:
        print(summary_table(result))
    print(json.dumps({"out": args.out, "files": len(files), "calibration_tokens": result["calibration_tokens"],
                      "metric": args.metric, "threshold": args.threshold,
                      "key_groups_needed": [e["keys"]["groups_needed"] for e in result["layers"]],
                      "value_groups_needed": [e["values"]["groups_needed"] for e in result["layers"]]}))
    return 0


# ---- convert -------------------------------------------------------------------------------------

def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="shrink the KV cache by a method at a KV budget, or by a saved plan",
                       description="Convert SOURCE to fewer key/value heads and write a native checkpoint (with plan.json) "
                                   "to --out. Methods: dha (Decoupled-Head Attention: search, fusion, merge, continued "
                                   "training, report; docs/method.md), and the baselines gqa (contiguous mean-pooling), "
                                   "gqa-similar (similar heads mean-pooled), svd (low-rank from calibration activations), "
                                   "prune (keep the most important heads); or --plan PLAN.json to replay a plan with mean "
                                   "pooling. With --tokens N the converted model is trained on N tokens of --data. " + FIT_CHECK)
    _add_source(p)
    p.add_argument("--method", choices=("dha", "gqa", "gqa-similar", "svd", "prune"),
                   help="conversion method: dha | gqa | gqa-similar | svd | prune")
    p.add_argument("--kv-budget", type=float, help="fraction of the source's KV cache to keep, in (0, 1]")
    p.add_argument("--plan", help="apply this plan.json (mean pooling) instead of a method; with --method dha, "
                                  "use its groups instead of searching (aligned merge, fusion, training)")
    p.add_argument("--grouping", default="contiguous", choices=("contiguous", "similar"),
                   help="svd only: contiguous (Yu et al., default) | similar")
    _add_calibration(p, default_tokens=4096)
    p.add_argument("--out", required=True, help="checkpoint directory to write (must not exist or be empty; "
                                                "with --tokens, a training run directory that --resume continues)")
    p.add_argument("--offload", action="store_true",
                   help=OFFLOAD_HELP.format(merges=" and the closed-form merges (dha and svd: aligned merges; gqa-similar: "
                                                   "head similarity; dha: the report's perplexity too)")
                   + ". Without training only (no --tokens N), and not with --method prune or --search learned, which "
                     "run the whole model")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="the context the conversion keeps: calibration blocks and training (and distillation) rows of N "
                        "tokens; dha: position-free key pairs chosen for N tokens (--free-pairs), and the report's "
                        "perplexity by position over N-token windows (default: 256-token blocks and rows, pairs for "
                        "2,048 tokens; docs/longcontext.md)")
    add_json_option(p)
    add_dha_options(p)  # --method dha: search, fusion, training options (dha.pipeline)
    p.set_defaults(func=run_convert)


def apply_context(args, tokens: int) -> None:
    """--context N: refused past the source's positions or when an N-token training row cannot fit
    even with activation checkpointing (before any work); else it sets the calibration block,
    the training row and the batch (at least one row) to N tokens."""
    n = args.context
    if n is None:
        return
    from .checkpoint import source_shape

    if not tokens and (args.method == "gqa" or args.method is None):
        raise UserError("--context sets calibration blocks and training rows: gqa and a plan replay read neither without --tokens")
    cfg, _ = source_shape(args.source)
    if n < 2:
        raise UserError(f"--context must be at least 2 tokens, got {n}")
    if n > cfg.max_position_embeddings:
        raise UserError(f"--context {n} is beyond the source's {cfg.max_position_embeddings} positions")
    for dest in ("calib_block_size", "block_size"):
        if dest in args.given:
            raise UserError(f"--context sets --{dest.replace('_', '-')} to {n}: give one of them")
    args.calib_block_size = n
    args.calib_tokens = max(args.calib_tokens, n)
    if tokens:
        args.block_size, args.batch_tokens = n, max(args.batch_tokens, n)
        if "micro_batch" not in args.given:
            args.micro_batch = 1  # long rows: one at a time, gradients accumulated
        check_context_fits(args, cfg, n)


def check_context_fits(args, cfg, n: int) -> None:
    """Refuse --context N when one micro batch of N-token rows cannot train on --device even with
    activation checkpointing (dha.memory.training_fit: float32 weights, gradients, AdamW, activations)."""
    import torch

    from .memory import GiB, training_fit

    distill = args.distill if args.distill is not None else args.method == "dha"
    fit = training_fit(cfg, torch.float32, n, args.micro_batch, torch.device(args.device), distill=distill)
    if not fit.fits_with:
        raise UserError(f"--context {n}: training rows of {n} tokens ({args.micro_batch} per micro batch) need about "
                        f"{fit.with_checkpointing / GiB:.1f} GiB even with activation checkpointing; "
                        f"{args.device} has {fit.free / GiB:.1f} GiB free: lower --context or --micro-batch")


DHA_OPTIONS = ("retrieval", "retrieval_heads", "protect_values", "search", "sensitivity", "allocation", "coupled_kv", "layout", "merge", "merge_metric", "free_pairs", "fusion_fraction",
               "fusion_schedule", "fusion_weight", "fusion_ramp_end", "fusion_eps", "freeze_base", "freeze_maps")
CALIBRATION_OPTIONS = ("data", "text_field", "heldout_fraction", "calib_tokens", "calib_block_size")


def check_convert_options_used(args, tokens: int) -> None:
    """Refuse an option the conversion asked for would not use (it would be silently ignored)."""
    from dataclasses import fields

    from .train import TrainConfig

    method = args.method or "plan"
    given = getattr(args, "given", set())
    if "block_size" in given and "calib_block_size" not in given:
        # Before --calib-block-size, convert's --block-size was the calibration block too: it still is.
        args.calib_block_size = args.block_size
        given = given - {"block_size"} if not tokens else given
    unused = {}  # dest -> why, in the order they are reported
    if not tokens:
        training = {f.name for f in fields(TrainConfig)} | {"train_dtype", "teacher", "resume"}
        unused.update({d: "is about training: give --tokens N as well" for d in sorted(training - {"tokens", "seed", "dtype", "device"})})
        if method in ("gqa", "plan"):
            unused.update({d: f"is about calibration text, which {'gqa' if method == 'gqa' else 'a plan replay'} does not read"
                           for d in CALIBRATION_OPTIONS})
    if method != "dha":
        unused.update({d: "is a --method dha option" for d in DHA_OPTIONS})
    if method != "svd":
        unused["grouping"] = "is an svd option"
    if method not in ("gqa-similar", "svd", "dha") or (method == "svd" and args.grouping != "similar"):
        unused["metric"] = "is used by gqa-similar and svd --grouping similar only"
    for dest, why in unused.items():
        if dest in given:
            raise UserError(f"--{dest.replace('_', '-')} {why}")


def check_convert_training_flags(args) -> None:
    """What both convert paths (baselines, dha) require of the training flags: float32 master weights, and --teacher only with --distill."""
    if args.dtype not in ("auto", "float32"):
        raise UserError(f"--dtype {args.dtype}: --method dha, and any conversion with --tokens, keeps float32 weights; "
                        "set the autocast dtype of its training with --train-dtype")
    if getattr(args, "teacher", None) is not None and not getattr(args, "distill", False):
        raise UserError("--teacher is only used with --distill")


def _convert_training(args, tokens: int):
    """A baseline conversion's training settings, checked before loading: (TrainConfig or None, the run to resume or None)."""
    import os

    resume = getattr(args, "resume", None)
    if tokens <= 0:
        for flag, value in (("--resume", resume), ("--save-every", getattr(args, "save_every", 0)),
                            ("--distill", getattr(args, "distill", False)), ("--teacher", getattr(args, "teacher", None))):
            if value:
                raise UserError(f"{flag} is about training: give --tokens N as well")
        return None, None
    check_convert_training_flags(args)
    if resume is not None:
        out = os.path.abspath(args.out)
        if os.path.commonpath([out, os.path.abspath(resume)]) != out:
            raise UserError(f"--resume {resume}: a conversion resumes its own run, in --out {args.out}")
    cfg = train_config_from_args(args)
    cfg.validate()
    return cfg, resume


def run_convert(args) -> int:
    """`dha convert`: --method dha (dha.pipeline), a baseline or a plan replay, trained with --tokens."""
    import torch

    from .checkpoint import check_out, load, save
    from .convert import kv_summary

    if (args.method is None) == (args.plan is None) and args.method != "dha":
        raise UserError("give either --method (with --kv-budget) or --plan (--method dha takes both: its search is replaced by the plan)")
    tokens = getattr(args, "tokens", None) or 0
    check_convert_options_used(args, tokens)
    check_offload(args, tokens)
    apply_context(args, tokens)
    if args.method == "dha":  # the full DHA pipeline: search, fusion, merge, training, report
        return run_convert_dha(args)
    options = baseline_options(args)
    train_cfg, resume = _convert_training(args, tokens)
    if resume is None:
        check_out(args.out)
    # Training keeps float32 master weights (its autocast dtype is --train-dtype), as `dha train` does.
    dtype = torch.float32 if tokens > 0 else _inference_dtype(args)
    check_fits(args, baseline_work(args, train_cfg), dtype)
    loaded = load(args.source, dtype, device=_load_device(args))
    before = kv_summary(loaded.model)
    result = convert_baseline(args, loaded, options)
    if tokens > 0:
        train_converted(args, loaded, result, train_cfg, resume, tokens)
    else:
        save(args.out, result, overwrite=False)
    print_convert_result(args, result, before, kv_summary(result.model))
    return 0


def baseline_options(args):
    """A baseline's ConvertOptions, its flags checked before loading (None for a plan replay)."""
    from .baselines import ConvertOptions
    from .convert import NO_CALIBRATION, check_method

    if args.method is None:
        return None
    check_method(args.method)
    if args.kv_budget is None:
        raise UserError("--method needs --kv-budget (the fraction of the KV cache to keep, in (0, 1])")
    if not 0 < args.kv_budget <= 1:
        raise UserError(f"--kv-budget must be in (0, 1] (the fraction of the KV cache kept), got {args.kv_budget}")
    if args.method not in NO_CALIBRATION:
        _check_calibration_args(args)
    return ConvertOptions(seed=args.seed, calib_tokens=args.calib_tokens, block_size=args.calib_block_size,
                          metric=args.metric or ConvertOptions.metric, grouping=args.grouping, device=_compute_device(args))


def check_offload(args, tokens: int) -> None:
    """--offload runs the work one decoder layer at a time; refuse what needs the whole model on the device."""
    if not getattr(args, "offload", False):
        return
    conflicts = [(tokens > 0, "--tokens N trains the whole model on the device"),
                 (args.method == "prune", "--method prune runs whole-model forward passes on the device"),
                 (args.method == "dha" and args.search == "learned", "--search learned trains its gates on the whole model on the device"),
                 (args.method == "dha" and bool(args.retrieval or args.retrieval_heads),
                  "--retrieval and --retrieval-heads run passkey prompts through the whole model")]
    for hit, why in conflicts:
        if hit:
            raise UserError(f"--offload keeps the model in CPU memory, one layer at a time on the device, but {why}: drop one of them")


def training_work(args, cfg):
    """dha.memory.Training of a conversion that trains (`cfg` its TrainConfig), or None (no training)."""
    import os

    from .checkpoint import source_shape
    from .memory import Sizes, Training

    if cfg is None:
        return None
    teacher = Sizes.of(source_shape(args.teacher)[0]).total if getattr(args, "teacher", None) else 0
    shards = int(os.environ.get("WORLD_SIZE", "1")) if getattr(args, "fsdp", False) else 1
    return Training(micro_batch=cfg.micro_batch, block_size=cfg.block_size, shards=shards, teacher_parameters=teacher,
                    checkpointing=cfg.activation_checkpointing, distill=cfg.distill)


def baseline_work(args, train_cfg):
    """What a baseline conversion (or a plan replay) runs on the device, for the fit check."""
    from .convert import NO_CALIBRATION
    from .memory import Work

    calibrated = args.method is not None and args.method not in NO_CALIBRATION
    return Work(calib_tokens=args.calib_tokens if calibrated else 0, calib_block=args.calib_block_size,
                merge="aligned" if args.method == "svd" else "mean", all_layer_inputs=args.method == "prune",
                training=training_work(args, train_cfg))


def convert_baseline(args, loaded, options):
    """The converted Loaded: --plan replayed, or --method run on calibration blocks of --data."""
    from .compress import heads_for_budget, source_heads
    from .convert import NO_CALIBRATION, apply_plan, convert
    from .plan import Plan

    if options is None:
        return apply_plan(loaded, Plan.load(args.plan))
    heads_for_budget(*source_heads(loaded.model), args.kv_budget)  # budget errors before reading data
    calib = _calibration_blocks(args, loaded.tokenizer) if args.method not in NO_CALIBRATION else None
    return convert(loaded, args.method, args.kv_budget, calib, options)


def train_converted(args, loaded, result, train_cfg, resume, tokens: int) -> None:
    """Continued training of the converted model with the same loop as `dha train` (and as the dha
    method's stages), so methods compare at equal token budgets. The run directory is itself the
    converted checkpoint (plus log.jsonl, TensorBoard, run.json) and, with --save-every, holds the
    checkpoints that --resume continues from (the conversion is deterministic, so it is redone and
    the checkpoint's weights replace it)."""
    import torch

    from .baselines import ConvertOptions
    from .checkpoint import load
    from .continued import continue_training, source_identity

    if args.teacher is not None:
        teacher = load(args.teacher, torch.float32, tokenizer=False, device=args.device).model
    else:
        teacher = loaded.model if args.distill else None
    result.provenance = {**result.provenance, "method": result.plan.method, "train_tokens": tokens}
    run_info = {"source": source_identity(args.source), "method": result.plan.method,
                "kv_budget": args.kv_budget, "plan": source_identity(args.plan) if args.plan else None,
                "data": source_identity(args.data or "pydoc"), "text_field": args.text_field,
                "heldout_fraction": args.heldout_fraction, "calib_tokens": args.calib_tokens,
                "metric": args.metric or ConvertOptions.metric, "grouping": args.grouping,
                "teacher": source_identity(args.teacher) if args.teacher else None}
    continue_training(result, args.data, train_cfg, out_dir=args.out, teacher=teacher, resume=resume,
                      progress=not args.no_progress, text_field=args.text_field,
                      heldout_fraction=args.heldout_fraction, run_info=run_info)


def print_convert_result(args, result, before: dict, after: dict) -> None:
    summary = {
        "out": args.out, "method": result.plan.method, "kv_budget": result.plan.kv_budget,
        "kv_fraction": round(result.plan.kv_fraction(), 6),
        "key_heads": after["key_heads"], "value_heads": after["value_heads"],
        **{f"kv_bytes_per_token_{t}_{when}": kv[f"kv_bytes_per_token_{t}"]
           for t in ("fp32", "bf16") for when, kv in (("before", before), ("after", after))},
    }
    if not args.json:
        print(f"{'layer':>5}  {'K heads':>9}  {'V heads':>9}")
        for l, (kb, ka, vb, va) in enumerate(zip(before["key_heads"], after["key_heads"], before["value_heads"], after["value_heads"])):
            print(f"{l:>5}  {kb:>3} -> {ka:<3}  {vb:>3} -> {va:<3}")
        print(f"KV cache / token: {before['kv_bytes_per_token_fp32']:,} -> {after['kv_bytes_per_token_fp32']:,} bytes fp32 "
              f"({before['kv_bytes_per_token_bf16']:,} -> {after['kv_bytes_per_token_bf16']:,} bf16), "
              f"{result.plan.kv_fraction():.1%} kept ({result.plan.method}); wrote {args.out}")
    print(json.dumps(summary))


# ---- convert --method dha: the DHA pipeline (dha.pipeline) ------------------------------------------

def add_dha_options(p) -> None:
    """The DHA-specific options of `dha convert --method dha`."""
    from .fuse import FusionOptions
    from .compress import FREE_ANGLE, FREE_CONTEXT
    from .pipeline import DEFAULT_FUSION_FRACTION, MERGES

    g = p.add_argument_group("DHA (--method dha)")
    d = FusionOptions()
    g.add_argument("--search", default="cost", choices=["cost", "learned"],
                   help="allocation search: cost (DP on the merge costs, default) | learned (paper-faithful, trained)")
    g.add_argument("--sensitivity", action=argparse.BooleanOptionalAction, default=True,
                   help="cost search: costs as estimated LM-loss increases, from one backward pass over the calibration "
                        "tokens (default on; --no-sensitivity: relative merge residuals alone)")
    g.add_argument("--allocation", default="adaptive", choices=["adaptive", "uniform"],
                   help="cost search: adaptive (per-layer counts, default) | uniform (the same K and V counts in every layer; an ablation)")
    g.add_argument("--coupled-kv", action="store_true", help="cost search: keys and values share one grouping and count per layer (an ablation)")
    g.add_argument("--layout", default="free", choices=["free", "serving"],
                   help="free (any groups and counts, default) | serving: per layer one grouping for keys and values in equal "
                        "groups, so `dha export --format gguf` (llama.cpp deci) and nemotron-nas hold it without --pad")
    g.add_argument("--merge", default="aligned", choices=[*MERGES, "pca"],
                   help="what each group becomes, and what fusion moves toward: aligned (closed-form aligned merge, default) | "
                        "mean (the group mean; the old target) | pca (aligned with --merge-metric plain)")
    g.add_argument("--merge-metric", default=None, choices=["weighted", "plain"],
                   help="aligned merge: weighted (keys by the energy of their queries, values by W_O: default) | plain (PCA)")
    g.add_argument("--free-pairs", type=int, default=None, metavar="N",
                   help="aligned merge: merge the N lowest-frequency RoPE pairs of the keys as one position-free block "
                        "(full maps, a far better merge, exact only at angle 0; default: the pairs that turn by at most "
                        f"{FREE_ANGLE:g} rad over the model's positions, at least {FREE_CONTEXT} tokens, or --context; "
                        "0: every pair exact under RoPE). "
                        "Not with a fusion stage (docs/method.md, \"Position-free pairs\")")
    g.add_argument("--fusion-fraction", type=float, default=DEFAULT_FUSION_FRACTION,
                   help=f"share of --tokens spent fusing toward the merge, the rest after it (default {DEFAULT_FUSION_FRACTION:g}: "
                        "the aligned merge at once, every step trains the merged model; docs/method.md, \"The recipe\")")
    g.add_argument("--fusion-schedule", default=d.schedule, choices=["anneal", "ramp", "lagrangian"],
                   help=f"anneal (heads interpolated to their merge, plus the ramp) | ramp (progressive loss weight) | lagrangian (default {d.schedule})")
    g.add_argument("--fusion-weight", type=float, default=d.weight, help=f"ramp: final fusion-loss weight (default {d.weight:g})")
    g.add_argument("--fusion-ramp-end", type=float, default=d.ramp_end, help=f"fraction of the fusion steps at which the ramp ends (default {d.ramp_end:g})")
    g.add_argument("--fusion-eps", type=float, default=d.eps, help=f"lagrangian: target fusion distance (default {d.eps:g})")
    g.add_argument("--freeze-base", action="store_true", help="fusion: keep the source K/V projection weights fixed")
    g.add_argument("--freeze-maps", action="store_true", help="fusion: keep the merge maps at their closed form (not trained)")
    g.add_argument("--retrieval-heads", type=int, default=0, metavar="N",
                   help="keep the N key heads that attend most to a passkey needle (the source on 5 synthetic passkey "
                        "prompts) out of every merge: long-context retrieval runs through them (docs/longcontext.md)")
    g.add_argument("--protect-values", action="store_true", help="--retrieval-heads: keep their value heads unmerged too")
    g.add_argument("--retrieval", type=_int_list, default=None, metavar="LENGTHS",
                   help="the report adds passkey retrieval at these prompt lengths (10 prompts each: 5 depths x 2 keys, "
                        "synthetic haystack) for the source, the merge and the result, e.g. 2048,8192")
    # Training options (--tokens, --lr, --distill, ...) from dha.cli, unless the verb has them already.
    # The verb's --block-size (calibration) and --seed also serve training; its --dtype is the load
    # dtype, so the autocast dtype of training is --train-dtype.
    present = {a.dest for a in p._actions}
    if "tokens" not in present:
        add_training_options(p, tokens_required=False, skip=tuple(present))


def run_convert_dha(args) -> int:
    """`dha convert SOURCE --method dha ...`: run_dha on the CLI's options, write DIR, print a JSON line.

    Without --tokens the result is written at once (temp dir, then rename). With --tokens, --out is
    the run directory (dha.pipeline, "A run directory"): --resume OUT continues a killed run,
    under torchrun the training stages run data-parallel, and one run at a time holds OUT (a lock).
    """
    import torch

    from .atomic import atomic_dir
    from .checkpoint import load
    from .data import load_tokens
    from .pipeline import finish_run_dir, run_dha, write_outputs
    from .plan import Plan
    from .train import setup_distributed

    config, data = dha_config_from_args(args)
    tokens = config.tokens
    plan = Plan.load(args.plan) if args.plan is not None else None
    d = setup_distributed(config.train.device) if tokens else None
    identity = convert_run_identity(args, config, data)
    resuming = check_dha_out(args, identity)
    if d is not None and d.world > 1:
        torch.distributed.barrier()  # every rank has checked --out before rank 0 writes to it
    # float32 master weights for training (--train-dtype is autocast only); without training the
    # inference dtype (the checkpoint's own, bf16 on a GPU): calibration computes each layer in
    # float32 (dha.layerwise). Straight onto --device, or with --offload into CPU memory.
    dtype = torch.float32 if tokens else _inference_dtype(args)
    check_fits(args, dha_work(args, config, plan), dtype)
    loaded = load(args.source, dtype, device=_load_device(args))
    teacher = (load(args.teacher, torch.float32, tokenizer=False, device=args.device).model
               if getattr(args, "teacher", None) else None)
    splits = load_tokens(data, loaded.tokenizer, text_field=args.text_field, heldout_fraction=args.heldout_fraction)
    progress = not getattr(args, "no_progress", False)
    if not tokens:
        result = run_dha(loaded, splits, config, teacher=teacher, plan=plan, progress=progress)
        with atomic_dir(args.out) as tmp:
            files = write_outputs(tmp, result)
    else:
        with dha_run_dir(args.out, identity, resuming=resuming, main=d.main, recheck=lambda: check_dha_out(args, identity)):
            result = run_dha(loaded, splits, config, teacher=teacher, plan=plan, progress=progress, run_dir=args.out,
                             resume=resuming, run_info=identity["run"])
            files = finish_run_dir(args.out, result) if d.main else None
    if result is not None:
        print_dha_result(args, result.summary, files)
    return 0


def dha_work(args, config, plan):
    """What `convert --method dha` runs on the device, for the fit check: stage 1's calibration
    (with the loss gradients of the cost search), the aligned merges, the final table; or training."""
    from .memory import Work

    search = config.search
    return Work(calib_tokens=config.calib_tokens, calib_block=config.calib_block_size, batch=search.batch_size,
                gradients=plan is None and search.sensitivity and search.search == "cost", merge=config.merge,
                eval_tokens=config.final_eval_tokens, eval_block=config.final_eval_block_size,
                training=training_work(args, config.train) if config.tokens else None)


def dha_config_from_args(args):
    """The DHAConfig of `convert --method dha` and its --data, checked before anything is loaded."""
    import os

    from .data import DEFAULT_DATA, DataError
    from .fuse import FusionOptions
    from .pipeline import DHAConfig, split_tokens
    from .plan import Plan
    from .search import SearchOptions

    tokens = getattr(args, "tokens", None) or 0
    if args.distill is None:
        args.distill = tokens > 0  # distillation from the source is on by default for dha (docs/method.md)
    if args.metric is not None:
        raise UserError("--metric (cka | cosine) is a baselines option: the DHA search groups heads by their merge "
                        "residual (see --merge-metric)")
    if getattr(args, "fsdp", False):
        raise UserError("--fsdp is not supported with --method dha: under torchrun its training stages run data-parallel (DDP)")
    if not tokens:
        for flag, value in (("--resume", args.resume), ("--save-every", getattr(args, "save_every", 0))):
            if value:
                raise UserError(f"{flag} is about training: give --tokens N as well")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--method dha without --tokens has nothing to run in parallel: start it without torchrun")
    if args.resume is not None and os.path.abspath(args.resume) != os.path.abspath(args.out):
        raise UserError(f"--resume {args.resume}: a conversion resumes its own run: give --resume {args.out} (its --out)")
    check_convert_training_flags(args)  # --method dha always works on float32 weights
    if args.kv_budget is None and args.plan is not None:
        plan = Plan.load(args.plan)
        args.kv_budget = plan.kv_budget if plan.kv_budget is not None else plan.kv_fraction()
    if args.kv_budget is None or not 0 < args.kv_budget <= 1:
        raise UserError(f"--kv-budget must be in (0, 1] (the fraction of the KV cache kept), got {args.kv_budget}")
    data = args.data or DEFAULT_DATA
    if data != DEFAULT_DATA and not os.path.exists(data):
        raise DataError(f"data not found: {data}")
    if args.merge == "pca" and args.merge_metric == "weighted":
        raise UserError("--merge pca is the aligned merge with --merge-metric plain: drop one of them")
    metric = "plain" if args.merge == "pca" else (args.merge_metric or SearchOptions.metric)
    search_options = SearchOptions(search=args.search, metric=metric, sensitivity=args.sensitivity, allocation=args.allocation,
                                   decoupled=not args.coupled_kv, layout=args.layout, seed=args.seed, free_pairs=args.free_pairs,
                                   free_context=args.context,
                                   progress=not getattr(args, "no_progress", False))
    fusion = FusionOptions(schedule=args.fusion_schedule, weight=args.fusion_weight, ramp_end=args.fusion_ramp_end,
                           eps=args.fusion_eps, train_base=not args.freeze_base, learn_maps=not args.freeze_maps)
    flags = {"schedule": "--fusion-schedule", "weight": "--fusion-weight", "ramp_end": "--fusion-ramp-end",
             "eps": "--fusion-eps", "train_base": "--freeze-base", "learn_maps": "--freeze-maps"}
    changed = [flag for name, flag in flags.items() if getattr(fusion, name) != getattr(FusionOptions(), name)]
    if tokens and not args.fusion_fraction and changed:
        raise UserError(f"{', '.join(changed)} only shape(s) the fusion stage, which --fusion-fraction 0 (the default) "
                        "skips: add --fusion-fraction F (e.g. 0.3)")
    train_cfg = train_config_from_args(args, tokens)
    config = DHAConfig(kv_budget=args.kv_budget, tokens=tokens, fusion_fraction=args.fusion_fraction,
                       merge="aligned" if args.merge == "pca" else args.merge,
                       calib_tokens=args.calib_tokens, calib_block_size=args.calib_block_size,
                       search=search_options, fusion=fusion, train=train_cfg, device=_compute_device(args),
                       long_context=args.context or 0, retrieval=report_retrieval(args),
                       retrieval_heads=args.retrieval_heads, protect_values=args.protect_values)
    config.validate()
    split_tokens(tokens, config.fusion_fraction, train_cfg.batch_tokens, train_cfg.block_size)  # fail before loading
    return config, data


def report_retrieval(args):
    """The passkey grid of a DHA report (--retrieval LENGTHS): 5 depths, 2 keys each, synthetic
    haystack; refused past the source's positions. Also checks --retrieval-heads' company."""
    from .checkpoint import source_shape
    from .longctx import RetrievalOptions

    if (args.retrieval_heads or args.protect_values) and (args.plan is not None or args.search == "learned"):
        raise UserError("--retrieval-heads / --protect-values shape the cost search: not with --plan or --search learned")
    if args.protect_values and not args.retrieval_heads:
        raise UserError("--protect-values protects the value heads of --retrieval-heads N: give N too")
    if not args.retrieval:
        return None
    positions = source_shape(args.source)[0].max_position_embeddings
    if max(args.retrieval) > positions:
        raise UserError(f"--retrieval {max(args.retrieval)} is beyond the source's {positions} positions")
    options = RetrievalOptions(lengths=args.retrieval, per_depth=2)
    options.validate()
    return options


DHA_RUN_FORMAT = "dha-convert-run/1"
# Settings a resumed run may change: how it reports and checkpoints, and where it runs.
DHA_RESUMABLE = {"search.progress", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.device",
                 "train.micro_batch", "train.activation_checkpointing", "device"}
# Settings added after runs were first written: a run.json without one was made with its value here.
# (search.free_context: the pairs' rule was over 2,048 tokens; the new default, None, is another rule.)
DHA_ADDED = {"long_context": 0, "retrieval_heads": 0, "protect_values": False, "search.free_context": 2048, "search.protect": []}


def convert_run_identity(args, config, data: str) -> dict:
    """What a resumed `convert --method dha` run must share with the run it continues (its run.json)."""
    from dataclasses import asdict

    from .continued import source_identity

    flat = {}
    for part, value in asdict(config).items():
        for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            name = part if k is None else f"{part}.{k}"
            if name not in DHA_RESUMABLE:
                flat[name] = v
    run = {"source": source_identity(args.source), "data": source_identity(data), "text_field": args.text_field,
           "heldout_fraction": args.heldout_fraction, "plan": source_identity(args.plan) if args.plan else None,
           "teacher": source_identity(args.teacher) if getattr(args, "teacher", None) else None}
    return {"format": DHA_RUN_FORMAT, "run": run, "config": flat}


def check_dha_out(args, identity: dict) -> bool:
    """--out is new (or empty); or, with --resume, holds an unfinished run of these same settings.
    Returns whether there is a run to resume (a run killed before it wrote run.json starts anew)."""
    import os

    from .checkpoint import NATIVE_CONFIG, check_out
    from .train import read_run_json

    out = args.out
    run_path = os.path.join(out, "run.json")
    if args.resume is None or (os.path.isdir(out) and not [n for n in os.listdir(out) if n != ".lock"]):
        check_out(out)
        return False
    if not os.path.isfile(run_path):
        raise UserError(f"--resume {out}: no dha run there (no run.json)")
    old = read_run_json(run_path)
    if old.get("format") != DHA_RUN_FORMAT:
        raise UserError(f"--resume {out}: it holds a run of another verb, not of `convert --method dha`")
    diffs = sorted(k for part in ("run", "config") for k in set(old.get(part, {})) | set(identity[part])
                   if old.get(part, {}).get(k, DHA_ADDED.get(k) if part == "config" else None) != identity[part].get(k))
    if diffs:
        raise UserError(f"--resume {out}: that run was made with other settings (differs in {', '.join(diffs)})")
    if os.path.exists(os.path.join(out, NATIVE_CONFIG)):
        raise UserError(f"--resume {out}: that run has finished (it holds the converted model)")
    return True


@contextlib.contextmanager
def dha_run_dir(out: str, identity: dict, resuming: bool, main: bool, recheck):
    """Hold --out for the run (rank 0): lock it, check it again (`recheck()`, which must find what
    the first check found: another run may have started or finished meanwhile), write run.json,
    clear a killed writer's leftovers. A new run that fails with a UserError leaves no directory."""
    import os
    import shutil

    from .atomic import remove_leftovers, run_lock, write_json

    if not main:
        yield
        return
    created = not os.path.exists(out)
    with run_lock(out):
        if recheck() != resuming:
            raise UserError(f"output {out} was changed by another dha run meanwhile: check it, or use a new --out")
        try:
            if not resuming:
                write_json(os.path.join(out, "run.json"), identity)
            remove_leftovers(out)
            yield
        except UserError:
            if not resuming:
                shutil.rmtree(out, ignore_errors=True) if created else _empty_dir(out)
            raise


def _empty_dir(path: str) -> None:
    import os
    import shutil

    for name in os.listdir(path):
        p = os.path.join(path, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)


def print_dha_result(args, s: dict, files: list[str]) -> None:
    from .pipeline import format_number

    if not getattr(args, "json", False):
        for r in s["results"]:
            print(f"{r['model']:<34} KV {r['kv_bytes_per_token_bf16']:>8,} B/token bf16   ppl {format_number(r['heldout_ppl'], '.3f')}")
        print(f"wrote {args.out} ({', '.join(files)})")
    print(json.dumps({"out": args.out, "method": "dha", "kv_budget": s["kv_budget"], "kv_fraction": round(s["kv_fraction"], 6),
                      "tokens": s["tokens"], "merge": s["merge"], "fusion_tokens": s["fusion_tokens"], "continued_tokens": s["continued_tokens"],
                      "key_heads": s["key_heads"], "value_heads": s["value_heads"],
                      "source_ppl": s["results"][0]["heldout_ppl"], "ppl": s["results"][-1]["heldout_ppl"],
                      "kv_bytes_per_token_bf16_before": s["results"][0]["kv_bytes_per_token_bf16"],
                      "kv_bytes_per_token_bf16_after": s["results"][-1]["kv_bytes_per_token_bf16"]}))


# ---- train ---------------------------------------------------------------------------------------

def add_training_options(p: argparse.ArgumentParser, tokens_required: bool = True, skip: tuple[str, ...] = ()) -> None:
    """The TrainConfig options (dha.train), for `train` and for verbs that train afterwards (convert
    --tokens). `skip` names options (dest names) the verb already defines with the same meaning.
    Read them back with train_config_from_args(args)."""
    from .train import CHECKPOINTING, TrainConfig

    d = TrainConfig(tokens=1)
    options = [
        ("tokens", dict(type=int, required=tokens_required, default=None, help="training tokens in total (all processes)")),
        ("block_size", dict(type=int, default=d.block_size, help=f"tokens per training row (default {d.block_size})")),
        ("batch_tokens", dict(type=int, default=d.batch_tokens, help=f"global batch in tokens, over all processes and accumulation (default {d.batch_tokens})")),
        ("micro_batch", dict(type=int, default=d.micro_batch, help=f"rows per forward/backward on one process (default {d.micro_batch})")),
        ("lr", dict(type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")),
        ("min_lr_ratio", dict(type=float, default=d.min_lr_ratio, help=f"cosine ends at this fraction of --lr (default {d.min_lr_ratio})")),
        ("warmup_steps", dict(type=int, default=None, help="linear warm-up steps (default: 5%% of the steps)")),
        ("weight_decay", dict(type=float, default=d.weight_decay, help=f"AdamW weight decay on matrices (default {d.weight_decay})")),
        ("grad_clip", dict(type=float, default=d.grad_clip, help=f"max gradient norm, 0 = off (default {d.grad_clip})")),
        ("train_dtype", dict(default=d.dtype, choices=DTYPES, help="autocast dtype: auto (bfloat16 where the hardware has it natively, else float32) | bfloat16 | "
                                                    "float16 | float32 = off; weights stay float32 (default auto)")),
        ("eval_every", dict(type=int, default=d.eval_every, help=f"held-out evaluation every N steps, 0 = only at the end (default {d.eval_every})")),
        ("eval_tokens", dict(type=int, default=d.eval_tokens, help=f"held-out tokens per evaluation (default {d.eval_tokens})")),
        ("save_every", dict(type=int, default=d.save_every, help="checkpoint for --resume every N steps, 0 = none (default 0)")),
        ("seed", dict(type=int, default=d.seed, help="data order seed (default 0)")),
        ("distill", dict(action=argparse.BooleanOptionalAction, default=None,
                         help="add a KL loss to the teacher's logits (default: on for convert --method dha, off otherwise)")),
        ("teacher", dict(default=None, help="teacher model SOURCE for --distill (default: SOURCE as loaded, before training)")),
        ("distill_weight", dict(type=float, default=d.distill_weight, help=f"objective = (1-w) LM + w KD (default {d.distill_weight})")),
        ("distill_temperature", dict(type=float, default=d.distill_temperature, help=f"KD temperature (default {d.distill_temperature})")),
        ("fsdp", dict(action="store_true", help="under torchrun: shard with FSDP instead of DDP")),
        ("activation_checkpointing", dict(default=d.activation_checkpointing, choices=CHECKPOINTING,
                                          help="keep only each decoder block's input for the backward pass and recompute the rest "
                                               "there: far less activation memory for long rows, for about one more forward pass. "
                                               "auto: on when a micro batch fits the device's free memory only with it (default auto)")),
        ("resume", dict(default=None, help="continue the run in this directory (its newest checkpoint)")),
        ("no_progress", dict(action="store_true", help="no progress bar")),
    ]
    for dest, kw in options:
        if dest not in skip:
            p.add_argument("--" + dest.replace("_", "-"), dest=dest, **kw)


def train_config_from_args(args, tokens: int | None = None):
    """The TrainConfig of the training options a verb has (add_training_options), checked; `tokens`
    replaces --tokens (a conversion without training still gets a valid template)."""
    from dataclasses import fields

    from .train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
              if f.name not in ("tokens", "dtype") and getattr(args, f.name, None) is not None}
    values["distill"] = bool(getattr(args, "distill", False))
    if getattr(args, "train_dtype", None) is not None:
        values["dtype"] = args.train_dtype
    cfg = TrainConfig(tokens=args.tokens if tokens is None else max(1, tokens), **values)
    cfg.validate()
    return cfg


def add_train(sub) -> None:
    p = sub.add_parser("train", help="continued pre-training (AdamW, cosine schedule), alone or under torchrun",
                       description="Continue pre-training SOURCE on DATA and write the trained model, logs (log.jsonl, "
                                   "TensorBoard) and checkpoints to --out. Under `torchrun --nproc_per_node P -m dha train ...` "
                                   "the same command runs data-parallel (DDP, or FSDP with --fsdp). See docs/training.md.")
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--data", default=None, help="training text: .txt, .jsonl, .parquet, a saved dataset dir, or pydoc (default)")
    p.add_argument("--text-field", default="text", help="the text field/column of .jsonl, .parquet and datasets")
    p.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="share of documents held out for the evaluations (by a stable hash of each document; default 0.1)")
    p.add_argument("--out", default=None, help="run directory to write (default: the --resume directory)")
    add_json_option(p)
    add_training_options(p)
    old_spelling(p, "--dtype", "--train-dtype", "train_dtype")  # --dtype meant the autocast dtype here
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    import os

    import torch

    from .checkpoint import load
    from .continued import continue_training, source_identity

    if args.out is None:
        if args.resume is None:
            raise UserError("give --out DIR (or --resume DIR to continue a run there)")
        args.out = args.resume
    if args.teacher is not None and not args.distill:
        raise UserError("--teacher is only used with --distill")
    if not 0 <= args.heldout_fraction < 1:
        raise UserError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    cfg = train_config_from_args(args)
    loaded = load(args.source, torch.float32, device=args.device)  # master weights in float32; --train-dtype is the autocast dtype
    teacher = load(args.teacher, torch.float32, tokenizer=False, device=args.device).model if args.teacher is not None else None
    run_info = {"source": source_identity(args.source), "data": source_identity(args.data or "pydoc"),
                "text_field": args.text_field, "heldout_fraction": args.heldout_fraction,
                "teacher": source_identity(args.teacher) if args.teacher else None}
    try:
        result = continue_training(loaded, args.data, cfg, out_dir=args.out, teacher=teacher, resume=args.resume,
                                   progress=not args.no_progress, text_field=args.text_field,
                                   heldout_fraction=args.heldout_fraction, run_info=run_info)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 reports
        last = result.history[-1] if result.history else {}
        final_eval = result.evals[-1] if result.evals else {}
        summary = {"out": args.out, "steps": result.steps, "tokens": last.get("tokens"), "loss": last.get("loss"),
                   "heldout_loss": final_eval.get("heldout_loss"), "ppl": final_eval.get("ppl")}
        if not args.json:
            ppl = f", held-out ppl {summary['ppl']:.3f}" if summary["ppl"] is not None else ""
            print(f"trained {summary['steps']} steps ({summary['tokens']:,} tokens), last loss {summary['loss']:.4f}{ppl}; wrote {args.out}")
        print(json.dumps(summary))
    return 0


# ---- bench ---------------------------------------------------------------------------------------

def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill and decode tokens/s, KV-cache bytes and peak memory over a sweep of batch and context",
                       description="Time MODELs in one process, interleaved, over every batch size x context: prefill tokens/s, "
                                   "decode tokens/s (greedy, from the KV cache), KV-cache bytes and peak memory, as ratios to "
                                   "the first MODEL at the same point. Random token ids; the fastest of --repeats runs is kept. "
                                   "Prints a table, then one JSON line: {models: [{name, source, kind, dtype, parameters, "
                                   "key_heads_total, value_heads_total, kv_bytes_per_token, attention_paths}], results: [{model, "
                                   "batch_size, context, new_tokens, prefill_tokens_per_s, decode_tokens_per_s, prefill_s, "
                                   "decode_s, kv_cache_bytes, peak_memory_bytes, run_memory_bytes, peak_memory_kind, ratios: "
                                   "{prefill_tokens_per_s, decode_tokens_per_s, kv_cache_bytes}}], notes, options, device, "
                                   "threads, torch}. A point that cannot fit in memory is refused before anything runs.")
    p.add_argument("models", nargs="*", metavar="MODEL", help=SOURCE_HELP.replace("model:", "models:", 1))
    p.add_argument("--dtype", default=None, choices=DTYPES, help="float32 (default on the CPU) | bfloat16 (default on a GPU) | float16 | auto (each checkpoint's own)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 4], help="batch sizes, comma-separated (default 1,4)")
    p.add_argument("--contexts", type=_int_list, default=[128, 512], help="prompt tokens prefilled before decoding, comma-separated (default 128,512)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed after each prefill (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per model and point, the fastest kept (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--decode-only", action="store_true",
                   help="decode after a cache filled with random numbers instead of a (timed) prefill: decode costs "
                        "the same whatever the cache holds, and large points skip minutes of prefill")
    p.add_argument("--transformers", action="store_true",
                   help="also time transformers' own stock class (e.g. LlamaForCausalLM) on the same weights, for each "
                        "MODEL that exports to one (dha export, reload-checked, in a temporary directory)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of decode tokens/s against context here")
    p.add_argument("--out", default=None, metavar="DIR", help="write bench.json and decode_vs_context.png into this new directory")
    add_json_option(p)
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    import os

    import torch

    from .bench import BenchOptions, bench, print_bench, write_plot
    from .atomic import atomic_dir
    from .checkpoint import check_out, load, parse_dtype

    if args.new_tokens < 1 or args.repeats < 1:
        raise UserError("--new-tokens and --repeats must be at least 1")
    if args.plot is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise UserError(f"--plot {args.plot}: its directory does not exist")
    if args.out is not None:
        check_out(args.out)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype) if args.dtype is not None else _inference_dtype(args) or torch.float32
    models = [load(source, dtype, tokenizer=False, device=args.device) for source in (args.models or [None])]
    options = BenchOptions(batch_sizes=args.batch_sizes, contexts=args.contexts, new_tokens=args.new_tokens,
                           repeats=args.repeats, progress=sys.stderr.isatty(), decode_only=args.decode_only)
    report = bench(models, options, with_transformers=args.transformers)
    if args.plot is not None:
        write_plot(report, args.plot)
    if args.out is not None:
        with atomic_dir(args.out) as tmp:
            write_plot(report, os.path.join(tmp, "decode_vs_context.png"))
            with open(os.path.join(tmp, "bench.json"), "w") as f:
                json.dump(report, f, indent=1)
    if not args.json:
        print_bench(report)
    print(json.dumps(report))
    return 0


VERBS = [add_inspect, add_generate, add_eval, add_export, add_analyze, add_convert, add_train, add_bench]


def given_options(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dest names of the options written on the command line `argv` (not defaults)."""
    flags = {o: a.dest for a in p._actions for o in a.option_strings}
    return {flags[tok.split("=", 1)[0]] for tok in argv if tok.split("=", 1)[0] in flags}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dha",
        description="Shrink a transformer's KV cache by Decoupled-Head Attention (adaptive heads fusion), and measure what it costs.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    for verb_parser in sub.choices.values():
        add_device_option(verb_parser)
        verb_parser.set_defaults(parser=verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.given = given_options(args.parser, argv)
    try:
        from .device import resolve_device

        args.device = str(resolve_device(args.device))  # an unknown or absent device fails here, before any work
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"dha: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dha: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
