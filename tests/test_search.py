"""The DHA search: grouping and costs against brute-force, finite-difference and einsum references,
exact DP, exact budgets, and the exact recovery test (scattered identical heads are found and
merged losslessly).

All fp32 models on CPU; costs are float64. Tolerances are stated at each assert."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dha.budget import total_heads_for_budget
from dha.calibration import calibrate
from dha.errors import UserError
from dha.merge import group_merge
from dha.plan import LayerPlan, Plan, contiguous_groups
from dha.search import (
    SearchOptions,
    agglomerate,
    allocate,
    allocate_with,
    head_tables,
    search,
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
        w[dst * hd : (dst + 1) * hd] = w[src * hd : (src + 1) * hd]
    return build(model.config, sd)


# ---- grouping and costs -------------------------------------------------------------------------


def test_identical_heads_are_grouped_at_zero_cost():
    model = with_copied_heads(ours_from_hf(tiny_llama_hf()), 0, key_pair=(1, 4), value_pair=(2, 5))
    tables = head_tables(model, calibrate(model, random_ids(4, 16), gradients=True), sensitivity=True)
    key, value = tables[0], tables[1]  # layer 0
    assert (key.layer, key.kind, value.layer, value.kind) == (0, "key", 0, "value")
    # The 5-group grouping pairs the copies and leaves the rest alone; it costs nothing.
    assert as_sets(key.groupings[4]) == as_sets([[0], [1, 4], [2], [3], [5]])
    assert as_sets(value.groupings[4]) == as_sets([[0], [1], [2, 5], [3], [4]])
    for t in (key, value):
        assert t.costs[4] < 1e-9 and t.costs[5] < 1e-12 and abs(t.fisher[4]) < 1e-9 and t.fisher[5] < 1e-12
        assert t.costs[0] > 1e-3 and t.fisher[0] > 0  # merging different heads is not free
        assert all(len(g) == c + 1 for c, g in enumerate(t.groupings))


def test_agglomerate_merges_the_cheapest_union_first_against_brute_force():
    """A residual given as a table over every subset: the greedy order is the one a loop finds."""
    rng = np.random.default_rng(0)
    n = 5
    table = {
        tuple(c): float(rng.random()) * len(c) ** 2
        for k in range(2, n + 1)
        for c in itertools.combinations(range(n), k)
    }
    groupings = agglomerate(lambda members: table[tuple(members)], n)
    assert [len(g) for g in groupings] == list(range(1, n + 1))
    for c in range(n, 1, -1):  # from c groups to c - 1: the cheapest union of two of them
        cur, nxt = groupings[c - 1], groupings[c - 2]

        def res(g):
            return 0.0 if len(g) == 1 else table[tuple(sorted(g))]

        best = min(
            itertools.combinations(range(c), 2),
            key=lambda ab: res(cur[ab[0]] + cur[ab[1]]) - res(cur[ab[0]]) - res(cur[ab[1]]),
        )
        merged = sorted(cur[best[0]] + cur[best[1]])
        assert as_sets(nxt) == as_sets([g for i, g in enumerate(cur) if i not in best] + [merged])


def test_output_gradients_match_finite_differences():
    """calibrate's gradients (the layer-by-layer backward sweep): d(sum of token losses)/d(k_proj
    output of layer 1), as a directional derivative along a random direction, equals a central
    difference of the loss with that output nudged by a hook (float64 model; our RMSNorm computes
    in float32, hence eps 0.1 and rtol 1e-3)."""
    model = ours_from_hf(tiny_llama_hf()).double()
    ids = random_ids(2, 12)
    grads = calibrate(model, ids, batch_size=2, gradients=True, device="cpu").grads
    direction = torch.randn(2, 12, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss_with(delta):
        h = model.layers[1].attn.k_proj.register_forward_hook(lambda module, args, out: out + delta * direction)
        try:
            with torch.no_grad():
                logits = model(ids)
            return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        finally:
            h.remove()

    eps = 0.1
    reference = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    got = float((grads[1]["keys"] * direction.reshape(24, 6, 8)).sum())
    assert math.isclose(got, reference, rel_tol=1e-3)


def test_sensitivity_costs_are_the_fisher_estimate_of_each_merge():
    """The search's loss increases equal 1/2 sum_t (g_t . delta_t)^2 computed here by einsum from the
    heads' outputs, the gradients and the merge's own reconstruction (float64, rtol 1e-6)."""
    model = ours_from_hf(tiny_llama_hf())
    blocks = random_ids(4, 16)
    cal = calibrate(model, blocks, gradients=True)
    plan = search(model, 0.5, blocks, SearchOptions(), calibration=cal)
    assert sum(plan.key_heads()) + sum(plan.value_heads()) == 12
    groups = [list(range(6))]  # layer 1, values, all in one: v~ = sum_j v_j D_j; v_j ~ v~ B_j
    merge = group_merge(cal.stats[1], "value", groups[0])
    v, g = cal.acts[1]["values"].double(), cal.grads[1]["values"].double()
    shared = torch.einsum("tjd,jde->te", v, merge.down)
    rec = torch.einsum("te,jef->tjf", shared, merge.up)
    reference = 0.5 * float(torch.einsum("tjd,tjd->t", v - rec, g).pow(2).sum())
    assert math.isclose(plan.notes["loss_increase"]["value"][1][0], reference, rel_tol=1e-5)


# ---- allocation ----------------------------------------------------------------------------------


def test_allocate_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        sizes = rng.integers(1, 5, size=rng.integers(2, 6))
        costs = [sorted(rng.random(s).tolist(), reverse=True) if trial % 2 else rng.random(s).tolist() for s in sizes]
        for total in range(len(sizes), int(sizes.sum()) + 1):
            best = min(
                sum(c[n - 1] for c, n in zip(costs, combo))
                for combo in itertools.product(*[range(1, s + 1) for s in sizes])
                if sum(combo) == total
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
        brute = min(
            total_cost([m for m in combo for _ in range(2)])
            for combo in itertools.product(range(1, n + 1), repeat=L)
            if 2 * sum(combo) == 2 * (total // 2)
        )
        assert coupled[0::2] == coupled[1::2] and sum(coupled) == 2 * (total // 2)
        assert math.isclose(total_cost(coupled), brute, rel_tol=1e-12)


def test_coupled_search_shares_groups_and_learned_refuses_ablations():
    model = ours_from_hf(tiny_llama_hf())
    plan = search(model, 0.5, random_ids(4, 16), SearchOptions(decoupled=False))
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
        plan = search(model, budget, blocks, SearchOptions())
        plan.validate([6, 6], [6, 6])
        assert sum(plan.key_heads()) + sum(plan.value_heads()) == math.floor(budget * 24 + 1e-9)
        assert plan.kv_fraction() <= budget + 1e-9
    plan = search(model, 0.5, blocks, SearchOptions(search="learned", steps=4, progress=False))
    assert sum(plan.key_heads()) + sum(plan.value_heads()) == 12
    assert len(plan.notes["learned"]["expected_counts"]) == 4


def test_same_seed_gives_the_same_plan():
    model = ours_from_hf(tiny_llama_hf(num_heads=6, num_kv_heads=3))
    blocks = random_ids(4, 16)
    for options in (SearchOptions(), SearchOptions(metric="plain", search="learned", steps=4, progress=False)):
        first, second = search(model, 0.45, blocks, options), search(model, 0.45, blocks, options)
        assert first.to_dict() == second.to_dict()


def test_recovers_scattered_gqa_groups_exactly():
    """The exact test (docs/method.md, "The exact test"): a GQA model expanded to MHA with its query
    heads permuted holds scattered copies of each KV head. At budget = 2 KV heads of 6 the cost
    search finds them and the mean merge gives back the GQA model's logits (fp32, atol 1e-4 vs HF)."""
    hf, mha, truth = scattered_gqa()
    plan = search(mha, 2 / 6, random_ids(8, 32), SearchOptions())
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


