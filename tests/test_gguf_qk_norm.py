"""GGUF of the qk-norm families (Qwen3, OLMo 2, Gemma 3) against the real llama.cpp.

Each tiny Hugging Face model (hidden 48, 6 query heads of 8 dims, 2 layers; a byte-level BPE
tokenizer trained here) goes through dha and `dha export --format gguf` into llama.cpp's own graph
for its family (`qwen3`, `olmo2`, `gemma3`); llama.cpp's logits (f32 file, f32 cache) are compared
with transformers' own model of the source, so the reference is independent of dha twice over.
What those graphs cannot hold (a dha merge: per-layer head counts, one norm weight per head) is
refused in one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dha import llamacpp
from dha.cli import main
from tests.conftest import byte_bpe_tokenizer, ours_from_hf
from tests.test_gguf import VOCAB, analytic_f16_bytes, llama, llama_cpp_logits, requires_llama_cpp, token_ids

SMALL = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6, head_dim=8
)
# Measured on these models (logits up to about 1): at most 2.7e-7 for qwen3 and olmo2 (f32
# everywhere); 1.6e-4 for gemma3, whose graph applies GELU through ggml's f16 lookup table.
F32_ATOL = 1e-5
GELU_ATOL = 1e-3


def hf_model(family: str, kv_heads: int, seed: int = 0, **options):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Olmo2Config,
        Olmo2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    classes = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "olmo2": (Olmo2Config, Olmo2ForCausalLM),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    }
    config_class, model_class = classes[family]
    model = model_class(config_class(**{**SMALL, "num_key_value_heads": kv_heads, **options})).eval()
    with torch.no_grad():  # norm weights away from their initial values, so a wrong placement shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def saved(tmp_path, model, name: str) -> str:
    path = str(tmp_path / name)
    model.save_pretrained(path)
    byte_bpe_tokenizer().save_pretrained(path)
    return path


def exported(tmp_path, capsys, source: str, *flags, name: str = "model.gguf"):
    """(exit status, the file's path, the JSON report, or the error text when the export failed)."""
    out = str(tmp_path / name)
    code = main(["export", source, "--format", "gguf", "--out", out, *flags])
    captured = capsys.readouterr()
    return code, out, json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err


def transformers_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


GEMMA3 = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8)


