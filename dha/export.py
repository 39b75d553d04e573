"""Export a model as a Hugging Face checkpoint that `transformers` loads, checked before it is kept.

Two kinds of export:

- **stock**: the family's own transformers class (LlamaForCausalLM, ...), whenever the attention
  layout is one it expresses. For GQA families that means: in every layer key_index == value_index,
  the query heads are partitioned into groups of equal size, and every layer has the same number of
  groups. The groups need not be contiguous: query heads can be permuted freely with W_O's columns
  (the function is unchanged), so each layer's query heads are reordered to make its groups the
  contiguous blocks GQA uses (Ainslie et al. 2023). The config is the source's own HF config with
  only the key/value head count changed. Families without GQA in transformers (kv_heads_field None)
  are exported stock only while they are still full MHA.
- **remote-code**: anything else (decoupled key/value groups, uneven groups, per-layer head counts).
  The checkpoint carries its modeling code, loaded with `trust_remote_code=True`: config.json's
  `auto_map` points at configuration_dha.py and modeling_dha.py (templates in dha/remote_code/), and
  dha_model.py is a verbatim copy of dha/model.py, so the exported model runs the same code as ours.
  (transformers docs, "Customizing models" / custom_models.md: auto_map, trust_remote_code.)
  Its tokenizer is the source's stock one (tokenizer_config.json names a transformers class, no
  auto_map), but transformers 5's AutoTokenizer.from_pretrained reads config.json through AutoConfig
  before tokenizer_config.json, and that auto_map makes it ask whether to run configuration_dha.py
  (a prompt waiting up to 15 s on a terminal or an open stdin; at EOF, or answered no, it goes on with
  the stock tokenizer). `AutoTokenizer.from_pretrained(dir, trust_remote_code=False)` loads it without
  the question and without running the export's code.

Every export is written into a temp directory, reloaded with AutoModelForCausalLM, and its logits
compared with ours on random token sequences in float32 (within atol, default 1e-4; see
REORDER_RTOL for exports whose query heads were reordered); only when they agree is the directory
renamed to its final name. Otherwise nothing is left behind and the error gives the difference.

`dha.checkpoint.load` reads a remote-code export back (checkpoint.load_remote_code_export) without running
its code, so converted, exported models can still be evaluated or exported again by dha.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from .atomic import atomic_dir
from .checkpoint import REMOTE_MODEL_TYPE, Loaded, quiet
from .families import Family, UnsupportedModel, family_of, weights_to_hf
from .model import ModelConfig, Transformer, is_grouped
from .summary import heads_text, kv_summary
from .transforms import permute_query_heads, state_dict_of

REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code")
MODEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")
REMOTE_CLASS = "DhaForCausalLM"
# Keys of a saved HF config that describe where it came from, not the model: dropped on export.
HF_CONFIG_DROP = ("_name_or_path", "_model_name_or_path", "transformers_version", "auto_map", "_commit_hash")


class ExportMismatch(Exception):
    """The reloaded export does not reproduce our logits (a bug or a config the family cannot hold)."""


class NotStock(Exception):
    """The layout cannot be written as the family's stock transformers class; the message says why."""


@dataclass
class StockLayout:
    perms: list[list[int]]  # per layer: new query head i is old query head perms[l][i]
    kv_heads: int  # key/value heads in every layer


@dataclass
class ExportResult:
    out: str
    kind: str  # "stock" | "remote-code"
    hf_class: str  # the transformers class the export loads as
    key_heads: list[int]  # per layer
    value_heads: list[int]  # per layer
    query_heads: int
    max_abs_diff: float  # largest |logit difference| between the reloaded export and ours as written (fp32)
    max_abs_diff_source: float  # the same against the source before query heads were reordered
    permuted_layers: int = 0  # stock: layers whose query heads were reordered to make groups contiguous
    reason: str | None = None  # remote-code: why a stock export was not possible
    check: dict = field(default_factory=dict)  # the token sequences the check used
    tokenizer: bool = False  # the export holds the source's tokenizer (a stock one, also in a remote-code export)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- which layouts a stock class can hold --------------------------------------------------------


