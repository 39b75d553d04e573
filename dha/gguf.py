"""Export a model as a GGUF file that llama.cpp runs with the model's own, smaller KV cache.

The layout is first made one that llama.cpp holds (dha.serving.to_serving: query heads permuted,
heads duplicated only with `pad`); then every layer is GQA with its own key/value head count.
A LLaMA-family file's architecture is `llama` when every layer has the same count, else `deci`,
whose loader reads `deci.attention.head_count_kv` as one count per layer (llama.cpp
src/llama-model.cpp, `get_key_or_arr(LLM_KV_ATTENTION_HEAD_COUNT_KV, ...)`; the `deci` graph is
LLaMA's with per-layer head counts, src/models/deci.cpp).

The qk-norm families go to their own llama.cpp graphs (ARCHS): Qwen3 -> `qwen3`, OLMo 2 -> `olmo2`,
Gemma 3 -> `gemma3` (src/models/{qwen3,olmo2,gemma3}.cpp). Those graphs read one key/value head
count for every layer (the graph context's `n_head_kv`, layer 0's) and one q/k norm weight per
layer, so they hold an unconverted model or a uniform GQA conversion (`gqa`, `gqa-similar`,
`prune`), not a dha merge (per-layer counts, decoupled groups, one norm weight per head): that is
refused with the reason, before any work. They rotate halves of a head (NEOX RoPE), as Hugging
Face does, so their rows are written as they are; Gemma's norms store w + 1 (x * (1 + w)).

What llama.cpp expects, as read in its source (llama-cpp-python 0.3.36 vendors it) and checked
against it in the tests:
- tensor names `token_embd`, `output_norm`, `output` (absent when tied, but for olmo2), and per block
  `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`,
  with `attn_q_norm`, `attn_k_norm`, `post_attention_norm`, `post_ffw_norm` where the model has them;
  a weight (out, in) is written as the numpy array (out, in), which GGUF lists as [in, out];
- RoPE: llama.cpp's `llama` rope rotates adjacent pairs (2i, 2i+1) of a head, Hugging Face (and
  dha.model.Rope) rotates (i, i + hd/2). So the rows of every query and key head are reordered,
  row i -> 2i and row i + hd/2 -> 2i + 1; the q.k products, hence the model, are unchanged;
- scaled RoPE (llama3, linear) as a `rope_freqs` tensor of per-frequency divisors:
  llama.cpp's angle is pos * base^(-2i/hd) / rope_freqs[i];
- the tokenizer as `gpt2` (byte-level BPE): tokens, merges "a b", token types, special ids, and the
  pre-tokenizer name (PRE_TOKENIZERS: the Hugging Face pre-tokenizer -> llama.cpp's regexes); or as
  `llama` (SentencePiece BPE with byte fallback, as Gemma's): tokens, scores, types (bytes `<0xNN>`).

Weights in float32, float16 or q8_0 (gguf.quants; 1-D tensors stay float32, as llama.cpp's own
converter keeps them). The file is written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .atomic import atomic_file
from .errors import UserError
from .model import ModelConfig, Transformer
from .serving import (
    layer_layout,
    serve_for_export,
    serving_kv_bytes_per_token,
    serving_layout_problem,
    unsupported_reason,
)
from .summary import heads_text

OUTTYPES = ("f32", "f16", "q8_0")
# Our state dict name (with {} for the layer) -> the GGUF tensor name.
TENSOR_NAMES = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{}.attn_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.mlp_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "layers.{}.attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
    "layers.{}.attn_post_norm.weight": "blk.{}.post_attention_norm.weight",
    "layers.{}.mlp_post_norm.weight": "blk.{}.post_ffw_norm.weight",
    **{
        f"layers.{{}}.attn.{ours}.{s}": f"blk.{{}}.{theirs}.{s}"
        for s in ("weight", "bias")
        for ours, theirs in (
            ("q_proj", "attn_q"),
            ("k_proj", "attn_k"),
            ("v_proj", "attn_v"),
            ("o_proj", "attn_output"),
        )
    },
    **{
        f"layers.{{}}.mlp.{ours}.{s}": f"blk.{{}}.{theirs}.{s}"
        for s in ("weight", "bias")
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down"))
    },
}
# Hugging Face pre-tokenizer (a canonical description) -> llama.cpp's `tokenizer.ggml.pre` with the
# same splitting (llama.cpp src/llama-vocab.cpp: "gpt-2" uses GPT-2's regex; "smollm" splits every
# digit first, then GPT-2's regex).
PRE_TOKENIZERS = {
    "ByteLevel": "gpt-2",
    "Digits(individual) + ByteLevel": "smollm",
}
KV_CACHE_DTYPE = torch.float16  # llama.cpp's default KV cache type


@dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture dha writes, as its loader and graph take it."""

    name: str
    pair_rope: bool  # RoPE on adjacent pairs (llama.cpp's NORM type): q/k rows interleaved; else rotate-half
    per_layer_heads: bool  # head_count_kv read per layer; else one count for every layer
    output_required: bool  # `output` written even when the model ties it to the embeddings


