"""What several verbs share: SOURCE, --dtype, --device and --json; calibration text; the training
options (TrainConfig); the fit check before a model is loaded."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..options import CHECKPOINTING, TrainConfig

SOURCE_HELP = (
    "model: a dha checkpoint dir, a Hugging Face model dir, a .gguf file, or a hub id (default: smollm2-135m, built in)"
)


DEVICE_HELP = "where the work runs: auto (CUDA when a GPU is present, else the CPU; default) | cpu | cuda | cuda:N"


DTYPE_HELP = (
    "float32 | bfloat16 | float16 | auto (default): the checkpoint's own, except bfloat16 on a GPU "
    "for inference and calibration (generate, eval, analyze, convert without --tokens; not with --offload)"
)


FIT_CHECK = (
    "Before any work, the device memory it needs is estimated from SOURCE's config and compared with what "
    "--device has free: too little, or on a GPU room only for one layer at a time without --offload, is "
    "refused with the numbers (docs/scaling.md, the fit check)."
)


OFFLOAD_HELP = (
    "keep the model in CPU memory (memory-mapped, in the checkpoint's own dtype unless --dtype) and bring one "
    "decoder layer at a time to --device, in float32, for the calibration sweeps{merges}; the result is written "
    "from the CPU. For a model larger than the GPU's memory: the GPU then holds one layer and its activations"
)


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


def add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def load_dtype(args):
    """The load dtype of a verb that runs the model for inference or calibration (--dtype, dha.device),
    on the device it is loaded onto (`load_device`)."""
    import torch

    from ..checkpoint import parse_dtype
    from ..device import inference_dtype

    return inference_dtype(parse_dtype(args.dtype), torch.device(load_device(args)))


def load_device(args) -> str:
    """Where a verb loads its model: --device, or the CPU with --offload (its work still runs on
    --device, one decoder layer at a time)."""
    return "cpu" if getattr(args, "offload", False) else args.device


def compute_device(args) -> str | None:
    """The device the layer-by-layer work is sent to with --offload; None: the model's own (--device)."""
    return args.device if getattr(args, "offload", False) else None


def check_fits(args, work, dtype) -> None:
    """The fit check (dha.memory) of `work` on --device for SOURCE loaded in `dtype` (None: its own),
    from SOURCE's config and weights headers: before the model is loaded."""
    import torch

    from ..checkpoint import DEFAULT_SOURCE, source_shape
    from ..memory import check_fit, estimate

    cfg, own = source_shape(args.source)
    check_fit(
        torch.device(args.device),
        estimate(cfg, dtype or own, work),
        getattr(args, "offload", False),
        args.source or DEFAULT_SOURCE,
    )


def add_calibration(p: argparse.ArgumentParser, default_tokens: int) -> None:
    p.add_argument(
        "--data",
        default="pydoc",
        help="calibration text (its TRAIN split is used): .txt, .jsonl, .parquet, a saved `datasets` directory, "
        "or 'pydoc' (default)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field / parquet or dataset column holding the text")
    p.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="share of documents held out (never used for calibration)"
    )
    p.add_argument("--calib-tokens", type=int, default=default_tokens, help="calibration tokens, from the train split")
    p.add_argument("--calib-block-size", type=int, default=256, help="tokens per calibration block (default 256)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for token subsampling (convert: also the search and the training data order)",
    )
    p.add_argument(
        "--metric",
        default=None,
        choices=("cka", "cosine"),
        help="head similarity of analyze, gqa-similar and svd --grouping similar: cka (linear CKA, default) | cosine",
    )


def check_calibration_args(args) -> None:
    """Fail on bad options before any model is loaded."""
    from ..data import check_data

    check_data(args.data)
    if args.calib_tokens < 1:
        raise UserError("--calib-tokens must be at least 1")
    if args.calib_block_size < 1:
        raise UserError("--calib-block-size must be at least 1")


