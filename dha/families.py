"""One table keyed by Hugging Face `model_type`: how each family's config and weights map to ours.

A family is data plus pure functions, never a subclass of the model:
- `config_from_hf(hf_config) -> ModelConfig`: raise UnsupportedModel for variants we cannot run
  exactly (the message says what is missing);
- a weight map of key templates (`{}` is the layer number), HF name -> our name, applied by
  `rename` in either direction (every key must match a template: nothing is silently dropped);
- for layouts that differ from ours (GPT-2's fused, transposed Conv1D `c_attn`; GPT-NeoX's
  per-head interleaved `query_key_value`) the map sends the fused tensor to an intermediate
  `layers.{}.attn.qkv.*` key, and a `from_hf_layout` / `to_hf_layout` pair of dict-in/dict-out
  functions splits and re-fuses it (and transposes Conv1D weights);
- what older checkpoints on disk carry besides the weights: the base-model prefix they may lack
  (a checkpoint saved from `GPT2Model` instead of `GPT2LMHeadModel`), non-weight buffers that
  transformers itself ignores on load (`attn.bias` causal masks, `rotary_emb.inv_freq`), and
  renamed keys (`embed_out` -> `lm_head` in GPT-NeoX).

`weights_to_hf(weights_from_hf(sd)) == sd` exactly for the state dict of a stock HF model (a tied
`lm_head.weight` is left out, as HF's own save_pretrained does). `export` writes a stock HF
checkpoint by starting from the source's own HF config (kept in our checkpoints) and changing
only the field named by `kv_heads_field`; families whose HF class has no such field are exported
with remote code.

Families whose attention normalises queries and keys after projection (qk-norm) run exactly:
Qwen3, Qwen3-MoE and Gemma 3 per head (ModelConfig.qk_norm "head"), OLMo 2 over the whole projection
("full"). They load, inspect, evaluate, generate and export unconverted, and convert through
norm-aware merges (`dha.merge`: per head, and over the layer's whole key projection); what a
conversion cannot do with them is refused by `refuse_merge_of_qk_norm`. Other qk-norm families
(OLMoE, hybrid or vision-language ones) are refused by name, saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .errors import UserError
from .model import ACTIVATIONS, ModelConfig


class UnsupportedModel(UserError):
    pass


@dataclass(frozen=True)
class Family:
    model_type: str
    hf_class: str  # the stock transformers class export writes (e.g. LlamaForCausalLM)
    config_from_hf: Callable[[object], ModelConfig]
    weight_map: dict[str, str]  # HF key template -> our key template
    # Which HF config field holds the key/value head count (None: the HF class has no GQA, so a
    # model with fewer key/value heads than query heads is exported with remote code).
    kv_heads_field: str | None = "num_key_value_heads"
    # Optional layout steps in our key space: after renaming on load, before renaming on save.
    from_hf_layout: Callable[[dict, ModelConfig], dict] | None = None
    to_hf_layout: Callable[[dict, ModelConfig], dict] | None = None
    # Prefix of the base model inside the *ForCausalLM class (HF's `base_model_prefix` + ".").
    base_prefix: str = "model."
    # Key templates of non-weight buffers older checkpoints carry, dropped on load.
    ignored_keys: tuple[str, ...] = ()
    # Old HF key -> current HF key, applied on load (HF's own checkpoint conversion mapping).
    legacy_keys: dict[str, str] = field(default_factory=dict)
    # Optional step in HF's key space before renaming on load: a checkpoint's layout on disk into
    # the one transformers holds in memory (and the weight map names), as transformers does on load.
    from_checkpoint: Callable[[dict], dict] | None = None


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def rename(state_dict: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by templates; any key no template matches is an error (nothing is dropped)."""
    patterns = [(_pattern(src), dst) for src, dst in mapping.items()]
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


def _weight_and_bias(hf: str, ours: str) -> dict[str, str]:
    return {f"{hf}.weight": f"{ours}.weight", f"{hf}.bias": f"{ours}.bias"}


# ---- config helpers ------------------------------------------------------------------------------

