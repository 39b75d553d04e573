"""--offload (the model in CPU memory, one decoder layer at a time on --device) and the fit check
before any work (dha.memory), on the CPU; the same on a GPU in tests/test_cuda.py.

- `convert --offload` (dha without training, svd, gqa-similar) writes the model, plan and report
  numbers that the same conversion without it writes (fp32, atol 1e-5), and `analyze --offload`
  the same analysis; the offload path is the one taken (the loader is asked for the CPU, the
  sweeps get the compute device explicitly).
- What needs the whole model on the device (training, prune, the learned search) refuses
  --offload: exit 2, one line, nothing loaded or written.
- The fit check: the parameter counts it reads from a config before loading equal those of
  transformers' own model (the independent reference); with the free memory monkeypatched small
  every refusal is exit 2 with the numbers in one line, nothing written, no weights or data read;
  on a (simulated) GPU a model that fits only layer by layer is refused without --offload and,
  with it, loaded onto the CPU in its own dtype.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import dha.checkpoint
import dha.data
import dha.layerwise
import dha.memory
from dha.checkpoint import source_shape
from dha.cli import main
from dha.memory import GiB, Sizes, Work, estimate
from dha.plan import Plan
from tests.conftest import ours_from_hf, save_tiny_source, tiny_llama_hf

CALIB = ["--calib-tokens", "64", "--calib-block-size", "16"]
METHODS = {
    "dha": ["--method", "dha", "--tokens", "0"],
    "svd": ["--method", "svd"],
    "gqa-similar": ["--method", "gqa-similar"],
}


@pytest.fixture
def setup(cli_setup):
    return cli_setup


def run(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def spy(monkeypatch) -> dict:
    """The devices load() is asked for and the explicit devices the layer-by-layer sweeps get."""
    seen = {"load": [], "sweep": []}
    real_load, real_compute_device = dha.checkpoint.load, dha.layerwise.compute_device

    def load(*args, **kwargs):
        seen["load"].append(kwargs.get("device"))
        return real_load(*args, **kwargs)

    def compute_device(model, device=None):
        seen["sweep"].append(device)
        return real_compute_device(model, device)

    monkeypatch.setattr(dha.checkpoint, "load", load)
    monkeypatch.setattr(dha.layerwise, "compute_device", compute_device)
    return seen


# ---- the same result -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_offload_conversion_writes_the_same_model(method, setup, monkeypatch, capsys):
    src, data, tmp = setup
    common = [
        "convert",
        src,
        *METHODS[method],
        "--kv-budget",
        "0.5",
        "--data",
        data,
        *CALIB,
        "--device",
        "cpu",
        "--json",
    ]
    seen = spy(monkeypatch)
    reports = {}
    for name, extra in (("whole", []), ("offload", ["--offload"])):
        first = len(seen["sweep"])
        reports[name] = run(capsys, [*common, *extra, "--out", str(tmp / name)])
        sweeps = seen["sweep"][first:]
        assert sweeps and all(d == ("cpu" if extra else None) for d in sweeps), sweeps  # offload: the device is named
    assert seen["load"] == ["cpu", "cpu"]
    plans = [Plan.load(str(tmp / name / "plan.json")) for name in ("whole", "offload")]
    assert plans[0].layers == plans[1].layers
    models = [dha.checkpoint.load(str(tmp / name), tokenizer=False).model.state_dict() for name in ("whole", "offload")]
    assert models[0].keys() == models[1].keys()
    for k in models[0]:
        assert models[1][k].dtype == torch.float32
        torch.testing.assert_close(models[1][k], models[0][k], atol=1e-5, rtol=0)
    if method == "dha":  # the report's perplexities, source and result
        for key in ("source_ppl", "ppl"):
            assert reports["offload"][key] == pytest.approx(reports["whole"][key], rel=1e-5)


def test_offload_analysis_is_the_same(setup, capsys):
    src, data, tmp = setup
    common = ["analyze", src, "--data", data, *CALIB, "--device", "cpu", "--json"]
    for name, extra in (("whole", []), ("offload", ["--offload"])):
        run(capsys, [*common, *extra, "--out", str(tmp / name)])
    a, b = (json.load(open(tmp / name / "analysis.json")) for name in ("whole", "offload"))
    assert [(e["keys"]["clusters"], e["values"]["clusters"]) for e in a["layers"]] == [
        (e["keys"]["clusters"], e["values"]["clusters"]) for e in b["layers"]
    ]
    for ea, eb in zip(a["layers"], b["layers"]):
        for kind in ("keys", "values"):
            for metric in ("cka", "cosine"):
                torch.testing.assert_close(
                    torch.tensor(eb[kind][metric]), torch.tensor(ea[kind][metric]), atol=1e-5, rtol=0
                )


# ---- refusals --------------------------------------------------------------------------------------


def nothing_may_be_read(monkeypatch):
    """Fail the test if a model is loaded, a weights file is read or the data is tokenised."""

    def refuse(*args, **kwargs):
        raise AssertionError("read before the refusal")

    for module, name in ((dha.checkpoint, "load"), (dha.checkpoint, "read_safetensors"), (dha.data, "load_tokens")):
        monkeypatch.setattr(module, name, refuse)


def refused(capsys, argv: list[str], out: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("dha: error: "), captured.err
    assert not os.path.exists(out)
    return lines[0]


@pytest.mark.parametrize(
    "extra, conflict",
    [
        (
            ["--method", "dha", "--tokens", "64", "--block-size", "16", "--batch-tokens", "32"],
            "--tokens N trains the whole model",
        ),
        (
            ["--method", "svd", "--tokens", "64", "--block-size", "16", "--batch-tokens", "32"],
            "--tokens N trains the whole model",
        ),
        (["--method", "prune"], "--method prune runs whole-model forward passes"),
        (["--method", "dha", "--search", "learned"], "--search learned trains its gates on the whole model"),
    ],
)
def test_what_needs_the_whole_model_refuses_offload(extra, conflict, setup, monkeypatch, capsys):
    src, data, tmp = setup
    nothing_may_be_read(monkeypatch)
    out = str(tmp / "out")
    line = refused(
        capsys, ["convert", src, *extra, "--kv-budget", "0.5", "--data", data, "--offload", "--out", out], out
    )
    assert (
        line
        == f"dha: error: --offload keeps the model in CPU memory, one layer at a time on the device, but {conflict} "
        "on the device: drop one of them"
    )


# ---- the fit check ---------------------------------------------------------------------------------


def test_sizes_read_before_loading_equal_the_hf_model(tmp_path):
    """Parameter counts from the config (a meta-device model) against transformers' LlamaForCausalLM
    (tied and untied, GQA); the dtype from the weights headers against the dtype the loader gives."""
    for tie, kv in ((False, 6), (True, 3)):
        hf = tiny_llama_hf(num_kv_heads=kv, tie=tie)
        path = str(tmp_path / f"hf-{tie}")
        hf.to(torch.bfloat16).save_pretrained(path)
        cfg, dtype = source_shape(path)
        loaded = dha.checkpoint.load(path, tokenizer=False)
        assert cfg == loaded.model.config and dtype == torch.bfloat16 == next(loaded.model.parameters()).dtype
        sizes = Sizes.of(cfg)
        assert sizes.total == hf.num_parameters()
        assert sizes.layers == [sum(p.numel() for p in layer.parameters()) for layer in hf.model.layers]
        assert sizes.attention == [sum(p.numel() for p in layer.self_attn.parameters()) for layer in hf.model.layers]
        whole = estimate(cfg, torch.bfloat16, Work()).whole
        assert whole[0] == ("the weights in bfloat16", 2 * hf.num_parameters())
    native = save_tiny_source(str(tmp_path / "native"), ours_from_hf(tiny_llama_hf()))
    assert source_shape(native) == (dha.checkpoint.load(native, tokenizer=False).model.config, torch.float32)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@pytest.mark.parametrize("verb", ["analyze", "svd", "dha"])
def test_no_room_on_the_cpu_is_refused_before_loading(verb, setup, monkeypatch, capsys):
    """On the CPU the weights stay memory-mapped (not counted); the work's own memory must fit."""
    src, data, tmp = setup
    out = str(tmp / "out")
    monkeypatch.setattr(dha.memory, "free_memory", lambda device: 12345)
    nothing_may_be_read(monkeypatch)
    argv = ["analyze", src] if verb == "analyze" else ["convert", src, *METHODS[verb], "--kv-budget", "0.5"]
    for offload in ([], ["--offload"]):  # the same on the CPU: the model is in CPU memory either way
        line = refused(capsys, [*argv, "--data", data, *CALIB, "--device", "cpu", *offload, "--out", out], out)
        assert re.fullmatch(
            rf"dha: error: {re.escape(src)} does not fit in the CPU's memory: it needs about (\S+) GiB "
            r"\(working memory \1 GiB\) besides its memory-mapped weights; the CPU has 0\.00 GiB available "
            r"\(MemAvailable\)",
            line,
        ), line


