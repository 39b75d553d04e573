"""dha.bench and `dha bench`: the speed records and ratios against the test's own clock
(tests.speed_clock), the JSON line has the fields it documents, the plot is written, transformers'
row on a stock-exportable model, and a point that cannot fit in memory exits 2 before anything
runs. Tiny models (hidden 48, 2 layers, 6 heads), fp32 on CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dha.bench import BenchOptions, Runner, TransformersRunner, bench, measure
from dha.checkpoint import Loaded
from dha.cli import main
from dha.memory import Generation, generation_bytes
from tests.conftest import ours_from_hf, save_tiny_source, tiny_llama_hf
from tests.speed_clock import SpeedClock
from tests.test_evaluate import dha_uneven_model

FAST = ["--batch-sizes", "1,2", "--contexts", "4,8", "--new-tokens", "2", "--repeats", "1"]
RESULT_FIELDS = {
    "model",
    "batch_size",
    "context",
    "new_tokens",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "prefill_s",
    "decode_s",
    "kv_cache_bytes",
    "peak_memory_bytes",
    "run_memory_bytes",
    "peak_memory_kind",
    "ratios",
}
MODEL_FIELDS = {
    "name",
    "source",
    "kind",
    "dtype",
    "parameters",
    "key_heads_total",
    "value_heads_total",
    "kv_bytes_per_token",
    "attention_paths",
}


def test_measure_records_against_an_independent_clock(monkeypatch):
    """Seconds and tokens/s fit between the test's own perf_counter timings of each run and of the
    prefill and decode calls inside it (tests.speed_clock); tokens counted from those calls."""
    clock = SpeedClock(monkeypatch)
    models = [ours_from_hf(tiny_llama_hf(num_kv_heads=2)), dha_uneven_model()]
    out = measure([Runner(m) for m in models], [(1, 8), (2, 5)], new_tokens=3, repeats=1, progress=False)
    for model, per_point in zip(models, out):
        for s, (b, c) in zip(per_point, [(1, 8), (2, 5)]):
            assert (s["batch_size"], s["context"], s["new_tokens"]) == (b, c, 3)
            clock.check_record(s, clock.timed_run(lambda r: r.model is model, b, c, 3))
            assert s["kv_cache_bytes"] == model.config.kv_bytes_per_token() * b * (c + 3)
            assert s["peak_memory_bytes"] > 0 and s["run_memory_bytes"] >= 0


def test_transformers_runner_decodes_what_ours_decodes():
    """The same greedy tokens from transformers' LlamaForCausalLM and from ours on its weights."""
    hf = tiny_llama_hf(num_kv_heads=3)
    ours, theirs = Runner(ours_from_hf(hf)), TransformersRunner(hf, ours_from_hf(hf).config)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    tokens = []
    with torch.no_grad():
        for runner in (ours, theirs):
            cache, logits = runner.prefill(ids, 12)
            seq = []
            for _ in range(5):
                seq.append(logits.argmax(-1, keepdim=True))
                cache, logits = runner.step(cache, seq[-1])
            tokens.append(torch.cat(seq, 1))
            assert (
                runner.cache_bytes(cache) == 2 * 2 * 3 * 8 * 4 * 2 * 12
            )  # layers, K+V, heads, hd, fp32, batch, 7 + 5 tokens
    assert torch.equal(tokens[0], tokens[1])