# Scaled RoPE variants whose frequencies do not depend on the sequence length can be precomputed
# by transformers' own functions; dynamic variants change with the input and are refused.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_fields(hf_config, rotary_dim: int, layer_type: str | None = None) -> dict:
    """ModelConfig's RoPE fields; with `layer_type`, from rope_parameters[layer_type] (Gemma 3
    keeps one set per attention type)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params.get(layer_type) or {})
    rope_type = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModel(f"RoPE type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
    fields = {"rope_theta": theta, "rotary_dim": rotary_dim}
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device=None, **kwargs)
        if inv_freq.numel() * 2 != rotary_dim:
            raise UnsupportedModel(
                f"RoPE {rope_type!r} gives {inv_freq.numel() * 2} rotary dims, expected {rotary_dim}"
            )
        fields.update(rope_inv_freq=inv_freq.tolist(), rope_attention_scaling=float(scaling))
    return fields


def partial_rotary_dim(hf_config, head_dim: int) -> int:
    """Dims of a head that RoPE rotates: int(head_dim * partial_rotary_factor), as GPT-NeoX and Phi
    compute `rotary_ndims` (transformers' GPTNeoXAttention / PhiAttention)."""
    factor = float((getattr(hf_config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * factor)
    if rotary_dim < 2 or rotary_dim % 2:
        raise UnsupportedModel(
            f"{hf_config.model_type}: partial_rotary_factor {factor} gives {rotary_dim} rotary dims of {head_dim}; "
            "dha needs an even, non-zero number"
        )
    return rotary_dim


def activation(hf_config, name: str) -> str:
    act = getattr(hf_config, name)
    if act not in ACTIVATIONS:
        raise UnsupportedModel(
            f"{hf_config.model_type}: activation {name}={act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    return act


# qk-norm families dha does not run, and why: the reason is not the norm (Qwen3, Gemma 3 and OLMo 2
# run exactly) but a part of the architecture dha's model lacks.
QK_NORM_REFUSED = {
    "qwen3_next": (
        "it mixes linear-attention (Gated DeltaNet) layers with a mixture-of-experts MLP, which dha's model lacks"
    ),
    "gemma3": (
        "it is the vision-language Gemma3ForConditionalGeneration; text-only gemma3_text checkpoints are supported"
    ),
    "gemma3n": "it is multimodal and its text model uses AltUp and per-layer embeddings, which dha's model lacks",
    "gemma3n_text": "it uses AltUp and per-layer embeddings, which dha's model lacks",
    "olmo3": "its per-layer sliding windows and RoPE are not mapped yet (OLMo 2 is supported)",
    "olmoe": "its mixture-of-experts layers are not mapped (Qwen3-MoE's are)",
    "chameleon": "it is a vision-language model with image tokens, which dha's model lacks",
}
# Config flags that turn qk-norm on in families where it is optional (Phi, Cohere, GLM-4 MoE...).
QK_NORM_FLAGS = ("qk_layernorm", "use_qk_norm", "qk_norm")


def refuse_qk_norm(hf_config) -> None:
    """Refuse the optional qk-norm switch of a family whose mapping does not implement it."""
    for name in QK_NORM_FLAGS:
        if getattr(hf_config, name, False):
            raise UnsupportedModel(
                f"{hf_config.model_type} with {name}=True (query/key normalisation after projection) is not supported: "
                f"dha maps qk-norm only for {', '.join(QK_NORM_SUPPORTED)}"
            )


# Families that run with qk-norm (ModelConfig.qk_norm set by their config_from_hf).
QK_NORM_SUPPORTED = ("qwen3", "qwen3_moe", "olmo2", "gemma3_text")


def refuse_merge_of_qk_norm(model_or_config, fusion: bool = False, mean: bool = False) -> None:
    """Raise UnsupportedModel when a conversion cannot merge this qk-norm model's key heads.

    The aligned merges are realised through the norm (`dha.merge`): per head (Qwen3, Gemma 3:
    qk_norm "head", one norm weight per merged head) or over the layer's whole key projection
    (OLMo 2: "full", the divisor's change folded into the gains). Refused: the fusion stage
    (`fusion`), whose learned operators act on the projections before the norm, and group means
    (`mean`) of a model whose per-head norms already have one weight per head. Call this where a
    conversion starts (dha convert, any method; dha.pipeline.run_dha)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    qk_norm = getattr(cfg, "qk_norm", None)
    if qk_norm is not None and fusion:
        raise UnsupportedModel(
            f"{cfg.family} normalises its keys after projection (qk-norm): the fusion stage's learned operators act "
            "before the norm and are not norm-aware; use --fusion-fraction 0 (the default)"
        )
    if qk_norm == "head" and mean and getattr(cfg, "qk_norm_weights", "layer") == "head":
        raise UnsupportedModel(
            "this model's key norms already have one weight per head (a merged qk-norm model): group means "
            "and pruning need the source's shared norm; convert the source instead"
        )


def gqa_maps(num_layers: int, num_heads: int, num_kv_heads: int) -> list[list[int]]:
    if num_heads % num_kv_heads:
        raise UnsupportedModel(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    group = num_heads // num_kv_heads
    return [[h // group for h in range(num_heads)] for _ in range(num_layers)]


def _maps(num_layers: int, num_heads: int, num_kv_heads: int) -> dict:
    maps = gqa_maps(num_layers, num_heads, num_kv_heads)
    return {"key_index": maps, "value_index": [list(m) for m in maps]}


def split_rows(weight: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [t.contiguous() for t in torch.split(weight, sizes, dim=0)]


def attention_sizes(cfg: ModelConfig, layer: int) -> list[int]:
    """Rows of q, k and v projections in `layer`: (H, Hk, Hv) * hd."""
    hd = cfg.head_dim
    return [cfg.num_heads * hd, cfg.key_heads(layer) * hd, cfg.value_heads(layer) * hd]


# ---- LLaMA, Mistral, Qwen2: RMSNorm, RoPE, gated MLP ---------------------------------------------

LLAMA_WEIGHTS = {
    "model.embed_tokens.weight": "embed.weight",
    **_weight_and_bias("model.layers.{}.self_attn.q_proj", "layers.{}.attn.q_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.k_proj", "layers.{}.attn.k_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.v_proj", "layers.{}.attn.v_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.o_proj", "layers.{}.attn.o_proj"),
    **_weight_and_bias("model.layers.{}.mlp.gate_proj", "layers.{}.mlp.gate_proj"),
    **_weight_and_bias("model.layers.{}.mlp.up_proj", "layers.{}.mlp.up_proj"),
    **_weight_and_bias("model.layers.{}.mlp.down_proj", "layers.{}.mlp.down_proj"),
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Older LLaMA-style checkpoints saved the RoPE frequencies as a buffer.
ROTARY_BUFFER = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)


def rope_decoder_config(
    c,
    *,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    sliding_window: int | None = None,
    rope_layer_type: str | None = None,
    activation_field: str = "hidden_act",
    tied: bool = False,
    **extra,
) -> ModelConfig:
    """LLaMA-style decoders: pre-RMSNorm, RoPE on whole heads, gated MLP, optional GQA. The RoPE of
    rope_parameters[`rope_layer_type`] when given; the activation named by `activation_field`;
    `tied`: untied embeddings unless the config says otherwise. `extra`: further ModelConfig fields
    (qk-norm, norm style, block norms, ...)."""
    if extra.get("qk_norm") is None:
        refuse_qk_norm(c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    fields = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        **_maps(c.num_hidden_layers, c.num_attention_heads, kv),
        norm="rmsnorm",
        norm_eps=c.rms_norm_eps,
        mlp="gated",
        activation=activation(c, activation_field),
        position="rope",
        max_position_embeddings=c.max_position_embeddings,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", tied)),
        sliding_window=sliding_window,
        family=c.model_type,
        **rope_fields(c, head_dim, rope_layer_type),
    )
    return ModelConfig(**{**fields, **extra})


def llama_config(c) -> ModelConfig:
    bias = bool(getattr(c, "attention_bias", False))
    return rope_decoder_config(c, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(c, "mlp_bias", False)))


def mistral_config(c) -> ModelConfig:
    # MistralAttention: no biases; every layer uses config.sliding_window (None: full attention).
    # HF's mask keeps key j for query i when i - window < j <= i (masking_utils.sliding_window_overlay),
    # the same rule as Transformer.causal_mask.
    return rope_decoder_config(c, qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=c.sliding_window)


def sliding_layers(c) -> list[int]:
    """Layers HF's layer_types marks "sliding_attention" (UnsupportedModel for other types)."""
    types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
    other = sorted(set(types) - {"full_attention", "sliding_attention"})
    if other:
        raise UnsupportedModel(
            f"{c.model_type}: layer types {other} are not supported (supported: full_attention, sliding_attention)"
        )
    return [l for l, t in enumerate(types) if t == "sliding_attention"]


def uniform_window(c) -> int | None:
    """The one window of a Qwen2/Qwen3 config: its config sets sliding_window to None unless
    use_sliding_window, and marks layers >= max_window_layers "sliding_attention" in layer_types.
    Only all-full or all-sliding configs are accepted here."""
    sliding = sliding_layers(c)
    if not sliding:
        return None
    if c.sliding_window is None:
        raise UnsupportedModel(f"{c.model_type}: layer_types asks for sliding_attention but sliding_window is not set")
    if len(sliding) != c.num_hidden_layers:
        raise UnsupportedModel(
            f"{c.model_type} with a sliding window on some layers only (layers {sliding[0]}..{sliding[-1]} of "
            f"{c.num_hidden_layers}: use_sliding_window with "
            f"max_window_layers={getattr(c, 'max_window_layers', None)}) "
            "is not supported: dha's model uses one attention window for every layer"
        )
    return c.sliding_window


def qwen2_config(c) -> ModelConfig:
    # Qwen2Attention: biases on q, k, v but not o.
    return rope_decoder_config(c, qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=uniform_window(c))


# ---- Qwen3: Qwen2's layout with per-head RMSNorm of q and k (qk-norm) -----------------------------

QWEN3_WEIGHTS = {
    **LLAMA_WEIGHTS,
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
}


def qwen3_config(c) -> ModelConfig:
    # Qwen3Attention: q_norm / k_norm are Qwen3RMSNorm(head_dim) (LLaMA's RMSNorm) on each head of
    # q_proj(x).view(..., head_dim) and k_proj(x) before RoPE; attention_bias on q, k, v and o alike;
    # no MLP bias; sliding windows as Qwen2's.
    bias = bool(getattr(c, "attention_bias", False))
    return rope_decoder_config(
        c, qkv_bias=bias, o_bias=bias, mlp_bias=False, sliding_window=uniform_window(c), qk_norm="head"
    )


# ---- Qwen3-MoE: Qwen3's attention, a mixture-of-experts MLP ------------------------------------

QWEN3_MOE_WEIGHTS = {
    **QWEN3_WEIGHTS,
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.router.weight",
    "model.layers.{}.mlp.experts.gate_up_proj": "layers.{}.mlp.gate_up_proj",
    "model.layers.{}.mlp.experts.down_proj": "layers.{}.mlp.down_proj",
}
# A checkpoint on disk stores each expert apart; transformers stacks them on load (gate and up
# concatenated per expert), and so does `stack_experts` (save_pretrained splits them again).
EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def stack_experts(sd: dict) -> dict:
    """Per-expert weights (experts.E.{gate,up,down}_proj.weight) -> experts.gate_up_proj (E, 2F, D)
    and experts.down_proj (E, D, F), as transformers holds them; other keys unchanged."""
    out, parts = {}, {}
    for key, value in sd.items():
        m = EXPERT_KEY.match(key)
        if m:
            parts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
        else:
            out[key] = value
    for prefix, p in parts.items():
        n = 1 + max(e for e, _ in p)
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([p[e, "gate"], p[e, "up"]]) for e in range(n)])
            out[f"{prefix}.down_proj"] = torch.stack([p[e, "down"] for e in range(n)])
        except KeyError as e:
            raise UnsupportedModel(f"{prefix}: expert {e.args[0][0]} has no {e.args[0][1]}_proj weight") from None
    return out


def qwen3_moe_config(c) -> ModelConfig:
    # Qwen3MoeDecoderLayer: the sparse block in layer l unless l is in mlp_only_layers, when experts
    # exist and (l + 1) % decoder_sparse_step == 0; the others a dense Qwen3 MLP of intermediate_size.
    layers = [
        l
        for l in range(c.num_hidden_layers)
        if l not in (c.mlp_only_layers or []) and (l + 1) % c.decoder_sparse_step == 0
    ]
    # Qwen3MoeConfig has no layer_types: its sliding_window (None unless use_sliding_window) is every layer's.
    return replace(
        qwen3_config(c),
        sliding_window=c.sliding_window,
        num_experts=c.num_experts,
        experts_per_token=c.num_experts_per_tok,
        expert_size=c.moe_intermediate_size,
        expert_layers=layers,
        normalise_expert_weights=bool(c.norm_topk_prob),
    )


# ---- OLMo 2: RMSNorm of the whole q and k projections, norms after each sublayer ----------------

OLMO2_WEIGHTS = {
    "model.embed_tokens.weight": "embed.weight",
    **_weight_and_bias("model.layers.{}.self_attn.q_proj", "layers.{}.attn.q_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.k_proj", "layers.{}.attn.k_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.v_proj", "layers.{}.attn.v_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.o_proj", "layers.{}.attn.o_proj"),
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    # OLMo 2's post_attention_layernorm normalises the attention output (ours: attn_post_norm), not
    # the MLP input as LLaMA's does.
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.attn_post_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_post_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def olmo2_config(c) -> ModelConfig:
    # Olmo2Attention: q_norm = Olmo2RMSNorm(H * hd) on q_proj(x) and k_norm = Olmo2RMSNorm(Hk * hd) on
    # k_proj(x), before the reshape into heads and RoPE; Olmo2RMSNorm applies its weight in float32
    # before rounding; its RoPE multiplies by float32 cos/sin and rounds once. Olmo2DecoderLayer:
    # x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x)); no input norms.
    bias = bool(getattr(c, "attention_bias", False))
    return rope_decoder_config(
        c,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        qk_norm="full",
        norm="rmsnorm_f32",
        block_norms="post",
        rope_in_float32=True,
    )


# ---- Gemma 3 (text): per-head Gemma RMSNorm of q and k, local and global layers, sandwich norms ---

GEMMA3_WEIGHTS = {
    **QWEN3_WEIGHTS,
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.attn_post_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_post_norm.weight",
}


def gemma3_text_config(c) -> ModelConfig:
    # Gemma3TextModel: embeddings times sqrt(hidden_size) rounded to their dtype; Gemma3RMSNorm is
    # x * (1 + w) in float32 everywhere (q_norm / k_norm over head_dim on each head, before RoPE);
    # Gemma3DecoderLayer: x + post_attention_layernorm(attn(input_layernorm(x))), then
    # x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))); scores scaled by
    # query_pre_attn_scalar ** -0.5. "sliding_attention" layers mask by sliding_window and use
    # rope_parameters["sliding_attention"], the others rope_parameters["full_attention"].
    # final_logit_softcapping caps the logits; attn_logit_softcapping is ignored, as transformers'
    # Gemma3Attention ignores it (it never passes it to the attention function).
    if getattr(c, "use_bidirectional_attention", False):
        raise UnsupportedModel(
            "gemma3_text with use_bidirectional_attention=True (an encoder, e.g. EmbeddingGemma) is not supported"
        )
    local = rope_fields(c, c.head_dim, "sliding_attention")
    bias = bool(getattr(c, "attention_bias", False))
    return rope_decoder_config(
        c,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        sliding_window=c.sliding_window,
        rope_layer_type="full_attention",
        activation_field="hidden_activation",
        tied=True,
        norm="rmsnorm_1p",
        local_layers=sliding_layers(c),
        local_rope_theta=local["rope_theta"],
        local_rope_inv_freq=local.get("rope_inv_freq"),
        local_rope_attention_scaling=local.get("rope_attention_scaling", 1.0),
        qk_norm="head",
        block_norms="sandwich",
        embed_scale=c.hidden_size**0.5,
        attn_scale=c.query_pre_attn_scalar**-0.5,
        logit_softcap=None if c.final_logit_softcapping is None else float(c.final_logit_softcapping),
    )


# ---- GPT-2: learned positions, LayerNorm, fused transposed Conv1D c_attn ------------------------

GPT2_WEIGHTS = {
    "transformer.wte.weight": "embed.weight",
    "transformer.wpe.weight": "pos_embed.weight",
    **_weight_and_bias("transformer.h.{}.ln_1", "layers.{}.attn_norm"),
    **_weight_and_bias("transformer.h.{}.attn.c_attn", "layers.{}.attn.qkv"),  # split by gpt2_from_hf
    **_weight_and_bias("transformer.h.{}.attn.c_proj", "layers.{}.attn.o_proj"),
    **_weight_and_bias("transformer.h.{}.ln_2", "layers.{}.mlp_norm"),
    **_weight_and_bias("transformer.h.{}.mlp.c_fc", "layers.{}.mlp.up_proj"),
    **_weight_and_bias("transformer.h.{}.mlp.c_proj", "layers.{}.mlp.down_proj"),
    **_weight_and_bias("transformer.ln_f", "norm"),
    "lm_head.weight": "lm_head.weight",
}
# transformers' Conv1D computes x @ W + b with W of shape (in, out): the transpose of nn.Linear.
GPT2_CONV1D = ("attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def gpt2_config(c) -> ModelConfig:
    # GPT2Attention.scaling: head_dim**-0.5 when scale_attn_weights, further / (layer + 1) when
    # scale_attn_by_inverse_layer_idx. Our attention always uses head_dim**-0.5.
    if c.scale_attn_by_inverse_layer_idx:
        raise UnsupportedModel(
            "gpt2 with scale_attn_by_inverse_layer_idx=True (attention scaled by 1/(layer+1)) is not supported"
        )
    if not c.scale_attn_weights:
        raise UnsupportedModel("gpt2 with scale_attn_weights=False (unscaled attention scores) is not supported")
    if getattr(c, "add_cross_attention", False):
        raise UnsupportedModel("gpt2 with add_cross_attention=True (an encoder-decoder) is not supported")
    # reorder_and_upcast_attn only changes how eager attention rounds in half precision (it computes
    # q.k in float32); the function is the same, and HF's default SDPA path ignores it.
    D, H = c.hidden_size, c.num_attention_heads
    return ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=D,
        num_layers=c.num_hidden_layers,
        num_heads=H,
        head_dim=D // H,
        intermediate_size=c.n_inner if c.n_inner is not None else 4 * D,
        norm="layernorm",
        norm_eps=c.layer_norm_epsilon,
        norm_bias=True,
        mlp="plain",
        activation=activation(c, "activation_function"),
        position="learned",
        max_position_embeddings=c.max_position_embeddings,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        family="gpt2",
    )


def gpt2_from_hf(sd: dict, cfg: ModelConfig) -> dict:
    """Transpose Conv1D weights to nn.Linear; split c_attn's columns into q, k, v."""
    sd = dict(sd)
    for l in range(cfg.num_layers):
        sizes = attention_sizes(cfg, l)
        fused_w = sd.pop(f"layers.{l}.attn.qkv.weight").t()  # (D, (H+Hk+Hv)*hd) -> ((H+Hk+Hv)*hd, D)
        fused_b = sd.pop(f"layers.{l}.attn.qkv.bias")
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), split_rows(fused_w, sizes), split_rows(fused_b, sizes)):
            sd[f"layers.{l}.attn.{name}.weight"], sd[f"layers.{l}.attn.{name}.bias"] = w, b
        for suffix in GPT2_CONV1D:
            sd[f"layers.{l}.{suffix}"] = sd[f"layers.{l}.{suffix}"].t().contiguous()
    return sd


def gpt2_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    """Inverse of gpt2_from_hf. A reduced-KV model gets a c_attn of width (H + Hk + Hv) * hd."""
    sd = dict(sd)
    for l in range(cfg.num_layers):
        for suffix in ("weight", "bias"):
            parts = [sd.pop(f"layers.{l}.attn.{name}.{suffix}") for name in ("q_proj", "k_proj", "v_proj")]
            fused = torch.cat(parts, dim=0)
            sd[f"layers.{l}.attn.qkv.{suffix}"] = fused.t().contiguous() if suffix == "weight" else fused
        for suffix in GPT2_CONV1D:
            sd[f"layers.{l}.{suffix}"] = sd[f"layers.{l}.{suffix}"].t().contiguous()
    return sd


# ---- GPT-NeoX / Pythia: partial RoPE, parallel residual, per-head interleaved qkv ----------------

GPT_NEOX_WEIGHTS = {
    "gpt_neox.embed_in.weight": "embed.weight",
    **_weight_and_bias("gpt_neox.layers.{}.input_layernorm", "layers.{}.attn_norm"),
    **_weight_and_bias("gpt_neox.layers.{}.post_attention_layernorm", "layers.{}.mlp_norm"),
    **_weight_and_bias("gpt_neox.layers.{}.attention.query_key_value", "layers.{}.attn.qkv"),  # split by neox_from_hf
    **_weight_and_bias("gpt_neox.layers.{}.attention.dense", "layers.{}.attn.o_proj"),
    **_weight_and_bias("gpt_neox.layers.{}.mlp.dense_h_to_4h", "layers.{}.mlp.up_proj"),
    **_weight_and_bias("gpt_neox.layers.{}.mlp.dense_4h_to_h", "layers.{}.mlp.down_proj"),
    **_weight_and_bias("gpt_neox.final_layer_norm", "norm"),
    "lm_head.weight": "lm_head.weight",
}


def gpt_neox_config(c) -> ModelConfig:
    # GPTNeoXAttention: head_size = hidden // heads; rotary_ndims = int(head_size * partial_rotary_factor)
    # (the config turns the old rotary_pct / rotary_emb_base into rope_parameters).
    head_dim = c.hidden_size // c.num_attention_heads
    return ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        norm="layernorm",
        norm_eps=c.layer_norm_eps,
        norm_bias=True,
        mlp="plain",
        activation=activation(c, "hidden_act"),
        position="rope",
        max_position_embeddings=c.max_position_embeddings,
        qkv_bias=bool(c.attention_bias),
        o_bias=bool(c.attention_bias),
        mlp_bias=True,
        parallel_residual=bool(c.use_parallel_residual),
        tie_word_embeddings=bool(c.tie_word_embeddings),
        family="gpt_neox",
        **rope_fields(c, partial_rotary_dim(c, head_dim)),
    )


