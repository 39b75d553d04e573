"""Search: which heads to group and how many key and value heads each layer keeps -> a Plan.

DHA (Chen et al. 2024, section 3.1 "Search") finds, before fusion, the groups of similar heads and
a per-layer allocation of key and value heads under a global KV-head budget. Like llm-awq's
`run_awq`, `search` returns plain data (a `dha.plan.Plan`); applying it (mean merge, or learned
fusion in `dha.fuse`) is separate.

Three steps (METHOD.md part B):

1. Grouping. Per layer, keys and values apart, for every count n the heads are clustered into n
   groups by the similarity of their calibration outputs (`dha.analyze.cluster`, options.metric).

2. Cost of each grouping (`head_tables`, `group_cost`). The fusion loss after the best in-group
   fusion, relative to the layer's total, so layers and kinds are comparable (0 = lossless, 1 =
   as bad as dropping the heads). A group S's shared head is a scalar combination of its members,
   sum_j w_j head_j (what `dha.transforms.merge_groups` applies), and its cost is

       cost(S) = min_w sum_{m in S} (w - e_m)^T A_m[S, S] (w - e_m)

   with one PSD matrix A_m per source head m (an (n, n) Gram matrix over the layer's heads):
   - values: A_m = Gram of the value outputs over calibration tokens (the same for every m), i.e.
     the squared error of replacing each member's outputs by the shared head. Setting the
     gradient to zero gives |S| A w = A 1, solved by w = 1/|S|: the mean is optimal (indeed it
     minimises sum_m ||v - v_m||^2 over any per-token v, and it lies in the span). Each source
     value head counts once, however many query heads read it (all equal in MHA and GQA sources);
   - keys, key_cost="logit" (default): A_m = sum over the query heads h that read m of
     Z_h^T Z_h, where Z_h[p, j] = q_h(i_p) . R(j_p - i_p) k_j(j_p) is the RoPE'd attention logit of
     query head h at position i_p against key head j at position j_p, on sampled causal pairs p of
     the same calibration block. So cost is the squared logit error the shared key causes to every
     query head that used a member key. The best w here is a least-squares solution, not the mean
     in general; the mean's cost is an upper bound.
   - keys, key_cost="output": as values, on the pre-RoPE key outputs.
   The normaliser is sum_m A_m[m, m] over the layer's heads (its value energy, or its logit energy).

3. Allocation: per-layer counts nK(l), nV(l) in [1, source heads] with
   sum_l (nK(l) + nV(l)) == `total_heads_for_budget` EXACTLY.
   - search="cost": minimise the summed costs by exact dynamic programming (`allocate`); costs
     weighted by each layer's measured sensitivity (options.sensitivity, default on: the relative
     costs alone over-merge keys on SmolLM2; docs/method.md, Benchmarks 4).
   - search="learned" (paper-faithful; see `learned_counts` for the relaxation): relaxed head
     counts trained with the LM loss, the fusion loss and an augmented-Lagrangian budget constraint.
   The plan then takes, for each layer and kind, the clustering at the chosen count.
   Two ablations of the cost search switch DHA's ideas off (`allocate_with`): allocation="uniform"
   (the same counts in every layer) and decoupled=False (keys and values share groups and counts).

Shape legend: N calibration tokens (n_blocks * T), T tokens per block, H query heads, n source
heads of one kind in a layer, hd head dim, P sampled (query, key) token pairs, L layers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .analyze import METRICS, cluster, collect_heads, similarity
from .baselines import heads_for_budget, source_heads
from .errors import UserError
from .model import Transformer
from .plan import LayerPlan, Plan
from .transforms import heads, merge_groups, unheads

SEARCHES = ("cost", "learned")
ALLOCATIONS = ("adaptive", "uniform")
KEY_COSTS = ("logit", "output")
KINDS = ("key", "value")

# Hard-concrete distribution (Louizos et al. 2018, "Learning sparse neural networks through L0
# regularization", section 4), with the constants LLM-Shearing uses (Xia et al. 2024).
HC_TEMPERATURE, HC_LOW, HC_HIGH = 2.0 / 3.0, -0.1, 1.1


@dataclass
class SearchOptions:
    search: str = "cost"  # "cost": exact DP on the cost table | "learned": relaxed counts, trained
    metric: str = "cosine"  # similarity the heads are clustered by: "cosine" | "cka"
    key_cost: str = "logit"  # key cost: "logit" (attention-logit error) | "output" (key-output error)
    key_pairs: int = 16384  # (query, key) token pairs sampled per layer for the logit cost
    sensitivity: bool = True  # cost search: weight each layer/kind's costs by its measured LM-loss increase at 1 head
    # Ablations of DHA's two ideas (cost search only; docs/method.md, "Ablations"):
    allocation: str = "adaptive"  # "adaptive": counts per layer by the DP | "uniform": the same K count and V count in every layer
    decoupled: bool = True  # False: keys and values of a layer share one grouping and one count (GQA-like)
    seed: int = 0  # pair sampling and hard-concrete noise: same seed -> same plan
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
        if self.metric not in METRICS:
            raise UserError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if self.key_cost not in KEY_COSTS:
            raise UserError(f"unknown key cost {self.key_cost!r}; choose from {', '.join(KEY_COSTS)}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        if self.search == "learned" and (self.allocation != "adaptive" or not self.decoupled):
            raise UserError("uniform allocation and coupled keys/values are ablations of the cost search (use --search cost)")
        if self.key_pairs < 1 or self.batch_size < 1 or self.steps < 1:
            raise UserError("key_pairs, batch_size and steps must be positive")
        if not 0.0 <= self.warmup <= 1.0:
            raise UserError(f"warmup is a fraction of the steps in [0, 1], got {self.warmup}")
        if self.gate_lr <= 0 or self.multiplier_lr <= 0 or self.fusion_weight < 0:
            raise UserError("learning rates must be > 0 and the fusion weight >= 0")


@dataclass
class HeadTable:
    """The key (or value) heads of one layer: a grouping and its fusion cost for every count."""

    layer: int
    kind: str  # "key" | "value"
    groupings: list[list[list[int]]]  # groupings[n - 1]: the heads clustered into n groups
    costs: list[float]  # costs[n - 1]: relative fusion cost of groupings[n - 1] (0 at n = source heads)
    quadratic: torch.Tensor = field(repr=False)  # (n, n, n) float64: A_m for each source head m
    similarity: torch.Tensor = field(repr=False, default=None)  # (n, n): what the heads were clustered by


# ---- budget --------------------------------------------------------------------------------------

def total_heads_for_budget(source_key_heads: list[int], source_value_heads: list[int], kv_budget: float) -> int:
    """Total K+V heads a plan at `kv_budget` keeps: floor(kv_budget * sum of source heads).

    Same convention as `dha.baselines.heads_for_budget` (the budget is a ceiling on the fraction of
    the KV cache kept, +1e-9 against float error), which also validates the budget: outside (0, 1]
    or below one key and one value head per layer -> UserError. The search meets this total
    exactly, so it never keeps fewer heads than the uniform baselines at the same budget.
    """
    heads_for_budget(source_key_heads, source_value_heads, kv_budget)  # raises UserError when unmeetable
    total = math.floor(kv_budget * (sum(source_key_heads) + sum(source_value_heads)) + 1e-9)
    least = 2 * len(source_key_heads)
    if total < least:  # a budget a hair above min_budget can still floor below it
        raise UserError(f"--kv-budget {kv_budget} keeps {total} heads, fewer than one key and one value head in each of {len(source_key_heads)} layers")
    return total


# ---- costs ---------------------------------------------------------------------------------------

def output_quadratic(outputs: torch.Tensor) -> torch.Tensor:
    """outputs (N, n, hd) -> (n, n, n): A_m = the Gram matrix of the heads' outputs, for every m."""
    x = outputs.double()
    gram = torch.einsum("tad,tbd->ab", x, x)  # (n, n): sum over tokens and dims
    return gram.expand(x.shape[1], -1, -1).clone()


