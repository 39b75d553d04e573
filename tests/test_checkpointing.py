"""Activation checkpointing of the decoder blocks (Transformer.checkpoint_blocks, set by dha.train):
the same loss and gradients as without it, less memory at the peak of a long-row step (measured),
the "auto" rule and the fit check, and `dha train --activation-checkpointing`.

fp32 on the CPU throughout, so "the same" is float rounding (1e-6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

import dha.memory
import dha.model
import dha.train
from dha.checkpoint import load
from dha.cli import main
from dha.distributed import Dist
from dha.errors import UserError
from dha.fuse import FusedModel
from dha.memory import GiB, Training, Work, activation_bytes, check_fit, estimate, step_bytes, training_fit
from dha.model import ModelConfig, Transformer
from dha.options import TrainConfig
from dha.plan import LayerPlan, Plan
from dha.resume import differences
from dha.train import choose_checkpointing, set_checkpointing, train
from tests.conftest import save_tiny_source, text_file
from tests.helpers import scaled_init_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-6  # max abs difference of loss and gradients, float32


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(layers=3, seed=0, decoupled=True) -> Transformer:
    """6 query heads; decoupled K/V maps (3 key heads, 2 value heads per layer) or plain MHA."""
    maps = dict(key_index=[[0, 1, 2, 0, 1, 2]] * layers, value_index=[[0, 0, 0, 1, 1, 1]] * layers) if decoupled else {}
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=48,
        num_layers=layers,
        num_heads=6,
        head_dim=8,
        intermediate_size=64,
        tie_word_embeddings=False,
        **maps,
    )
    return scaled_init_(Transformer(cfg), seed=seed)


def loss_and_grads(model, ids, checkpointing: bool):
    set_checkpointing(model, checkpointing)
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    set_checkpointing(model, False)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model, ids):
    loss, grads = loss_and_grads(model, ids, False)
    loss_ck, grads_ck = loss_and_grads(model, ids, True)
    assert grads.keys() == grads_ck.keys() and len(grads) > 10
    assert (loss - loss_ck).abs().item() <= TOLERANCE
    worst = max((grads[n] - grads_ck[n]).abs().max().item() for n in grads)
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("decoupled", [True, False])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(decoupled):
    model = small_model(decoupled=decoupled).train()
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
    assert_same_step(model, ids)
    with torch.no_grad():  # no autograd, or a KV cache: the blocks run plainly (nothing to recompute)
        model.checkpoint_blocks = True
        assert torch.equal(model(ids), small_model(decoupled=decoupled)(ids))


FUSE_LAYER = LayerPlan([[0, 3, 5], [1], [2, 4]], [[0, 1], [2, 3, 4, 5]])
FUSE_PLAN = Plan([FUSE_LAYER], [6], [6], method="hand")


def test_fused_model_trains_its_blocks_checkpointed_with_the_same_gradients():
    """dha.fuse.FusedModel trains through the Transformer it holds: set_checkpointing reaches it."""
    model = small_model(layers=2, decoupled=False)
    fused = FusedModel(model, Plan([FUSE_LAYER] * 2, [6, 6], [6, 6], method="hand")).train()
    assert set_checkpointing(fused, False) == 1
    assert_same_step(fused, torch.randint(0, 97, (2, 25), generator=torch.Generator().manual_seed(2)))


def _two_process_worker(rank: int, port: int, fsdp: bool, out_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        cfg = TrainConfig(
            tokens=3 * 128,
            block_size=32,
            batch_tokens=128,
            micro_batch=1,
            lr=3e-3,
            warmup_steps=1,
            dtype="float32",
            eval_every=0,
            fsdp=fsdp,
            activation_checkpointing="on",
        )
        seen = []
        hooks = dha.train.Hooks(on_step_end=lambda m, step, record: seen.append(m.checkpoint_blocks))
        result = train(small_model(), ROWS, None, cfg, hooks=hooks, progress=False)
        if rank == 0:
            torch.save(
                {
                    "losses": [h["loss"] for h in result.history],
                    "seen": seen,
                    "weights": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
                },
                out_path,
            )
    finally:
        dist.destroy_process_group()


ROWS = torch.randint(0, 97, (24, 32), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_checkpointed_match_one_without(tmp_path, fsdp, monkeypatch):
    """Under DDP and FSDP the blocks of the wrapped model run checkpointed, and the run equals one
    process without checkpointing (fp32: only the order of sums differs)."""
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_two_process_worker, args=(port, fsdp, out), nprocs=2, join=True)
    two = torch.load(out)
    cfg = TrainConfig(
        tokens=3 * 128,
        block_size=32,
        batch_tokens=128,
        micro_batch=2,
        lr=3e-3,
        warmup_steps=1,
        dtype="float32",
        eval_every=0,
        activation_checkpointing="off",
    )
    one = train(small_model(), ROWS, None, cfg, progress=False)
    assert two["seen"] == [True] * 3
    assert max(abs(a - h["loss"]) for a, h in zip(two["losses"], one.history)) <= 1e-5
    for k, v in one.model.state_dict().items():
        assert (two["weights"][k] - v).abs().max().item() <= 1e-5, k


# ---- the loss's logits a chunk at a time (dha.train.chunked_loss_sums) --------------------------------


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_loss_equals_the_whole_logits_loss(softcap):
    """fp32, 1e-6: the LM and KD sums, and the gradients of every weight, with the logits made 7
    positions at a time (not a divisor of the 2 x 32 positions) under checkpointing, against the
    whole logits' sums written out here; also with a soft-capped head."""
    model = small_model().train()
    teacher = small_model(seed=1).eval()
    if softcap is not None:
        model.config.logit_softcap = teacher.config.logit_softcap = softcap
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(4))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step(chunked: bool):
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher_out = teacher.features(inputs) if chunked else teacher(inputs)
        if chunked:
            sums = dha.train.chunked_loss_sums(model, model.features(inputs), targets, teacher, teacher_out, 2.0, 7)
        else:
            logits = model(inputs)
            lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            t = F.log_softmax(teacher_out / 2.0, -1)
            kd = (t.exp() * (t - F.log_softmax(logits / 2.0, -1))).sum() * 4.0
            sums = torch.stack([lm, kd])
        ((sums[0] + 0.5 * sums[1]) / targets.numel()).backward()  # the mean, as training takes
        return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (whole, grads), (chunked, grads_c) = step(False), step(True)
    assert (whole - chunked).abs().max().item() <= 1e-5 * whole.abs().max().item() and whole[1] > 0
    assert all(p.grad is None for p in teacher.parameters())
    worst = max((grads[n] - grads_c[n]).abs().max().item() for n in grads)
    assert worst <= TOLERANCE, worst


