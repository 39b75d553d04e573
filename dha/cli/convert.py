"""`dha convert`: a baseline method or a plan replay (trained with --tokens N), and the checks every
conversion shares; `--method dha` goes on in dha.cli.convert_dha."""

from __future__ import annotations

import json

from .. import rundir
from ..errors import UserError
from ..options import TrainConfig
from .common import (
    FIT_CHECK,
    OFFLOAD_HELP,
    add_calibration,
    add_json_option,
    add_source,
    calibration_text_blocks,
    check_calibration_args,
    check_convert_training_flags,
    check_fits,
    chunked_head,
    compute_device,
    load_device,
    load_dtype,
    train_config_from_args,
    training_work,
)
from .convert_dha import add_dha_options, run_convert_dha


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="shrink the KV cache by a method at a KV budget, or by a saved plan",
        description="Convert SOURCE to fewer key/value heads and write a native checkpoint (with plan.json) "
        "to --out. Methods: dha (Decoupled-Head Attention: search, fusion, merge, continued "
        "training, report; docs/method.md), and the baselines gqa (contiguous mean-pooling), "
        "gqa-similar (similar heads mean-pooled), svd (low-rank from calibration activations), "
        "prune (keep the most important heads); or --plan PLAN.json to replay a plan with mean "
        "pooling. With --tokens N the converted model is trained on N tokens of --data. " + FIT_CHECK,
    )
    add_source(p)
    p.add_argument(
        "--method",
        metavar="METHOD",
        help="conversion method, a name of the registry dha.convert.METHODS: dha | gqa | gqa-similar | svd | prune",
    )
    p.add_argument("--kv-budget", type=float, help="fraction of the source's KV cache to keep, in (0, 1]")
    p.add_argument(
        "--plan",
        help="apply this plan.json (mean pooling) instead of a method; with --method dha, "
        "use its groups instead of searching (aligned merge, fusion, training)",
    )
    p.add_argument(
        "--grouping",
        default="contiguous",
        choices=("contiguous", "similar"),
        help="svd only: contiguous (Yu et al., default) | similar",
    )
    add_calibration(p, default_tokens=4096)
    p.add_argument(
        "--out",
        required=True,
        help="checkpoint directory to write (must not exist or be empty; "
        "with --tokens, a training run directory that --resume continues)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help=OFFLOAD_HELP.format(
            merges=" and the closed-form merges (dha and svd: aligned merges; gqa-similar: "
            "head similarity; dha: the report's perplexity too)"
        )
        + ". Without training only (no --tokens N), and not with --method prune or --search learned, which "
        "run the whole model",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="the context the conversion keeps: calibration blocks and training (and distillation) rows of N "
        "tokens (with --block-size W < N: blocks and rows of W tokens whose positions spread over N, PoSE); "
        "dha: position-free key pairs chosen for N tokens (--free-pairs), and the report's perplexity by "
        "position over N-token windows (default: 256-token blocks and rows, pairs for the source's "
        "positions; docs/longcontext.md)",
    )
    add_json_option(p)
    add_dha_options(p)  # --method dha: search, fusion, training options (dha.pipeline)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    """`dha convert`: --method dha (dha.pipeline), a baseline or a plan replay, trained with --tokens."""
    import torch

    from ..atomic import check_out
    from ..checkpoint import load, save, source_shape
    from ..convert import ALIGNED_METHODS, check_method
    from ..families import refuse_merge_of_qk_norm
    from ..summary import kv_summary

    if args.method is not None:
        check_method(args.method)  # the registry's names, before any other check
    if (args.method is None) == (args.plan is None) and args.method != "dha":
        raise UserError(
            "give either --method (with --kv-budget) or --plan "
            "(--method dha takes both: its search is replaced by the plan)"
        )
    tokens = getattr(args, "tokens", None) or 0
    check_convert_options_used(args, tokens)
    refuse_merge_of_qk_norm(  # before any model is loaded
        source_shape(args.source)[0],
        fusion=bool(args.method == "dha" and tokens and getattr(args, "fusion_fraction", None)),
        mean=args.method not in ALIGNED_METHODS or getattr(args, "merge", None) == "mean",
    )
    check_offload(args, tokens)
    apply_context(args, tokens)
    if args.method == "dha":  # the full DHA pipeline: search, fusion, merge, training, report
        return run_convert_dha(args)
    options = baseline_options(args)
    train_cfg, resume = _convert_training(args, tokens)
    if resume is None:
        check_out(args.out)
    # Training keeps float32 master weights (its autocast dtype is --train-dtype), as `dha train` does.
    dtype = torch.float32 if tokens > 0 else load_dtype(args)
    check_fits(args, baseline_work(args, train_cfg), dtype)
    loaded = load(args.source, dtype, device=load_device(args))
    before = kv_summary(loaded.model.config)
    result = convert_baseline(args, loaded, options)
    if tokens > 0:
        train_converted(args, loaded, result, train_cfg, resume, tokens)
    else:
        save(args.out, result, overwrite=False)
    print_convert_result(args, result, before, kv_summary(result.model.config))
    return 0


