"""Long-context measures: perplexity by position against transformers' own logits, and the passkey
grid scored on models whose answers are known (an oracle that reads the needle, one that does not)."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from torch import nn

from dha import longctx
from dha.errors import UserError
from dha.evaluate import EvalOptions, evaluate_models
from tests.conftest import byte_bpe_tokenizer, ours_from_hf, random_ids, tiny_llama_hf


def test_position_nll_equals_transformers_per_position_loss():
    """fp32, tolerance 1e-5: the mean NLL at each window index equals the reference computed from
    transformers' LlamaForCausalLM logits, token by token, in this test."""
    hf = tiny_llama_hf(num_heads=6, num_kv_heads=2)
    ours = ours_from_hf(hf)
    windows = random_ids(batch=3, length=200, seed=1)
    with torch.no_grad():
        logp = torch.log_softmax(hf(windows).logits.double(), -1)  # (3, 200, V)
    reference = torch.zeros(199, dtype=torch.float64)
    for w in range(3):
        for t in range(1, 200):
            reference[t - 1] += -logp[w, t - 1, windows[w, t]] / 3
    got = longctx.position_nll(ours, windows, batch_size=2, progress=False)
    assert got.shape == (199,)
    assert torch.allclose(got, reference, atol=1e-5, rtol=0)


def test_by_position_buckets_average_their_own_indices():
    nll = torch.arange(1, 1024, dtype=torch.float64) / 1000  # index t has NLL t / 1000
    buckets = longctx.by_position(nll, windows=5)
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 256), (256, 1024)]
    first = sum(t / 1000 for t in range(1, 256)) / 255  # indices 1..255 (index 0 is never predicted)
    second = sum(t / 1000 for t in range(256, 1024)) / 768
    assert buckets[0]["nll"] == pytest.approx(first, rel=1e-12) and buckets[0]["tokens"] == 255 * 5
    assert buckets[1]["ppl"] == pytest.approx(math.exp(second), rel=1e-12) and buckets[1]["tokens"] == 768 * 5


def test_prompts_have_their_length_and_the_needle_at_its_depth():
    tok = byte_bpe_tokenizer(digits=True)
    options = longctx.RetrievalOptions(lengths=[300, 500], depths=3, per_depth=2)
    prompts = longctx.passkey_prompts(tok, options)
    assert len(prompts) == 2 * 3 * 2
    for p in prompts:
        assert len(p.ids) == p.length - options.new_tokens  # the answer fills the rest
        text = tok.decode(p.ids)
        assert text.count(p.key) == 2 and text.endswith("The pass key is")
        needle = tok(longctx.NEEDLE.format(key=p.key), add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(p.ids)) if p.ids[i : i + len(needle)] == needle)
        before = at - len(tok(longctx.INTRO, add_special_tokens=False)["input_ids"])
        after = len(p.ids) - at - len(needle) - len(tok(longctx.QUESTION, add_special_tokens=False)["input_ids"])
        assert abs(before / (before + after) - p.depth) <= 1 / (before + after)  # haystack tokens before the needle
    stream = torch.tensor(tok("the quick brown fox jumps over a lazy dog " * 40)["input_ids"])
    texts = longctx.passkey_prompts(tok, longctx.RetrievalOptions(lengths=[300], haystack="text"), stream)
    assert all(len(p.ids) == 300 - 16 and "lazy dog" in tok.decode(p.ids) for p in texts)


class Oracle(nn.Module):
    """Answers a passkey prompt by reading the key out of its text (right=True) or with other digits.

    It speaks through generate()'s interface: new_cache, then a prefill and one token at a time."""

    def __init__(self, tokenizer, right: bool):
        super().__init__()
        self.tokenizer, self.right = tokenizer, right
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)

    def new_cache(self, batch, max_len):
        return {"queue": []}

    def forward(self, ids, cache, last_only=False):
        if not cache["queue"]:  # the prefill: plan each row's answer
            for row in ids:
                key = re.search(r"pass key is (\d{5})", self.tokenizer.decode(row.tolist())).group(1)
                said = key if self.right else str(99999 - int(key))
                cache["queue"].append(self.tokenizer(" " + said + ". Done now.", add_special_tokens=False)["input_ids"])
        logits = torch.zeros(ids.shape[0], 1, self.vocab)
        for b, queue in enumerate(cache["queue"]):
            logits[b, 0, queue.pop(0) if queue else 0] = 1.0
        return logits


