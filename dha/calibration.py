"""Calibration statistics: one pass over calibration tokens gives what the aligned merge and the search need.

`calibrate` runs the model one decoder layer at a time (`dha.layerwise`) and keeps, per layer, the
key and value heads' outputs, optionally the LM loss's gradients at them (the search's loss
estimate), and `LayerStats`: the weighted second moments of the heads in the merge metric, from
which `dha.merge` builds the closed-form aligned merge of any group (and its residual) without
another pass. `layer_stats` is the same for one layer's heads collected elsewhere.

The merge metric (`MERGE_METRICS`): "weighted" (keys by the energy of the queries that read them,
values by W_O: the attention-logit and the output error) or "plain" (ordinary PCA); `dha.merge`'s
module doc defines both, and LayerStats holds the Grams already whitened by it. Keys are kept in
`key_layout` order: the pairs merged exactly first, then the `free_pairs` position-free ones
(`free_pairs_for`) with the pass-through dims.

Shape legend: N calibration tokens, H query heads, n source heads of one kind in a layer, hd head
dim, r rotary dims (r/2 frequency pairs), p = hd - r pass-through dims, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .layerwise import backward_heads, forward_heads
from .model import Transformer
from .options import FREE_ANGLE, FREE_CONTEXT

MERGE_METRICS = ("weighted", "plain")  # how the aligned merge measures its error (module doc)


def check_merge_metric(metric: str) -> None:
    """UserError unless `metric` is one of MERGE_METRICS."""
    if metric not in MERGE_METRICS:
        raise UserError(f"unknown merge metric {metric!r}; choose from {', '.join(MERGE_METRICS)}")


@dataclass
class LayerStats:
    """Second moments of one layer's heads on calibration tokens, in the merge metric (dha.merge).

    key_pair_gram: (r/2, n, n) complex128, sum_t (s z_t)(s z_t)^H per frequency pair;
    key_scale: (n, r/2) float64, the weights s of each source key head on each pair;
    key_pass_gram: (n*p, n*p) float64, Gram of the whitened pass-through dims; key_pass_metric (n, p, p);
    value_gram: (n*hd, n*hd) float64, Gram of the whitened value outputs [v_j L_j]; value_metric (n, hd, hd): L_j.
    The key statistics are in the order of key_layout (hd,) long. With position-free pairs, `exact`
    holds the statistics with every pair exact, for the groups they fit as well (the tie rule, dha.merge).
    With a qk-norm the keys are the normalised ones. A per-head norm adds key_rms (n,) float64, each
    key head's RMS before its norm; a norm over the layer's whole key projection adds
    key_pair_moments (r/2, 2n, 2n) float64, sum_t y_t y_t^T per pair with y = (the pair's first dims
    of the n heads, then their second dims): what the new divisor needs (the norm-aware merge, dha.merge).
    """

    key_pair_gram: torch.Tensor
    key_scale: torch.Tensor
    key_pass_gram: torch.Tensor
    key_pass_metric: torch.Tensor
    value_gram: torch.Tensor
    value_metric: torch.Tensor
    tokens: int
    key_layout: torch.Tensor
    exact: LayerStats | None = None
    key_rms: torch.Tensor | None = None
    key_pair_moments: torch.Tensor | None = None


def _readers(index: list[int], n: int) -> list[list[int]]:
    return [[h for h, j in enumerate(index) if j == m] for m in range(n)]


def _sqrt_psd(m: torch.Tensor, rel_floor: float = 1e-6) -> torch.Tensor:
    """Symmetric square root of a PSD matrix, eigenvalues floored at rel_floor * the largest (so it inverts)."""
    values, vectors = torch.linalg.eigh(m)
    values = values.clamp_min(max(float(values.max()), 1e-30) * rel_floor)
    return (vectors * values.sqrt()) @ vectors.T


def key_layout(head_dim: int, rotary_dim: int, free_pairs: int) -> torch.Tensor:
    """Head dims in the key merge's order: the rotary pairs merged exactly (rotate-half: pair i is
    dims i and i + r/2), then the `free_pairs` lowest-frequency pairs and the pass-through dims."""
    half = rotary_dim // 2
    kept = half - free_pairs  # free_pairs_for checks the count
    return torch.tensor([*range(kept), *range(half, half + kept), *range(kept, half), *range(half + kept, head_dim)])


def free_pairs_for(model: Transformer, requested: int | None, context: int | None = None) -> int:
    """The key merges' position-free pair count: `requested`, or for None the FREE_ANGLE rule on the
    model's RoPE frequencies over `context` tokens (None: the model's positions, at least
    FREE_CONTEXT; 0 pairs without RoPE)."""
    pairs = model.config.rotary_dim // 2 if model.config.position == "rope" else 0
    context = context or max(FREE_CONTEXT, model.config.max_position_embeddings)
    if model.config.qk_norm is not None:
        if requested:
            raise UserError(
                "position-free pairs merge keys through full maps that mix pairs, and a key norm does not commute "
                "with them: a qk-norm model merges every pair exactly (--free-pairs 0)"
            )
        return 0
    if requested is None:
        return int((model.inv_freq.double() * context <= FREE_ANGLE).sum()) if pairs else 0
    if not 0 <= requested <= pairs:
        raise UserError(f"position-free pairs must be between 0 and {pairs} (the head's rotary pairs), got {requested}")
    return requested


def complex_pairs(x: torch.Tensor, r: int) -> torch.Tensor:
    """(..., hd) real -> (..., r/2) complex: pair i is (x_i, x_{i + r/2}) (the rotate-half layout)."""
    return torch.complex(x[..., : r // 2], x[..., r // 2 : r])


def layer_stats(
    model: Transformer, layer: int, acts: dict, metric: str = "weighted", free_pairs: int = 0
) -> LayerStats:
    """LayerStats of `layer` from its calibration heads `acts` (one entry of dha.analyze.collect_heads),
    the keys in `key_layout` order with `free_pairs` position-free pairs (and, when there are any,
    the exact-pair statistics beside them)."""
    check_merge_metric(metric)
    cfg, hd = model.config, model.config.head_dim
    rotary = cfg.rotary_dim if cfg.position == "rope" else 0
    layout = key_layout(hd, rotary, free_pairs)
    r = rotary - 2 * free_pairs  # the dims merged pair by pair
    p = hd - r
    q, k, v = acts["queries"].double(), acts["keys"].double(), acts["values"].double()  # (N, H|n, hd)
    q, k = q[..., layout.to(q.device)], k[..., layout.to(k.device)]
    N, nk, nv = k.shape[0], k.shape[1], v.shape[1]
    f64 = dict(dtype=torch.float64, device=k.device)  # the statistics live where the heads were collected
    key_readers, value_readers = _readers(cfg.key_index[layer], nk), _readers(cfg.value_index[layer], nv)

    # keys: per-pair weights from the energy of the queries that read each key head
    q_energy = q.pow(2).mean(0)  # (H, hd)
    pair_energy = q_energy[:, : r // 2] + q_energy[:, r // 2 : r]  # (H, r/2): E|q_pair|^2
    if metric == "weighted":
        scale = torch.stack([pair_energy[rd].sum(0) for rd in key_readers]).sqrt()  # (n, r/2)
        scale = scale.clamp_min(float(scale.max()) * 1e-6 if scale.numel() else 1e-30)
        q_pass = q[..., r:]  # (N, H, p)
        pass_metric = (
            torch.stack(
                [_sqrt_psd(torch.einsum("thd,the->de", q_pass[:, rd], q_pass[:, rd]) / N) for rd in key_readers]
            )
            if p
            else torch.zeros(nk, 0, 0, **f64)
        )
    else:
        scale = torch.ones(nk, r // 2, **f64)
        pass_metric = torch.eye(p, **f64).expand(nk, p, p).clone()
    z = complex_pairs(k, r) * scale  # (N, n, r/2): whitened complex keys
    pair_gram = torch.einsum("tai,tbi->iab", z, z.conj())  # (r/2, n, n)
    kp = torch.einsum("tnd,nde->tne", k[..., r:], pass_metric).reshape(N, nk * p)  # (N, n*p)

    # values: L_j^2 = sum over the readers of W_O[h] W_O[h]^T (output error), or I
    if metric == "weighted":
        o = model.layers[layer].attn.o_proj.weight.detach().to(**f64)  # (D, H*hd)
        o_heads = o.T.reshape(cfg.num_heads, hd, -1)  # (H, hd, D): W_O[h]
        value_metric = torch.stack([_sqrt_psd(sum(o_heads[h] @ o_heads[h].T for h in rd)) for rd in value_readers])
    else:
        value_metric = torch.eye(hd, **f64).expand(nv, hd, hd).clone()
    y = torch.einsum("tnd,nde->tne", v, value_metric).reshape(N, nv * hd)  # (N, n*hd)
    exact = layer_stats(model, layer, acts, metric) if free_pairs else None
    rms = acts.get("key_rms")
    moments = None
    if cfg.qk_norm == "full":  # every dim rotary (free_pairs_for: no position-free pairs under a qk-norm)
        pairs = torch.cat([k[..., : r // 2], k[..., r // 2 : r]], 1)  # (N, 2n, r/2)
        moments = torch.einsum("tai,tbi->iab", pairs, pairs)
    return LayerStats(pair_gram, scale, kp.T @ kp, pass_metric, y.T @ y, value_metric, N, layout, exact, rms, moments)


@dataclass
class Calibration:
    """One pass over calibration tokens, layer by layer: per layer the merge statistics, the key and
    value heads' outputs (pre-RoPE) and, optionally, the gradients of the summed LM loss with
    respect to them (what the search's loss estimate needs; the query outputs go into the
    statistics and are not kept)."""

    acts: list[dict]  # per layer {"keys": (N, Hk, hd), "values": (N, Hv, hd)} float32
    grads: list[dict] | None  # per layer {"keys": (N, Hk, hd), "values": (N, Hv, hd)}, or None
    stats: list[LayerStats]
    metric: str
    free_pairs: int  # the key merges' position-free pairs


def calibrate(
    model: Transformer,
    blocks: torch.Tensor,
    batch_size: int = 4,
    metric: str = "weighted",
    gradients: bool = False,
    device=None,
    free_pairs: int | None = 0,
) -> Calibration:
    """The Calibration of `model` on (n_blocks, T) token ids, one decoder layer at a time on `device`
    (`dha.layerwise`; default the model's own device): a forward sweep, plus with gradients a
    backward sweep from the last layer. The model is neither copied nor changed. `free_pairs`:
    the key merges' position-free pairs (module doc; None: the FREE_ANGLE rule)."""
    check_merge_metric(metric)
    L, free_pairs = model.config.num_layers, free_pairs_for(model, free_pairs)
    acts, grads, stats = [None] * L, [None] * L if gradients else None, [None] * L
    sweep = (
        backward_heads(model, blocks, batch_size, device)
        if gradients
        else ((l, heads, None) for l, heads in forward_heads(model, blocks, batch_size, device))
    )
    for l, heads, layer_grads in sweep:
        stats[l] = layer_stats(model, l, heads, metric, free_pairs)
        acts[l] = {"keys": heads["keys"], "values": heads["values"]}
        if gradients:
            grads[l] = layer_grads
    return Calibration(acts, grads, stats, metric, free_pairs)
