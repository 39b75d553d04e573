"""The closed-form aligned merges (dha.merge, from dha.calibration's statistics) against references
written here with einsum.

Tiny random LLaMA models (6 heads, head dim 8, RoPE on all dims), fp32 models, float64 references.
Cases are built so that the claims can fail: rotated copies that the mean merge cannot merge, and
query energies or W_O columns that make the weighted and the plain forms differ.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from dha.analyze import collect_heads
from dha.calibration import calibrate, free_pairs_for, key_layout, layer_stats
from dha.errors import UserError
from dha.merge import aligned_merge, closed_form_merges, group_merge, mean_merge, reconstructed_outputs
from dha.plan import LayerPlan
from dha.transforms import build, heads, merge_groups, state_dict_of, unheads
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf

HD, R = 8, 8  # head dim; rotary dims (all of them)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE written out: x (..., T, hd), pairs (i, i + hd/2) rotated by p * theta^(-2i/hd)."""
    inv = theta ** (-torch.arange(0, HD, 2, dtype=torch.float64) / HD)
    ang = positions[:, None].double() * inv[None]  # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def attention_reference(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """One layer's attention output on its normed input x (T, D), by einsum, float64, causal."""
    attn, cfg = model.layers[layer].attn, model.config
    T = x.shape[0]
    x = x.double()
    q = (x @ attn.q_proj.weight.double().T).view(T, cfg.num_heads, HD).transpose(0, 1)  # (H, T, hd)
    k = (x @ attn.k_proj.weight.double().T).view(T, -1, HD).transpose(0, 1)
    v = (x @ attn.v_proj.weight.double().T).view(T, -1, HD).transpose(0, 1)
    pos = torch.arange(T)
    q, k = rope_reference(q, pos), rope_reference(k, pos)
    k, v = k[cfg.key_index[layer]], v[cfg.value_index[layer]]  # (H, T, hd)
    s = torch.einsum("hsd,htd->hst", q, k) / math.sqrt(HD)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = torch.einsum("hst,htd->shd", s.softmax(-1), v).reshape(T, -1)
    return y @ attn.o_proj.weight.double().T


def pair_rotation(angles: torch.Tensor) -> torch.Tensor:
    """(hd, hd) map multiplying each rotary pair (i, i + hd/2) by e^{i angle_i}: commutes with RoPE."""
    m = torch.zeros(HD, HD, dtype=torch.float64)
    h = HD // 2
    for i, a in enumerate(angles.tolist()):
        m[i, i], m[i, i + h], m[i + h, i], m[i + h, i + h] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
    return m


