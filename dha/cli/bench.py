"""`dha bench`: prefill and decode speed, KV-cache bytes and peak memory over batch sizes and contexts."""

from __future__ import annotations

import json
import sys

from ..errors import UserError
from .common import DTYPES, SOURCE_HELP, add_json_option, int_list, load_dtype


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="prefill and decode tokens/s, KV-cache bytes and peak memory over a sweep of batch and context",
        description="Time MODELs in one process, interleaved, over every batch size x context: prefill tokens/s, "
        "decode tokens/s (greedy, from the KV cache), KV-cache bytes and peak memory, as ratios to "
        "the first MODEL at the same point. Random token ids; the fastest of --repeats runs is kept. "
        "Prints a table, then one JSON line: {models: [{name, source, kind, dtype, parameters, "
        "key_heads_total, value_heads_total, kv_bytes_per_token, attention_paths}], results: [{model, "
        "batch_size, context, new_tokens, prefill_tokens_per_s, decode_tokens_per_s, prefill_s, "
        "decode_s, kv_cache_bytes, peak_memory_bytes, run_memory_bytes, peak_memory_kind, ratios: "
        "{prefill_tokens_per_s, decode_tokens_per_s, kv_cache_bytes}}], notes, options, device, "
        "threads, torch}. A point that cannot fit in memory is refused before anything runs.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help=SOURCE_HELP.replace("model:", "models:", 1))
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="float32 (default on the CPU) | bfloat16 (default on a GPU) | float16 | auto (each checkpoint's own)",
    )
    p.add_argument("--batch-sizes", type=int_list, default=[1, 4], help="batch sizes, comma-separated (default 1,4)")
    p.add_argument(
        "--contexts",
        type=int_list,
        default=[128, 512],
        help="prompt tokens prefilled before decoding, comma-separated (default 128,512)",
    )
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed after each prefill (default 16)")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed runs per model and point, the fastest kept (default 2)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="decode after a cache filled with random numbers instead of a (timed) prefill: decode costs "
        "the same whatever the cache holds, and large points skip minutes of prefill",
    )
    p.add_argument(
        "--transformers",
        action="store_true",
        help="also time transformers' own stock class (e.g. LlamaForCausalLM) on the same weights, for each "
        "MODEL that exports to one (dha export, reload-checked, in a temporary directory)",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of decode tokens/s against context here")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write bench.json and decode_vs_context.png into this new directory"
    )
    add_json_option(p)
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    import os

    import torch

    from ..atomic import atomic_dir, check_out
    from ..bench import BenchOptions, bench, print_bench, write_plot
    from ..checkpoint import load, parse_dtype

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
    dtype = parse_dtype(args.dtype) if args.dtype is not None else load_dtype(args) or torch.float32
    models = [load(source, dtype, tokenizer=False, device=args.device) for source in (args.models or [None])]
    options = BenchOptions(
        batch_sizes=args.batch_sizes,
        contexts=args.contexts,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        progress=sys.stderr.isatty(),
        decode_only=args.decode_only,
    )
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
