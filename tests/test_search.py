"""The DHA search: costs against loop/least-squares references, exact DP, exact budgets, and the
exact recovery test of METHOD.md part D (scattered identical heads are found and merged losslessly).

All fp32 models on CPU; costs are float64. Tolerances are stated at each assert."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dha.analyze import collect_heads
from dha.errors import UserError
from dha.plan import LayerPlan, Plan, contiguous_groups
from dha.search import (
    SearchOptions, allocate, allocate_with, group_cost, grouping_cost, head_tables, key_logit_quadratic, output_quadratic,
    plot_allocation, sample_pairs, search, total_heads_for_budget,
)
from dha.transforms import build, expand_to_mha, merge_groups, permute_query_heads, state_dict_of
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf

PERMS = [[0, 3, 1, 4, 2, 5], [5, 1, 3, 0, 2, 4]]  # scatter the two 3-head GQA groups of each layer


def scattered_gqa():
    """(hf GQA model: 6 query heads, 2 KV heads; our equivalent MHA model with query heads permuted
    before expansion, so the copies of each KV head are scattered; the true groups per layer)."""
    hf = tiny_llama_hf(num_heads=6, num_kv_heads=2)
    mha = expand_to_mha(permute_query_heads(ours_from_hf(hf), PERMS))
    # New head i copies source KV head (perm[i] // 3): the source map is h // 3 for query head h.
    truth = [{frozenset(i for i in range(6) if perm[i] // 3 == g) for g in range(2)} for perm in PERMS]
    return hf, mha, truth


def as_sets(groups):
    return {frozenset(g) for g in groups}


def with_copied_heads(model, layer, key_pair, value_pair):
    """Our model with key head key_pair[1] := key head key_pair[0] (weights), and the same for values."""
    sd, hd = state_dict_of(model), model.config.head_dim
    for name, (src, dst) in (("k_proj", key_pair), ("v_proj", value_pair)):
        w = sd[f"layers.{layer}.attn.{name}.weight"]
        w[dst * hd:(dst + 1) * hd] = w[src * hd:(src + 1) * hd]
    return build(model.config, sd)


# ---- costs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_cost", ["logit", "output"])
def test_identical_heads_are_grouped_at_zero_cost(key_cost):
    model = with_copied_heads(ours_from_hf(tiny_llama_hf()), 0, key_pair=(1, 4), value_pair=(2, 5))
    tables = head_tables(model, random_ids(4, 16), SearchOptions(key_cost=key_cost, key_pairs=2048))
    key, value = tables[0], tables[1]  # layer 0
    assert (key.layer, key.kind, value.layer, value.kind) == (0, "key", 0, "value")
    # The 5-group clustering pairs the copies and leaves the rest alone; it costs nothing.
    assert as_sets(key.groupings[4]) == as_sets([[0], [1, 4], [2], [3], [5]])
    assert as_sets(value.groupings[4]) == as_sets([[0], [1], [2, 5], [3], [4]])
    energy_k = float(torch.diagonal(key.quadratic, dim1=1, dim2=2).diagonal().sum())
    assert group_cost(key.quadratic, [1, 4])[0] / energy_k < 1e-10
    assert key.costs[4] < 1e-10 and value.costs[4] < 1e-10  # relative (float64 round-off only)
    # A pair of different random heads is far from free.
    assert group_cost(key.quadratic, [0, 1])[0] / energy_k > 1e-3
    assert value.costs[3] > 1e-3 and key.costs[3] > 1e-3
    assert key.costs[5] == 0.0 and value.costs[5] == 0.0  # every head alone


def test_value_cost_is_the_scatter_around_the_group_mean():
    """Reference: loops over groups, sum_m ||v_m - mean_S v||^2 / sum_m ||v_m||^2 (float64)."""
    model = ours_from_hf(tiny_llama_hf())
    values = collect_heads(model, random_ids(2, 16))[1]["values"].double()  # (N, 6, hd)
    A = output_quadratic(values)
    groups = [[0, 3, 5], [1, 2], [4]]
    scatter = 0.0
    for g in groups:
        mean = values[:, g].mean(1, keepdim=True)
        scatter += float(((values[:, g] - mean) ** 2).sum())
    reference = scatter / float((values ** 2).sum())
    torch.testing.assert_close(grouping_cost(A, groups), reference, rtol=1e-9, atol=1e-12)
    # The best shared head of a value group is the mean: weights 1/|S| (float64, atol 1e-8).
    _, w = group_cost(A, [0, 3, 5])
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-8)


def rope_reference(x, positions, theta=10000.0):
    """Rotate-half RoPE as a complex product: (x_i + i x_{i+hd/2}) * exp(i pos theta^(-2i/hd))."""
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:])
    return z * torch.polar(torch.ones_like(freqs), positions[:, None] * freqs)


def test_key_logit_cost_matches_least_squares_on_explicit_logits():
    """Reference: for each member m and each query head h reading it, the residual of the least
    squares fit sum_j w_j logit(q_h, k_j) ~ logit(q_h, k_m) over the sampled pairs (numpy lstsq)."""
    torch.manual_seed(0)
    model = ours_from_hf(tiny_llama_hf())  # only its RoPE (theta 1e4, head dim 8) is used
    nb, T, H, n, hd = 2, 5, 4, 3, 8
    queries = torch.randn(nb * T, H, hd, dtype=torch.float64)
    keys = torch.randn(nb * T, n, hd, dtype=torch.float64)
    keys[:, 2] = 0.7 * keys[:, 0] + 0.2 * torch.randn(nb * T, hd, dtype=torch.float64)
    key_index = [0, 1, 2, 2]  # query head -> key head (key 2 is read twice)
    pairs = sample_pairs(nb, T, 40, torch.Generator().manual_seed(1))
    A = key_logit_quadratic(queries.float(), keys.float(), key_index, model, T, pairs)

    def logit(h, j, p):
        b, i, k = (int(v) for v in pairs[p])
        zq = rope_reference(queries.float().double()[b * T + i, h][None], torch.tensor([float(i)], dtype=torch.float64))
        zk = rope_reference(keys.float().double()[b * T + k, j][None], torch.tensor([float(k)], dtype=torch.float64))
        return float((zq * zk.conj()).real.sum())

    members = [0, 2]
    rows, target = [], []
    for m in members:
        for h in [h for h in range(H) if key_index[h] == m]:
            for p in range(len(pairs)):
                rows.append([logit(h, j, p) for j in members])
                target.append(logit(h, m, p))
    rows, target = np.array(rows), np.array(target)
    w_ref, *_ = np.linalg.lstsq(rows, target, rcond=None)
    cost_ref = float(((rows @ w_ref - target) ** 2).sum())
    cost, w = group_cost(A, members)
    torch.testing.assert_close(cost, cost_ref, rtol=1e-4, atol=1e-6)  # fp32 RoPE inside the code
    torch.testing.assert_close(w, torch.from_numpy(w_ref), rtol=1e-4, atol=1e-5)
    # Normaliser: the logit energy of every query head against its own key.
    energy = sum(logit(h, key_index[h], p) ** 2 for h in range(H) for p in range(len(pairs)))
    torch.testing.assert_close(grouping_cost(A, [members, [1]]), cost_ref / energy, rtol=1e-4, atol=1e-8)


# ---- allocation ----------------------------------------------------------------------------------

def test_allocate_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        sizes = rng.integers(1, 5, size=rng.integers(2, 6))
        costs = [sorted(rng.random(s).tolist(), reverse=True) if trial % 2 else rng.random(s).tolist() for s in sizes]
        for total in range(len(sizes), int(sizes.sum()) + 1):
            best = min(
                sum(c[n - 1] for c, n in zip(costs, combo))
                for combo in itertools.product(*[range(1, s + 1) for s in sizes]) if sum(combo) == total
            )
            counts = allocate(costs, total)
            assert sum(counts) == total
            assert all(1 <= n <= s for n, s in zip(counts, sizes))
            assert math.isclose(sum(c[n - 1] for c, n in zip(costs, counts)), best, rel_tol=1e-12, abs_tol=1e-12)


def test_ablation_allocations_against_brute_force():
    """uniform: the same (nK, nV) in every layer, least cost among the pairs keeping the most heads
    within the total; coupled: nK == nV per layer, optimal by brute force over the layers."""
    rng = np.random.default_rng(1)
    L, n = 3, 4
    costs = [sorted(rng.random(n).tolist(), reverse=True) for _ in range(2 * L)]  # key, value, key, value, ...

    def total_cost(counts):
        return sum(c[k - 1] for c, k in zip(costs, counts))

    for total in range(2 * L, 2 * L * n + 1):
        pairs = [(k, v) for k in range(1, n + 1) for v in range(1, n + 1) if L * (k + v) <= total]
        most = max(k + v for k, v in pairs)
        best = min(total_cost([k, v] * L) for k, v in pairs if k + v == most)
        counts = allocate_with(costs, total, SearchOptions(allocation="uniform"))
        assert counts[0::2] == [counts[0]] * L and counts[1::2] == [counts[1]] * L
        assert sum(counts) == L * most and math.isclose(total_cost(counts), best, rel_tol=1e-12)

        coupled = allocate_with(costs, total, SearchOptions(decoupled=False))
        brute = min(total_cost([m for m in combo for _ in range(2)])
                    for combo in itertools.product(range(1, n + 1), repeat=L) if 2 * sum(combo) == 2 * (total // 2))
        assert coupled[0::2] == coupled[1::2] and sum(coupled) == 2 * (total // 2)
        assert math.isclose(total_cost(coupled), brute, rel_tol=1e-12)


def test_coupled_search_shares_groups_and_learned_refuses_ablations():
    model = ours_from_hf(tiny_llama_hf())
    plan = search(model, 0.5, random_ids(4, 16), SearchOptions(key_pairs=256, decoupled=False))
    for layer in plan.layers:
        assert as_sets(layer.key_groups) == as_sets(layer.value_groups)
    assert sum(plan.key_heads()) + sum(plan.value_heads()) == 12
    with pytest.raises(UserError):
        SearchOptions(search="learned", allocation="uniform")
    with pytest.raises(UserError):
        SearchOptions(allocation="flat")


def test_budgets_out_of_reach_raise_user_error():
    model = ours_from_hf(tiny_llama_hf())  # 2 layers x (6 K + 6 V) = 24 heads; at least 4 kept
    for bad in (0.1, 4 / 24 - 0.01, 0.0, 1.5, float("nan")):
        with pytest.raises(UserError):
            search(model, bad, random_ids(2, 8))
    with pytest.raises(UserError):
        allocate([[1.0, 0.0], [1.0, 0.0]], 5)
    with pytest.raises(UserError):
        search(model, 0.5, None)
    assert total_heads_for_budget([6, 6], [6, 6], 4 / 24) == 4


# ---- the search ----------------------------------------------------------------------------------

def test_plans_meet_the_budget_exactly():
    model = ours_from_hf(tiny_llama_hf())
    blocks = random_ids(4, 16)
    for budget in (4 / 24, 0.35, 0.77, 1.0):
        plan = search(model, budget, blocks, SearchOptions(key_pairs=256))
        plan.validate([6, 6], [6, 6])
        assert sum(plan.key_heads()) + sum(plan.value_heads()) == math.floor(budget * 24 + 1e-9)
        assert plan.kv_fraction() <= budget + 1e-9
    plan = search(model, 0.5, blocks, SearchOptions(search="learned", steps=4, progress=False))
    assert sum(plan.key_heads()) + sum(plan.value_heads()) == 12
    assert len(plan.notes["learned"]["expected_counts"]) == 4


def test_same_seed_gives_the_same_plan():
    model = ours_from_hf(tiny_llama_hf(num_heads=6, num_kv_heads=3))
    blocks = random_ids(4, 16)
    for options in (SearchOptions(key_pairs=256), SearchOptions(metric="cka", search="learned", steps=4, progress=False)):
        first, second = search(model, 0.45, blocks, options), search(model, 0.45, blocks, options)
        assert first.to_dict() == second.to_dict()


def test_recovers_scattered_gqa_groups_exactly():
    """METHOD.md part D: at budget = 2 KV heads of 6, the cost search finds the scattered copies and
    the mean merge gives back the original GQA model's logits (fp32, atol 1e-4 against HF)."""
    hf, mha, truth = scattered_gqa()
    plan = search(mha, 2 / 6, random_ids(8, 32), SearchOptions(key_pairs=2048))
    for layer, groups in zip(plan.layers, truth):
        assert as_sets(layer.key_groups) == groups
        assert as_sets(layer.value_groups) == groups
    ids = random_ids(2, 24, seed=3)
    with torch.no_grad():
        reference = hf(ids).logits
        merged = merge_groups(mha, plan)
        torch.testing.assert_close(merged(ids), reference, rtol=0, atol=1e-4)
        # Contiguous mean-pooling of the same scattered model does not (the test can fail).
        contiguous = [LayerPlan(contiguous_groups(6, 2), contiguous_groups(6, 2)) for _ in range(2)]
        gqa = merge_groups(mha, Plan(contiguous, [6, 6], [6, 6]))
        assert (gqa(ids) - reference).abs().max() > 1e-2
    assert merged.config.key_heads(0) == 2 and merged.config.value_heads(1) == 2