def test_retrieval_grid_finds_a_right_answer_and_not_a_wrong_one():
    tok = byte_bpe_tokenizer(digits=True)
    options = longctx.RetrievalOptions(lengths=[300, 400], depths=2, per_depth=3, batch_size=2)
    right = longctx.retrieval(Oracle(tok, right=True), tok, options, progress=False)
    wrong = longctx.retrieval(Oracle(tok, right=False), tok, options, progress=False)
    assert right["found"] == {"300": [3, 3], "400": [3, 3]} and right["found_per_length"] == {"300": 6, "400": 6}
    assert wrong["found_per_length"] == {"300": 0, "400": 0}
    assert all(e["key"] in e["reply"] for e in right["examples"])


def test_eval_refuses_a_long_context_past_the_model_positions():
    hf = tiny_llama_hf()  # 256 positions
    from dha.checkpoint import Loaded
    from dha.data import TokenSplits

    loaded = Loaded(ours_from_hf(hf), None, "tiny", "native")
    splits = TokenSplits(random_ids(1, 600)[0], random_ids(1, 600, seed=2)[0], "random", 1, 1)
    with pytest.raises(UserError, match="256 positions"):
        evaluate_models([loaded], splits, EvalOptions(long_context=512, batch_sizes=[1], progress=False))
    with pytest.raises(UserError, match="fewer than one long-context window"):
        longctx.long_windows(splits.heldout[:100], 200, 2)