DHA_OPTIONS = (
    "retrieval",
    "retrieval_heads",
    "protect_values",
    "retrieval_length",
    "search",
    "sensitivity",
    "allocation",
    "coupled_kv",
    "layout",
    "merge",
    "merge_metric",
    "free_pairs",
    "fusion_fraction",
    "fusion_schedule",
    "fusion_weight",
    "fusion_ramp_end",
    "fusion_eps",
    "freeze_base",
    "freeze_maps",
)


SEARCH_OPTIONS = (
    "search",
    "sensitivity",
    "allocation",
    "coupled_kv",
    "layout",
    "retrieval_heads",
    "protect_values",
    "retrieval_length",
)
CALIBRATION_OPTIONS = ("data", "text_field", "heldout_fraction", "calib_tokens", "calib_block_size")


def check_convert_options_used(args, tokens: int) -> None:
    """Refuse an option the conversion asked for would not use (it would be silently ignored)."""
    from dataclasses import fields

    method = args.method or "plan"
    given = getattr(args, "given", set())
    unused = {}  # dest -> why, in the order they are reported
    if not tokens:
        training = {f.name for f in fields(TrainConfig)} | {"train_dtype", "teacher", "resume"}
        unused.update(
            {
                d: "is about training: give --tokens N as well"
                for d in sorted(training - {"tokens", "seed", "dtype", "device"})
            }
        )
        unused["block_size"] = (
            "is the training row length: give --tokens N as well (calibration blocks: --calib-block-size)"
        )
        if method in ("gqa", "plan"):
            unused.update(
                {
                    d: f"is about calibration text, which {'gqa' if method == 'gqa' else 'a plan replay'} does not read"
                    for d in CALIBRATION_OPTIONS
                }
            )
    if method != "dha":
        unused.update({d: "is a --method dha option" for d in DHA_OPTIONS})
    elif args.plan is not None:
        unused.update(
            {
                d: "shapes the search, which --plan replaces (the plan fixes the groups and the layout)"
                for d in SEARCH_OPTIONS
            }
        )
    if method != "svd":
        unused["grouping"] = "is an svd option"
    if method == "dha":
        unused["metric"] = (
            "(cka | cosine) is a baselines option: "
            "the DHA search groups heads by their merge residual (see --merge-metric)"
        )
    elif method not in ("gqa-similar", "svd") or (method == "svd" and args.grouping != "similar"):
        unused["metric"] = "is used by gqa-similar and svd --grouping similar only"
    for dest, why in unused.items():
        if dest in given:
            raise UserError(f"--{dest.replace('_', '-')} {why}")