def calibration_text_blocks(args, tokenizer):
    """(n, block_size) token blocks from the TRAIN split, about --calib-tokens tokens in all."""
    from ..data import calibration_blocks, load_tokens

    if tokenizer is None:
        raise UserError("this model has no tokenizer, so calibration text cannot be tokenised")
    splits = load_tokens(args.data, tokenizer, text_field=args.text_field, heldout_fraction=args.heldout_fraction)
    return calibration_blocks(splits.train, args.calib_tokens, args.calib_block_size)


# The defaults the training options show: TrainConfig's own (dha.options, no torch).
TRAIN_DEFAULTS = TrainConfig(tokens=1)


def _number(dest: str, type_, what: str) -> tuple[str, dict]:
    """A numeric training option whose default is TrainConfig's, said in its help."""
    default = getattr(TRAIN_DEFAULTS, dest)
    return dest, dict(type=type_, default=default, help=f"{what} (default {default})")


# The training options (dest name, add_argument keywords), in --help order; the flag is the dest
# name with dashes. --tokens is required or not by the verb (add_training_options).
TRAINING_OPTIONS: tuple[tuple[str, dict], ...] = (
    ("tokens", dict(type=int, default=None, help="training tokens in total (all processes)")),
    _number("block_size", int, "tokens per training row"),
    _number("batch_tokens", int, "global batch in tokens, over all processes and accumulation"),
    _number("micro_batch", int, "rows per forward/backward on one process"),
    _number("lr", float, "peak learning rate"),
    _number("min_lr_ratio", float, "cosine ends at this fraction of --lr"),
    ("warmup_steps", dict(type=int, default=None, help="linear warm-up steps (default: 5%% of the steps)")),
    _number("weight_decay", float, "AdamW weight decay on matrices"),
    _number("grad_clip", float, "max gradient norm, 0 = off"),
    (
        "train_dtype",
        dict(
            default=TRAIN_DEFAULTS.dtype,
            choices=DTYPES,
            help="autocast dtype: auto (bfloat16 where the hardware has it natively, else float32) | bfloat16 | "
            "float16 | float32 = off; weights stay float32 (default auto)",
        ),
    ),
    _number("eval_every", int, "held-out evaluation every N steps, 0 = only at the end"),
    _number("eval_tokens", int, "held-out tokens per evaluation"),
    _number("save_every", int, "checkpoint for --resume every N steps, 0 = none"),
    _number("seed", int, "data order seed"),
    (
        "distill",
        dict(
            action=argparse.BooleanOptionalAction,
            default=None,
            help="add a KL loss to the teacher's logits (default: on for convert --method dha, off otherwise)",
        ),
    ),
    (
        "teacher",
        dict(default=None, help="teacher model SOURCE for --distill (default: SOURCE as loaded, before training)"),
    ),
    _number("distill_weight", float, "objective = (1-w) LM + w KD"),
    _number("distill_temperature", float, "KD temperature"),
    (
        "attention_distill",
        dict(
            type=float,
            default=TRAIN_DEFAULTS.attention_distill,
            help="weight a of an attention distillation term: the KL between the teacher's and the student's "
            "attention, per query head, of each row's last --attention-queries positions over the whole row; "
            "it keeps what long-context retrieval reads. Needs --distill; 0 = off (default 0)",
        ),
    ),
    _number("attention_queries", int, "query positions per row read by --attention-distill"),
    (
        "far_attention_distill",
        dict(
            type=float,
            default=TRAIN_DEFAULTS.far_attention_distill,
            help="weight of a far attention term: the same KL over the keys at least --far-distance positions "
            "back only, renormalized, so that which far keys a head reads counts whatever little mass they "
            "get. Needs --distill; 0 = off (default 0)",
        ),
    ),
    _number("far_distance", int, "positions back from which --far-attention-distill counts a key"),
    ("fsdp", dict(action="store_true", help="under torchrun: shard with FSDP instead of DDP")),
    (
        "activation_checkpointing",
        dict(
            default=TRAIN_DEFAULTS.activation_checkpointing,
            choices=CHECKPOINTING,
            help="keep only each decoder block's input for the backward pass and recompute the rest "
            "there: far less activation memory for long rows, for about one more forward pass. "
            "auto: on when a micro batch fits the device's free memory only with it (default auto)",
        ),
    ),
    (
        "position_span",
        dict(
            type=int,
            default=TRAIN_DEFAULTS.position_span,
            help="spread each training row's positions over N (PoSE: the row is cut in two and the second "
            "part's positions skip ahead), so rows of --block-size tokens teach attention over distances up "
            "to N; at most the model's positions, 0 = off (default 0)",
        ),
    ),
    (
        "recall_tokens",
        dict(
            type=int,
            default=TRAIN_DEFAULTS.recall_tokens,
            help="make the last N tokens of each training row repeat N tokens of its first part (before the "
            "skip, with --position-span), so that predicting them takes keys up to the row's whole span back; "
            "under half of --block-size, 0 = off (default 0)",
        ),
    ),
    ("resume", dict(default=None, help="continue the run in this directory (its newest checkpoint)")),
    ("no_progress", dict(action="store_true", help="no progress bar")),
)