def test_convert_context_is_refused_past_the_positions_and_beside_the_block_flags(cli_setup, capsys):
    """One clear line, exit 2, nothing written, before any work (the tiny source has 256 positions)."""
    from dha.cli import main

    src, data, tmp = cli_setup
    out = tmp / "out"
    base = ["convert", src, "--method", "dha", "--kv-budget", "0.5", "--data", data, "--out", str(out)]
    assert main(base + ["--context", "512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dha: error: --context 512 is beyond the source's 256 positions"]
    context_conflicts = {
        ("--calib-block-size", "64"): "--context sets --calib-block-size",
        ("--tokens", "256", "--position-span", "200"): "--context sets --position-span",
        ("--tokens", "256", "--block-size", "128"): "--block-size 128 is not shorter than --context 128",
    }
    for extra, why in context_conflicts.items():
        assert main(base + ["--context", "128", *extra]) == 2
        assert why in capsys.readouterr().err
    refused = {
        ("--retrieval", "512"): "beyond the source's 256 positions",
        ("--retrieval-heads", "2", "--search", "learned"): "not with --search learned",
        ("--protect-values",): "give N too",
        ("--retrieval-length", "128"): "--retrieval-length sets the prompts that find --retrieval-heads N: give N too",
        ("--retrieval-heads", "2", "--retrieval-length", "512"): "--retrieval-length 512 is beyond the source's 256",
    }
    for extra, why in refused.items():
        assert main(base + list(extra)) == 2
        assert why in capsys.readouterr().err
    gqa = ["convert", src, "--method", "gqa", "--kv-budget", "0.5", "--context", "64", "--out", str(out)]
    assert main(gqa) == 2 and "read neither without --tokens" in capsys.readouterr().err
    assert not out.exists()


def test_convert_context_that_cannot_fit_even_with_checkpointing_is_refused(cli_setup, capsys, monkeypatch):
    import dha.memory
    from dha.cli import main

    src, data, tmp = cli_setup
    monkeypatch.setattr(dha.memory, "free_memory", lambda device: 2**20)  # 1 MiB free
    out = tmp / "out"
    assert (
        main(
            [
                "convert",
                src,
                "--method",
                "dha",
                "--kv-budget",
                "0.5",
                "--data",
                data,
                "--context",
                "256",
                "--tokens",
                "512",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even with activation checkpointing" in err[0] and "0.0 GiB free" in err[0]
    assert not out.exists()


def test_convert_context_sets_calibration_training_rows_and_free_pairs(cli_setup):
    """--context 64 with --tokens: calibration blocks and training rows of 64 tokens, and the
    position-free pairs chosen over 64 tokens (one pair; none over the default 2,048)."""
    import json

    from dha.cli import main

    src, data, tmp = cli_setup
    out = tmp / "ctx"
    assert (
        main(
            [
                "convert",
                src,
                "--method",
                "dha",
                "--kv-budget",
                "0.5",
                "--data",
                data,
                "--context",
                "64",
                "--tokens",
                "256",
                "--batch-tokens",
                "32",
                "--retrieval",
                "128",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["block_size"] == 64 and summary["train"]["batch_tokens"] == 64
    assert summary["calibration_tokens"] % 64 == 0 and summary["search"]["free_context"] == 64
    # head dim 8, theta 1e4: pair i turns by 64 * 1e4^(-i/4) rad over 64 tokens; <= 0.5 rad for i = 3 only
    assert summary["search"]["free_pairs"] == 1
    assert [r["by_position"]["window"] for r in summary["results"]] == [64, 64, 64]
    assert [r["retrieval"]["prompts_per_length"] for r in summary["results"]] == [10, 10, 10]
    report = (out / "report.md").read_text()
    assert "perplexity by position" in report and "passkey retrieval (10 prompts per length" in report


def test_convert_context_with_shorter_rows_spreads_their_positions(cli_setup):
    """--context 64 --block-size 16: calibration blocks and training rows of 16 tokens whose
    positions span 64 (--position-span), pairs and the report's window for 64 tokens."""
    import json

    from dha.cli import main

    src, data, tmp = cli_setup
    out = tmp / "pose"
    argv = ["convert", src, "--method", "dha", "--kv-budget", "0.5", "--data", data, "--context", "64"]
    argv += ["--block-size", "16", "--tokens", "64", "--batch-tokens", "32", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    train = summary["train"]
    assert (train["block_size"], train["position_span"], train["batch_tokens"], train["micro_batch"]) == (16, 64, 32, 1)
    assert summary["calibration_block_size"] == 16 and summary["search"]["free_context"] == 64
    assert [r["by_position"]["window"] for r in summary["results"]] == [64, 64, 64]


def hf_needle_mass(hf, tok, options) -> torch.Tensor:
    """(prompts, layers, heads): transformers' eager attention probabilities (output_attentions) of
    each prompt's last position on the needle's digits."""
    prompts = longctx.passkey_prompts(tok, options)
    cfg = hf.config
    reference = torch.zeros(len(prompts), cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    for i, p in enumerate(prompts):
        span = longctx.needle_span(tok, p)
        with torch.no_grad():
            attentions = hf(torch.tensor([p.ids]), output_attentions=True).attentions
        for l, a in enumerate(attentions):
            reference[i, l] = a[0, :, -1, span].sum(-1).double()
    return reference


def test_needle_attention_equals_transformers_attention_probabilities():
    """fp32, 1e-5: the mass the last prompt position puts on the needle's digits, per layer and
    query head, against transformers' eager attention probabilities (output_attentions): per depth
    (two prompts at each of two depths, averaged) and averaged over one prompt per depth."""
    tok = byte_bpe_tokenizer(digits=True)
    hf = tiny_llama_hf(
        num_heads=6, num_kv_heads=2, vocab_size=len(tok), max_position_embeddings=1024, attn_implementation="eager"
    )
    ours = ours_from_hf(hf)
    got = longctx.needle_attention(ours, tok, length=400, prompts=2, progress=False)
    reference = hf_needle_mass(hf, tok, longctx.RetrievalOptions(lengths=[400], depths=2, per_depth=1))
    assert torch.allclose(got, reference.mean(0), atol=1e-5, rtol=0)
    assert got.max() > 1e-3  # the needle is read at all (a mass of 0 everywhere would pass trivially)
    by_depth = longctx.needle_attention_by_depth(ours, tok, length=400, depths=2, progress=False, per_depth=2)
    reference = hf_needle_mass(hf, tok, longctx.RetrievalOptions(lengths=[400], depths=2, per_depth=2))
    assert by_depth.shape == (2, 2, 6)
    assert torch.allclose(by_depth, reference.view(2, 2, 2, 6).mean(1), atol=1e-5, rtol=0)
    wrong = reference.view(2, 2, 2, 6).mean(0)  # prompts grouped across depths instead
    assert not torch.allclose(by_depth, wrong, atol=1e-5, rtol=0)  # the grouping is really tested


def test_needle_attention_reads_local_layers_through_their_window():
    """fp32, 1e-5, Gemma 3 (a sliding window of 64 tokens in local layers, query_pre_attn_scalar not
    the head dim): a local layer puts nothing on a needle outside its window, as transformers says."""
    from tests.test_families import SMALL, hf_model

    tok = byte_bpe_tokenizer(digits=True)
    hf = hf_model(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        **{**SMALL, "vocab_size": len(tok)},
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=1024,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=12,
        attn_implementation="eager",
    )
    ours = ours_from_hf(hf)
    got = longctx.needle_attention_by_depth(ours, tok, length=400, depths=2, progress=False)
    reference = hf_needle_mass(hf, tok, longctx.RetrievalOptions(lengths=[400], depths=2, per_depth=1))
    assert torch.allclose(got, reference, atol=1e-5, rtol=0)
    assert got[:, 0].abs().max() == 0 and got[:, 1].max() > 1e-3  # outside the window; the global layer reads it


def test_retrieval_heads_are_found_on_prompts_of_the_retrieval_length():
    """--retrieval-length L: the source reads 5 passkey prompts of L tokens (capped at its positions)."""
    from dha.pipeline import DHAConfig, protected_heads

    tok = byte_bpe_tokenizer(digits=True)
    ours = ours_from_hf(tiny_llama_hf(num_heads=6, num_kv_heads=2, vocab_size=len(tok), max_position_embeddings=1024))
    lengths = []
    ours.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    for asked, read in ((300, 300), (4096, 1024)):
        lengths.clear()
        config = DHAConfig(kv_budget=0.5, retrieval_heads=2, protect_values=True, retrieval_length=asked)
        heads = protected_heads(ours, tok, config, log_progress=lambda line: None)
        assert len(lengths) == 5 and all(read - 32 < n <= read for n in lengths), lengths  # filler in whole sentences
        assert len(heads) == 4 and {kind for _, kind, _ in heads} == {"key", "value"}


def test_eval_cli_prints_long_context_tables_writes_plots_and_json(cli_setup, capsys):
    import json

    from dha.cli import main

    src, data, tmp = cli_setup
    plots = tmp / "plots"
    assert (
        main(
            [
                "eval",
                src,
                "--compare",
                src,
                "--data",
                data,
                "--heldout-fraction",
                "0.5",
                "--long-context",
                "128",
                "--long-windows",
                "2",
                "--retrieval",
                "96,128",
                "--retrieval-depths",
                "2",
                "--retrieval-per-depth",
                "1",
                "--batch-sizes",
                "1",
                "--repeats",
                "1",
                "--new-tokens",
                "2",
                "--context",
                "8",
                "--max-eval-tokens",
                "256",
                "--eval-block-size",
                "64",
                "--plot-dir",
                str(plots),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "perplexity by position (2 windows of 128 tokens" in out and "passkey retrieval (synthetic haystack" in out
    report = json.loads(out.strip().splitlines()[-1])
    first, second = report["models"]
    assert [b["end"] for b in first["by_position"]["buckets"]] == [128]
    assert second["ratios"]["by_position"] == [pytest.approx(1.0, abs=1e-9)]  # the same model twice
    assert first["retrieval"]["prompts_per_length"] == 2 and set(first["retrieval"]["found"]) == {"96", "128"}
    assert sorted(os.listdir(plots)) == ["by_position.png", "retrieval.png"]
