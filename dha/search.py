"""Search: which heads to group and how many key and value heads each layer keeps -> a Plan.

DHA (Chen et al. 2024, section 3.1 "Search") finds, before fusion, the groups of similar heads and
a per-layer allocation of key and value heads under a global KV-head budget. Like llm-awq's
`run_awq`, `search` returns plain data (a `dha.plan.Plan`); applying it (the aligned merge, or
fusion toward it in `dha.fuse`) is separate.

Everything comes from one pass over the calibration tokens (`dha.calibration.calibrate`): the heads'
outputs, their second moments in the merge metric and, for the sensitivity weighting, the LM
loss's gradients at the heads' outputs (one backward pass; the model is never copied).

1. Grouping (`agglomerate`). Per layer, keys and values apart: agglomerative clustering on the
   closed-form merge itself. Starting from single heads, the two groups whose union leaves the
   least extra residual (`dha.merge.group_residual`: the error of the aligned merge, in the
   metric) are merged, down to one group: a nested grouping for every count n. Heads that are
   rotations of each other merge at no cost, which raw-output similarity would not see.

2. Cost of each (layer, kind, count):
   - relative residual: sum of the groups' residuals / the layer-kind's energy (0 = lossless,
     1 = as bad as dropping the heads). Comparable across layers only in the metric's own units;
   - sensitivity=True (default): the second-order estimate of the LM-loss increase of that merge,
     1/2 sum_t (g_t . delta_t)^2 over calibration tokens (`fisher_cost`), g the loss
     gradient at the heads' outputs and delta the merge's error on them: costs in nats, the same
     unit for keys, values and every layer.

3. Allocation: per-layer counts nK(l), nV(l) in [1, source heads] with
   sum_l (nK(l) + nV(l)) == `total_heads_for_budget` EXACTLY.
   - search="cost": minimise the summed costs by exact dynamic programming (`allocate`).
   - search="learned" (paper-faithful; see `learned_counts`): relaxed head counts trained with the
     LM loss, the relative residuals as fusion loss and an augmented-Lagrangian budget constraint.
   The plan then takes, for each layer and kind, the grouping at the chosen count.
   Two ablations of the cost search switch DHA's ideas off (`allocate_with`): allocation="uniform"
   (the same counts in every layer) and decoupled=False (keys and values share groups and counts).

Shape legend: N calibration tokens (n_blocks * T), H query heads, n source heads of one kind in a
layer, hd head dim, L layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .budget import source_heads, total_heads_for_budget
from .calibration import Calibration, calibrate, check_merge_metric, free_pairs_for
from .errors import UserError
from .merge import (
    energy,
    group_merge,
    group_residual,
    reconstructed_key_rows,
    reconstructed_outputs,
    reconstructed_value_rows,
)
from .model import Transformer
from .options import TrainConfig
from .plan import LayerPlan, Plan
from .train import Hooks, ramp, train
from .transforms import heads, unheads

SEARCHES = ("cost", "learned")
ALLOCATIONS = ("adaptive", "uniform")
LAYOUTS = ("free", "serving")
KINDS = ("key", "value")
PROTECTED = 1e30  # added to the residual of a group that merges a protected head (SearchOptions.protect)

# Hard-concrete distribution (Louizos et al. 2018, "Learning sparse neural networks through L0
# regularization", section 4), with the constants LLM-Shearing uses (Xia et al. 2024).
HC_TEMPERATURE, HC_LOW, HC_HIGH = 2.0 / 3.0, -0.1, 1.1


@dataclass
class SearchOptions:
    search: str = "cost"  # "cost": exact DP on the cost table | "learned": relaxed counts, trained
    metric: str = "weighted"  # merge metric: "weighted" (query energy for keys, W_O for values) | "plain" (PCA)
    # key merge: the lowest-frequency RoPE pairs merged as one position-free block (dha.merge);
    # None: the pairs that turn by at most options.FREE_ANGLE over `free_context` tokens
    free_pairs: int | None = None
    # the context of that rule (`dha convert --context`); None: the model's positions, at least options.FREE_CONTEXT
    free_context: int | None = None
    # (layer, "key" | "value", head) kept out of every merge: each stays a head of its own (e.g.
    # the retrieval heads of dha.longctx.retrieval_key_heads, `dha convert --retrieval-heads`)
    protect: list = field(default_factory=list)
    sensitivity: bool = True  # cost search: costs as estimated LM-loss increases (one backward pass)
    # Ablations of DHA's two ideas (cost search only; docs/method.md, "Ablations"):
    allocation: str = (
        "adaptive"  # "adaptive": counts per layer by the DP | "uniform": the same K count and V count in every layer
    )
    decoupled: bool = True  # False: keys and values of a layer share one grouping and one count (GQA-like)
    # "free": any groups and counts (DHA) | "serving": per layer one grouping for keys and values,
    # groups of equal size, so llama.cpp (deci), vLLM and SGLang (Nemotron-NAS) hold it exactly
    layout: str = "free"
    seed: int = 0  # hard-concrete noise of the learned search: same seed -> same plan
    batch_size: int = 4  # calibration blocks per forward pass
    # learned search (LLM-Shearing recipe: hard-concrete gates + augmented Lagrangian)
    steps: int = 240  # optimisation steps (the DHA paper reports 240 for LLaMA2-7B at 25%)
    warmup: float = 0.5  # fraction of the steps over which the target falls from 1 to the budget
    gate_lr: float = 0.1  # AdamW learning rate of the gate logits (constant)
    multiplier_lr: float = 0.1  # AdamW learning rate of lambda1, lambda2 (a negative-lr group: gradient ascent)
    fusion_weight: float = 1.0  # a in L = L_LM + a * L_fusion + ...
    gate_init: float = 3.0  # initial gate logit: every gate open (the search starts at the source model)
    progress: bool = True  # tqdm bar on stderr (learned search)

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise UserError(f"unknown search {self.search!r}; choose from {', '.join(SEARCHES)}")
        check_merge_metric(self.metric)
        if self.free_pairs is not None and self.free_pairs < 0:
            raise UserError(f"--free-pairs must be >= 0, got {self.free_pairs}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        if self.layout not in LAYOUTS:
            raise UserError(f"unknown layout {self.layout!r}; choose from {', '.join(LAYOUTS)}")
        if self.layout == "serving" and (self.search != "cost" or self.allocation != "adaptive" or not self.decoupled):
            raise UserError(
                "--layout serving is a constraint of the cost search "
                "(no --search learned, --allocation uniform, --coupled-kv)"
            )
        if self.search == "learned" and (self.allocation != "adaptive" or not self.decoupled):
            raise UserError(
                "uniform allocation and coupled keys/values are ablations of the cost search (use --search cost)"
            )
        if self.batch_size < 1 or self.steps < 1:
            raise UserError("batch_size and steps must be positive")
        if not 0.0 <= self.warmup <= 1.0:
            raise UserError(f"warmup is a fraction of the steps in [0, 1], got {self.warmup}")
        if self.gate_lr <= 0 or self.multiplier_lr <= 0 or self.fusion_weight < 0:
            raise UserError("learning rates must be > 0 and the fusion weight >= 0")

    @property
    def needs_gradients(self) -> bool:
        """Whether the search's calibration pass needs the LM loss's gradients: the cost search's
        sensitivity weighting does (the learned search uses the LM loss itself)."""
        return self.sensitivity and self.search == "cost"


@dataclass
class HeadTable:
    """The key (or value) heads of one layer: a grouping and its costs for every count."""

    layer: int
    kind: str  # "key" | "value"
    groupings: list[list[list[int]]]  # groupings[n - 1]: the heads in n groups
    costs: list[float]  # costs[n - 1]: relative residual of groupings[n - 1] (0 at n = source heads)
    fisher: list[float] | None = (
        None  # fisher[n - 1]: estimated LM-loss increase (nats, summed over calibration tokens)
    )


# ---- grouping and costs --------------------------------------------------------------------------


def agglomerate(residual, n: int) -> list[list[list[int]]]:
    """Nested groupings of n heads for every count: groupings[c - 1] has c groups.

    residual(members) -> float is the error a merged group leaves. Greedy: merge the two groups whose
    union adds the least residual (ties: the lowest head numbers). Groups are sorted lists, in order
    of their first member."""
    cache: dict[tuple, float] = {}

    def res(members: tuple) -> float:
        if members not in cache:
            cache[members] = 0.0 if len(members) == 1 else residual(list(members))
        return cache[members]

    clusters = [(j,) for j in range(n)]
    out = {n: [list(c) for c in clusters]}
    while len(clusters) > 1:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                union = tuple(sorted(clusters[a] + clusters[b]))
                extra = res(union) - res(clusters[a]) - res(clusters[b])
                if best is None or extra < best[0] - 1e-12 * max(1.0, abs(best[0])):
                    best = (extra, a, b, union)
        _, a, b, union = best
        clusters = sorted([c for i, c in enumerate(clusters) if i not in (a, b)] + [union])
        out[len(clusters)] = [list(c) for c in clusters]
    return [out[c] for c in range(1, n + 1)]


class GroupCache:
    """One layer's group residuals and reconstructed outputs, each computed once: the nested
    groupings of every count share most of their groups (2n - 1 distinct ones of n heads)."""

    def __init__(self, stats):
        self.stats = stats
        self.residuals: dict[tuple, float] = {}
        self.reconstructions: dict[tuple, torch.Tensor] = {}

    def residual(self, kind: str, members: list[int]) -> float:
        key = (kind, tuple(members))
        if key not in self.residuals:
            self.residuals[key] = group_residual(self.stats, kind, members)
        return self.residuals[key]

    def reconstruction(self, kind: str, members: list[int], outputs: torch.Tensor) -> torch.Tensor:
        """The members' outputs (N, g, hd) as their group's aligned merge gives them back (float64)."""
        key = (kind, tuple(members))
        if key not in self.reconstructions:
            merge = group_merge(self.stats, kind, members)
            self.reconstructions[key] = reconstructed_outputs(
                outputs[:, members].double(), kind, [list(range(len(members)))], [merge]
            )
        return self.reconstructions[key]


def relative_cost(cache: GroupCache, kind: str, groups: list[list[int]]) -> float:
    total = energy(cache.stats, kind)
    return sum(cache.residual(kind, g) for g in groups) / total if total > 0 else 0.0


def fisher_cost(outputs: torch.Tensor, grads: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Second-order estimate of the summed LM-loss increase when `outputs` (N, n, hd) become
    `reconstruction`: 1/2 sum_t (g_t . delta_t)^2, the empirical Fisher taken per token
    (as in Fisher-weighted low-rank compression), g the loss gradient at the outputs."""
    dot = ((outputs.double() - reconstruction.double()) * grads.double()).sum((1, 2))  # (N,)
    return 0.5 * float(dot.pow(2).sum())