def rotated_copies_model():
    """Layer 0 of a tiny MHA model where key heads 1, 2 are per-pair rotations of key head 0 (their
    readers' W_Q rotated the same way, so the function is that of one shared key), and value heads
    1, 2 are orthogonal maps of value head 0 (their W_O columns mapped back)."""
    model = ours_from_hf(tiny_llama_hf())
    sd = state_dict_of(model)
    g = torch.Generator().manual_seed(3)
    pre = "layers.0.attn"
    k, q = heads(sd[f"{pre}.k_proj.weight"], HD).double(), heads(sd[f"{pre}.q_proj.weight"], HD).double()
    v = heads(sd[f"{pre}.v_proj.weight"], HD).double()
    o = heads(sd[f"{pre}.o_proj.weight"].double().T, HD)  # (H, hd, D): W_O[h]
    for j in (1, 2):
        rot = pair_rotation(torch.rand(HD // 2, generator=g, dtype=torch.float64) * 2 * math.pi)
        k[j], q[j] = rot @ k[0], rot @ q[j]  # q_j . k_j = (rot q_j) . (rot k_0) = q_j . k_0 after RoPE too
        orth, _ = torch.linalg.qr(torch.randn(HD, HD, generator=g, dtype=torch.float64))
        v[j], o[j] = orth @ v[0], orth @ o[j]  # v_j = v_0 orth^T in row form; W_O[j] -> orth W_O[j]
    sd[f"{pre}.k_proj.weight"], sd[f"{pre}.q_proj.weight"] = unheads(k).float(), unheads(q).float()
    sd[f"{pre}.v_proj.weight"] = unheads(v).float()
    sd[f"{pre}.o_proj.weight"] = unheads(o).T.contiguous().float()
    return build(model.config, sd)


def normed_input(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    seen = {}
    h = model.layers[layer].attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen["x"][0]  # (T, D)


def test_aligned_merge_of_rotated_copies_is_exact_and_the_mean_is_not():
    model = rotated_copies_model()
    plan = [
        LayerPlan([[0, 1, 2], [3], [4], [5]], [[0, 1, 2], [3], [4], [5]]),
        LayerPlan([[j] for j in range(6)], [[j] for j in range(6)]),
    ]
    calib = calibrate(model, random_ids(4, 16, seed=1))
    merged = aligned_merge(model, plan, closed_form_merges(calib.stats, plan))
    from dha.plan import Plan

    mean = merge_groups(model, Plan(plan, [6, 6], [6, 6]))
    x = normed_input(model, 0, random_ids(1, 12, seed=2))
    reference = attention_reference(model, 0, x)
    assert_close(attention_reference(merged, 0, x), reference, atol=1e-5, rtol=0)
    assert (attention_reference(mean, 0, x) - reference).abs().max() > 1e-2
    assert merged.config.key_heads(0) == 4 and merged.config.value_heads(0) == 4
    ids = random_ids(2, 12, seed=4)
    with torch.no_grad():  # and the whole model, through our own attention paths
        assert_close(merged(ids), model(ids), atol=1e-4, rtol=0)


def test_mean_merge_written_as_maps_is_the_mean():
    rows = torch.randn(3, HD, 5, dtype=torch.float64)
    for kind in ("key", "value"):
        merge = mean_merge(kind, 3, HD, R)
        rec = reconstructed_outputs(rows.permute(2, 0, 1), kind, [[0, 1, 2]], [merge])  # (N=5, 3, hd)
        assert_close(rec, rows.mean(0).T[:, None].expand(5, 3, HD), atol=1e-12, rtol=0)


def logit_error(q: torch.Tensor, k: torch.Tensor, k_rec: torch.Tensor, key_index, pairs=200) -> float:
    """sum over query heads h and random (query, key) token pairs of (q_h . R(dt) (k - k_rec)_{key(h)})^2."""
    g = torch.Generator().manual_seed(0)
    N = q.shape[0]
    s, t = torch.randint(N, (pairs,), generator=g), torch.randint(N, (pairs,), generator=g)
    dt = (s - t).double()
    err = 0.0
    for h, j in enumerate(key_index):
        qr = rope_reference(q[s, h][None], dt)[0]  # relative rotation applied to the query side
        err += float(torch.einsum("pd,pd->p", qr, (k - k_rec)[t, j]).pow(2).sum())
    return err


def test_query_weighted_keys_have_lower_logit_error_than_plain_pca():
    """Queries that read head 0 carry 100x the energy of the others on the first pairs: weighting by
    query energy must spend the shared key on them, plain PCA does not know."""
    model = ours_from_hf(tiny_llama_hf())
    acts = dict(collect_heads(model, random_ids(8, 32, seed=5))[0])
    q = acts["queries"].clone()
    q[:, 0, :2] *= 10.0
    q[:, 0, HD // 2 : HD // 2 + 2] *= 10.0
    acts["queries"] = q
    group = [0, 1, 2]
    errors = {}
    for metric in ("plain", "weighted"):
        stats = layer_stats(model, 0, acts, metric)
        merge = group_merge(stats, "key", group)
        k = acts["keys"].double()
        rec = k.clone()
        rec[:, group] = reconstructed_outputs(k[:, group], "key", [[0, 1, 2]], [merge])
        errors[metric] = logit_error(q.double(), k, rec, model.config.key_index[0])
    assert errors["weighted"] < 0.8 * errors["plain"], errors


def test_w_o_metric_values_have_lower_output_error_than_plain_pca():
    """W_O's columns of the readers of head 0 scaled 10x: the output-error metric must favour head 0."""
    model = ours_from_hf(tiny_llama_hf())
    with torch.no_grad():
        model.layers[0].attn.o_proj.weight[:, :HD] *= 10.0
    acts = collect_heads(model, random_ids(8, 32, seed=6))[0]
    o = heads(model.layers[0].attn.o_proj.weight.detach().double().T, HD)  # (H, hd, D)
    v = acts["values"].double()
    errors = {}
    for metric in ("plain", "weighted"):
        merge = group_merge(layer_stats(model, 0, acts, metric), "value", [0, 1, 2])
        rec = reconstructed_outputs(v[:, :3], "value", [[0, 1, 2]], [merge])
        errors[metric] = sum(float(torch.einsum("td,de->te", v[:, j] - rec[:, j], o[j]).pow(2).sum()) for j in range(3))
    assert errors["weighted"] < 0.8 * errors["plain"], errors


def free_block_copies_model(free: int):
    """Layer 0 of a tiny MHA model whose last `free` RoPE pairs do not turn (frequency 0), and where
    key heads 1, 2 are key head 0 through per-pair rotations on the turning pairs and through any
    invertible map mixing the still pairs (their readers' W_Q mapped back by its inverse transpose):
    one shared key serves the three heads, but only a merge that mixes pairs can find it."""
    base = ours_from_hf(tiny_llama_hf())
    inv = [10000.0 ** (-i / (HD // 2)) for i in range(HD // 2 - free)] + [0.0] * free
    model = build(replace(base.config, rope_inv_freq=inv), state_dict_of(base))
    sd = state_dict_of(model)
    g = torch.Generator().manual_seed(5)
    pre = "layers.0.attn"
    k, q = heads(sd[f"{pre}.k_proj.weight"], HD).double(), heads(sd[f"{pre}.q_proj.weight"], HD).double()
    still = key_layout(HD, R, free)[R - 2 * free :]  # the dims of the still pairs
    for j in (1, 2):
        m = pair_rotation(torch.rand(HD // 2, generator=g, dtype=torch.float64) * 2 * math.pi)
        m[still[:, None], still] = torch.randn(2 * free, 2 * free, generator=g, dtype=torch.float64) + 2 * torch.eye(
            2 * free
        )
        k[j], q[j] = m @ k[0], torch.linalg.inv(m).T @ q[j]  # (m^-T q) . (m k) = q . k, and m commutes with this RoPE
    q = q * 8  # sharp attention, so a wrong key shows in the output (random tiny weights attend near uniformly)
    sd[f"{pre}.k_proj.weight"], sd[f"{pre}.q_proj.weight"] = unheads(k).float(), unheads(q).float()
    return build(model.config, sd)


def attention_output(model, ids: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention output on `ids`, through the model's own forward (its RoPE frequencies)."""
    seen = {}
    h = model.layers[0].attn.register_forward_hook(lambda m, args, out: seen.__setitem__("y", out.detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen["y"]


def test_position_free_pairs_merge_a_mixed_block_exactly_and_exact_pairs_cannot():
    free = 2
    model = free_block_copies_model(free)
    keys_only = [
        LayerPlan([[0, 1, 2], [3], [4], [5]], [[j] for j in range(6)]),
        LayerPlan([[j] for j in range(6)], [[j] for j in range(6)]),
    ]
    ids, calib_ids = random_ids(2, 12, seed=6), random_ids(4, 16, seed=1)
    reference = attention_output(model, ids)
    errors = {}
    for n in (free, 0):
        calib = calibrate(model, calib_ids, free_pairs=n)
        merged = aligned_merge(model, keys_only, closed_form_merges(calib.stats, keys_only))
        assert merged.config.key_heads(0) == 4
        errors[n] = (
            (attention_output(merged, ids) - reference).norm() / reference.norm()
        ).item()  # relative, fp32 model
    assert errors[free] < 1e-5, errors  # exact up to fp32
    assert errors[0] > 1e-2, errors


def test_key_groups_that_exact_maps_fit_keep_them_under_position_free_pairs():
    """Key heads 1, 2 of layer 0 are head 0 through per-pair rotations on every pair, and every pair
    turns fast: exact maps merge them with no error, so they win the tie with the position-free block
    (which fits them too, but by a map that does not commute with RoPE) and the merge stays exact."""
    base = ours_from_hf(tiny_llama_hf())
    model = build(replace(base.config, rope_inv_freq=[1.0, 0.5, 0.3, 0.2]), state_dict_of(base))
    sd, g = state_dict_of(model), torch.Generator().manual_seed(7)
    k, q = heads(sd["layers.0.attn.k_proj.weight"], HD).double(), heads(sd["layers.0.attn.q_proj.weight"], HD).double()
    for j in (1, 2):
        m = pair_rotation(torch.rand(HD // 2, generator=g, dtype=torch.float64) * 2 * math.pi)
        k[j], q[j] = m @ k[0], m @ q[j]  # an orthogonal m that commutes with RoPE: (m q) . (m k) = q . k
    sd["layers.0.attn.k_proj.weight"], sd["layers.0.attn.q_proj.weight"] = unheads(k).float(), unheads(q * 8).float()
    model = build(model.config, sd)
    keys_only = [
        LayerPlan([[0, 1, 2], [3], [4], [5]], [[j] for j in range(6)]),
        LayerPlan([[j] for j in range(6)], [[j] for j in range(6)]),
    ]
    ids = random_ids(2, 24, seed=6)
    reference = attention_output(model, ids)
    stats = calibrate(model, random_ids(4, 16, seed=1), free_pairs=2).stats
    errors = {}
    for name, chosen in (("tie rule", stats), ("position-free forced", [replace(s, exact=None) for s in stats])):
        merges = closed_form_merges(chosen, keys_only)
        errors[name] = (
            (attention_output(aligned_merge(model, keys_only, merges), ids) - reference).norm() / reference.norm()
        ).item()
    assert merges[0]["key"][0].rotary == 4  # forced: two pairs merged exactly, two position-free
    assert closed_form_merges(stats, keys_only)[0]["key"][0].rotary == R  # the tie: every pair exact
    assert errors["tie rule"] < 1e-5, errors  # fp32 model, relative
    assert errors["position-free forced"] > 1e-2, errors


def test_key_layout_orders_the_exact_pairs_first_and_the_count_is_checked():
    assert key_layout(8, 8, 0).tolist() == list(range(8))
    assert key_layout(8, 8, 1).tolist() == [0, 1, 2, 4, 5, 6, 3, 7]  # pair 3 is dims 3 and 7
    assert key_layout(10, 8, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9]  # then the pass-through dims 8, 9
    model = ours_from_hf(tiny_llama_hf())  # 4 pairs, frequencies 1, 0.1, 0.01, 0.001
    assert free_pairs_for(model, None) == 0 and free_pairs_for(model, 3) == 3  # none turns <= 0.5 rad over 2,048 tokens
    slow = build(replace(model.config, rope_inv_freq=[1.0, 0.1, 2e-4, 1e-5]), state_dict_of(model))
    assert free_pairs_for(slow, None) == 2
    with pytest.raises(UserError, match="between 0 and 4"):
        free_pairs_for(model, 5)


def test_free_pairs_follow_the_model_positions_or_the_context():
    """The FREE_ANGLE rule (0.5 rad) over the model's positions (at least 2,048), or a given context:
    a pair turning 1e-4 rad a token is position-free over 2,048 tokens (0.2 rad), not over 8,192 (0.8)."""
    model = ours_from_hf(tiny_llama_hf())
    long = build(
        replace(model.config, rope_inv_freq=[1.0, 0.1, 1e-4, 1e-5], max_position_embeddings=8192), state_dict_of(model)
    )
    assert free_pairs_for(long, None) == 1  # over its 8,192 positions: only the 1e-5 pair
    assert free_pairs_for(long, None, context=2048) == 2
    short = build(replace(long.config, max_position_embeddings=256), state_dict_of(model))
    assert free_pairs_for(short, None) == 2  # 256 positions: the rule still spans 2,048 tokens
