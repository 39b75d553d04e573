"""The settings the command and the methods share, with their defaults, in a module without torch:
`dha --help` shows them without importing torch.

- TrainConfig: the one training loop's settings (dha.train), and the training options of `dha
  train` and `dha convert --tokens`.
- The merge's defaults (dha.merge, dha.calibration): the position-free key pairs' rule.
- The DHA pipeline's defaults (dha.pipeline): the fusion fraction and the merges.
- Where dha caches what it can compute again (`cache_dir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError

# The position-free key pairs (dha.calibration.free_pairs_for): by default, the RoPE pairs of the keys
# that turn by at most FREE_ANGLE radians over the model's positions (at least FREE_CONTEXT tokens).
# Chosen by measurement on SmolLM2 (docs/method.md, "Position-free pairs"; over its 8,192
# positions: docs/longcontext.md).
FREE_ANGLE = 0.5
FREE_CONTEXT = 2048

# The DHA pipeline: the share of the training tokens spent fusing before the merge, and what each
# group becomes. Measured on the demo setting (docs/method.md, "The recipe"): at a small token
# budget the steps spent moving from the source to the merge cost more than they keep, so by
# default the aligned merge is taken at once and every step trains the merged model.
DEFAULT_FUSION_FRACTION = 0.0
MERGES = ("aligned", "mean")


def cache_dir() -> str:
    """Where dha keeps what it can compute again (tokenised text, the built-in model's files): $DHA_CACHE,
    else ~/.cache/dha."""
    return os.environ.get("DHA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dha"))


AUTOCAST_NAMES = ("bfloat16", "float16", "float32")  # dha.train maps them to torch dtypes
CHECKPOINTING = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Training settings. The defaults run on a laptop CPU; `dha train` builds its options from these."""

    tokens: int  # training tokens to read in total (global); steps = tokens // (tokens per step)
    block_size: int = 256  # tokens per row when the training data is a 1-D stream (2-D input keeps its width)
    batch_tokens: int = 4096  # global batch in tokens (all ranks, all accumulation micro batches)
    micro_batch: int = 4  # rows per forward/backward on one rank; gradient accumulation makes up the rest
    lr: float = 1.5e-4  # peak learning rate of the default parameter group (chosen on the demo setting: docs/method.md)
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
    data_start: int = (
        0  # rows of the seeded data order already read (a later stage starts where an earlier one stopped)
    )
    distill: bool = False  # add the KL to the teacher's logits
    distill_weight: float = 0.5  # w in (1 - w) * LM + w * KD
    distill_temperature: float = 1.0  # T in the KD term
    # Attention distillation (dha.attention_kd): weight of the KL between the teacher's and the
    # student's attention of each row's last `attention_queries` positions; 0: off. Needs distill.
    attention_distill: float = 0.0
    attention_queries: int = 256
    # The far term (dha.attention_kd): weight of the KL between the same queries' attention over the
    # keys at least `far_distance` positions back only, renormalized; 0: off. Needs distill.
    far_attention_distill: float = 0.0
    far_distance: int = 2048
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    # Activation checkpointing of the decoder blocks (Transformer.checkpoint_blocks): "on" | "off" |
    # "auto": on when a micro batch's activations fit the device's free memory only with it
    # (choose_checkpointing). It trades one more forward pass of the blocks for their activations.
    activation_checkpointing: str = "auto"
    # Skipped positions (positional skip-wise training, PoSE): each row's positions spread over this
    # many, so that rows of block_size tokens teach attention over distances up to position_span
    # (dha.rows.skip_positions); 0: positions 0..block_size-1.
    position_span: int = 0
    # Recall spans: the last `recall_tokens` tokens of each training row repeat as many tokens of its
    # first part (before the skip, with position_span), so that predicting them takes keys up to the
    # row's whole span back (dha.rows.recall_rows); 0: off.
    recall_tokens: int = 0

    @property
    def tapped_queries(self) -> int:
        """Queries per row the attention terms read (dha.attention_kd): 0 when both are off."""
        return self.attention_queries if self.attention_distill or self.far_attention_distill else 0

    @property
    def far(self) -> int:
        """The far term's distance (dha.attention_kd): 0 when it is off."""
        return self.far_distance if self.far_attention_distill else 0

    def validate(self) -> None:
        checks = [
            (self.tokens >= 1, f"tokens must be at least 1, got {self.tokens}"),
            (self.data_start >= 0, f"data start must be >= 0, got {self.data_start}"),
            (self.block_size >= 2, f"block size must be at least 2 (one input and one target), got {self.block_size}"),
            (self.batch_tokens >= 1, f"batch tokens must be at least 1, got {self.batch_tokens}"),
            (self.micro_batch >= 1, f"micro batch must be at least 1, got {self.micro_batch}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min lr ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (
                self.warmup_steps is None or self.warmup_steps >= 0,
                f"warmup steps must be >= 0, got {self.warmup_steps}",
            ),
            (self.grad_clip >= 0, f"grad clip must be >= 0, got {self.grad_clip}"),
            (
                self.dtype == "auto" or self.dtype in AUTOCAST_NAMES,
                f"dtype must be auto or one of {', '.join(AUTOCAST_NAMES)}, got {self.dtype!r}",
            ),
            (self.eval_every >= 0 and self.save_every >= 0, "eval every / save every must be >= 0"),
            (self.eval_tokens >= 1, f"eval tokens must be at least 1, got {self.eval_tokens}"),
            (
                self.position_span == 0 or self.position_span > self.block_size,
                f"position span must be 0 (off) or more than the block size ({self.block_size}), "
                f"got {self.position_span}",
            ),
            (
                self.recall_tokens >= 0 and 2 * self.recall_tokens < self.block_size,
                f"recall tokens must be >= 0 and less than half the block size ({self.block_size}), "
                f"got {self.recall_tokens}",
            ),
            (self.keep_checkpoints >= 1, f"keep checkpoints must be at least 1, got {self.keep_checkpoints}"),
            (0.0 <= self.distill_weight <= 1.0, f"distill weight must be in [0, 1], got {self.distill_weight}"),
            (self.distill_temperature > 0, f"distill temperature must be > 0, got {self.distill_temperature}"),
            (self.attention_distill >= 0, f"attention distill must be >= 0, got {self.attention_distill}"),
            (
                self.attention_distill == 0 or self.distill,
                "attention distillation needs a teacher: add --distill",
            ),
            (
                self.far_attention_distill >= 0,
                f"far attention distill must be >= 0, got {self.far_attention_distill}",
            ),
            (
                self.far_attention_distill == 0 or self.distill,
                "far attention distillation needs a teacher: add --distill",
            ),
            (self.far_distance >= 1, f"far distance must be at least 1, got {self.far_distance}"),
            (self.attention_queries >= 1, f"attention queries must be at least 1, got {self.attention_queries}"),
            (
                self.activation_checkpointing in CHECKPOINTING,
                (
                    f"activation checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                    f"got {self.activation_checkpointing!r}"
                ),
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# ---- the fusion stage (dha.fuse) ------------------------------------------------------------

SCHEDULES = ("ramp", "lagrangian", "anneal")


@dataclass
class FusionOptions:
    # What the groups fuse toward is the merge (DHAConfig.merge: the merges FusedModel is given, or
    # the group means without them), not an option of the schedule.
    # "anneal" (default): the members are interpolated toward their merge, a ramped from 0 to 1
    # between ramp_start and ramp_end (then the fused model IS the merged one) + the ramped loss |
    # "ramp": only the fusion-loss weight is ramped | "lagrangian": d <= target with learned multipliers.
    schedule: str = "anneal"
    weight: float = 10.0  # ramp: the fusion-loss weight reached at `ramp_end`
    ramp_start: float = 0.0  # fraction of the fusion steps where the ramp starts
    ramp_end: float = 0.5  # fraction of the fusion steps where it ends
    eps: float = 1e-3  # lagrangian: target distance per layer and kind at the end of the target ramp
    multiplier_lr: float = 0.05  # lagrangian: learning rate of the multipliers (gradient ascent)
    train_base: bool = True  # the source K/V projection weights W_j train too
    learn_maps: bool = True  # the merge maps A, B train too (else they stay at their start)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"fusion schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.ramp_start <= self.ramp_end <= 1.0:
            raise UserError(f"need 0 <= ramp_start <= ramp_end <= 1, got {self.ramp_start}, {self.ramp_end}")
        if self.weight < 0 or self.eps < 0 or self.multiplier_lr <= 0:
            raise UserError("fusion weight and eps must be >= 0, the multiplier learning rate > 0")