def table_fisher(calibration: Calibration, layer: int, kind: str, groupings, cache: GroupCache) -> list[float]:
    """Estimated LM-loss increase (`fisher_cost`) of each grouping's aligned merge."""
    name = kind + "s"
    outputs, grads = calibration.acts[layer][name], calibration.grads[layer][name]
    out = []
    for groups in groupings:
        rec = torch.empty(outputs.shape, dtype=torch.float64)
        for g in groups:
            rec[:, g] = cache.reconstruction(kind, g, outputs)
        out.append(fisher_cost(outputs, grads, rec))
    return out


def head_tables(model: Transformer, calibration: Calibration, sensitivity: bool, protect=()) -> list[HeadTable]:
    """For every layer, key then value: nested groupings for every count and their costs. A
    protected head (`SearchOptions.protect`) joins a group only after every other merge."""
    tables = []
    for l, stats in enumerate(calibration.stats):
        cache = GroupCache(stats)
        for kind in KINDS:
            n = model.config.key_heads(l) if kind == "key" else model.config.value_heads(l)
            mine = {h for pl, pk, h in protect if (pl, pk) == (l, kind)}
            groupings = agglomerate(
                lambda g, k=kind, p=mine: cache.residual(k, g) + (PROTECTED if len(g) > 1 and p & set(g) else 0), n
            )
            fisher = table_fisher(calibration, l, kind, groupings, cache) if sensitivity else None
            tables.append(HeadTable(l, kind, groupings, [relative_cost(cache, kind, g) for g in groupings], fisher))
    return tables