def uneven_copies_model():
    """Our MHA tiny model whose layer 0 has ONE distinct key head and one value head (all six are
    copies), and layer 1 three of each (head j copies head j % 3): lossless at counts [1, 3]."""
    model = ours_from_hf(tiny_llama_hf())
    sd, hd = state_dict_of(model), model.config.head_dim
    for layer, source_of in ((0, lambda j: 0), (1, lambda j: j % 3)):
        for name in ("k_proj", "v_proj"):
            w = sd[f"layers.{layer}.attn.{name}.weight"]
            for j in range(6):
                w[j * hd : (j + 1) * hd] = w[source_of(j) * hd : (source_of(j) + 1) * hd].clone()
    return build(model.config, sd)


def test_learned_search_follows_uneven_redundancy():
    """The learned counts must come from the gates: at 8 of 24 heads, the only lossless allocation
    is 1 K + 1 V head in layer 0 and 3 + 3 in layer 1. Gates that never moved leave every expected
    count equal, and the final rounding then spreads the budget evenly ([2, 2], [2, 2])."""
    model = uneven_copies_model()
    options = SearchOptions(search="learned", steps=40, gate_lr=0.3, progress=False)
    plan = search(model, 8 / 24, random_ids(8, 32), options)
    assert plan.key_heads() == [1, 3] and plan.value_heads() == [1, 3]
    expected = plan.notes["learned"]["expected_counts"]  # key 0, value 0, key 1, value 1
    assert max(expected[0], expected[1]) < 1.5 and min(expected[2], expected[3]) > 2.5, expected
    truth = {frozenset({0, 3}), frozenset({1, 4}), frozenset({2, 5})}
    assert as_sets(plan.layers[1].key_groups) == truth and as_sets(plan.layers[1].value_groups) == truth
    # ... and the merged model is the source again (fp32, atol 1e-4): the copies merge exactly.
    ids = random_ids(2, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(merge_groups(model, plan)(ids), model(ids), rtol=0, atol=1e-4)


def test_learned_search_recovers_scattered_gqa_counts_and_groups():
    hf, mha, truth = scattered_gqa()
    options = SearchOptions(search="learned", steps=40, gate_lr=0.3, progress=False)
    plan = search(mha, 2 / 6, random_ids(8, 32), options)
    assert plan.key_heads() == [2, 2] and plan.value_heads() == [2, 2]
    for layer, groups in zip(plan.layers, truth):
        assert as_sets(layer.key_groups) == groups and as_sets(layer.value_groups) == groups
    history = plan.notes["learned"]["history"]
    assert history[-1]["expected_fraction"] < 0.4  # the relaxed counts really moved to the target (8/24)


# Hard-concrete constants (Louizos et al. 2018, as LLM-Shearing sets them), written here again.
BETA, LOW, HIGH = 2 / 3, -0.1, 1.1


def test_hard_concrete_gates_against_their_distribution():
    """Samples z = clamp(sigmoid((logit u + log alpha) / beta) (high - low) + low, 0, 1), u ~ U(0, 1):
    P(z <= x) = sigmoid(beta logit((x - low) / (high - low)) - log alpha) for x in [0, 1), which gives
    P(z = 0) at x = 0 and P(z != 0) = sigmoid(log alpha - beta log(-low / high)) (eq. 12). Monte
    Carlo, 200,000 draws per log alpha: standard error <= 0.0012, tolerance 0.006."""
    from dha.search import hard_concrete_mean, hard_concrete_open, hard_concrete_sample

    torch.manual_seed(0)
    for la in (-2.0, 0.0, 1.5):
        z = hard_concrete_sample(torch.full((200_000,), la))
        assert z.min() >= 0 and z.max() <= 1
        for x in (0.0, 0.3, 0.8):
            t = (x - LOW) / (HIGH - LOW)
            cdf = 1 / (1 + math.exp(-(BETA * math.log(t / (1 - t)) - la)))
            assert abs(float((z <= x).double().mean()) - cdf) < 0.006, (la, x)
        assert (
            abs(
                float((z == 1).double().mean())
                - (1 - 1 / (1 + math.exp(-(BETA * math.log((1 - LOW) / (HIGH - 1)) - la))))
            )
            < 0.006
        )
        p_open = 1 / (1 + math.exp(-(la - BETA * math.log(-LOW / HIGH))))
        assert math.isclose(float(hard_concrete_open(torch.tensor(la))), p_open, rel_tol=1e-6)
        assert abs(float((z != 0).double().mean()) - p_open) < 0.006
        mean = min(1.0, max(0.0, 1 / (1 + math.exp(-la)) * (HIGH - LOW) + LOW))  # the test-time gate
        assert math.isclose(float(hard_concrete_mean(torch.tensor(la))), mean, rel_tol=1e-6, abs_tol=1e-7)
    assert float(hard_concrete_mean(torch.tensor(5.0))) == 1.0 and float(hard_concrete_mean(torch.tensor(-5.0))) == 0.0


def test_count_coefficients_interpolate_the_c_group_models():
    """c_c = u_c - u_{c+1} with u_1 = 1, u_{n+1} = 0, so sum_c c_c W_c = W_1 + sum_{c>=2} u_c (W_c - W_{c-1})
    (written here as that sum, float64); u = (1, 1, 0, 0) picks W_2 exactly."""
    from dha.search import count_coefficients

    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # W_1..W_4
    kept = torch.tensor([0.9, 0.4, 0.25], dtype=torch.float64)  # u_2, u_3, u_4
    coeff = count_coefficients(kept)
    assert coeff.shape == (4,)
    reference = W[0] + sum(kept[c - 2] * (W[c - 1] - W[c - 2]) for c in range(2, 5))
    torch.testing.assert_close(torch.einsum("c,c...->...", coeff, W), reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(coeff, torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64), rtol=0, atol=1e-12)
    assert count_coefficients(torch.tensor([1.0, 0.0, 0.0])).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert count_coefficients(torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0, 1.0]


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
    plan = search(mha, 3 / 9, ids, SearchOptions())
    for l, (layer, perm) in enumerate(zip(plan.layers, perms)):
        truth = {frozenset(i for i in range(9) if perm[i] // 3 == k) for k in range(3)}
        assert as_sets(layer.key_groups) == truth, l
        assert as_sets(layer.value_groups) == truth, l
    # Merged back to 3 K/V heads per layer, it is the original model again (fp32, 30 layers: atol 1e-3).
    with torch.no_grad():
        torch.testing.assert_close(merge_groups(mha, plan)(ids[:1, :32]), model(ids[:1, :32]), rtol=0, atol=1e-3)


def test_serving_layout_plans_are_held_by_serving_engines_and_meet_the_budget():
    """--layout serving: every layer one grouping for K and V in equal groups (the merged model passes
    dha.serving's check, written against llama.cpp's deci layout), never over the budget, and as many
    heads as equal groups allow (6 heads: counts 1, 2, 3, 6)."""
    from dha.merge import aligned_merge, closed_form_merges
    from dha.serving import serving_layout_problem

    model = ours_from_hf(tiny_llama_hf(layers=3))  # 3 layers x (6 K + 6 V)
    blocks = random_ids(4, 16)
    cal = calibrate(model, blocks, gradients=True)
    # 0.25: 9 heads, 4 per kind: 1+1+2 | 0.3: 10 -> 5 = 1+2+2 | 0.4: 14 -> 7 = 1+3+3 or 2+2+3 |
    # 7/36: 7 -> 3 = 1+1+1 | 0.6: 21 -> 10 = 2+2+6 or ... (an odd remainder cannot always be met)
    for budget, kept in ((7 / 36, 6), (0.25, 8), (0.3, 10), (0.4, 14), (0.5, 18), (0.6, 20), (1.0, 36)):
        plan = search(model, budget, blocks, SearchOptions(layout="serving"), calibration=cal)
        assert sum(plan.key_heads()) + sum(plan.value_heads()) == kept, budget
        assert plan.kv_fraction() <= budget + 1e-9
        for layer in plan.layers:
            assert layer.key_groups == layer.value_groups and len({len(g) for g in layer.key_groups}) == 1
        merged = aligned_merge(model, plan.layers, closed_form_merges(cal.stats, plan.layers))
        assert serving_layout_problem(merged.config) is None
    with pytest.raises(UserError):
        SearchOptions(layout="serving", search="learned")


def test_protected_heads_stay_unmerged_and_the_budget_still_holds():
    """In the scattered-GQA model the cheapest plan at 2 of 6 merges every key head with its copies.
    Protecting layer 0's key head 0 keeps it a head of its own; the plan still keeps exactly the
    budget's heads (the protected head's cost is paid elsewhere); a budget too small is refused."""
    _, mha, truth = scattered_gqa()
    calib = random_ids(8, 32)
    plain = search(mha, 2 / 6, calib, SearchOptions())
    assert not any(g == [0] for g in plain.layers[0].key_groups)  # the test can fail: unprotected, head 0 merges
    protected = search(mha, 0.5, calib, SearchOptions(protect=[(0, "key", 0)]))
    assert [0] in protected.layers[0].key_groups
    assert sum(protected.key_heads()) + sum(protected.value_heads()) == total_heads_for_budget([6, 6], [6, 6], 0.5)
    every = [(l, "key", h) for l in range(2) for h in range(6)]
    with pytest.raises(UserError, match="too few to keep the 12 protected heads"):
        search(mha, 0.5, calib, SearchOptions(protect=every))


def test_retrieval_key_heads_rank_key_heads_by_their_query_heads_mass():
    """A key head's retrieval mass is the sum over the query heads that read it (GQA: 3 each)."""
    from dha.longctx import retrieval_key_heads

    model = ours_from_hf(tiny_llama_hf(num_heads=6, num_kv_heads=2))  # query head h reads key head h // 3
    mass = torch.zeros(2, 6, dtype=torch.float64)
    mass[1, 3:] = torch.tensor([0.2, 0.2, 0.2])  # layer 1, key head 1: 0.6 in all
    mass[0, 0] = 0.5  # layer 0, key head 0: 0.5
    mass[1, 0] = 0.1
    assert retrieval_key_heads(model, mass, 2) == [(1, 1), (0, 0)]
