"""`dha train`: continued pre-training of SOURCE on DATA, alone or under torchrun."""

from __future__ import annotations

import json

from .. import rundir
from ..errors import UserError
from .common import SOURCE_HELP, add_json_option, add_training_options, old_spelling, train_config_from_args


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="continued pre-training (AdamW, cosine schedule), alone or under torchrun",
        description="Continue pre-training SOURCE on DATA and write the trained model, logs (log.jsonl, "
        "TensorBoard) and checkpoints to --out. Under `torchrun --nproc_per_node P -m dha train ...` "
        "the same command runs data-parallel (DDP, or FSDP with --fsdp). See docs/training.md.",
    )
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument(
        "--data", default=None, help="training text: .txt, .jsonl, .parquet, a saved dataset dir, or pydoc (default)"
    )
    p.add_argument("--text-field", default="text", help="the text field/column of .jsonl, .parquet and datasets")
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="share of documents held out for the evaluations (by a stable hash of each document; default 0.1)",
    )
    p.add_argument("--out", default=None, help="run directory to write (default: the --resume directory)")
    add_json_option(p)
    add_training_options(p)
    old_spelling(p, "--dtype", "--train-dtype", "train_dtype")  # --dtype meant the autocast dtype here
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    """`dha train SOURCE ...`: train in the run directory --out, then (the main process) print a summary."""
    import os

    import torch

    from ..checkpoint import load

    check_train_args(args)
    cfg = train_config_from_args(args)
    loaded = load(args.source, torch.float32, device=args.device)  # master weights; --train-dtype is autocast
    teacher = (
        load(args.teacher, torch.float32, tokenizer=False, device=args.device).model
        if args.teacher is not None
        else None
    )
    result = train_in_run_dir(args, loaded, teacher, cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 reports
        print_train_summary(args, result)
    return 0


def check_train_args(args) -> None:
    """Fail on bad options before any model is loaded; --out defaults to the --resume directory."""
    args.out = rundir.resume_path(args.out, args.resume)
    if args.out is None:
        raise UserError("give --out DIR (or --resume DIR to continue a run there)")
    if args.teacher is not None and not args.distill:
        raise UserError("--teacher is only used with --distill")
    if not 0 <= args.heldout_fraction < 1:
        raise UserError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")


def train_run_info(args) -> dict:
    """What a resumed run must share with the run it continues: its source, data and teacher."""
    from ..continued import source_identity

    return {
        "source": source_identity(args.source),
        "data": source_identity(args.data or "pydoc"),
        "text_field": args.text_field,
        "heldout_fraction": args.heldout_fraction,
        "teacher": source_identity(args.teacher) if args.teacher else None,
    }


def train_in_run_dir(args, loaded, teacher, cfg):
    """continue_training in --out, holding its lock; under torchrun the process group ends with it."""
    from ..continued import continue_training

    run_info = train_run_info(args)
    try:
        with rundir.hold(args.out):
            return continue_training(
                loaded,
                args.data,
                cfg,
                out_dir=args.out,
                teacher=teacher,
                resume=args.resume,
                progress=not args.no_progress,
                text_field=args.text_field,
                heldout_fraction=args.heldout_fraction,
                run_info=run_info,
            )
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def print_train_summary(args, result) -> None:
    """The last training step and held-out evaluation: a line (unless --json), then the JSON line."""
    last = result.history[-1] if result.history else {}
    final_eval = result.evals[-1] if result.evals else {}
    summary = {
        "out": args.out,
        "steps": result.steps,
        "tokens": last.get("tokens"),
        "loss": last.get("loss"),
        "heldout_loss": final_eval.get("heldout_loss"),
        "ppl": final_eval.get("ppl"),
    }
    if not args.json:
        ppl = f", held-out ppl {summary['ppl']:.3f}" if summary["ppl"] is not None else ""
        print(
            f"trained {summary['steps']} steps ({summary['tokens']:,} tokens), "
            f"last loss {summary['loss']:.4f}{ppl}; wrote {args.out}"
        )
    print(json.dumps(summary))