def forbid_protected_merges(tables: list[HeadTable], protect) -> None:
    """Counts whose grouping merges a protected head with another get an infinite cost (the DP never picks them)."""
    for t in tables:
        mine = {h for pl, pk, h in protect if (pl, pk) == (t.layer, t.kind)}
        for i, groups in enumerate(t.groupings):
            if any(len(g) > 1 and mine & set(g) for g in groups):
                t.costs[i] = math.inf
                if t.fisher is not None:
                    t.fisher[i] = math.inf


def coupled_tables(model: Transformer, calibration: Calibration, sensitivity: bool) -> list[HeadTable]:
    """The coupled-K/V ablation: each layer's keys and values share one grouping per count (like
    GQA, unlike DHA), clustered on the sum of the two relative residuals; each kind keeps its own
    cost of that shared grouping. Needs a source whose layers read key head i and value head i
    together (key_index == value_index: every MHA and GQA checkpoint)."""
    cfg = model.config
    out = []
    for l, stats in enumerate(calibration.stats):
        if cfg.key_index[l] != cfg.value_index[l]:
            raise UserError(f"layer {l} already has decoupled key and value heads: keys and values cannot share groups")
        cache = GroupCache(stats)
        ek, ev = max(energy(stats, "key"), 1e-30), max(energy(stats, "value"), 1e-30)
        groupings = agglomerate(
            lambda g: cache.residual("key", g) / ek + cache.residual("value", g) / ev, cfg.key_heads(l)
        )
        for kind in KINDS:
            fisher = table_fisher(calibration, l, kind, groupings, cache) if sensitivity else None
            out.append(HeadTable(l, kind, groupings, [relative_cost(cache, kind, g) for g in groupings], fisher))
    return out


def equal_groups(residual, n: int, count: int) -> list[list[int]]:
    """`count` groups of n / count heads each, grown greedily: the lowest unassigned head seeds a
    group, which takes, one at a time, the head adding the least residual(members)."""
    size, left, groups = n // count, list(range(n)), []
    while left:
        group = [left.pop(0)]
        while len(group) < size:
            best = min(left, key=lambda j: (residual(sorted(group + [j])), j))
            group.append(best)
            left.remove(best)
        groups.append(sorted(group))
    return groups


