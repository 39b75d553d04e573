"""dha.serving: the layouts serving engines hold (equal groups, one grouping for keys and values per
layer), and the exact transform into one, padding by duplicated heads when asked.

The reference for the function is Hugging Face's own MHA LlamaForCausalLM holding group means
computed by hand (tests.test_export.group_mean_reference), fp32, atol 1e-5."""

from __future__ import annotations

import math
import random

import pytest
from torch.testing import assert_close

from dha.model import is_grouped
from dha.plan import LayerPlan, Plan
from dha.serving import layer_layout, layer_layout_problem, serving_layout_problem, to_serving
from dha.transforms import merge_groups
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf
from tests.test_export import group_mean_reference, logits


def converted(hf, key_groups, value_groups):
    plan = Plan([LayerPlan(k, v) for k, v in zip(key_groups, value_groups)], [6, 6], [6, 6], method="custom")
    return merge_groups(ours_from_hf(hf), plan).eval()


def test_problems_name_the_reason():
    assert layer_layout_problem([0, 1, 0, 1, 2, 2], [1, 0, 1, 0, 2, 2]) is None  # same grouping, other labels
    assert "decoupled" in layer_layout_problem([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1])
    assert "unequal" in layer_layout_problem([0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 2])
    hf = tiny_llama_hf()
    model = converted(
        hf, [[[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 3], [4, 5]]], [[[0, 1], [2, 3], [4, 5]], [[0, 1, 2], [3, 4, 5]]]
    )
    assert serving_layout_problem(model.config).startswith("layer 1: key heads and value heads are grouped differently")


@pytest.mark.parametrize("pad", [False, True])
def test_per_layer_counts_permuted_groups_are_exact(pad):
    """Non-contiguous equal groups, 3 heads in layer 0 and 2 in layer 1: no padding, logits unchanged."""
    hf = tiny_llama_hf(bias=True)
    groups = [[[0, 3], [1, 4], [2, 5]], [[1, 2, 5], [0, 3, 4]]]
    model = converted(hf, groups, groups)
    served, layouts = to_serving(model, pad=pad)
    assert [l.kv_heads for l in layouts] == [3, 2]
    for l, n in enumerate([3, 2]):
        assert served.config.key_index[l] == served.config.value_index[l] and is_grouped(served.config.key_index[l], n)
    ids = random_ids(3, 20, seed=1)
    assert_close(logits(served, ids), logits(group_mean_reference(hf, groups, groups), ids), atol=1e-5, rtol=0)


def test_decoupled_is_refused_then_padded_exactly():
    hf = tiny_llama_hf()
    key_groups = [[[0, 3], [1, 2, 5], [4]]] * 2  # uneven too
    value_groups = [[[0, 1], [2, 3, 4, 5]]] * 2
    model = converted(hf, key_groups, value_groups)
    with pytest.raises(ValueError, match="layer 0: key heads and value heads are grouped differently"):
        to_serving(model)
    served, layouts = to_serving(model, pad=True)
    # Pairs (key group, value group) read by query heads 0..5: {0}, {1}, {2}, {3}, {4}, {5} -> 6 heads (MHA).
    assert [l.kv_heads for l in layouts] == [6, 6]
    ids = random_ids(3, 20, seed=1)
    reference = group_mean_reference(hf, key_groups, value_groups)
    assert_close(logits(served, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_padding_uses_the_fewest_equal_groups():
    """Random maps: the padded layout has equal contiguous groups, each reading one (key, value) pair
    of the original, and n_kv = H / gcd(pair group sizes) heads (no equal-group layout has fewer)."""
    rng = random.Random(0)
    for _ in range(200):
        H = rng.choice([4, 6, 8, 12])
        keys = [rng.randrange(H) for _ in range(H)]
        values = [rng.randrange(H) for _ in range(H)]
        keys = [sorted(set(keys)).index(k) for k in keys]  # every head 0..max used
        values = [sorted(set(values)).index(v) for v in values]
        layout = layer_layout(keys, values, pad=True)
        pairs = {}
        for k, v in zip(keys, values):
            pairs[(k, v)] = pairs.get((k, v), 0) + 1
        assert layout.kv_heads == H // math.gcd(*pairs.values())
        assert sorted(layout.perm) == list(range(H))
        size = H // layout.kv_heads
        for j in range(layout.kv_heads):
            for h in layout.perm[j * size : (j + 1) * size]:
                assert (keys[h], values[h]) == (layout.key_source[j], layout.value_source[j])
        if layer_layout_problem(keys, values) is None:
            assert layout.kv_heads == max(keys) + 1 == max(values) + 1  # representable: nothing duplicated