ARCHS = {
    "llama": Arch("llama", pair_rope=True, per_layer_heads=False, output_required=False),
    "deci": Arch("deci", pair_rope=True, per_layer_heads=True, output_required=False),
    "qwen3": Arch("qwen3", pair_rope=False, per_layer_heads=False, output_required=False),
    "olmo2": Arch("olmo2", pair_rope=False, per_layer_heads=False, output_required=True),
    "gemma3": Arch("gemma3", pair_rope=False, per_layer_heads=False, output_required=False),
}
# A qk-norm family (its Hugging Face model_type) -> llama.cpp's architecture for it, and the
# activation its graph applies (qwen3, olmo2: SiLU; gemma3: GELU, tanh approximation).
QK_NORM_ARCHS = {"qwen3": "qwen3", "olmo2": "olmo2", "gemma3_text": "gemma3"}
ARCH_ACTIVATIONS = {"qwen3": ("silu",), "olmo2": ("silu",), "gemma3": ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")}


@dataclass
class GgufResult:
    out: str
    arch: str  # a key of ARCHS
    outtype: str
    kv_heads: list[int]  # per layer, as written
    query_heads: int
    padded_layers: int  # layers given duplicated heads by --pad
    kv_bytes_per_token: int  # f16 KV cache of the file, as llama.cpp allocates it (deci: with flash attention on)
    source_kv_bytes_per_token: int  # f16 KV cache of the model before export (its own maps)
    # Gemma 3: with llama.cpp's sliding-window cache (swa_full off: llama-cli's and llama-server's
    # default, llama-cpp-python's swa_full=False) a sliding layer keeps about its window, so past it
    # the cache grows by the full-attention layers' bytes per token only; None without sliding layers
    kv_bytes_per_token_past_window: int | None
    max_abs_diff: float  # fp32 logits: the exported layout against the model, on random tokens
    tokenizer_pre: str
    file_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


# ---- what can be exported ------------------------------------------------------------------------


def check_gguf_out(path: str) -> None:
    """Refuse an existing target, or one whose directory is missing or read-only, before any work."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.lexists(path):
        raise UserError(f"output {path} already exists (use a new --out)")
    if not os.path.isdir(parent):
        raise UserError(f"output {path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output {path} cannot be created: no permission to write in {parent}")


# ---- tokenizer -----------------------------------------------------------------------------------


def _pre_tokenizer_key(pre: dict | None) -> str:
    """A canonical description of a Hugging Face pre_tokenizer JSON, for PRE_TOKENIZERS."""
    if pre is None:
        return "none"
    if pre.get("type") == "Sequence":
        return " + ".join(_pre_tokenizer_key(p) for p in pre["pretokenizers"])
    if pre.get("type") == "ByteLevel":
        return "ByteLevel" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else "ByteLevel(options)"
    if pre.get("type") == "Digits":
        return "Digits(individual)" if pre.get("individual_digits") else "Digits"
    return json.dumps(pre, sort_keys=True)


def _normalizer_steps(spec: dict) -> list[dict]:
    normalizer = spec.get("normalizer") or {}
    return normalizer.get("normalizers", [normalizer])


def _is_sentencepiece_bpe(spec: dict) -> bool:
    """A SentencePiece BPE with byte fallback: spaces become "▁", nothing else splits the text."""
    model, pre = spec["model"], spec.get("pre_tokenizer")
    splits_on_space_only = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    spaces = any(
        step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == "▁"
        for step in _normalizer_steps(spec)
    )
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and splits_on_space_only and spaces


def _prepends_space(spec: dict) -> bool:
    return any(step.get("type") == "Prepend" and step.get("prepend") == "▁" for step in _normalizer_steps(spec))


def _token_table(spec: dict, vocab_size: int):
    """id -> token text, and id -> added-token entry, checked against the model's embeddings."""
    tokens = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens.update({i: a["content"] for i, a in added.items()})
    if max(tokens) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(tokens)}, the model only {vocab_size} embeddings")
    return tokens, added


