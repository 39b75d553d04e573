"""Every family in dha.families against Hugging Face's own model: tiny random configs, fp32, CPU.

Each case builds a 2-layer, 6-head (head dim 8) HF model with random weights, perturbs its biases
and norm weights (random init leaves them at 0/1) and checks: our logits equal HF's; cached decode
equals the full forward; the identity plan changes nothing; the state-dict conversion round-trips
exactly; an uneven merge runs (qk-norm families: is refused); a saved HF directory loads and inspects.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.testing import assert_close

from dha.checkpoint import load
from dha.cli import main
from dha.families import (
    FAMILIES,
    UnsupportedModel,
    config_from_hf,
    family_of,
    refuse_merge_of_qk_norm,
    weights_from_hf,
    weights_to_hf,
)
from dha.plan import LayerPlan, Plan
from dha.transforms import build, expand_to_mha, merge_groups
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf
from tests.helpers import identity_plan

VOCAB, LENGTH = 97, 16
SMALL = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=None)


def perturbed(model):
    """Random init leaves biases at 0 and norm weights at 1: move them so they are really tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_model(cls_name: str, config_name: str, **kwargs):
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SMALL, **kwargs})
    return perturbed(getattr(transformers, cls_name)(config))


NEOX = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=64, max_position_embeddings=64
)
OPT = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, ffn_dim=64, max_position_embeddings=64)
LLAMA_LIKE = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=64, max_position_embeddings=64
)

