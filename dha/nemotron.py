"""Export a LLaMA-family model as a Nemotron-NAS (`DeciLMForCausalLM`) checkpoint for vLLM.

Nemotron-NAS is LLaMA with a `block_configs` entry per layer in config.json; the layer's
key/value head count is num_attention_heads // block.attention.n_heads_in_group and its MLP width
comes from block.ffn.ffn_mult. The weights keep the LLaMA names (model.layers.N.self_attn.k_proj
...), each layer's k_proj / v_proj with its own number of heads. Field names as read by the
engines' Nemotron-NAS code (vLLM model_executor/models/nemotron_nas.py, DeciLMDecoderLayer:
attention.no_op, attention.n_heads_in_group, ffn.no_op, ffn.ffn_mult -> the intermediate size
find_multiple(int(2 * ffn_mult * hidden / 3), 256). SGLang also has a DeciLMForCausalLM
(srt/models/nemotron_nas.py, not read here), but SGLang's model config refuses checkpoints whose
layers differ in head count: "Variable GQA (VGQA) is not yet supported for nemotron-nas in sglang").

The layout is the one dha.serving makes (query heads permuted, heads duplicated only with
`pad`), so the same layouts export here as to GGUF. config.json's auto_map names the
configuration class shipped beside it (dha/remote_code/configuration_decilm.py), which gives
block_configs attribute access as the engines expect; there is no model code (the engines bring
their own). This is checked in the tests for its structure against those field names and, for its
numbers, against Hugging Face's own LlamaDecoderLayer built with each layer's head count; it was
not run in vLLM or SGLang here (no GPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from .atomic import atomic_dir
from .errors import UserError
from .families import weights_to_hf
from .serving import serve_for_export
from .summary import heads_text
from .transforms import state_dict_of

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIG_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code", "configuration_decilm.py")
DROP = (
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "auto_map",
    "_commit_hash",
    "num_key_value_heads",
    "intermediate_size",
    "quantization_config",
    "architectures",
    "model_type",
)


@dataclass
class NemotronResult:
    out: str
    kv_heads: list[int]  # per layer
    query_heads: int
    padded_layers: int
    kv_bytes_per_token_bf16: int  # as written
    source_kv_bytes_per_token_bf16: int
    max_abs_diff: float  # fp32 logits: the exported layout against the model

    def to_dict(self) -> dict:
        return asdict(self)


def intermediate_size_of(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's MLP width for ffn_mult (the formula the engines use)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float:
    """The ffn_mult that gives exactly `intermediate_size`, or UserError when none does."""
    mult = 3 * intermediate_size / (2 * hidden_size)
    for candidate in (mult, math.nextafter(mult, math.inf)):  # int() of a product a hair under: step up
        if intermediate_size_of(candidate, hidden_size) == intermediate_size:
            return candidate
    raise UserError(
        f"MLP width {intermediate_size} cannot be written as a DeciLM ffn_mult (the engines round "
        f"int(2 * ffn_mult * {hidden_size} / 3) up to a multiple of 256)"
    )


def block_configs(kv_heads: list[int], num_heads: int, ffn_mult: float) -> list[dict]:
    return [
        {
            "attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": num_heads // n},
            "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": ffn_mult},
        }
        for n in kv_heads
    ]


def nemotron_config(cfg, hf_config: dict, kv_heads: list[int], dtype: str) -> dict:
    d = {k: v for k, v in hf_config.items() if k not in DROP}
    d.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
        block_configs=block_configs(kv_heads, cfg.num_heads, ffn_mult_for(cfg.intermediate_size, cfg.hidden_size)),
        num_attention_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        torch_dtype=dtype,
        dtype=dtype,
    )
    return d


def export_nemotron(loaded, out: str, pad: bool = False) -> NemotronResult:
    """Write `loaded` as a Nemotron-NAS directory; UserError (nothing written) when it cannot be held."""
    from safetensors.torch import save_file

    cfg = loaded.model.config
    no_hf_config = not loaded.hf_config or loaded.hf_config.get("model_type") != "llama"
    s = serve_for_export(
        loaded.model,
        pad,
        "Nemotron-NAS",
        "Nemotron-NAS",
        "--pad duplicates heads",
        refusal="the source keeps no LLaMA Hugging Face config to start from" if no_hf_config else None,
    )
    dtype, kv_heads = next(loaded.model.parameters()).dtype, s.kv_heads
    with atomic_dir(out) as tmp:
        sd = {k: v.to(dtype).contiguous() for k, v in weights_to_hf(state_dict_of(s.model), s.model.config).items()}
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(nemotron_config(cfg, loaded.hf_config, kv_heads, str(dtype).removeprefix("torch.")), f, indent=1)
            f.write("\n")
        shutil.copyfile(CONFIG_SOURCE, os.path.join(tmp, "configuration_decilm.py"))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return NemotronResult(
        os.path.abspath(out),
        kv_heads,
        s.query_heads,
        s.padded_layers,
        s.kv_bytes_per_token(torch.bfloat16),
        s.source_kv_bytes_per_token(torch.bfloat16),
        s.max_abs_diff,
    )


def summary_lines(result: NemotronResult) -> list[str]:
    counts = result.kv_heads
    lines = [
        f"Nemotron-NAS ({ARCHITECTURE}): {heads_text(counts)} key/value heads per layer for {result.query_heads} "
        "query heads",
        f"KV cache per token (bf16): {result.kv_bytes_per_token_bf16:,} bytes",
    ]
    if result.padded_layers:
        lines.append(
            f"--pad duplicated heads in {result.padded_layers} layers: "
            f"+{result.kv_bytes_per_token_bf16 - result.source_kv_bytes_per_token_bf16:,} bytes per token (bf16)"
        )
    if len(set(counts)) > 1:
        lines.append("per-layer head counts: vLLM serves them; SGLang refuses them (uniform counts only)")
    lines.append(
        f"exported layout against the model: max |logit difference| {result.max_abs_diff:.3g} (fp32, random tokens)"
    )
    return lines