def neox_from_hf(sd: dict, cfg: ModelConfig) -> dict:
    """query_key_value rows are (H, 3, hd): per head, its q, k and v rows one after the other
    (GPTNeoXAttention views the output as (B, T, H, 3 * hd) and chunks the last dim in three)."""
    sd = dict(sd)
    H, hd = cfg.num_heads, cfg.head_dim
    for l in range(cfg.num_layers):
        for suffix in ("weight", "bias"):
            key = f"layers.{l}.attn.qkv.{suffix}"
            if key not in sd:
                continue
            fused = sd.pop(key)
            per_head = fused.reshape(H, 3, hd, *fused.shape[1:])  # (H, 3, hd[, D])
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                sd[f"layers.{l}.attn.{name}.{suffix}"] = per_head[:, i].reshape(H * hd, *fused.shape[1:]).contiguous()
    return sd


def neox_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    """Inverse of neox_from_hf; the interleaved layout needs as many key and value heads as query heads."""
    sd = dict(sd)
    H, hd = cfg.num_heads, cfg.head_dim
    for l in range(cfg.num_layers):
        if cfg.key_heads(l) != H or cfg.value_heads(l) != H:
            raise UnsupportedModel(
                f"gpt_neox layer {l} has {cfg.key_heads(l)} key and {cfg.value_heads(l)} value heads for {H} query "
                "heads: the fused query_key_value layout holds one of each per query head (export it with remote code)"
            )
        for suffix in ("weight", "bias"):
            keys = [f"layers.{l}.attn.{name}.{suffix}" for name in ("q_proj", "k_proj", "v_proj")]
            if keys[0] not in sd:
                continue
            parts = [sd.pop(k) for k in keys]
            rest = parts[0].shape[1:]
            fused = torch.stack([p.reshape(H, hd, *rest) for p in parts], dim=1)  # (H, 3, hd[, D])
            sd[f"layers.{l}.attn.qkv.{suffix}"] = fused.reshape(3 * H * hd, *rest)
    return sd


