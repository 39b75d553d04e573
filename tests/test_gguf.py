"""`dha export --format gguf` against the real llama.cpp (llama-cpp-python 0.3.36 bindings).

The reference is llama.cpp itself: it loads the exported file, evaluates token sequences, and its
logits are compared with ours (fp32 model, float32 on CPU); its KV cache is measured from the
bytes its state of one sequence grows by per token. Tolerances are stated per test, measured in
tests/test_gguf.py's first run (see the constants). Tiny models: hidden 48, 6 query heads of 8
dims, 2 layers, and a byte-level BPE tokenizer trained here (tests.conftest.byte_bpe_tokenizer).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from dha import llamacpp
from dha.checkpoint import Loaded, save
from dha.cli import main
from tests.conftest import byte_bpe_tokenizer, ours_from_hf, tiny_llama_hf
from tests.test_serving import converted

requires_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (make setup-test installs 0.3.36)"
)

VOCAB = 320  # the tokenizer's 300 tokens and 20 ids it never produces (exported as unused padding)
# Measured: at most 4.2e-7 on these models (logits up to about 1.1), f32 file and f32 cache.
F32_ATOL = 1e-5


def tiny_source(tmp_path, model, hf, name="src", digits=False) -> str:
    path = str(tmp_path / name)
    save(path, Loaded(model, byte_bpe_tokenizer(digits=digits), name, "native", hf_config=hf.config.to_dict()))
    return path


def export(argv, capsys) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def llama(path: str, n_ctx: int = 64, f32_cache: bool = False, flash_attn: bool = False):
    """llama.cpp on `path`. Its KV cache is f16 by default; f32_cache=True keeps keys and values in
    float32, so that an f32 file is compared with our fp32 model without the cache's rounding
    (SmolLM2: max |logit difference| 5.3e-5 with an f32 cache, 2.5e-2 with the f16 default)."""
    return llamacpp.open_model(path, n_ctx, f32_cache=f32_cache, flash_attn=flash_attn, logits_all=True)[0]


def llama_cpp_logits(llm, ids):
    return llamacpp.logits(llm, ids)


def measured_kv_bytes_per_token(llm, ids):
    return llamacpp.kv_bytes_per_token(llm, ids)


def ours_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def token_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def analytic_f16_bytes(kv_heads: list[int], head_dim: int = 8) -> int:
    return sum(2 * n * head_dim * 2 for n in kv_heads)


def exported(tmp_path, capsys, model, hf, *flags, name="model.gguf", digits=False) -> tuple[str, dict, str]:
    src = tiny_source(
        tmp_path, model, hf, name=f"src-{name}", digits=digits
    )  # a checkpoint per export: save never overwrites
    out = str(tmp_path / name)
    code, stdout, err = export([src, "--format", "gguf", "--out", out, *flags], capsys)
    assert code == 0, err
    return out, json.loads(stdout.strip().splitlines()[-1]), stdout


def check_against_llama_cpp(path: str, model, kv_heads: list[int], atol: float = F32_ATOL) -> None:
    """llama.cpp's logits (f32 cache) equal ours within atol; the KV cache (f16) it keeps per token,
    and the one it allocates with flash attention on, hold exactly our heads."""
    ids = token_ids(40)
    llm = llama(path, f32_cache=True)
    torch.testing.assert_close(llama_cpp_logits(llm, ids), ours_logits(model, ids), atol=atol, rtol=0)
    assert measured_kv_bytes_per_token(llama(path), ids) == analytic_f16_bytes(kv_heads)
    cells = 65536  # many cells, so that the allocation's MiB (2 decimals) resolve 0.08 bytes per token
    allocated = llamacpp.kv_cache_allocation(llamacpp.open_model(path, cells, flash_attn=True)[1])
    assert allocated["cells"] == cells and allocated["cache_type"] == "f16" and not allocated["padded_values"]
    assert abs(allocated["bytes"] - cells * analytic_f16_bytes(kv_heads)) <= allocated["resolution_bytes"]


@requires_llama_cpp
@pytest.mark.parametrize("kv_heads", [6, 2])
def test_unconverted_source_runs_in_llama_cpp(tmp_path, capsys, kv_heads):
    """MHA and contiguous GQA sources, with attention biases (their rows are reordered for RoPE too)."""
    hf = tiny_llama_hf(num_kv_heads=kv_heads, bias=True, vocab_size=VOCAB)
    model = ours_from_hf(hf)
    path, report, _ = exported(tmp_path, capsys, model, hf)
    assert report["arch"] == "llama" and report["kv_heads"] == [kv_heads, kv_heads] and report["padded_layers"] == 0
    check_against_llama_cpp(path, model, [kv_heads] * 2)


@requires_llama_cpp
def test_per_layer_counts_export_as_deci(tmp_path, capsys):
    """Converted: 3 key/value heads in layer 0 and 2 in layer 1, groups not contiguous, tied embeddings."""
    hf = tiny_llama_hf(vocab_size=VOCAB, tie=True)
    groups = [[[0, 3], [1, 4], [2, 5]], [[1, 2, 5], [0, 3, 4]]]
    model = converted(hf, groups, groups)
    path, report, _ = exported(tmp_path, capsys, model, hf)
    assert report["arch"] == "deci" and report["kv_heads"] == [3, 2]
    assert report["kv_bytes_per_token"] == report["source_kv_bytes_per_token"] == analytic_f16_bytes([3, 2])
    check_against_llama_cpp(path, model, [3, 2])
    # Flash attention off (llama-cpp-python's default): llama.cpp pads every layer's value cache to
    # the widest layer's (3 heads), keys keep their own counts.
    cells = 65536
    plain = llamacpp.kv_cache_allocation(llamacpp.open_model(path, cells)[1])
    assert plain["padded_values"]
    assert abs(plain["key_bytes"] - cells * (3 + 2) * 8 * 2) <= plain["resolution_bytes"]
    assert abs(plain["value_bytes"] - cells * (3 + 3) * 8 * 2) <= plain["resolution_bytes"]


@requires_llama_cpp
def test_decoupled_layout_refused_naming_the_layer_and_padded_exactly(tmp_path, capsys):
    hf = tiny_llama_hf(vocab_size=VOCAB)
    key_groups = [[[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 3], [4, 5]]]
    value_groups = [[[0, 1], [2, 3], [4, 5]], [[0, 1, 2], [3, 4, 5]]]  # layer 1 decoupled
    model = converted(hf, key_groups, value_groups)
    src = tiny_source(tmp_path, model, hf)
    out = str(tmp_path / "refused.gguf")
    code, _, err = export([src, "--format", "gguf", "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "layer 1: key heads and value heads are grouped differently" in err and "--pad" in err
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["src"]

    path, report, stdout = exported(tmp_path, capsys, model, hf, "--pad", name="padded.gguf")
    # Layer 1: query heads {0,1}: (k0, v0), {2}: (k1, v0), {3}: (k1, v1), {4,5}: (k2, v1) -> 6 heads of 1.
    assert report["kv_heads"] == [3, 6] and report["padded_layers"] == 1 and report["arch"] == "deci"
    extra = analytic_f16_bytes([3, 6]) - (3 + 3 + 3 + 2) * 8 * 2
    assert f"+{extra:,} bytes per token" in stdout
    check_against_llama_cpp(path, model, [3, 6])


@requires_llama_cpp
def test_llama3_rope_scaling(tmp_path, capsys):
    """Scaled RoPE is written as llama.cpp's rope_freqs divisors."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    hf = tiny_llama_hf(vocab_size=VOCAB, num_kv_heads=3, rope_parameters=rope)
    model = ours_from_hf(hf)
    path, report, _ = exported(tmp_path, capsys, model, hf)
    check_against_llama_cpp(path, model, [3, 3])


