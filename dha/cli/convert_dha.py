"""`dha convert --method dha`: its options, the DHAConfig they make, and its resumable run directory."""

from __future__ import annotations

import argparse
import json
import os

from .. import rundir
from ..atomic import write_json
from ..errors import UserError
from ..options import DEFAULT_FUSION_FRACTION, FREE_ANGLE, FREE_CONTEXT, MERGES, FusionOptions
from .common import (
    add_training_options,
    check_convert_training_flags,
    check_fits,
    compute_device,
    int_list,
    load_device,
    load_dtype,
    train_config_from_args,
    training_work,
)


def add_dha_options(p) -> None:
    """The DHA-specific options of `dha convert --method dha`, in one --help group, then the training
    options the verb lacks."""
    g = p.add_argument_group("DHA (--method dha)")
    add_search_options(g)
    add_merge_options(g)
    add_fusion_options(g)
    add_retrieval_options(g)
    # Training options (--tokens, --lr, --distill, ...) from dha.cli, unless the verb has them already.
    # The verb's --seed also serves training; its --dtype is the load dtype, so the autocast dtype of
    # training is --train-dtype. --block-size is the training row only (--calib-block-size: calibration).
    present = {a.dest for a in p._actions}
    if "tokens" not in present:
        add_training_options(p, tokens_required=False, skip=tuple(present))


def add_search_options(g) -> None:
    """How the head groups and their counts per layer are chosen (dha.search)."""
    g.add_argument(
        "--search",
        default="cost",
        choices=["cost", "learned"],
        help="allocation search: cost (DP on the merge costs, default) | learned (paper-faithful, trained)",
    )
    g.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cost search: costs as estimated LM-loss increases, from one backward pass over the calibration "
        "tokens (default on; --no-sensitivity: relative merge residuals alone)",
    )
    g.add_argument(
        "--allocation",
        default="adaptive",
        choices=["adaptive", "uniform"],
        help="cost search: adaptive (per-layer counts, default) | "
        "uniform (the same K and V counts in every layer; an ablation)",
    )
    g.add_argument(
        "--coupled-kv",
        action="store_true",
        help="cost search: keys and values share one grouping and count per layer (an ablation)",
    )
    g.add_argument(
        "--layout",
        default="free",
        choices=["free", "serving"],
        help="free (any groups and counts, default) | serving: per layer one grouping for keys and values in equal "
        "groups, so `dha export --format gguf` (llama.cpp deci) and nemotron-nas hold it without --pad",
    )


def add_merge_options(g) -> None:
    """What each group of heads becomes (the merge), and which RoPE pairs merge position-free."""
    g.add_argument(
        "--merge",
        default="aligned",
        choices=[*MERGES, "pca"],
        help="what each group becomes, and what fusion moves toward: aligned (closed-form aligned merge, default) | "
        "mean (the group mean; the old target) | pca (aligned with --merge-metric plain)",
    )
    g.add_argument(
        "--merge-metric",
        default=None,
        choices=["weighted", "plain"],
        help="aligned merge: weighted (keys by the energy of their queries, values by W_O: default) | plain (PCA)",
    )
    g.add_argument(
        "--free-pairs",
        type=int,
        default=None,
        metavar="N",
        help="aligned merge: merge the N lowest-frequency RoPE pairs of the keys as one position-free block "
        "(full maps, a far better merge, exact only at angle 0; default: the pairs that turn by at most "
        f"{FREE_ANGLE:g} rad over the model's positions, at least {FREE_CONTEXT} tokens, or --context; "
        "0: every pair exact under RoPE). "
        'Not with a fusion stage (docs/method.md, "Position-free pairs")',
    )