# ---- OPT: learned positions with offset 2, pre-LayerNorm, plain MLP -------------------------------

OPT_WEIGHTS = {
    "model.decoder.embed_tokens.weight": "embed.weight",
    "model.decoder.embed_positions.weight": "pos_embed.weight",
    **_weight_and_bias("model.decoder.layers.{}.self_attn.q_proj", "layers.{}.attn.q_proj"),
    **_weight_and_bias("model.decoder.layers.{}.self_attn.k_proj", "layers.{}.attn.k_proj"),
    **_weight_and_bias("model.decoder.layers.{}.self_attn.v_proj", "layers.{}.attn.v_proj"),
    **_weight_and_bias("model.decoder.layers.{}.self_attn.out_proj", "layers.{}.attn.o_proj"),
    **_weight_and_bias("model.decoder.layers.{}.self_attn_layer_norm", "layers.{}.attn_norm"),
    **_weight_and_bias("model.decoder.layers.{}.fc1", "layers.{}.mlp.up_proj"),
    **_weight_and_bias("model.decoder.layers.{}.fc2", "layers.{}.mlp.down_proj"),
    **_weight_and_bias("model.decoder.layers.{}.final_layer_norm", "layers.{}.mlp_norm"),
    **_weight_and_bias("model.decoder.final_layer_norm", "norm"),
    "lm_head.weight": "lm_head.weight",
}


