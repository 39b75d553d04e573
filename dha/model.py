"""A causal transformer whose attention layers read key and value heads through index maps.

Multi-head, grouped-query and decoupled-head attention differ only in two small integer maps
per layer (Chen et al. 2024, "DHA", section 3):

    head_h = softmax(q_h . k_{key_index[h]}^T / sqrt(hd) + mask) . v_{value_index[h]}

MHA:  key_index = value_index = [0, 1, ..., H-1]
GQA:  key_index = value_index = [h // (H // G) for h in range(H)]
DHA:  any two maps onto range(Hk) and range(Hv), chosen per layer; groups may be uneven.

The KV cache keeps only the Hk key heads and Hv value heads of each layer. Each layer picks its
exact attention once from its maps (`attention_path`; decode: `use_grouped_scores`), so no map
ever makes it copy the cache for a decode step.

Shape legend (used in the comments below):
    B  batch             T  new tokens in this call     S  tokens in the cache (past + new)
    D  hidden size       H  query heads                 hd head dim
    Hk key heads of a layer                             Hv value heads of a layer
    V  vocabulary size   F  MLP hidden size

This file imports torch only. Family-specific knobs (norm, MLP, positions, biases, parallel
residual, qk-norm, block norm layout, per-layer windows) are plain config fields, set by
`dha.families` from a Hugging Face config.

qk-norm (Qwen3, Gemma 3, OLMo 2) normalises queries and keys after their projections, before RoPE:
"head" normalises each head over hd with one (hd,) weight shared by all heads, so each stored key
head of a layer is normalised alone; "full" normalises the whole query projection (H*hd) and the
layer's whole key projection (Hk*hd, every stored key head together). A merged "head" model
(`dha.merge`'s norm-aware realisation) keeps one norm weight per head instead
(qk_norm_weights "head": q_norm (H, hd), k_norm (Hk, hd)); a merged "full" model keeps its layout,
the norm over its new, smaller key projection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # query heads H, the same in every layer
    head_dim: int
    intermediate_size: int
    # Per layer, for each query head, the key head and the value head it reads. Empty lists
    # mean plain MHA (filled in by __post_init__).
    key_index: list[list[int]] = field(default_factory=list)
    value_index: list[list[int]] = field(default_factory=list)
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm with a bias (GPT-2, OPT, NeoX, Phi)
    mlp: str = "gated"  # "gated": down(act(gate(x)) * up(x)) (SwiGLU); "plain": fc2(act(fc1(x)))
    activation: str = "silu"  # a key of ACTIVATIONS
    position: str = "rope"  # "rope" | "learned" (absolute position embeddings, GPT-2 / OPT)
    max_position_embeddings: int = 2048
    position_offset: int = 0  # learned positions start at this row (OPT uses 2)
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # rotate only the first rotary_dim dims of a head (NeoX, Phi)
    # Inverse frequencies precomputed for scaled RoPE variants (llama3, linear, yarn...); None
    # means the plain 1 / theta^(2i/rotary_dim).
    rope_inv_freq: list[float] | None = None
    rope_attention_scaling: float = 1.0  # cos/sin multiplier some scaled variants use
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (NeoX, Phi)
    shared_input_norm: bool = False  # with parallel_residual: one norm feeds both (Phi)
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False
    final_norm: bool = True
    sliding_window: int | None = None  # attend to at most this many most recent keys (Mistral)
    family: str = "llama"  # Hugging Face model_type this came from (used by export)
    # Per-layer attention (Gemma 3's sliding and full layers): None means every layer is alike
    # (sliding_window, if set, applies to all). Else the layers listed are "local": only they use
    # sliding_window and the local RoPE below; the others attend to every earlier token.
    local_layers: list[int] | None = None
    # RoPE of the local layers when it differs from the others' (Gemma 3: theta 10,000 locally):
    # plain 1 / theta^(2i/rotary_dim), or precomputed inverse frequencies and cos/sin multiplier.
    local_rope_theta: float | None = None
    local_rope_inv_freq: list[float] | None = None
    local_rope_attention_scaling: float = 1.0
    rope_in_float32: bool = False  # rotate in float32 and round once (OLMo 2 keeps cos/sin float32)
    # qk-norm after the q/k projections, before RoPE (module docstring): None | "head" | "full".
    qk_norm: str | None = None
    qk_norm_weights: str = "layer"  # "layer": one (hd,) weight per layer; "head": one per head (a merged model)
    # Where a block's norms sit: "pre" x + f(norm(x)); "post" x + norm(f(x)) (OLMo 2);
    # "sandwich" x + norm2(f(norm1(x))) (Gemma 2/3).
    block_norms: str = "pre"
    embed_scale: float | None = None  # embeddings times this, rounded to their dtype (Gemma: sqrt(D))
    attn_scale: float | None = None  # q.k multiplier; None: hd ** -0.5 (Gemma 3: query_pre_attn_scalar ** -0.5)
    logit_softcap: float | None = None  # logits -> c * tanh(logits / c)
    # A mixture-of-experts MLP (Qwen3-MoE, `SparseMoE`): num_experts gated experts of expert_size,
    # experts_per_token of them per token by a softmax router (their weights renormalised to sum to 1
    # with normalise_expert_weights), in expert_layers (None: every layer); 0 experts: dense MLPs.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    expert_layers: list[int] | None = None
    normalise_expert_weights: bool = False

    def __post_init__(self):
        H, L = self.num_heads, self.num_layers
        if not self.key_index:
            self.key_index = [list(range(H)) for _ in range(L)]
        if not self.value_index:
            self.value_index = [list(range(H)) for _ in range(L)]
        for name in ("key_index", "value_index"):
            maps = getattr(self, name)
            if len(maps) != L:
                raise ValueError(f"{name} has {len(maps)} layers, the model has {L}")
            for layer, m in enumerate(maps):
                if len(m) != H:
                    raise ValueError(f"{name}[{layer}] has {len(m)} entries, need one per query head ({H})")
                if sorted(set(m)) != list(range(max(m) + 1)):
                    raise ValueError(f"{name}[{layer}] = {m} must use every head 0..{max(m)} at least once")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r} (known: {', '.join(NORMS)})")
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"unknown qk_norm {self.qk_norm!r} (known: None, 'head', 'full')")
        if self.qk_norm_weights not in ("layer", "head") or (self.qk_norm_weights == "head" and self.qk_norm != "head"):
            raise ValueError(f"qk_norm_weights {self.qk_norm_weights!r} needs qk_norm 'head' (known: 'layer', 'head')")
        if self.block_norms not in ("pre", "post", "sandwich"):
            raise ValueError(f"unknown block_norms {self.block_norms!r} (known: 'pre', 'post', 'sandwich')")
        if self.parallel_residual and self.block_norms != "pre":
            raise ValueError("parallel_residual needs block_norms 'pre'")
        if self.local_layers is not None and not set(self.local_layers) <= set(range(L)):
            raise ValueError(f"local_layers {self.local_layers} are not all layers of 0..{L - 1}")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts and self.expert_size > 0):
            raise ValueError(
                f"a mixture of {self.num_experts} experts needs 1..{self.num_experts} experts per token and an "
                f"expert size, got {self.experts_per_token} and {self.expert_size}"
            )
        if self.expert_layers is not None and not set(self.expert_layers) <= set(range(L)):
            raise ValueError(f"expert_layers {self.expert_layers} are not all layers of 0..{L - 1}")

    def is_local(self, layer: int) -> bool:
        """Whether `layer` is a local layer (its own window and RoPE): see local_layers."""
        return self.local_layers is not None and layer in self.local_layers

    def has_experts(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts (num_experts, expert_layers)."""
        return self.num_experts > 0 and (self.expert_layers is None or layer in self.expert_layers)

    def key_heads(self, layer: int) -> int:
        return max(self.key_index[layer]) + 1

    def value_heads(self, layer: int) -> int:
        return max(self.value_index[layer]) + 1

    def kv_values_per_token(self) -> int:
        """Numbers the KV cache holds per token, summed over layers: sum_l (Hk + Hv) * hd."""
        return sum((self.key_heads(l) + self.value_heads(l)) * self.head_dim for l in range(self.num_layers))

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        return self.kv_values_per_token() * torch.tensor([], dtype=dtype).element_size()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face's LlamaRMSNorm does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RMSNormF32(RMSNorm):
    """The weight applied in float32 before rounding back, as OLMo 2's Olmo2RMSNorm does."""

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