def add_fusion_options(g) -> None:
    """The fusion stage: how much of --tokens it takes and how the heads move toward their merge."""
    d = FusionOptions()
    g.add_argument(
        "--fusion-fraction",
        type=float,
        default=DEFAULT_FUSION_FRACTION,
        help="share of --tokens spent fusing toward the merge, the rest after it "
        f"(default {DEFAULT_FUSION_FRACTION:g}: "
        'the aligned merge at once, every step trains the merged model; docs/method.md, "The recipe")',
    )
    g.add_argument(
        "--fusion-schedule",
        default=d.schedule,
        choices=["anneal", "ramp", "lagrangian"],
        help="anneal (heads interpolated to their merge, plus the ramp) | ramp (progressive loss weight) | "
        f"lagrangian (default {d.schedule})",
    )
    g.add_argument(
        "--fusion-weight", type=float, default=d.weight, help=f"ramp: final fusion-loss weight (default {d.weight:g})"
    )
    g.add_argument(
        "--fusion-ramp-end",
        type=float,
        default=d.ramp_end,
        help=f"fraction of the fusion steps at which the ramp ends (default {d.ramp_end:g})",
    )
    g.add_argument(
        "--fusion-eps", type=float, default=d.eps, help=f"lagrangian: target fusion distance (default {d.eps:g})"
    )
    g.add_argument("--freeze-base", action="store_true", help="fusion: keep the source K/V projection weights fixed")
    g.add_argument(
        "--freeze-maps", action="store_true", help="fusion: keep the merge maps at their closed form (not trained)"
    )


def add_retrieval_options(g) -> None:
    """Long-context retrieval: heads kept out of the merges, and the report's passkey measure."""
    g.add_argument(
        "--retrieval-heads",
        type=int,
        default=0,
        metavar="N",
        help="keep the N key heads that attend most to a passkey needle (the source on 5 synthetic passkey "
        "prompts) out of every merge: long-context retrieval runs through them (docs/longcontext.md)",
    )
    g.add_argument(
        "--protect-values", action="store_true", help="--retrieval-heads: keep their value heads unmerged too"
    )
    g.add_argument(
        "--retrieval-length",
        type=int,
        default=2048,
        metavar="L",
        help="--retrieval-heads: the passkey prompts that find them are L tokens (default 2048; the heads that "
        "reach far differ: measure them at the context you serve, e.g. 8192)",
    )
    g.add_argument(
        "--retrieval",
        type=int_list,
        default=None,
        metavar="LENGTHS",
        help="the report adds passkey retrieval at these prompt lengths (10 prompts each: 5 depths x 2 keys, "
        "synthetic haystack) for the source, the merge and the result, e.g. 2048,8192",
    )


def run_convert_dha(args) -> int:
    """`dha convert SOURCE --method dha ...`: run_dha on the CLI's options, write DIR, print a JSON line.

    Without --tokens the result is written at once (temp dir, then rename). With --tokens, --out is
    the run directory (dha.pipeline, "A run directory"): --resume OUT continues a killed run,
    under torchrun the training stages run data-parallel, and one run at a time holds OUT (a lock).
    """
    from functools import partial

    import torch

    from ..distributed import setup_distributed
    from ..pipeline import run_dha
    from ..plan import Plan

    config, data = dha_config_from_args(args)
    plan = Plan.load(args.plan) if args.plan is not None else None
    d = setup_distributed(config.train.device) if config.tokens else None
    identity = convert_run_identity(args, config, data)
    resuming = check_dha_out(args.out, identity, args.resume is not None)
    if d is not None and d.world > 1:
        torch.distributed.barrier()  # every rank has checked --out before rank 0 writes to it
    loaded, teacher, splits = load_dha_inputs(args, config, plan, data)
    progress = not getattr(args, "no_progress", False)
    run = partial(run_dha, loaded, splits, config, teacher=teacher, plan=plan, progress=progress)
    if not config.tokens:
        result = run()
        files = write_dha_out(args.out, result)
    else:
        result, files = run_in_run_dir(args, run, d.main, identity, resuming)
    if result is not None:
        print_dha_result(args, result.summary, files)
    return 0


