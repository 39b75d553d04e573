"""dha.evaluate and `dha eval`: perplexity against a hand computation, measured KV-cache bytes
against the formula for MHA, GQA and an uneven DHA map, perplexities and their ratios against
references computed in the test (transformers' own loss, torch's cross-entropy), speed records
against the test's own clock, and the CLI's JSON line. Tiny models (hidden 48, 2 layers, 6 heads),
fp32 on CPU. (The speed records' definitions are tested where they are made, in test_bench.)"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from dha.checkpoint import Loaded, save
from dha.cli import main
from dha.data import TokenSplits
from dha.evaluate import EvalOptions, evaluate, evaluate_models, kv_bytes, perplexity
from dha.model import ModelConfig, Transformer
from dha.transforms import build, state_dict_of, with_maps
from tests.conftest import ours_from_hf, random_ids, tiny_llama_hf
from tests.helpers import scaled_init_
from tests.speed_clock import SpeedClock
from tests.test_data import DOCS, reference_split, reference_stream, tiny_tokenizer

FAST = EvalOptions(
    block_size=16,
    max_eval_tokens=64,
    eval_batch_size=2,
    batch_sizes=[1, 2],
    context=8,
    new_tokens=3,
    repeats=1,
    progress=False,
)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))


def tiny_model(vocab=300, key_index=None, value_index=None, seed=0) -> Transformer:
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=48,
        num_layers=2,
        num_heads=6,
        head_dim=8,
        intermediate_size=64,
        key_index=key_index or [],
        value_index=value_index or [],
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return scaled_init_(Transformer(cfg), std=0.2, seed=seed).eval()


# ---- perplexity -------------------------------------------------------------------------------


def test_perplexity_equals_hand_computation():
    model = ours_from_hf(tiny_llama_hf(num_kv_heads=2))
    windows = random_ids(batch=3, length=10, vocab=97, seed=1)  # (3, 10)
    got = perplexity(model, windows, batch_size=2, progress=False)

    # Reference: every token t >= 1 of a window, predicted from that window's tokens 0..t-1 alone
    # (a separate forward pass on the prefix), log-softmax, gathered one position at a time.
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            for t in range(1, len(row)):
                logits = model(row[None, :t])[0, -1].double()  # (V,)
                total -= torch.log_softmax(logits, -1)[row[t]].item()
                count += 1
    assert got["tokens"] == count == 3 * 9
    torch.testing.assert_close(got["nll"], total / count, rtol=1e-5, atol=1e-5)  # fp32 model, fp64 reference
    torch.testing.assert_close(got["ppl"], math.exp(total / count), rtol=1e-5, atol=1e-5)


def test_perplexity_needs_two_token_windows():
    from dha.errors import UserError

    with pytest.raises(UserError, match="at least 2 tokens"):
        perplexity(tiny_model(), torch.zeros(2, 1, dtype=torch.long), progress=False)


# ---- KV-cache bytes ---------------------------------------------------------------------------


def dha_uneven_model() -> Transformer:
    """Layer 0: 3 key heads {0,1},{2},{3,4,5}, 2 value heads {0,2,4},{1,3,5}; layer 1: 1 key head, 4 value heads."""
    key_index = [[0, 0, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0]]
    value_index = [[0, 1, 0, 1, 0, 1], [0, 1, 2, 3, 3, 3]]
    mha = tiny_model()
    cfg = with_maps(mha.config, key_index, value_index)
    sd = state_dict_of(mha)
    for l, (hk, hv) in enumerate([(3, 2), (1, 4)]):  # keep the first hk / hv heads' rows (8 rows per head)
        sd[f"layers.{l}.attn.k_proj.weight"] = sd[f"layers.{l}.attn.k_proj.weight"][: hk * 8]
        sd[f"layers.{l}.attn.v_proj.weight"] = sd[f"layers.{l}.attn.v_proj.weight"][: hv * 8]
    return build(cfg, sd).eval()


def tensors_held(obj) -> list[torch.Tensor]:
    """Every tensor an object holds in its attributes (inside lists, tuples and dicts too)."""
    out, stack = [], list(vars(obj).values())
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return out


@pytest.mark.parametrize(
    "name, make, heads_per_layer",
    [
        ("mha", lambda: ours_from_hf(tiny_llama_hf()), [(6, 6), (6, 6)]),
        ("gqa", lambda: ours_from_hf(tiny_llama_hf(num_kv_heads=2)), [(2, 2), (2, 2)]),
        ("dha", dha_uneven_model, [(3, 2), (1, 4)]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_kv_bytes_equal_analytic(name, make, heads_per_layer, dtype):
    """The expected bytes are counted here from the heads per layer (head dim 8), not from the
    config; then measured apart from dha: what the K/V projections emit per token (forward hooks),
    the bytes of the storages the cache object holds after a forward, and that what it holds is
    those projections (values: v_proj's output, bit for bit)."""
    model = make().to(dtype)
    expected = sum((hk + hv) * 8 for hk, hv in heads_per_layer) * (4 if dtype == torch.float32 else 2)
    got = kv_bytes(model)
    assert got["analytic"] == expected
    assert got["measured"] == expected

    outputs, max_len, T = {}, 16, 8
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: outputs.__setitem__(n, out.detach()))
        for n, m in model.named_modules()
        if n.endswith(("k_proj", "v_proj"))
    ]
    cache = model.new_cache(1, max_len)
    with torch.no_grad():
        model(random_ids(1, T, vocab=model.config.vocab_size), cache)
    for h in hooks:
        h.remove()
    assert sum(o.shape[-1] * o.element_size() for o in outputs.values()) == expected  # per token
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_held(cache)}
    assert sum(storages.values()) == expected * max_len
    for l, (hk, hv) in enumerate(heads_per_layer):
        held = [
            t
            for t in tensors_held(cache)
            if t.dim() == 4
            and t.shape[1] == hv
            and torch.equal(t[0, :, :T], outputs[f"layers.{l}.attn.v_proj"][0].view(T, hv, 8).transpose(0, 1))
        ]
        assert held, f"layer {l}: the cache does not hold v_proj's {hv} value heads"