def test_one_process_run_with_a_chunked_head_matches_one_without_checkpointing(monkeypatch):
    """fp32, 1e-5: three distilled steps (attention distillation too) with the blocks checkpointed
    and the loss's logits made 5 positions at a time equal the same run without checkpointing; the
    chunked loss is what the checkpointed run used. Under DDP or FSDP the head stays whole."""
    cfg = TrainConfig(
        tokens=3 * 64,
        block_size=32,
        batch_tokens=64,
        micro_batch=1,
        lr=3e-3,
        warmup_steps=1,
        dtype="float32",
        eval_every=0,
        distill=True,
        attention_distill=0.5,
        attention_queries=8,
    )
    calls = []
    chunked = dha.train.chunked_loss_sums
    monkeypatch.setattr(dha.train, "logit_chunk", lambda config: 5)
    monkeypatch.setattr(dha.train, "chunked_loss_sums", lambda *a: calls.append(a[-1]) or chunked(*a))
    teacher = small_model(seed=1)
    runs = {}
    for mode in ("off", "on"):
        c = replace(cfg, activation_checkpointing=mode)
        runs[mode] = train(small_model(), ROWS[:6], None, c, teacher=teacher, progress=False)
        assert (calls == [5] * 6) == (mode == "on"), calls  # 3 steps of 2 micro batches
    for a, b in zip(runs["off"].history, runs["on"].history):
        for key in ("loss", "distill_loss", "attention_distill_loss"):
            assert abs(a[key] - b[key]) <= 1e-5, key
    for k, v in runs["off"].model.state_dict().items():
        assert (runs["on"].model.state_dict()[k] - v).abs().max().item() <= 1e-5, k
    assert dha.train.head_chunk(small_model(), None, world=2) == 0
    assert dha.train.head_chunk(FusedModel(small_model(layers=1, decoupled=False), FUSE_PLAN), None, world=1) == 0