def serving_tables(model: Transformer, calibration: Calibration, sensitivity: bool) -> list[HeadTable]:
    """The serving layout: per layer one grouping for keys and values, in equal groups. Counts that
    do not divide the layer's heads get an infinite cost, so the DP never picks them."""
    cfg = model.config
    out = []
    for l, stats in enumerate(calibration.stats):
        n = cfg.key_heads(l)
        if cfg.key_index[l] != cfg.value_index[l] or len({cfg.key_index[l].count(j) for j in range(n)}) != 1:
            raise UserError(
                f"--layout serving needs a source whose layer {l} reads key head i and value head i together, "
                "each by the same number of query heads (MHA or GQA)"
            )
        cache = GroupCache(stats)
        ek, ev = max(energy(stats, "key"), 1e-30), max(energy(stats, "value"), 1e-30)
        both = lambda g: cache.residual("key", g) / ek + cache.residual("value", g) / ev  # noqa: E731
        groupings = [equal_groups(both, n, c) if n % c == 0 else [list(range(n))] for c in range(1, n + 1)]
        for kind in KINDS:
            costs = [relative_cost(cache, kind, g) for g in groupings]
            fisher = table_fisher(calibration, l, kind, groupings, cache) if sensitivity else None
            allowed = [n % c == 0 for c in range(1, n + 1)]
            costs = [c if ok else math.inf for c, ok in zip(costs, allowed)]
            fisher = [f if ok else math.inf for f, ok in zip(fisher, allowed)] if fisher else None
            out.append(HeadTable(l, kind, groupings, costs, fisher))
    return out


