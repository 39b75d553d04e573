"""The attention layouts serving engines hold, and the exact transform of a model into one.

llama.cpp (`llama` and `deci` GGUF architectures), vLLM and SGLang (Nemotron-NAS
`DeciLMForCausalLM`) all run grouped-query attention with, per layer, one count of key/value heads
(n_kv), the same grouping for keys and values, and query heads in contiguous groups of equal size
H / n_kv (query head h reads key/value head h // (H / n_kv)). `deci` and Nemotron-NAS let n_kv
differ from layer to layer; plain `llama` does not.

A dha layout is held exactly when, in every layer, the query heads that share a key head also
share a value head and vice versa, and every such group has the same size: permuting the query
heads (q_proj rows with o_proj columns, exact) then makes the groups contiguous. Anything else
(decoupled key and value groups, uneven groups) can be held exactly only by duplicating heads
(`to_serving(..., pad=True)`): every query head reads a (key head, value head) pair; the query
heads reading one pair are cut into chunks of g = gcd(sizes of all pairs' groups), and each chunk
gets its own copy of the pair. That is the fewest heads an equal-group layout can have, since a
group must read one key and one value head, so g must divide every pair's group size.

`serving_layout_problem` is the check (a string naming the first layer that fails, or None);
`check_same_function` guards the transform at export time; `unsupported_reason` says when the
architecture itself is not the LLaMA graph these engines run. `serve_for_export` is what the
serving exports (dha.gguf, dha.nemotron) share: those checks as UserErrors, the transform, its
check, and the head counts and KV bytes they report.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UserError
from .model import ModelConfig, Transformer
from .summary import kv_summary
from .transforms import build, heads, select_heads, select_norm_heads, state_dict_of, unheads, with_maps

# Permuting query heads changes the order of fp32 sums only: dha.export measured 1.9e-4 on
# SmolLM2-135M (logits up to ~34) with every layer reordered; a wrong permutation moves logits by O(1).
LAYOUT_ATOL, LAYOUT_RTOL = 1e-4, 1e-3


@dataclass
class LayerLayout:
    perm: list[int]  # new query head i is old query head perm[i]
    key_source: list[int]  # new key/value head j copies old key head key_source[j] ...
    value_source: list[int]  # ... and old value head value_source[j]

    @property
    def kv_heads(self) -> int:
        return len(self.key_source)


def pair_groups(key_index: list[int], value_index: list[int]) -> dict[tuple[int, int], list[int]]:
    """(key head, value head) -> the query heads that read that pair, in head order."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for h, pair in enumerate(zip(key_index, value_index)):
        groups[pair].append(h)
    return dict(sorted(groups.items()))


def layer_layout_problem(key_index: list[int], value_index: list[int]) -> str | None:
    """Why one layer's maps are not an equal-group GQA layout up to a query permutation, or None."""
    groups = pair_groups(key_index, value_index)
    n_keys, n_values = max(key_index) + 1, max(value_index) + 1
    if not len(groups) == n_keys == n_values:
        return (
            f"key heads and value heads are grouped differently (decoupled: {n_keys} key heads, "
            f"{n_values} value heads, {len(groups)} distinct key/value pairs read by the query heads)"
        )
    sizes = sorted(len(members) for members in groups.values())
    if sizes[0] != sizes[-1]:
        return f"key/value heads are shared by unequal numbers of query heads ({sizes})"
    return None


def serving_layout_problem(cfg: ModelConfig) -> str | None:
    """None when every layer of `cfg` is held exactly by llama.cpp `deci` / Nemotron-NAS, else why not."""
    for layer in range(cfg.num_layers):
        problem = layer_layout_problem(cfg.key_index[layer], cfg.value_index[layer])
        if problem is not None:
            return f"layer {layer}: {problem}"
    return None


def layer_layout(key_index: list[int], value_index: list[int], pad: bool) -> LayerLayout:
    """The query permutation and key/value head copies that make one layer contiguous equal-group GQA."""
    problem = layer_layout_problem(key_index, value_index)
    if problem is not None and not pad:
        raise ValueError(problem)
    groups = pair_groups(key_index, value_index)
    size = math.gcd(*(len(members) for members in groups.values()))  # the group size when no padding is needed
    perm, key_source, value_source = [], [], []
    for (k, v), members in groups.items():
        for start in range(0, len(members), size):
            perm += members[start : start + size]
            key_source.append(k)
            value_source.append(v)
    return LayerLayout(perm, key_source, value_source)


