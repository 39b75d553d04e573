"""qk-norm families (Qwen3, OLMo 2, Gemma 3 text) beyond the per-family battery of test_families.py.

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

QK_CASES = ["qwen3", "olmo2", "gemma3_text"]


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


@pytest.mark.parametrize("name", QK_CASES)
def test_merge_refused_with_one_line(name):
    ours = ours_from_hf(CASES[name]())
    for arg in (ours, ours.config):
        with pytest.raises(UnsupportedModel) as e:
            refuse_merge_of_qk_norm(arg)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{name} normalises queries and keys after projection")
        assert "merging key heads changes what the norm divides by" in message
        assert "norm-aware merges are not implemented" in message
    refuse_merge_of_qk_norm(ours_from_hf(CASES["llama"]()))  # no qk-norm: nothing to refuse


# `dha convert` refuses a qk-norm source before loading it (dha.cli.convert), and dha.convert's convert /
# apply_plan and dha.pipeline.run_dha refuse a loaded one.
@pytest.mark.parametrize("how", ["method", "plan"])
@pytest.mark.parametrize("name", ["qwen3", "olmo2"])
def test_cli_convert_refuses_qk_norm(name, how, tmp_path, capsys):
    hf = CASES[name]()
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    hf.save_pretrained(src)
    if how == "method":
        argv = ["--method", "gqa", "--kv-budget", "0.5"]
    else:
        heads = [hf.config.num_key_value_heads] * hf.config.num_hidden_layers
        layer = LayerPlan([list(range(heads[0] - 1)), [heads[0] - 1]], [list(range(heads[0] - 1)), [heads[0] - 1]])
        Plan([layer] * len(heads), heads, heads, method="test").save(str(tmp_path / "plan.json"))
        argv = ["--plan", str(tmp_path / "plan.json")]
    code = main(["convert", src, *argv, "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and "norm-aware merges are not implemented" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and not os.path.exists(out)


@pytest.mark.parametrize(
    "name,hf_class",
    [("qwen3", "Qwen3ForCausalLM"), ("olmo2", "Olmo2ForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM")],
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