def allocate_serving(costs: list[list[float]], total: int) -> list[int]:
    """Per layer one count for keys and values, the most heads within `total` that the allowed
    counts reach, least summed cost among those (the DP of `allocate` on per-layer K+V costs)."""
    pairs = [[ck + cv for ck, cv in zip(costs[i], costs[i + 1])] for i in range(0, len(costs), 2)]
    for heads_per_kind in range(total // 2, len(pairs) - 1, -1):
        try:
            counts = allocate(pairs, heads_per_kind)
        except UserError:
            continue
        # an unreachable total leaves the DP's backtrack on empty cells (count 0) or forbidden counts (inf)
        if all(c >= 1 for c in counts) and math.isfinite(sum(p[c - 1] for p, c in zip(pairs, counts))):
            return [c for c in counts for _ in range(2)]
    raise UserError(f"no serving layout keeps at most {total} heads")


# ---- allocation ----------------------------------------------------------------------------------


def allocate(costs: list[list[float]], total: int) -> list[int]:
    """Counts n_i in 1..len(costs[i]) with sum_i n_i == total minimising sum_i costs[i][n_i - 1].

    Exact dynamic programming over the items (a multiple-choice knapsack with an equality):
    best[i][b] = least cost of items 0..i-1 keeping b heads. O(items * total * max heads).
    Ties keep the smaller count of each item, from the last item back (deterministic).
    """
    sizes = [len(c) for c in costs]
    if not len(sizes) <= total <= sum(sizes):
        raise UserError(
            f"cannot keep exactly {total} heads with {len(sizes)} layer/kinds of 1..{max(sizes)} heads each"
        )
    best = np.full((len(costs) + 1, total + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((len(costs), total + 1), dtype=np.int64)
    for i, row in enumerate(costs):
        for n in range(1, min(sizes[i], total) + 1):  # ascending n with a strict < : ties keep the smaller n
            candidate = np.full(total + 1, np.inf)
            candidate[n:] = best[i, : total + 1 - n] + row[n - 1]
            better = candidate < best[i + 1]
            best[i + 1, better], choice[i, better] = candidate[better], n
    counts, b = [], total
    for i in reversed(range(len(costs))):
        counts.append(int(choice[i, b]))
        b -= counts[-1]
    return counts[::-1]


def allocate_with(costs: list[list[float]], total: int, options: SearchOptions) -> list[int]:
    """Counts per table (key, value, key, value, ...) under the ablation settings of `options`.

    adaptive + decoupled (DHA): `allocate`, exactly `total` heads.
    coupled: a layer's K and V counts are equal; the DP runs on per-layer summed costs with
      total // 2 heads per kind (an odd total leaves one head unused).
    uniform: the same count in every layer for each kind: the (nK, nV) pair (nK == nV when coupled)
      of least summed cost among those that keep the most heads within `total`.
    """
    pairs = [[ck + cv for ck, cv in zip(costs[i], costs[i + 1])] for i in range(0, len(costs), 2)]
    L = len(pairs)
    if options.allocation == "adaptive":
        if options.decoupled:
            return allocate(costs, total)
        return [n for n in allocate(pairs, total // 2) for _ in range(2)]
    max_k, max_v = min(len(c) for c in costs[0::2]), min(len(c) for c in costs[1::2])
    options_kv = [
        (k, v)
        for k in range(1, max_k + 1)
        for v in range(1, max_v + 1)
        if L * (k + v) <= total and (options.decoupled or k == v)
    ]
    if not options_kv:
        raise UserError(f"a uniform allocation needs at least {2 * L} heads, the budget keeps {total}")
    most = max(k + v for k, v in options_kv)

    def cost(kv):
        k, v = kv
        return sum(costs[2 * l][k - 1] + costs[2 * l + 1][v - 1] for l in range(L))

    k, v = min((kv for kv in options_kv if sum(kv) == most), key=lambda kv: (cost(kv), kv))
    return [k, v] * L


# ---- learned search ------------------------------------------------------------------------------


def reconstructed_weights(model: Transformer, stats, table: HeadTable) -> dict[str, torch.Tensor]:
    """{"weight": (n, n*hd, D), "bias": (n, n*hd)?}: the table's k_proj (or v_proj) weights as the
    c-group aligned merge gives them back to each source head, for every count c (c = n: unchanged)."""
    hd = model.config.head_dim
    proj = getattr(model.layers[table.layer].attn, "k_proj" if table.kind == "key" else "v_proj")
    out = {}
    for suffix in ("weight", "bias"):
        w = getattr(proj, suffix)
        if w is None:
            continue
        rows = heads(w.detach().double(), hd)  # (n, hd, ...)
        per_count = []
        for groups in table.groupings:
            rec = rows.clone()
            for g in groups:
                merge = group_merge(stats, table.kind, g)
                rec[g] = (
                    reconstructed_key_rows(rows[g], merge)
                    if table.kind == "key"
                    else reconstructed_value_rows(rows[g], merge)
                )
            per_count.append(unheads(rec).to(w.dtype))
        out[suffix] = torch.stack(per_count)
    return out


def hard_concrete_sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """Stretched, clamped concrete sample in [0, 1] (Louizos et al. 2018, eq. 10), differentiable in
    log_alpha. Draws from torch's global generator (dha.train.train seeds it with the run's seed)."""
    u = torch.rand(log_alpha.shape, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / HC_TEMPERATURE)
    return (s * (HC_HIGH - HC_LOW) + HC_LOW).clamp(0.0, 1.0)


def hard_concrete_mean(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic test-time gate, clamp(sigmoid(log_alpha) * (high - low) + low, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (HC_HIGH - HC_LOW) + HC_LOW).clamp(0.0, 1.0)


def hard_concrete_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0) (Louizos et al. 2018, eq. 12): the expected L0 count of a gate."""
    return torch.sigmoid(log_alpha - HC_TEMPERATURE * math.log(-HC_LOW / HC_HIGH))


def count_coefficients(kept: torch.Tensor) -> torch.Tensor:
    """kept (n - 1,) in [0, 1] -> (n,) weights c_1..c_n of the c-group models.

    u_1 = 1 and u_c = kept[c - 2]; c_c = u_c - u_{c + 1} (u_{n + 1} = 0), so sum_c c_c W_c =
    W_1 + sum_{c >= 2} u_c (W_c - W_{c - 1}): a telescoping interpolation that is exactly the
    c-group model W_c when u = (1, ..., 1, 0, ..., 0) with c ones."""
    u = torch.cat([kept.new_ones(1), kept, kept.new_zeros(1)])
    return u[:-1] - u[1:]


class RelaxedCounts(nn.Module):
    """The source model with every layer's key and value head counts relaxed (see `learned_counts`).

    Its only trainable state is one vector of gate logits per table. The source model is held as a
    submodule (so `.to(device)` moves it) but its weights are passed detached through
    `torch.func.functional_call`: no gradient reaches them and the model object is never modified.
    """

    def __init__(self, model: Transformer, tables: list[HeadTable], calibration: Calibration, gate_init: float):
        super().__init__()
        self.model = model
        self.config = model.config  # dha.train records it in the run identity
        self.names = [f"layers.{t.layer}.attn.{'k_proj' if t.kind == 'key' else 'v_proj'}" for t in tables]
        self.gates = nn.ParameterList(nn.Parameter(torch.full((len(t.costs) - 1,), gate_init)) for t in tables)
        for i, t in enumerate(tables):
            for suffix, w in reconstructed_weights(model, calibration.stats[t.layer], t).items():
                self.register_buffer(f"{suffix}_{i}", w, persistent=False)  # (n, ...): the c-group weights W_c
            self.register_buffer(f"cost_{i}", torch.tensor(t.costs, dtype=torch.float32), persistent=False)  # (n,)
        self.source_heads = sum(len(t.costs) for t in tables)

    def kept(self, i: int, sample: bool) -> torch.Tensor:
        """u_2..u_n of table i: cumulative products of sampled (training) or mean (eval) gates."""
        la = self.gates[i]
        return torch.cumprod(hard_concrete_sample(la) if sample else hard_concrete_mean(la), 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weights = {name: p.detach() for name, p in self.model.named_parameters()}
        for i, name in enumerate(self.names):
            coeff = count_coefficients(self.kept(i, sample=self.training))  # (n,)
            for suffix in ("weight", "bias"):
                if f"{name}.{suffix}" in weights:
                    per_count = getattr(self, f"{suffix}_{i}")  # (n, ...)
                    weights[f"{name}.{suffix}"] = torch.einsum("c,c...->...", coeff.to(per_count.dtype), per_count)
        return torch.func.functional_call(self.model, weights, (input_ids,))

    def expected_counts(self) -> list[torch.Tensor]:
        """E[n] = 1 + sum_c prod_{i<=c} P(z_i != 0) per table."""
        return [1 + torch.cumprod(hard_concrete_open(la), 0).sum() for la in self.gates]

    def fusion_loss(self) -> torch.Tensor:
        """sum_tables sum_c c_c cost(c), at the expected u_c = prod_{i<=c} P(z_i != 0)."""
        return sum(
            (count_coefficients(torch.cumprod(hard_concrete_open(la), 0)) * getattr(self, f"cost_{i}")).sum()
            for i, la in enumerate(self.gates)
        )


def learned_counts(
    model: Transformer,
    calib_blocks: torch.Tensor,
    tables: list[HeadTable],
    calibration: Calibration,
    total: int,
    options: SearchOptions,
) -> tuple[list[int], dict]:
    """Per-table head counts from relaxed, trained counts (the DHA paper's search, with the LLM-Shearing relaxation).

    Relaxation (`RelaxedCounts`). A table (layer l, keys or values) with n source heads has the
    groupings G_1..G_n of step 1 and, for each, its aligned merge given back to every source head:
    the c-group model's weights W_c (`reconstructed_weights`; W_n = W). It gets n - 1 hard-concrete gates z_2..z_n
    (log-alpha parameters; Louizos et al. 2018, as in LLM-Shearing) and "head c is kept" variables
    u_c = z_2 * ... * z_c (cumulative, so counts are ordered: keeping c heads implies keeping c - 1),
    u_1 = 1. The layer's relaxed weights are

        W~ = W_1 + sum_{c=2..n} u_c (W_c - W_{c-1})

    which is the c-group merged model when u = (1,..,1,0,..,0) (c ones) and a linear interpolation
    between the c- and (c+1)-group models when u_{c+1} is fractional. Gates start open (log-alpha =
    gate_init), so training starts from the unchanged model. The expected count is
    E[n_l] = 1 + sum_{c>=2} prod_{i<=c} P(z_i != 0).

    Objective per step, on a batch of calibration blocks (gates and multipliers only; the model's
    weights stay frozen; fusion learns them later):

        L = L_LM(W~) + a * L_fusion + lambda1 (E - t) + lambda2 (E - t)^2

    with E = sum_l E[n_l] / (source K+V heads) and t the target fraction, falling linearly from 1 to
    total / (source heads) over the first `warmup` of the steps (dha.train.ramp), then constant.
    L_fusion = sum_tables sum_c c_c cost(c): the relative cost table of step 2 interpolated the same
    way, at the expected u. It runs in the shared loop `dha.train.train` (fp32, constant learning
    rates, no clipping): the gates descend (AdamW, gate_lr); lambda1, lambda2 ascend through a
    negative-lr parameter group (multiplier_lr), the augmented Lagrangian of LLM-Shearing
    (Xia et al. 2024, section 2.1). Sampling noise comes from torch's generator, seeded by the loop.

    Counts. The final expected counts E[n_l] are rounded to integers meeting `total` exactly by the
    same dynamic programming as the cost search, minimising sum_l (n_l - E[n_l])^2.
    """
    relaxed = RelaxedCounts(model, tables, calibration, options.gate_init)
    result = _train_gates(relaxed, calib_blocks, total, options)
    counts, expected_counts = _counts_from_gates(relaxed, tables, total)
    return counts, {
        "expected_counts": [round(e, 4) for e in expected_counts],
        "history": _learned_history(result, options),
    }


def _train_gates(relaxed: RelaxedCounts, calib_blocks: torch.Tensor, total: int, options: SearchOptions):
    """The learned search's loop: `dha.train.train` of the gates (and the Lagrange multipliers) on the
    calibration blocks, on the source model's device; the model's train/eval mode is restored after."""
    model = relaxed.model
    device = next(model.parameters()).device  # where dha.train.train runs it (cfg.device below)
    multipliers = nn.Parameter(torch.zeros(2, device=device))  # lambda1, lambda2
    hooks = _lagrangian_hooks(multipliers, total / relaxed.source_heads, options)
    cfg = _gates_train_config(calib_blocks, options, device)
    was_training = model.training
    try:
        return train(relaxed, calib_blocks, None, cfg, hooks=hooks, progress=options.progress)
    finally:
        model.train(was_training)


def _gates_train_config(calib_blocks: torch.Tensor, options: SearchOptions, device: torch.device) -> TrainConfig:
    """options.steps steps of up to options.batch_size calibration blocks, in fp32 at constant learning rates,
    without clipping, evaluation or activation checkpointing."""
    rows = min(options.batch_size, calib_blocks.shape[0])
    width = calib_blocks.shape[1]
    return TrainConfig(
        tokens=options.steps * rows * width,
        block_size=width,
        batch_tokens=rows * width,
        micro_batch=rows,
        lr=options.gate_lr,
        min_lr_ratio=1.0,
        warmup_steps=0,
        grad_clip=0.0,
        dtype="float32",
        eval_every=0,
        seed=options.seed,
        device=str(device),
        activation_checkpointing="off",
    )  # functional_call's weights are gone when a block would recompute


def _counts_from_gates(relaxed: RelaxedCounts, tables: list[HeadTable], total: int) -> tuple[list[int], list[float]]:
    """The learned search's readout: (integer counts meeting `total` exactly, nearest in squared distance to the
    expected counts; the expected counts E[n] of the trained gates), per table."""
    with torch.no_grad():
        expected_counts = [float(e) for e in relaxed.expected_counts()]
    rounding = [[(c - e) ** 2 for c in range(1, len(t.costs) + 1)] for t, e in zip(tables, expected_counts)]
    return allocate(rounding, total), expected_counts


def _lagrangian_hooks(multipliers: nn.Parameter, final: float, options: SearchOptions) -> Hooks:
    """The training loop's hooks for `learned_counts`: the fusion loss plus the augmented-Lagrangian
    budget term (target fraction ramped from 1 to `final`), the gates descending and the
    multipliers ascending (a negative-lr group)."""
    warm = round(options.warmup * options.steps)

    def extra_loss(module: RelaxedCounts, step: int):
        target = ramp(step, 0, warm, 1.0, final) if warm > 0 else final
        expected = sum(module.expected_counts()) / module.source_heads
        fusion = module.fusion_loss()
        gap = expected - target
        lam = multipliers
        term = options.fusion_weight * fusion + lam[0] * gap + lam[1] * gap**2
        return term, {
            "fusion": float(fusion.detach()),
            "expected_fraction": float(expected.detach()),
            "target": target,
            "lambda1": float(lam[0].detach()),
            "lambda2": float(lam[1].detach()),
        }

    def param_groups(module: RelaxedCounts):
        return [
            {"params": list(module.gates), "lr": options.gate_lr, "weight_decay": 0.0},
            {"params": [multipliers], "lr": -options.multiplier_lr},
        ]  # negative: gradient ascent

    return Hooks(extra_loss, param_groups)


def _learned_history(result, options: SearchOptions) -> list[dict]:
    """About ten records of the gates' training (and its first and last step), rounded, for the plan's notes."""
    every = max(1, options.steps // 10)
    keep = ("step", "loss", "fusion", "expected_fraction", "target", "lambda1", "lambda2")
    return [
        {k: (round(r[k], 5) if isinstance(r[k], float) else r[k]) for k in keep}
        for r in result.history
        if r["step"] % every == 0 or r["step"] in (1, result.steps)
    ]


# ---- entry point ---------------------------------------------------------------------------------


def check_calib_blocks(calib_blocks: torch.Tensor | None) -> None:
    """UserError unless `calib_blocks` is a non-empty (n_blocks, T) tensor of token ids with T >= 2."""
    if calib_blocks is None or calib_blocks.dim() != 2 or calib_blocks.numel() == 0:
        raise UserError("the DHA search needs calibration text: a non-empty (n_blocks, T) tensor of token ids")
    if calib_blocks.shape[1] < 2:
        raise UserError(f"the DHA search needs calibration blocks of at least 2 tokens, got {calib_blocks.shape[1]}")


def search(
    model: Transformer,
    kv_budget: float,
    calib_blocks: torch.Tensor,
    options: SearchOptions | None = None,
    calibration: Calibration | None = None,
) -> Plan:
    """The DHA plan for `model` at `kv_budget`: groups and per-layer counts, exactly on budget.

    calib_blocks: (n_blocks, T) calibration token ids (train split); `calibration`, when given, is
    `dha.calibration.calibrate` of them already made (with gradients when options.sensitivity). The
    plan's notes hold the settings and the cost table (per layer, kind and count) and, for the
    learned search, the expected counts and a training log. Deterministic for a given seed.
    """
    options = options or SearchOptions()
    check_calib_blocks(calib_blocks)
    src_k, src_v = source_heads(model)
    total = total_heads_for_budget(src_k, src_v, kv_budget)
    calibration = _search_calibration(model, calib_blocks, options, calibration)
    tables = _search_tables(model, calibration, options)
    notes = {
        "search": options.search,
        "total_heads": total,
        "calibration_tokens": int(calib_blocks.numel()),
        "options": {
            **{k: v for k, v in asdict(options).items() if k != "progress"},
            "free_pairs": calibration.free_pairs,
        },
    }
    costs = [t.fisher for t in tables] if options.needs_gradients else [t.costs for t in tables]
    counts = _allocated_counts(model, calib_blocks, tables, calibration, costs, total, options, notes)
    notes.update(_cost_notes(tables, costs, counts, options.needs_gradients))
    plan = Plan(_chosen_groupings(tables, counts), src_k, src_v, method="dha", kv_budget=kv_budget, notes=notes)
    plan.validate(src_k, src_v)
    return plan


def _search_calibration(
    model: Transformer, calib_blocks: torch.Tensor, options: SearchOptions, calibration: Calibration | None
) -> Calibration:
    """`calibration` when it was made with the options' merge metric and position-free pairs (and
    gradients, when the costs are weighted by sensitivity); else a new calibration pass."""
    weighted = options.needs_gradients
    free_pairs = free_pairs_for(model, options.free_pairs, options.free_context)
    fresh = calibration is None or (calibration.metric, calibration.free_pairs) != (options.metric, free_pairs)
    if fresh or (weighted and calibration.grads is None):
        calibration = calibrate(
            model, calib_blocks, options.batch_size, options.metric, gradients=weighted, free_pairs=free_pairs
        )
    return calibration


def _search_tables(model: Transformer, calibration: Calibration, options: SearchOptions) -> list[HeadTable]:
    """Steps 1 and 2 (module doc): per layer, key table then value table, the nested groupings and
    their costs in the options' layout; merges of protected heads cost PROTECTED."""
    weighted = options.needs_gradients
    if options.layout == "free" and options.decoupled:
        tables = head_tables(model, calibration, weighted, options.protect)
    else:
        tables = (serving_tables if options.layout == "serving" else coupled_tables)(model, calibration, weighted)
    forbid_protected_merges(tables, options.protect)
    return tables


def _allocated_counts(
    model: Transformer,
    calib_blocks: torch.Tensor,
    tables: list[HeadTable],
    calibration: Calibration,
    costs: list[list[float]],
    total: int,
    options: SearchOptions,
    notes: dict,
) -> list[int]:
    """Step 3 (module doc): the head count of every table, by the options' layout and search; what
    the allocation reports goes into `notes`. UserError when the counts must merge a protected head."""
    if options.layout == "serving":
        counts = allocate_serving(costs, total)
        notes["heads_kept"] = sum(counts)  # the most heads equal groups reach within the budget
    elif options.search == "cost":
        counts = allocate_with(costs, total, options)
        notes["heads_kept"] = sum(counts)  # == total unless an ablation cannot meet it exactly
    else:
        counts, notes["learned"] = learned_counts(model, calib_blocks, tables, calibration, total, options)
    if 0 in counts or not math.isfinite(sum(c[n - 1] for c, n in zip(costs, counts))):
        raise UserError(
            f"the budget keeps {total} heads, too few to keep the {len(options.protect)} protected heads "
            "unmerged in this layout: protect fewer (--retrieval-heads) or raise --kv-budget"
        )
    return counts


def _cost_notes(tables: list[HeadTable], costs: list[list[float]], counts: list[int], weighted: bool) -> dict:
    """The plan's notes on costs: the cost table (and the loss increases when weighted) by kind, layer and
    count, and the summed cost of the chosen counts."""
    notes = {"costs": _by_kind(tables, [_rounded(t.costs) for t in tables])}
    if weighted:
        notes["loss_increase"] = _by_kind(tables, [_rounded(t.fisher) for t in tables])
    notes["chosen_cost"] = float(f"{sum(c[n - 1] for c, n in zip(costs, counts)):.6g}")
    return notes


def _chosen_groupings(tables: list[HeadTable], counts: list[int]) -> list[LayerPlan]:
    """Each layer's key and value groupings at its chosen counts (tables and counts: key, value per layer)."""
    return [
        LayerPlan(tables[2 * l].groupings[counts[2 * l] - 1], tables[2 * l + 1].groupings[counts[2 * l + 1] - 1])
        for l in range(len(tables) // 2)
    ]


def _rounded(values: list[float]) -> list[float | None]:
    """6 significant digits; None for a count the layout forbids (infinite cost; JSON has no inf)."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in values]


def _by_kind(tables: list[HeadTable], values: list) -> dict:
    """[per table] -> {"key": [per layer], "value": [per layer]}."""
    return {kind: [v for t, v in zip(tables, values) if t.kind == kind] for kind in KINDS}
