"""One training loop: continued pre-training, alone or under torchrun (DDP / FSDP), resumable.

Used for continued pre-training (`dha train`, through `dha.continued`, which reads the data), for
the training that follows a conversion (`dha convert ... --tokens N`), and, through `Hooks`, by
the fusion stage and the learned search. The loop takes token tensors; it knows no SOURCE or DATA.

What one optimizer step does
----------------------------
The global batch is `batch_tokens // block_size` blocks ("rows") of `block_size` tokens; a row
gives `block_size - 1` predictions (the model reads row[:-1] and predicts row[1:], the convention
of `dha.data.blocks`). Rank r of P takes rows [r*R/P, (r+1)*R/P) of every global batch (its own
shard) and runs them in micro batches of `micro_batch` rows, accumulating gradients. Each micro
batch's loss is its *sum* of token losses divided by the global number of predicted tokens (times P,
because DDP and FSDP average gradients over ranks), so the gradient is exactly that of the mean
loss over the global batch, whatever P and `micro_batch` are: one process and P processes take the
same steps up to float rounding. Then: clip the gradient norm, AdamW step, learning-rate schedule
(linear warm-up, then cosine down to `min_lr_ratio * lr`).

    objective = (1 - w) * LM + w * KD   (with --distill; else LM)   + hooks.extra_loss(model, step)
                + a * AKD   (with --attention-distill a > 0)   + b * FAR   (with --far-attention-distill b > 0)
    KD = T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over predicted tokens
         (Hinton et al. 2015: the T^2 keeps gradient sizes comparable across temperatures)
    AKD = KL of the teacher's attention to the student's, per query head, for the last
          --attention-queries positions of each row (dha.attention_kd), mean over them
    FAR = the same over the keys at least --far-distance positions back, renormalized

Long rows: with activation checkpointing (`choose_checkpointing`) each block runs again in its
backward pass, and in one process the loss's logits are made a chunk of positions at a time
(`chunked_loss_sums`), so a step holds neither every block's activations nor rows x vocabulary
logits.

The rows each step reads (their order by epochs, skipped positions, recall spans) come from
`dha.rows`, so a resumed run, and any split over processes and micro batches, reads the same rows
at the same positions.

Hooks for the fusion stage (plain functions, see `Hooks`): an extra loss term computed from the
model, optimizer parameter groups with their own learning rates, and `on_step_end`. A group may
have a NEGATIVE learning rate: gradient ascent, for Lagrange multipliers in augmented-Lagrangian
training (Wang et al. 2020 structured pruning; Xia et al. 2024 "Sheared LLaMA"). torch's AdamW
rejects lr < 0, so such a group is given |lr| and its gradients are negated before the step: with
g -> -g Adam's first moment flips sign and its second moment does not, so the update is exactly
the ascent step. Ascent groups are left out of gradient clipping (a large constraint violation
should not shrink the model's step) and should use weight_decay 0 (the default for them).

Distributed
-----------
The same command runs under torchrun (DDP, or FSDP2 with `--fsdp`; `dha.distributed`). Only rank 0
writes files, but for the shards of a checkpoint under FSDP (`dha.resume`).

Output directory
----------------
    run.json            what this run is (source, data, config, model): a directory holding a
                        different run is refused; resuming needs the same run
    log.jsonl           one JSON object per step ({"kind": "train", ...}) and per evaluation
                        ({"kind": "eval", ...})
    tensorboard/        TensorBoard events (torch.utils.tensorboard)
    checkpoints/        step_XXXXXXXX.pt (or step_XXXXXXXX/ under FSDP), what --resume reads back:
                        model, optimizer, step, data position, RNG states, the history so far
                        (dha.resume)
    model.safetensors, dha_config.json, tokenizer files
                        the final model as a native checkpoint (dha.checkpoint.save_final_model),
                        so DIR is itself a SOURCE for the other verbs
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import rundir
from .atomic import write_json
from .attention_kd import AttentionTap
from .checkpoint import save_final_model
from .distributed import Dist, all_sum, setup_distributed, unwrap_full_model, wrap_distributed
from .errors import UserError
from .memory import Training, free_memory, gib, step_bytes
from .model import Transformer, logit_chunk, next_token_nll
from .options import AUTOCAST_NAMES, TrainConfig
from .resume import (
    RESUMABLE_CHANGES,
    added_defaults,
    find_checkpoint,
    load_checkpoint,
    restore,
    run_identity,
    save_checkpoint,
    set_rng_state,
)
from .rows import as_blocks, check_position_span, check_recall_tokens, recall_rows, rows_at, skip_positions

AUTOCAST_DTYPES = {name: None if name == "float32" else getattr(torch, name) for name in AUTOCAST_NAMES}  # float32: off


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware (else autocast to bf16 only slows down)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> str:
    """The autocast dtype name that `name` ("auto" or explicit) means on `device`."""
    if name != "auto":
        return name
    return "bfloat16" if native_bf16(device) else "float32"


@dataclass
class Hooks:
    """Plain functions the loop calls; every one is optional.

    extra_loss(model, step) -> (term, scalars): a scalar tensor added to the objective of step
        `step` (1-based), e.g. a fusion loss or a Lagrangian penalty, and floats to log. Called once
        per optimizer step (inside the last micro batch, so DDP reduces its gradient with the rest).
    param_groups(model) -> [{"params": [...], "lr": float, "weight_decay": float, ...}, ...]:
        optimizer groups with their own peak learning rate (scheduled like the default one;
        negative = gradient ascent) and weight decay (default: cfg.weight_decay, 0 for ascent
        groups). Parameters not listed form the default group. Parameters outside the model (a
        hook's own multipliers) are allowed; they are not synchronised across ranks, so their
        gradients must be the same on every rank (as a function of the model's parameters is).
    on_step_end(model, step, record): after the optimizer step; may add scalars to `record`
        (the dict logged for this step), e.g. a multiplier's value.
    state_dict() -> dict and load_state_dict(state, step): the hook's own state (what is not a
        model parameter, e.g. multipliers), saved in every checkpoint and given back on resume,
        after the optimizer is built, with the step the run resumes at.
    The model passed is the unwrapped module (under FSDP its parameters are sharded DTensors).
    """

    extra_loss: Callable[[nn.Module, int], tuple[Tensor, dict]] | None = None
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    on_step_end: Callable[[nn.Module, int, dict], None] | None = None
    state_dict: Callable[[], dict] | None = None
    load_state_dict: Callable[[dict, int], None] | None = None


@dataclass
class TrainResult:
    history: list[dict]  # per step: step, tokens, loss (LM), objective, lr, grad_norm, tokens_per_s, ...
    evals: list[dict]  # step, tokens, heldout_loss, ppl
    model: nn.Module  # the trained model (unwrapped; on the training device)
    steps: int = 0
    out_dir: str | None = None
    activation_checkpointing: bool = False  # whether the blocks ran under activation checkpointing


def ramp(step: int, start: int, end: int, lo: float = 0.0, hi: float = 1.0) -> float:
    """lo before `start`, hi after `end`, linear in between (a coefficient warmed up over steps)."""
    if step <= start:
        return lo
    if step >= end:
        return hi
    return lo + (hi - lo) * (step - start) / (end - start)


def lr_factor(step: int, steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for 1-based `step`: linear warm-up to 1, then cosine to min_lr_ratio."""
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)  # in (0, 1]
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distill_loss_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * sum over tokens of KL(p_teacher || p_student) at temperature T; logits (..., V), in fp32."""
    T = temperature
    log_p_student = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (...,)
    return kl.sum() * T * T


def loss_sums(logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, temperature: float) -> Tensor:
    """(LM sum, KD sum): the summed next-token cross-entropy of logits (..., V) against targets
    (...,), and `distill_loss_sum` against the teacher's logits (0 without a teacher)."""
    lm = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="sum")
    kd = distill_loss_sum(logits, teacher_logits, temperature) if teacher_logits is not None else torch.zeros_like(lm)
    return torch.stack([lm, kd])


