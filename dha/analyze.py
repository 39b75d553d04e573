"""Head similarity on calibration tokens: which key heads and which value heads are redundant.

DHA (Chen et al. 2024, section 2 and figure 2) observes on real checkpoints that heads form
clusters of similar heads, that key heads and value heads cluster differently (decoupled), and
that redundancy varies by layer. This module measures that on any model:

- `collect_heads`: per layer, the query, key and value head outputs before RoPE on calibration
  tokens, computed exactly by the layer's own projections on its normed input;
- `cosine_similarity`, `linear_cka`: (n, n) similarity between the heads of one kind;
- `cluster`: agglomerative clustering of heads into a given number of groups;
- `analyze` / `write_report`: all of that for every layer, as analysis.json and PNG charts (the
  `dha analyze` verb).

For a GQA source (SmolLM2 has 3 KV heads) the key and value matrices are over the source's own
KV heads: those are the heads the KV cache stores and a plan groups.

Shape legend: N calibration tokens, n heads of one kind, hd head dim, L layers.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch

from .layerwise import forward_heads
from .model import Transformer
from .plots import pyplot, save

METRICS = ("cosine", "cka")


# ---- collection ----------------------------------------------------------------------------------


def heads_by_layer(
    model: Transformer,
    blocks: torch.Tensor,
    batch_size: int = 4,
    max_tokens: int | None = None,
    seed: int = 0,
    device=None,
) -> Iterator[tuple[int, dict]]:
    """For each layer in order, (l, {"queries": (N, H, hd), "keys": (N, Hk, hd), "values": (N, Hv, hd)}),
    float32, pre-RoPE: one layer's heads at a time, so a caller that keeps only what it derives
    from them never holds every layer's.

    blocks: (n_blocks, T) token ids, run `batch_size` blocks at a time, one layer at a time
    (`dha.layerwise.forward_heads`: each layer's own projections on the hidden states the model's
    previous layers give, in float32, on `device`: default the model's own). With
    max_tokens, a fixed random subset of that many token positions (the same for every layer,
    drawn with `seed`) is kept, so memory stays bounded on long calibration sets.
    """
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise ValueError(f"blocks must be a non-empty (n_blocks, T) tensor, got shape {tuple(blocks.shape)}")
    keep = None
    if max_tokens is not None and max_tokens < blocks.numel():
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(blocks.numel(), generator=g)[:max_tokens].sort().values  # flat token positions
    for l, heads in forward_heads(model, blocks, batch_size, device):
        yield l, {name: t[keep] if keep is not None and name != "key_rms" else t for name, t in heads.items()}


def collect_heads(
    model: Transformer,
    blocks: torch.Tensor,
    batch_size: int = 4,
    max_tokens: int | None = None,
    seed: int = 0,
    device=None,
) -> list[dict]:
    """Every layer's heads at once: [heads of layer l] as `heads_by_layer` gives them."""
    return [heads for _, heads in heads_by_layer(model, blocks, batch_size, max_tokens, seed, device)]


# ---- similarity ----------------------------------------------------------------------------------


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """x (N, n, hd) -> (n, n): cosine between heads' outputs, each flattened over tokens and dims."""
    flat = x.double().permute(1, 0, 2).reshape(x.shape[1], -1)  # (n, N*hd)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sim = flat @ flat.T
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    return sim.float()


def linear_cka(x: torch.Tensor) -> torch.Tensor:
    """x (N, n, hd) -> (n, n): linear CKA between heads (Kornblith et al. 2019, eq. 5).

    With each head's outputs X_i (N, hd) centred over tokens:
        CKA(X_i, X_j) = ||X_i^T X_j||_F^2 / (||X_i^T X_i||_F ||X_j^T X_j||_F)
    It is invariant to orthogonal maps and isotropic scaling of a head, so it says whether two
    heads carry the same information even in different coordinates.
    """
    N, n, hd = x.shape
    xc = x.double() - x.double().mean(0, keepdim=True)
    cov = xc.reshape(N, n * hd).T @ xc.reshape(N, n * hd)  # (n*hd, n*hd): all X_i^T X_j blocks
    cross = cov.reshape(n, hd, n, hd).pow(2).sum(dim=(1, 3))  # (n, n): ||X_i^T X_j||_F^2
    norms = cross.diagonal().sqrt()  # ||X_i^T X_i||_F
    sim = cross / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    return sim.float()


def similarity(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return cosine_similarity(x)
    if metric == "cka":
        return linear_cka(x)
    raise ValueError(f"unknown similarity metric {metric!r}; choose from {', '.join(METRICS)}")


# ---- clustering ----------------------------------------------------------------------------------


def cluster(similarity: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Partition n heads into num_groups groups of similar heads.

    Agglomerative clustering (scipy, average linkage) on the distance 1 - similarity, cut where
    exactly num_groups clusters remain. Members are sorted and groups are sorted by their first
    member, so the result is deterministic for a given matrix.
    """
    import numpy as np
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import squareform

    n = similarity.shape[0]
    if not 1 <= num_groups <= n:
        raise ValueError(f"cannot split {n} heads into {num_groups} groups")
    if num_groups == n:
        return [[h] for h in range(n)]
    if num_groups == 1:
        return [list(range(n))]
    dist = 1.0 - similarity.double().cpu().numpy()
    dist = np.clip((dist + dist.T) / 2, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    labels = cut_tree(tree, n_clusters=num_groups)[:, 0]
    groups: dict[int, list[int]] = {}
    for head, label in enumerate(labels):
        groups.setdefault(int(label), []).append(head)
    return sorted(groups.values(), key=lambda g: g[0])


def within_group_min(similarity: torch.Tensor, groups: list[list[int]]) -> float:
    """The lowest similarity between two heads that share a group (1.0 when every group is a singleton)."""
    worst = 1.0
    for g in groups:
        if len(g) > 1:
            worst = min(worst, float(similarity[g][:, g].min()))
    return worst


def mean_off_diagonal(similarity: torch.Tensor) -> float:
    n = similarity.shape[0]
    if n < 2:
        return 1.0
    return float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


# ---- the analysis of a whole model -------------------------------------------------------------


def groups_needed(
    similarity: torch.Tensor, threshold: float, clusterings: dict[int, list[list[int]]] | None = None
) -> int:
    """The fewest groups whose clustering (`cluster`, or the given {count: groups}) keeps every
    within-group pair at similarity >= threshold. A redundancy measure: fewer = more redundant."""
    n = similarity.shape[0]
    for count in range(1, n + 1):
        groups = clusterings[count] if clusterings is not None else cluster(similarity, count)
        if within_group_min(similarity, groups) >= threshold:
            return count
    return n


def _matrix(t: torch.Tensor) -> list[list[float]]:
    return [[round(v, 6) for v in row] for row in t.tolist()]  # one copy to the host, not one per entry


def analyze(
    model: Transformer,
    blocks: torch.Tensor,
    metric: str = "cka",
    threshold: float = 0.5,
    batch_size: int = 4,
    max_tokens: int | None = None,
    seed: int = 0,
    device=None,
) -> dict:
    """Similarity of key heads and of value heads in every layer, their clusterings, redundancy.

    Returns a JSON-ready dict: per layer and kind ("keys", "values") both similarity matrices,
    the mean off-diagonal similarity under both metrics, the clustering (in `metric`) for every
    group count 1..n with its lowest within-group similarity, and `groups_needed`: the fewest
    groups keeping every within-group pair at or above `threshold`. The heads are collected one
    layer at a time on `device` (default: the model's own; `dha analyze --offload`: the GPU, the
    model in CPU memory).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}; choose from {', '.join(METRICS)}")
    collected = collect_heads(model, blocks, batch_size, max_tokens=max_tokens, seed=seed, device=device)
    layers = []
    for l, acts in enumerate(collected):
        entry = {"layer": l}
        for kind in ("keys", "values"):
            sims = {m: similarity(acts[kind], m) for m in METRICS}
            chosen = sims[metric]
            n = chosen.shape[0]
            clusterings = {count: cluster(chosen, count) for count in range(1, n + 1)}
            entry[kind] = {
                "heads": n,
                **{m: _matrix(s) for m, s in sims.items()},
                "mean_similarity": {m: round(mean_off_diagonal(s), 6) for m, s in sims.items()},
                "clusters": {str(c): g for c, g in clusterings.items()},
                "min_within_group": {str(c): round(within_group_min(chosen, g), 6) for c, g in clusterings.items()},
                "groups_needed": groups_needed(chosen, threshold, clusterings),
            }
        layers.append(entry)
    return {
        "format": "dha-analysis/1",
        "metric": metric,
        "threshold": threshold,
        "calibration_tokens": int(collected[0]["keys"].shape[0]),
        "layers": layers,
    }


def write_report(result: dict, directory: str) -> list[str]:
    """Write analysis.json, heatmaps/layer_XX.png (cosine and CKA; K and V side by side) and
    redundancy.png into `directory` (an existing, typically temporary, directory). Returns the files."""
    plt = pyplot()
    files = ["analysis.json"]
    with open(os.path.join(directory, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")

    os.makedirs(os.path.join(directory, "heatmaps"), exist_ok=True)
    for entry in result["layers"]:
        l = entry["layer"]
        fig, axes = plt.subplots(2, 2, figsize=(8, 7.5), squeeze=False)
        for row, metric in enumerate(METRICS):
            for col, kind in enumerate(("keys", "values")):
                ax = axes[row][col]
                mat = entry[kind][metric]
                vmin = 0.0 if metric == "cka" else -1.0
                im = ax.imshow(mat, vmin=vmin, vmax=1.0, cmap="viridis")
                n = len(mat)
                ax.set_title(f"{kind[:-1]} heads, {metric}")
                ax.set_xticks(range(n))
                ax.set_yticks(range(n))
                if n <= 12:
                    for i in range(n):
                        for j in range(n):
                            ax.text(
                                j,
                                i,
                                f"{mat[i][j]:.2f}",
                                ha="center",
                                va="center",
                                fontsize=7,
                                color="black" if mat[i][j] > (vmin + 1) / 2 else "white",
                            )
                fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"layer {l}: head similarity on {result['calibration_tokens']} calibration tokens")
        fig.tight_layout()
        name = os.path.join("heatmaps", f"layer_{l:02d}.png")
        save(fig, os.path.join(directory, name), dpi=80)
        files.append(name)

    metric, layers = result["metric"], [e["layer"] for e in result["layers"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for kind, marker in (("keys", "o"), ("values", "s")):
        top.plot(layers, [e[kind]["mean_similarity"][metric] for e in result["layers"]], marker=marker, label=kind)
        bottom.plot(layers, [e[kind]["groups_needed"] for e in result["layers"]], marker=marker, label=kind)
    heads_max = max(max(e["keys"]["heads"], e["values"]["heads"]) for e in result["layers"])
    top.set_ylabel(f"mean off-diagonal {metric}")
    top.set_title("redundancy per layer (higher similarity / fewer groups = more redundant)")
    top.legend()
    bottom.set_ylabel(f"groups for {metric} >= {result['threshold']}")
    bottom.set_ylim(0, heads_max + 0.5)
    bottom.set_xlabel("layer")
    bottom.legend()
    fig.tight_layout()
    save(fig, os.path.join(directory, "redundancy.png"), dpi=80)
    files.append("redundancy.png")
    return files


def summary_table(result: dict) -> str:
    metric = result["metric"]
    lines = [
        f"{'layer':>5} {'Hk':>3} {'Hv':>3}  {'K mean ' + metric:>12} {'V mean ' + metric:>12}  "
        f"{'K groups':>8} {'V groups':>8}   (groups keep within-group {metric} >= {result['threshold']})"
    ]
    for e in result["layers"]:
        k, v = e["keys"], e["values"]
        lines.append(
            f"{e['layer']:>5} {k['heads']:>3} {v['heads']:>3}  {k['mean_similarity'][metric]:>12.3f} "
            f"{v['mean_similarity'][metric]:>12.3f}  {k['groups_needed']:>8} {v['groups_needed']:>8}"
        )
    return "\n".join(lines)