def stock_layout(cfg: ModelConfig, family: Family) -> StockLayout:
    """The query-head permutations that make every layer plain GQA, or NotStock saying why not."""
    H = cfg.num_heads
    if cfg.qk_norm_weights == "head":
        raise NotStock(
            "its query and key norms have one weight per head (a merged qk-norm model); "
            "the stock class has one per layer"
        )
    kv_heads, perms = None, []
    for l in range(cfg.num_layers):
        keys, values = cfg.key_index[l], cfg.value_index[l]
        if keys != values:
            raise NotStock(f"layer {l}: key heads and value heads are grouped differently (decoupled)")
        sizes = Counter(keys)  # key/value head -> how many query heads read it
        if len(set(sizes.values())) != 1:
            raise NotStock(
                f"layer {l}: key/value heads are shared by unequal numbers of query heads ({sorted(sizes.values())})"
            )
        if kv_heads is None:
            kv_heads = len(sizes)
        elif len(sizes) != kv_heads:
            raise NotStock(
                f"layers have different key/value head counts ({kv_heads} in layer 0, {len(sizes)} in layer {l})"
            )
        # Sorting query heads by the key/value head they read makes the groups contiguous blocks
        # of equal size: key_index becomes [h // (H // kv_heads)], GQA's map.
        perms.append(sorted(range(H), key=lambda h: (keys[h], h)))
    if family.kv_heads_field is None and kv_heads != H:
        raise NotStock(
            f"transformers' {family.hf_class} has no grouped-query attention, and this model has "
            f"{kv_heads} key/value heads for {H} query heads"
        )
    return StockLayout(perms, kv_heads)


# ---- writers ---------------------------------------------------------------------------------------