def _token_type(i: int, tokens: dict, added: dict, sentencepiece: bool, unk: int | None):
    """The GGUF token type; the unknown token and byte tokens `<0xNN>` have their own only in SentencePiece."""
    import gguf

    if i not in tokens:  # ids the tokenizer never produces become unused padding tokens
        return gguf.TokenType.UNUSED
    if i in added:
        return gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
    if not sentencepiece:  # byte-level BPE: every other token is a plain one
        return gguf.TokenType.NORMAL
    if i == unk:
        return gguf.TokenType.UNKNOWN
    if len(tokens[i]) == 6 and tokens[i].startswith("<0x") and tokens[i].endswith(">"):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _merge_scores(spec: dict, names: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the highest score;
    scoring each token minus the rank of the first merge that makes it keeps Hugging Face's merge
    order. Pieces no merge makes score below every merge (they are never a merge's result)."""
    ids = {t: i for i, t in enumerate(names)}
    merges = spec["model"].get("merges", [])
    scores = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(ids.get(left + right), -float(rank))
    floor = -float(len(merges))
    return [scores.get(i, floor) for i in range(len(names))]


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """The `tokenizer.ggml.*` content of a byte-level BPE tokenizer (model gpt2: tokens, types, merges,
    ids) or a SentencePiece BPE one with byte fallback (model llama: tokens, types, scores, ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizers) tokenizer; this model's has none")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    key = _pre_tokenizer_key(spec.get("pre_tokenizer"))
    kind = "gpt2" if model.get("type") == "BPE" and key in PRE_TOKENIZERS else None
    kind = kind or ("llama" if _is_sentencepiece_bpe(spec) else None)
    if kind is None:
        raise UserError(
            f"GGUF export writes byte-level BPE tokenizers with a pre-tokenizer llama.cpp knows "
            f"({', '.join(PRE_TOKENIZERS)}) and SentencePiece BPE ones (byte fallback, spaces as '▁'); this one "
            f"is {model.get('type')} with {key}{'' if model.get('byte_fallback') else ', no byte fallback'}"
        )
    tokens, added = _token_table(spec, vocab_size)
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    sentencepiece = kind == "llama"
    with_specials = tokenizer("a")["input_ids"]
    fields = {
        "model": kind,
        "pre": PRE_TOKENIZERS[key] if kind == "gpt2" else "default",
        "tokens": names,
        "types": [_token_type(i, tokens, added, sentencepiece, tokenizer.unk_token_id) for i in range(vocab_size)],
        "add_bos": tokenizer.bos_token_id is not None and with_specials[:1] == [tokenizer.bos_token_id],
        "ids": {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    if kind == "gpt2":
        fields["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    else:
        fields["scores"] = _merge_scores(spec, names)
        fields["add_space_prefix"] = _prepends_space(spec)
    return fields


def write_tokenizer(writer, fields: dict) -> None:
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if fields["model"] == "gpt2":
        writer.add_token_merges(fields["merges"])
    else:
        writer.add_token_scores(fields["scores"])
        writer.add_add_space_prefix(fields["add_space_prefix"])
    for name, token_id in fields["ids"].items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(fields["add_bos"])
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])


# ---- weights -------------------------------------------------------------------------------------


def interleave_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from HF's rotate-half order (i, i + hd/2) to llama.cpp's pairs (2i, 2i + 1)."""
    per_head = weight.reshape(-1, 2, head_dim // 2, *weight.shape[1:])  # (n, 2, hd/2, ...): halves
    return per_head.transpose(1, 2).reshape(weight.shape)  # (n, hd/2, 2, ...): pairs


def gguf_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "layers":
        template = ".".join(["layers", "{}", *parts[2:]])
        if template in TENSOR_NAMES:
            return TENSOR_NAMES[template].format(parts[1])
    elif ours in TENSOR_NAMES:
        return TENSOR_NAMES[ours]
    raise ValueError(f"no GGUF name for tensor {ours!r}")


def rope_freq_divisors(cfg: ModelConfig) -> np.ndarray | None:
    """llama.cpp `rope_freqs`: plain inverse frequency / scaled one, per pair; None for plain RoPE."""
    if cfg.rope_inv_freq is None:
        return None
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    return (plain / torch.tensor(cfg.rope_inv_freq, dtype=torch.float64)).float().numpy()


def linear_rope_factor(cfg: ModelConfig) -> float | None:
    """The one divisor of every RoPE frequency when the scaling is linear; None for plain RoPE."""
    divisors = rope_freq_divisors(cfg)
    if divisors is None or not np.allclose(divisors, divisors[0], rtol=1e-6):
        return None
    return float(divisors[0])


def _qk_norm_checks(cfg: ModelConfig, arch: str) -> list[tuple[bool, str]]:
    """(holds, what the graph would lack) for a qk-norm model and llama.cpp's graph `arch` for its family."""
    hd, gemma = cfg.head_dim, arch == "gemma3"
    # gemma3's graph scales queries by hd^-0.5, or (D / H)^-0.5 for its 62-layer (27B) model
    graph_scale = (cfg.hidden_size / cfg.num_heads) ** -0.5 if gemma and cfg.num_layers == 62 else hd**-0.5
    scale = cfg.attn_scale or hd**-0.5
    return [
        (cfg.qk_norm_weights == "layer", "one q/k norm weight per head (a dha merge; the graph has one per layer)"),
        (cfg.num_experts == 0, "a mixture of experts"),
        (cfg.mlp == "gated" and cfg.activation in ARCH_ACTIVATIONS[arch], f"a {cfg.mlp} MLP with {cfg.activation}"),
        (not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.lm_head_bias), "attention, MLP or output biases"),
        (cfg.rotary_dim == hd and cfg.rope_attention_scaling == 1.0, "partial or attention-scaled RoPE"),
        (cfg.rope_inv_freq is None or linear_rope_factor(cfg) is not None, "scaled RoPE other than linear"),
        (
            math.isclose(scale, graph_scale, rel_tol=1e-6),
            f"attention scale {scale:.6g} (it scales by {graph_scale:.6g})",
        ),
        (gemma or cfg.sliding_window is None, "a sliding window"),
        (gemma or (cfg.embed_scale is None and cfg.logit_softcap is None), "an embedding scale or a logit softcap"),
        (
            not gemma or math.isclose(cfg.embed_scale or 0.0, cfg.hidden_size**0.5, rel_tol=1e-6),
            "an embedding scale other than sqrt(hidden size)",
        ),
        (not gemma or cfg.local_rope_inv_freq is None, "scaled RoPE on the sliding-window layers"),
        (not gemma or cfg.sliding_window is None or cfg.local_layers is not None, "a sliding window on every layer"),
        (not gemma or not cfg.local_layers or cfg.sliding_window is not None, "local layers without a window"),
        # olmo2's graph sizes the query projection and its norm as the hidden size
        (arch != "olmo2" or cfg.head_dim * cfg.num_heads == cfg.hidden_size, "a head dim other than hidden / heads"),
    ]


def graph_problem(cfg: ModelConfig) -> str | None:
    """Why no llama.cpp graph dha writes runs this architecture (not its layout), or None."""
    if cfg.qk_norm is None:
        return unsupported_reason(cfg)
    arch = QK_NORM_ARCHS.get(cfg.family)
    if arch is None:
        return f"qk-norm family {cfg.family!r}: GGUF is written for {', '.join(QK_NORM_ARCHS)} among qk-norm families"
    for holds, what in _qk_norm_checks(cfg, arch):
        if not holds:
            return f"{cfg.family}: llama.cpp's {arch} graph does not hold {what}"
    return None


def arch_of(cfg: ModelConfig, kv_heads: list[int]) -> Arch:
    """The llama.cpp architecture of the file: the family's qk-norm graph, else llama, or deci for
    per-layer head counts."""
    if cfg.qk_norm is not None:
        return ARCHS[QK_NORM_ARCHS[cfg.family]]
    return ARCHS["llama" if len(set(kv_heads)) == 1 else "deci"]


def head_count_problem(cfg: ModelConfig) -> str | None:
    """Why the file's graph cannot hold the serving layout's head counts (with --pad or not), or None."""
    counts = [layer_layout(k, v, pad=True).kv_heads for k, v in zip(cfg.key_index, cfg.value_index)]
    arch = arch_of(cfg, counts)
    if not arch.per_layer_heads and len(set(counts)) > 1:
        return (
            f"llama.cpp's {arch.name} graph reads one key/value head count for every layer, and this model keeps "
            f"{heads_text(counts)} key/value heads (convert with a uniform layout, e.g. --method gqa, to run it "
            "in llama.cpp)"
        )
    layout = serving_layout_problem(cfg) if cfg.qk_norm == "full" else None
    if layout is not None:
        return (
            f"{layout}; duplicating key heads (--pad) would change what a norm over the whole key projection "
            f"({cfg.family}) divides by"
        )
    return None


def export_problem(cfg: ModelConfig) -> str | None:
    """Why no GGUF file dha writes holds this model: its architecture, then its head counts; or None."""
    return graph_problem(cfg) or head_count_problem(cfg)


def gguf_tensors(model: Transformer, outtype: str, arch: Arch):
    """(GGUF name, numpy array, quantisation type or None) for every weight of `model`, in order."""
    import gguf

    cfg = model.config
    sd = model.state_dict()
    if cfg.tie_word_embeddings and not arch.output_required:
        sd.pop("lm_head.weight")  # llama.cpp reuses token_embd when `output` is absent
    for name, tensor in sd.items():
        t = tensor.detach().float().cpu()  # the file is written from host memory
        if arch.pair_rope and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            t = interleave_rope_rows(t, cfg.head_dim)
        if cfg.norm == "rmsnorm_1p" and name.endswith("norm.weight"):
            t = t + 1.0  # llama.cpp multiplies by the stored weight; Gemma's norms by (1 + w)
        array = t.numpy()
        if outtype == "f32" or array.ndim == 1:
            yield gguf_name(name), array, None
        elif outtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            yield (
                gguf_name(name),
                gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            yield gguf_name(name), array.astype(np.float16), None
    divisors = rope_freq_divisors(cfg)
    if divisors is not None and arch.pair_rope:  # the NEOX graphs take linear scaling as metadata
        yield "rope_freqs.weight", divisors, None


# ---- the file ------------------------------------------------------------------------------------

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def write_metadata(writer, cfg: ModelConfig, kv_heads: list[int], outtype: str, name: str, arch: Arch) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(kv_heads if arch.per_layer_heads else kv_heads[0])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(FILE_TYPES[outtype])
    if not arch.pair_rope and cfg.rope_inv_freq is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope_factor(cfg))
    if cfg.local_layers:  # Gemma 3: which layers slide, and their own RoPE base
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([l in cfg.local_layers for l in range(cfg.num_layers)])
        writer.add_rope_freq_base_swa(cfg.local_rope_theta or cfg.rope_theta)
    if cfg.logit_softcap is not None:
        writer.add_final_logit_softcapping(cfg.logit_softcap)


def write_file(path: str, model: Transformer, kv_heads: list[int], tokenizer: dict, outtype: str, name: str) -> str:
    """Write the GGUF file to a temp file beside `path`, then link it into place (never overwriting)."""
    import gguf

    arch = arch_of(model.config, kv_heads)
    try:
        with atomic_file(path, replace=False) as tmp:
            writer = gguf.GGUFWriter(tmp, arch.name)
            write_metadata(writer, model.config, kv_heads, outtype, name, arch)
            write_tokenizer(writer, tokenizer)
            for tensor_name, array, qtype in gguf_tensors(model, outtype, arch):
                writer.add_tensor(tensor_name, array, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as e:
        raise UserError(f"cannot write {os.path.abspath(path)}: {e.strerror or e}") from None
    return arch.name


# ---- the export ----------------------------------------------------------------------------------


def past_window_bytes(cfg: ModelConfig, kv_heads: list[int]) -> int | None:
    """f16 KV bytes per token of the layers without a sliding window (None when no layer slides)."""
    if not cfg.local_layers:
        return None
    full = [n for layer, n in enumerate(kv_heads) if layer not in cfg.local_layers]
    return serving_kv_bytes_per_token(full, cfg.head_dim, KV_CACHE_DTYPE.itemsize)


def export_gguf(loaded, out: str, outtype: str = "f32", pad: bool = False) -> GgufResult:
    """Write `loaded` as a GGUF file llama.cpp runs; UserError (nothing written) when it cannot be held."""
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")

    def checks() -> None:
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source} has no tokenizer; a GGUF file carries one")
        check_gguf_out(out)

    s = serve_for_export(
        loaded.model,
        pad,
        "GGUF",
        "llama.cpp",
        "--pad duplicates heads to make it representable (a larger KV cache)",
        checks=checks,
        graph_problem=export_problem,
    )
    tokenizer = tokenizer_fields(loaded.tokenizer, s.model.config.vocab_size)
    arch = write_file(
        out, s.model, s.kv_heads, tokenizer, outtype, os.path.basename(os.path.normpath(str(loaded.source)))
    )
    return GgufResult(
        os.path.abspath(out),
        arch,
        outtype,
        s.kv_heads,
        s.query_heads,
        s.padded_layers,
        s.kv_bytes_per_token(KV_CACHE_DTYPE),
        s.source_kv_bytes_per_token(KV_CACHE_DTYPE),
        past_window_bytes(s.model.config, s.kv_heads),
        s.max_abs_diff,
        tokenizer["pre"],
        os.path.getsize(out),
    )


def summary_lines(result: GgufResult) -> list[str]:
    lines = [
        f"GGUF ({result.arch}, {result.outtype}): {heads_text(result.kv_heads)} key/value heads per layer for "
        f"{result.query_heads} query heads, tokenizer pre {result.tokenizer_pre!r}, {result.file_bytes:,} bytes",
        f"KV cache per token in llama.cpp (f16 cache): {result.kv_bytes_per_token:,} bytes",
    ]
    if result.kv_bytes_per_token_past_window is not None:
        lines.append(
            "with llama.cpp's sliding-window cache (swa_full off, llama-server's default) the sliding layers keep "
            f"about their window: past it the cache grows by {result.kv_bytes_per_token_past_window:,} bytes per "
            "token (the full-attention layers)"
        )
    if result.arch == "deci":
        lines.append(
            "per-layer head counts: run llama.cpp with flash attention on (-fa on); with it off, llama.cpp pads "
            "every layer's value cache to the widest layer's"
        )
    if result.padded_layers:
        extra = result.kv_bytes_per_token - result.source_kv_bytes_per_token
        lines.append(
            f"--pad duplicated heads in {result.padded_layers} layers: +{extra:,} bytes per token over the "
            f"model's own {result.source_kv_bytes_per_token:,} (f16)"
        )
    lines.append(
        f"exported layout against the model: max |logit difference| {result.max_abs_diff:.3g} (fp32, random tokens)"
    )
    return lines
