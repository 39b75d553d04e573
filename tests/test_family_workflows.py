"""The conversion workflow on every family: convert by every method, export, reload, analyze.

For one tiny random HF model per family (6 query heads, head dim 8, 2 layers; the builders of
tests/test_families.py, whose logits equal HF's there), fp32 on CPU:
- every method in dha.convert.METHODS at kv_budget 0.5 on random calibration tokens: the plan keeps
  no more than the budget, the model holds the plan's head counts, its logits are finite, and its
  cached decode equals its own full forward;
- a `gqa` conversion and a decoupled one (uneven K/V groups, merge_groups) are exported, reloaded
  with transformers' AutoModelForCausalLM, and give our logits; the export is stock where the
  family's transformers class holds the layout (GQA classes with GQA groups), else remote code;
- dha.analyze.analyze runs on the source and the decoupled model, with matrices of the right shapes;
- exactness against independent references: at kv_budget 1.0 every method gives HF's logits back;
  with the heads of each group made identical, every method but prune reproduces the model; the
  heads analyze/svd/prune measure equal HF's own k/v projection outputs (fused ones split by hand);
- the CLI on a saved HF directory (character tokenizer): inspect, analyze, convert (gqa, svd, and
  dha with --tokens 0), export, eval.
The reference for each export is our model (itself checked against HF in test_families.py); the
reloaded export runs transformers' code (stock) or the copied modeling code (remote).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from dha.analyze import analyze
from dha.checkpoint import Loaded
from dha.convert import METHODS, ConvertOptions, convert
from dha.export import export
from dha.families import FAMILIES, QK_NORM_SUPPORTED
from dha.plan import LayerPlan, Plan
from dha.transforms import expand_to_mha, merge_groups
from tests.conftest import ours_from_hf, random_ids
from tests.test_families import CASES, LENGTH, VOCAB, assert_cached_decode_matches

BUDGET = 0.5
# One case per family: the base row of test_families (llama 3 KV heads, qwen2 3, mistral 2 with a
# sliding window, phi and the MHA-only families 6; NeoX and Phi rotate only part of each head).
FAMILY_CASES = sorted(
    set(FAMILIES) - set(QK_NORM_SUPPORTED)
)  # the qk-norm families convert not yet: tests/test_qk_norm.py
# transformers classes with grouped-query attention (Family.kv_heads_field set).
GQA_CLASSES = {name for name, family in FAMILIES.items() if family.kv_heads_field is not None}
OPTIONS = dict(calib_tokens=64, block_size=16, batch_size=4)
# `dha` runs the cost search (exact DP) then the aligned merge: the `--tokens 0` path of `dha convert`.
# test id -> (method, ConvertOptions fields beyond OPTIONS)
METHOD_CASES = {
    "gqa": ("gqa", {}),
    "gqa-similar": ("gqa-similar", {}),
    "svd": ("svd", {}),
    "svd-similar": ("svd", {"grouping": "similar"}),
    "prune": ("prune", {}),
    "dha": ("dha", {"extra": {"search": {"progress": False}}}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one torch thread is as fast, and far faster on a busy machine (measured
    on the 2-core box with other jobs running: 170 s with torch's default threads vs 21 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILY_CASES)
def family_hf(request):
    """(name, HF model, Loaded of our copy) for each family, built once per module."""
    hf = CASES[request.param]()
    return request.param, hf, Loaded(ours_from_hf(hf), None, request.param, "hf", hf_config=hf.config.to_dict())


@pytest.fixture
def family(family_hf):
    name, _, loaded = family_hf
    return name, loaded


def test_every_family_and_method_is_covered():
    assert set(FAMILY_CASES) == {"llama", "gpt2", "gpt_neox", "opt", "qwen2", "mistral", "phi"}
    assert {method for method, _ in METHOD_CASES.values()} == set(METHODS)


def calibration() -> torch.Tensor:
    return random_ids(batch=4, length=LENGTH, seed=1)  # (4, 16) random token ids: 64 tokens


def kv_heads(model) -> tuple[list[int], list[int]]:
    cfg = model.config
    return [cfg.key_heads(l) for l in range(cfg.num_layers)], [cfg.value_heads(l) for l in range(cfg.num_layers)]


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_every_method_converts(family, case):
    _, source = family
    method, options = METHOD_CASES[case]
    out = convert(source, method, BUDGET, calibration(), ConvertOptions(**OPTIONS, **options))
    plan, model = out.plan, out.model
    src_k, src_v = kv_heads(source.model)
    k, v = kv_heads(model)
    # the plan keeps no more than the budget and the model holds exactly the plan's heads
    assert plan.kv_fraction() <= BUDGET + 1e-9
    assert (sum(k) + sum(v)) / (sum(src_k) + sum(src_v)) <= BUDGET + 1e-9
    assert k == [len(layer.key_groups) for layer in plan.layers]
    assert v == [len(layer.value_groups) for layer in plan.layers]
    assert sum(k) + sum(v) < sum(src_k) + sum(src_v)  # the layout changed
    assert model.config.kv_bytes_per_token(torch.float32) < source.model.config.kv_bytes_per_token(torch.float32)
    logits = assert_cached_decode_matches(model)
    assert logits.shape == (2, LENGTH, VOCAB) and torch.isfinite(logits).all()
    assert out.hf_config == source.hf_config  # export still knows the family's HF config


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_full_budget_reproduces_hf(family_hf, case):
    """At kv_budget 1.0 every group has one head, so every method must give HF's own logits back.

    For svd that checks the exact algebra of the key fold-in, including the dims past rotary_dim
    (NeoX rotates half of each head, Phi half) and the biases (GPT-2, OPT, NeoX, Phi, Qwen2)."""
    name, hf, source = family_hf
    method, options = METHOD_CASES[case]
    out = convert(source, method, 1.0, calibration(), ConvertOptions(**OPTIONS, **options))
    assert kv_heads(out.model) == kv_heads(source.model)
    ids = random_ids(length=LENGTH, seed=3)
    with torch.no_grad():
        assert_close(out.model(ids), hf(ids).logits, atol=1e-5, rtol=0)  # fp32 (svd sums in float64)


def with_duplicate_heads(model):
    """A copy of `model` whose key and value heads repeat within each contiguous half-budget group
    (heads 0,1 -> head 0's weights, ...): merging those groups loses nothing, whatever the method."""
    from dha.baselines import even_groups
    from dha.budget import heads_for_budget, source_heads
    from dha.transforms import build, heads, state_dict_of, unheads

    cfg, sd = model.config, dict(state_dict_of(model))
    want_k, want_v = heads_for_budget(*source_heads(model), BUDGET)
    for l in range(cfg.num_layers):
        for proj, want in (("k_proj", want_k[l]), ("v_proj", want_v[l])):
            for part in ("weight", "bias"):
                key = f"layers.{l}.attn.{proj}.{part}"
                if key in sd:
                    h = heads(sd[key], cfg.head_dim).clone()  # (n, hd, ...)
                    for group in even_groups(h.shape[0], want):
                        h[group] = h[group[0]].clone()
                    sd[key] = unheads(h)
    return build(cfg, sd).eval()


# prune is left out: it scores each head by the error of dropping it alone (baselines.convert_prune),
# so both twins of a pair score ~0 and it may keep both and drop another pair entirely.
@pytest.mark.parametrize("case", sorted(set(METHOD_CASES) - {"prune"}))
def test_duplicate_heads_merge_exactly(family, case):
    """With every group's heads identical, each method at the half budget must reproduce the model:
    the reference is the unconverted model (its own forward). For svd this checks the key fold-in
    with groups of two, also on the dims past rotary_dim (NeoX, Phi rotate half of each head)."""
    _, source = family
    model = with_duplicate_heads(source.model)
    method, options = METHOD_CASES[case]
    out = convert(
        Loaded(model, None, "dup", "native"), method, BUDGET, calibration(), ConvertOptions(**OPTIONS, **options)
    )
    assert out.plan.kv_fraction() <= BUDGET + 1e-9
    ids = random_ids(length=LENGTH, seed=4)
    with torch.no_grad():
        assert_close(out.model(ids), model(ids), atol=1e-4, rtol=0)  # fp32; svd's PCA runs in float64


# Where each family's HF attention computes its keys and values (before RoPE), and how to split them.
def _split_fused(out, H, hd, layout):
    """(B, T, 3*H*hd) fused projection -> keys, values as (B*T, H, hd)."""
    B, T, _ = out.shape
    if layout == "qkv":  # GPT-2 c_attn: [q | k | v], each H*hd
        q, k, v = out.split(H * hd, dim=-1)
        return k.reshape(B * T, H, hd), v.reshape(B * T, H, hd)
    per_head = out.reshape(B * T, H, 3 * hd)  # NeoX query_key_value: per head [q_h | k_h | v_h]
    return per_head[..., hd : 2 * hd], per_head[..., 2 * hd :]


def hf_keys_values(name, hf, ids):
    """Per layer (keys (N, Hk, hd), values (N, Hv, hd)) captured from HF's own projection modules."""
    cfg = hf.config
    H = cfg.num_attention_heads
    hd = cfg.hidden_size // H
    fused = {
        "gpt2": ("transformer.h.{}.attn.c_attn", "qkv"),
        "gpt_neox": ("gpt_neox.layers.{}.attention.query_key_value", "neox"),
    }
    separate = {"opt": "model.decoder.layers.{}.self_attn.{}"}
    modules = dict(hf.named_modules())
    captured, handles = {}, []

    def keep(key):
        return lambda module, args, out: captured.__setitem__(key, out.detach())

    for l in range(cfg.num_hidden_layers):
        if name in fused:
            handles.append(modules[fused[name][0].format(l)].register_forward_hook(keep((l, "qkv"))))
        else:
            pattern = separate.get(name, "model.layers.{}.self_attn.{}")
            for proj in ("k_proj", "v_proj"):
                handles.append(modules[pattern.format(l, proj)].register_forward_hook(keep((l, proj))))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    out = []
    for l in range(cfg.num_hidden_layers):
        if name in fused:
            out.append(_split_fused(captured[(l, "qkv")], H, hd, fused[name][1]))
        else:
            k, v = captured[(l, "k_proj")], captured[(l, "v_proj")]
            out.append((k.reshape(-1, k.shape[-1] // hd, hd), v.reshape(-1, v.shape[-1] // hd, hd)))
    return out


def test_collected_heads_equal_hf(family_hf):
    """The heads analyze, gqa-similar, svd and prune measure are HF's own keys and values (pre-RoPE),
    also for the parallel-residual (NeoX, Phi) and LayerNorm (GPT-2, OPT, NeoX, Phi) families."""
    from dha.analyze import collect_heads

    name, hf, source = family_hf
    ids = calibration()
    ours = collect_heads(source.model, ids, batch_size=4)
    for l, (keys, values) in enumerate(hf_keys_values(name, hf, ids)):
        assert_close(ours[l]["keys"], keys, atol=1e-5, rtol=0)  # fp32
        assert_close(ours[l]["values"], values, atol=1e-5, rtol=0)


def decoupled(model):
    """Uneven key groups and different value groups over the 6 (expanded) heads of every layer."""
    mha = expand_to_mha(model)
    layer = LayerPlan(key_groups=[[0, 1], [2, 3, 4], [5]], value_groups=[[0], [1, 2], [3, 4, 5]])
    L = mha.config.num_layers
    return merge_groups(mha, Plan([layer] * L, [6] * L, [6] * L, method="test"))


def reload_and_compare(result, ours) -> None:
    """Reload the export with transformers and compare its fp32 logits with ours (atol 1e-5)."""
    hf = AutoModelForCausalLM.from_pretrained(result.out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = random_ids(length=LENGTH, seed=2)
    with torch.no_grad():
        assert_close(hf(input_ids=ids, use_cache=False).logits, ours(ids), atol=1e-5, rtol=0)  # fp32


@pytest.mark.parametrize("layout", ["gqa", "decoupled"])
def test_export_reloads_with_equal_logits(family, layout, tmp_path):
    name, source = family
    if layout == "gqa":
        converted = convert(source, "gqa", BUDGET, None)
        # contiguous groups shared by K and V: GQA classes hold them, MHA-only classes do not
        expected = "stock" if name in GQA_CLASSES else "remote-code"
    else:
        model = decoupled(source.model)
        converted = Loaded(model, None, name, "native", hf_config=source.hf_config)
        expected = "remote-code"
    result = export(converted, str(tmp_path / layout))
    assert result.kind == expected, result.reason
    assert (result.key_heads, result.value_heads) == kv_heads(converted.model)
    assert result.max_abs_diff <= 1e-4
    reload_and_compare(result, converted.model)


def check_analysis(result: dict, model) -> None:
    k, v = kv_heads(model)
    assert len(result["layers"]) == model.config.num_layers
    assert result["calibration_tokens"] == calibration().numel()
    for l, entry in enumerate(result["layers"]):
        for kind, n in (("keys", k[l]), ("values", v[l])):
            assert entry[kind]["heads"] == n
            for metric in ("cosine", "cka"):
                matrix = torch.tensor(entry[kind][metric])
                assert matrix.shape == (n, n) and torch.isfinite(matrix).all()
                assert_close(matrix, matrix.T, atol=1e-6, rtol=0)
                assert_close(matrix.diagonal(), torch.ones(n), atol=1e-6, rtol=0)
            assert sorted(h for g in entry[kind]["clusters"][str(n)] for h in g) == list(range(n))


def test_analyze_runs(family):
    _, source = family
    for model in (source.model, decoupled(source.model)):
        check_analysis(analyze(model, calibration(), batch_size=4), model)


# ---- the same workflow through the CLI, on a saved HF directory -------------------------------------


def char_tokenizer():
    """A character-level tokenizer over the tiny models' 97 ids (printable ASCII, <unk>, newline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): c - 32 for c in range(32, 127)} | {"<unk>": 95, "\n": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="\n")


def saved_hf_dir(hf, tmp_path):
    """The HF model saved with a character tokenizer, and a small text file to calibrate and evaluate on."""
    src, text = str(tmp_path / "src"), tmp_path / "text.txt"
    hf.save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # scale and shift" for i in range(60)))
    return src, str(text)


def cli(capsys, *argv) -> dict:
    """Run a verb in-process; it must succeed; its last stdout line is JSON."""
    import json

    from dha.cli import main

    assert main([str(a) for a in argv]) == 0, argv
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_workflow(family_hf, tmp_path, capsys, monkeypatch):
    """inspect, analyze, convert (gqa, svd), export and eval of a saved HF directory, by the CLI."""
    from dha.checkpoint import load

    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    name, hf, _ = family_hf
    src, text = saved_hf_dir(hf, tmp_path)
    data = ["--data", text, "--calib-tokens", "64", "--calib-block-size", "16"]
    assert cli(capsys, "inspect", src, "--json")["family"] == name
    analysis = cli(capsys, "analyze", src, *data, "--out", tmp_path / "analysis")
    assert analysis["calibration_tokens"] == 64 and len(analysis["key_groups_needed"]) == 2
    for method in ("gqa", "svd"):
        calibration = data if method != "gqa" else []  # gqa reads no text (and refuses calibration options)
        summary = cli(
            capsys,
            "convert",
            src,
            "--method",
            method,
            "--kv-budget",
            "0.5",
            *calibration,
            "--out",
            tmp_path / method,
            "--json",
        )
        assert summary["kv_fraction"] <= 0.5 + 1e-9
        result = cli(capsys, "export", tmp_path / method, "--out", tmp_path / f"{method}-hf")
        # svd keeps contiguous groups shared by K and V at 0.5 too, so both fit a GQA class
        assert result["kind"] == ("stock" if name in GQA_CLASSES else "remote-code"), result["reason"]
        converted = load(str(tmp_path / method), tokenizer=False).model  # the saved conversion, read back
        reload_and_compare(SimpleNamespace(out=result["out"]), converted)
    evaluated = cli(
        capsys,
        "eval",
        src,
        "--compare",
        tmp_path / "svd-hf",
        "--data",
        text,
        "--eval-block-size",
        "16",
        "--max-eval-tokens",
        "64",
        "--batch-sizes",
        "1",
        "--context",
        "8",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--json",
    )
    assert evaluated["models"][1]["kv_bytes_per_token"] == converted.config.kv_bytes_per_token(torch.float32)
    # Perplexities against transformers' on the same 4 held-out windows of 16 tokens (fp32 models,
    # fp64 sums here: rtol 1e-5; these random models are near uniform, ppl ~ 100): the source as
    # transformers' own model, the svd export as transformers loads it (its own class when stock,
    # the export's code when remote code).
    from dha.data import blocks, load_tokens

    windows = blocks(load_tokens(text, load(src).tokenizer, cache=False).heldout, 16, 4)
    export_hf = AutoModelForCausalLM.from_pretrained(result["out"], trust_remote_code=True, dtype=torch.float32).eval()
    for model, reference in zip(evaluated["models"], (hf, export_hf)):
        assert model["eval_tokens"] == 4 * 15
        assert model["ppl"] == pytest.approx(hf_perplexity(reference, windows), rel=1e-5)


def hf_perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean NLL) of every token of each window but its first, from that window alone (fp64)."""
    import math

    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_cli_dha_without_training(name, tmp_path, capsys):
    """`dha convert --method dha --tokens 0` (search + aligned merge), then export and reload."""
    from dha.checkpoint import load

    src, text = saved_hf_dir(CASES[name](), tmp_path)
    summary = cli(
        capsys,
        "convert",
        src,
        "--method",
        "dha",
        "--kv-budget",
        "0.5",
        "--tokens",
        "0",
        "--data",
        text,
        "--calib-tokens",
        "64",
        "--calib-block-size",
        "16",
        "--out",
        tmp_path / "dha",
        "--no-progress",
    )
    assert summary["kv_fraction"] <= 0.5 + 1e-9 and summary["tokens"] == 0
    result = cli(capsys, "export", tmp_path / "dha", "--out", tmp_path / "dha-hf")
    converted = load(str(tmp_path / "dha"), tokenizer=False).model
    grouped = all(converted.config.key_index[l] == converted.config.value_index[l] for l in range(2))
    assert result["kind"] == "remote-code" or (grouped and name in GQA_CLASSES)
    reload_and_compare(SimpleNamespace(out=result["out"]), converted)


def test_loading_a_remote_code_export_asks_nothing(tmp_path, capsys):
    """`dha eval EXPORT` must not ask whether to run the export's code: the tokenizer is stock."""
    from dha.checkpoint import load

    src, _ = saved_hf_dir(CASES["gpt2"](), tmp_path)
    loaded = load(src)
    result = export(
        Loaded(decoupled(loaded.model), loaded.tokenizer, "gpt2", "native", hf_config=loaded.hf_config),
        str(tmp_path / "hf"),
    )
    capsys.readouterr()
    back = load(result.out)
    assert back.tokenizer is not None
    assert "custom code" not in capsys.readouterr().out