def to_serving(model: Transformer, pad: bool = False) -> tuple[Transformer, list[LayerLayout]]:
    """An exactly equivalent model whose every layer is contiguous equal-group GQA (maps h // (H / n_kv)).

    Raises ValueError naming the layer when the layout needs padding and `pad` is False."""
    cfg, sd, hd = model.config, state_dict_of(model), model.config.head_dim
    layouts, maps = [], []
    for l in range(cfg.num_layers):
        try:
            layout = layer_layout(cfg.key_index[l], cfg.value_index[l], pad)
        except ValueError as e:
            raise ValueError(f"layer {l}: {e}") from None
        prefix = f"layers.{l}.attn"
        for name, rows in (("q_proj", layout.perm), ("k_proj", layout.key_source), ("v_proj", layout.value_source)):
            select_heads(sd, f"{prefix}.{name}", hd, rows)
        select_norm_heads(sd, cfg, f"{prefix}.q_norm.weight", layout.perm)  # qk-norm weights follow their heads
        select_norm_heads(sd, cfg, f"{prefix}.k_norm.weight", layout.key_source)
        w_o = sd[f"{prefix}.o_proj.weight"]  # (D, H*hd): columns are query heads
        sd[f"{prefix}.o_proj.weight"] = unheads(heads(w_o.T, hd)[layout.perm]).T.contiguous()
        group = cfg.num_heads // layout.kv_heads
        maps.append([h // group for h in range(cfg.num_heads)])
        layouts.append(layout)
    return build(with_maps(cfg, maps, maps), sd).eval(), layouts


def serving_kv_bytes_per_token(kv_heads: list[int], head_dim: int, bytes_per_value: int) -> int:
    """KV cache per token of a serving layout: every layer keeps n_kv key and n_kv value heads."""
    return sum(2 * n * head_dim * bytes_per_value for n in kv_heads)


def check_same_function(
    served: Transformer, source: Transformer, seed: int = 0, batch: int = 2, length: int = 32
) -> float:
    """Largest |logit difference| of the two (float32) models on random tokens, on their device; raises
    if beyond tolerance."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(
        0, source.config.vocab_size, (batch, min(length, source.config.max_position_embeddings)), generator=g
    )
    ids = ids.to(next(source.parameters()).device)
    with torch.no_grad():
        ours, theirs = source(ids), served(ids)
    diff = (theirs - ours).abs().max().item()
    if not diff <= LAYOUT_ATOL + LAYOUT_RTOL * ours.abs().max().item():  # also catches NaN
        raise RuntimeError(
            f"the serving layout changed the model: max |logit difference| {diff:.3g} (fp32); nothing written"
        )
    return diff


def unsupported_reason(cfg: ModelConfig) -> str | None:
    """Why the LLaMA graph these engines run (llama.cpp `llama` / `deci`, Nemotron-NAS) cannot run this
    model (its architecture, not its layout), or None."""
    per_head = " (and one norm weight per head, which llama.cpp's qwen3 and gemma3 graphs do not hold)"
    checks = [
        (
            cfg.qk_norm is None,
            f"qk-norm ({cfg.family}): the serving exports write LLaMA graphs, which have no query/key norms"
            + (per_head if cfg.qk_norm_weights == "head" else ""),
        ),
        (
            cfg.family == "llama",
            f"family {cfg.family!r}: the serving exports write LLaMA-family models only (model_type llama)",
        ),
        (cfg.norm == "rmsnorm" and cfg.final_norm, "llama.cpp's llama graph needs RMSNorm"),
        (cfg.mlp == "gated" and cfg.activation == "silu", "llama.cpp's llama graph needs a SwiGLU MLP"),
        (cfg.position == "rope" and cfg.rotary_dim == cfg.head_dim, "llama.cpp's llama graph rotates whole heads"),
        (not cfg.parallel_residual and cfg.sliding_window is None, "parallel residual or sliding window attention"),
        (not cfg.lm_head_bias, "an lm_head bias has no GGUF tensor"),
        (
            cfg.rope_attention_scaling == 1.0,
            f"RoPE attention scaling {cfg.rope_attention_scaling} (yarn) is not written",
        ),
        (cfg.head_dim % 2 == 0, "odd head dim"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    return None


@dataclass
class Served:
    """A model in a serving layout, checked against the model it came from: what an export writes and reports."""

    model: Transformer  # float32, every layer contiguous equal-group GQA
    kv_heads: list[int]  # per layer, as written
    query_heads: int
    padded_layers: int  # layers given duplicated heads by `pad`
    max_abs_diff: float  # fp32 logits: the serving layout against the model, on random tokens
    source: ModelConfig  # the model's own config (its own maps)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache per token of the serving layout, a cache in `dtype`."""
        return serving_kv_bytes_per_token(self.kv_heads, self.model.config.head_dim, dtype.itemsize)

    def source_kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache per token of the model before the export (its own maps), in `dtype`."""
        return kv_summary(self.source, dtype)["kv_bytes_per_token"]


def serve_for_export(
    model: Transformer,
    pad: bool,
    target: str,
    engine: str,
    pad_hint: str,
    refusal: str | None = None,
    checks: Callable[[], None] | None = None,
    graph_problem: Callable[[ModelConfig], str | None] | None = None,
) -> Served:
    """The shared part of the serving exports (dha.gguf, dha.nemotron), in this order:

    - UserError "cannot export to `target`: ..." when the engine's graph cannot run the architecture
      (`graph_problem`, by default unsupported_reason: the LLaMA graph), or for the export's own
      `refusal` when given;
    - UserError when `engine` cannot hold the layout exactly and `pad` is not given (`pad_hint`
      says what --pad does);
    - the export's own `checks` (raising UserError), still before any work;
    - a float32 copy of `model` in a serving layout (to_serving), checked to compute the same
      function (check_same_function), with its head counts."""
    cfg = model.config
    reason = (graph_problem or unsupported_reason)(cfg) or refusal
    if reason is not None:
        raise UserError(f"cannot export to {target}: {reason}")
    problem = serving_layout_problem(cfg)
    if problem is not None and not pad:
        raise UserError(f"{engine} cannot hold this layout exactly: {problem}; {pad_hint}")
    if checks is not None:
        checks()
    source = copy.deepcopy(model).float().eval()
    served, layouts = to_serving(source, pad=pad)
    diff = check_same_function(served, source)
    heads_of = kv_summary(cfg)
    padded = sum(
        l.kv_heads != k or l.kv_heads != v for l, k, v in zip(layouts, heads_of["key_heads"], heads_of["value_heads"])
    )
    return Served(served, [l.kv_heads for l in layouts], cfg.num_heads, padded, diff, cfg)