def load_dha_inputs(args, config, plan, data: str):
    """After the fit check: the model, the --teacher model (or None) and the text splits of --data.

    The model is loaded in float32 master weights for training (--train-dtype is autocast only);
    without training in the inference dtype (the checkpoint's own, bf16 on a GPU): calibration
    computes each layer in float32 (dha.layerwise). Straight onto --device, or with --offload into
    CPU memory."""
    import torch

    from ..checkpoint import load
    from ..data import load_tokens

    dtype = torch.float32 if config.tokens else load_dtype(args)
    check_fits(args, dha_work(args, config, plan), dtype)
    loaded = load(args.source, dtype, device=load_device(args))
    teacher = (
        load(args.teacher, torch.float32, tokenizer=False, device=args.device).model
        if getattr(args, "teacher", None)
        else None
    )
    splits = load_tokens(data, loaded.tokenizer, text_field=args.text_field, heldout_fraction=args.heldout_fraction)
    return loaded, teacher, splits


def write_dha_out(out: str, result) -> list[str]:
    """Without --tokens: write the result to --out at once (a temp dir, then renamed); its files."""
    from ..atomic import atomic_dir
    from ..pipeline import write_outputs

    with atomic_dir(out) as tmp:
        return write_outputs(tmp, result)


def run_in_run_dir(args, run, main: bool, identity: dict, resuming: bool):
    """With --tokens: `run` (run_dha) in the run directory --out, holding its lock. The main process
    writes run.json first and the outputs last. Returns (result, files; None off the main process)."""
    from ..pipeline import finish_run_dir

    with rundir.hold(args.out, main=main):
        if main:  # again under the lock: another run may have started or finished meanwhile
            if check_dha_out(args.out, identity, args.resume is not None) != resuming:
                raise UserError(
                    f"output {args.out} was changed by another dha run meanwhile: check it, or use a new --out"
                )
            write_json(os.path.join(args.out, rundir.RUN_JSON), identity)
        result = run(run_dir=args.out, resume=resuming, run_info=identity["run"])
        files = finish_run_dir(args.out, result) if main else None
    return result, files


def dha_config_from_args(args):
    """The DHAConfig of `convert --method dha` and its --data, checked before anything is loaded."""
    from ..pipeline import DHAConfig, split_tokens

    tokens = getattr(args, "tokens", None) or 0
    data = check_dha_args(args, tokens)
    search = search_options_from_args(args)
    fusion = fusion_options_from_args(args, tokens)
    train_cfg = train_config_from_args(args, tokens)
    config = DHAConfig(
        kv_budget=args.kv_budget,
        tokens=tokens,
        fusion_fraction=args.fusion_fraction,
        merge="aligned" if args.merge == "pca" else args.merge,
        calib_tokens=args.calib_tokens,
        calib_block_size=args.calib_block_size,
        search=search,
        fusion=fusion,
        train=train_cfg,
        device=compute_device(args),
        long_context=args.context or 0,
        retrieval=report_retrieval(args),
        retrieval_heads=args.retrieval_heads,
        protect_values=args.protect_values,
        retrieval_length=args.retrieval_length,
    )
    config.validate()
    split_tokens(tokens, config.fusion_fraction, train_cfg.batch_tokens, train_cfg.block_size)  # fail before loading
    return config, data


def check_dha_args(args, tokens: int) -> str:
    """The checks of `convert --method dha`'s options that come before its configuration is built,
    in this order. Fills in two defaults on `args`: --distill (on when it trains) and --kv-budget
    (--plan's). Returns the --data to read."""
    from ..data import check_data

    if args.distill is None:
        args.distill = tokens > 0  # distillation from the source is on by default for dha (docs/method.md)
    if getattr(args, "fsdp", False):
        raise UserError(
            "--fsdp is not supported with --method dha: under torchrun its training stages run data-parallel (DDP)"
        )
    if not tokens and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--method dha without --tokens has nothing to run in parallel: start it without torchrun")
    rundir.resume_path(args.out, args.resume)
    check_convert_training_flags(args)  # --method dha always works on float32 weights
    args.kv_budget = kv_budget_from_args(args)
    data = check_data(args.data)
    if args.merge == "pca" and args.merge_metric == "weighted":
        raise UserError("--merge pca is the aligned merge with --merge-metric plain: drop one of them")
    return data