def sample_pairs(num_blocks: int, block_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(P, 3) causal (block, query position, key position) pairs, key position <= query position.

    Two positions drawn uniformly in a block, the later one is the query's: every causal pair is
    equally likely except the diagonal (half as likely)."""
    b = torch.randint(num_blocks, (count,), generator=generator)
    i = torch.randint(block_len, (count,), generator=generator)
    j = torch.randint(block_len, (count,), generator=generator)
    return torch.stack([b, torch.maximum(i, j), torch.minimum(i, j)], dim=1)


def key_logit_quadratic(queries: torch.Tensor, keys: torch.Tensor, key_index: list[int], model: Transformer,
                        block_len: int, pairs: torch.Tensor) -> torch.Tensor:
    """A_m = sum_{h: key_index[h] = m} Z_h^T Z_h: the logit-space Gram matrices of one layer's keys.

    queries (N, H, hd), keys (N, n, hd): pre-RoPE, N = n_blocks * block_len in block order (as
    `collect_heads` returns them); pairs (P, 3) from `sample_pairs`. -> (n, n, n) float64.
    Logits are q . k with the model's own RoPE at the tokens' positions (so relative offsets are
    those of real attention); the 1/sqrt(hd) scale cancels in the relative cost.
    """
    N, H, hd = queries.shape
    n = keys.shape[1]
    q = queries.reshape(N // block_len, block_len, H, hd).transpose(1, 2)  # (nb, H, T, hd)
    k = keys.reshape(N // block_len, block_len, n, hd).transpose(1, 2)  # (nb, n, T, hd)
    rope = model.rope(torch.arange(block_len))
    if rope is not None:
        q, k = rope.apply(q.float()), rope.apply(k.float())
    grams = torch.zeros(H, n, n, dtype=torch.float64)
    for chunk in pairs.split(2048):  # bounded memory on wide models
        b, i, j = chunk.unbind(1)
        qs = q[b, :, i].double()  # (p, H, hd): query heads at the query positions
        ks = k[b, :, j].double()  # (p, n, hd): key heads at the key positions
        z = torch.einsum("phd,pmd->phm", qs, ks)  # (p, H, n): logit of each query head against each key head
        grams += torch.einsum("phm,phk->hmk", z, z)  # (H, n, n): Z_h^T Z_h
    out = torch.zeros(n, n, n, dtype=torch.float64)
    return out.index_add_(0, torch.tensor(key_index), grams)


def group_cost(quadratic: torch.Tensor, members: list[int]) -> tuple[float, torch.Tensor]:
    """(cost, w): the least fusion cost of one group and the member weights that reach it.

    cost = min_w sum_{m in S} (w - e_m)^T A_m[S, S] (w - e_m)  (absolute, not normalised), with
    S = members and A = `quadratic` (n, n, n). The normal equations are
    (sum_m A_m[S, S]) w = sum_m A_m[S, m]; the pseudo-inverse gives the least-norm solution when
    members are linearly dependent (identical heads).
    """
    S = torch.tensor(members)
    if len(members) == 1:
        return 0.0, torch.ones(1, dtype=torch.float64)
    blocks = quadratic[S][:, S][:, :, S]  # (g, g, g): A_m[S, S] for m in S
    lhs = blocks.sum(0)  # (g, g)
    rhs = torch.stack([blocks[a, :, a] for a in range(len(members))]).sum(0)  # (g,): sum_m A_m[S, m]
    w = torch.linalg.pinv(lhs, hermitian=True) @ rhs
    cost = sum(
        float((w - e) @ blocks[a] @ (w - e))
        for a, e in enumerate(torch.eye(len(members), dtype=torch.float64))
    )
    return max(cost, 0.0), w


def grouping_cost(quadratic: torch.Tensor, groups: list[list[int]]) -> float:
    """Relative fusion cost of a whole grouping of one layer's heads: sum of group costs / energy."""
    energy = float(torch.diagonal(quadratic, dim1=1, dim2=2).diagonal().sum())  # sum_m A_m[m, m]
    if energy <= 0:
        return 0.0
    return sum(group_cost(quadratic, g)[0] for g in groups) / energy


def head_tables(model: Transformer, calib_blocks: torch.Tensor, options: SearchOptions) -> list[HeadTable]:
    """For every layer, key then value: groupings for every count and their relative costs."""
    cfg = model.config
    collected = collect_heads(model, calib_blocks, options.batch_size)  # every token, block order
    num_blocks, block_len = calib_blocks.shape
    generator = torch.Generator().manual_seed(options.seed)
    tables = []
    for l, layer in enumerate(collected):
        for kind, name in (("key", "keys"), ("value", "values")):
            outputs = layer[name]  # (N, n, hd)
            n = outputs.shape[1]
            if kind == "key" and options.key_cost == "logit":
                pairs = sample_pairs(num_blocks, block_len, options.key_pairs, generator)
                quadratic = key_logit_quadratic(layer["queries"], outputs, cfg.key_index[l], model, block_len, pairs)
            else:
                quadratic = output_quadratic(outputs)
            sim = similarity(outputs, options.metric)
            groupings = [cluster(sim, c) for c in range(1, n + 1)]
            costs = [grouping_cost(quadratic, g) for g in groupings]
            tables.append(HeadTable(l, kind, groupings, costs, quadratic, sim))
    return tables


def coupled_tables(model: Transformer, tables: list[HeadTable]) -> list[HeadTable]:
    """The coupled-K/V ablation: each layer's keys and values share one grouping per count,
    clustered on the mean of the two similarity matrices (like GQA, unlike DHA); each kind keeps
    its own cost of that shared grouping. Needs a source whose layers read key head i and value
    head i together (key_index == value_index: every MHA and GQA checkpoint)."""
    cfg = model.config
    out = []
    for l in range(cfg.num_layers):
        if cfg.key_index[l] != cfg.value_index[l]:
            raise UserError(f"layer {l} already has decoupled key and value heads: keys and values cannot share groups")
        key, value = tables[2 * l], tables[2 * l + 1]
        sim = (key.similarity + value.similarity) / 2
        groupings = [cluster(sim, c) for c in range(1, len(key.groupings) + 1)]
        for t in (key, value):
            out.append(HeadTable(l, t.kind, groupings, [grouping_cost(t.quadratic, g) for g in groupings], t.quadratic, sim))
    return out


def sensitivities(model: Transformer, calib_blocks: torch.Tensor, tables: list[HeadTable], batch_size: int) -> list[float]:
    """Per table, the LM-loss increase (nats/token, calibration blocks) when that layer's keys (or
    values) alone are mean-merged into one head and everything else is left as it is."""
    from .evaluate import perplexity

    src_k, src_v = source_heads(model)
    base = perplexity(model, calib_blocks, batch_size, progress=False)["nll"]
    out = []
    for t in tables:
        layers = [LayerPlan([[h] for h in range(k)], [[h] for h in range(v)]) for k, v in zip(src_k, src_v)]
        one = t.groupings[0]
        if t.kind == "key":
            layers[t.layer].key_groups = one
        else:
            layers[t.layer].value_groups = one
        merged = merge_groups(model, Plan(layers, src_k, src_v))
        out.append(perplexity(merged, calib_blocks, batch_size, progress=False)["nll"] - base)
    return out


def weighted_costs(tables: list[HeadTable], sensitivity: list[float], floor_fraction: float = 0.1) -> list[list[float]]:
    """Costs rescaled so that a table's 1-head cost equals its measured loss increase:
    cost'(n) = cost(n) / cost(1) * max(dL, floor_fraction * median dL). First order: loss grows in proportion
    to the fusion error, with the slope measured per layer and kind. The floor is relative: a table
    whose measured increase is ~0 or negative (noise) must not look free to merge, or the DP would
    trade its heads for rounding noise in other tables' near-zero costs."""
    floor = max(floor_fraction * statistics.median(max(d, 0.0) for d in sensitivity), 1e-9)
    out = []
    for t, d in zip(tables, sensitivity):
        scale = max(d, floor) / t.costs[0] if t.costs[0] > 0 else 0.0
        out.append([c * scale for c in t.costs])
    return out


# ---- allocation ----------------------------------------------------------------------------------

def allocate(costs: list[list[float]], total: int) -> list[int]:
    """Counts n_i in 1..len(costs[i]) with sum_i n_i == total minimising sum_i costs[i][n_i - 1].

    Exact dynamic programming over the items (a multiple-choice knapsack with an equality):
    best[i][b] = least cost of items 0..i-1 keeping b heads. O(items * total * max heads).
    Ties keep the smaller count of each item, from the last item back (deterministic).
    """
    sizes = [len(c) for c in costs]
    if not len(sizes) <= total <= sum(sizes):
        raise UserError(f"cannot keep exactly {total} heads with {len(sizes)} layer/kinds of 1..{max(sizes)} heads each")
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
    options_kv = [(k, v) for k in range(1, max_k + 1) for v in range(1, max_v + 1)
                  if L * (k + v) <= total and (options.decoupled or k == v)]
    if not options_kv:
        raise UserError(f"a uniform allocation needs at least {2 * L} heads, the budget keeps {total}")
    most = max(k + v for k, v in options_kv)

    def cost(kv):
        k, v = kv
        return sum(costs[2 * l][k - 1] + costs[2 * l + 1][v - 1] for l in range(L))

    k, v = min((kv for kv in options_kv if sum(kv) == most), key=lambda kv: (cost(kv), kv))
    return [k, v] * L


# ---- learned search ------------------------------------------------------------------------------

def averaging_matrices(groupings: list[list[list[int]]]) -> torch.Tensor:
    """(n, n, n): M[c - 1] maps each source head to the mean of its group in the c-group clustering,
    so heads(W) -> M[c - 1] @ heads(W) are the c-group mean-merged weights, still one per source head."""
    n = len(groupings)
    out = torch.zeros(n, n, n)
    for c, groups in enumerate(groupings):
        for g in groups:
            out[c][torch.tensor(g)[:, None], torch.tensor(g)[None, :]] = 1.0 / len(g)
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

    u_1 = 1 and u_c = kept[c - 2]; c_c = u_c - u_{c + 1} (u_{n + 1} = 0), so sum_c c_c M_c =
    M_1 + sum_{c >= 2} u_c (M_c - M_{c - 1}): a telescoping interpolation that is exactly the
    c-group merge when u = (1, ..., 1, 0, ..., 0) with c ones."""
    u = torch.cat([kept.new_ones(1), kept, kept.new_zeros(1)])
    return u[:-1] - u[1:]


class RelaxedCounts(nn.Module):
    """The source model with every layer's key and value head counts relaxed (see `learned_counts`).

    Its only trainable state is one vector of gate logits per table. The source model is held as a
    submodule (so `.to(device)` moves it) but its weights are passed detached through
    `torch.func.functional_call`: no gradient reaches them and the model object is never modified.
    """

    def __init__(self, model: Transformer, tables: list[HeadTable], gate_init: float):
        super().__init__()
        self.model = model
        self.config = model.config  # dha.train records it in the run identity
        self.names = [f"layers.{t.layer}.attn.{'k_proj' if t.kind == 'key' else 'v_proj'}" for t in tables]
        self.gates = nn.ParameterList(nn.Parameter(torch.full((len(t.costs) - 1,), gate_init)) for t in tables)
        for i, t in enumerate(tables):
            self.register_buffer(f"merge_{i}", averaging_matrices(t.groupings), persistent=False)  # (n, n, n)
            self.register_buffer(f"cost_{i}", torch.tensor(t.costs, dtype=torch.float32), persistent=False)  # (n,)
        self.source_heads = sum(len(t.costs) for t in tables)

    def kept(self, i: int, sample: bool) -> torch.Tensor:
        """u_2..u_n of table i: cumulative products of sampled (training) or mean (eval) gates."""
        la = self.gates[i]
        return torch.cumprod(hard_concrete_sample(la) if sample else hard_concrete_mean(la), 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hd = self.model.config.head_dim
        weights = {name: p.detach() for name, p in self.model.named_parameters()}
        for i, name in enumerate(self.names):
            coeff = count_coefficients(self.kept(i, sample=self.training))  # (n,)
            mix = torch.einsum("c,cab->ab", coeff, getattr(self, f"merge_{i}"))  # (n, n)
            for suffix in ("weight", "bias"):
                key = f"{name}.{suffix}"
                if key in weights:
                    w = weights[key]
                    weights[key] = unheads(torch.einsum("ab,b...->a...", mix.to(w.dtype), heads(w, hd)))
        return torch.func.functional_call(self.model, weights, (input_ids,))

    def expected_counts(self) -> list[torch.Tensor]:
        """E[n] = 1 + sum_c prod_{i<=c} P(z_i != 0) per table."""
        return [1 + torch.cumprod(hard_concrete_open(la), 0).sum() for la in self.gates]

    def fusion_loss(self) -> torch.Tensor:
        """sum_tables sum_c c_c cost(c), at the expected u_c = prod_{i<=c} P(z_i != 0)."""
        return sum((count_coefficients(torch.cumprod(hard_concrete_open(la), 0)) * getattr(self, f"cost_{i}")).sum()
                   for i, la in enumerate(self.gates))


def learned_counts(model: Transformer, calib_blocks: torch.Tensor, tables: list[HeadTable], total: int,
                   options: SearchOptions) -> tuple[list[int], dict]:
    """Per-table head counts from relaxed, trained counts (the DHA paper's search; METHOD.md part B).

    Relaxation (`RelaxedCounts`). A table (layer l, keys or values) with n source heads has the
    groupings G_1..G_n of step 1 and their mean-merge matrices M_c (`averaging_matrices`): the
    c-group model's weights are M_c @ heads(W). It gets n - 1 hard-concrete gates z_2..z_n
    (log-alpha parameters; Louizos et al. 2018, as in LLM-Shearing) and "head c is kept" variables
    u_c = z_2 * ... * z_c (cumulative, so counts are ordered: keeping c heads implies keeping c - 1),
    u_1 = 1. The layer's relaxed weights are

        W~ = (M_1 + sum_{c=2..n} u_c (M_c - M_{c-1})) @ heads(W)

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
    from .train import Hooks, TrainConfig, ramp, train

    relaxed = RelaxedCounts(model, tables, options.gate_init)
    multipliers = nn.Parameter(torch.zeros(2))  # lambda1, lambda2
    final = total / relaxed.source_heads
    warm = round(options.warmup * options.steps)

    def extra_loss(module: RelaxedCounts, step: int):
        target = ramp(step, 0, warm, 1.0, final) if warm > 0 else final
        expected = sum(module.expected_counts()) / module.source_heads
        fusion = module.fusion_loss()
        gap = expected - target
        lam = multipliers.to(gap.device)
        term = options.fusion_weight * fusion + lam[0] * gap + lam[1] * gap ** 2
        return term, {"fusion": float(fusion.detach()), "expected_fraction": float(expected.detach()), "target": target,
                      "lambda1": float(lam[0].detach()), "lambda2": float(lam[1].detach())}

    def param_groups(module: RelaxedCounts):
        return [{"params": list(module.gates), "lr": options.gate_lr, "weight_decay": 0.0},
                {"params": [multipliers], "lr": -options.multiplier_lr}]  # negative: gradient ascent

    rows = min(options.batch_size, calib_blocks.shape[0])
    width = calib_blocks.shape[1]
    cfg = TrainConfig(tokens=options.steps * rows * width, block_size=width, batch_tokens=rows * width, micro_batch=rows,
                      lr=options.gate_lr, min_lr_ratio=1.0, warmup_steps=0, grad_clip=0.0, dtype="float32",
                      eval_every=0, seed=options.seed, device=str(next(model.parameters()).device))
    was_training = model.training
    try:
        result = train(relaxed, calib_blocks, None, cfg, hooks=Hooks(extra_loss, param_groups), progress=options.progress)
    finally:
        model.train(was_training)
    with torch.no_grad():
        expected_counts = [float(e) for e in relaxed.expected_counts()]
    rounding = [[(c - e) ** 2 for c in range(1, len(t.costs) + 1)] for t, e in zip(tables, expected_counts)]
    counts = allocate(rounding, total)
    every = max(1, options.steps // 10)
    keep = ("step", "loss", "fusion", "expected_fraction", "target", "lambda1", "lambda2")
    history = [{k: (round(r[k], 5) if isinstance(r[k], float) else r[k]) for k in keep}
               for r in result.history if r["step"] % every == 0 or r["step"] in (1, result.steps)]
    return counts, {"expected_counts": [round(e, 4) for e in expected_counts], "history": history}


# ---- entry point ---------------------------------------------------------------------------------

def search(model: Transformer, kv_budget: float, calib_blocks: torch.Tensor, options: SearchOptions | None = None) -> Plan:
    """The DHA plan for `model` at `kv_budget`: groups and per-layer counts, exactly on budget.

    calib_blocks: (n_blocks, T) calibration token ids (train split). The plan's notes hold the
    settings, the cost table (relative cost per layer, kind and count) and, for the learned
    search, the expected counts and a training log. Deterministic for a given seed.
    """
    options = options or SearchOptions()
    if calib_blocks is None or calib_blocks.dim() != 2 or calib_blocks.numel() == 0:
        raise UserError("the DHA search needs calibration text: a non-empty (n_blocks, T) tensor of token ids")
    if calib_blocks.shape[1] < 2:
        raise UserError(f"the DHA search needs calibration blocks of at least 2 tokens, got {calib_blocks.shape[1]}")
    src_k, src_v = source_heads(model)
    total = total_heads_for_budget(src_k, src_v, kv_budget)
    tables = head_tables(model, calib_blocks, options)
    if not options.decoupled:
        tables = coupled_tables(model, tables)
    notes = {"search": options.search, "total_heads": total, "calibration_tokens": int(calib_blocks.numel()),
             "options": {k: v for k, v in asdict(options).items() if k != "progress"}}
    costs = [t.costs for t in tables]
    if options.sensitivity and options.search == "cost":  # the learned search uses the LM loss itself
        sens = sensitivities(model, calib_blocks, tables, options.batch_size)
        costs = weighted_costs(tables, sens)
        notes["sensitivity"] = _by_kind(tables, [round(s, 6) for s in sens])
    if options.search == "cost":
        counts = allocate_with(costs, total, options)
        notes["heads_kept"] = sum(counts)  # == total unless an ablation cannot meet it exactly
    else:
        counts, notes["learned"] = learned_counts(model, calib_blocks, tables, total, options)
    notes["costs"] = _by_kind(tables, [[float(f"{c:.6g}") for c in t.costs] for t in tables])
    notes["chosen_cost"] = float(f"{sum(c[n - 1] for c, n in zip(costs, counts)):.6g}")
    layers = []
    for l in range(len(src_k)):
        key_table, value_table = tables[2 * l], tables[2 * l + 1]
        layers.append(LayerPlan(key_table.groupings[counts[2 * l] - 1], value_table.groupings[counts[2 * l + 1] - 1]))
    plan = Plan(layers, src_k, src_v, method="dha", kv_budget=kv_budget, notes=notes)
    plan.validate(src_k, src_v)
    return plan


def _by_kind(tables: list[HeadTable], values: list) -> dict:
    """[per table] -> {"key": [per layer], "value": [per layer]}."""
    return {kind: [v for t, v in zip(tables, values) if t.kind == kind] for kind in KINDS}


# ---- report --------------------------------------------------------------------------------------

def plot_allocation(plan: Plan, path: str) -> None:
    """Bar chart of key and value heads kept per layer (source counts as outlines), written atomically."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(plan.layers)
    x = np.arange(L)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * L + 2), 3.5))
    ax.bar(x - 0.2, plan.source_key_heads, 0.4, fill=False, edgecolor="tab:blue", linewidth=0.8)
    ax.bar(x + 0.2, plan.source_value_heads, 0.4, fill=False, edgecolor="tab:orange", linewidth=0.8)
    ax.bar(x - 0.2, plan.key_heads(), 0.4, color="tab:blue", label="key heads")
    ax.bar(x + 0.2, plan.value_heads(), 0.4, color="tab:orange", label="value heads")
    ax.set_xlabel("layer")
    ax.set_ylabel("heads kept (outline: source)")
    ax.set_xticks(x if L <= 32 else x[::2])
    budget = f"{plan.kv_budget:g}" if plan.kv_budget is not None else "?"
    ax.set_title(f"{plan.method} plan: budget {budget}, kept {plan.kv_fraction():.3f} of the KV heads")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