def _dtype_name(model: Transformer) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def write_stock(directory: str, model: Transformer, hf_config: dict, family: Family, kv_heads: int) -> None:
    """Write `model` (whose maps are contiguous GQA) as the family's stock class into `directory`."""
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = model.config
    d = {k: v for k, v in hf_config.items() if k not in HF_CONFIG_DROP}
    if d.get("quantization_config", 0) is None:
        d.pop("quantization_config")  # a dequantised GGUF source: the weights are plain floats now
    if family.kv_heads_field is not None:
        d[family.kv_heads_field] = kv_heads
    d["architectures"] = [family.hf_class]
    d["dtype"] = _dtype_name(model)
    model_type = d.pop("model_type")
    config = CONFIG_MAPPING[model_type].from_dict(d)

    # Build the stock model on the meta device and take our tensors as its parameters (assign).
    with torch.device("meta"):
        hf_model = getattr(transformers, family.hf_class)(config)
    sd = {k: v.contiguous() for k, v in weights_to_hf(state_dict_of(model), cfg).items()}
    missing, unexpected = hf_model.load_state_dict(sd, strict=False, assign=True)
    tied = set(getattr(hf_model, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied:
        raise ExportMismatch(
            f"weights do not fit {family.hf_class}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    hf_model.tie_weights()
    with quiet():
        hf_model.save_pretrained(directory)


def remote_code_config(cfg: ModelConfig, hf_config: dict | None, dtype: str) -> dict:
    """config.json of a remote-code export: our ModelConfig under "dha", and the auto_map."""
    src = hf_config or {}
    d = {
        "architectures": [REMOTE_CLASS],
        "model_type": REMOTE_MODEL_TYPE,
        "auto_map": {
            "AutoConfig": "configuration_dha.DhaConfig",
            "AutoModelForCausalLM": f"modeling_dha.{REMOTE_CLASS}",
        },
        "dha": cfg.to_dict(),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": dtype,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # generate() reads these
        if src.get(name) is not None:
            d[name] = src[name]
    # The source family's HF config, so that dha can read the export back and export it again.
    d["dha_source_hf_config"] = hf_config
    return d


def write_remote_code(directory: str, model: Transformer, hf_config: dict | None) -> None:
    """Write weights, config.json and the modeling code (copied from our own source) into `directory`."""
    from safetensors.torch import save_file

    shutil.copyfile(MODEL_SOURCE, os.path.join(directory, "dha_model.py"))
    for name in ("configuration_dha.py", "modeling_dha.py"):
        shutil.copyfile(os.path.join(REMOTE_CODE_DIR, name), os.path.join(directory, name))
    # DhaForCausalLM holds our Transformer as `.model`; a tied lm_head is left out (re-tied on load).
    sd = {f"model.{k}": v.contiguous() for k, v in state_dict_of(model).items()}
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(remote_code_config(model.config, hf_config, _dtype_name(model)), f, indent=1)
        f.write("\n")


# ---- the check -------------------------------------------------------------------------------------


def compare_with_transformers(
    directory: str,
    models: list[Transformer],
    trust_remote_code: bool,
    batch: int = 2,
    length: int = 32,
    seed: int = 0,
) -> tuple[list[float], float, str, dict]:
    """Reload `directory` with AutoModelForCausalLM and run it and each of `models` in float32, on
    the device of the first model.

    Returns (max |logit difference| to each model, max |logit| of the first model, the reloaded
    class name, a description of the inputs)."""
    from transformers import AutoModelForCausalLM

    device = next(models[0].parameters()).device
    try:
        with quiet():
            hf_model = (
                AutoModelForCausalLM.from_pretrained(
                    directory, trust_remote_code=trust_remote_code, dtype=torch.float32
                )
                .to(device)
                .eval()
            )
    except Exception as e:
        raise ExportMismatch(
            f"transformers cannot reload the export: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    cfg = models[0].config
    length = min(length, cfg.max_position_embeddings)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)
    diffs, scale = [], None
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
        hf_class = type(hf_model).__name__
        del hf_model  # free its memory before running ours
        for model in models:
            ours = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
            mine = ours.eval()(ids).float()  # (B, T, V)
            diffs.append((theirs - mine).abs().max().item() if theirs.shape == mine.shape else float("inf"))
            scale = mine.abs().max().item() if scale is None else scale
    return (
        diffs,
        scale,
        hf_class,
        {"batch": batch, "length": length, "seed": seed, "dtype": "float32", "device": str(device)},
    )


# ---- the export ------------------------------------------------------------------------------------

# Reordering query heads is exact in real arithmetic but changes the order of fp32 sums (W_O, the
# attention kernels). Measured on SmolLM2-135M (30 layers, logits up to ~34) with all 30 layers
# reordered: 1.9e-4 on 2x32 tokens (0.0 in float64); the same model in fp32 vs float64 differs by
# 4.8e-3. So the export is compared with the reordered model (the same sums as the export) within
# atol, and with the source before reordering within atol + REORDER_RTOL * max|logit|; a wrong
# permutation moves logits by O(1).
REORDER_RTOL = 1e-3


def export(loaded: Loaded, out: str, force_remote_code: bool = False, atol: float = 1e-4) -> ExportResult:
    """Write `loaded` to `out` as a Hugging Face checkpoint (stock when possible), check it, keep it.

    Raises UserError when `out` is not empty, ExportMismatch when the reloaded export's fp32 logits
    differ from ours by more than `atol` (then nothing is written)."""
    family, layout, reason = stock_choice(loaded, force_remote_code)
    with atomic_dir(out) as tmp:
        kind, written, permuted = write_export(tmp, loaded, family, layout)
        diff, diff_source, hf_class, check = check_export(tmp, kind, written, loaded.model, permuted, atol)
    cfg = loaded.model.config
    counts = kv_summary(cfg)
    return ExportResult(
        os.path.abspath(out),
        kind,
        hf_class,
        counts["key_heads"],
        counts["value_heads"],
        cfg.num_heads,
        diff,
        diff_source,
        permuted,
        reason,
        check,
        tokenizer=loaded.tokenizer is not None,
    )


def stock_choice(loaded: Loaded, force_remote_code: bool) -> tuple[Family | None, StockLayout | None, str | None]:
    """(family, layout, reason): the StockLayout when the model can be written as its family's stock
    class, else layout None and the reason it cannot (the export then carries remote code)."""
    cfg = loaded.model.config
    family, reason = None, None
    try:
        family = family_of(cfg.family)
    except UnsupportedModel:
        reason = f"dha has no stock transformers class for family {cfg.family!r}"
    layout = None
    if force_remote_code:
        reason = "--force-remote-code"
    elif family is not None and not loaded.hf_config:
        reason = "the source keeps no Hugging Face config to start a stock one from"
    elif family is not None and loaded.hf_config.get("model_type") != cfg.family:
        reason = (
            f"the source's Hugging Face config is for {loaded.hf_config.get('model_type')!r}, "
            f"the model for {cfg.family!r}"
        )
    elif family is not None:
        try:
            layout = stock_layout(cfg, family)
        except NotStock as e:
            reason = str(e)
    return family, layout, reason


def write_export(directory: str, loaded: Loaded, family: Family | None, layout: StockLayout | None) -> tuple:
    """Write the model (stock with a layout: its query heads reordered first where needed; else
    remote-code) and its tokenizer into `directory`. Returns (kind, the model as written, how many
    layers' query heads were reordered)."""
    model, cfg = loaded.model, loaded.model.config
    written, permuted = model, 0
    if layout is not None:
        permuted = sum(perm != list(range(cfg.num_heads)) for perm in layout.perms)
        if permuted:
            written = permute_query_heads(model, layout.perms)
        assert all(is_grouped(written.config.key_index[l], layout.kv_heads) for l in range(cfg.num_layers))
        write_stock(directory, written, loaded.hf_config, family, layout.kv_heads)
        kind = "stock"
    else:
        write_remote_code(directory, model, loaded.hf_config)
        kind = "remote-code"
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
    return kind, written, permuted


def check_export(directory: str, kind: str, written: Transformer, model: Transformer, permuted: int, atol: float):
    """Reload `directory` with transformers and compare its logits with the model as written (within
    atol) and, when query heads were reordered, with the model before (within atol + REORDER_RTOL *
    max|logit|); ExportMismatch otherwise. Returns (difference to the written model, to the source
    model, the reloaded class name, the check's inputs)."""
    diffs, scale, hf_class, check = compare_with_transformers(
        directory, [written, model] if permuted else [written], trust_remote_code=kind == "remote-code"
    )
    diff, diff_source = diffs[0], diffs[-1]
    where = f"on {check['batch']}x{check['length']} random tokens (fp32); nothing written"
    if not diff <= atol:  # also catches NaN
        raise ExportMismatch(
            f"the {kind} export reloaded with transformers ({hf_class}) differs from the model: "
            f"max |logit difference| {diff:.3g} > {atol:g} {where}"
        )
    if not diff_source <= atol + REORDER_RTOL * scale:
        raise ExportMismatch(
            f"the {kind} export differs from the model before its query heads were reordered: "
            f"max |logit difference| {diff_source:.3g} > {atol + REORDER_RTOL * scale:.3g} {where}"
        )
    return diff, diff_source, hf_class, check


def summary_lines(result: ExportResult) -> list[str]:
    """Human-readable lines for the CLI."""
    if result.kind == "stock":
        lines = [
            f"stock export: {result.hf_class}, {result.key_heads[0]} key/value heads per layer for "
            f"{result.query_heads} query heads"
        ]
        if result.permuted_layers:
            lines.append(
                f"query heads reordered (with W_O) to make groups contiguous in {result.permuted_layers} "
                f"of {len(result.key_heads)} layers"
            )
    else:
        lines = [
            f"remote-code export: {result.hf_class} (load with trust_remote_code=True), key heads "
            f"{heads_text(result.key_heads)}, value heads {heads_text(result.value_heads)}, "
            f"query heads {result.query_heads}",
            f"not stock because: {result.reason}",
        ]
        if result.tokenizer:
            lines.append(
                "its tokenizer needs no remote code: AutoTokenizer.from_pretrained(dir, trust_remote_code=False) "
                "loads it without asking about the export's code"
            )
    c = result.check
    lines.append(
        f"reloaded with transformers: max |logit difference| {result.max_abs_diff:.3g} on "
        f"{c['batch']}x{c['length']} random tokens ({c['dtype']}, on {c['device']})"
    )
    if result.permuted_layers:
        lines.append(f"against the source before reordering: {result.max_abs_diff_source:.3g} (fp32 summation order)")
    return lines