def apply_context(args, tokens: int) -> None:
    """--context N: refused past the source's positions or when a training row cannot fit even
    with activation checkpointing (before any work); else it sets the calibration blocks, the
    training rows and the batch (at least one row) to N tokens. With --block-size W shorter than N,
    blocks and rows are W tokens and the rows' positions spread over N (--position-span N: PoSE)."""
    n = args.context
    if n is None:
        return
    from ..checkpoint import source_shape

    if not tokens and (args.method == "gqa" or args.method is None):
        raise UserError(
            "--context sets calibration blocks and training rows: gqa and a plan replay read neither without --tokens"
        )
    cfg, _ = source_shape(args.source)
    if n < 2:
        raise UserError(f"--context must be at least 2 tokens, got {n}")
    if n > cfg.max_position_embeddings:
        raise UserError(f"--context {n} is beyond the source's {cfg.max_position_embeddings} positions")
    for dest in ("calib_block_size", "position_span"):
        if dest in args.given:
            raise UserError(
                f"--context sets --{dest.replace('_', '-')}: give --context N alone, or with --block-size W "
                "for blocks and rows of W tokens whose positions spread over N"
            )
    rows = n
    if "block_size" in args.given:  # (without --tokens it was refused as unused)
        if args.block_size >= n:
            raise UserError(
                f"--block-size {args.block_size} is not shorter than --context {n}: give --context alone "
                f"for rows of {n} tokens"
            )
        rows, args.position_span = args.block_size, n
    args.calib_block_size = rows
    args.calib_tokens = max(args.calib_tokens, rows)
    if tokens:
        args.block_size, args.batch_tokens = rows, max(args.batch_tokens, rows)
        if "micro_batch" not in args.given:
            args.micro_batch = 1  # long rows: one at a time, gradients accumulated
        check_context_fits(args, cfg, rows)


def check_context_fits(args, cfg, rows: int) -> None:
    """Refuse --context when one micro batch of training rows (`rows` tokens) cannot train on
    --device even with activation checkpointing (dha.memory.training_fit: float32 weights,
    gradients, AdamW, activations)."""
    import torch

    from ..memory import GiB, training_fit

    distill = args.distill if args.distill is not None else args.method == "dha"
    device, chunked = torch.device(args.device), chunked_head(args)
    fit = training_fit(cfg, torch.float32, rows, args.micro_batch, device, distill=distill, chunked_head=chunked)
    if not fit.fits_with:
        raise UserError(
            f"--context {args.context}: training rows of {rows} tokens ({args.micro_batch} per micro batch) need "
            f"about {fit.with_checkpointing / GiB:.1f} GiB even with activation checkpointing; "
            f"{args.device} has {fit.free / GiB:.1f} GiB free: lower --micro-batch, or train on shorter rows "
            "whose positions still span the context (--block-size W)"
        )


def check_offload(args, tokens: int) -> None:
    """--offload runs the work one decoder layer at a time; refuse what needs the whole model on the device."""
    if not getattr(args, "offload", False):
        return
    conflicts = [
        (tokens > 0, "--tokens N trains the whole model on the device"),
        (args.method == "prune", "--method prune runs whole-model forward passes on the device"),
        (
            args.method == "dha" and args.search == "learned",
            "--search learned trains its gates on the whole model on the device",
        ),
        (
            args.method == "dha" and bool(args.retrieval or args.retrieval_heads),
            "--retrieval and --retrieval-heads run passkey prompts through the whole model",
        ),
    ]
    for hit, why in conflicts:
        if hit:
            raise UserError(
                "--offload keeps the model in CPU memory, one layer at a time on the device, "
                f"but {why}: drop one of them"
            )


def baseline_options(args):
    """A baseline's ConvertOptions, its flags checked before loading (None for a plan replay)."""
    from ..baselines import ConvertOptions
    from ..convert import NO_CALIBRATION

    if args.method is None:
        return None
    if args.kv_budget is None:
        raise UserError("--method needs --kv-budget (the fraction of the KV cache to keep, in (0, 1])")
    if not 0 < args.kv_budget <= 1:
        raise UserError(f"--kv-budget must be in (0, 1] (the fraction of the KV cache kept), got {args.kv_budget}")
    if args.method not in NO_CALIBRATION:
        check_calibration_args(args)
    return ConvertOptions(
        seed=args.seed,
        calib_tokens=args.calib_tokens,
        block_size=args.calib_block_size,
        metric=args.metric or ConvertOptions.metric,
        grouping=args.grouping,
        device=compute_device(args),
    )


def _convert_training(args, tokens: int):
    """A baseline conversion's training settings, checked before loading: (TrainConfig or None, the run
    to resume or None)."""
    if tokens <= 0:  # the training flags were refused without --tokens (check_convert_options_used)
        return None, None
    check_convert_training_flags(args)
    rundir.resume_path(args.out, args.resume)
    cfg = train_config_from_args(args)
    cfg.validate()
    return cfg, args.resume


