"""Weight transforms between attention layouts: pure functions from one model to a new one.

Each transform computes a new ModelConfig (new key/value maps) and a new state dict, then builds
the model with a strict load, so a missing or extra tensor is an error, never silently ignored.

- expand_to_mha: give every query head its own copy of the key and value head it reads (exact).
- permute_query_heads: reorder query heads with W_O's columns and both maps (exact).
- merge_groups: replace each group of a plan by one head, a weighted sum of the group's heads
  (mean by default: GQA mean-pooling; identity plan: no change).

Heads are rows of the projection weights: head j of k_proj is rows j*hd:(j+1)*hd (and bias).
Summing key weights before RoPE is exact because RoPE is linear and the same for every head.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch

from .model import ModelConfig, Transformer
from .plan import Plan
from .summary import kv_summary


def build(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Transformer:
    """A model of `cfg` holding exactly `state_dict` (strict load), in the state dict's dtype, on its
    device (the head-map buffers follow the weights there)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = dict(state_dict)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]  # absent from a tied checkpoint by design
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_buffers()
    return model.to(model.embed.weight.device)


def heads(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(n*hd, ...) projection weight or bias -> (n, hd, ...) per head."""
    return weight.reshape(weight.shape[0] // head_dim, head_dim, *weight.shape[1:])


def unheads(per_head: torch.Tensor) -> torch.Tensor:
    """(n, hd, ...) -> (n*hd, ...)."""
    return per_head.reshape(per_head.shape[0] * per_head.shape[1], *per_head.shape[2:])


def state_dict_of(model: Transformer) -> dict[str, torch.Tensor]:
    """A copy of the model's weights (a tied lm_head left out): entries may be written into."""
    return {k: v.clone() for k, v in tensors_of(model).items()}


def tensors_of(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's own weight tensors, not copies (a tied lm_head left out): replace entries, never
    write into them. A model built from it shares every tensor it does not replace."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def with_maps(cfg: ModelConfig, key_index, value_index) -> ModelConfig:
    new = copy.deepcopy(cfg)
    new.key_index = [list(map(int, m)) for m in key_index]
    new.value_index = [list(map(int, m)) for m in value_index]
    new.__post_init__()
    return new


def select_heads(sd, prefix: str, hd: int, rows: list[int]) -> None:
    """The projection `prefix` (weight, and bias if any) keeps, in order, its heads `rows`."""
    for suffix in ("weight", "bias"):
        key = f"{prefix}.{suffix}"
        if key in sd:
            sd[key] = unheads(heads(sd[key], hd)[rows])


def select_norm_heads(sd, cfg: ModelConfig, key: str, rows: list[int]) -> None:
    """A q/k norm's weight follows its heads where it has a part per head: one row per head (a merged
    per-head norm, qk_norm_weights "head"), or one hd slice per head (a norm over the whole projection)."""
    if cfg.qk_norm_weights == "head":
        sd[key] = sd[key][rows]
    elif cfg.qk_norm == "full":
        sd[key] = unheads(heads(sd[key], cfg.head_dim)[rows])


def expand_to_mha(model: Transformer) -> Transformer:
    """Each query head gets its own key and value head: an exactly equivalent MHA model."""
    cfg, sd, hd = model.config, state_dict_of(model), model.config.head_dim
    for l in range(cfg.num_layers):
        select_heads(sd, f"layers.{l}.attn.k_proj", hd, cfg.key_index[l])
        select_heads(sd, f"layers.{l}.attn.v_proj", hd, cfg.value_index[l])
        # a norm over the whole key projection keeps the layer's RMS when every key head gets as many copies
        if cfg.qk_norm == "full" and len(set(Counter(cfg.key_index[l]).values())) > 1:
            raise ValueError(
                f"layer {l}: key heads read by unequal numbers of query heads; copying them changes what a "
                "norm over the whole key projection divides by"
            )
        select_norm_heads(sd, cfg, f"layers.{l}.attn.k_norm.weight", cfg.key_index[l])
    H = cfg.num_heads
    return build(with_maps(cfg, [list(range(H))] * cfg.num_layers, [list(range(H))] * cfg.num_layers), sd)


def permute_query_heads(model: Transformer, perms: list[list[int]]) -> Transformer:
    """New query head i of layer l is old head perms[l][i]; W_O's columns and both maps follow."""
    cfg, sd, hd = model.config, state_dict_of(model), model.config.head_dim
    key_index, value_index = [], []
    for l, perm in enumerate(perms):
        if sorted(perm) != list(range(cfg.num_heads)):
            raise ValueError(f"layer {l}: {perm} is not a permutation of {cfg.num_heads} query heads")
        select_heads(sd, f"layers.{l}.attn.q_proj", hd, perm)
        select_norm_heads(sd, cfg, f"layers.{l}.attn.q_norm.weight", perm)
        w_o = sd[f"layers.{l}.attn.o_proj.weight"]  # (D, H*hd): columns are heads
        sd[f"layers.{l}.attn.o_proj.weight"] = unheads(heads(w_o.T, hd)[perm]).T.contiguous()
        key_index.append([cfg.key_index[l][p] for p in perm])
        value_index.append([cfg.value_index[l][p] for p in perm])
    return build(with_maps(cfg, key_index, value_index), sd)


def regroup_map(index: list[int], groups: list[list[int]]) -> list[int]:
    """Query head h read source head index[h]; it now reads the group holding that head."""
    group_of = {h: g for g, members in enumerate(groups) for h in members}
    return [group_of[i] for i in index]


def _pool(sd: dict, key: str, hd: int, groups: list[list[int]], weights: list[torch.Tensor]) -> None:
    """sd[key]'s heads (n*hd, ...) -> one per group, sum_k weights[g][k] * head_k."""
    per_head = heads(sd[key], hd).float()  # (n, hd, ...)
    shape = (-1,) + (1,) * (per_head.dim() - 1)
    merged = [(per_head[m] * w.to(per_head).reshape(shape)).sum(0) for m, w in zip(groups, weights)]
    sd[key] = unheads(torch.stack(merged)).to(sd[key].dtype)


def merge_groups(
    model: Transformer,
    plan: Plan,
    key_weights: list[list[torch.Tensor]] | None = None,
    value_weights: list[list[torch.Tensor]] | None = None,
) -> Transformer:
    """Replace each plan group by one head: sum_k w_k * head_k (weights default to the mean).

    key_weights[l][g] is a vector with one coefficient per member of layer l's key group g. Under a
    norm over the layer's whole key projection (qk_norm "full"), each group's slice of the norm's
    weight becomes its members' mean by the same coefficients, scaled to sum to one.
    """
    cfg, sd, hd = model.config, state_dict_of(model), model.config.head_dim
    counts = kv_summary(cfg)
    plan.validate(counts["key_heads"], counts["value_heads"])
    key_index, value_index = [], []
    for l, layer in enumerate(plan.layers):
        for name, groups, weights in (
            ("k_proj", layer.key_groups, key_weights[l] if key_weights else None),
            ("v_proj", layer.value_groups, value_weights[l] if value_weights else None),
        ):
            weights = weights or [torch.full((len(m),), 1.0 / len(m)) for m in groups]
            for suffix in ("weight", "bias"):
                if f"layers.{l}.attn.{name}.{suffix}" in sd:
                    _pool(sd, f"layers.{l}.attn.{name}.{suffix}", hd, groups, weights)
            if name == "k_proj" and cfg.qk_norm == "full":
                _pool(sd, f"layers.{l}.attn.k_norm.weight", hd, groups, [w / w.sum() for w in weights])
        key_index.append(regroup_map(cfg.key_index[l], layer.key_groups))
        value_index.append(regroup_map(cfg.value_index[l], layer.value_groups))
    return build(with_maps(cfg, key_index, value_index), sd)
