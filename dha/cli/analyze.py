"""`dha analyze`: how similar the key heads and the value heads of each layer are."""

from __future__ import annotations

import json

from .common import (
    FIT_CHECK,
    OFFLOAD_HELP,
    add_calibration,
    add_json_option,
    add_source,
    calibration_text_blocks,
    check_calibration_args,
    check_fits,
    compute_device,
    load_device,
    load_dtype,
    old_spelling,
)


def add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="similarity of key heads and of value heads per layer: heatmaps, clusters, redundancy",
        description="Measure how similar the key heads and the value heads of every layer are on calibration "
        "tokens (cosine and linear CKA of pre-RoPE head outputs), cluster them for every group "
        "count, and write analysis.json, per-layer heatmaps and a redundancy chart to --out. " + FIT_CHECK,
    )
    add_source(p)
    add_calibration(p, default_tokens=4096)
    old_spelling(p, "--block-size", "--calib-block-size", "calib_block_size", int)
    add_json_option(p)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="redundancy: the fewest groups keeping every within-group similarity >= this (default 0.5)",
    )
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--offload", action="store_true", help=OFFLOAD_HELP.format(merges=""))
    p.set_defaults(func=run_analyze)


def run_analyze(args) -> int:
    from ..analyze import analyze, summary_table, write_report
    from ..atomic import atomic_dir, check_out
    from ..checkpoint import load
    from ..memory import Work

    check_calibration_args(args)
    check_out(args.out)
    check_fits(args, Work(calib_tokens=args.calib_tokens, calib_block=args.calib_block_size), load_dtype(args))
    loaded = load(args.source, load_dtype(args), device=load_device(args))
    calib = calibration_text_blocks(args, loaded.tokenizer)
    args.metric = args.metric or "cka"  # analyze's own default, named here for the JSON line
    result = analyze(
        loaded.model,
        calib,
        metric=args.metric,
        threshold=args.threshold,
        max_tokens=args.calib_tokens,
        seed=args.seed,
        device=compute_device(args),
    )
    result["source"] = loaded.source
    result["data"] = args.data
    with atomic_dir(args.out) as tmp:
        files = write_report(result, tmp)
    if not args.json:
        print(summary_table(result))
    print(
        json.dumps(
            {
                "out": args.out,
                "files": len(files),
                "calibration_tokens": result["calibration_tokens"],
                "metric": args.metric,
                "threshold": args.threshold,
                "key_groups_needed": [e["keys"]["groups_needed"] for e in result["layers"]],
                "value_groups_needed": [e["values"]["groups_needed"] for e in result["layers"]],
            }
        )
    )
    return 0