@requires_llama_cpp
@pytest.mark.parametrize(
    "family,kv_heads,options,atol",
    [
        ("qwen3", 6, {}, F32_ATOL),
        ("qwen3", 2, {"tie_word_embeddings": True}, F32_ATOL),
        ("olmo2", 6, {}, F32_ATOL),
        ("olmo2", 3, {"tie_word_embeddings": True}, F32_ATOL),  # olmo2's graph needs `output`: written
        # a misplaced norm, window or RoPE base moves these logits by O(0.1)
        ("gemma3", 2, GEMMA3, GELU_ATOL),
        ("gemma3", 6, {**GEMMA3, "final_logit_softcapping": 0.5}, GELU_ATOL),
        # linear RoPE scaling on the full-attention layers only (Gemma 3 4B and up): llama.cpp's
        # rope.scaling.factor, its sliding layers left unscaled
        ("gemma3", 2, {**GEMMA3, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, GELU_ATOL),
    ],
)
def test_unconverted_source_runs_in_its_llama_cpp_graph(tmp_path, capsys, family, kv_heads, options, atol):
    """40 tokens, past gemma3's window of 8: llama.cpp's logits equal transformers' within atol, and its
    f16 cache grows by our heads per token (gemma3: by its full-attention layer's only, once the
    sliding layer's cache holds its window)."""
    model = hf_model(family, kv_heads, **options)
    code, path, report = exported(tmp_path, capsys, saved(tmp_path, model, "src"))
    assert code == 0, report
    ids = token_ids(40)
    llm = llama(path, f32_cache=True)
    torch.testing.assert_close(llama_cpp_logits(llm, ids), transformers_logits(model, ids), atol=atol, rtol=0)
    growth = llamacpp.kv_bytes_per_token(llama(path), ids)
    if family == "gemma3":
        assert growth == analytic_f16_bytes([kv_heads]) == report["kv_bytes_per_token_past_window"]
    else:
        assert growth == analytic_f16_bytes([kv_heads] * 2) == report["kv_bytes_per_token"]


def mean_merged(hf, key_groups, value_groups):
    """dha's group-mean merge (`gqa`, `gqa-similar`, `prune` keep one norm weight per layer)."""
    from dha.plan import LayerPlan, Plan
    from dha.transforms import merge_groups

    plan = Plan([LayerPlan(k, v) for k, v in zip(key_groups, value_groups)], [6, 6], [6, 6], method="custom")
    return merge_groups(ours_from_hf(hf), plan).eval()


def our_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


SCATTERED = [[[0, 3], [1, 4], [2, 5]], [[1, 2], [0, 5], [3, 4]]]  # 3 heads per layer, groups not contiguous


@requires_llama_cpp
@pytest.mark.parametrize("family,options", [("qwen3", {}), ("olmo2", {}), ("gemma3", GEMMA3)])
def test_uniform_conversion_runs_in_its_llama_cpp_graph(tmp_path, capsys, family, options):
    """A conversion to 3 key/value heads in every layer, groups scattered over the query heads: the
    export reorders the query heads (and OLMo 2's query norm slices with them) and llama.cpp computes
    the converted model (f32 cache) within the family's tolerance, with half the source's cache."""
    from tests.test_gguf import tiny_source

    hf = hf_model(family, 6, **options)
    model = mean_merged(hf, SCATTERED, SCATTERED)
    code, path, err = exported(tmp_path, capsys, tiny_source(tmp_path, model, hf))
    assert code == 0, err
    ids = token_ids(40)
    atol = GELU_ATOL if family == "gemma3" else F32_ATOL
    torch.testing.assert_close(
        llama_cpp_logits(llama(path, f32_cache=True), ids), our_logits(model, ids), atol=atol, rtol=0
    )


@pytest.mark.parametrize(
    "family,groups,flags,message",
    [
        (
            "qwen3",
            [[[0, 1], [2, 3], [4, 5]], [[0, 1, 2], [3, 4, 5]]],
            [],
            "reads one key/value head count for every layer",
        ),
        # with --pad or without: no hint to pad what padding cannot make exact
        ("olmo2", [[[0, 1], [2, 3], [4, 5]], [[0, 1, 2, 3], [4, 5]]], ["--pad"], "would change what a norm over the"),
        ("olmo2", [[[0, 1], [2, 3], [4, 5]], [[0, 1, 2, 3], [4, 5]]], [], "would change what a norm over the"),
    ],
)
def test_layouts_its_graph_cannot_hold_are_refused(tmp_path, capsys, family, groups, flags, message):
    """Per-layer head counts (a dha plan) in a graph with one count, and duplicated OLMo 2 key heads:
    one line naming the reason, exit 2, nothing written."""
    from tests.test_gguf import tiny_source

    hf = hf_model(family, 6)
    src = tiny_source(tmp_path, mean_merged(hf, groups, groups), hf)
    code, out, err = exported(tmp_path, capsys, src, *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "--pad duplicates heads" not in err and not os.path.exists(out)


def test_unknown_qk_norm_architecture_features_are_refused(tmp_path, capsys):
    """What the family's llama.cpp graph cannot compute: a Qwen3 with attention biases or a sliding
    window; an OLMo 2 whose heads do not span the hidden size (its graph sizes queries by it); a
    Gemma 3 with local layers but no window (its local RoPE base comes only with one)."""
    for family, options, message in (
        ("qwen3", {"attention_bias": True}, "llama.cpp's qwen3 graph does not hold attention, MLP or output biases"),
        (
            "qwen3",
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
            "llama.cpp's qwen3 graph does not hold a sliding window",
        ),
        ("olmo2", {"head_dim": 16}, "llama.cpp's olmo2 graph does not hold a head dim other than hidden / heads"),
        ("gemma3", {**GEMMA3, "sliding_window": None}, "llama.cpp's gemma3 graph does not hold local layers without"),
    ):
        directory = tmp_path / f"case{len(os.listdir(tmp_path))}"
        directory.mkdir()
        code, out, err = exported(directory, capsys, saved(directory, hf_model(family, 6, **options), "src"))
        assert code == 2 and message in err and not os.path.exists(out), err


@requires_llama_cpp
@pytest.mark.slow
def test_gemma3_270m_runs_in_llama_cpp_from_our_export(tmp_path, capsys):
    """The real Gemma 3 270M (its GGUF loaded by dha, written back as an f32 GGUF with its tokenizer as
    llama.cpp's SentencePiece `llama` model): llama.cpp tokenizes real text as transformers does,
    token for token, and its logits (f32 cache) are transformers' within 0.1 (measured 0.052 on
    logits up to 42 over 200 tokens, from ggml's f16 GELU table through 18 layers), the same argmax
    at every position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_qk_norm import gemma3_270m_gguf

    source = gemma3_270m_gguf()
    code, path, err = exported(tmp_path, capsys, source)
    assert code == 0, err
    directory, name = os.path.dirname(source), os.path.basename(source)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    text = "  Two  spaces,\ttabs\n\nünïcödé 日本語 12345 <b>tags</b> 0x7f3a /usr/bin/env " * 4
    llm = llama(path, n_ctx=512, f32_cache=True)
    ids = tokenizer(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    got, want = llama_cpp_logits(llm, ids), transformers_logits(hf, ids)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def python_docs() -> list[str]:
    """The reference topics that ship with CPython (pydoc_data), in a stable order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def sentencepiece_bpe_tokenizer():
    """A SentencePiece-style BPE trained here (spaces as "▁", no pre-splitting) with the 256 byte
    tokens `<0xNN>` for byte fallback in its vocabulary, as Gemma's tokenizer is built."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    backend.train_from_iterator(python_docs()[:40], trainer)
    spec = json.loads(backend.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


@requires_llama_cpp
def test_sentencepiece_tokenizer_splits_in_llama_cpp_as_in_transformers(tmp_path, capsys):
    """Written as llama.cpp's `llama` model (scores from the merge ranks, byte tokens typed BYTE):
    llama.cpp's ids equal transformers' on text the tokenizer was not trained on, runs of spaces,
    tabs, and characters the merges never saw (byte fallback), and read back as the same bytes. (Equal
    scores, or reversed ones, split the unseen text differently; NORMAL-typed byte tokens read back
    as "<0xNN>".)"""
    import llama_cpp

    tokenizer = sentencepiece_bpe_tokenizer()
    model = hf_model("qwen3", 2, vocab_size=1280)
    path = str(tmp_path / "src")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    code, out, report = exported(tmp_path, capsys, path)
    assert code == 0, report
    llm = llama_cpp.Llama(out, vocab_only=True, verbose=False)
    unseen = "\n".join(python_docs()[60:70])  # topics the tokenizer was not trained on
    for text in (unseen, "  two  spaces\tand a tab\n", "ünïcödé 日本語 🙂", "x" * 40):
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        if text != unseen:  # (llama-cpp-python reads each piece into 32 bytes: it drops longer tokens)
            assert llm.detokenize(ids) == text.encode(), text  # byte tokens read back as their bytes
