"""Does a verb's work fit on its device? The fit check, made from the model's config before any weight is read
(or, for `bench`'s points, before anything beyond the loaded weights is allocated).

`estimate(cfg, dtype, work)` says how many bytes the device holds at the peak of `work`, two ways:

- whole: the model on the device in its load dtype, plus the working memory (the calibration
  sweeps of `dha.layerwise`, the merged model's new attention tensors, training's gradients and
  AdamW moments, ...);
- layer by layer (`--offload`): the model stays in CPU memory (memory-mapped) and the device holds
  its largest decoder layer in the compute dtype (float32), the hidden states of every calibration
  token, one batch's activations, or the closed-form merge of one layer in float64. None when the
  work cannot go layer by layer (training, `prune`, generation).

Generation (`bench`'s prefill and decode points, `generation_bytes`): the KV cache of the prompt
and the new tokens, and the largest prefill activations alive at once.

The terms follow what the code allocates (docs/scaling.md, "The fit check" and "GPU memory");
they are estimates, not measurements: the allocator's own slack, the CUDA context and the
libraries' workspaces (cuBLAS: tens of MiB) are not counted. `free_memory(device)` is what the
device has: torch.cuda.mem_get_info on CUDA, MemAvailable of /proc/meminfo on the CPU.
`check_fit` compares the two and raises a UserError with the numbers when the work cannot fit,
or fits on a GPU only with --offload. On the CPU the weights are not counted: they stay in the
memory-mapped checkpoint (training's float32 copies excepted); nor are they, on any device, for a
model already loaded there (`loaded`: bench reads the free memory after loading). Training counts
one micro-batch's activations with activation checkpointing unless it is off
(`activation_bytes`); `training_fit` says whether a training run fits with and without it;
`step_bytes` is what dha.train's "auto" rule weighs.

Shape legend: P parameters, D hidden size, F MLP size, H query heads, n key + value heads of a
layer, hd head dim, V vocabulary, N calibration tokens, B blocks of T tokens in a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .layerwise import LM_HEAD_CHUNK_BYTES
from .model import NLL_CHUNK_BYTES, ModelConfig, Transformer, logit_chunk

GiB = 2**30


@dataclass(frozen=True)
class Training:
    """The training part of a verb's work: rows of `block_size` tokens, `micro_batch` at a time."""

    micro_batch: int = 4
    block_size: int = 256
    shards: int = 1  # FSDP: weights, gradients and optimizer state are split over this many processes
    teacher_parameters: int = 0  # a --teacher model beside the source (float32 on the device)
    # Activation checkpointing (dha.options.TrainConfig.activation_checkpointing): "on" and "auto"
    # count a checkpointed micro-batch's activations ("auto" turns it on where only that fits).
    checkpointing: str = "auto"
    distill: bool = False  # the KL to a teacher's logits (TrainConfig.distill)
    attention_queries: int = 0  # queries per row of the attention KL (dha.attention_kd); 0: none
    far_attention: bool = False  # the far term beside it: a second distribution per query (dha.attention_kd)
    # With checkpointing, the loss's logits made a chunk of positions at a time (dha.train.head_chunk:
    # our own model in one process), not whole.
    chunked_head: bool = False


@dataclass(frozen=True)
class Generation:
    """A prefill of `context` tokens in each of `batch_size` rows into a KV cache of context +
    `new_tokens` positions, then `new_tokens` decode steps (one point of dha.bench)."""

    batch_size: int
    context: int
    new_tokens: int


@dataclass(frozen=True)
class Work:
    """What a verb runs on the device (the defaults: nothing but holding the model)."""

    calib_tokens: int = 0  # calibration tokens swept layer by layer
    calib_block: int = 256  # tokens per calibration block (T)
    batch: int = 4  # calibration blocks per batch (B)
    gradients: bool = False  # a backward sweep too (the DHA cost search's loss gradients)
    merge: str | None = None  # "aligned": the closed-form merge, float64 on the device | "mean" | None: no new model
    eval_tokens: int = 0  # held-out tokens scored at the end (DHA's report table), windows of eval_block
    eval_block: int = 512
    all_layer_inputs: bool = False  # prune: every layer's attention input at once, from whole-model passes
    training: Training | None = None
    generation: Generation | None = None