# ---- the memory it saves, measured -----------------------------------------------------------------

LAYERS, WIDTH = 12, 2048
STEP = rf"""
import json, sys, torch, torch.nn.functional as F
from dha.model import ModelConfig, Transformer
from tests.helpers import scaled_init_
torch.set_num_threads(1)
cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers={LAYERS}, num_heads=4, head_dim=16, intermediate_size=128)
model = scaled_init_(Transformer(cfg), seed=0).train()
model.checkpoint_blocks = sys.argv[1] == "on"
ids = torch.randint(0, 256, (1, {WIDTH} + 1), generator=torch.Generator().manual_seed(0))
def status(field):  # kB -> bytes; VmHWM (peak) starts anew at exec, unlike ru_maxrss, which keeps the parent's
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
warm = model(ids[:, :65]).sum(); warm.backward()  # the allocator and autograd warmed up, gradients allocated
base = status("VmRSS")
F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[0, 1:]).backward()
print(json.dumps([status("VmHWM") - base, cfg.to_dict()]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_a_long_row_step_peaks_lower_with_checkpointing():
    """Peak resident memory of one forward+backward at 2,048 tokens (12 layers), each in a child
    process of its own, above its resident memory just before the step. glibc is told to give
    every block over 128 KiB back to the system when it is freed (a fixed mmap threshold), so
    that the peak resident memory is the peak of live tensors. Measured here: 118 MiB without,
    19 MiB with checkpointing; dha.memory.activation_bytes, the fit check's term, says 132 and 22."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "MALLOC_MMAP_THRESHOLD_": "131072"}
    children = {
        mode: subprocess.Popen([sys.executable, "-c", STEP, mode], stdout=subprocess.PIPE, text=True, env=env)
        for mode in ("off", "on")
    }
    measured = {mode: json.loads(child.communicate(timeout=120)[0]) for mode, child in children.items()}
    assert all(child.returncode == 0 for child in children.values())
    peak = {mode: bytes_ for mode, (bytes_, _) in measured.items()}
    assert peak["off"] >= 2 * peak["on"] > 0, peak
    cfg = ModelConfig.from_dict(measured["on"][1])
    for mode, checkpointing in (("off", False), ("on", True)):  # the estimate is of the right size
        predicted = activation_bytes(cfg, Training(micro_batch=1, block_size=WIDTH), checkpointing)
        assert predicted / 2 <= peak[mode] <= 1.25 * predicted, (mode, peak[mode], predicted)


HEAD_STEP = rf"""
import json, sys, torch
import dha.model
from dha.model import ModelConfig, Transformer
from dha.train import chunked_loss_sums, loss_sums
from tests.helpers import scaled_init_
torch.set_num_threads(1)
dha.model.NLL_CHUNK_BYTES = 2**22  # 128 positions of a 8,192-token vocabulary
cfg = ModelConfig(vocab_size=8192, hidden_size=64, num_layers=4, num_heads=4, head_dim=16, intermediate_size=128)
model, teacher = scaled_init_(Transformer(cfg), seed=0).train(), scaled_init_(Transformer(cfg), seed=1).eval()
model.checkpoint_blocks = True
ids = torch.randint(0, 8192, (1, {WIDTH} + 1), generator=torch.Generator().manual_seed(0))
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
def step(n):
    inputs, targets = ids[:, :n], ids[:, 1 : n + 1]
    with torch.no_grad():
        t = teacher.features(inputs) if sys.argv[1] == "on" else teacher(inputs)
    if sys.argv[1] == "on":
        sums = chunked_loss_sums(model, model.features(inputs), targets, teacher, t, 1.0, dha.model.logit_chunk(cfg))
    else:
        sums = loss_sums(model(inputs), targets, t, 1.0)
    sums.sum().backward()
step(64)  # the allocator and autograd warmed up, gradients allocated
base = status("VmRSS")
step({WIDTH})
print(json.dumps([status("VmHWM") - base, cfg.to_dict()]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_a_chunked_head_peaks_lower_as_the_estimate_says(monkeypatch):
    """Peak resident memory of a distilled step at 2,048 tokens with a vocabulary of 8,192, blocks
    checkpointed, each in a child process (as above): the logits made whole, and 128 positions at
    a time. The chunked step peaks at most a quarter as high, and each is what
    dha.memory.activation_bytes says (from half to 1.25 times). Measured here: 517 MiB whole, 36 MiB
    chunked; estimated 461 and 42."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "MALLOC_MMAP_THRESHOLD_": "131072"}
    children = {
        mode: subprocess.Popen([sys.executable, "-c", HEAD_STEP, mode], stdout=subprocess.PIPE, text=True, env=env)
        for mode in ("off", "on")
    }
    measured = {mode: json.loads(child.communicate(timeout=300)[0]) for mode, child in children.items()}
    peak = {mode: bytes_ for mode, (bytes_, _) in measured.items()}
    assert peak["off"] >= 4 * peak["on"] > 0, peak
    cfg = ModelConfig.from_dict(measured["on"][1])
    monkeypatch.setattr(dha.model, "NLL_CHUNK_BYTES", 2**22)
    for mode in ("off", "on"):
        training = Training(micro_batch=1, block_size=WIDTH, distill=True, chunked_head=mode == "on")
        predicted = activation_bytes(cfg, training, True)
        assert predicted / 2 <= peak[mode] <= 1.25 * predicted, (mode, peak[mode], predicted)