def opt_config(c) -> ModelConfig:
    if not c.do_layer_norm_before:
        raise UnsupportedModel(
            "opt with do_layer_norm_before=False (post-LayerNorm, e.g. opt-350m) is not supported: "
            "dha's blocks are pre-norm"
        )
    if c.word_embed_proj_dim != c.hidden_size:
        raise UnsupportedModel(
            f"opt with word_embed_proj_dim={c.word_embed_proj_dim} != hidden_size={c.hidden_size} (project_in / "
            "project_out around the decoder, e.g. opt-350m) is not supported"
        )
    if not c.layer_norm_elementwise_affine:
        raise UnsupportedModel(
            "opt with layer_norm_elementwise_affine=False (LayerNorm without weights) is not supported"
        )
    # OPTAttention multiplies q by head_dim**-0.5 before q.k instead of after: the same function.
    # OPTLearnedPositionalEmbedding looks up position + 2 (its table has max_position_embeddings + 2 rows).
    # OPT's LayerNorms use PyTorch's default eps (1e-5).
    bias = bool(c.enable_bias)
    return ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        intermediate_size=c.ffn_dim,
        norm="layernorm",
        norm_eps=1e-5,
        norm_bias=True,
        mlp="plain",
        activation=activation(c, "activation_function"),
        position="learned",
        max_position_embeddings=c.max_position_embeddings,
        position_offset=2,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        final_norm=not getattr(c, "_remove_final_layer_norm", False),
        family="opt",
    )