def kv_budget_from_args(args) -> float:
    """--kv-budget, or else --plan's budget (its KV fraction where it names none); in (0, 1]."""
    from ..plan import Plan

    budget = args.kv_budget
    if budget is None and args.plan is not None:
        plan = Plan.load(args.plan)
        budget = plan.kv_budget if plan.kv_budget is not None else plan.kv_fraction()
    if budget is None or not 0 < budget <= 1:
        raise UserError(f"--kv-budget must be in (0, 1] (the fraction of the KV cache kept), got {budget}")
    return budget


def search_options_from_args(args):
    """The SearchOptions (dha.search) of the search and merge options; --merge pca is the aligned merge
    with the plain metric."""
    from ..search import SearchOptions

    metric = "plain" if args.merge == "pca" else (args.merge_metric or SearchOptions.metric)
    return SearchOptions(
        search=args.search,
        metric=metric,
        sensitivity=args.sensitivity,
        allocation=args.allocation,
        decoupled=not args.coupled_kv,
        layout=args.layout,
        seed=args.seed,
        free_pairs=args.free_pairs,
        free_context=args.context,
        progress=not getattr(args, "no_progress", False),
    )


# The FusionOptions field each fusion flag sets.
FUSION_FLAGS = {
    "schedule": "--fusion-schedule",
    "weight": "--fusion-weight",
    "ramp_end": "--fusion-ramp-end",
    "eps": "--fusion-eps",
    "train_base": "--freeze-base",
    "learn_maps": "--freeze-maps",
}


def fusion_options_from_args(args, tokens: int) -> FusionOptions:
    """The FusionOptions of the fusion flags; refused when they change a fusion stage that does not run
    (training with --fusion-fraction 0)."""
    fusion = FusionOptions(
        schedule=args.fusion_schedule,
        weight=args.fusion_weight,
        ramp_end=args.fusion_ramp_end,
        eps=args.fusion_eps,
        train_base=not args.freeze_base,
        learn_maps=not args.freeze_maps,
    )
    default = FusionOptions()
    changed = [flag for name, flag in FUSION_FLAGS.items() if getattr(fusion, name) != getattr(default, name)]
    if tokens and not args.fusion_fraction and changed:
        raise UserError(
            f"{', '.join(changed)} only shape(s) the fusion stage, which --fusion-fraction 0 (the default) "
            "skips: add --fusion-fraction F (e.g. 0.3)"
        )
    return fusion


def report_retrieval(args):
    """The passkey grid of a DHA report (--retrieval LENGTHS): 5 depths, 2 keys each, synthetic
    haystack; refused past the source's positions. Also checks --retrieval-heads' company."""
    from ..checkpoint import source_shape
    from ..longctx import RetrievalOptions

    if (args.retrieval_heads or args.protect_values) and args.search == "learned":
        raise UserError("--retrieval-heads / --protect-values shape the cost search: not with --search learned")
    if args.protect_values and not args.retrieval_heads:
        raise UserError("--protect-values protects the value heads of --retrieval-heads N: give N too")
    lengths = {"--retrieval": max(args.retrieval)} if args.retrieval else {}  # prompts the source must hold
    if "retrieval_length" in getattr(args, "given", set()):
        if not args.retrieval_heads:
            raise UserError("--retrieval-length sets the prompts that find --retrieval-heads N: give N too")
        lengths["--retrieval-length"] = args.retrieval_length
    if lengths:
        positions = source_shape(args.source)[0].max_position_embeddings
        for flag, n in lengths.items():
            if n > positions:
                raise UserError(f"{flag} {n} is beyond the source's {positions} positions")
    if not args.retrieval:
        return None
    options = RetrievalOptions(lengths=args.retrieval, per_depth=2)
    options.validate()
    return options