def test_bench_report_ratios_and_transformers_row(tmp_path, monkeypatch):
    clock = SpeedClock(monkeypatch)
    hf = tiny_llama_hf(num_kv_heads=2)
    source = Loaded(ours_from_hf(hf), None, "tiny-gqa", "native", hf_config=hf.config.to_dict())
    dha = Loaded(dha_uneven_model(), None, "tiny-dha", "native")
    report = bench(
        [source, dha],
        BenchOptions(batch_sizes=[1], contexts=[4, 8], new_tokens=2, repeats=1, progress=False),
        with_transformers=True,
    )
    names = [m["name"] for m in report["models"]]
    assert names == ["tiny-gqa", "transformers:tiny-gqa", "tiny-dha"]
    assert report["models"][1]["hf_class"] == "LlamaForCausalLM"
    assert report["models"][2]["attention_paths"] == {"decoupled": 2}
    assert any(n.startswith("tiny-dha: no transformers row") for n in report["notes"])
    # The rows' runners, told apart by what they run: our model objects, and transformers' class.
    pick = {
        "tiny-gqa": lambda r: r.model is source.model,
        "tiny-dha": lambda r: r.model is dha.model,
        "transformers:tiny-gqa": lambda r: r.kind == "transformers",
    }
    heads = {
        "tiny-gqa": 2 * (2 + 2),
        "transformers:tiny-gqa": 2 * (2 + 2),
        "tiny-dha": 3 + 2 + 1 + 4,
    }  # K+V heads, all layers
    for r in report["results"]:
        c = r["context"]
        run, base = clock.timed_run(pick[r["model"]], 1, c, 2), clock.timed_run(pick["tiny-gqa"], 1, c, 2)
        clock.check_record(r, run)
        # Decode speed ratio to tiny-gqa at the same point, bounded by the test's clock: each decode
        # took between its inner and outer spans (tests.speed_clock; float64, 1e-9 relative).
        low = (run.decoded_tokens / run.decode_outer) / (base.decoded_tokens / base.decode_inner)
        high = (run.decoded_tokens / run.decode_inner) / (base.decoded_tokens / base.decode_outer)
        assert low * (1 - 1e-9) <= r["ratios"]["decode_tokens_per_s"] <= high * (1 + 1e-9), (low, r["ratios"], high)
        # Cache bytes: counted from the heads (head dim 8, fp32, batch 1, context + 2 tokens), exact.
        assert r["kv_cache_bytes"] == heads[r["model"]] * 8 * 4 * 1 * (c + 2)
        assert r["ratios"]["kv_cache_bytes"] == pytest.approx(heads[r["model"]] / heads["tiny-gqa"], rel=1e-12)
    dha_row = next(r for r in report["results"] if r["model"] == "tiny-dha" and r["context"] == 8)
    assert dha_row["ratios"]["kv_cache_bytes"] == pytest.approx((3 + 2 + 1 + 4) / (4 * 2))


def test_cli_bench_table_json_line_and_plot(tmp_path, capsys):
    path = save_tiny_source(str(tmp_path / "tiny"), dha_uneven_model())
    out = tmp_path / "out"
    assert main(["bench", path, path, *FAST, "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert "decode tok/s" in "\n".join(lines[:-1])
    assert set(report) >= {"models", "results", "notes", "options", "device", "threads", "torch"}
    assert len(report["models"]) == 2 and report["models"][0]["name"] != report["models"][1]["name"]
    assert all(set(m) >= MODEL_FIELDS for m in report["models"])
    assert len(report["results"]) == 2 * 2 * 2 and all(set(r) >= RESULT_FIELDS for r in report["results"])
    assert sorted(os.listdir(out)) == ["bench.json", "decode_vs_context.png"]
    assert json.load(open(out / "bench.json")) == report
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", path, *FAST, "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_cli_bench_point_too_big_exits_2_before_running(tmp_path, capsys):
    path = save_tiny_source(str(tmp_path / "tiny"), dha_uneven_model())
    (_, kv_bytes), _ = generation_bytes(dha_uneven_model().config, torch.float32, Generation(10**6, 10**6, 2))
    assert kv_bytes == 10**6 * (10**6 + 2) * (3 + 2 + 1 + 4) * 8 * 4
    assert (
        main(
            [
                "bench",
                path,
                "--batch-sizes",
                "1000000",
                "--contexts",
                "1000000",
                "--new-tokens",
                "2",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "batch 1000000 x context 1000000" in err and "GiB" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def test_decode_only_times_decode_after_a_random_cache(monkeypatch):
    clock = SpeedClock(monkeypatch)
    hf = tiny_llama_hf(num_kv_heads=2)
    runners = [Runner(ours_from_hf(hf)), TransformersRunner(hf, ours_from_hf(hf).config)]
    out = measure(runners, [(2, 6)], new_tokens=3, repeats=1, progress=False, decode_only=True)
    for runner, per_point in zip(runners, out):
        s = per_point[0]
        assert s["prefill_s"] is None and s["prefill_tokens_per_s"] is None
        clock.check_record(
            s, clock.timed_run(lambda r: r is runner, 2, 6, 3), decode_only=True
        )  # no prefill call, one random cache
        assert s["kv_cache_bytes"] == 2 * 2 * 2 * 8 * 4 * 2 * (6 + 3)  # layers, K+V, heads, hd, fp32, batch, tokens