def test_learned_search_recovers_scattered_gqa_counts_and_groups():
    hf, mha, truth = scattered_gqa()
    options = SearchOptions(search="learned", steps=40, gate_lr=0.3, key_pairs=2048, progress=False)
    plan = search(mha, 2 / 6, random_ids(8, 32), options)
    assert plan.key_heads() == [2, 2] and plan.value_heads() == [2, 2]
    for layer, groups in zip(plan.layers, truth):
        assert as_sets(layer.key_groups) == groups and as_sets(layer.value_groups) == groups
    history = plan.notes["learned"]["history"]
    assert history[-1]["expected_fraction"] < 0.4  # the relaxed counts really moved to the target (8/24)


def test_sensitivity_is_the_loss_increase_of_merging_one_layer():
    """Reference: replace every key head of layer 1 by their mean (same function as one shared head)
    and take the cross-entropy by hand; compare with the search's measured sensitivity."""
    model = ours_from_hf(tiny_llama_hf())
    blocks = random_ids(4, 16)
    plan = search(model, 0.5, blocks, SearchOptions(sensitivity=True, key_pairs=256))

    def nll(m):
        with torch.no_grad():
            logits = m(blocks)[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)))

    sd, hd = state_dict_of(model), model.config.head_dim
    w = sd["layers.1.attn.k_proj.weight"].view(6, hd, -1)
    sd["layers.1.attn.k_proj.weight"] = w.mean(0, keepdim=True).expand_as(w).reshape(6 * hd, -1).clone()
    reference = nll(build(model.config, sd)) - nll(model)
    torch.testing.assert_close(plan.notes["sensitivity"]["key"][1], reference, rtol=1e-3, atol=2e-6)
    assert sum(plan.key_heads()) + sum(plan.value_heads()) == 12