# name -> builder of a tiny HF model. Variants cover each family's switches.
CASES = {
    "llama": lambda: tiny_llama_hf(num_kv_heads=3, bias=True),
    "gpt2": lambda: hf_model("GPT2LMHeadModel", "GPT2Config", n_embd=48, n_layer=2, n_head=6, n_positions=64),
    "gpt2-untied-gelu": lambda: hf_model(
        "GPT2LMHeadModel",
        "GPT2Config",
        n_embd=48,
        n_layer=2,
        n_head=6,
        n_positions=64,
        n_inner=40,
        tie_word_embeddings=False,
        activation_function="gelu",
        layer_norm_epsilon=1e-3,
        # reorder_and_upcast_attn only runs in eager attention: there it computes q.k in float32.
        reorder_and_upcast_attn=True,
        attn_implementation="eager",
    ),
    # Pythia-style: parallel residual, the first half of each head rotated, RoPE base 500.
    "gpt_neox": lambda: hf_model("GPTNeoXForCausalLM", "GPTNeoXConfig", **NEOX, rotary_pct=0.5, rotary_emb_base=500),
    "gpt_neox-sequential-nobias": lambda: hf_model(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        **NEOX,
        use_parallel_residual=False,
        attention_bias=False,
        tie_word_embeddings=True,
        layer_norm_eps=1e-3,
    ),
    "opt": lambda: hf_model("OPTForCausalLM", "OPTConfig", **OPT),
    "opt-nobias-nofinalnorm-untied": lambda: hf_model(
        "OPTForCausalLM",
        "OPTConfig",
        **OPT,
        enable_bias=False,
        _remove_final_layer_norm=True,
        tie_word_embeddings=False,
        activation_function="gelu",
    ),
    "phi": lambda: hf_model("PhiForCausalLM", "PhiConfig", **LLAMA_LIKE, partial_rotary_factor=0.5),
    "phi-gqa": lambda: hf_model(
        "PhiForCausalLM", "PhiConfig", **LLAMA_LIKE, num_key_value_heads=3, partial_rotary_factor=0.75
    ),
    "qwen2": lambda: hf_model("Qwen2ForCausalLM", "Qwen2Config", **LLAMA_LIKE, num_key_value_heads=3),
    # Every layer slides (max_window_layers=0); window 5 < LENGTH so the window really masks.
    "qwen2-sliding": lambda: hf_model(
        "Qwen2ForCausalLM",
        "Qwen2Config",
        **LLAMA_LIKE,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=0,
        tie_word_embeddings=True,
    ),
    "mistral": lambda: hf_model(
        "MistralForCausalLM", "MistralConfig", **LLAMA_LIKE, num_key_value_heads=2, sliding_window=5
    ),
    "mistral-nowindow": lambda: hf_model(
        "MistralForCausalLM", "MistralConfig", **LLAMA_LIKE, num_key_value_heads=6, sliding_window=None
    ),
    # qk-norm families. Qwen3: per-head RMSNorm of q and k (head dim 8 set explicitly: Qwen3Config's is 128).
    "qwen3": lambda: hf_model(
        "Qwen3ForCausalLM", "Qwen3Config", **LLAMA_LIKE, num_key_value_heads=3, head_dim=8, attention_bias=True
    ),
    "qwen3-mha-tied": lambda: hf_model(
        "Qwen3ForCausalLM", "Qwen3Config", **LLAMA_LIKE, num_key_value_heads=6, head_dim=8, tie_word_embeddings=True
    ),
    # Qwen3-MoE: Qwen3's attention; 4 experts of 16, 2 per token; layer 1 dense (mlp_only_layers), or
    # every second layer sparse (decoder_sparse_step 2) with one expert a token, its weight not
    # renormalised, and a sliding window of 5.
    "qwen3_moe": lambda: hf_model(
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        **{**LLAMA_LIKE, "num_hidden_layers": 3},
        num_key_value_heads=3,
        head_dim=8,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "qwen3_moe-step2-bias": lambda: hf_model(
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        **LLAMA_LIKE,
        num_key_value_heads=2,
        head_dim=8,
        moe_intermediate_size=16,
        num_experts=3,
        num_experts_per_tok=1,
        decoder_sparse_step=2,
        attention_bias=True,
        use_sliding_window=True,  # every layer (Qwen3MoeConfig has no layer_types)
        sliding_window=5,
    ),
    # OLMo 2: RMSNorm of the whole q (48) and k (Hk * 8) projections, norms after each sublayer.
    "olmo2": lambda: hf_model("Olmo2ForCausalLM", "Olmo2Config", **LLAMA_LIKE, num_key_value_heads=2),
    "olmo2-mha-bias": lambda: hf_model(
        "Olmo2ForCausalLM", "Olmo2Config", **LLAMA_LIKE, attention_bias=True, rms_norm_eps=1e-3
    ),
    # Gemma 3: local layers 0 and 2 (window 5 < LENGTH, RoPE theta 10,000) and a global layer 1 (linear
    # RoPE scaling), query_pre_attn_scalar != head_dim, final logits soft-capped.
    "gemma3_text": lambda: hf_model(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        **{**LLAMA_LIKE, "num_hidden_layers": 3},
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=12,
        final_logit_softcapping=3.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        },
    ),
    "gemma3_text-mha": lambda: hf_model(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        **LLAMA_LIKE,
        num_key_value_heads=6,
        head_dim=8,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention"],
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(name, hf_model, our_model) for every case, built once per module."""
    hf = CASES[request.param]()
    return request.param, hf, ours_from_hf(hf)


def test_every_family_has_a_case():
    assert {name.split("-")[0] for name in CASES} == set(FAMILIES)


def test_logits_equal_hf(case):
    _, hf, ours = case
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)  # fp32


def test_sliding_window_is_exercised():
    """The window cases would fail without the window: HF's logits differ from a full-attention run."""
    hf = CASES["mistral"]()
    cfg = config_from_hf(hf.config)
    assert cfg.sliding_window == 5
    cfg.sliding_window = None
    full = build(cfg, weights_from_hf(hf.state_dict(), cfg)).eval()
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        assert (full(ids) - hf(ids).logits).abs().max() > 1e-3
    assert config_from_hf(CASES["qwen2-sliding"]().config).sliding_window == 5
    assert config_from_hf(CASES["qwen2"]().config).sliding_window is None  # use_sliding_window off


def assert_cached_decode_matches(model, prefill: int = 10) -> torch.Tensor:
    """Full-sequence logits, checked equal (fp32, atol 1e-5) to prefill + one-token decode steps."""
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(ids.shape[0], LENGTH)
        steps = [model(ids[:, :prefill], cache)]
        for t in range(prefill, LENGTH):
            steps.append(model(ids[:, t : t + 1], cache))
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)  # fp32
    return full


def test_cached_decode_equals_full_forward(case):
    assert_cached_decode_matches(case[2])


def test_identity_conversion_is_exact(case):
    _, hf, ours = case
    cfg = ours.config
    heads = [cfg.key_heads(l) for l in range(cfg.num_layers)], [cfg.value_heads(l) for l in range(cfg.num_layers)]
    same = merge_groups(ours, identity_plan(*heads))
    assert same.config == cfg
    before, after = ours.state_dict(), same.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        assert torch.equal(same(ids), ours(ids))
        assert_close(same(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_weights_round_trip_exactly(case):
    _, hf, ours = case
    sd = hf.state_dict()
    back = weights_to_hf(weights_from_hf(sd, ours.config), ours.config)
    expected = dict(sd)
    if ours.config.tie_word_embeddings:
        # A tied lm_head is the embedding itself; it is left out, as HF's save_pretrained does.
        tied = expected.pop("lm_head.weight")
        assert tied.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert back.keys() == expected.keys()
    for key in expected:
        assert back[key].shape == expected[key].shape and torch.equal(back[key], expected[key]), key


def uneven_plan(num_layers: int) -> Plan:
    """Groups of different sizes, decoupled between keys and values, for 6 source heads."""
    layer = LayerPlan(key_groups=[[0, 1], [2, 3, 4], [5]], value_groups=[[0], [1, 2], [3, 4, 5]])
    return Plan([layer] * num_layers, [6] * num_layers, [6] * num_layers, method="test")


def test_uneven_merge_runs(case):
    _, _, ours = case
    refuse_merge_of_qk_norm(ours, mean=True)  # every family merges (a qk-norm source too)
    merged = merge_groups(expand_to_mha(ours), uneven_plan(ours.config.num_layers))
    cfg = merged.config
    assert [cfg.key_heads(l) for l in range(cfg.num_layers)] == [3] * cfg.num_layers
    assert cfg.key_index[0] == [0, 0, 1, 1, 1, 2] and cfg.value_index[0] == [0, 1, 1, 2, 2, 2]
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        logits = merged(ids)
        cache = merged.new_cache(ids.shape[0], LENGTH)
        stepped = torch.cat([merged(ids[:, : LENGTH - 1], cache), merged(ids[:, LENGTH - 1 :], cache)], dim=1)
    assert logits.shape == (2, LENGTH, VOCAB) and torch.isfinite(logits).all()
    assert_close(stepped, logits, atol=1e-5, rtol=0)  # the compact cache serves the merged heads


def test_reduced_kv_to_hf_layouts():
    """GPT-2's c_attn concatenates q|k|v, so it holds any head counts; NeoX's per-head interleave cannot."""
    gpt2 = ours_from_hf(CASES["gpt2"]())
    merged = merge_groups(gpt2, uneven_plan(2))
    hf_sd = weights_to_hf({k: v for k, v in merged.state_dict().items()}, merged.config)
    assert hf_sd["transformer.h.0.attn.c_attn.weight"].shape == (48, (6 + 3 + 3) * 8)
    back = weights_from_hf(hf_sd, merged.config)
    assert all(torch.equal(back[k], v) for k, v in merged.state_dict().items() if k != "lm_head.weight")

    neox = ours_from_hf(CASES["gpt_neox"]())
    merged = merge_groups(neox, uneven_plan(2))
    with pytest.raises(UnsupportedModel, match="query_key_value layout holds one of each"):
        weights_to_hf(merged.state_dict(), merged.config)


def test_old_checkpoint_layouts_load():
    """Keys as older checkpoints store them: saved from the base model (no `transformer.` prefix) with
    causal-mask buffers (GPT-2), Pythia's `embed_out` and saved RoPE frequencies (GPT-NeoX)."""
    ids = random_ids(length=LENGTH)

    hf = CASES["gpt2"]()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for l in range(2):
        sd[f"h.{l}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        sd[f"h.{l}.attn.masked_bias"] = torch.tensor(-1e4)
    cfg = config_from_hf(hf.config)
    with torch.no_grad():
        assert_close(build(cfg, weights_from_hf(sd, cfg))(ids), hf(ids).logits, atol=1e-5, rtol=0)

    hf = CASES["gpt_neox"]()
    sd = dict(hf.state_dict())
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    cfg = config_from_hf(hf.config)
    with torch.no_grad():
        assert_close(build(cfg, weights_from_hf(sd, cfg))(ids), hf(ids).logits, atol=1e-5, rtol=0)


# ---- refused configurations ---------------------------------------------------------------------

TINY = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6)
SUPPORTED = "gemma3_text, gpt2, gpt_neox, llama, mistral, olmo2, opt, phi, qwen2, qwen3, qwen3_moe"

REFUSED = [
    ("OlmoeConfig", dict(TINY, intermediate_size=64), r"'olmoe' is not supported: its mixture-of-experts layers"),
    ("Olmo3Config", dict(TINY, intermediate_size=64), r"'olmo3' is not supported: .*OLMo 2 is supported"),
    (
        "Gemma3TextConfig",
        dict(TINY, intermediate_size=64, use_bidirectional_attention=True),
        r"use_bidirectional_attention=True",
    ),
    (
        "Qwen3Config",
        dict(TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        r"qwen3 with a sliding window on some layers only",
    ),
    (
        "PhiConfig",
        dict(TINY, qk_layernorm=True),
        r"phi with qk_layernorm=True .*qk-norm only for qwen3, qwen3_moe, olmo2, gemma3_text",
    ),
    ("OPTConfig", dict(TINY, do_layer_norm_before=False), r"do_layer_norm_before=False \(post-LayerNorm"),
    ("OPTConfig", dict(TINY, word_embed_proj_dim=32), r"word_embed_proj_dim=32 != hidden_size=48"),
    (
        "GPT2Config",
        dict(n_embd=48, n_layer=2, n_head=6, scale_attn_by_inverse_layer_idx=True),
        r"scale_attn_by_inverse_layer_idx",
    ),
    ("GPT2Config", dict(n_embd=48, n_layer=2, n_head=6, scale_attn_weights=False), r"scale_attn_weights=False"),
    (
        "Qwen2Config",
        dict(TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        r"sliding window on some layers only",
    ),
    ("GPTNeoXConfig", dict(TINY, rotary_pct=0.1), r"partial_rotary_factor 0.1 gives 0 rotary dims"),
    (
        "MambaConfig",
        dict(vocab_size=VOCAB, hidden_size=48),
        r"'mamba' is not supported: .*no config and weight mapping.*" + SUPPORTED,
    ),
]


@pytest.mark.parametrize("config_name,kwargs,message", REFUSED, ids=[f"{c}-{m[:24]}" for c, _, m in REFUSED])
def test_refused_with_a_clear_message(config_name, kwargs, message):
    config = getattr(transformers, config_name)(**kwargs)
    with pytest.raises(UnsupportedModel, match=message):
        config_from_hf(config)


def test_unmapped_qk_norm_family_refused_by_name():
    with pytest.raises(UnsupportedModel, match="'olmoe' is not supported: its mixture-of-experts"):
        family_of("olmoe")
    with pytest.raises(UnsupportedModel, match="'gemma3' is not supported: it is the vision-language"):
        family_of("gemma3")


def test_cli_refuses_unmapped_qk_norm_dir(tmp_path, capsys):
    transformers.OlmoeConfig(**TINY, intermediate_size=64).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- saved HF directories -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["gpt2", "gpt_neox", "opt", "phi-gqa", "qwen2", "mistral", "qwen3", "qwen3_moe", "olmo2", "gemma3_text"]
)
def test_inspect_and_load_saved_hf_dir(name, tmp_path, capsys):
    hf = CASES[name]()
    hf.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kv = hf.config.num_key_value_heads if hasattr(hf.config, "num_key_value_heads") else 6
    L = hf.config.num_hidden_layers if hasattr(hf.config, "num_hidden_layers") else 2
    assert info["family"] == hf.config.model_type and info["layers"] == L and info["query_heads"] == 6
    assert [l["key_heads"] for l in info["per_layer"]] == [kv] * L
    assert info["kv_bytes_per_token"] == (kv + kv) * 8 * L * 4  # K + V heads * head_dim * layers * fp32
    ids = random_ids(length=LENGTH)
    with torch.no_grad():
        assert_close(load(str(tmp_path), tokenizer=False).model(ids), hf(ids).logits, atol=1e-5, rtol=0)
