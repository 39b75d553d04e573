"""One table keyed by Hugging Face `model_type`: how each family's config and weights map to ours.

A family is data plus two pure functions, never a subclass of the model:
- `config_from_hf(hf_config) -> ModelConfig`: raise UnsupportedModel for variants we cannot run
  exactly (the message says what is missing);
- a weight map of key templates (`{}` is the layer number), HF name -> our name, applied by
  `rename` in either direction; families whose layout differs (fused qkv, Conv1D) add a
  `weights_from_hf` / `weights_to_hf` pair of dict-in/dict-out functions.

`export` writes a stock HF checkpoint by starting from the source's own HF config (kept in our
checkpoints) and changing only the key/value head count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError
from .model import ModelConfig


class UnsupportedModel(UserError):
    pass


@dataclass(frozen=True)
class Family:
    model_type: str
    hf_class: str  # the stock transformers class export writes (e.g. LlamaForCausalLM)
    config_from_hf: Callable[[object], ModelConfig]
    weight_map: dict[str, str]  # HF key template -> our key template
    # Optional extra steps around the renaming, for layouts that differ from ours.
    weights_from_hf: Callable[[dict, ModelConfig], dict] | None = None
    weights_to_hf: Callable[[dict, ModelConfig], dict] | None = None
    # Which HF config field holds the key/value head count (None: the family has no GQA in HF).
    kv_heads_field: str | None = "num_key_value_heads"


def rename(state_dict: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by templates; any key no template matches is an error (nothing is dropped)."""
    patterns = [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in mapping.items()]
    out = {}
    for key, value in state_dict.items():
        for pattern, dst in patterns:
            m = pattern.match(key)
            if m:
                out[dst.replace("{}", m.group(1)) if m.groups() else dst] = value
                break
        else:
            raise UnsupportedModel(f"unexpected weight {key!r}: the weight map has no entry for it")
    return out


def invert(mapping: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in mapping.items()}


# ---- RoPE ---------------------------------------------------------------------------------------

# Scaled RoPE variants whose frequencies do not depend on the sequence length can be precomputed
# by transformers' own functions; dynamic variants change with the input and are refused.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_fields(hf_config, rotary_dim: int) -> dict:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModel(f"RoPE type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
    fields = {"rope_theta": theta, "rotary_dim": rotary_dim}
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device=None)
        if inv_freq.numel() * 2 != rotary_dim:
            raise UnsupportedModel(f"RoPE {rope_type!r} gives {inv_freq.numel() * 2} rotary dims, expected {rotary_dim}")
        fields.update(rope_inv_freq=inv_freq.tolist(), rope_attention_scaling=float(scaling))
    return fields


def _refuse_qk_norm(hf_config) -> None:
    for name in ("qk_norm", "use_qk_norm", "qk_layernorm"):
        if getattr(hf_config, name, False):
            raise UnsupportedModel(
                f"{hf_config.model_type} normalises keys per head ({name}): fusing key heads would not be exact, "
                "and dha does not support it yet"
            )


# ---- LLaMA, Mistral, Qwen2: RMSNorm, RoPE, SwiGLU ----------------------------------------------

LLAMA_WEIGHTS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.o_proj.bias",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.mlp.gate_proj.bias",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.mlp.up_proj.bias",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.mlp.down_proj.bias",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def gqa_maps(num_layers: int, num_heads: int, num_kv_heads: int) -> list[list[int]]:
    if num_heads % num_kv_heads:
        raise UnsupportedModel(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    group = num_heads // num_kv_heads
    return [[h // group for h in range(num_heads)] for _ in range(num_layers)]


def llama_config(c) -> ModelConfig:
    _refuse_qk_norm(c)
    if getattr(c, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"activation {c.hidden_act!r} is not supported for {c.model_type} (expected silu)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    maps = gqa_maps(c.num_hidden_layers, c.num_attention_heads, kv)
    return ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        key_index=maps,
        value_index=[list(m) for m in maps],
        norm="rmsnorm",
        norm_eps=c.rms_norm_eps,
        mlp="gated",
        activation="silu",
        position="rope",
        max_position_embeddings=c.max_position_embeddings,
        qkv_bias=bool(getattr(c, "attention_bias", False)),
        o_bias=bool(getattr(c, "attention_bias", False)),
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        family=c.model_type,
        **rope_fields(c, head_dim),
    )


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", llama_config, LLAMA_WEIGHTS),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def config_from_hf(hf_config) -> ModelConfig:
    return family_of(hf_config.model_type).config_from_hf(hf_config)


def weights_from_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    fam = family_of(cfg.family)
    sd = fam.weights_from_hf(state_dict, cfg) if fam.weights_from_hf else dict(state_dict)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return rename(sd, fam.weight_map)


def weights_to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    fam = family_of(cfg.family)
    sd = {k: v for k, v in state_dict.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    sd = rename(sd, invert(fam.weight_map))
    return fam.weights_to_hf(sd, cfg) if fam.weights_to_hf else sd