def test_training_that_cannot_fit_is_refused_before_loading(setup, monkeypatch, capsys):
    src, data, tmp = setup
    out = str(tmp / "out")
    monkeypatch.setattr(dha.memory, "free_memory", lambda device: 2**20)
    nothing_may_be_read(monkeypatch)
    line = refused(
        capsys,
        [
            "convert",
            src,
            "--method",
            "gqa",
            "--kv-budget",
            "0.5",
            "--data",
            data,
            "--tokens",
            "64",
            "--block-size",
            "16",
            "--batch-tokens",
            "32",
            "--device",
            "cpu",
            "--out",
            out,
        ],
        out,
    )
    params = tiny_llama_hf().num_parameters()
    assert line.startswith(f"dha: error: {src} does not fit in the CPU's memory: it needs about "), line
    assert (
        f"(weights, gradients and AdamW state in float32 {gib(16 * params)} + the source and teacher in float32 "
        f"{gib(4 * params)} + activations of a micro-batch " in line
    ), line
    assert line.endswith("; the CPU has 0.00 GiB available (MemAvailable)"), line


class Loaded(Exception):
    """Raised by a stand-in loader: the fit check let the work through."""


def simulate_gpu(monkeypatch, free: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(dha.memory, "free_memory", lambda device: free)


@pytest.mark.parametrize("verb", ["analyze", "svd", "dha"])
def test_the_fit_check_on_a_gpu(verb, setup, monkeypatch, capsys):
    """A (simulated) GPU with too little memory for either way, for the whole model only (refused
    with the way out: --offload) and for one layer at a time only; with --offload and room for a
    layer, the model is loaded onto the CPU in the checkpoint's own dtype (float32), not bf16.
    (For dha on this tiny model one layer at a time needs more than the whole model: the report's
    perplexity holds every held-out token's hidden states, which outweighs the weights here.)"""
    src, data, tmp = setup
    out = str(tmp / "out")
    argv = ["analyze", src] if verb == "analyze" else ["convert", src, *METHODS[verb], "--kv-budget", "0.5"]
    argv = [*argv, "--data", data, *CALIB, "--device", "cuda", "--out", out]
    work = Work(
        calib_tokens=64,
        calib_block=16,
        gradients=verb == "dha",
        merge=None if verb == "analyze" else "aligned",
        eval_tokens=16384 if verb == "dha" else 0,
    )  # what the verb runs (dha: the pipeline's final table)
    est = estimate(source_shape(src)[0], torch.bfloat16, work)
    whole, layer = (sum(b for _, b in parts) for parts in (est.whole, est.layer))
    assert (layer < whole) == (verb != "dha")
    weights = 2 * tiny_llama_hf().num_parameters()  # bfloat16 on a GPU
    assert est.whole[0] == ("the weights in bfloat16", weights)
    nothing_may_be_read(monkeypatch)

    simulate_gpu(monkeypatch, min(layer, whole) - 1)
    line = refused(capsys, argv, out)
    assert line.startswith(
        f"dha: error: {src} does not fit on cuda:0: the whole model needs about {gib(whole)} (the weights in "
        f"bfloat16 {gib(weights)} + working memory {gib(whole - weights)}), and one layer at a time about "
        f"{gib(layer)} (its largest layer in float32 "
    ), line
    assert line.endswith(f"; cuda:0 has {gib(min(layer, whole) - 1)} free"), line
    if layer < whole:
        simulate_gpu(monkeypatch, (layer + whole) // 2)
        line = refused(capsys, argv, out)
        assert line.endswith(
            f"; cuda:0 has {gib((layer + whole) // 2)} free. Give --offload to keep it in CPU memory and "
            f"bring one layer at a time to cuda:0 (about {gib(layer)})"
        ), line
    simulate_gpu(monkeypatch, layer - 1)
    line = refused(capsys, [*argv, "--offload"], out)
    assert line.startswith(
        f"dha: error: {src} does not fit on cuda:0 even one layer at a time: it needs about {gib(layer)} "
    ), line

    def load(*args, **kwargs):
        raise Loaded(args, kwargs)

    simulate_gpu(monkeypatch, layer)
    monkeypatch.setattr(dha.checkpoint, "load", load)
    with pytest.raises(Loaded) as loaded:
        main([*argv, "--offload"])
    (source, dtype), kwargs = loaded.value.args
    assert (source, dtype, kwargs["device"]) == (src, None, "cpu")
    assert not os.path.exists(out)