# Measured on the per-layer model below (logits up to about 0.72; llama.cpp's default f16 cache):
# f16 weights 4.0e-4, q8_0 8.1e-3; with the RoPE rows left in Hugging Face's order, 0.11.
QUANTISED_ATOL = {"f16": 2e-3, "q8_0": 2.5e-2}


def sharp_per_layer_model(**hf_options):
    """(hf, our model with 3 and 2 key/value heads in its two layers) from a tiny LLaMA whose q/k
    weights are scaled by 4: sharper attention, so that RoPE, head placement and what the cache
    holds matter to the logits."""
    hf = tiny_llama_hf(vocab_size=VOCAB, intermediate_size=128, **hf_options)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    groups = [[[0, 3], [1, 4], [2, 5]], [[1, 2, 5], [0, 3, 4]]]
    return hf, converted(hf, groups, groups)


@requires_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_f16_and_q8_0_run(tmp_path, capsys, outtype):
    hf, model = sharp_per_layer_model(hidden_size=96)  # q8_0 blocks: rows of 32
    path, report, _ = exported(tmp_path, capsys, model, hf, "--outtype", outtype)
    ids = token_ids(40)
    diff = (llama_cpp_logits(llama(path), ids) - ours_logits(model, ids)).abs().max().item()
    assert diff <= QUANTISED_ATOL[outtype]