def chunked_loss_sums(model, hidden: Tensor, targets: Tensor, teacher, teacher_hidden, temperature: float, chunk: int):
    """`loss_sums` of model.logits(hidden) (and teacher.logits(teacher_hidden)), made `chunk`
    positions at a time under torch.utils.checkpoint: neither pass holds more than one chunk's
    logits, as the whole (tokens x vocabulary) logits and their softmaxes are the largest tensors
    of a long row's step. The backward pass makes each chunk's logits again from the final hidden
    states (B, T, D), which are all it keeps."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.flatten(0, -2)

    def one(h: Tensor, t: Tensor, th: Tensor | None) -> Tensor:
        if th is not None:
            with torch.no_grad():
                th = teacher.logits(th)
        return loss_sums(model.logits(h), t, th, temperature)

    total = 0
    for i in range(0, hidden.shape[0], chunk):
        th = teacher_hidden[i : i + chunk] if teacher_hidden is not None else None
        total = total + torch.utils.checkpoint.checkpoint(
            one, hidden[i : i + chunk], targets[i : i + chunk], th, use_reentrant=False
        )
    return total


# ---- steps ---------------------------------------------------------------------------------------


@dataclass
class StepShape:
    rows: int  # R: global rows per step
    width: int  # tokens per row
    steps: int
    warmup: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def step_shape(cfg: TrainConfig, width: int, world: int) -> StepShape:
    rows = max(1, cfg.batch_tokens // width)
    if rows % world:
        raise UserError(
            f"the global batch of {rows} blocks ({cfg.batch_tokens} tokens / {width}) does not split "
            f"evenly over {world} processes: choose batch tokens a multiple of {world * width}"
        )
    steps = cfg.tokens // (rows * width)
    if steps < 1:
        raise UserError(
            f"--tokens {cfg.tokens} is smaller than one optimizer step ({rows * width} tokens = "
            f"{rows} blocks of {width}): raise --tokens or lower --batch-tokens"
        )
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * steps))
    return StepShape(rows, width, steps, min(warmup, steps))


# ---- optimizer -----------------------------------------------------------------------------------


def build_optimizer(module: nn.Module, cfg: TrainConfig, hooks: Hooks, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the hook's groups plus a default group; each group remembers its signed peak lr."""
    groups, seen = [], set()
    for g in hooks.param_groups(module) if hooks.param_groups else []:
        g = dict(g)
        params = [p for p in g.pop("params") if p.requires_grad]
        if any(id(p) in seen for p in params):
            raise ValueError("a parameter appears in two parameter groups")
        seen.update(id(p) for p in params)
        peak = float(g.pop("lr", cfg.lr))
        ascent = peak < 0
        g.setdefault("weight_decay", 0.0 if ascent else cfg.weight_decay)
        groups.append({"params": params, "lr": abs(peak), "peak_lr": peak, "ascent": ascent, **g})
    rest = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
    gain = lambda name, p: p.dim() < 2 or name.endswith("norm.weight")  # noqa: E731  (per-head norms are 2-D)
    matrices = [p for n, p in rest if not gain(n, p)]
    vectors = [p for n, p in rest if gain(n, p)]
    # Decay matrices only: norms' gains and biases are not shrunk toward 0 (nanoGPT's configure_optimizers).
    groups.insert(
        0, {"params": matrices, "lr": cfg.lr, "peak_lr": cfg.lr, "ascent": False, "weight_decay": cfg.weight_decay}
    )
    groups.insert(1, {"params": vectors, "lr": cfg.lr, "peak_lr": cfg.lr, "ascent": False, "weight_decay": 0.0})
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def own_storage(module: nn.Module, storages: set[int]) -> None:
    """Give every parameter of `module` that still lies in one of `storages` (the model's before
    it was moved to the training device) a copy of its own: training, and loading a checkpoint
    to resume, write into no tensor the caller may share with another model
    (`dha.merge.aligned_merge` shares all but the attention weights with its source, which is
    often the teacher)."""
    for p in module.parameters():
        if p.data_ptr() in storages:
            p.data = p.data.clone()


