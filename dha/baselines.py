"""The baselines users compare DHA against, each as a plan plus the initialised model it gives.

Every method is a function

    method(model, kv_budget, calib_blocks, options) -> (Plan, Transformer)

- model: the source Transformer (not modified);
- kv_budget: the fraction of the source's KV cache to keep, in (0, 1] (see `dha.budget.heads_for_budget`);
- calib_blocks: (n, T) calibration token ids from the TRAIN split, or None for methods that need
  none (gqa);
- options: ConvertOptions (seed, metric, grouping, ...).

Methods (the usual baselines of KV-head reduction):
- `gqa`          contiguous groups, mean-pooled (Ainslie et al. 2023, section 2.2).
- `gqa_similar`  groups of similar heads (agglomerative clustering of the mean of the key and value
                 similarity), mean-pooled; one grouping shared by K and V, as in GQA (DHA paper's
                 "GQA with CKA grouping" ablation).
- `svd`          low-rank compression of each group from calibration activations (Yu et al. 2024,
                 "Effectively Compress KV Heads for LLM"): PCA for values, a RoPE-commuting PCA
                 for keys; the reconstruction maps are folded into W_O and W_Q.
- `prune`        keep the most important heads (measured on calibration tokens), drop the rest;
                 queries of a dropped head read the most similar kept head.

Shape legend: N calibration tokens, g heads in a group, hd head dim, D hidden, r rotary dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .analyze import METRICS, cluster, collect_heads, heads_by_layer, similarity
from .budget import heads_for_budget, largest_divisor_at_most, source_heads
from .calibration import layer_stats
from .errors import UserError
from .merge import aligned_merge, closed_form_merges
from .model import Transformer
from .plan import LayerPlan, Plan, contiguous_groups
from .transforms import merge_groups


@dataclass
class ConvertOptions:
    seed: int = 0  # token subsampling in calibration
    calib_tokens: int = 4096  # calibration tokens used (from the train split)
    block_size: int = 256  # tokens per calibration block
    batch_size: int = 4  # calibration blocks per forward pass
    metric: str = "cka"  # head similarity for grouping and reassignment: "cosine" | "cka"
    grouping: str = "contiguous"  # svd only: "contiguous" (Yu et al.) | "similar" (clustered, K and V apart)
    device: str | None = None  # where calibration and merges run, one layer at a time (None: the model's own device)
    extra: dict = field(default_factory=dict)  # settings of methods registered elsewhere (e.g. dha)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise UserError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if self.grouping not in GROUPINGS:
            raise UserError(f"unknown grouping {self.grouping!r}; choose from {', '.join(GROUPINGS)}")
        if self.calib_tokens < 1 or self.block_size < 1 or self.batch_size < 1:
            raise UserError("calibration tokens, block size and batch size must be positive")


GROUPINGS = ("contiguous", "similar")


# ---- calibration -----------------------------------------------------------------------------------


def _need_calibration(name: str, calib_blocks) -> None:
    if calib_blocks is None or calib_blocks.numel() == 0:
        raise UserError(f"method {name!r} needs calibration text (--data)")


def head_similarities(model: Transformer, calib_blocks: torch.Tensor, options: ConvertOptions) -> list[dict]:
    """Per layer {"keys": (Hk, Hk), "values": (Hv, Hv)} similarity in options.metric."""
    collected = collect_heads(
        model,
        calib_blocks,
        options.batch_size,
        max_tokens=options.calib_tokens,
        seed=options.seed,
        device=options.device,
    )
    return [{kind: similarity(layer[kind], options.metric) for kind in ("keys", "values")} for layer in collected]


def _plan(model: Transformer, layers: list[LayerPlan], method: str, kv_budget: float, notes: dict) -> Plan:
    k, v = source_heads(model)
    plan = Plan(layers, k, v, method=method, kv_budget=kv_budget, notes=notes)
    plan.validate(k, v)
    return plan


def _options_notes(options: ConvertOptions, calib_blocks) -> dict:
    notes = {"seed": options.seed, "metric": options.metric}
    if calib_blocks is not None:
        notes["calibration_tokens"] = int(min(calib_blocks.numel(), options.calib_tokens))
    return notes


# ---- gqa -------------------------------------------------------------------------------------------


def convert_gqa(
    model: Transformer, kv_budget: float, calib_blocks, options: ConvertOptions
) -> tuple[Plan, Transformer]:
    """GQA by mean-pooling contiguous groups (Ainslie et al. 2023, section 2.2).

    GQA needs equal contiguous groups, shared by keys and values, so the count per layer must
    divide the source's KV head count: we take the largest divisor of it not above the budget's
    count (`heads_for_budget`), and say so when that is fewer heads than the budget allows.
    """
    src_k, src_v = source_heads(model)
    want_k, want_v = heads_for_budget(src_k, src_v, kv_budget)
    layers, adjusted = [], []
    for l, (nk, nv, tk, tv) in enumerate(zip(src_k, src_v, want_k, want_v)):
        if nk != nv:
            raise UserError(
                f"gqa shares one grouping between keys and values, but layer {l} has {nk} key and {nv} value heads"
            )
        n = largest_divisor_at_most(nk, min(tk, tv))
        if n != min(tk, tv):
            adjusted.append(l)
        groups = contiguous_groups(nk, n)
        layers.append(LayerPlan(groups, [list(g) for g in groups]))
    notes = {"grouping": "contiguous", "pooling": "mean"}
    if adjusted:
        notes["rounded_down_to_divisor_layers"] = adjusted
    plan = _plan(model, layers, "gqa", kv_budget, notes)
    return plan, merge_groups(model, plan)


# ---- gqa-similar -----------------------------------------------------------------------------------


def convert_gqa_similar(
    model: Transformer, kv_budget: float, calib_blocks, options: ConvertOptions
) -> tuple[Plan, Transformer]:
    """GQA with groups of similar heads, mean-pooled (the DHA paper's CKA-grouping ablation).

    One grouping per layer serves keys and values (a query group shares both, as in GQA); it
    clusters the mean of the key and the value similarity matrices (options.metric). Groups need
    not be equal or contiguous, so the count is exactly the budget's (`heads_for_budget`).
    """
    _need_calibration("gqa-similar", calib_blocks)
    src_k, src_v = source_heads(model)
    want_k, want_v = heads_for_budget(src_k, src_v, kv_budget)
    sims = head_similarities(model, calib_blocks, options)
    layers = []
    for l, (nk, nv) in enumerate(zip(src_k, src_v)):
        if nk != nv:
            raise UserError(
                "gqa-similar shares one grouping between keys and values, "
                f"but layer {l} has {nk} key and {nv} value heads"
            )
        groups = cluster((sims[l]["keys"] + sims[l]["values"]) / 2, min(want_k[l], want_v[l]))
        layers.append(LayerPlan(groups, [list(g) for g in groups]))
    notes = {
        "grouping": "similar (K and V similarity averaged)",
        "pooling": "mean",
        **_options_notes(options, calib_blocks),
    }
    plan = _plan(model, layers, "gqa-similar", kv_budget, notes)
    return plan, merge_groups(model, plan)


# ---- svd -------------------------------------------------------------------------------------------


def even_groups(num_heads: int, num_groups: int) -> list[list[int]]:
    """Contiguous groups whose sizes differ by at most one ([0,1],[2,3],[4] for 5 into 3)."""
    size, extra = divmod(num_heads, num_groups)
    out, start = [], 0
    for g in range(num_groups):
        n = size + (1 if g < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def convert_svd(
    model: Transformer, kv_budget: float, calib_blocks, options: ConvertOptions
) -> tuple[Plan, Transformer]:
    """Low-rank KV-head compression from calibration activations (Yu et al. 2024).

    Groups: contiguous, sizes differing by at most one (options.grouping "contiguous", their
    setting), or clustered by similarity, keys and values apart ("similar"). Per group of g heads:
    - values: PCA of the group's concatenated value outputs V (N, g*hd), uncentred (the new head
      has no extra bias to carry a mean): U (g*hd, hd) = the leading eigenvectors of V^T V. The new
      value head is U^T [W_v of the group] (and bias), and source head j ~ U_j v~, U_j the j-th
      (hd, hd) block of U; softmax weights sum to one, so a query head h that read j gets W_O's
      columns of h replaced by W_O[:, h] U_j. Exact when g = 1 (U is then orthogonal).
    - keys: the RoPE-commuting analogue, a complex PCA per frequency pair, folded into the query
      heads' W_Q rows (and q bias).
    Both are `dha.merge`'s aligned merge in its "plain" metric (DHA uses the weighted one).
    o_proj and q_proj change; nothing else does.
    """
    _need_calibration("svd", calib_blocks)
    src_k, src_v = source_heads(model)
    want_k, want_v = heads_for_budget(src_k, src_v, kv_budget)
    layers, merges = [], []
    for l, acts in heads_by_layer(
        model,
        calib_blocks,
        options.batch_size,
        max_tokens=options.calib_tokens,
        seed=options.seed,
        device=options.device,
    ):
        if options.grouping == "similar":
            key_groups = cluster(similarity(acts["keys"], options.metric), want_k[l])
            value_groups = cluster(similarity(acts["values"], options.metric), want_v[l])
        else:
            key_groups, value_groups = even_groups(src_k[l], want_k[l]), even_groups(src_v[l], want_v[l])
        layers.append(LayerPlan(key_groups, value_groups))
        merges += closed_form_merges(
            [layer_stats(model, l, acts, "plain")], layers[-1:]
        )  # per layer: nothing kept but the merge
    notes = {
        "grouping": options.grouping,
        "keys": "complex per-frequency-pair PCA (RoPE-commuting), folded into W_Q",
        "values": "PCA of the group's outputs, folded into W_O",
        **_options_notes(options, calib_blocks),
    }
    plan = _plan(model, layers, "svd", kv_budget, notes)
    return plan, aligned_merge(model, layers, merges, device=options.device)


# ---- prune -----------------------------------------------------------------------------------------


@torch.no_grad()
def attention_inputs(model: Transformer, calib_blocks: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, the normed input its attention receives: (n_blocks, T, D), on the model's device."""
    device = next(model.parameters()).device
    inputs: list[list[torch.Tensor]] = [[] for _ in model.layers]
    handles = [
        block.attn.register_forward_pre_hook(lambda attn, args, l=l: inputs[l].append(args[0].detach()))
        for l, block in enumerate(model.layers)
    ]
    try:
        for start in range(0, calib_blocks.shape[0], batch_size):
            model(calib_blocks[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in inputs]


@torch.no_grad()
def attention_output(
    model: Transformer, layer: int, x: torch.Tensor, key_index: list[int], value_index: list[int]
) -> torch.Tensor:
    """Layer `layer`'s attention output on its input x (B, T, D) when query h reads key head
    key_index[h] and value head value_index[h] of the layer's own (unchanged) projections: the
    layer's own attention module, read through those maps."""
    T = x.shape[1]
    positions = torch.arange(T, device=x.device)
    rope, mask = model.rope(positions, x.dtype), model.causal_mask(0, T, T, x.device)
    return model.layers[layer].attn(x, rope, mask, None, maps=(key_index, value_index))


def head_importance(
    model: Transformer, layer: int, x: torch.Tensor, y: torch.Tensor, kind: str, sim: torch.Tensor
) -> list[float]:
    """Per head of `kind` ("keys" | "values") of `layer`: ||y' - y||^2 / ||y||^2, y the layer's
    attention output on x (float64) and y' the same when the query heads that read the head read
    instead its most similar other head (by `sim`, (n, n)). inf for a layer-kind of one head."""
    cfg = model.config
    index = cfg.key_index[layer] if kind == "keys" else cfg.value_index[layer]
    norm = y.pow(2).sum()
    n = sim.shape[0]
    if n == 1:
        return [float("inf")]
    scores = []
    for j in range(n):
        others = sim[j].clone()
        others[j] = -float("inf")
        nearest = int(others.argmax())
        moved = [nearest if i == j else i for i in index]
        ki, vi = (moved, cfg.value_index[layer]) if kind == "keys" else (cfg.key_index[layer], moved)
        y2 = attention_output(model, layer, x, ki, vi).double()
        scores.append(float((y2 - y).pow(2).sum() / norm.clamp_min(1e-30)))
    return scores


def keep_most_important(
    scores: list[float], sim: torch.Tensor, want: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Keep the `want` highest-scoring heads (ties by head number); every other head joins the kept
    head it is most similar to. Returns the groups (one per kept head, in head order) and their
    merge weights (1 on the kept head, 0 on the dropped ones)."""
    n = len(scores)
    kept = sorted(sorted(range(n), key=lambda j: (-scores[j], j))[:want])
    groups = {k: [k] for k in kept}
    for j in range(n):
        if j not in groups:
            target = max(kept, key=lambda k: (float(sim[j, k]), -k))
            groups[target].append(j)
    group_list = [sorted(groups[k]) for k in kept]
    return group_list, [torch.tensor([1.0 if m == k else 0.0 for m in g]) for k, g in zip(kept, group_list)]


def convert_prune(
    model: Transformer, kv_budget: float, calib_blocks, options: ConvertOptions
) -> tuple[Plan, Transformer]:
    """Keep the most important key heads and value heads of each layer, drop the rest.

    Importance of a head, measured on calibration tokens, keys and values apart: the relative
    squared error of the layer's attention output, ||y' - y||^2 / ||y||^2, when the query heads
    that read it read instead its most similar other head (options.metric). That is what dropping
    it costs when it is dropped alone (one score per head; interactions between dropped heads are
    not modelled). Each layer keeps its `heads_for_budget` most important heads; the queries of a
    dropped head read the most similar kept head. In the plan, a kept head and the heads assigned
    to it form a group, merged with weight 1 on the kept head and 0 on the others.
    """
    _need_calibration("prune", calib_blocks)
    if options.device is not None and torch.device(options.device) != next(model.parameters()).device:
        raise UserError(
            "prune runs whole-model forward passes: it needs the model on its compute device (no --offload)"
        )
    cfg = model.config
    src_k, src_v = source_heads(model)
    want_k, want_v = heads_for_budget(src_k, src_v, kv_budget)
    blocks_ = calib_blocks[: max(1, math.ceil(options.calib_tokens / calib_blocks.shape[1]))]
    sims = head_similarities(model, blocks_, options)
    inputs = attention_inputs(model, blocks_, options.batch_size)

    layers, key_weights, value_weights, importance = [], [], [], []
    for l in range(cfg.num_layers):
        x = inputs[l]  # (n_blocks, T, D)
        y = attention_output(model, l, x, cfg.key_index[l], cfg.value_index[l]).double()
        chosen, layer_importance = {}, {}
        for kind, want in (("keys", want_k[l]), ("values", want_v[l])):
            scores = head_importance(model, l, x, y, kind, sims[l][kind])
            chosen[kind] = keep_most_important(scores, sims[l][kind], want)
            layer_importance[kind] = [s if math.isfinite(s) else None for s in scores]
        layers.append(LayerPlan(chosen["keys"][0], chosen["values"][0]))
        key_weights.append(chosen["keys"][1])
        value_weights.append(chosen["values"][1])
        importance.append(layer_importance)

    notes = {
        "importance": "relative attention-output error when the head alone is replaced by its most similar head",
        "merge": "weight 1 on the kept head of each group, 0 on the dropped heads assigned to it",
        "kept_heads": [
            {
                "keys": [g[int(w.argmax())] for g, w in zip(lp.key_groups, kw)],
                "values": [g[int(w.argmax())] for g, w in zip(lp.value_groups, vw)],
            }
            for lp, kw, vw in zip(layers, key_weights, value_weights)
        ],
        "importance_per_layer": importance,
        **_options_notes(options, blocks_),
    }
    plan = _plan(model, layers, "prune", kv_budget, notes)
    return plan, merge_groups(model, plan, key_weights, value_weights)
