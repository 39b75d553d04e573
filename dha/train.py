"""One training loop: continued pre-training, alone or under torchrun (DDP / FSDP), resumable.

Used for continued pre-training (`dha train`), for the training that follows a conversion
(`dha convert ... --tokens N`), and, through `Hooks`, by the fusion stage.

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
    KD = T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over predicted tokens
         (Hinton et al. 2015: the T^2 keeps gradient sizes comparable across temperatures)

Data order: the training rows are visited in epochs; epoch e is a permutation of all rows drawn
from a generator seeded by (seed, e). The data position (rows consumed) is an integer saved in
every checkpoint, so a resumed run reads exactly the rows the uninterrupted run would have.

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
The same command runs under torchrun; the process group is gloo on CPU and NCCL on GPU (one GPU
per process, cuda:LOCAL_RANK). `--fsdp` shards parameters, gradients and optimizer state with
FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per transformer block); otherwise DDP.
Only rank 0 writes files. One machine:

    torchrun --nproc_per_node 2 -m dha train SOURCE --data D --tokens N --out DIR [--fsdp]

Several machines (every node runs this, with its own --node_rank; all see DIR on shared storage,
which `--resume` also reads):

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST0:29500 -m dha train SOURCE --data D --tokens N --out DIR

Output directory
----------------
    run.json            what this run is (source, data, config, model): a directory holding a
                        different run is refused; resuming needs the same run
    log.jsonl           one JSON object per step ({"kind": "train", ...}) and per evaluation
                        ({"kind": "eval", ...})
    tensorboard/        TensorBoard events (torch.utils.tensorboard)
    checkpoints/        step_XXXXXXXX.pt, written atomically (temp file + rename); the newest
                        `keep_checkpoints` are kept; each holds model, optimizer, step, data
                        position, RNG states and the history so far
    model.safetensors, dha_config.json, tokenizer files
                        the final model as a native checkpoint (dha.checkpoint), so DIR is itself
                        a SOURCE for the other verbs
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError

RUN_FORMAT = "dha-train-run/1"
CHECKPOINT_FORMAT = "dha-train-checkpoint/1"
# TrainConfig fields that may differ between a run and its resumption: they do not change the
# trajectory of the weights.
RESUMABLE_CHANGES = {"eval_every", "save_every", "keep_checkpoints", "device"}


@dataclass
class TrainConfig:
    """Training settings. The defaults run on a laptop CPU; `dha train` builds its options from these."""

    tokens: int  # training tokens to read in total (global); steps = tokens // (tokens per step)
    block_size: int = 256  # tokens per row when the training data is a 1-D stream (2-D input keeps its width)
    batch_tokens: int = 4096  # global batch in tokens (all ranks, all accumulation micro batches)
    micro_batch: int = 4  # rows per forward/backward on one rank; gradient accumulation makes up the rest
    lr: float = 3e-4  # peak learning rate of the default parameter group
    min_lr_ratio: float = 0.1  # the cosine schedule ends at min_lr_ratio * lr
    warmup_steps: int | None = None  # linear warm-up steps; None: 5% of the steps (at least 1)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on matrices only (not norms, biases)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # Autocast dtype of forward passes: "auto" | "bfloat16" | "float16" | "float32" (= off); weights
    # stay as loaded. "auto": bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs
    # with AVX512-BF16 or AMX), else float32: on an AVX2-only CPU bf16 matmuls are emulated and a
    # training step is ~15x slower than fp32 (measured here, AMD EPYC, torch 2.13).
    dtype: str = "auto"
    eval_every: int = 50  # held-out evaluation every this many steps (and before the first and after the last)
    eval_tokens: int = 8192  # held-out tokens per evaluation (the first rows of the held-out blocks)
    save_every: int = 0  # checkpoint every this many steps (needs an output dir); 0: none
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # data order (and the torch/python RNGs, for hooks that sample)
    data_start: int = 0  # rows of the seeded data order already read (a later stage starts where an earlier one stopped)
    distill: bool = False  # add the KL to the teacher's logits
    distill_weight: float = 0.5  # w in (1 - w) * LM + w * KD
    distill_temperature: float = 1.0  # T in the KD term
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu

    def validate(self) -> None:
        checks = [
            (self.tokens >= 1, f"tokens must be at least 1, got {self.tokens}"),
            (self.data_start >= 0, f"data start must be >= 0, got {self.data_start}"),
            (self.block_size >= 2, f"block size must be at least 2 (one input and one target), got {self.block_size}"),
            (self.batch_tokens >= 1, f"batch tokens must be at least 1, got {self.batch_tokens}"),
            (self.micro_batch >= 1, f"micro batch must be at least 1, got {self.micro_batch}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min lr ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, f"warmup steps must be >= 0, got {self.warmup_steps}"),
            (self.grad_clip >= 0, f"grad clip must be >= 0, got {self.grad_clip}"),
            (self.dtype == "auto" or self.dtype in AUTOCAST_DTYPES,
             f"dtype must be auto or one of {', '.join(AUTOCAST_DTYPES)}, got {self.dtype!r}"),
            (self.eval_every >= 0 and self.save_every >= 0, "eval every / save every must be >= 0"),
            (self.eval_tokens >= 1, f"eval tokens must be at least 1, got {self.eval_tokens}"),
            (self.keep_checkpoints >= 1, f"keep checkpoints must be at least 1, got {self.keep_checkpoints}"),
            (0.0 <= self.distill_weight <= 1.0, f"distill weight must be in [0, 1], got {self.distill_weight}"),
            (self.distill_temperature > 0, f"distill temperature must be > 0, got {self.distill_temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


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
    The model passed is the unwrapped module (under FSDP its parameters are sharded DTensors).
    """

    extra_loss: Callable[[nn.Module, int], tuple[Tensor, dict]] | None = None
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    on_step_end: Callable[[nn.Module, int, dict], None] | None = None


