"""DHA end to end: search -> fusion training -> merge -> continued training -> evaluation -> report.

The three stages of the DHA paper (Chen et al. 2024, section 3), on the user's data and token budget:

1. Search (`dha.search.search`): groups of similar key heads and value heads and how many of each
   every layer keeps, exactly on the KV budget, from calibration blocks of the TRAIN split.
2. Fusion (`dha.fuse`; by default none, see DEFAULT_FUSION_FRACTION): for `fusion_fraction` of
   the training tokens, the model keeps all its heads; each group's heads become learned linear
   combinations (identity at step 0) pushed together by a progressive fusion loss, trained with
   the LM loss (+ distillation to the source).
3. Merge each group to one head (exact: at the end of fusion the copies are their merge), then
   continued training for the rest of the tokens (`dha.train`).

With tokens = 0 the plan is merged without training. `merge` says what the groups become:
"aligned" (default) the closed-form aligned merge of `dha.merge` (shared head + reading maps
folded into W_Q and W_O), which fusion moves toward and which is also the training-free result;
"mean" the group mean (the old target, for comparison). The output directory is a native
checkpoint (with plan.json) plus a report:

    report.md        what was done, a table against the source, the plots below
    summary.json     the same numbers as one JSON document
    log.jsonl        every training step and evaluation of both stages ({"stage": "fusion" | "continued"})
    allocation.png   key and value heads kept per layer (dha.plots)
    loss.png         training loss (and fusion distance) against tokens
    perplexity.png   held-out perplexity against tokens, the source as a line

A run directory (`dha convert --tokens N`: the --out directory itself) also keeps the state that
`--resume` continues, written as the run goes (see StageRun): stage1.pt (plan and merges), and
fusion/ and continued/, each stage's training run with its live log.jsonl, TensorBoard events
(`tensorboard --logdir OUT`) and, with --save-every, its checkpoints. The finished outputs are
moved in last (dha_config.json last of all), then stage1.pt and the checkpoints are removed.

`dha convert SOURCE --method dha --kv-budget B --data D --tokens N --out DIR` runs this.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from .atomic import files_into
from .budget import source_heads
from .calibration import calibrate, free_pairs_for
from .checkpoint import NATIVE_CONFIG, Loaded, write_native
from .continued import training_heldout
from .data import blocks, calibration_blocks
from .distributed import setup_distributed
from .errors import UserError
from .evaluate import perplexity
from .families import refuse_merge_of_qk_norm
from .fuse import FusedModel, FusionSchedule, merge
from .longctx import RetrievalOptions, needle_attention, position_report, retrieval, retrieval_key_heads
from .merge import aligned_merge, closed_form_merges
from .options import DEFAULT_FUSION_FRACTION, MERGES, FusionOptions, TrainConfig
from .plan import Plan
from .plots import plot_allocation, plot_loss, plot_perplexity
from .report import report_markdown
from .resume import atomic_torch_save, checkpoints_in
from .search import SearchOptions, check_calib_blocks, search
from .summary import kv_summary
from .train import eval_rows, train
from .transforms import merge_groups


@dataclass
class DHAConfig:
    """Everything `run_dha` needs besides the model and the data."""

    kv_budget: float  # fraction of the source's KV cache kept, in (0, 1]
    tokens: int = 0  # training tokens in all (fusion + continued); 0: search and mean-merge only
    fusion_fraction: float = DEFAULT_FUSION_FRACTION  # share of `tokens` spent in the fusion stage
    calib_tokens: int = 4096  # calibration tokens for the search (train split)
    calib_block_size: int = 256  # tokens per calibration block
    final_eval_tokens: int = 16384  # held-out tokens scored for the final table (source and result)
    final_eval_block_size: int = 512  # perplexity window of the final table
    search: object = None  # dha.search.SearchOptions (None: its defaults)
    fusion: FusionOptions = field(default_factory=FusionOptions)
    merge: str = "aligned"  # what each group becomes (fusion's target): "aligned" (closed form, dha.merge) | "mean"
    train: object = None  # dha.options.TrainConfig template (its `tokens` is set per stage; None: defaults)
    # Where stage 1 (calibration, merges) and the final table run, one decoder layer at a time, the
    # model left where it is (None: the model's own device). `dha convert --offload`: --device, the
    # model in CPU memory. Training runs the whole model on its device, so only with tokens 0.
    device: str | None = None
    long_context: int = 0  # the report's perplexity by position over windows of this many tokens (0: none)
    retrieval: object = None  # dha.longctx.RetrievalOptions: the report's passkey grid (None: none)
    retrieval_heads: int = 0  # key heads that attend most to a passkey needle, kept unmerged (dha.longctx)
    protect_values: bool = False  # ... and the value heads of the same index
    retrieval_length: int = 2048  # tokens of the passkey prompts that find them (capped at the source's positions)

    def validate(self) -> None:
        if not 0.0 <= self.fusion_fraction <= 1.0:
            raise UserError(f"--fusion-fraction must be in [0, 1], got {self.fusion_fraction}")
        if self.tokens < 0:
            raise UserError(f"--tokens must be >= 0, got {self.tokens}")
        if self.merge not in MERGES:
            raise UserError(f"--merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        if self.retrieval_heads < 0:
            raise UserError(f"--retrieval-heads must be >= 0, got {self.retrieval_heads}")
        if self.retrieval_heads:
            RetrievalOptions(lengths=[self.retrieval_length]).validate()  # the passkey prompts' own rules
        if self.calib_tokens < 1 or self.calib_block_size < 1:
            raise UserError("calibration tokens and block size must be positive")
        if self.device is not None and self.tokens:
            raise UserError(
                "a DHA run with training runs the whole model on its device: a separate compute device is for tokens 0"
            )
        if self.tokens and self.fusion_fraction and getattr(self.search, "free_pairs", None):
            raise UserError(
                "--free-pairs needs the merge at once (--fusion-fraction 0): a fused model applies the position-free "
                "maps before RoPE and the merged one after, so the fusion stage would not end at the merge"
            )


@dataclass
class StageTokens:
    fusion: int  # tokens of the fusion stage (0: none, groups are mean-merged at once)
    continued: int  # tokens of the continued training after the merge
    step_tokens: int  # tokens per optimizer step


def split_tokens(tokens: int, fusion_fraction: float, batch_tokens: int, block_size: int) -> StageTokens:
    """Split the token budget between the stages in whole optimizer steps.

    The fusion stage gets round(fusion_fraction * steps) steps, the continued training the rest
    (tokens beyond the last whole step are not used). UserError if a stage that the fraction asks
    for (fusion when > 0, continued when < 1) would get no step."""
    rows = max(1, batch_tokens // block_size)
    step = rows * block_size
    if tokens == 0:
        return StageTokens(0, 0, step)
    steps = tokens // step
    fusion_steps = int(round(fusion_fraction * steps))
    if 0 < fusion_fraction < 1 and steps >= 2:
        fusion_steps = min(max(fusion_steps, 1), steps - 1)  # both stages asked for: at least one step each
    continued_steps = steps - fusion_steps
    for name, n, wanted in (
        ("fusion", fusion_steps, fusion_fraction > 0),
        ("continued training", continued_steps, fusion_fraction < 1),
    ):
        if wanted and n < 1:
            raise UserError(
                f"--tokens {tokens} is {steps} optimizer step(s) of {step} tokens ({rows} blocks of {block_size}), "
                f"which leaves the {name} stage no step at --fusion-fraction {fusion_fraction}: "
                "raise --tokens, lower --batch-tokens, or change --fusion-fraction"
            )
    return StageTokens(fusion_steps * step, continued_steps * step, step)


def heldout_blocks(heldout: torch.Tensor, max_tokens: int, block_size: int) -> torch.Tensor | None:
    """Windows of the held-out stream for the final table (None when it holds under 2 tokens)."""
    if heldout.numel() < 2:
        return None
    block_size = max(2, min(block_size, heldout.numel()))
    return blocks(heldout, block_size, max_blocks=max(1, max_tokens // block_size))


def table_row(name: str, model, windows, device=None) -> dict:
    """One row of the final table: KV heads and bytes per token, held-out perplexity on `windows`."""
    kv = kv_summary(model.config)
    was_training = model.training
    model.eval()
    ppl = perplexity(model, windows, batch_size=4, progress=False, device=device) if windows is not None else None
    model.train(was_training)
    return {
        "model": name,
        "kv_heads": kv["key_heads_total"] + kv["value_heads_total"],
        "kv_bytes_per_token_bf16": kv["kv_bytes_per_token_bf16"],
        "kv_bytes_per_token_fp32": kv["kv_bytes_per_token_fp32"],
        "heldout_ppl": ppl["ppl"] if ppl else None,
        "heldout_nll": ppl["nll"] if ppl else None,
        "heldout_tokens": ppl["tokens"] if ppl else 0,
    }


def source_on_training_windows(source, heldout_train, train_template) -> float | None:
    """The source on the windows the training evaluations use (the first rows of the held-out
    blocks, dha.train), so the perplexity curve has a like-for-like reference line."""
    if heldout_train is None:
        return None
    rows = eval_rows(blocks(heldout_train, train_template.block_size), train_template.eval_tokens)
    return perplexity(source.eval(), rows, batch_size=4, progress=False)["ppl"]


# ---- end to end --------------------------------------------------------------------------------


@dataclass
class DHAResult:
    loaded: object  # dha.checkpoint.Loaded of the final model (tokenizer, plan, provenance)
    summary: dict  # the numbers of report.md / summary.json
    log: list[dict]  # training and evaluation records of both stages, tokens counted from the start


def protected_heads(source, tokenizer, config: DHAConfig, log_progress) -> list:
    """(layer, kind, head) of the `config.retrieval_heads` strongest retrieval key heads (and their
    value heads with `protect_values`), from the source's attention on passkey prompts of
    `config.retrieval_length` tokens (at most its positions)."""
    if not config.retrieval_heads:
        return []
    if tokenizer is None:
        raise UserError("--retrieval-heads needs the source's tokenizer (it builds passkey prompts)")
    length = min(config.retrieval_length, source.config.max_position_embeddings)
    log_progress(f"retrieval heads: attention on the needle of 5 passkey prompts of {length} tokens")
    heads = retrieval_key_heads(
        source, needle_attention(source, tokenizer, length, progress=False), config.retrieval_heads
    )
    kinds = ("key", "value") if config.protect_values else ("key",)
    return [(l, kind, j) for l, j in heads for kind in kinds]


def resolved_search(source, search_options, fusion: bool):
    """`search_options` with the key merges' position-free pairs resolved for `source` (a count the
    model cannot hold fails here, before any work). A fusion stage ends exactly at the merge only
    with exact maps, so with one (`fusion`) the default is 0 pairs."""
    requested = 0 if fusion and search_options.free_pairs is None else search_options.free_pairs
    if source.config.qk_norm is not None and search_options.search == "learned":
        raise UserError(
            "--search learned relaxes the merge on the projections before the key norm, which a qk-norm model "
            "does not merge by: use --search cost (the default)"
        )
    return replace(search_options, free_pairs=free_pairs_for(source, requested, search_options.free_context))


def plan_and_merges(
    source, calib: torch.Tensor, config: DHAConfig, search_options, plan, log_progress, tokenizer=None
) -> tuple:
    """Stage 1: one calibration pass, the search (unless a plan is given; protecting the retrieval
    heads the config asks for), and the closed-form aligned merge of every group (None for
    config.merge "mean"). Returns (plan, merges). `search_options` as `resolved_search` gives them."""
    check_calib_blocks(calib)
    if plan is None and config.retrieval_heads:
        search_options = replace(search_options, protect=protected_heads(source, tokenizer, config, log_progress))
    gradients = plan is None and search_options.needs_gradients
    log_progress(f"calibration on {calib.numel()} tokens" + (" (with gradients)" if gradients else ""))
    calibration = calibrate(
        source,
        calib,
        search_options.batch_size,
        search_options.metric,
        gradients=gradients,
        device=config.device,
        free_pairs=search_options.free_pairs,
    )
    if plan is None:
        log_progress(f"search ({search_options.search})")
        plan = search(source, config.kv_budget, calib, search_options, calibration=calibration)
    else:
        plan.validate(*source_heads(source))
        plan = Plan.from_dict(plan.to_dict())  # a copy: run_dha writes its notes
    merges = closed_form_merges(calibration.stats, plan.layers) if config.merge == "aligned" else None
    return plan, merges


def run_dha(
    loaded,
    splits,
    config: DHAConfig,
    *,
    teacher=None,
    plan=None,
    progress: bool = True,
    run_dir: str | None = None,
    resume: bool = False,
    run_info: dict | None = None,
) -> DHAResult | None:
    """Search, fuse, merge, train, evaluate (module doc). `loaded.model` is not modified.

    loaded: dha.checkpoint.Loaded of the source (float32 weights for training);
    splits: dha.data.TokenSplits (calibration and training read the train split only);
    teacher: model to distil from when config.train.distill (default: the source);
    plan: a plan from an earlier search of this model (dha.plan.Plan) to reuse instead of searching;
    run_dir: where the run keeps its state (module doc, "A run directory"); None: nothing is written;
    resume: continue what run_dir holds (stage 1, then each stage from its newest checkpoint);
    run_info: what identifies the run besides the config (source, data), kept in each stage's run.json.

    Under torchrun (WORLD_SIZE > 1) rank 0 runs stage 1 and sends its plan to the other ranks, every
    rank trains (DDP), and rank 0 alone evaluates: the other ranks return None.
    """
    config, search_options, stages = prepared_run(loaded.model, splits, config)
    d = setup_distributed(config.train.device)
    if config.train.distill and teacher is None:
        teacher = loaded.model
    log_progress = progress_logger(progress and d.main)
    run = StageRun(run_dir, resume, dict(run_info or {}), d, progress)
    seconds = {}
    with timed(seconds, "search"):
        calib = calibration_blocks(splits.train, config.calib_tokens, config.calib_block_size)
        plan, merges = run.stage1(
            lambda: plan_and_merges(loaded.model, calib, config, search_options, plan, log_progress, loaded.tokenizer)
        )
    heldout_train = training_heldout(splits, config.train.block_size)
    with timed(seconds, "fusion"):
        model, fusion_distance, log = fusion_stage(
            loaded.model, plan, merges, config, stages, splits, heldout_train, teacher, run, log_progress
        )
    with timed(seconds, "continued"):
        model, continued_log = continued_stage(model, config, stages, splits, heldout_train, teacher, run, log_progress)
    if not d.main:
        return None
    model = model.eval()
    with timed(seconds, "evaluation"):
        rows, source_curve_ppl = final_table(
            loaded.model, model, plan, merges, config, splits, heldout_train, loaded.tokenizer
        )
    summary = {
        **run_description(loaded, splits, config, search_options, stages, plan, calib, fusion_distance, d.world),
        "results": rows,
        "source_ppl_on_training_eval_windows": source_curve_ppl,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    return DHAResult(result_loaded(loaded, model, plan, config, summary), summary, log + continued_log)


def prepared_run(model, splits, config: DHAConfig) -> tuple:
    """run_dha's checks and settings, before any work: the config is valid, the model's heads can be
    merged (dha.families.refuse_merge_of_qk_norm), the search options resolve for the model, and
    with tokens the train split holds a training block. Returns (config with its training template
    filled in, search options, StageTokens)."""
    config.validate()
    search_options = config.search or SearchOptions()
    template = config.train or TrainConfig(tokens=1)
    config = replace(config, train=template)
    stages = split_tokens(config.tokens, config.fusion_fraction, template.batch_tokens, template.block_size)
    refuse_merge_of_qk_norm(model, fusion=bool(stages.fusion), mean=config.merge != "aligned")
    search_options = resolved_search(model, search_options, fusion=bool(stages.fusion))  # once, before any work
    if config.tokens and splits.train.numel() < template.block_size + 1:
        raise UserError(
            f"the train split has {splits.train.numel()} tokens, less than one training block of "
            f"{template.block_size}: use more data or a smaller --block-size"
        )
    return config, search_options, stages


def progress_logger(enabled: bool):
    """A function that prints "dha: <message>" on stderr (enabled) or does nothing."""
    return (lambda msg: print(f"dha: {msg}", file=sys.stderr)) if enabled else (lambda msg: None)


@contextmanager
def timed(seconds: dict, name: str):
    """seconds[name]: the wall-clock time the `with` block took."""
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0


def run_description(
    loaded,
    splits,
    config: DHAConfig,
    search_options,
    stages: StageTokens,
    plan: Plan,
    calib,
    fusion_distance,
    processes,
) -> dict:
    """The first part of summary.json: what was run, on what, with which settings (run_dha adds the
    final table and the timings)."""
    return {
        "method": "dha",
        "source": loaded.source,
        "data": splits.source,
        "kv_budget": config.kv_budget,
        "kv_fraction": plan.kv_fraction(),
        "tokens": config.tokens,
        "fusion_tokens": stages.fusion,
        "continued_tokens": stages.continued,
        "fusion_distance_at_merge": fusion_distance,
        "key_heads": plan.key_heads(),
        "value_heads": plan.value_heads(),
        "search": {k: v for k, v in asdict(search_options).items() if k != "progress"},
        "fusion": asdict(config.fusion),
        "train": asdict(config.train) if config.tokens else None,
        "fusion_fraction": config.fusion_fraction,
        "merge": config.merge,
        "retrieval_heads": config.retrieval_heads,
        "retrieval_length": config.retrieval_length if config.retrieval_heads else None,
        "calibration_tokens": int(calib.numel()),
        "calibration_block_size": int(calib.shape[-1]),
        "processes": processes,
    }


def merge_without_fusion(model, plan: Plan, merges, device=None):
    """The plan applied at once: the closed-form aligned merges (each layer's on `device`), or the group
    means (merges None)."""
    return aligned_merge(model, plan.layers, merges, device) if merges is not None else merge_groups(model, plan)


def stage_log(history: list[dict], evals: list[dict], stage: str, offset: int) -> list[dict]:
    """A stage's training and evaluation records, tokens counted from the start of the run."""
    return [
        {**r, "stage": stage, "tokens": r["tokens"] + offset}
        for r in sorted(history + evals, key=lambda r: (r["step"], r["kind"] == "eval"))
    ]


def fusion_stage(
    source,
    plan: Plan,
    merges,
    config: DHAConfig,
    stages: StageTokens,
    splits,
    heldout_train,
    teacher,
    run: "StageRun",
    log_progress,
) -> tuple:
    """Stage 2 and 3: fusion training toward the merges, then the merge. (model, distance, log);
    without fusion tokens the plan is merged at once."""
    if not stages.fusion:
        return merge_without_fusion(source, plan, merges, config.device), None, []
    fused = FusedModel(source, plan, merges, config.fusion)
    cfg = replace(config.train, tokens=stages.fusion)
    steps = stages.fusion // stages.step_tokens
    log_progress(
        f"fusion: {steps} steps, {stages.fusion:,} tokens (toward the {config.merge} merge, {config.fusion.schedule})"
    )
    schedule = FusionSchedule(fused, steps, config.fusion)
    result = run.train("fusion", fused, splits.train, heldout_train, cfg, teacher, schedule.hooks())
    fused = result.model
    distance = float(fused.fusion_loss()[0].detach())
    _, model = merge(fused)
    return model, distance, stage_log(result.history, result.evals, "fusion", 0)


def continued_stage(
    model, config: DHAConfig, stages: StageTokens, splits, heldout_train, teacher, run: "StageRun", log_progress
) -> tuple:
    """Stage 4: continued training of the merged model. (model, log).

    Not `dha.continued.continue_training` (the `train` verb's run, which loads DATA itself and
    saves the model): this stage trains on the splits the pipeline loaded once, reads on from where
    fusion stopped (`data_start`) and keeps its state in the run directory's continued/ (StageRun);
    the held-out rule is the shared `training_heldout`."""
    if not stages.continued:
        return model, []
    # The continued stage reads on from where fusion stopped: the budget is N distinct tokens
    # (up to the epochs the train split allows), the same as a baseline trained on N tokens.
    cfg = replace(config.train, tokens=stages.continued, data_start=stages.fusion // config.train.block_size)
    log_progress(f"continued training: {stages.continued // stages.step_tokens} steps, {stages.continued:,} tokens")
    result = run.train("continued", model, splits.train, heldout_train, cfg, teacher, None)
    return result.model, stage_log(result.history, result.evals, "continued", stages.fusion)


def long_context_row(model, heldout: torch.Tensor, config: DHAConfig, tokenizer) -> dict:
    """Perplexity by position over one window of config.long_context held-out tokens (when the
    held-out text holds one) and the passkey grid, each when the config asks for it."""
    out = {}
    model = model.eval()
    if config.long_context and heldout.numel() >= config.long_context:
        out["by_position"] = position_report(model, heldout, config.long_context, 1, progress=False)
    if config.retrieval is not None and tokenizer is not None:
        grid = retrieval(model, tokenizer, config.retrieval, progress=False)
        out["retrieval"] = {k: v for k, v in grid.items() if k != "examples"}
    return out


def final_table(source, model, plan: Plan, merges, config: DHAConfig, splits, heldout_train, tokenizer=None) -> tuple:
    """Stage 5: the source, the plan merged without training and (with tokens) the result, on the
    same held-out windows; and the source on the training evaluations' windows."""
    window = config.final_eval_block_size
    if source.config.position == "learned":  # learned position tables (GPT-2, OPT) end somewhere
        window = min(window, source.config.max_position_embeddings)
    windows = heldout_blocks(splits.heldout, config.final_eval_tokens, window)
    candidates = [
        ("source", source),
        (
            f"plan, {config.merge}-merged (no training)",
            merge_without_fusion(source, plan, merges) if config.tokens else model,
        ),
    ]
    if config.tokens:
        candidates.append(
            ("dha (fused, merged, trained)" if config.fusion_fraction else "dha (merged, trained)", model)
        )
    rows = [table_row(name, m, windows, config.device) for name, m in candidates]
    for row, (_, m) in zip(rows, candidates):
        row.update(long_context_row(m, splits.heldout, config, tokenizer))
    curve = source_on_training_windows(source, heldout_train, config.train) if config.tokens else None
    return rows, curve


def result_loaded(loaded, model, plan: Plan, config: DHAConfig, summary: dict):
    """The converted model as a dha.checkpoint.Loaded, with the plan's notes and the provenance."""
    plan.method, plan.kv_budget = "dha", config.kv_budget
    plan.notes = {
        **plan.notes,
        "pipeline": {
            k: summary[k]
            for k in ("tokens", "fusion_tokens", "continued_tokens", "fusion_fraction", "fusion_distance_at_merge")
        },
    }
    provenance = {
        "converted_from": loaded.source,
        "source_provenance": loaded.provenance,
        "method": "dha",
        "kv_budget": config.kv_budget,
        "kv_fraction": plan.kv_fraction(),
        "data": summary["data"],
        "tokens": config.tokens,
        "fusion_tokens": summary["fusion_tokens"],
        "continued_tokens": summary["continued_tokens"],
        "merge": config.merge,
        "fusion": asdict(config.fusion),
    }
    return Loaded(model, loaded.tokenizer, loaded.source, "native", loaded.hf_config, plan, provenance)


# ---- a run directory: what --resume continues ---------------------------------------------------------

STAGE1_FORMAT = "dha-stage1/1"


class StageRun:
    """Where the stages of one run keep their state, and how they share it between processes.

    run_dir/stage1.pt      the plan and the closed-form merges (written once, atomically)
    run_dir/fusion/        the fusion stage's training run (dha.train: run.json, log.jsonl,
    run_dir/continued/     TensorBoard, checkpoints/ every save_every steps and at its end)
    With resume, stage 1 is read back and each stage continues from its newest checkpoint (a stage
    without one starts again). Rank 0 computes stage 1; the other ranks receive it.
    """

    def __init__(self, run_dir: str | None, resume: bool, run_info: dict, d, progress: bool):
        self.dir, self.resume, self.info, self.d, self.progress = run_dir, resume, run_info, d, progress

    def stage1(self, compute) -> tuple:
        value = None
        if self.d.main:
            path = os.path.join(self.dir, "stage1.pt") if self.dir else None
            if path and self.resume and os.path.exists(path):
                value = load_stage1(path)
            else:
                value = compute()
                if path:
                    save_stage1(path, *value)
        if self.d.world > 1:
            box = [None if value is None else (value[0].to_dict(), value[1])]
            dist.broadcast_object_list(box, src=0)
            value = (Plan.from_dict(box[0][0]), box[0][1])
        return value

    def train(self, stage: str, model, train_stream, heldout, cfg, teacher, hooks):
        out = os.path.join(self.dir, stage) if self.dir else None
        resume = None
        if out is not None:
            found = checkpoints_in(os.path.join(out, "checkpoints")) if self.resume else []
            if found:
                resume = found[-1]  # the newest
            elif self.d.main:
                shutil.rmtree(out, ignore_errors=True)  # a stage killed before its first checkpoint starts again
            if self.d.world > 1:
                dist.barrier()
        return train(
            model,
            train_stream,
            heldout,
            cfg,
            teacher=teacher,
            hooks=hooks,
            out_dir=out,
            resume=resume,
            progress=self.progress,
            run_info={**self.info, "stage": stage},
            save_final=False,
            checkpoint_at_end=out is not None and cfg.save_every > 0,
        )


def save_stage1(path: str, plan: Plan, merges) -> None:
    atomic_torch_save({"format": STAGE1_FORMAT, "plan": plan.to_dict(), "merges": merges}, path)


def load_stage1(path: str) -> tuple:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise UserError(
            f"{path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "delete it to redo the search, or use a new --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STAGE1_FORMAT:
        raise UserError(f"{path} is not a dha stage-1 file: delete it to redo the search, or use a new --out")
    return Plan.from_dict(state["plan"]), state["merges"]


def finish_run_dir(run_dir: str, result: DHAResult) -> list[str]:
    """Write the outputs into run_dir (each by rename, dha_config.json last: a directory holding it
    holds a finished model), then drop what only a resume needed (stage1.pt, the checkpoints)."""
    with files_into(run_dir, last=NATIVE_CONFIG) as tmp:
        files = write_outputs(tmp, result)
    for stale in [os.path.join(run_dir, "stage1.pt"), *glob.glob(os.path.join(run_dir, "*", "checkpoints"))]:
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.unlink(stale)
    return files


# ---- output: checkpoint + report -------------------------------------------------------------------


def write_outputs(directory: str, result: DHAResult) -> list[str]:
    """Native checkpoint, report.md, summary.json, log.jsonl and the plots, into `directory`."""
    write_native(directory, result.loaded)
    files = []
    with open(os.path.join(directory, "log.jsonl"), "w") as f:
        for r in result.log:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(result.summary, f, indent=1, default=str)
        f.write("\n")
    plot_allocation(result.loaded.plan, os.path.join(directory, "allocation.png"))
    files.append("allocation.png")
    if any(r["kind"] == "train" for r in result.log):
        plot_loss(result.log, os.path.join(directory, "loss.png"))
        files.append("loss.png")
    if any(r["kind"] == "eval" for r in result.log):
        source_ppl = result.summary.get("source_ppl_on_training_eval_windows")
        plot_perplexity(result.log, source_ppl, os.path.join(directory, "perplexity.png"))
        files.append("perplexity.png")
    with open(os.path.join(directory, "report.md"), "w") as f:
        f.write(report_markdown(result.summary, files))
    return ["report.md", "summary.json", "log.jsonl", "plan.json", *files]