class RMSNormOnePlus(RMSNorm):
    """x * (1 + weight), all in float32, as Gemma's Gemma3RMSNorm does (weight 0 is the identity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


# cfg.norm -> the norm module: "rmsnorm" LLaMA's, "rmsnorm_f32" OLMo 2's, "rmsnorm_1p" Gemma's.
NORMS = {"rmsnorm": RMSNorm, "rmsnorm_f32": RMSNormF32, "rmsnorm_1p": RMSNormOnePlus, "layernorm": None}


def make_norm(cfg: ModelConfig, dim: int | None = None, heads: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default: hidden_size); with `heads`, an RMSNorm whose
    weight is (heads, dim), one row per head of a (..., heads, dim) input."""
    dim = cfg.hidden_size if dim is None else dim
    if cfg.norm == "layernorm":
        if heads is not None:
            raise ValueError("per-head norm weights need an RMSNorm")
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
    if cfg.norm not in NORMS:
        raise ValueError(f"unknown norm {cfg.norm!r}")
    norm = NORMS[cfg.norm](dim, cfg.norm_eps)
    if heads is not None:
        norm.weight = nn.Parameter(norm.weight.detach().expand(heads, dim).clone())
    return norm


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), as Gemma caps its final logits."""
    return torch.tanh(x / cap) * cap


def causal_window_mask(start: int, T: int, S: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, S) mask for T queries at positions start.. over S keys at positions 0..S-1: True
    where key j is at or before the query and, with a window, j > position - window. None when SDPA's
    is_causal (start 0, T == S) or no mask (one new token) suffices."""
    if window is None or window >= S:
        if start == 0 and T == S:
            return None  # plain causal: SDPA's is_causal
        if T == 1:
            return None  # one new token sees the whole cache

    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def is_grouped(index: list[int], groups: int) -> bool:
    """True when `index` is the contiguous GQA map [h // (H // groups)] (MHA when groups == H)."""
    H = len(index)
    return H % groups == 0 and list(index) == [h // (H // groups) for h in range(H)]


def head_order(index: list[int]) -> list[int]:
    """Query heads sorted by the kv head they read (stable): group after group, no padding."""
    return sorted(range(len(index)), key=lambda h: (index[h], h))


def runs_of_equal_groups(index: list[int]) -> list[tuple[int, int, int, int]]:
    """How Attention batches a layer's groups: (first kv head, last kv head + 1, query heads per
    kv head, first row in head_order) for each batched matmul.

    All kv heads in one run when every group has the same size, else one run per kv head: a
    slice of several, but not all, heads of the cache is not a batch of matrices torch can view
    (its batch strides differ), so matmul would copy it."""
    G = max(index) + 1
    sizes = [index.count(g) for g in range(G)]
    if len(set(sizes)) == 1:
        return [(0, G, sizes[0], 0)]
    return [(g, g + 1, sizes[g], sum(sizes[:g])) for g in range(G)]


def attention_path(key_index: list[int], value_index: list[int]) -> str:
    """How a layer attends for a prefill (many new tokens), chosen once from its maps (Attention.attend).

    "gqa": the same contiguous equal groups for K and V (MHA, GQA, MQA): SDPA shares the heads.
    "coupled": one map for K and V, groups uneven or scattered: query heads gathered into group
        order, SDPA as GQA on the whole cache (equal groups) or per kv head (uneven), scattered back.
    "decoupled": K grouped apart from V: K and V gathered to every query head, then SDPA.
    A few new tokens (decode) take Attention.attend_grouped whatever the path (use_grouped_scores).
    """
    if list(key_index) != list(value_index):
        return "decoupled"
    return "gqa" if is_grouped(key_index, max(key_index) + 1) else "coupled"


# Layers whose SDPA call needs no copy of the cache (gqa, coupled) take the grouped path for at
# most this many new tokens (decode, short chunks): prefills keep SDPA's kernel and its rounding,
# which is transformers' own (SmolLM2's fp32 logits move by ~2e-3 when every layer's sums are
# reordered).
GROUPED_MAX_NEW_TOKENS = 4


def use_grouped_scores(path: str, new_tokens: int, head_dim: int) -> bool:
    """Whether a call of `new_tokens` tokens is scored per group with batched matmuls against the
    cache as it lies (Attention.attend_grouped) rather than by SDPA.

    Decode, every layout: faster than SDPA here (2 threads of an AVX-512 CPU, batch 8, 2,048
    cached tokens, SmolLM2 shapes: 9 query heads, hd 64; ms per layer, SDPA -> grouped: fp32 MQA
    1.33 -> 1.02, 3 KV heads 1.89 -> 1.78; bf16 MQA 8.6 -> 0.95, 3 KV heads 9.2 -> 2.9: torch
    2.13's CPU SDPA is slow for one bf16 query row). Decoupled layers up to T <= hd / 2: their
    SDPA path copies K and V to every query head (B, H, S, 2 hd), which outweighs the scores
    (B, H, T, S) the grouped path materialises while T < 2 hd.
    """
    if path == "decoupled":
        return 2 * new_tokens <= head_dim
    return new_tokens <= GROUPED_MAX_NEW_TOKENS


def grouped_matmul(rows: torch.Tensor, heads: torch.Tensor, runs) -> torch.Tensor:
    """rows (B, H, T, a), query heads in group order; heads (B, G, a, c), one per group.

    Every query head's T rows times its group's head: (B, H, T, c). One batched matmul per run
    (runs_of_equal_groups), (B, g, n*T, a) @ (B, g, a, c), on views: neither operand is copied."""
    B, H, T, _ = rows.shape
    outs = [
        (rows[:, r0 : r0 + (g1 - g0) * n].reshape(B, g1 - g0, n * T, -1) @ heads[:, g0:g1]).view(
            B, (g1 - g0) * n, T, -1
        )
        for g0, g1, n, r0 in runs
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def attend_through(
    q, k, v, mask, key_index: torch.Tensor, value_index: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention with any maps: K and V gathered to every query head (B, H, S, hd), then SDPA.

    q (B, H, T, hd), k (B, Hk, S, hd), v (B, Hv, S, hd), key_index / value_index (H,) -> (B, H, T, hd).
    mask: boolean (T, S), True where attention is allowed, or None for plain causal.
    scale: the q.k multiplier (None: hd ** -0.5)."""
    causal = mask is None and q.shape[2] > 1
    k = k.index_select(1, key_index)  # (B, H, S, hd)
    v = v.index_select(1, value_index)  # (B, H, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


class KVCache:
    """Preallocated per-layer key and value tensors holding only each layer's own heads.

    keys[l]: (B, Hk(l), max_len, hd), values[l]: (B, Hv(l), max_len, hd). `length` counts the
    tokens already written; the model advances it after the last layer of each call.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        self.max_len = max_len
        self.length = 0
        self.keys = [
            torch.zeros(batch_size, cfg.key_heads(l), max_len, cfg.head_dim, dtype=dtype, device=device)
            for l in range(cfg.num_layers)
        ]
        self.values = [
            torch.zeros(batch_size, cfg.value_heads(l), max_len, cfg.head_dim, dtype=dtype, device=device)
            for l in range(cfg.num_layers)
        ]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' k (B, Hk, T, hd) and v (B, Hv, T, hd); return the filled prefix."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self) -> int:
        """Memory the cache holds: the bytes of its tensors' distinct storages (not their shapes)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.keys + self.values}
        return sum(storages.values())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        H, hd = cfg.num_heads, cfg.head_dim
        self.layer = layer
        self.num_heads, self.head_dim = H, hd
        self.num_key_heads, self.num_value_heads = cfg.key_heads(layer), cfg.value_heads(layer)
        self.q_proj = nn.Linear(cfg.hidden_size, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_key_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_value_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, cfg.hidden_size, bias=cfg.o_bias)
        # qk-norm (ModelConfig.qk_norm): per head over hd, or over the whole projection of the layer.
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            per_head = cfg.qk_norm_weights == "head"
            self.q_norm = make_norm(cfg, hd, H if per_head else None)
            self.k_norm = make_norm(cfg, hd, self.num_key_heads if per_head else None)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = make_norm(cfg, H * hd), make_norm(cfg, self.num_key_heads * hd)
        # A local layer (ModelConfig.local_layers) masks by its own window and reads the local RoPE.
        self.local = cfg.is_local(layer)
        self.window = cfg.sliding_window if self.local else None
        self.scale = cfg.attn_scale
        # Which exact attention this layer runs (attention_path); its index tables are buffers
        # set in Transformer.init_buffers.
        self.path = attention_path(cfg.key_index[layer], cfg.value_index[layer])

    def project(self, x: torch.Tensor):
        """Query, key and value heads before RoPE (after qk-norm): (B, H, T, hd), (B, Hk, T, hd), (B, Hv, T, hd)."""
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_key_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(B, T, self.num_value_heads, self.head_dim).transpose(1, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def attend(self, q, k, v, mask):
        """q (B, H, T, hd), k (B, Hk, S, hd), v (B, Hv, S, hd) -> (B, H, T, hd).

        mask: boolean (T, S), True where attention is allowed, or None for plain causal."""
        if use_grouped_scores(self.path, q.shape[2], self.head_dim):
            return self.attend_grouped(q, k, v, mask)
        causal = mask is None and q.shape[2] > 1
        if self.path == "gqa":
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=self.num_key_heads != self.num_heads,
                scale=self.scale,
            )
        if self.path == "coupled":
            qg = q.index_select(1, self.key_order)  # (B, H, T, hd), group after group
            ys = [
                F.scaled_dot_product_attention(
                    qg[:, r0 : r0 + (g1 - g0) * n],
                    k[:, g0:g1],
                    v[:, g0:g1],
                    attn_mask=mask,
                    is_causal=causal,
                    enable_gqa=n > 1,
                    scale=self.scale,
                )
                for g0, g1, n, r0 in self.key_runs
            ]
            return (ys[0] if len(ys) == 1 else torch.cat(ys, 1)).index_select(1, self.key_slot)
        return attend_through(q, k, v, mask, self.key_index, self.value_index, self.scale)

    def attend_grouped(self, q, k, v, mask):
        """A few new tokens, any maps: each compact K/V head of the cache is read once, never copied.

        Query heads are put in key-group order; the n query heads of a key head stack their T rows
        into one batched matmul against the cache as it lies, (B, g, n*T, hd) @ (B, g, hd, S), for
        all g key heads at once when the groups are equal, else per key head (runs_of_equal_groups).
        The probabilities go to value-group order (when it differs) and are multiplied by the value
        heads the same way; the outputs return to query-head order.
        Softmax runs in float32, as HF's eager attention does, and nothing else is upcast.
        """
        B, H, T, hd = q.shape
        S = k.shape[2]
        scale = hd**-0.5 if self.scale is None else self.scale
        qg = q.index_select(1, self.key_order) * scale  # (B, H, T, hd) in key-group order
        scores = grouped_matmul(qg, k.transpose(-1, -2), self.key_runs)  # (B, H, T, S)
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        if self.key_to_value_order is not None:
            probs = probs.index_select(1, self.key_to_value_order)  # (B, H, T, S) in value-group order
        out = grouped_matmul(probs, v, self.value_runs)  # (B, H, T, hd)
        return out.index_select(1, self.value_slot)

    def forward(self, x, rope, mask, cache: KVCache | None, maps: tuple | None = None):
        """x (B, T, D) -> (B, T, D). maps: (key_index, value_index) to read the layer's own heads
        through instead of its maps, for what-if questions (dha.baselines' head importance): any
        maps onto its heads, which need not use every head; no cache."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if rope is not None:
            if self.local and rope.local is not None:
                rope = rope.local
            q, k = rope.apply(q), rope.apply(k)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hk, S, hd), (B, Hv, S, hd)
        if self.local:  # the model's mask is plain causal: this layer's own window (if any) over it
            S = k.shape[2]
            mask = causal_window_mask(S - T, T, S, self.window, x.device)
        if maps is None:
            y = self.attend(q, k, v, mask)  # (B, H, T, hd)
        else:
            y = attend_through(
                q,
                k,
                v,
                mask,
                torch.as_tensor(maps[0], device=x.device),
                torch.as_tensor(maps[1], device=x.device),
                self.scale,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "gated"
        self.act = ACTIVATIONS[cfg.activation]
        D, Fh, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if self.gated:
            self.gate_proj = nn.Linear(D, Fh, bias=bias)
        self.up_proj = nn.Linear(D, Fh, bias=bias)
        self.down_proj = nn.Linear(Fh, D, bias=bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class SparseMoE(nn.Module):
    """A mixture of gated experts (Qwen3-MoE): a softmax router picks experts_per_token experts per
    token (their probabilities, renormalised to sum to 1 with normalise_expert_weights, weigh their
    outputs). Expert e: down_proj[e] (act(gate) * up), gate and up the halves of gate_up_proj[e] x.
    Each expert runs on the tokens routed to it only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fe = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        self.top_k, self.normalise = cfg.experts_per_token, cfg.normalise_expert_weights
        self.act = ACTIVATIONS[cfg.activation]
        self.router = nn.Linear(D, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fe, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fe))
        for w in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(w, std=0.02)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.normalise:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            gate, up = F.linear(flat[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.reshape(x.shape)


class Block(nn.Module):
    """One layer. block_norms "pre": attn_norm / mlp_norm on the sublayer inputs; "post":
    attn_post_norm / mlp_post_norm on the sublayer outputs (OLMo 2); "sandwich": both (Gemma)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.shared_norm = cfg.shared_input_norm
        self.pre_norms = cfg.block_norms in ("pre", "sandwich")
        self.post_norms = cfg.block_norms in ("post", "sandwich")
        if self.pre_norms:
            self.attn_norm = make_norm(cfg)
            if not self.shared_norm:
                self.mlp_norm = make_norm(cfg)
        if self.post_norms:
            self.attn_post_norm = make_norm(cfg)
            self.mlp_post_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = SparseMoE(cfg) if cfg.has_experts(layer) else MLP(cfg)

    def forward(self, x, rope, mask, cache):
        if self.post_norms:
            a = self.attn_post_norm(self.attn(self.attn_norm(x) if self.pre_norms else x, rope, mask, cache))
            x = x + a
            return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x) if self.pre_norms else x))
        h = self.attn_norm(x)
        a = self.attn(h, rope, mask, cache)
        if self.parallel:
            return x + a + self.mlp(h if self.shared_norm else self.mlp_norm(x))
        x = x + a
        return x + self.mlp(self.mlp_norm(x))


class Rope:
    """cos/sin tables for the positions of one call, applied with the rotate-half convention.

    in_float32: the tables stay float32 and the rotation is rounded to x's dtype once (OLMo 2).
    local: the tables local layers read instead (ModelConfig.local_layers), or None."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, in_float32: bool = False):
        self.cos, self.sin, self.rotary_dim = cos, sin, rotary_dim  # (T, rotary_dim) each
        self.in_float32 = in_float32
        self.local: Rope | None = None

    def apply(self, x):  # x: (B, heads, T, hd)
        r = self.rotary_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
        rotated = torch.cat((-x2, x1), dim=-1)
        if self.in_float32:
            x_rot = (x_rot * self.cos + rotated * self.sin).to(x.dtype)
        else:
            x_rot = x_rot * self.cos.to(x.dtype) + rotated * self.sin.to(x.dtype)
        return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class ScaledEmbedding(nn.Embedding):
    """Embeddings times a constant rounded to their dtype (Gemma's sqrt(hidden_size), as
    Gemma3TextScaledWordEmbedding rounds it). lm_head, when tied, reads the unscaled weight."""

    def __init__(self, num: int, dim: int, scale: float):
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, ids):
        return super().forward(ids) * torch.tensor(self.scale, dtype=torch.float32).to(self.weight.dtype)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        if cfg.embed_scale is None:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings + cfg.position_offset, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, l) for l in range(cfg.num_layers))
        if cfg.final_norm:
            self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # Activation checkpointing (set by dha.train): under autograd and without a cache, each
        # block keeps only its input for the backward pass and runs its forward again there.
        self.checkpoint_blocks = False
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent buffers from the config: RoPE frequencies, head maps.

        Called again after building on the meta device (dha.transforms.build)."""
        cfg = self.config
        if cfg.position == "rope":
            if cfg.rope_inv_freq is not None:
                inv_freq = torch.tensor(cfg.rope_inv_freq, dtype=torch.float32)
            else:
                r = cfg.rotary_dim
                inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
            # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
            # (Hugging Face keeps them in float32 too).
            self.inv_freq = inv_freq
            self.local_inv_freq = None
            if cfg.local_rope_inv_freq is not None:
                self.local_inv_freq = torch.tensor(cfg.local_rope_inv_freq, dtype=torch.float32)
            elif cfg.local_rope_theta is not None:
                r = cfg.rotary_dim
                self.local_inv_freq = 1.0 / (cfg.local_rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
        for l, block in enumerate(self.layers):
            attn = block.attn
            attn.register_buffer("key_index", torch.tensor(cfg.key_index[l]), persistent=False)
            attn.register_buffer("value_index", torch.tensor(cfg.value_index[l]), persistent=False)
            for kind, index in (("key", cfg.key_index[l]), ("value", cfg.value_index[l])):
                order = head_order(index)
                attn.register_buffer(f"{kind}_order", torch.tensor(order), persistent=False)
                attn.register_buffer(
                    f"{kind}_slot", torch.tensor([order.index(h) for h in range(len(index))]), persistent=False
                )
                setattr(attn, f"{kind}_runs", runs_of_equal_groups(index))  # plain tuples, not tensors
            key_slot = [head_order(cfg.key_index[l]).index(h) for h in range(cfg.num_heads)]
            order = [key_slot[h] for h in head_order(cfg.value_index[l])]  # None: the two orders coincide
            attn.register_buffer(
                "key_to_value_order", None if order == sorted(order) else torch.tensor(order), persistent=False
            )

    def rope(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> Rope | None:
        """cos/sin tables for `positions`, computed in float32 and cast to `dtype` once per call
        (as HF's rotary embedding does), not once per layer."""
        if self.config.position != "rope":
            return None
        if self.inv_freq.device != positions.device:  # once, not a host-to-device copy every step
            self.inv_freq = self.inv_freq.to(positions.device)
        rope = self._rope_tables(self.inv_freq, self.config.rope_attention_scaling, positions, dtype)
        if self.local_inv_freq is not None:
            if self.local_inv_freq.device != positions.device:
                self.local_inv_freq = self.local_inv_freq.to(positions.device)
            rope.local = self._rope_tables(
                self.local_inv_freq, self.config.local_rope_attention_scaling, positions, dtype
            )
        return rope

    def _rope_tables(self, inv_freq: torch.Tensor, s: float, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        freqs = positions[..., None].float() * inv_freq  # (T, r/2), or (B, T, r/2) for per-row positions
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, r) or (B, T, r)
        if emb.dim() == 3:
            emb = emb[:, None]  # (B, 1, T, r): the same positions for every head of a row
        if self.config.rope_in_float32:
            return Rope(emb.cos() * s, emb.sin() * s, self.config.rotary_dim, in_float32=True)
        return Rope((emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype), self.config.rotary_dim)

    def causal_mask(self, start: int, T: int, S: int, device) -> torch.Tensor | None:
        """Boolean (T, S) mask, True where attention is allowed; None when SDPA's is_causal suffices.

        With local_layers the model-wide mask is plain causal; local layers apply their own window."""
        window = self.config.sliding_window if self.config.local_layers is None else None
        return causal_window_mask(start, T, S, window, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). With a cache, the tokens continue what it holds.

        last_only: logits of the last position only, (B, 1, V), as generation needs; a prefill then
        skips the (B, T, V) logits, often its largest tensor.
        positions: (B, T) increasing position ids of each row, in place of 0..T-1 (training with
        skipped positions, dha.rows.skip_positions); no cache, and no sliding window (it counts
        tokens, not positions)."""
        return self.logits(self.features(input_ids, cache, last_only, positions))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on final hidden states (`features`), soft-capped when the config says so."""
        out = self.lm_head(hidden)
        return out if self.config.logit_softcap is None else softcap(out, self.config.logit_softcap)

    def features(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states (B, T, D) that lm_head reads (`forward` without the lm_head)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)
        elif cache is not None or self.config.sliding_window is not None:
            raise ValueError("explicit positions take no cache and no sliding window")
        x = self.embed(input_ids)  # (B, T, D)
        if self.config.position == "learned":
            x = x + self.pos_embed(positions + self.config.position_offset)
        rope = self.rope(positions, x.dtype)
        mask = self.causal_mask(start, T, start + T, input_ids.device)
        checkpoint = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for block in self.layers:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        if self.config.final_norm:
            x = self.norm(x)
        return x

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once


NLL_CHUNK_BYTES = 2**26  # float32 logits made at once by next_token_nll and a chunked training loss (64 MiB)


def logit_chunk(cfg: ModelConfig) -> int:
    """Positions whose float32 logits take about NLL_CHUNK_BYTES: what a chunked loss makes at once."""
    return max(1, NLL_CHUNK_BYTES // (4 * cfg.vocab_size))


def token_nll(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(b, W-1): for each row of `rows` (b, W) the negative log-likelihood, in nats, of its tokens
    1..W-1, each predicted from the row's earlier tokens only (the model reads row[:-1] and predicts
    row[1:]). The logits are upcast to float32 first, whatever the model's dtype.

    On our own (unwrapped) model the logits are made a chunk of positions at a time (about
    NLL_CHUNK_BYTES of float32 logits), never (b, W-1, V) at once: with a large vocabulary those are
    the largest tensor of an evaluation. A wrapped model (DDP, FSDP, fusion) is called whole."""
    targets = rows[:, 1:].flatten()
    if type(model) is not Transformer:
        logits = model(rows[:, :-1])  # (b, W-1, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets, reduction="none").view(rows.shape[0], -1)
    hidden = model.features(rows[:, :-1]).flatten(0, 1)  # (b * (W-1), D)
    step = logit_chunk(model.config)
    nll = torch.cat(
        [
            F.cross_entropy(model.logits(hidden[i : i + step]).float(), targets[i : i + step], reduction="none")
            for i in range(0, hidden.shape[0], step)
        ]
    )
    return nll.view(rows.shape[0], -1)


def next_token_nll(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(b,): each row's summed `token_nll`. The one next-token loss of held-out text: dha.evaluate's
    perplexity and dha.train's held-out evaluation both sum it."""
    return token_nll(model, rows).sum(1)


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prefill, then decode token by token from the cache. temperature 0 is greedy. (B, T) -> (B, T + new)."""
    B, T = input_ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(input_ids, cache, last_only=True)[:, -1]
    out = [input_ids]
    for i in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
        else:
            token = logits.argmax(-1, keepdim=True)
        out.append(token)
        if i + 1 < max_new_tokens:
            logits = model(token, cache)[:, -1]
    return torch.cat(out, dim=1)