@dataclass
class TrainResult:
    history: list[dict]  # per step: step, tokens, loss (LM), objective, lr, grad_norm, tokens_per_s, ...
    evals: list[dict]  # step, tokens, heldout_loss, ppl
    model: nn.Module  # the trained model (unwrapped; on the training device)
    steps: int = 0
    out_dir: str | None = None


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


# ---- distributed setup ---------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank) if device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), dev)
    return Dist(0, 1, dev)


def _all_sum(t: Tensor, d: Dist) -> Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


# ---- data ----------------------------------------------------------------------------------------

def as_blocks(data, block_size: int, what: str) -> Tensor:
    """A 1-D token stream cut into (n, block_size) rows, or 2-D rows as given."""
    from .data import DataError, blocks

    if not isinstance(data, Tensor):
        data = torch.as_tensor(data)
    if data.dim() == 1:
        if data.numel() < block_size:
            raise DataError(f"{what} data has {data.numel()} tokens, shorter than one block of {block_size}: "
                            "use more data or a smaller --block-size")
        return blocks(data.long(), block_size)
    if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise DataError(f"{what} data must be a 1-D token stream or (n, block) rows with n >= 1 and block >= 2, "
                        f"got shape {tuple(data.shape)}")
    return data.long()


def epoch_order(num_rows: int, seed: int, epoch: int) -> Tensor:
    """The order rows are read in during `epoch`: a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=g)


def rows_at(num_rows: int, seed: int, start: int, count: int) -> Tensor:
    """Row indices at global data positions [start, start + count) (may cross epochs)."""
    out, position = [], start
    while position < start + count:
        epoch, offset = divmod(position, num_rows)
        take = min(num_rows - offset, start + count - position)
        out.append(epoch_order(num_rows, seed, epoch)[offset:offset + take])
        position += take
    return torch.cat(out)


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
        raise UserError(f"the global batch of {rows} blocks ({cfg.batch_tokens} tokens / {width}) does not split "
                        f"evenly over {world} processes: choose batch tokens a multiple of {world * width}")
    steps = cfg.tokens // (rows * width)
    if steps < 1:
        raise UserError(f"--tokens {cfg.tokens} is smaller than one optimizer step ({rows * width} tokens = "
                        f"{rows} blocks of {width}): raise --tokens or lower --batch-tokens")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * steps))
    return StepShape(rows, width, steps, min(warmup, steps))


# ---- output directory, run identity, checkpoints -------------------------------------------------

def run_identity(cfg: TrainConfig, model: nn.Module, run_info: dict | None) -> dict:
    model_cfg = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else None
    return {"format": RUN_FORMAT, "run": dict(run_info or {}), "config": asdict(cfg), "model": model_cfg}


def _same_run(a: dict, b: dict) -> list[str]:
    """Names of what differs between two run identities (ignoring fields that may change on resume)."""
    diffs = [k for k in ("format", "run", "model") if a.get(k) != b.get(k)]
    ca, cb = a.get("config", {}), b.get("config", {})
    default = {f.name: f.default for f in fields(TrainConfig)}  # a field added since a run was written has its default there
    diffs += [f"config.{k}" for k in sorted(set(ca) | set(cb))
              if k not in RESUMABLE_CHANGES and ca.get(k, default.get(k)) != cb.get(k, default.get(k))]
    return diffs


def check_out_dir(out_dir: str, identity: dict, resuming: bool) -> None:
    """Refuse an output directory that holds something else or a different run (read-only check)."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise UserError(f"output {out_dir} exists and is not a directory")
    entries = [e for e in os.listdir(out_dir) if not e.startswith(".")]
    if not entries:
        return
    run_path = os.path.join(out_dir, "run.json")
    if not os.path.exists(run_path):
        raise UserError(f"output {out_dir} is not empty and holds no training run (run.json): use a new --out")
    try:
        with open(run_path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{run_path} is unreadable ({e}): use a new --out") from None
    diffs = _same_run(old, identity)
    if diffs:
        raise UserError(f"output {out_dir} holds a different run (differs in {', '.join(diffs)}): use a new --out")
    if not resuming:
        raise UserError(f"output {out_dir} already holds this run: pass --resume {out_dir} to continue it, or use a new --out")


def find_checkpoint(resume: str) -> str:
    """`resume` is a run directory (its newest checkpoint), a checkpoints/ directory, or a file."""
    if os.path.isfile(resume):
        return resume
    for d in (os.path.join(resume, "checkpoints"), resume):
        found = sorted(glob.glob(os.path.join(d, "step_*.pt")))
        if found:
            return found[-1]
    if not os.path.exists(resume):
        raise UserError(f"resume directory not found: {resume}")
    raise UserError(f"{resume} holds no training checkpoint (checkpoints/step_*.pt)")


def load_checkpoint(path: str, identity: dict, model: nn.Module) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a dha training checkpoint")
    if state["identity"].get("model") != identity.get("model"):
        raise UserError(f"checkpoint {path} is from another model (different architecture) than the one being trained")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    if ours != theirs:
        raise UserError(f"checkpoint {path} is from another model: its weights do not match this model's")
    diffs = _same_run(state["identity"], identity)
    if diffs:
        raise UserError(f"checkpoint {path} belongs to a different run (differs in {', '.join(diffs)})")
    state["path"] = path
    return state


def _atomic_torch_save(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json_atomic(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state(module: nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (a collective under FSDP: every rank calls it)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model_sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return model_sd, copy.deepcopy(optimizer.state_dict())


def _load_full_state(module: nn.Module, optimizer, model_sd: dict, optim_sd: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(model_sd, strict=True)
        optimizer.load_state_dict(optim_sd)


# ---- optimizer -----------------------------------------------------------------------------------

def build_optimizer(module: nn.Module, cfg: TrainConfig, hooks: Hooks, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the hook's groups plus a default group; each group remembers its signed peak lr."""
    groups, seen = [], set()
    for g in (hooks.param_groups(module) if hooks.param_groups else []):
        g = dict(g)
        params = [p for p in g.pop("params") if p.requires_grad]
        if any(id(p) in seen for p in params):
            raise ValueError("a parameter appears in two parameter groups")
        seen.update(id(p) for p in params)
        peak = float(g.pop("lr", cfg.lr))
        ascent = peak < 0
        g.setdefault("weight_decay", 0.0 if ascent else cfg.weight_decay)
        groups.append({"params": params, "lr": abs(peak), "peak_lr": peak, "ascent": ascent, **g})
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
    matrices = [p for p in rest if p.dim() >= 2]
    vectors = [p for p in rest if p.dim() < 2]
    # Decay matrices only: norms' gains and biases are not shrunk toward 0 (nanoGPT's configure_optimizers).
    groups.insert(0, {"params": matrices, "lr": cfg.lr, "peak_lr": cfg.lr, "ascent": False, "weight_decay": cfg.weight_decay})
    groups.insert(1, {"params": vectors, "lr": cfg.lr, "peak_lr": cfg.lr, "ascent": False, "weight_decay": 0.0})
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def own_storage(module: nn.Module, storages: set[int]) -> None:
    """Give every parameter of `module` that still lies in one of `storages` (the model's before
    it was moved to the training device) a copy of its own: training, and loading a checkpoint
    to resume, write into no tensor the caller may share with another model
    (`dha.compress.aligned_merge` shares all but the attention weights with its source, which is
    often the teacher)."""
    for p in module.parameters():
        if p.data_ptr() in storages:
            p.data = p.data.clone()


# ---- the loop ------------------------------------------------------------------------------------

def _autocast(device: torch.device, dtype_name: str):
    dtype = AUTOCAST_DTYPES[dtype_name]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


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
        idx = torch.tensor(mine[start:start + micro_batch])
        w = torch.tensor(weights[start:start + micro_batch], device=d.device)
        batch = rows[idx].to(d.device)
        with _autocast(d.device, dtype_name):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        loss = loss.view(batch.shape[0], -1).sum(1)  # (b,)
        total[0] += (loss * w).sum().double()
        total[1] += w.sum().double() * (rows.shape[1] - 1)
    _all_sum(total, d)
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
) -> TrainResult:
    """Train `model` in place on `train_stream_or_blocks` (1-D stream or (n, width) rows).

    heldout_blocks: 1-D stream or rows for the held-out evaluation (None: no evaluation).
    teacher: the model to distil from when cfg.distill (None: a frozen copy of `model` as given).
    out_dir: where rank 0 writes run.json, logs, checkpoints and the final model (None: nothing).
    resume: a run directory, its checkpoints/ directory or a checkpoint file to continue from.
    run_info: what identifies the run besides config and model (source, data), kept in run.json.
    loaded: a dha.checkpoint.Loaded whose tokenizer, hf_config, plan and provenance the final model
        is saved with (None: the model alone).
    """
    cfg.validate()
    hooks = hooks or Hooks()
    d = setup_distributed(cfg.device)
    dtype = resolve_dtype(cfg.dtype, d.device)
    rows = as_blocks(train_stream_or_blocks, cfg.block_size, "training")
    heldout = as_blocks(heldout_blocks, cfg.block_size, "held-out") if heldout_blocks is not None else None
    shape = step_shape(cfg, rows.shape[1], d.world)
    identity = run_identity(cfg, model, run_info)
    if out_dir is not None:
        check_out_dir(out_dir, identity, resuming=resume is not None)
    state = load_checkpoint(find_checkpoint(resume), identity, model) if resume is not None else None
    if d.world > 1:
        dist.barrier()  # every rank has checked the output directory before rank 0 writes to it
    if cfg.distill and teacher is None:
        teacher = copy.deepcopy(model)  # the model as given, before any step
    if teacher is not None:
        # Only moved and put in eval mode: its forward runs under no_grad. (Not requires_grad_(False):
        # a teacher may share tensors with the student, as a fused model shares its source's.)
        teacher = teacher.to(d.device).eval()

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    storages = {p.data_ptr() for p in model.parameters()}
    module = model.to(d.device)
    own_storage(module, storages)
    module.train()
    wrapped = module
    if d.world > 1 and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(module, "layers", []):
            fully_shard(block)
        fully_shard(module)
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    optimizer = build_optimizer(module, cfg, hooks, d.device)

    step, history, evals = 0, [], []
    if state is not None:
        _load_full_state(module, optimizer, state["model"], state["optimizer"], cfg.fsdp and d.world > 1)
        step, history, evals = state["step"], state["history"], state["evals"]
        _set_rng_state(state["rng"])
        if d.main:
            print(f"dha: resuming from {state['path']} at step {step}", file=sys.stderr)
    if progress and d.main:
        print(f"dha: {shape.steps} steps of {shape.tokens} tokens on {d.world} process(es), {d.device}, "
              f"autocast {dtype}", file=sys.stderr)

    writer = None
    if out_dir is not None and d.main:
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        _write_json_atomic(os.path.join(out_dir, "run.json"), identity)
        # The log restarts from the checkpoint's history: steps after it (from a killed run) go.
        with open(os.path.join(out_dir, "log.jsonl"), "w") as f:
            for record in _merged_log(history, evals):
                f.write(json.dumps(record) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step + 1 if step else None)

    def log(record: dict) -> None:
        if out_dir is None or not d.main:
            return
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        prefix = "eval" if record["kind"] == "eval" else "train"
        for k, v in record.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)):
                writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def run_eval() -> None:
        if heldout is None:
            return
        n = max(1, min(heldout.shape[0], cfg.eval_tokens // heldout.shape[1]))
        loss, count = evaluate_heldout(wrapped, heldout[:n], cfg.micro_batch, d, dtype)
        record = {"kind": "eval", "step": step, "tokens": step * shape.tokens, "heldout_loss": loss,
                  "ppl": math.exp(min(loss, 700.0)), "heldout_tokens": count}
        evals.append(record)
        log(record)

    if state is None and cfg.eval_every:
        run_eval()  # the starting point

    per_rank = shape.rows // d.world
    micro = min(cfg.micro_batch, per_rank)
    predicted = shape.rows * (shape.width - 1)  # global number of target tokens per step
    loss_scale = d.world / predicted  # DDP/FSDP average over ranks; we want the global mean
    bar = None
    if progress and d.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=shape.steps, initial=step, unit="step", desc="training", file=sys.stderr, dynamic_ncols=True)
    tokens_per_s = 0.0
    while step < shape.steps:
        step += 1
        t0 = time.perf_counter()
        factor = lr_factor(step, shape.steps, shape.warmup, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = abs(g["peak_lr"]) * factor
        start = cfg.data_start + (step - 1) * shape.rows + d.rank * per_rank
        my_rows = rows[rows_at(rows.shape[0], cfg.seed, start, per_rank)]  # (per_rank, width)
        sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # LM and KD loss sums
        extra_scalars: dict = {}
        extra_value = 0.0
        starts = list(range(0, per_rank, micro))
        for i, s in enumerate(starts):
            last = i == len(starts) - 1
            batch = my_rows[s:s + micro].to(d.device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            sync = last or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
            ctx = wrapped.no_sync() if not sync else contextlib.nullcontext()
            if cfg.fsdp and d.world > 1:
                module.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter on the last micro batch only
            with ctx:
                with _autocast(d.device, dtype):
                    logits = wrapped(inputs)
                lm_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
                objective_sum = lm_sum
                if cfg.distill:
                    with torch.no_grad(), _autocast(d.device, dtype):
                        teacher_logits = teacher(inputs)
                    kd_sum = distill_loss_sum(logits, teacher_logits, cfg.distill_temperature)
                    objective_sum = (1 - cfg.distill_weight) * lm_sum + cfg.distill_weight * kd_sum
                    sums[1] += kd_sum.detach().double()
                sums[0] += lm_sum.detach().double()
                loss = objective_sum * loss_scale
                if last and hooks.extra_loss is not None:
                    term, extra_scalars = hooks.extra_loss(module, step)
                    loss = loss + term
                    extra_value = float(term.detach())
                loss.backward()
        for g in optimizer.param_groups:
            if g["ascent"]:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.neg_()
        descent = [p for g in optimizer.param_groups if not g["ascent"] for p in g["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(descent, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _all_sum(sums, d)
        seconds = time.perf_counter() - t0
        tokens_per_s = shape.tokens / seconds
        lm = (sums[0] / predicted).item()
        record = {"kind": "train", "step": step, "tokens": step * shape.tokens, "loss": lm,
                  "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens_per_s, "seconds": seconds}
        objective = lm
        if cfg.distill:
            record["distill_loss"] = (sums[1] / predicted).item()
            objective = (1 - cfg.distill_weight) * lm + cfg.distill_weight * record["distill_loss"]
        if hooks.extra_loss is not None:
            record["extra_loss"] = extra_value
            objective += extra_value
            record.update({k: float(v) for k, v in extra_scalars.items()})
        record["objective"] = objective
        if hooks.on_step_end is not None:
            hooks.on_step_end(module, step, record)
        history.append(record)
        log(record)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == shape.steps):
            run_eval()
        if bar is not None:
            bar.update(1)
            postfix = {"loss": f"{lm:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if evals:
                postfix["heldout"] = f"{evals[-1]['heldout_loss']:.3f}"
            bar.set_postfix(postfix)
        if out_dir is not None and cfg.save_every and step % cfg.save_every == 0 and step < shape.steps:
            save_checkpoint(out_dir, module, optimizer, step, step * shape.rows, history, evals, identity, cfg, d)
    if bar is not None:
        bar.close()
    if not cfg.eval_every and heldout is not None and (not evals or evals[-1]["step"] != step):
        run_eval()  # eval_every 0: one evaluation, at the end

    final = unwrap_full_model(module, cfg.fsdp and d.world > 1)
    if out_dir is not None and d.main:
        writer.close()
        save_final_model(out_dir, final, loaded, {"trained": {"steps": step, "tokens": step * shape.tokens, "autocast": dtype, "config": asdict(cfg),
                                                              "run": dict(run_info or {})}})
    if d.world > 1:
        dist.barrier()
    return TrainResult(history, evals, final, step, out_dir)


def _merged_log(history: list[dict], evals: list[dict]) -> list[dict]:
    """Train and eval records in the order they were logged (an eval at step s follows train step s)."""
    return sorted(history + evals, key=lambda r: (r["step"], r["kind"] == "eval"))


def save_checkpoint(out_dir: str, module, optimizer, step: int, data_position: int, history, evals, identity,
                    cfg: TrainConfig, d: Dist) -> None:
    """Write checkpoints/step_XXXXXXXX.pt atomically (rank 0), then drop all but the newest few."""
    model_sd, optim_sd = _full_state(module, optimizer, cfg.fsdp and d.world > 1)
    if not d.main:
        return
    directory = os.path.join(out_dir, "checkpoints")
    path = os.path.join(directory, f"step_{step:08d}.pt")
    _atomic_torch_save({"format": CHECKPOINT_FORMAT, "identity": identity, "model": model_sd, "optimizer": optim_sd,
                        "step": step, "data_position": data_position,  # rows consumed, all ranks together
                        "history": list(history), "evals": list(evals), "rng": _rng_state()}, path)
    for old in sorted(glob.glob(os.path.join(directory, "step_*.pt")))[:-cfg.keep_checkpoints]:
        os.unlink(old)


def unwrap_full_model(module: nn.Module, fsdp: bool) -> nn.Module:
    """The trained model as a plain module: under FSDP, a fresh unsharded copy of the gathered weights."""
    if not fsdp:
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .transforms import build

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    sd = {k: v.detach().clone() for k, v in sd.items()}
    return build(module.config, sd)


def save_final_model(out_dir: str, model: nn.Module, loaded, provenance: dict) -> None:
    """Write the native checkpoint files into `out_dir` (beside the logs), each by rename.

    dha_config.json goes last: a directory holding it holds a complete model."""
    from .checkpoint import Loaded, NATIVE_CONFIG, write_native

    if loaded is not None:
        prov = dict(loaded.provenance or {})
        prov.update(provenance)
        out = Loaded(model, loaded.tokenizer, loaded.source, "native", loaded.hf_config, loaded.plan, prov)
    else:
        out = Loaded(model, None, "train", "native", None, None, provenance)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".final-")
    try:
        write_native(tmp, out)
        names = sorted(os.listdir(tmp), key=lambda n: n == NATIVE_CONFIG)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# ---- from a SOURCE and DATA (the `train` verb, and `convert --tokens`) ----------------------------

def continue_training(
    loaded,
    data: str | None,
    cfg: TrainConfig,
    *,
    out_dir: str | None = None,
    teacher: nn.Module | None = None,
    hooks: Hooks | None = None,
    resume: str | None = None,
    progress: bool = True,
    text_field: str = "text",
    heldout_fraction: float = 0.1,
    run_info: dict | None = None,
) -> TrainResult:
    """Train `loaded.model` on DATA (tokenised with `loaded.tokenizer`, see dha.data.load_tokens).

    The model is trained in place (loaded.model is set to the trained model), in its own dtype
    (load it in float32 for training; cfg.dtype is only the autocast dtype). With out_dir, the
    final model is saved there with loaded's tokenizer, hf_config, plan and provenance.
    run_info identifies the run in run.json (default: source and data as named)."""
    from .data import load_tokens

    splits = load_tokens(data, loaded.tokenizer, text_field=text_field, heldout_fraction=heldout_fraction)
    if run_info is None:
        run_info = {"source": loaded.source, "data": splits.source, "text_field": text_field}
    heldout = splits.heldout if splits.heldout.numel() >= cfg.block_size else None
    if heldout is None and progress:
        print(f"dha: warning: {splits.source} has {splits.heldout.numel()} held-out tokens, less than one block: "
              "no held-out evaluation", file=sys.stderr)
    result = train(loaded.model, splits.train, heldout, cfg, teacher=teacher, hooks=hooks, out_dir=out_dir,
                   resume=resume, progress=progress, run_info=run_info, loaded=loaded)
    loaded.model = result.model
    return result


def source_identity(source: str | None) -> str:
    """The SOURCE as a stable name for run.json: an absolute path when it is a path."""
    from .checkpoint import DEFAULT_SOURCE

    if source is None:
        return DEFAULT_SOURCE
    return os.path.abspath(source) if os.path.exists(source) else source