@requires_llama_cpp
@pytest.mark.parametrize("digits", [False, True])
def test_tokenizer_splits_as_ours(tmp_path, capsys, digits):
    """llama.cpp tokenises text into the ids our tokenizer gives (pre-tokenizer gpt-2, or smollm's digits)."""
    hf = tiny_llama_hf(vocab_size=VOCAB)
    path, report, _ = exported(tmp_path, capsys, ours_from_hf(hf), hf, digits=digits)
    assert report["tokenizer_pre"] == ("smollm" if digits else "gpt-2")
    text = "the quick brown fox 1234 jumps, over  7 lazy dogs!\nHello World"
    ours = byte_bpe_tokenizer(digits=digits)(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp_vocab_only(path)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours


def llama_cpp_vocab_only(path: str):
    import llama_cpp

    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


@requires_llama_cpp
@pytest.mark.slow
def test_smollm2_runs_in_llama_cpp(tmp_path):
    """The built-in SmolLM2-135M: llama.cpp's tokens and logits (f32 file, f32 cache) equal ours.
    Measured 5.3e-5 on 89 tokens of English with digits (logits up to ~32)."""
    from dha.checkpoint import load
    from dha.gguf import export_gguf

    loaded = load(None, torch.float32)
    path = str(tmp_path / "smollm2.gguf")
    export_gguf(loaded, path, "f32")
    text = "The Python interpreter reads a program, 123 456 and runs it line by line. " * 3
    ids = loaded.tokenizer(text)["input_ids"]
    assert llama_cpp_vocab_only(path).tokenize(text.encode(), add_bos=False, special=False) == ids
    llm = llama(path, n_ctx=128, f32_cache=True)
    torch.testing.assert_close(llama_cpp_logits(llm, ids), ours_logits(loaded.model, ids), atol=1e-3, rtol=0)
    assert measured_kv_bytes_per_token(llama(path, n_ctx=128), ids) == loaded.model.config.kv_bytes_per_token(
        torch.float16
    )


# ---- bad input (no llama.cpp needed) -------------------------------------------------------------


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    hf = tiny_llama_hf(vocab_size=VOCAB)
    src = tiny_source(tmp_path, ours_from_hf(hf), hf)
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    cases = [
        ([src, "--format", "gguf", "--out", str(existing)], "already exists"),
        ([src, "--format", "gguf", "--out", str(tmp_path / "missing" / "m.gguf")], "is not a directory"),
        ([src, "--format", "gguf", "--out", str(tmp_path / "x.gguf"), "--force-remote-code"], "--force-remote-code"),
        ([src, "--out", str(tmp_path / "hf"), "--pad"], "--pad and --outtype are for"),
    ]
    for argv, message in cases:
        code, _, err = export(argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert existing.read_bytes() == b"keep me" and sorted(os.listdir(tmp_path)) == ["existing.gguf", "src"]


def test_unwritable_directory(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: permissions cannot be tested")
    hf = tiny_llama_hf(vocab_size=VOCAB)
    src = tiny_source(tmp_path, ours_from_hf(hf), hf)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = export([src, "--format", "gguf", "--out", str(locked / "m.gguf")], capsys)
    assert code == 2 and "no permission" in err and os.listdir(locked) == []


def test_other_families_and_mixtures_of_experts_are_refused(tmp_path, capsys):
    """(The qk-norm families that export: tests/test_gguf_qk_norm.py.)"""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    small = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=6,
        head_dim=8,
    )
    for name, model, message in [
        ("mistral", MistralForCausalLM(MistralConfig(sliding_window=None, **small)), "family 'mistral'"),
        (
            "qwen3_moe",
            Qwen3MoeForCausalLM(
                Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **small)
            ),
            "qk-norm family 'qwen3_moe': GGUF is written for qwen3, olmo2, gemma3_text among qk-norm families",
        ),
    ]:
        directory = str(tmp_path / name)
        model.save_pretrained(directory)
        byte_bpe_tokenizer().save_pretrained(directory)
        out = str(tmp_path / f"{name}.gguf")
        code, _, err = export([directory, "--format", "gguf", "--out", out], capsys)
        assert code == 2 and message in err and not os.path.exists(out), err