@dataclass
class Estimate:
    """Bytes on the device at the peak, as (label, bytes) parts: with the whole model there, and
    with one layer at a time there (None: this work needs the whole model on its device)."""

    whole: list[tuple[str, int]]
    layer: list[tuple[str, int]] | None
    mapped: bool = True  # whole[0] is the weights as loaded, which on the CPU stay in the memory-mapped file

    @staticmethod
    def total(parts: list[tuple[str, int]]) -> int:
        return sum(b for _, b in parts)


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of a model of a config (a model built on the meta device: no memory)."""

    total: int
    layers: list[int] = field(default_factory=list)  # per decoder layer
    attention: list[int] = field(default_factory=list)  # per layer: q, k, v and o projections

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Sizes":
        with torch.device("meta"):
            model = Transformer(cfg)
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        return cls(model.num_parameters(), [count(b) for b in model.layers], [count(b.attn) for b in model.layers])


def mlp_width(cfg: ModelConfig) -> int:
    """What a layer's MLP keeps per token, in units of a dense MLP's hidden width: F for a dense
    MLP; for a mixture of experts (`dha.model.SparseMoE`) its k experts' gathered inputs, halves and
    outputs and the router's float32 probabilities over E, as a dense MLP that keeps as much (the
    larger of the two where only some layers have experts)."""
    if not cfg.num_experts:
        return cfg.intermediate_size
    D, k, Fe, E = cfg.hidden_size, cfg.experts_per_token, cfg.expert_size, cfg.num_experts
    moe = math.ceil((k * (2 * D + 3 * Fe) + E) / 3)
    every_layer = all(cfg.has_experts(l) for l in range(cfg.num_layers))
    return moe if every_layer else max(moe, cfg.intermediate_size)


def output_chunk_bytes(cfg: ModelConfig, positions: int, c: int) -> int:
    """A chunk of rows of the output matrix and its logits at `positions` positions, as
    `dha.layerwise._output_chunks` cuts them (LM_HEAD_CHUNK_BYTES bounds each)."""
    rows = min(cfg.vocab_size, max(1, LM_HEAD_CHUNK_BYTES // (max(cfg.hidden_size, positions) * c)))
    return rows * (cfg.hidden_size + positions) * c


def score_numbers(cfg: ModelConfig, blocks: int, T: int) -> int:
    """Attention scores and probabilities a prefill of `blocks` rows of T tokens materialises: none
    under plain causal attention (SDPA's fused kernel, no mask), (B, H, T, T) twice when a sliding
    window needs a mask (SDPA's math kernel)."""
    window = cfg.sliding_window
    return 2 * blocks * cfg.num_heads * T * T if window is not None and window < T else 0


def calibration_bytes(cfg: ModelConfig, work: Work, c: int) -> int:
    """One layer's calibration on the device, besides its weights (`dha.layerwise`, `c` bytes a number):
    the hidden states of every token in and out (and their gradients), the q/k/v outputs kept until
    they go to the CPU (and the k/v gradients), one batch's intermediates with attention scores
    (three times that under autograd), and the output matrix's chunks of the loss gradient."""
    if not work.calib_tokens:
        return 0
    T = max(2, min(work.calib_block, work.calib_tokens))  # as dha.data.calibration_blocks cuts them
    N = math.ceil(work.calib_tokens / T) * T
    D, F, H, hd = cfg.hidden_size, mlp_width(cfg), cfg.num_heads, cfg.head_dim
    n = max(cfg.key_heads(l) + cfg.value_heads(l) for l in range(cfg.num_layers))
    blocks = min(work.batch, N // T)
    hidden = (3 if work.gradients else 2) * N * D
    heads = N * (H + n) * hd + (N * n * hd if work.gradients else 0)
    one_batch = blocks * T * (4 * D + 2 * (H + n) * hd + 3 * F) + score_numbers(cfg, blocks, T)
    chunks = output_chunk_bytes(cfg, blocks * (T - 1), c) if work.gradients else 0
    return c * (hidden + heads + (3 if work.gradients else 1) * one_batch) + chunks


def eval_bytes(cfg: ModelConfig, work: Work, c: int, layerwise: bool) -> int:
    """The final table's perplexity (windows of eval_block, 4 a batch, as dha.pipeline scores them):
    one batch's intermediates and a chunk of logits; layer by layer (`dha.layerwise.nll_sum`) also
    the hidden states of every window, in and out."""
    if not work.eval_tokens:
        return 0
    tokens, T = work.eval_tokens, work.eval_block
    D, F = cfg.hidden_size, mlp_width(cfg)
    blocks = min(4, math.ceil(tokens / T))
    one_batch = blocks * T * (4 * D + 3 * F) + score_numbers(cfg, blocks, T)
    if layerwise:
        return c * (2 * tokens * D + one_batch) + output_chunk_bytes(cfg, blocks * (T - 1), c)
    return c * one_batch + min(
        NLL_CHUNK_BYTES, blocks * (T - 1) * cfg.vocab_size * 4
    )  # dha.model.next_token_nll's chunk


def activation_bytes(cfg: ModelConfig, training: Training, checkpointing: bool) -> int:
    """One micro-batch's activations kept for the backward pass, with its logits, in float32
    (dha.train). Without checkpointing every layer's intermediates; with it
    (Transformer.checkpoint_blocks) every layer's input and one layer's intermediates, which each
    block's backward recomputes in turn. No (T, T) attention scores: training's attention is SDPA's
    fused kernel (flash on the CPU, flash or memory-efficient on CUDA), which keeps none. Measured
    on the CPU (torch 2.13), one forward and backward of SmolLM2-135M on a 2,048-token row above
    the weights: 4.88 GB without, 2.26 GB with (estimated with the gradients: 4.86 and 1.99 GB).
    Distillation adds four more rows x vocabulary float32 tensors (the teacher's logits, the two
    log-softmaxes and the teacher's probabilities: measured 4.0 of them, 2,048 tokens, vocabulary 4,096).
    A chunked head (`Training.chunked_head`, with checkpointing) holds those for one chunk of
    positions (dha.model.logit_chunk) and keeps the final hidden states (the teacher's too).
    Attention distillation (`attention_tap_numbers`) adds the (queries x row) distributions it keeps."""
    tokens = training.micro_batch * training.block_size
    D, F, H, hd, V = cfg.hidden_size, mlp_width(cfg), cfg.num_heads, cfg.head_dim, cfg.vocab_size
    n = max(cfg.key_heads(l) + cfg.value_heads(l) for l in range(cfg.num_layers))
    per_layer = tokens * (8 * D + 2 * (H + n) * hd + 4 * F)
    kept = cfg.num_layers * tokens * D + per_layer if checkpointing else cfg.num_layers * per_layer
    chunked = checkpointing and training.chunked_head
    logits = (7 if training.distill else 3) * (min(tokens, logit_chunk(cfg)) if chunked else tokens) * V
    hidden = (2 if training.distill else 1) * tokens * D if chunked else 0
    return 4 * (kept + logits + hidden + attention_tap_numbers(cfg, training, checkpointing))


def attention_tap_numbers(cfg: ModelConfig, training: Training, checkpointing: bool) -> int:
    """Float32 numbers dha.attention_kd holds in a micro batch: the teacher's probabilities of every
    global layer, (rows, H, queries, row) each, and the student's log-probabilities, kept for the
    backward pass in every layer, or with checkpointing recomputed a block at a time; plus one
    layer's scores being formed. The far term holds a second set of each."""
    if not training.attention_queries:
        return 0
    W = training.block_size
    per_layer = training.micro_batch * cfg.num_heads * min(training.attention_queries, W) * W
    layers = sum(not cfg.is_local(l) for l in range(cfg.num_layers))
    sets = 2 if training.far_attention else 1
    return sets * per_layer * (layers + (2 if checkpointing else layers + 1))


def training_bytes(cfg: ModelConfig, sizes: Sizes, training: Training) -> list[tuple[str, int]]:
    """Training in float32 (dha.train): weights, gradients, AdamW's two moments (split over FSDP
    shards), the source kept beside them (teacher, and what the result is compared with), and one
    micro-batch's activations kept for the backward pass with its logits (checkpointed unless
    `training.checkpointing` is "off")."""
    checkpointed = training.checkpointing != "off"
    label = "activations of a micro-batch" + (" (blocks checkpointed)" if checkpointed else "")
    return [
        ("weights, gradients and AdamW state in float32", 16 * sizes.total // training.shards),
        ("the source and teacher in float32", 4 * (sizes.total + training.teacher_parameters)),
        (label, activation_bytes(cfg, training, checkpointed)),
    ]


def step_bytes(cfg: ModelConfig, training: Training, trainable: int, checkpointing: bool) -> int:
    """What a training step adds on the device to the float32 weights (and teacher) already there:
    gradients and AdamW's two moments of the `trainable` parameters (12 bytes each, split over FSDP
    shards) and one micro-batch's activations. dha.train's "auto" rule compares it with the free memory."""
    return 12 * trainable // training.shards + activation_bytes(cfg, training, checkpointing)


def generation_bytes(cfg: ModelConfig, dtype: torch.dtype, generation: Generation) -> list[tuple[str, int]]:
    """A generation point beyond the weights (`dtype` bytes a number): its KV cache, and an upper
    estimate of the largest prefill activations alive at once (one layer's q/k/v and their copies
    for a decoupled layer, its MLP intermediates, the residual stream), with the last-position
    logits in float32."""
    b, c, s = generation.batch_size, generation.context, dtype.itemsize
    D, F, H, hd = cfg.hidden_size, mlp_width(cfg), cfg.num_heads, cfg.head_dim
    kv = b * (c + generation.new_tokens) * cfg.kv_bytes_per_token(dtype)
    activations = b * c * s * (4 * F + 6 * D + 5 * H * hd) + b * cfg.vocab_size * 4
    return [("KV cache", kv), ("activations", activations)]


@dataclass(frozen=True)
class TrainingFit:
    """A training step's peak device bytes without and with activation checkpointing (`estimate`'s
    parts summed) and what the device has free (None: unknown, and then both fit)."""

    without_checkpointing: int
    with_checkpointing: int
    free: int | None

    @property
    def fits_without(self) -> bool:
        return self.free is None or self.without_checkpointing <= self.free

    @property
    def fits_with(self) -> bool:
        return self.free is None or self.with_checkpointing <= self.free


def training_fit(
    cfg: ModelConfig,
    dtype: torch.dtype,
    block_size: int,
    micro_batch: int,
    device: torch.device,
    shards: int = 1,
    teacher_parameters: int = 0,
    distill: bool = False,
    attention_queries: int = 0,
    chunked_head: bool = False,
) -> TrainingFit:
    """Whether training a model of `cfg` (loaded in `dtype`, as `estimate` takes it: training keeps
    float32 copies) on rows of `block_size` tokens, `micro_batch` at a time, fits on `device` with
    and without activation checkpointing, from the config alone (before anything is loaded)."""

    def peak(checkpointing: str) -> int:
        training = Training(
            micro_batch=micro_batch,
            block_size=block_size,
            shards=shards,
            teacher_parameters=teacher_parameters,
            checkpointing=checkpointing,
            distill=distill,
            attention_queries=attention_queries,
            chunked_head=chunked_head,
        )
        return Estimate.total(estimate(cfg, dtype, Work(training=training)).whole)  # nothing mapped: all of it counts

    return TrainingFit(peak("off"), peak("on"), free_memory(torch.device(device)))


def estimate(cfg: ModelConfig, dtype: torch.dtype, work: Work) -> Estimate:
    """The device bytes of `work` on a model of `cfg` loaded in `dtype` (module doc)."""
    sizes = Sizes.of(cfg)
    if work.training is not None:
        return Estimate(training_bytes(cfg, sizes, work.training), None, mapped=False)  # float32 copies: not mapped
    s = dtype.itemsize
    weights = (f"the weights in {str(dtype).removeprefix('torch.')}", sizes.total * s)
    if work.generation is not None:
        return Estimate([weights, *generation_bytes(cfg, dtype, work.generation)], None)
    c = 8 if dtype == torch.float64 else 4  # dha.layerwise.compute_dtype
    layer = max(sizes.layers) * c
    merge = (
        24 * max(sizes.attention) if work.merge == "aligned" else 0
    )  # a layer's q/k/v/o in, out and o copied, float64
    sweep = calibration_bytes(cfg, work, c)
    copy = 0 if s == c else layer  # a layer held in another dtype than the compute dtype is copied to it
    inputs = cfg.num_layers * work.calib_tokens * cfg.hidden_size * s if work.all_layer_inputs else 0
    merged = sum(sizes.attention) * s if work.merge else 0  # the merged model's new q/k/v/o, beside the source
    working = max(copy + sweep + inputs, merge, eval_bytes(cfg, work, c, layerwise=False)) + merged
    whole = [weights, ("working memory", working)]
    if work.all_layer_inputs:
        return Estimate(whole, None)
    rest = max(sweep, eval_bytes(cfg, work, c, layerwise=True), merge - layer)
    return Estimate(
        whole,
        [
            (f"its largest layer in {'float64' if c == 8 else 'float32'}", layer),
            ("one layer's activations and merge", rest),
        ],
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes `device` has free: torch.cuda.mem_get_info on CUDA, MemAvailable on the CPU (None where
    /proc/meminfo cannot be read: not Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _described(parts: list[tuple[str, int]]) -> str:
    return f"about {gib(Estimate.total(parts))} ({' + '.join(f'{label} {gib(b)}' for label, b in parts if b)})"


def check_fit(
    device: torch.device, est: Estimate, offload: bool, subject: str, loaded: bool = False, advice: str | None = None
) -> None:
    """UserError, with the numbers (and `advice` after them when given), when `est` cannot fit on `device`.

    On a GPU: with `offload` one layer at a time must fit; without it the whole model must, and
    when only one layer at a time would, the error says to give --offload. On the CPU the model is
    in CPU memory either way, its weights memory-mapped from the checkpoint (pages the kernel reads
    in and drops again), so what must fit in the memory available is the rest: the work's own memory.
    With `loaded` the model is already on `device` (the free memory read now excludes its weights):
    on either device the work's own memory must fit."""
    free = free_memory(device)
    if free is None:
        return
    cpu = device.type == "cpu"
    have = f"the CPU has {gib(free)} available (MemAvailable)" if cpu else f"{device} has {gib(free)} free"
    tail = f"; {advice}" if advice else ""
    if cpu or loaded:
        parts = est.whole[1:] if est.mapped or loaded else est.whole
        if Estimate.total(parts) > free:
            besides = (
                " besides its weights, already loaded"
                if loaded
                else " besides its memory-mapped weights"
                if est.mapped
                else ""
            )
            where = "in the CPU's memory" if cpu else f"on {device}"
            raise UserError(f"{subject} does not fit {where}: it needs {_described(parts)}{besides}; {have}{tail}")
        return
    layer_fits = est.layer is not None and Estimate.total(est.layer) <= free
    if offload and est.layer is not None:  # (work that needs the whole model refuses --offload before this)
        if not layer_fits:
            raise UserError(
                f"{subject} does not fit on {device} even one layer at a time: "
                f"it needs {_described(est.layer)}; {have}{tail}"
            )
    elif Estimate.total(est.whole) > free:
        if layer_fits:
            raise UserError(
                f"{subject} does not fit on {device} as a whole model: it needs {_described(est.whole)}; {have}. "
                f"Give --offload to keep it in CPU memory and bring one layer at a time to {device} "
                f"(about {gib(Estimate.total(est.layer))}){tail}"
            )
        layer = f", and one layer at a time {_described(est.layer)}" if est.layer is not None else ""
        raise UserError(
            f"{subject} does not fit on {device}: the whole model needs {_described(est.whole)}{layer}; {have}{tail}"
        )