def baseline_work(args, train_cfg):
    """What a baseline conversion (or a plan replay) runs on the device, for the fit check."""
    from ..convert import NO_CALIBRATION
    from ..memory import Work

    calibrated = args.method is not None and args.method not in NO_CALIBRATION
    return Work(
        calib_tokens=args.calib_tokens if calibrated else 0,
        calib_block=args.calib_block_size,
        merge="aligned" if args.method == "svd" else "mean",
        all_layer_inputs=args.method == "prune",
        training=training_work(args, train_cfg),
    )


def convert_baseline(args, loaded, options):
    """The converted Loaded: --plan replayed, or --method run on calibration blocks of --data."""
    from ..budget import heads_for_budget, source_heads
    from ..convert import NO_CALIBRATION, apply_plan, convert
    from ..plan import Plan

    if options is None:
        return apply_plan(loaded, Plan.load(args.plan))
    heads_for_budget(*source_heads(loaded.model), args.kv_budget)  # budget errors before reading data
    calib = calibration_text_blocks(args, loaded.tokenizer) if args.method not in NO_CALIBRATION else None
    return convert(loaded, args.method, args.kv_budget, calib, options)


def train_converted(args, loaded, result, train_cfg, resume, tokens: int) -> None:
    """Continued training of the converted model with the same loop as `dha train` (and as the dha
    method's stages), so methods compare at equal token budgets. The run directory is itself the
    converted checkpoint (plus log.jsonl, TensorBoard, run.json) and, with --save-every, holds the
    checkpoints that --resume continues from (the conversion is deterministic, so it is redone and
    the checkpoint's weights replace it)."""
    import torch

    from ..baselines import ConvertOptions
    from ..checkpoint import load
    from ..continued import continue_training, source_identity

    if args.teacher is not None:
        teacher = load(args.teacher, torch.float32, tokenizer=False, device=args.device).model
    else:
        teacher = loaded.model if args.distill else None
    result.provenance = {**result.provenance, "method": result.plan.method, "train_tokens": tokens}
    run_info = {
        "source": source_identity(args.source),
        "method": result.plan.method,
        "kv_budget": args.kv_budget,
        "plan": source_identity(args.plan) if args.plan else None,
        "data": source_identity(args.data or "pydoc"),
        "text_field": args.text_field,
        "heldout_fraction": args.heldout_fraction,
        "calib_tokens": args.calib_tokens,
        "metric": args.metric or ConvertOptions.metric,
        "grouping": args.grouping,
        "teacher": source_identity(args.teacher) if args.teacher else None,
    }
    with rundir.hold(args.out):
        continue_training(
            result,
            args.data,
            train_cfg,
            out_dir=args.out,
            teacher=teacher,
            resume=resume,
            progress=not args.no_progress,
            text_field=args.text_field,
            heldout_fraction=args.heldout_fraction,
            run_info=run_info,
        )


def print_convert_result(args, result, before: dict, after: dict) -> None:
    summary = {
        "out": args.out,
        "method": result.plan.method,
        "kv_budget": result.plan.kv_budget,
        "kv_fraction": round(result.plan.kv_fraction(), 6),
        "key_heads": after["key_heads"],
        "value_heads": after["value_heads"],
        **{
            f"kv_bytes_per_token_{t}_{when}": kv[f"kv_bytes_per_token_{t}"]
            for t in ("fp32", "bf16")
            for when, kv in (("before", before), ("after", after))
        },
    }
    if not args.json:
        print(f"{'layer':>5}  {'K heads':>9}  {'V heads':>9}")
        for l, (kb, ka, vb, va) in enumerate(
            zip(before["key_heads"], after["key_heads"], before["value_heads"], after["value_heads"])
        ):
            print(f"{l:>5}  {kb:>3} -> {ka:<3}  {vb:>3} -> {va:<3}")
        print(
            f"KV cache / token: {before['kv_bytes_per_token_fp32']:,} -> "
            f"{after['kv_bytes_per_token_fp32']:,} bytes fp32 "
            f"({before['kv_bytes_per_token_bf16']:,} -> {after['kv_bytes_per_token_bf16']:,} bf16), "
            f"{result.plan.kv_fraction():.1%} kept ({result.plan.method}); wrote {args.out}"
        )
    print(json.dumps(summary))