# ---- the auto rule and the fit check -----------------------------------------------------------------


def long_rows(model, width=512, rows=2):
    return torch.randint(0, model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(3))


def needs(model, micro, width):
    trainable = sum(p.numel() for p in model.parameters())
    training = Training(micro_batch=micro, block_size=width)
    return [step_bytes(model.config, training, trainable, c) for c in (False, True)]


def test_auto_turns_checkpointing_on_only_when_only_that_fits(monkeypatch, capsys):
    model = small_model()
    without, with_it = needs(model, 2, 512)
    assert without > 2 * with_it
    one = Dist(0, 1, torch.device("cpu"))
    cfg = TrainConfig(tokens=1024)
    for free, expected in ((10 * without, False), ((without + with_it) // 2, True)):
        monkeypatch.setattr(dha.train, "free_memory", lambda device, free=free: free)
        assert choose_checkpointing(cfg, model, 2, 512, one) is expected
        assert choose_checkpointing(replace(cfg, activation_checkpointing="on"), model, 2, 512, one) is True
        assert choose_checkpointing(replace(cfg, activation_checkpointing="off"), model, 2, 512, one) is False
    line = capsys.readouterr().err.strip()
    assert line.startswith("dha: activation checkpointing on:") and len(line.splitlines()) == 1  # said once: by auto
    monkeypatch.setattr(dha.train, "free_memory", lambda device: with_it - 1)
    for mode in ("auto", "on"):
        with pytest.raises(UserError, match="does not fit on cpu even with activation checkpointing"):
            choose_checkpointing(replace(cfg, activation_checkpointing=mode), model, 2, 512, one)
    assert choose_checkpointing(replace(cfg, activation_checkpointing="off"), model, 2, 512, one) is False


def test_train_sets_it_on_the_model_it_trains_and_records_it(monkeypatch, tmp_path):
    model = small_model()
    without, with_it = needs(model, 2, 512)
    monkeypatch.setattr(dha.train, "free_memory", lambda device: (without + with_it) // 2)
    seen = []
    hooks = dha.train.Hooks(on_step_end=lambda m, step, record: seen.append(m.checkpoint_blocks))
    cfg = TrainConfig(tokens=1024, block_size=512, batch_tokens=1024, micro_batch=2, dtype="float32", eval_every=0)
    result = train(model, long_rows(model), None, cfg, hooks=hooks, progress=False)
    assert seen == [True] and result.activation_checkpointing and not result.model.checkpoint_blocks
    monkeypatch.setattr(dha.train, "free_memory", lambda device: with_it - 1)
    with pytest.raises(UserError, match="even with activation checkpointing"):  # refused before any step or file
        train(small_model(), long_rows(model), None, cfg, out_dir=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_change_of_activation_checkpointing_resumes_the_run():
    cfg = TrainConfig(tokens=64)
    run = {"format": 1, "run": {}, "model": None}
    on = {**run, "config": asdict(replace(cfg, activation_checkpointing="on"))}
    assert differences({**run, "config": asdict(cfg)}, on) == []
    with pytest.raises(UserError, match="activation checkpointing must be one of auto, on, off"):
        replace(cfg, activation_checkpointing="yes").validate()


def test_fit_check_counts_checkpointed_activations(monkeypatch):
    """A long-row run that fits only with checkpointing passes the fit check (on, auto); one that
    does not fit even with it is refused, in one line; training_fit gives both numbers."""
    cfg = small_model(layers=8).config
    fit = training_fit(cfg, torch.float32, block_size=8192, micro_batch=1, device=torch.device("cpu"))
    assert fit.without_checkpointing > 3 * fit.with_checkpointing
    kd = training_fit(
        cfg, torch.float32, 8192, 1, torch.device("cpu"), distill=True
    )  # the teacher's logits and the KL's
    assert kd.with_checkpointing - fit.with_checkpointing == 4 * 4 * 8192 * cfg.vocab_size
    monkeypatch.setattr(
        dha.memory, "free_memory", lambda device: (fit.without_checkpointing + fit.with_checkpointing) // 2
    )
    fit = training_fit(cfg, torch.float32, 8192, 1, torch.device("cpu"))
    assert fit.fits_with and not fit.fits_without
    work = lambda mode: Work(training=Training(micro_batch=1, block_size=8192, checkpointing=mode))  # noqa: E731
    for mode in ("auto", "on"):
        check_fit(torch.device("cpu"), estimate(cfg, torch.float32, work(mode)), False, "tiny")
    with pytest.raises(UserError, match="does not fit in the CPU's memory"):
        check_fit(torch.device("cpu"), estimate(cfg, torch.float32, work("off")), False, "tiny")
    monkeypatch.setattr(dha.memory, "free_memory", lambda device: fit.with_checkpointing - 1)
    assert not training_fit(cfg, torch.float32, 8192, 1, torch.device("cpu")).fits_with
    with pytest.raises(UserError, match="blocks checkpointed") as refused:
        check_fit(torch.device("cpu"), estimate(cfg, torch.float32, work("auto")), False, "tiny")
    assert "\n" not in str(refused.value)


def test_smollm2_at_8k_tokens_fits_24_gib_only_with_checkpointing():
    """The target: rows of 8,192 tokens of SmolLM2-135M, two a micro batch, on a 24 GiB CPU machine
    (the fit check's terms). Distilled, it fits only with the logits made a chunk at a time: whole,
    they (and the teacher's) are most of what checkpointing leaves."""
    from dha.checkpoint import source_shape

    cfg, cpu = source_shape("smollm2-135m")[0], torch.device("cpu")
    fit = training_fit(cfg, torch.float32, 8192, 2, cpu)
    assert fit.with_checkpointing < 24 * GiB < fit.without_checkpointing
    chunked = training_fit(cfg, torch.float32, 8192, 2, cpu, distill=True, chunked_head=True)
    whole = training_fit(cfg, torch.float32, 8192, 2, cpu, distill=True)
    assert chunked.with_checkpointing < 8 * GiB and whole.with_checkpointing > 24 * GiB


# ---- the command -------------------------------------------------------------------------------------


def test_cli_train_with_activation_checkpointing_on(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    source = save_tiny_source(str(tmp_path / "tiny"), small_model(layers=2, decoupled=False))
    data = text_file(str(tmp_path / "data.txt"))
    out = str(tmp_path / "run")
    argv = [
        "train",
        source,
        "--data",
        data,
        "--block-size",
        "16",
        "--batch-tokens",
        "64",
        "--tokens",
        "128",
        "--train-dtype",
        "float32",
        "--no-progress",
        "--out",
        out,
        "--activation-checkpointing",
        "on",
    ]
    assert main(argv) == 0
    trained = load(out).provenance["trained"]
    assert trained["activation_checkpointing"] is True and trained["config"]["activation_checkpointing"] == "on"
    with pytest.raises(SystemExit) as bad:
        main(argv[:-1] + ["sometimes"])
    assert bad.value.code == 2
