"""On a GPU: every verb with --device cuda, and conversions, evaluation and generation on CUDA
against the same on the CPU. Marked `cuda`: skipped, saying why, where torch sees no GPU;
scripts/gpu_check.sh runs them (with one small end-to-end conversion of the built-in model).

Tolerances: float32 on both devices differs only by summation order (kernels), so converted
models agree within 1e-3 in logits (logits of the tiny models are O(1)); bfloat16 on the GPU
against float32 on the CPU keeps 8 bits of mantissa, so perplexity agrees within 2% and logits
within 3% of their largest magnitude."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import dha.checkpoint
from dha.cli import main
from dha.device import resolve_device
from dha.errors import UserError
from dha.plan import Plan
from tests.conftest import ours_from_hf, random_ids, save_tiny_source, text_file, tiny_llama_hf
from tests.test_device import VERBS, argv, reported_devices, spy_on_devices

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)


@pytest.fixture
def setup(cli_setup):
    return cli_setup


def on_cuda(model) -> bool:
    return all(t.device == CUDA for t in [*model.parameters(), *model.buffers()])


def max_logit_diff(a, b, ids) -> tuple[float, float]:
    """(max |logits a - logits b|, max |logits b|) on `ids`, each model on its own device."""
    with torch.no_grad():
        la = a(ids.to(next(a.parameters()).device)).float().cpu()
        lb = b(ids.to(next(b.parameters()).device)).float().cpu()
    return (la - lb).abs().max().item(), lb.abs().max().item()


def run_json(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    assert main(args) == 0, args
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_resolve_device_on_this_machine():
    count = torch.cuda.device_count()
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:0") == CUDA
    with pytest.raises(UserError, match=f"there is no GPU cuda:{count}"):
        resolve_device(f"cuda:{count}")


def test_load_onto_cuda_in_bfloat16(setup):
    """Weights and head maps land on the GPU (and stay there through a transform); bf16 logits on
    the GPU agree with float32 on the CPU within bf16 rounding."""
    from dha.baselines import ConvertOptions, convert_gqa

    src = setup[0]
    cpu = dha.checkpoint.load(src, tokenizer=False).model
    gpu = dha.checkpoint.load(src, torch.bfloat16, tokenizer=False, device="cuda").model
    assert on_cuda(gpu) and all(p.dtype == torch.bfloat16 for p in gpu.parameters())
    diff, scale = max_logit_diff(gpu, cpu, random_ids())
    assert diff <= 3e-2 * scale, (diff, scale)
    _, merged = convert_gqa(gpu, 0.5, None, ConvertOptions())
    assert on_cuda(merged)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_runs_on_cuda(verb, setup, monkeypatch, capsys):
    src, data, tmp = setup
    seen = spy_on_devices(monkeypatch)
    assert main([*argv(verb, src, data, str(tmp / "out")), "--device", "cuda"]) == 0
    assert seen["load"] and all(torch.device(d) == CUDA for d in seen["load"]), seen["load"]
    assert all(i == CUDA and p == CUDA for i, p in seen["forward"]), seen["forward"][:3]
    if verb not in ("inspect", "convert-gqa"):
        assert seen["forward"]
    assert reported_devices(capsys.readouterr().out) == ({"cuda:0"} if verb in ("eval", "bench", "export") else set())


@pytest.mark.parametrize("method", ["svd", "prune", "gqa-similar", "dha", "dha-trained"])
def test_conversion_on_cuda_matches_the_cpu(method, setup, capsys):
    """The same conversion (float32 weights) on both devices: the same plan, logits within 1e-3."""
    src, data, tmp = setup
    extra = {
        "dha-trained": [
            "--method",
            "dha",
            "--tokens",
            "128",
            "--block-size",
            "16",
            "--batch-tokens",
            "64",
            "--fusion-fraction",
            "0.3",
            "--train-dtype",
            "float32",
            "--no-progress",
        ],
        "dha": ["--method", "dha", "--tokens", "0"],
    }.get(method, ["--method", method])
    common = [
        "convert",
        src,
        *extra,
        "--kv-budget",
        "0.5",
        "--data",
        data,
        "--calib-tokens",
        "128",
        "--calib-block-size",
        "16",
        "--dtype",
        "float32",
        "--json",
    ]
    for device in ("cpu", "cuda"):
        run_json(capsys, [*common, "--out", str(tmp / device), "--device", device])
    plans = [Plan.load(os.path.join(tmp, d, "plan.json")) for d in ("cpu", "cuda")]
    assert [(l.key_groups, l.value_groups) for l in plans[0].layers] == [
        (l.key_groups, l.value_groups) for l in plans[1].layers
    ]
    on_cpu, from_gpu = (
        dha.checkpoint.load(str(tmp / d), torch.float32, tokenizer=False).model for d in ("cpu", "cuda")
    )
    diff, scale = max_logit_diff(from_gpu, on_cpu, random_ids(length=16))
    assert diff <= 1e-3, (diff, scale)


def test_eval_on_cuda_in_bfloat16_matches_the_cpu(setup, capsys):
    src, data, _ = setup
    common = [
        "eval",
        src,
        "--data",
        data,
        "--eval-block-size",
        "16",
        "--max-eval-tokens",
        "128",
        "--context",
        "8",
        "--new-tokens",
        "4",
        "--batch-sizes",
        "1,2",
        "--repeats",
        "1",
        "--heldout-fraction",
        "0.3",
        "--json",
    ]
    cpu = run_json(capsys, [*common, "--device", "cpu"])
    gpu = run_json(capsys, [*common, "--device", "cuda"])
    assert (cpu["device"], cpu["dtype"], gpu["device"], gpu["dtype"]) == ("cpu", "float32", "cuda:0", "bfloat16")
    assert abs(gpu["ppl"] / cpu["ppl"] - 1) <= 0.02, (gpu["ppl"], cpu["ppl"])
    assert gpu["kv_bytes_per_token"] * 2 == cpu["kv_bytes_per_token"]  # the bf16 cache is half the fp32 one
    assert gpu["decode_tokens_per_s"] > 0 and gpu["prefill_tokens_per_s"] > 0


def test_greedy_generation_on_cuda_matches_the_cpu(setup):
    from dha.model import generate

    src = setup[0]
    cpu = dha.checkpoint.load(src, torch.float32, tokenizer=False).model
    gpu = dha.checkpoint.load(src, torch.float32, tokenizer=False, device="cuda").model
    ids = random_ids(batch=2, length=8)
    assert torch.equal(generate(gpu, ids.to(CUDA), 8).cpu(), generate(cpu, ids, 8))


def test_stock_export_checks_on_cuda(tmp_path, capsys):
    """An HF LLaMA source exports as LlamaForCausalLM; transformers reloads it on the GPU and its
    float32 logits match ours there within the export's 1e-4."""
    hf = tiny_llama_hf(num_kv_heads=3)
    hf.save_pretrained(str(tmp_path / "hf"))
    report = run_json(capsys, ["export", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert report["kind"] == "stock" and report["check"]["device"] == "cuda:0" and report["max_abs_diff"] <= 1e-4


def test_learned_search_and_lagrangian_fusion_on_cuda(setup):
    """The two searches' and schedules' own parameters (gates, multipliers) live on the GPU with the model."""
    from dha.budget import source_heads
    from dha.fuse import FusedModel, FusionSchedule, merge
    from dha.options import FusionOptions, TrainConfig
    from dha.search import SearchOptions, search
    from dha.train import train

    src = setup[0]
    model = dha.checkpoint.load(src, torch.float32, tokenizer=False, device="cuda").model
    calib = random_ids(batch=4, length=16, vocab=model.config.vocab_size)
    plan = search(model, 0.5, calib, SearchOptions(search="learned", steps=4, progress=False))
    plan.validate(*source_heads(model))
    assert plan.kv_fraction() <= 0.5 + 1e-9 and len(plan.notes["learned"]["history"]) >= 1

    fused = FusedModel(model, plan, None, FusionOptions(schedule="lagrangian"))
    schedule = FusionSchedule(fused, 2)
    cfg = TrainConfig(
        tokens=64, block_size=16, batch_tokens=32, micro_batch=2, dtype="float32", eval_every=0, device="cuda:0"
    )
    stream = random_ids(batch=1, length=200, vocab=model.config.vocab_size)[0]
    result = train(fused, stream, None, cfg, hooks=schedule.hooks(), progress=False)
    assert schedule.multipliers.device == CUDA and result.steps == 2
    _, merged = merge(result.model)
    assert on_cuda(merged)


def test_skipped_positions_train_on_cuda_as_on_the_cpu():
    """--position-span (and --recall-tokens) on the GPU: the first step's loss and distillation loss
    (teacher reading the same positions) equal the CPU's within 1e-4 (float32, different kernels)."""
    from dha.options import TrainConfig
    from dha.train import train

    hf = tiny_llama_hf()
    rows = random_ids(batch=8, length=17, seed=2)
    first = {}
    for device in ("cpu", "cuda:0"):
        cfg = TrainConfig(
            tokens=68, block_size=17, batch_tokens=68, micro_batch=2, lr=0.0, dtype="float32", eval_every=0,
            position_span=96, recall_tokens=4, distill=True, device=device,
        )  # fmt: skip
        first[device] = train(ours_from_hf(hf), rows, None, cfg, progress=False).history[0]
    for key in ("loss", "distill_loss"):
        assert abs(first["cpu"][key] - first["cuda:0"][key]) < 1e-4, key


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_attention_distillation_trains_on_cuda_as_on_the_cpu(checkpointing, monkeypatch):
    """--attention-distill and --far-attention-distill on the GPU (with skipped positions): two
    steps' losses, both attention terms' included, equal the CPU's within 1e-4 (float32, different
    kernels); with the blocks checkpointed and the loss's logits made 5 positions at a time too."""
    import dha.train
    from dha.options import TrainConfig
    from dha.train import train
    from tests.test_attention_kd import perturbed

    monkeypatch.setattr(dha.train, "logit_chunk", lambda config: 5)

    hf = tiny_llama_hf()
    rows = random_ids(batch=8, length=17, seed=2)
    history = {}
    for device in ("cpu", "cuda:0"):
        cfg = TrainConfig(
            tokens=136, block_size=17, batch_tokens=68, micro_batch=2, lr=1e-3, dtype="float32", eval_every=0,
            position_span=96, distill=True, attention_distill=1.0, attention_queries=8, device=device,
            activation_checkpointing=checkpointing, far_attention_distill=1.0, far_distance=24,
        )  # fmt: skip
        teacher = copy.deepcopy(ours_from_hf(hf))  # its own weights, not hf's
        with torch.no_grad():  # sharper attention than the tiny model's near-uniform one
            for block in teacher.layers:
                block.attn.q_proj.weight.mul_(30)
        history[device] = train(perturbed(teacher), rows, None, cfg, teacher=teacher, progress=False).history
    for cpu, gpu in zip(history["cpu"], history["cuda:0"], strict=True):
        for key in ("loss", "distill_loss", "attention_distill_loss", "far_attention_distill_loss"):
            assert abs(cpu[key] - gpu[key]) < 1e-4 * max(1.0, abs(cpu[key])), key
    assert history["cpu"][0]["attention_distill_loss"] > 0.01 and history["cpu"][0]["far_attention_distill_loss"] > 0


# ---- --offload: the model in CPU memory, one layer at a time on the GPU ------------------------------


@pytest.mark.parametrize("method", ["dha", "svd", "gqa-similar"])
def test_offload_conversion_on_cuda_matches_the_cpu(method, setup, monkeypatch, capsys):
    """`convert --offload --device cuda` (the model loaded onto the CPU in its own float32, every
    sweep on the GPU) against the same conversion on the CPU without it: the same plan, logits
    within 1e-3, the report's perplexities within 1e-4 (float32 summation order on both)."""
    import dha.layerwise

    src, data, tmp = setup
    extra = ["--method", "dha", "--tokens", "0"] if method == "dha" else ["--method", method]
    common = [
        "convert",
        src,
        *extra,
        "--kv-budget",
        "0.5",
        "--data",
        data,
        "--calib-tokens",
        "128",
        "--calib-block-size",
        "16",
        "--json",
    ]
    reference = run_json(capsys, [*common, "--out", str(tmp / "cpu"), "--device", "cpu"])
    seen = spy_on_devices(monkeypatch)
    sweeps = []
    real = dha.layerwise.compute_device
    monkeypatch.setattr(
        dha.layerwise,
        "compute_device",
        lambda model, device=None: (
            sweeps.append((real(model, device), next(model.parameters()).device)) or real(model, device)
        ),
    )
    offloaded = run_json(capsys, [*common, "--out", str(tmp / "cuda"), "--device", "cuda", "--offload"])
    assert seen["load"] == ["cpu"] and sweeps and all(where == CUDA and home.type == "cpu" for where, home in sweeps), (
        sweeps
    )
    plans = [Plan.load(os.path.join(tmp, d, "plan.json")) for d in ("cpu", "cuda")]
    assert plans[0].layers == plans[1].layers
    on_cpu, offload = (dha.checkpoint.load(str(tmp / d), tokenizer=False).model for d in ("cpu", "cuda"))
    assert {p.dtype for p in offload.parameters()} == {torch.float32}
    diff, scale = max_logit_diff(offload, on_cpu, random_ids(length=16))
    assert diff <= 1e-3, (diff, scale)
    if method == "dha":
        for key in ("source_ppl", "ppl"):
            assert abs(offloaded[key] / reference[key] - 1) <= 1e-4, (key, offloaded[key], reference[key])


def test_offload_analysis_on_cuda_matches_the_cpu(setup, capsys):
    src, data, tmp = setup
    common = ["analyze", src, "--data", data, "--calib-tokens", "128", "--calib-block-size", "16", "--json"]
    run_json(capsys, [*common, "--out", str(tmp / "cpu"), "--device", "cpu"])
    run_json(capsys, [*common, "--out", str(tmp / "cuda"), "--device", "cuda", "--offload"])
    a, b = (json.load(open(tmp / d / "analysis.json")) for d in ("cpu", "cuda"))
    for ea, eb in zip(a["layers"], b["layers"]):
        for kind in ("keys", "values"):
            for metric in ("cka", "cosine"):
                torch.testing.assert_close(
                    torch.tensor(eb[kind][metric]), torch.tensor(ea[kind][metric]), atol=1e-4, rtol=0
                )


@pytest.mark.parametrize("method", ["dha", "svd"])
def test_offload_peak_gpu_memory_is_within_the_estimate(method, tmp_path, monkeypatch, capsys):
    """The fit check's layer-by-layer estimate (dha.memory) against the peak the CUDA allocator
    reports for the conversion (max_memory_allocated above what was allocated before): a wider
    model (hidden 256, 4 layers, MLP 1,024) so that the layer and its activations are measurable.
    The estimate must not be below the peak (the check would let through work that fails), give or
    take cuBLAS's workspace (32 MiB on recent GPUs, not estimated), and is printed beside it."""
    from dha.checkpoint import source_shape
    from dha.memory import Work, estimate

    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    hf = tiny_llama_hf(num_heads=8, num_kv_heads=4, layers=4, hidden_size=256, intermediate_size=1024, head_dim=32)
    src = save_tiny_source(str(tmp_path / "wide"), ours_from_hf(hf))
    data = text_file(str(tmp_path / "data.txt"), documents=200)
    extra = ["--method", "dha", "--tokens", "0"] if method == "dha" else ["--method", method]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(CUDA)
    torch.cuda.reset_peak_memory_stats(CUDA)
    run_json(
        capsys,
        [
            "convert",
            src,
            *extra,
            "--kv-budget",
            "0.5",
            "--data",
            data,
            "--calib-tokens",
            "1024",
            "--calib-block-size",
            "128",
            "--device",
            "cuda",
            "--offload",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    peak = torch.cuda.max_memory_allocated(CUDA) - before
    work = Work(
        calib_tokens=1024,
        calib_block=128,
        gradients=method == "dha",
        merge="aligned",
        eval_tokens=16384 if method == "dha" else 0,
    )
    layer = sum(b for _, b in estimate(source_shape(src)[0], torch.float32, work).layer)
    print(f"{method}: peak {peak / 2**20:.1f} MiB, estimate {layer / 2**20:.1f} MiB ({layer / peak:.2f}x)")
    assert 0 < peak <= layer + 2**25, (peak, layer)