# ---- Phi (phi-1, phi-1.5, phi-2): partial RoPE, one LayerNorm feeding parallel attention and MLP -

PHI_WEIGHTS = {
    "model.embed_tokens.weight": "embed.weight",
    **_weight_and_bias("model.layers.{}.self_attn.q_proj", "layers.{}.attn.q_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.k_proj", "layers.{}.attn.k_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.v_proj", "layers.{}.attn.v_proj"),
    **_weight_and_bias("model.layers.{}.self_attn.dense", "layers.{}.attn.o_proj"),
    **_weight_and_bias("model.layers.{}.mlp.fc1", "layers.{}.mlp.up_proj"),
    **_weight_and_bias("model.layers.{}.mlp.fc2", "layers.{}.mlp.down_proj"),
    **_weight_and_bias("model.layers.{}.input_layernorm", "layers.{}.attn_norm"),
    **_weight_and_bias("model.final_layernorm", "norm"),
    **_weight_and_bias("lm_head", "lm_head"),
}


def phi_config(c) -> ModelConfig:
    refuse_qk_norm(c)  # qk_layernorm=True: per-head LayerNorm on q and k
    # PhiAttention: head_dim = hidden // heads, all projections with bias, k/v with
    # num_key_value_heads heads; PhiDecoderLayer: x + attn(ln(x)) + mlp(ln(x)) with one LayerNorm.
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        **_maps(c.num_hidden_layers, c.num_attention_heads, kv),
        norm="layernorm",
        norm_eps=c.layer_norm_eps,
        norm_bias=True,
        mlp="plain",
        activation=activation(c, "hidden_act"),
        position="rope",
        max_position_embeddings=c.max_position_embeddings,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        parallel_residual=True,
        shared_input_norm=True,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        lm_head_bias=True,
        family="phi",
        **rope_fields(c, partial_rotary_dim(c, head_dim)),
    )