def test_plot_allocation_writes_a_png(tmp_path):
    plan = Plan([LayerPlan([[0, 1], [2]], [[0, 1, 2]]), LayerPlan([[0], [1], [2]], [[0], [1, 2]])], [3, 3], [3, 3], "dha", 0.5)
    path = tmp_path / "allocation.png"
    plot_allocation(plan, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["allocation.png"]  # no temp file left behind


@pytest.mark.slow
def test_smollm2_scattered_heads_are_found_at_three_of_nine():
    """Real SmolLM2-135M (3 KV heads), query heads permuted per layer then expanded to 9 K/V heads:
    at budget 3/9 the cost search must return exactly the 3 copies of each KV head."""
    from dha.checkpoint import load

    model = load(None, tokenizer=False).model
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(9, generator=g).tolist() for _ in range(model.config.num_layers)]
    mha = expand_to_mha(permute_query_heads(model, perms))
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
    plan = search(mha, 3 / 9, ids, SearchOptions(key_pairs=4096))
    for l, (layer, perm) in enumerate(zip(plan.layers, perms)):
        truth = {frozenset(i for i in range(9) if perm[i] // 3 == k) for k in range(3)}
        assert as_sets(layer.key_groups) == truth, l
        assert as_sets(layer.value_groups) == truth, l
    # Merged back to 3 K/V heads per layer, it is the original model again (fp32, 30 layers: atol 1e-3).
    with torch.no_grad():
        torch.testing.assert_close(merge_groups(mha, plan)(ids[:1, :32]), model(ids[:1, :32]), rtol=0, atol=1e-3)