# ---- activation checkpointing --------------------------------------------------------------------


def set_checkpointing(module: nn.Module, on: bool) -> int:
    """Run the decoder blocks of every Transformer inside `module` (itself, the source model of a
    dha.fuse.FusedModel) under activation checkpointing, or not; how many Transformers it found."""
    models = [m for m in module.modules() if isinstance(m, Transformer)]
    for m in models:
        m.checkpoint_blocks = on
    return len(models)


def head_chunk(module: nn.Module, teacher: nn.Module | None, world: int) -> int:
    """Positions per chunk of the loss's logits when the blocks are checkpointed (`chunked_loss_sums`,
    dha.model.logit_chunk), or 0: the logits made whole. Only our own model (and teacher) in one
    process: DDP and FSDP run the whole forward inside their wrapper, and a fused model (dha.fuse)
    has no head apart from its forward."""
    plain = world == 1 and type(module) is Transformer and (teacher is None or type(teacher) is Transformer)
    return logit_chunk(module.config) if plain else 0


def choose_checkpointing(
    cfg: TrainConfig, module: nn.Module, micro: int, width: int, d: Dist, chunked_head: bool = False
) -> bool:
    """Whether the blocks run under activation checkpointing (TrainConfig.activation_checkpointing).

    "off": no; "on": yes; "auto": yes when a step's working memory (dha.memory.step_bytes: the
    gradients and AdamW moments of the trainable parameters, one micro batch's activations) fits
    the device's free memory only with it, said in one line on stderr. With "auto" or "on" a step
    that does not fit even with it is refused (UserError) before any work. chunked_head: with it the
    loss's logits are made a chunk at a time (`head_chunk`). Called with the model (and teacher)
    already on the device; every rank takes the decision of the rank that needs most."""
    mode = cfg.activation_checkpointing
    models = [m for m in module.modules() if isinstance(m, Transformer)]
    if mode == "off" or not models:
        if mode == "on":
            raise UserError("--activation-checkpointing on: the model trained has no Transformer blocks to checkpoint")
        return False
    training = Training(
        micro_batch=micro,
        block_size=width,
        shards=d.world if cfg.fsdp and d.world > 1 else 1,
        distill=cfg.distill,
        attention_queries=cfg.tapped_queries,
        far_attention=bool(cfg.far),
        chunked_head=chunked_head,
    )
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if d.device.type == "cpu" else 1  # they share its memory
    without, with_it = (processes * step_bytes(models[0].config, training, trainable, c) for c in (False, True))
    free = free_memory(d.device)
    code = 2 if free is not None and with_it > free else int(mode == "on" or (free is not None and without > free))
    if d.world > 1:
        t = torch.tensor([code], device=d.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        code = int(t.item())
    what = f"a micro batch of {micro} x {width} tokens needs about {gib(without)} beyond the weights without it"
    where = f"{d.device} has {gib(free)} free" if free is not None else f"{d.device}'s free memory is unknown"
    if code == 2:
        raise UserError(
            f"training does not fit on {d.device} even with activation checkpointing: {what}, "
            f"{gib(with_it)} with it; {where}. Lower --micro-batch or --block-size"
        )
    if code == 1 and mode == "auto" and d.main:
        print(f"dha: activation checkpointing on: {what}, {gib(with_it)} with it; {where}", file=sys.stderr)
    return code == 1


# ---- the loop ------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype_name: str):
    dtype = AUTOCAST_DTYPES[dtype_name]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def eval_rows(heldout_rows: Tensor, eval_tokens: int) -> Tensor:
    """The held-out rows every evaluation of a run scores: the first eval_tokens // width (at least one)."""
    return heldout_rows[: max(1, min(heldout_rows.shape[0], eval_tokens // heldout_rows.shape[1]))]


@torch.no_grad()
def evaluate_heldout(model: nn.Module, rows: Tensor, micro_batch: int, d: Dist, dtype_name: str) -> tuple[float, int]:
    """Mean next-token loss over `rows` (m, width), sharded over ranks: (loss, predicted tokens).

    Every rank runs the same number of forward passes (FSDP's gathers are collectives): the
    shorter shards are padded with row 0 at weight 0."""
    was_training = model.training
    model.eval()
    m = rows.shape[0]
    mine = list(range(d.rank, m, d.world))
    per_rank = -(-m // d.world)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    for start in range(0, per_rank, micro_batch):
        idx = torch.tensor(mine[start : start + micro_batch])
        w = torch.tensor(weights[start : start + micro_batch], device=d.device)
        with _autocast(d.device, dtype_name):
            loss = next_token_nll(model, rows[idx].to(d.device))  # (b,)
        total[0] += (loss * w).sum().double()
        total[1] += w.sum().double() * (rows.shape[1] - 1)
    all_sum(total, d)
    model.train(was_training)
    return (total[0] / total[1]).item(), int(total[1].item())


def train(
    model: nn.Module,
    train_stream_or_blocks,
    heldout_blocks,
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    hooks: Hooks | None = None,
    out_dir: str | None = None,
    resume: str | None = None,
    progress: bool = True,
    run_info: dict | None = None,
    loaded=None,
    save_final: bool = True,
    checkpoint_at_end: bool = False,
) -> TrainResult:
    """Train `model` in place on `train_stream_or_blocks` (1-D stream or (n, width) rows).

    heldout_blocks: 1-D stream or rows for the held-out evaluation (None: no evaluation).
    teacher: the model to distil from when cfg.distill (None: a frozen copy of `model` as given).
    out_dir: where rank 0 writes run.json, logs, checkpoints and the final model (None: nothing).
    resume: a run directory, its checkpoints/ directory or a checkpoint file to continue from.
    run_info: what identifies the run besides config and model (source, data), kept in run.json.
    loaded: a dha.checkpoint.Loaded whose tokenizer, hf_config, plan and provenance the final model
        is saved with (None: the model alone).
    save_final: write the final model into out_dir (False: a stage of a longer run, whose caller
        writes the result).
    checkpoint_at_end: also checkpoint after the last step, so that a resume of the finished run
        returns its result at once (the stages of `dha convert --method dha`).
    """
    cfg.validate()
    run = _Run(
        model,
        train_stream_or_blocks,
        heldout_blocks,
        cfg,
        teacher,
        hooks or Hooks(),
        out_dir,
        resume,
        run_info,
        progress,
    )
    if not run.resumed and cfg.eval_every:
        run.evaluate()  # the starting point
    _step_loop(run, progress, checkpoint_at_end)
    if not cfg.eval_every and run.heldout is not None and (not run.evals or run.evals[-1]["step"] != run.step):
        run.evaluate()  # eval_every 0: one evaluation, at the end
    return run.finish(loaded, save_final, run_info)


def _step_loop(run: "_Run", progress: bool, checkpoint_at_end: bool) -> None:
    """`train`'s loop: the optimizer steps from where `run` stands to its last, each followed by the
    evaluation every eval_every steps (and at the last), the progress bar (rank 0) and a checkpoint
    every save_every steps (with checkpoint_at_end, also after the last)."""
    cfg, steps = run.cfg, run.shape.steps
    bar = _progress_bar(steps, run.step) if progress and run.d.main else None
    while run.step < steps:
        record = run.optimizer_step()
        if cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == steps):
            run.evaluate()
        if bar is not None:
            _show_progress(bar, record, run.evals)
        periodic = cfg.save_every and run.step % cfg.save_every == 0 and run.step < steps
        if run.out_dir is not None and (periodic or (checkpoint_at_end and run.step == steps)):
            run.checkpoint()
    if bar is not None:
        bar.close()


def _teacher_on(device: torch.device, teacher: nn.Module | None, model: nn.Module, distill: bool) -> nn.Module | None:
    """The teacher on `device` in eval mode: `teacher`, else with `distill` a copy of `model` as given,
    before any step (never trained); None without either."""
    if teacher is None and distill:
        teacher = copy.deepcopy(model)
    if teacher is None:
        return None
    # Only moved and put in eval mode: its forward runs under no_grad. (Not requires_grad_(False): a
    # teacher may share tensors with the student, as a fused model shares its source's.)
    return teacher.to(device).eval()


class _Run:
    """One call of `train`: what it set up (data, distributed wrapping, optimizer, outputs) and
    where it stands (step, history, evals). Its methods are the loop's steps."""

    def __init__(
        self, model, data, heldout, cfg: TrainConfig, teacher, hooks: Hooks, out_dir, resume, run_info, progress
    ):
        self.cfg, self.hooks, self.out_dir = cfg, hooks, out_dir
        self.d = d = setup_distributed(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, d.device)
        self.rows = as_blocks(data, cfg.block_size, "training")
        self.heldout = as_blocks(heldout, cfg.block_size, "held-out") if heldout is not None else None
        self.shape = step_shape(cfg, self.rows.shape[1], d.world)
        check_position_span(cfg.position_span, model.config, self.shape.width)
        check_recall_tokens(cfg.recall_tokens, self.shape.width)
        self.identity = run_identity(cfg, model, run_info)
        if out_dir is not None and not rundir.check(
            out_dir, self.identity, resume is not None, resumable=RESUMABLE_CHANGES, added=added_defaults()
        ):
            resume = None  # a run killed before it wrote run.json starts anew
        state = load_checkpoint(find_checkpoint(resume), self.identity, model) if resume is not None else None
        if d.world > 1:
            dist.barrier()  # every rank has checked the output directory before rank 0 writes to it
        self.teacher = _teacher_on(d.device, teacher, model, cfg.distill)
        self.tap = AttentionTap(cfg.attention_queries, cfg.far) if cfg.tapped_queries else None
        self._place(model)
        self.step, self.history, self.evals = 0, [], []
        self.resumed = state is not None
        if state is not None:
            self._restore(state)
        if progress and d.main:
            print(
                f"dha: {self.shape.steps} steps of {self.shape.tokens} tokens on {d.world} process(es), {d.device}, "
                f"autocast {self.dtype}, activation checkpointing {'on' if self.checkpointing else 'off'}",
                file=sys.stderr,
            )
        self.writer = self._open_outputs()
        self.predicted = self.shape.rows * (self.shape.width - 1)  # global number of target tokens per step
        self.loss_scale = d.world / self.predicted  # DDP/FSDP average over ranks; we want the global mean

    def _place(self, model: nn.Module) -> None:
        """Seeds torch and `random` with cfg.seed; the model on the device in storage of its own, its micro
        batch, activation checkpointing (and the loss's chunks, which need self.teacher set), the distributed
        wrapping and the optimizer."""
        cfg, d = self.cfg, self.d
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        storages = {p.data_ptr() for p in model.parameters()}
        self.module = model.to(d.device)
        own_storage(self.module, storages)
        self.module.train()
        self.per_rank = self.shape.rows // d.world
        self.micro = min(cfg.micro_batch, self.per_rank)
        chunk = head_chunk(self.module, self.teacher, d.world)
        self.checkpointing = choose_checkpointing(cfg, self.module, self.micro, self.shape.width, d, chunk > 0)
        set_checkpointing(self.module, self.checkpointing)
        self.head_chunk = chunk if self.checkpointing else 0  # positions per chunk of the loss's logits
        self.fsdp = cfg.fsdp and d.world > 1
        self.wrapped = wrap_distributed(self.module, self.fsdp, d)
        self.optimizer = build_optimizer(self.module, cfg, self.hooks, d.device)

    def _restore(self, state: dict) -> None:
        """Weights, optimizer, position, history and RNGs (and the hooks' state) of a checkpoint."""
        restore(self.module, self.optimizer, state, self.fsdp)
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        set_rng_state(state["rng"])
        if self.hooks.load_state_dict is not None:
            self.hooks.load_state_dict(state.get("hooks") or {}, self.step)
        if self.d.main:
            print(f"dha: resuming from {state['path']} at step {self.step}", file=sys.stderr)

    def _open_outputs(self):
        """Rank 0 with an out_dir: checkpoints/, run.json, log.jsonl (the history so far) and the
        TensorBoard writer (None elsewhere)."""
        if self.out_dir is None or not self.d.main:
            return None
        os.makedirs(os.path.join(self.out_dir, "checkpoints"), exist_ok=True)
        write_json(os.path.join(self.out_dir, "run.json"), self.identity)
        # The log restarts from the checkpoint's history: steps after it (from a killed run) go.
        with open(os.path.join(self.out_dir, "log.jsonl"), "w") as f:
            for record in _merged_log(self.history, self.evals):
                f.write(json.dumps(record) + "\n")
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only for a run that writes

        return SummaryWriter(os.path.join(self.out_dir, "tensorboard"), purge_step=self.step + 1 if self.step else None)

    def log(self, record: dict) -> None:
        """Append a train or eval record to log.jsonl and TensorBoard (rank 0 with an out_dir)."""
        if self.writer is None:
            return
        with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        prefix = "eval" if record["kind"] == "eval" else "train"
        for k, v in record.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def evaluate(self) -> None:
        """Held-out loss on the first eval_tokens of the held-out rows (no-op without them)."""
        if self.heldout is None:
            return
        rows = eval_rows(self.heldout, self.cfg.eval_tokens)
        loss, count = evaluate_heldout(self.wrapped, rows, self.cfg.micro_batch, self.d, self.dtype)
        record = {
            "kind": "eval",
            "step": self.step,
            "tokens": self.step * self.shape.tokens,
            "heldout_loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "heldout_tokens": count,
        }
        self.evals.append(record)
        self.log(record)

    def optimizer_step(self) -> dict:
        """Step self.step + 1 (module doc): schedule, this rank's rows, micro batches, update; the
        record it logs."""
        cfg, shape, d = self.cfg, self.shape, self.d
        self.step += 1
        t0 = time.perf_counter()
        factor = lr_factor(self.step, shape.steps, shape.warmup, cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = abs(g["peak_lr"]) * factor
        start = cfg.data_start + (self.step - 1) * shape.rows + d.rank * self.per_rank
        my_rows = self.rows[rows_at(self.rows.shape[0], cfg.seed, start, self.per_rank)]  # (per_rank, width)
        sums, extra_value, extra_scalars = self._accumulate(my_rows, start)
        grad_norm = self._update()
        all_sum(sums, d)
        lm = (sums[0] / self.predicted).item()  # waits for the step's queued work (CUDA is asynchronous): it is timed
        record = self._record(lm, sums, grad_norm, extra_value, extra_scalars, time.perf_counter() - t0)
        if self.hooks.on_step_end is not None:
            self.hooks.on_step_end(self.module, self.step, record)
        self.history.append(record)
        self.log(record)
        return record

    def _accumulate(self, my_rows: Tensor, start: int) -> tuple[Tensor, float, dict]:
        """Forward and backward of every micro batch, gradients accumulated (reduced across ranks on
        the last only); `start` is the data position of my_rows[0]. Returns the (LM, KD, AKD) loss
        sums and the hook's extra term and scalars."""
        sums = torch.zeros(4, dtype=torch.float64, device=self.d.device)  # LM, KD, AKD and FAR loss sums
        extra_value, extra_scalars = 0.0, {}
        starts = list(range(0, self.per_rank, self.micro))
        for i, s in enumerate(starts):
            last = i == len(starts) - 1
            batch = my_rows[s : s + self.micro]
            sync = last or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            ctx = self.wrapped.no_sync() if not sync else contextlib.nullcontext()
            if self.fsdp:
                self.module.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter on the last micro batch only
            batch, positions = self._as_trained(batch, start + s)
            # The attention tap spans the backward pass: checkpointed blocks run it again there.
            with ctx, self._attention_tap(batch.shape[1] - 1, positions):
                loss = self._micro_batch_loss(batch, sums, positions)
                if last and self.hooks.extra_loss is not None:
                    term, extra_scalars = self.hooks.extra_loss(self.module, self.step)
                    loss = loss + term
                    extra_value = float(term.detach())
                loss.backward()
        return sums, extra_value, extra_scalars

    def _as_trained(self, batch: Tensor, start: int) -> tuple[Tensor, Tensor | None]:
        """Rows at data positions start, start + 1, ... as trained on, on the device: with recall spans
        their copies written in, and their skipped positions (None: 0..W-2)."""
        cfg, where = self.cfg, torch.arange(start, start + batch.shape[0])
        positions = (
            skip_positions(batch.shape[1] - 1, cfg.position_span, cfg.seed, where) if cfg.position_span else None
        )
        if cfg.recall_tokens:
            batch = recall_rows(batch, cfg.recall_tokens, cfg.seed, where, positions)
        batch = batch.to(self.d.device, non_blocking=True)
        return batch, None if positions is None else positions.to(self.d.device, non_blocking=True)

    def _per_query(self, width: int) -> float:
        """(W - 1) / n: what turns the attention term's sum over a row's n queries into a share of
        the mean over its W - 1 predicted tokens, the scale of the other losses."""
        return width / min(self.cfg.attention_queries, width)

    def _attention_tap(self, width: int, positions: Tensor | None):
        """The student's attention tap (or nothing): its terms, per query as the mean over predicted
        tokens, join the backward pass at the micro batch's loss scale."""
        if self.tap is None:
            return contextlib.nullcontext()
        scale = self._per_query(width) * self.loss_scale
        cfg = self.cfg
        return self.tap.compare(
            self.module, cfg.attention_distill * scale, cfg.far_attention_distill * scale, positions
        )

    def _micro_batch_loss(self, batch: Tensor, sums: Tensor, positions: Tensor | None = None) -> Tensor:
        """The micro batch's objective sum, scaled to its share of the global mean; adds its LM
        (KD, AKD) sums to `sums`. positions: the inputs' skipped positions (None: 0..W-2). With the
        attention term, the student runs inside the tap's `compare` (entered by the caller)."""
        cfg, device = self.cfg, self.d.device
        inputs, targets = batch[:, :-1], batch[:, 1:]
        at = {} if positions is None else {"positions": positions}
        teacher_out = None  # the teacher's logits, or with a chunked head its final hidden states
        if cfg.distill:  # the teacher first: the attention term needs its distributions
            tap = self.tap.record(self.teacher, positions) if self.tap is not None else contextlib.nullcontext()
            with torch.no_grad(), _autocast(device, self.dtype), tap:
                teacher_out = (self.teacher.features if self.head_chunk else self.teacher)(inputs, **at)
        with _autocast(device, self.dtype):
            if self.head_chunk:
                hidden = self.wrapped.features(inputs, **at)
                args = (self.wrapped, hidden, targets, self.teacher, teacher_out, cfg.distill_temperature)
                lm_sum, kd_sum = chunked_loss_sums(*args, self.head_chunk)
            else:
                lm_sum, kd_sum = loss_sums(self.wrapped(inputs, **at), targets, teacher_out, cfg.distill_temperature)
        objective_sum = lm_sum
        if cfg.distill:
            objective_sum = (1 - cfg.distill_weight) * lm_sum + cfg.distill_weight * kd_sum
            sums[1] += kd_sum.detach().double()
        if self.tap is not None:  # its gradient is the tap's (_attention_tap); here its value
            sums[2] += self.tap.take().double() * self._per_query(inputs.shape[1])
            if cfg.far:
                sums[3] += self.tap.take("far").double() * self._per_query(inputs.shape[1])
        sums[0] += lm_sum.detach().double()
        return objective_sum * self.loss_scale

    def _update(self):
        """Ascent groups' gradients negated, descent gradients clipped, AdamW step; the gradient norm."""
        optimizer = self.optimizer
        for g in optimizer.param_groups:
            if g["ascent"]:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.neg_()
        descent = [p for g in optimizer.param_groups if not g["ascent"] for p in g["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            descent, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        )
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _record(
        self, lm: float, sums: Tensor, grad_norm, extra_value: float, extra_scalars: dict, seconds: float
    ) -> dict:
        """The step's log record: mean LM (and KD) loss over the global batch, the objective, lr, ..."""
        cfg, shape = self.cfg, self.shape
        record = {
            "kind": "train",
            "step": self.step,
            "tokens": self.step * shape.tokens,
            "loss": lm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": shape.tokens / seconds,
            "seconds": seconds,
        }
        objective = lm
        if cfg.distill:
            record["distill_loss"] = (sums[1] / self.predicted).item()
            objective = (1 - cfg.distill_weight) * lm + cfg.distill_weight * record["distill_loss"]
        if self.tap is not None:
            record["attention_distill_loss"] = (sums[2] / self.predicted).item()
            objective += cfg.attention_distill * record["attention_distill_loss"]
        if cfg.far:
            record["far_attention_distill_loss"] = (sums[3] / self.predicted).item()
            objective += cfg.far_attention_distill * record["far_attention_distill_loss"]
        if self.hooks.extra_loss is not None:
            record["extra_loss"] = extra_value
            objective += extra_value
            record.update({k: float(v) for k, v in extra_scalars.items()})
        record["objective"] = objective
        return record

    def checkpoint(self) -> None:
        hooks_state = self.hooks.state_dict() if self.hooks.state_dict is not None else None
        save_checkpoint(
            self.out_dir,
            self.module,
            self.optimizer,
            self.step,
            self.step * self.shape.rows,
            self.history,
            self.evals,
            self.identity,
            self.cfg,
            self.d,
            hooks_state,
        )

    def finish(self, loaded, save_final: bool, run_info: dict | None) -> TrainResult:
        """The trained model, unsharded; with an out_dir (rank 0) the writer closed and, when
        save_final, the final model saved there."""
        set_checkpointing(self.module, False)  # the model given back runs its blocks plainly again
        final = unwrap_full_model(self.module, self.fsdp, self.d)
        if self.writer is not None:
            self.writer.close()
        if self.writer is not None and save_final:
            trained = {
                "steps": self.step,
                "tokens": self.step * self.shape.tokens,
                "autocast": self.dtype,
                "activation_checkpointing": self.checkpointing,
                "config": asdict(self.cfg),
                "run": dict(run_info or {}),
            }
            save_final_model(self.out_dir, final, loaded, {"trained": trained})
        if self.d.world > 1:
            dist.barrier()
        return TrainResult(self.history, self.evals, final, self.step, self.out_dir, self.checkpointing)


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="training", file=sys.stderr, dynamic_ncols=True)


def _show_progress(bar, record: dict, evals: list[dict]) -> None:
    bar.update(1)
    postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
    if evals:
        postfix["heldout"] = f"{evals[-1]['heldout_loss']:.3f}"
    bar.set_postfix(postfix)


def _merged_log(history: list[dict], evals: list[dict]) -> list[dict]:
    """Train and eval records in the order they were logged (an eval at step s follows train step s)."""
    return sorted(history + evals, key=lambda r: (r["step"], r["kind"] == "eval"))