# ---- the table -------------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", llama_config, LLAMA_WEIGHTS, ignored_keys=ROTARY_BUFFER),
    "mistral": Family("mistral", "MistralForCausalLM", mistral_config, LLAMA_WEIGHTS, ignored_keys=ROTARY_BUFFER),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", qwen2_config, LLAMA_WEIGHTS, ignored_keys=ROTARY_BUFFER),
    "gpt2": Family(
        "gpt2",
        "GPT2LMHeadModel",
        gpt2_config,
        GPT2_WEIGHTS,
        kv_heads_field=None,
        from_hf_layout=gpt2_from_hf,
        to_hf_layout=gpt2_to_hf,
        base_prefix="transformer.",
        # Causal-mask buffers saved by older transformers (GPT2Attention.bias / masked_bias).
        ignored_keys=("transformer.h.{}.attn.bias", "transformer.h.{}.attn.masked_bias"),
    ),
    "gpt_neox": Family(
        "gpt_neox",
        "GPTNeoXForCausalLM",
        gpt_neox_config,
        GPT_NEOX_WEIGHTS,
        kv_heads_field=None,
        from_hf_layout=neox_from_hf,
        to_hf_layout=neox_to_hf,
        base_prefix="gpt_neox.",
        # GPTNeoXPreTrainedModel._keys_to_ignore_on_load_unexpected, and old saved RoPE frequencies.
        ignored_keys=(
            "gpt_neox.layers.{}.attention.bias",
            "gpt_neox.layers.{}.attention.masked_bias",
            "gpt_neox.layers.{}.attention.rotary_emb.inv_freq",
        ),
        # transformers' conversion_mapping renames Pythia's embed_out to lm_head on load.
        legacy_keys={"embed_out.weight": "lm_head.weight"},
    ),
    "opt": Family("opt", "OPTForCausalLM", opt_config, OPT_WEIGHTS, kv_heads_field=None),
    # PhiConfig has num_key_value_heads and PhiAttention honours it, so uniform GQA exports stock.
    "phi": Family("phi", "PhiForCausalLM", phi_config, PHI_WEIGHTS),
    # qk-norm families (exact unconverted; refuse_merge_of_qk_norm): their HF classes take GQA.
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", qwen3_config, QWEN3_WEIGHTS),
    "qwen3_moe": Family(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        qwen3_moe_config,
        QWEN3_MOE_WEIGHTS,
        from_checkpoint=stack_experts,
    ),
    "olmo2": Family("olmo2", "Olmo2ForCausalLM", olmo2_config, OLMO2_WEIGHTS),
    "gemma3_text": Family("gemma3_text", "Gemma3ForCausalLM", gemma3_text_config, GEMMA3_WEIGHTS),
}


