"""`dha export`: stock transformers checkpoints when the layout allows, remote code otherwise.

References are independent of dha's transforms: Hugging Face's own LlamaForCausalLM holding weights
that the tests compute by hand (each query head's key and value replaced by its group's mean),
or the original HF model for an identity conversion. All in float32; tolerances stated per test.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch.testing import assert_close

from dha.checkpoint import Loaded, load, save
from dha.cli import main
from dha.export import NotStock, export, stock_layout
from dha.families import family_of
from dha.model import ModelConfig, generate
from dha.plan import LayerPlan, Plan
from dha.transforms import merge_groups
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf
from tests.helpers import identity_plan

HD = 8  # head dim of the tiny models


def group_mean_reference(hf_model, key_groups, value_groups):
    """An MHA LlamaForCausalLM where query head h reads the mean of the key (value) heads of its group.

    key_groups[l] / value_groups[l] partition the 6 MHA heads of layer l. Written directly on HF
    weights, so it shares no code with dha.transforms or dha.export."""
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM(hf_model.config).eval()
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    for l, (kg, vg) in enumerate(zip(key_groups, value_groups)):
        for name, groups in (("k_proj", kg), ("v_proj", vg)):
            for suffix in ("weight", "bias"):
                key = f"model.layers.{l}.self_attn.{name}.{suffix}"
                if key not in sd:
                    continue
                w = sd[key].reshape(6, HD, *sd[key].shape[1:])  # (H, hd, ...)
                new = w.clone()
                for members in groups:
                    new[members] = w[members].mean(0)
                sd[key] = new.reshape(sd[key].shape)
    ref.load_state_dict(sd, strict=True)
    return ref


def native_checkpoint(tmp_path, model, hf_model, name="src"):
    path = str(tmp_path / name)
    save(path, Loaded(model, None, name, "native", hf_config=hf_model.config.to_dict()))
    return path


def run_export(argv, capsys):
    code = main(["export", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_gqa_expressible_partition_exports_stock(tmp_path, capsys):
    """Non-contiguous equal groups, different per layer: a stock LlamaForCausalLM with 3 KV heads."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    hf = tiny_llama_hf(bias=True)
    groups = [[[0, 3], [1, 4], [2, 5]], [[1, 5], [0, 2], [3, 4]]]
    plan = Plan([LayerPlan(g, g) for g in groups], [6, 6], [6, 6], method="custom")
    ours = merge_groups(ours_from_hf(hf), plan).eval()
    src = native_checkpoint(tmp_path, ours, hf)
    out = str(tmp_path / "hf_out")

    code, stdout, _ = run_export([src, "--out", out], capsys)
    assert code == 0
    report = last_json(stdout)
    assert report["kind"] == "stock" and report["out"] == out and report["max_abs_diff"] <= 1e-4
    assert report["permuted_layers"] == 2 and report["max_abs_diff_source"] <= 1e-4 and "stock export" in stdout
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["num_key_value_heads"] == 3 and config["head_dim"] == HD and "auto_map" not in config

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported) is LlamaForCausalLM
    ids = random_ids(3, 20, seed=1)
    # fp32; the exported GQA model against HF's own MHA model holding the group means.
    reference = group_mean_reference(hf, groups, groups)
    assert_close(logits(exported, ids), logits(reference, ids), atol=1e-5, rtol=0)
    assert_close(logits(exported, ids), logits(ours, ids), atol=1e-5, rtol=0)


def test_decoupled_uneven_exports_remote_code(tmp_path, capsys):
    """Decoupled, uneven groups (3 key heads, 2 value heads): remote code, equal logits, cached generate."""
    from transformers import AutoModelForCausalLM

    hf = tiny_llama_hf(tie=True)
    key_groups = [[[0, 3], [1, 2, 5], [4]]] * 2
    value_groups = [[[0, 1], [2, 3, 4, 5]]] * 2
    plan = Plan([LayerPlan(k, v) for k, v in zip(key_groups, value_groups)], [6, 6], [6, 6], method="custom")
    ours = merge_groups(ours_from_hf(hf), plan).eval()
    src = native_checkpoint(tmp_path, ours, hf)
    out = str(tmp_path / "hf_out")

    code, stdout, _ = run_export([src, "--out", out], capsys)
    assert code == 0
    report = last_json(stdout)
    assert report["kind"] == "remote-code" and report["key_heads"] == [3, 3] and report["value_heads"] == [2, 2]
    assert "decoupled" in report["reason"]
    assert {"configuration_dha.py", "modeling_dha.py", "dha_model.py", "model.safetensors"} <= set(os.listdir(out))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["auto_map"]["AutoModelForCausalLM"] == "modeling_dha.DhaForCausalLM"

    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(exported).__name__ == "DhaForCausalLM"
    ids = random_ids(3, 20, seed=1)
    reference = group_mean_reference(hf, key_groups, value_groups)  # fp32, HF's own MHA code
    assert_close(logits(exported, ids), logits(reference, ids), atol=1e-5, rtol=0)
    assert_close(logits(exported, ids), logits(ours, ids), atol=1e-5, rtol=0)

    # HF generate with its own DynamicCache: greedy tokens equal dha's generate, and the cache holds
    # each layer's 3 key heads and 2 value heads only.
    prompt = random_ids(2, 6, seed=2)
    with torch.no_grad():
        hf_tokens = exported.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        step = exported(prompt, use_cache=True)
    assert torch.equal(hf_tokens, generate(ours, prompt, 8))
    cache = step.cache if hasattr(step, "cache") else step.past_key_values
    assert cache.layers[0].keys.shape == (2, 3, 6, HD) and cache.layers[0].values.shape == (2, 2, 6, HD)