def dha_work(args, config, plan):
    """What `convert --method dha` runs on the device, for the fit check: stage 1's calibration
    (with the loss gradients of the cost search), the aligned merges, the final table; or training."""
    from ..memory import Work

    search = config.search
    return Work(
        calib_tokens=config.calib_tokens,
        calib_block=config.calib_block_size,
        batch=search.batch_size,
        gradients=plan is None and search.needs_gradients,
        merge=config.merge,
        eval_tokens=config.final_eval_tokens,
        eval_block=config.final_eval_block_size,
        training=training_work(args, config.train) if config.tokens else None,
    )


DHA_RUN_FORMAT = "dha-convert-run/1"
# Settings a resumed run may change: how it reports and checkpoints, and where it runs.
DHA_RESUMABLE = {
    f"config.{name}"
    for name in (
        "search.progress",
        "train.eval_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.device",
        "train.micro_batch",
        "train.activation_checkpointing",
        "device",
    )
}
# Settings added after runs were first written: a run.json without one was made with its value here.
# (search.free_context: the pairs' rule was over 2,048 tokens; the new default, None, is another rule.)
DHA_ADDED = {
    f"config.{name}": value
    for name, value in {
        "long_context": 0,
        "retrieval_heads": 0,
        "protect_values": False,
        "retrieval_length": 2048,
        "search.free_context": 2048,
        "search.protect": [],
        "fusion.target": "aligned",
    }.items()
}  # fusion.target: removed, it was always "aligned"


def convert_run_identity(args, config, data: str) -> dict:
    """What a resumed `convert --method dha` run must share with the run it continues (its run.json)."""
    from dataclasses import asdict

    from ..continued import source_identity

    flat = {}
    for part, value in asdict(config).items():
        for k, v in value.items() if isinstance(value, dict) else [(None, value)]:
            name = part if k is None else f"{part}.{k}"
            if f"config.{name}" not in DHA_RESUMABLE:
                flat[name] = v
    run = {
        "source": source_identity(args.source),
        "data": source_identity(data),
        "text_field": args.text_field,
        "heldout_fraction": args.heldout_fraction,
        "plan": source_identity(args.plan) if args.plan else None,
        "teacher": source_identity(args.teacher) if getattr(args, "teacher", None) else None,
    }
    return {"format": DHA_RUN_FORMAT, "run": run, "config": flat}


def check_dha_out(out: str, identity: dict, resume: bool) -> bool:
    """--out is new (or empty); or, with --resume, holds an unfinished run of these same settings
    (dha.rundir.check). Returns whether there is a run to resume."""
    from ..checkpoint import NATIVE_CONFIG

    return rundir.check(out, identity, resume, resumable=DHA_RESUMABLE, added=DHA_ADDED, finished=NATIVE_CONFIG)


def print_dha_result(args, s: dict, files: list[str]) -> None:
    from ..report import format_number

    if not getattr(args, "json", False):
        for r in s["results"]:
            print(
                f"{r['model']:<34} KV {r['kv_bytes_per_token_bf16']:>8,} B/token bf16   "
                f"ppl {format_number(r['heldout_ppl'], '.3f')}"
            )
        print(f"wrote {args.out} ({', '.join(files)})")
    print(
        json.dumps(
            {
                "out": args.out,
                "method": "dha",
                "kv_budget": s["kv_budget"],
                "kv_fraction": round(s["kv_fraction"], 6),
                "tokens": s["tokens"],
                "merge": s["merge"],
                "fusion_tokens": s["fusion_tokens"],
                "continued_tokens": s["continued_tokens"],
                "key_heads": s["key_heads"],
                "value_heads": s["value_heads"],
                "source_ppl": s["results"][0]["heldout_ppl"],
                "ppl": s["results"][-1]["heldout_ppl"],
                "kv_bytes_per_token_bf16_before": s["results"][0]["kv_bytes_per_token_bf16"],
                "kv_bytes_per_token_bf16_after": s["results"][-1]["kv_bytes_per_token_bf16"],
            }
        )
    )