# ---- speed and the whole evaluation ------------------------------------------------------------


def loaded_tiny(model=None, source="tiny") -> Loaded:
    return Loaded(model or tiny_model(), tiny_tokenizer(), source, "native")


def reference_ppl(model, windows: torch.Tensor) -> float:
    """exp of torch's mean cross-entropy of every window's tokens 1.. given the same window's
    logits (one forward over all the windows at once, fp32 model, logits taken to fp64)."""
    with torch.no_grad():
        logits = model(windows).double()  # (n, W, V)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_evaluate_and_compare(monkeypatch):
    clock = SpeedClock(monkeypatch)
    stream = torch.tensor([(i * 37) % 300 for i in range(200)])
    splits = TokenSplits(stream[:100], stream[100:], "synthetic", 1, 1)
    windows = stream[100:164].view(4, 16)  # max 64 tokens -> 4 windows of 16, first token unscored
    hf = tiny_llama_hf(vocab_size=300)
    source = loaded_tiny(ours_from_hf(hf))
    t0 = time.perf_counter()
    one = evaluate(source, splits, FAST)
    wall = time.perf_counter() - t0
    assert one["eval_tokens"] == 4 * 15
    with torch.no_grad():
        hf_ppl = math.exp(hf(windows, labels=windows).loss.item())  # transformers' own shifted mean loss
    torch.testing.assert_close(one["ppl"], hf_ppl, rtol=1e-5, atol=0)  # fp32 models, different kernels and batching

    # Speed columns: batch sizes 1 and 2 at context 8, 3 new tokens (FAST), each record against
    # the test's clock (tests.speed_clock); the top-level numbers are the largest batch's (2).
    assert [(s["batch_size"], s["context"], s["new_tokens"]) for s in one["speed"]] == [(1, 8, 3), (2, 8, 3)]
    for s in one["speed"]:
        clock.check_record(s, clock.timed_run(lambda r: r.model is source.model, s["batch_size"], 8, 3))
        assert s["kv_cache_bytes"] == 2 * (6 + 6) * 8 * 4 * s["batch_size"] * (8 + 3)  # layers, K+V heads, hd, fp32
        assert s["peak_memory_bytes"] > 0
    batch2 = clock.timed_run(lambda r: r.model is source.model, 2, 8, 3)
    assert one["decode_batch_size"] == 2
    assert (
        batch2.decoded_tokens / batch2.decode_outer * (1 - 1e-9)
        <= one["decode_tokens_per_s"]
        <= batch2.decoded_tokens / batch2.decode_inner * (1 + 1e-9)
    )  # float64 seconds, 1e-9 relative for rounding
    assert one["decode_tokens_per_s"] >= 2 * 3 / wall  # and the whole evaluate() call bounds it too

    dha = loaded_tiny(dha_uneven_model(), "dha")
    report = evaluate_models([loaded_tiny(ours_from_hf(hf)), dha], splits, FAST)
    a, b = report["models"]
    ref_a, ref_b = hf_ppl, reference_ppl(dha.model, windows)  # transformers' loss; torch's cross-entropy
    torch.testing.assert_close(a["ppl"], ref_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(b["ppl"], ref_b, rtol=1e-5, atol=0)  # fp32 model, fp64 loss
    assert abs(ref_b / ref_a - 1) > 1e-3  # two different models: the ratio below says something
    torch.testing.assert_close(b["ratios"]["ppl"], ref_b / ref_a, rtol=2e-5, atol=0)  # each side within 1e-5
    assert b["ratios"]["kv_bytes_per_token"] == pytest.approx((3 + 2 + 1 + 4) / 24)
    assert set(b["ratios"]["decode_tokens_per_s"]) == {"1", "2"}


# ---- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def saved_tiny(tmp_path):
    path = str(tmp_path / "tiny_ckpt")
    save(path, loaded_tiny())
    return path


def write_text_data(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("\n\n".join(DOCS * 3))  # repeated documents share hashes: split by content
    return str(p)


CLI_FAST = [
    "--eval-block-size",
    "16",
    "--max-eval-tokens",
    "64",
    "--context",
    "8",
    "--new-tokens",
    "3",
    "--batch-sizes",
    "1,2",
    "--repeats",
    "1",
    "--heldout-fraction",
    "0.3",
]


def test_cli_eval_prints_table_then_json_line(tmp_path, saved_tiny, capsys):
    data = write_text_data(tmp_path)
    assert main(["eval", saved_tiny, "--data", data, *CLI_FAST]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 3 and "perplexity" in lines[1]
    report = json.loads(lines[-1])
    for key in ("ppl", "kv_bytes_per_token", "decode_tokens_per_s", "models"):
        assert key in report
    assert report["kv_bytes_per_token"] == 2 * 2 * 6 * 8 * 4  # layers x (K+V) x heads x hd x fp32
    assert report["eval_tokens"] == 4 * 15


def test_cli_eval_compare(tmp_path, saved_tiny, capsys):
    other = str(tmp_path / "dha_ckpt")
    save(other, loaded_tiny(dha_uneven_model(), other))
    data = write_text_data(tmp_path)
    assert main(["eval", saved_tiny, "--compare", other, "--data", data, "--json", *CLI_FAST]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    assert [os.path.basename(m["source"]) for m in report["models"]] == ["tiny_ckpt", "dha_ckpt"]
    assert report["models"][1]["ratios"]["kv_bytes_per_token"] == pytest.approx(10 / 24)
    # Perplexities against references computed here: the held-out documents by the documented
    # split rule (tests.test_data.reference_split), tokenised, the first 64 tokens as 4 windows of
    # 16, each model's torch cross-entropy on them (fp32 models, fp64 loss, rtol 1e-5).
    _, held = reference_split(DOCS * 3, 0.3)
    windows = reference_stream(held, tiny_tokenizer())[:64].view(4, 16)
    ref_a, ref_b = reference_ppl(tiny_model(), windows), reference_ppl(dha_uneven_model(), windows)
    torch.testing.assert_close(report["ppl"], ref_a, rtol=1e-5, atol=0)  # the top level: the first model's
    torch.testing.assert_close(report["models"][1]["ppl"], ref_b, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        report["models"][1]["ratios"]["ppl"], ref_b / ref_a, rtol=2e-5, atol=0
    )  # each side within 1e-5


def test_cli_eval_bad_data_exits_2_and_writes_nothing(tmp_path, saved_tiny, capsys):
    before = sorted(os.listdir(tmp_path))
    assert main(["eval", saved_tiny, "--data", str(tmp_path / "nope.jsonl"), *CLI_FAST]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "data not found" in captured.err and len(captured.err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert main(["eval", saved_tiny, "--data", str(bad), *CLI_FAST]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no 'text' field" in captured.err
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["bad.jsonl"])  # no cache, no outputs


def test_cli_eval_tasks_without_lm_eval_is_one_clear_error(tmp_path, saved_tiny, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "dha.lm_eval_adapter", raising=False)
    assert main(["eval", saved_tiny, "--data", write_text_data(tmp_path), "--tasks", "tiny_mc", *CLI_FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dha: error: --tasks needs lm-evaluation-harness: pip install lm-eval"]
