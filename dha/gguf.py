"""Export a LLaMA-family model as a GGUF file that llama.cpp runs with the model's own, smaller KV cache.

The layout is first made one that llama.cpp holds (dha.serving.to_serving: query heads permuted,
heads duplicated only with `pad`); then every layer is GQA with its own key/value head count.
The file's architecture is `llama` when every layer has the same count, else `deci`, whose loader
reads `deci.attention.head_count_kv` as one count per layer (llama.cpp src/llama-model.cpp,
`get_key_or_arr(LLM_KV_ATTENTION_HEAD_COUNT_KV, ...)`; the `deci` graph is LLaMA's with per-layer
head counts, src/models/deci.cpp).

What llama.cpp expects, as read in its source (llama-cpp-python 0.3.36 vendors it) and checked
against it in the tests:
- tensor names `token_embd`, `output_norm`, `output` (absent when tied), and per block
  `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`;
  a weight (out, in) is written as the numpy array (out, in), which GGUF lists as [in, out];
- RoPE: llama.cpp's `llama` rope rotates adjacent pairs (2i, 2i+1) of a head, Hugging Face (and
  dha.model.Rope) rotates (i, i + hd/2). So the rows of every query and key head are reordered,
  row i -> 2i and row i + hd/2 -> 2i + 1; the q.k products, hence the model, are unchanged;
- scaled RoPE (llama3, linear) as a `rope_freqs` tensor of per-frequency divisors:
  llama.cpp's angle is pos * base^(-2i/hd) / rope_freqs[i];
- the tokenizer as `gpt2` (byte-level BPE): tokens, merges "a b", token types, special ids, and the
  pre-tokenizer name (PRE_TOKENIZERS: the Hugging Face pre-tokenizer -> llama.cpp's regexes).

Weights in float32, float16 or q8_0 (gguf.quants; 1-D tensors stay float32, as llama.cpp's own
converter keeps them). The file is written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .atomic import atomic_file
from .errors import UserError
from .model import ModelConfig, Transformer
from .serving import serve_for_export
from .summary import heads_text

OUTTYPES = ("f32", "f16", "q8_0")
# Our state dict name (with {} for the layer) -> the GGUF tensor name.
TENSOR_NAMES = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{}.attn_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.mlp_norm.weight": "blk.{}.ffn_norm.weight",
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


@dataclass
class GgufResult:
    out: str
    arch: str  # "llama" | "deci"
    outtype: str
    kv_heads: list[int]  # per layer, as written
    query_heads: int
    padded_layers: int  # layers given duplicated heads by --pad
    kv_bytes_per_token: int  # f16 KV cache of the file, as llama.cpp allocates it (deci: with flash attention on)
    source_kv_bytes_per_token: int  # f16 KV cache of the model before export (its own maps)
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


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """The `tokenizer.ggml.*` content of a byte-level BPE tokenizer (tokens, types, merges, ids)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizers) tokenizer; this model's has none")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    key = _pre_tokenizer_key(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or key not in PRE_TOKENIZERS:
        raise UserError(
            f"GGUF export writes byte-level BPE tokenizers with a pre-tokenizer llama.cpp knows "
            f"({', '.join(PRE_TOKENIZERS)}); this one is {model.get('type')} with {key}"
        )
    tokens = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens.update({i: a["content"] for i, a in added.items()})
    if max(tokens) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(tokens)}, the model only {vocab_size} embeddings")
    names, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces become unused padding tokens
        names.append(tokens.get(i, f"[PAD{i}]"))
        if i not in tokens:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    with_specials = tokenizer("a")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and with_specials[:1] == [tokenizer.bos_token_id]
    return {
        "pre": PRE_TOKENIZERS[key],
        "tokens": names,
        "types": types,
        "merges": merges,
        "add_bos": add_bos,
        "ids": {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def write_tokenizer(writer, fields: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
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


def gguf_tensors(model: Transformer, outtype: str):
    """(GGUF name, numpy array, quantisation type or None) for every weight of `model`, in order."""
    import gguf

    cfg = model.config
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")  # llama.cpp reuses token_embd when `output` is absent
    for name, tensor in sd.items():
        t = tensor.detach().float().cpu()  # the file is written from host memory
        if name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            t = interleave_rope_rows(t, cfg.head_dim)
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
    if divisors is not None:
        yield "rope_freqs.weight", divisors, None


# ---- the file ------------------------------------------------------------------------------------

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def write_metadata(writer, cfg: ModelConfig, kv_heads: list[int], outtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(kv_heads[0] if len(set(kv_heads)) == 1 else kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(FILE_TYPES[outtype])


def write_file(path: str, model: Transformer, kv_heads: list[int], tokenizer: dict, outtype: str, name: str) -> str:
    """Write the GGUF file to a temp file beside `path`, then link it into place (never overwriting)."""
    import gguf

    arch = "llama" if len(set(kv_heads)) == 1 else "deci"
    try:
        with atomic_file(path, replace=False) as tmp:
            writer = gguf.GGUFWriter(tmp, arch)
            write_metadata(writer, model.config, kv_heads, outtype, name)
            write_tokenizer(writer, tokenizer)
            for tensor_name, array, qtype in gguf_tensors(model, outtype):
                writer.add_tensor(tensor_name, array, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as e:
        raise UserError(f"cannot write {os.path.abspath(path)}: {e.strerror or e}") from None
    return arch


# ---- the export ----------------------------------------------------------------------------------


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