def test_identity_conversion_matches_original_hf_model(tmp_path, capsys):
    """GQA source -> identity plan -> export: stock, and equal to the HF model it came from."""
    from transformers import AutoModelForCausalLM

    hf = tiny_llama_hf(num_kv_heads=2, bias=True, tie=True)
    ours = ours_from_hf(hf)
    ours = merge_groups(ours, identity_plan([2, 2], [2, 2])).eval()
    src = native_checkpoint(tmp_path, ours, hf)
    out = str(tmp_path / "hf_out")

    code, stdout, _ = run_export([src, "--out", out], capsys)
    assert code == 0
    report = last_json(stdout)
    assert report["kind"] == "stock" and report["key_heads"] == [2, 2] and report["permuted_layers"] == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(3, 20, seed=3)
    assert_close(logits(exported, ids), logits(hf, ids), atol=1e-5, rtol=0)  # fp32


def test_force_remote_code(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    hf = tiny_llama_hf(num_kv_heads=3)
    src = native_checkpoint(tmp_path, ours_from_hf(hf), hf)
    out = str(tmp_path / "hf_out")
    code, stdout, _ = run_export([src, "--out", out, "--force-remote-code"], capsys)
    assert code == 0 and last_json(stdout)["kind"] == "remote-code"
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = random_ids(2, 12, seed=4)
    assert_close(logits(exported, ids), logits(hf, ids), atol=1e-5, rtol=0)  # fp32, HF's own model

    # dha reads its remote-code export back (without running its code), and exports it stock again.
    again = load(out)
    assert again.model.config == ours_from_hf(hf).config
    stock = str(tmp_path / "stock")
    code, stdout, _ = run_export([out, "--out", stock], capsys)
    assert code == 0 and last_json(stdout)["kind"] == "stock"
    exported = AutoModelForCausalLM.from_pretrained(stock, dtype=torch.float32).eval()
    assert_close(logits(exported, ids), logits(hf, ids), atol=1e-5, rtol=0)  # fp32, HF's own model


# A fresh interpreter without a terminal: stdin at EOF, so a trust_remote_code question cannot wait.
TOKENIZER_SCRIPT = """
import sys
from transformers import AutoTokenizer
out, text = sys.argv[1], sys.argv[2]
print("explicit:", AutoTokenizer.from_pretrained(out, trust_remote_code=False)(text)["input_ids"], flush=True)
print("bare:", AutoTokenizer.from_pretrained(out)(text)["input_ids"], flush=True)
"""


def test_remote_code_export_tokenizer_needs_no_remote_code(tmp_path):
    """A remote-code export (decoupled groups) keeps the source's stock tokenizer: tokenizer_config.json
    names a transformers class and has no auto_map, and a new process with stdin at EOF loads it with
    AutoTokenizer (with trust_remote_code=False: without being asked about the export's code; and with
    no argument) and tokenizes like the source, unknown word included.

    transformers 5 reads config.json (auto_map -> configuration_dha.py) before tokenizer_config.json,
    so the bare call still asks whether to run that code; at EOF it goes on with the stock tokenizer."""
    import subprocess
    import sys

    from tests.conftest import save_tiny_source

    hf = tiny_llama_hf()
    groups = Plan([LayerPlan([[0, 3], [1, 2, 5], [4]], [[0, 1], [2, 3, 4, 5]])] * 2, [6, 6], [6, 6], method="custom")
    loaded = load(save_tiny_source(str(tmp_path / "src"), merge_groups(ours_from_hf(hf), groups).eval()))
    loaded.hf_config = hf.config.to_dict()  # so that the layout alone makes it remote code
    out = str(tmp_path / "hf_out")
    result = export(loaded, out)
    assert result.kind == "remote-code" and "decoupled" in result.reason and result.tokenizer
    with open(os.path.join(out, "config.json")) as f:
        assert "AutoConfig" in json.load(f)["auto_map"]
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    assert tokenizer_config.get("tokenizer_class") and "auto_map" not in tokenizer_config

    text = "the quick brown fox jumps over a zebra"  # "zebra" is not in the vocabulary: [UNK]
    expected = loaded.tokenizer(text)["input_ids"]
    assert 0 in expected  # the unknown word
    p = subprocess.run(
        [sys.executable, "-c", TOKENIZER_SCRIPT, out, text],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr
    ids = dict(re.findall(r"(explicit|bare): (\[[\d, ]*\])", p.stdout))  # the question ends without a newline
    assert json.loads(ids["explicit"]) == expected and json.loads(ids["bare"]) == expected, p.stdout
    assert "custom code" not in p.stdout[: p.stdout.index("explicit:")]  # input() asks on stdout: not for this load


def test_family_without_gqa_exports_stock_only_as_mha(tmp_path):
    """GPT-2 (no num_key_value_heads in transformers, learned positions): MHA -> stock, GQA -> remote code."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=6, n_positions=64)).eval()
    ours = ours_from_hf(hf)
    mha = export(Loaded(ours, None, "gpt2", "hf", hf_config=hf.config.to_dict()), str(tmp_path / "mha"))
    assert mha.kind == "stock" and mha.hf_class == "GPT2LMHeadModel"
    ids = random_ids(2, 16, seed=5)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mha"), dtype=torch.float32).eval()
    assert_close(logits(exported, ids), logits(hf, ids), atol=1e-5, rtol=0)  # fp32, HF's own model

    groups = [[0, 1], [2, 3], [4, 5]]
    gqa = merge_groups(ours, Plan([LayerPlan(groups, groups)] * 2, [6, 6], [6, 6], method="custom")).eval()
    result = export(Loaded(gqa, None, "gpt2", "hf", hf_config=hf.config.to_dict()), str(tmp_path / "gqa"))
    assert result.kind == "remote-code" and "no grouped-query attention" in result.reason
    exported = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "gqa"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    assert_close(logits(exported, ids), logits(gqa, ids), atol=1e-5, rtol=0)  # fp32


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_export([str(tmp_path / "missing"), "--out", str(out)], capsys)
    assert code == 2 and "not found" in err and not out.exists()

    hf = tiny_llama_hf(num_kv_heads=3)
    src = native_checkpoint(tmp_path, ours_from_hf(hf), hf)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_export([src, "--out", str(out)], capsys)
    assert code == 2 and "not empty" in err and os.listdir(out) == ["keep.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run_export([src, "--out", str(a_file)], capsys)
    assert code == 2 and a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "src"]  # no temp dirs left


def test_mismatch_leaves_nothing(tmp_path, capsys):
    """A stale HF config (wrong RoPE base) gives a stock export that does not match: refused, removed."""
    hf = tiny_llama_hf(num_kv_heads=3)
    ours = ours_from_hf(hf)
    stale = hf.config.to_dict()
    stale["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    src = str(tmp_path / "src")
    save(src, Loaded(ours, None, "src", "native", hf_config=stale))
    out = tmp_path / "out"
    code, _, err = run_export([src, "--out", str(out)], capsys)
    assert code == 1 and "max |logit difference|" in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _cfg(key_index, value_index):
    return ModelConfig(
        vocab_size=11,
        hidden_size=48,
        num_layers=len(key_index),
        num_heads=6,
        head_dim=8,
        intermediate_size=16,
        key_index=key_index,
        value_index=value_index,
    )


def test_stock_layout_rules():
    llama = family_of("llama")
    layout = stock_layout(_cfg([[1, 0, 2, 1, 0, 2]], [[1, 0, 2, 1, 0, 2]]), llama)
    assert layout.kv_heads == 3 and layout.perms == [[1, 4, 0, 3, 2, 5]]
    for key_index, value_index, why in [
        ([[0, 0, 1, 1, 2, 2]], [[0, 1, 0, 1, 0, 1]], "decoupled"),
        ([[0, 0, 0, 1, 1, 2]], [[0, 0, 0, 1, 1, 2]], "unequal"),
        ([[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]], [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]], "different"),
    ]:
        with pytest.raises(NotStock, match=why):
            stock_layout(_cfg(key_index, value_index), llama)


@pytest.mark.slow
def test_default_model_exports_stock(tmp_path):
    """SmolLM2-135M (9 query heads, 3 KV heads): a stock LlamaForCausalLM that reproduces our logits."""
    from transformers import AutoTokenizer

    loaded = load(None)
    result = export(loaded, str(tmp_path / "smol"))
    assert result.kind == "stock" and result.hf_class == "LlamaForCausalLM"
    assert result.key_heads == [3] * 30 and result.max_abs_diff <= 1e-4
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "smol"))
    assert tok("The Python interpreter")["input_ids"] == loaded.tokenizer("The Python interpreter")["input_ids"]