def family_of(model_type: str) -> Family:
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in QK_NORM_REFUSED:
        raise UnsupportedModel(
            f"architecture {model_type!r} is not supported: {QK_NORM_REFUSED[model_type]} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    raise UnsupportedModel(
        f"architecture {model_type!r} is not supported: dha.families has no config and weight mapping for it "
        f"(supported: {', '.join(sorted(FAMILIES))})"
    )


def config_from_hf(hf_config) -> ModelConfig:
    fam = family_of(hf_config.model_type)
    return fam.config_from_hf(hf_config)


def normalise_hf_keys(state_dict: dict, fam: Family) -> dict:
    """What transformers does on load before matching keys: rename legacy keys, add the base-model
    prefix to a checkpoint saved from the base model, drop ignored buffers."""
    ignored = [_pattern(t) for t in fam.ignored_keys]
    prefixed = any(k.startswith(fam.base_prefix) for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        key = fam.legacy_keys.get(key, key)
        if not prefixed and not key.startswith("lm_head."):
            key = fam.base_prefix + key
        if not any(p.match(key) for p in ignored):
            out[key] = value
    return out


def weights_from_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """HF state dict (any checkpoint of the family) -> our state dict for `cfg` (from config_from_hf)."""
    fam = family_of(cfg.family)
    sd = normalise_hf_keys(state_dict, fam)
    if fam.from_checkpoint:
        sd = fam.from_checkpoint(sd)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    sd = rename(sd, fam.weight_map)
    return fam.from_hf_layout(sd, cfg) if fam.from_hf_layout else sd


def weights_to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> the family's HF state dict (a tied lm_head.weight left out)."""
    fam = family_of(cfg.family)
    sd = {k: v for k, v in state_dict.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    if fam.to_hf_layout:
        sd = fam.to_hf_layout(sd, cfg)
    return rename(sd, invert(fam.weight_map))