def add_training_options(p: argparse.ArgumentParser, tokens_required: bool = True, skip: tuple[str, ...] = ()) -> None:
    """The TrainConfig options (TRAINING_OPTIONS), for `train` and for verbs that train afterwards
    (convert --tokens). `skip` names options (dest names) the verb already defines with the same
    meaning. Read them back with train_config_from_args(args)."""
    for dest, kw in TRAINING_OPTIONS:
        if dest in skip:
            continue
        if dest == "tokens":
            kw = dict(kw, required=tokens_required)
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, **kw)


def train_config_from_args(args, tokens: int | None = None):
    """The TrainConfig of the training options a verb has (add_training_options), checked; `tokens`
    replaces --tokens (a conversion without training still gets a valid template)."""
    from dataclasses import fields

    values = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if f.name not in ("tokens", "dtype") and getattr(args, f.name, None) is not None
    }
    values["distill"] = bool(getattr(args, "distill", False))
    if getattr(args, "train_dtype", None) is not None:
        values["dtype"] = args.train_dtype
    cfg = TrainConfig(tokens=args.tokens if tokens is None else max(1, tokens), **values)
    cfg.validate()
    if cfg.position_span and getattr(args, "resume", None) is None:  # before the model loads
        from ..checkpoint import source_shape
        from ..rows import check_position_span

        check_position_span(cfg.position_span, source_shape(args.source)[0], cfg.block_size)
    return cfg


def check_convert_training_flags(args) -> None:
    """What both convert paths (baselines, dha) require of the training flags: float32 master weights,
    and --teacher only with --distill."""
    if args.dtype not in ("auto", "float32"):
        raise UserError(
            f"--dtype {args.dtype}: --method dha, and any conversion with --tokens, keeps float32 weights; "
            "set the autocast dtype of its training with --train-dtype"
        )
    if getattr(args, "teacher", None) is not None and not getattr(args, "distill", False):
        raise UserError("--teacher is only used with --distill")


def training_work(args, cfg):
    """dha.memory.Training of a conversion that trains (`cfg` its TrainConfig), or None (no training)."""
    import os

    from ..checkpoint import source_shape
    from ..memory import Sizes, Training

    if cfg is None:
        return None
    teacher = Sizes.of(source_shape(args.teacher)[0]).total if getattr(args, "teacher", None) else 0
    shards = int(os.environ.get("WORLD_SIZE", "1")) if getattr(args, "fsdp", False) else 1
    return Training(
        micro_batch=cfg.micro_batch,
        block_size=cfg.block_size,
        shards=shards,
        teacher_parameters=teacher,
        checkpointing=cfg.activation_checkpointing,
        distill=cfg.distill,
        attention_queries=cfg.tapped_queries,
        far_attention=bool(cfg.far),
        chunked_head=chunked_head(args),
    )


def chunked_head(args) -> bool:
    """Whether training under this command makes the loss's logits a chunk at a time when its blocks
    are checkpointed (dha.train.head_chunk): one process, and no fusion stage."""
    import os

    return os.environ.get("WORLD_SIZE", "1") == "1" and not getattr(args, "fusion_fraction", 0)
