"""--device on every verb (dha.device): what it accepts, the refusal of a device this machine lacks
before any work, loading onto a device in a dtype, and every verb run with --device cpu.

The same verb commands run on a GPU in tests/test_cuda.py (marked `cuda`, skipped without one)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import dha.checkpoint
import dha.layerwise
from dha.cli import build_parser, main
from dha.device import inference_dtype, resolve_device
from dha.errors import UserError
from dha.model import Transformer
from tests.conftest import ours_from_hf, save_tiny_source, text_file, tiny_llama_hf

# Each verb (convert once per method) with the smallest options that still do its work: {src},
# {data} and {out} are filled in by `argv`.
CALIB = ["--data", "{data}", "--calib-tokens", "64", "--calib-block-size", "16"]
VERBS = {
    "inspect": ["inspect", "{src}", "--json"],
    "generate": ["generate", "{src}", "--prompt", "the quick brown fox", "--max-new-tokens", "3", "--json"],
    "eval": [
        "eval",
        "{src}",
        "--data",
        "{data}",
        "--eval-block-size",
        "16",
        "--max-eval-tokens",
        "64",
        "--context",
        "8",
        "--new-tokens",
        "2",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--heldout-fraction",
        "0.3",
        "--json",
    ],
    "export": ["export", "{src}", "--out", "{out}"],
    "analyze": ["analyze", "{src}", *CALIB, "--out", "{out}"],
    "convert-gqa": ["convert", "{src}", "--method", "gqa", "--kv-budget", "0.5", "--out", "{out}", "--json"],
    "convert-gqa-similar": [
        "convert",
        "{src}",
        "--method",
        "gqa-similar",
        "--kv-budget",
        "0.5",
        *CALIB,
        "--out",
        "{out}",
        "--json",
    ],
    "convert-svd": ["convert", "{src}", "--method", "svd", "--kv-budget", "0.5", *CALIB, "--out", "{out}", "--json"],
    "convert-prune": [
        "convert",
        "{src}",
        "--method",
        "prune",
        "--kv-budget",
        "0.5",
        *CALIB,
        "--out",
        "{out}",
        "--json",
    ],
    "convert-gqa-trained": [
        "convert",
        "{src}",
        "--method",
        "gqa",
        "--kv-budget",
        "0.5",
        "--data",
        "{data}",
        "--tokens",
        "64",
        "--block-size",
        "16",
        "--batch-tokens",
        "32",
        "--no-progress",
        "--out",
        "{out}",
        "--json",
    ],
    "convert-dha": [
        "convert",
        "{src}",
        "--method",
        "dha",
        "--kv-budget",
        "0.5",
        *CALIB,
        "--tokens",
        "128",
        "--block-size",
        "16",
        "--batch-tokens",
        "64",
        "--fusion-fraction",
        "0.5",
        "--no-progress",
        "--out",
        "{out}",
        "--json",
    ],
    "train": [
        "train",
        "{src}",
        "--data",
        "{data}",
        "--tokens",
        "64",
        "--block-size",
        "16",
        "--batch-tokens",
        "32",
        "--no-progress",
        "--out",
        "{out}",
    ],
    "bench": [
        "bench",
        "{src}",
        "--batch-sizes",
        "1",
        "--contexts",
        "4",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--json",
    ],
}
REPORTS_DEVICE = ("eval", "bench", "export")  # verbs whose JSON line says where they ran


def argv(verb: str, src: str, data: str, out: str) -> list[str]:
    return [a.format(src=src, data=data, out=out) for a in VERBS[verb]]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """(tiny 6-head LLaMA source with a tokenizer, a text file, a fresh --out path)."""
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    src = save_tiny_source(str(tmp_path / "tiny"), ours_from_hf(tiny_llama_hf()))
    return src, text_file(str(tmp_path / "data.txt")), str(tmp_path / "out")


def spy_on_devices(monkeypatch) -> dict:
    """Record the device every load() was asked for and where every forward pass of our model ran
    (whole-model forwards, and the layer-by-layer sweeps of dha.layerwise)."""
    seen = {"load": [], "forward": []}
    real_load, real_forward = dha.checkpoint.load, Transformer.forward

    def load(*args, **kwargs):
        seen["load"].append(kwargs.get("device"))
        return real_load(*args, **kwargs)

    def forward(self, input_ids, *args, **kwargs):
        seen["forward"].append((input_ids.device, next(self.parameters()).device))
        return real_forward(self, input_ids, *args, **kwargs)

    real_compute_device = dha.layerwise.compute_device

    def compute_device(model, device=None):  # the layer-by-layer sweeps (calibration, analyze)
        where = real_compute_device(model, device)
        seen["forward"].append((where, next(model.parameters()).device))
        return where

    monkeypatch.setattr(dha.checkpoint, "load", load)
    monkeypatch.setattr(Transformer, "forward", forward)
    monkeypatch.setattr(dha.layerwise, "compute_device", compute_device)
    return seen


# ---- parsing ---------------------------------------------------------------------------------------


def test_resolve_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cpu", "CPU", " cpu ", "cpu:0"):
        assert resolve_device(spec) == torch.device("cpu")
    for spec in ("foo", "mps", "meta", "cpu:1", "cuda:-1", "cuda:x", ""):
        with pytest.raises(UserError, match="unknown --device"):
            resolve_device(spec)


def test_resolve_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(UserError, match=f"--device {spec}: this machine has no usable GPU"):
            resolve_device(spec)


def test_resolve_device_gpu_indices(monkeypatch):
    """With two GPUs (as torch reports them): indices 0 and 1 exist, 7 does not; under torchrun
    `auto` and `cuda` mean this process's GPU, cuda:LOCAL_RANK."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"there is no GPU cuda:7; this machine has 2 \(cuda:0, cuda:1\)"):
        resolve_device("cuda:7")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_explicit_gpu_under_torchrun_is_refused(setup, monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE > 1) `cuda:N` would put every process on GPU N: refused, in one
    line before any work; `auto` and `cuda` give each process cuda:LOCAL_RANK, `cpu` stays the CPU."""
    src, data, out = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    message = (
        "--device cuda:0 under torchrun (WORLD_SIZE=2) would put every process on that one GPU: "
        "give --device cuda or auto"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_device("cuda:0")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(
        dha.checkpoint, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded"))
    )
    capsys.readouterr()
    assert main([*argv("train", src, data, out), "--device", "cuda:1"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dha: error: --device cuda:1 under torchrun (WORLD_SIZE=2)"), lines
    assert not os.path.exists(out)


def test_inference_dtype():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert inference_dtype(None, cuda) == torch.bfloat16  # --dtype auto on a GPU
    assert inference_dtype(None, cpu) is None  # the checkpoint's own
    assert (
        inference_dtype(torch.float16, cuda) == torch.float16 and inference_dtype(torch.float32, cpu) == torch.float32
    )


# ---- the option ------------------------------------------------------------------------------------


def test_every_verb_has_the_device_option():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    for name, parser in sub.choices.items():
        device = [a for a in parser._actions if "--device" in a.option_strings]
        assert len(device) == 1 and device[0].default == "auto", name
    assert {v.split("-")[0] for v in VERBS} == set(sub.choices)  # the verb list below covers every verb


@pytest.mark.parametrize("verb", sorted(VERBS))
@pytest.mark.parametrize(
    "spec, gpus, message",
    [
        ("cuda", 0, "--device cuda: this machine has no usable GPU"),
        ("cuda:7", 1, "--device cuda:7: there is no GPU cuda:7; this machine has 1 (cuda:0)"),
        ("foo", 0, "unknown --device 'foo'"),
    ],
)
def test_absent_device_is_refused_before_any_work(verb, spec, gpus, message, setup, monkeypatch, capsys):
    src, data, out = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(dha.checkpoint, "load", no_load)
    capsys.readouterr()
    assert main([*argv(verb, src, data, out), "--device", spec]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith(f"dha: error: {message}"), captured.err
    assert not os.path.exists(out) and not os.path.exists(os.environ["DHA_CACHE"])  # nothing written, no data read


# ---- loading onto a device ---------------------------------------------------------------------------


def test_load_reads_onto_the_device_in_the_dtype(tmp_path):
    """Native and HF-directory loads in bfloat16 on the CPU: every weight is the source weight
    rounded to bfloat16 (the reference: the HF model's own tensors cast), buffers beside them."""
    hf = tiny_llama_hf()
    hf.save_pretrained(str(tmp_path / "hf"))
    native = save_tiny_source(str(tmp_path / "native"), ours_from_hf(hf))
    reference = ours_from_hf(hf).state_dict()
    for path in (native, str(tmp_path / "hf")):
        loaded = dha.checkpoint.load(path, torch.bfloat16, tokenizer=False, device="cpu")
        sd = loaded.model.state_dict()
        assert sd.keys() == reference.keys()
        for name, tensor in sd.items():
            assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu", name
            assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
        assert all(b.device.type == "cpu" for b in loaded.model.buffers())


# ---- every verb on --device cpu -------------------------------------------------------------------------


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_runs_on_the_cpu(verb, setup, monkeypatch, capsys):
    src, data, out = setup
    seen = spy_on_devices(monkeypatch)
    assert main([*argv(verb, src, data, out), "--device", "cpu"]) == 0
    assert seen["load"] and all(d is not None and torch.device(d) == torch.device("cpu") for d in seen["load"]), seen[
        "load"
    ]
    if verb not in ("inspect", "convert-gqa"):  # these two only read shapes and weights
        assert seen["forward"], "no forward pass"
    assert all(i.type == "cpu" and p.type == "cpu" for i, p in seen["forward"])
    assert reported_devices(capsys.readouterr().out) == ({"cpu"} if verb in REPORTS_DEVICE else set())


def reported_devices(stdout: str) -> set[str]:
    """The devices a verb's JSON line names: where eval and bench ran, where export checked."""
    last = stdout.strip().splitlines()[-1]
    report = json.loads(last) if last.startswith("{") else {}
    return {d for d in (report.get("device"), report.get("check", {}).get("device")) if d is not None}
