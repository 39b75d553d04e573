"""The training loop: it learns, P processes equal one, kill + resume equals no kill, distillation's
KL, ascent groups for Lagrange multipliers, and bad input refused with nothing overwritten.

All runs are fp32 (dtype="float32": no autocast) on tiny models, so tolerances are float rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from dha.checkpoint import load
from dha.cli import main
from dha.model import ModelConfig, Transformer
from dha.options import TrainConfig
from dha.train import Hooks, distill_loss_sum, lr_factor, ramp, train
from tests.conftest import kill_when, ours_from_hf, random_ids, save_tiny_source, text_file, tiny_llama_hf  # noqa: F401
from tests.helpers import scaled_init_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, layers: int = 2) -> Transformer:
    """Our tiny MHA model built directly (no transformers import: cheap in child processes)."""
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=48,
        num_layers=layers,
        num_heads=6,
        head_dim=8,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return scaled_init_(Transformer(cfg), seed=seed)


def fp32_config(**overrides) -> TrainConfig:
    base = dict(
        tokens=6 * 128,
        block_size=16,
        batch_tokens=128,
        micro_batch=2,
        lr=3e-3,
        warmup_steps=1,
        dtype="float32",
        eval_every=0,
        seed=0,
    )
    base.update(overrides)
    return TrainConfig(**base)


# ---- schedule and ramp -----------------------------------------------------------------------------


def test_schedule_and_ramp():
    # warm-up 1/4, 2/4, ... then cosine from 1 to 0.1 at the last step
    assert [lr_factor(s, 10, 4, 0.1) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_factor(10, 10, 4, 0.1) == pytest.approx(0.1)
    assert lr_factor(7, 10, 4, 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 6)).item())
    )
    assert [ramp(s, 10, 20, 0.0, 2.0) for s in (0, 10, 15, 20, 30)] == [0.0, 0.0, 1.0, 2.0, 2.0]


# ---- it learns -------------------------------------------------------------------------------------


def test_loss_halves_on_one_repeated_batch():
    hf = tiny_llama_hf()
    model = ours_from_hf(hf)
    batch = random_ids(batch=4, length=32, seed=1)  # every step reads these 4 rows (in some order)
    # Step 1's loss is the initial model's: Hugging Face's own shifted LM loss on the batch (fp32).
    # (Computed first: our model shares HF's weight tensors, and training changes them.)
    with torch.no_grad():
        reference = hf(batch, labels=batch).loss.item()
    cfg = fp32_config(tokens=30 * 128, block_size=32, batch_tokens=128, micro_batch=4, lr=1e-2, warmup_steps=3)
    result = train(model, batch, None, cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30
    assert losses[0] == pytest.approx(reference, abs=1e-5)
    assert losses[-1] < 0.5 * losses[0], losses


def test_eval_reports_heldout_loss_against_reference():
    model = tiny_model()
    heldout = random_ids(batch=3, length=16, seed=5)
    cfg = fp32_config(tokens=128, eval_every=1, eval_tokens=10_000, lr=0.0)  # lr 0: the model does not change
    result = train(model, random_ids(batch=16, length=16, seed=2), heldout, cfg, progress=False)
    with torch.no_grad():
        logits = model(heldout[:, :-1])
    reference = F.cross_entropy(logits.flatten(0, 1), heldout[:, 1:].flatten()).item()
    assert [e["step"] for e in result.evals] == [0, 1]
    assert result.evals[0]["heldout_loss"] == pytest.approx(reference, abs=1e-6)
    assert result.evals[0]["heldout_tokens"] == 3 * 15


def test_bf16_autocast_step_is_close_to_fp32():
    model = tiny_model()
    batch = random_ids(batch=4, length=16, seed=8)
    with torch.no_grad():
        reference = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    result = train(model, batch, None, fp32_config(tokens=64, batch_tokens=64, dtype="bfloat16"), progress=False)
    # bf16 keeps 8 bits of mantissa: logits off by ~1e-2 relative, the mean loss by far less than 0.05.
    assert result.history[0]["loss"] == pytest.approx(reference, abs=0.05)
    assert next(model.parameters()).dtype == torch.float32  # autocast only: weights stay fp32


# ---- distributed = single ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, fsdp: bool, out_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        result = train(
            tiny_model(),
            random_ids(batch=40, length=16, seed=3),
            random_ids(batch=5, length=16, seed=4),
            fp32_config(micro_batch=1, fsdp=fsdp, eval_every=3),
            progress=False,
        )
        if rank == 0:
            torch.save(
                {
                    "losses": [h["loss"] for h in result.history],
                    "evals": [e["heldout_loss"] for e in result.evals],
                    "weights": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
                },
                out_path,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, fsdp, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # children start with one thread (as torchrun sets)

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_distributed_worker, args=(2, _free_port(), fsdp, out), nprocs=2, join=True)
    two = torch.load(out)
    # One process, the same global batch of 8 rows, in micro batches of 4 instead of 2 x 4 x 1.
    single = train(
        tiny_model(),
        random_ids(batch=40, length=16, seed=3),
        random_ids(batch=5, length=16, seed=4),
        fp32_config(micro_batch=4, eval_every=3),
        progress=False,
    )
    # fp32; only the order of summation differs, so losses agree to 1e-5 (absolute, losses ~4.6).
    assert_close(torch.tensor(two["losses"]), torch.tensor([h["loss"] for h in single.history]), atol=1e-5, rtol=0)
    assert_close(torch.tensor(two["evals"]), torch.tensor([e["heldout_loss"] for e in single.evals]), atol=1e-5, rtol=0)
    for k, v in single.model.state_dict().items():
        assert_close(two["weights"][k], v, atol=1e-5, rtol=0)


# ---- FSDP at both ends: sharded checkpoints, the final gather to rank 0 ---------------------------------


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str, resume: str | None, result_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        result = train(
            tiny_model(),
            random_ids(batch=40, length=16, seed=3),
            None,
            fp32_config(micro_batch=4 // world, fsdp=True, save_every=3, keep_checkpoints=5),
            out_dir=out_dir,
            resume=resume,
            progress=False,
        )
        torch.save(
            {
                "losses": [h["loss"] for h in result.history],
                "model_is_none": result.model is None,
                "weights": None
                if result.model is None
                else {k: v.detach().clone() for k, v in result.model.state_dict().items()},
            },
            f"{result_path}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_fsdp_sharded_checkpoint_resumes_on_one_and_two_processes(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = str(tmp_path / "fsdp")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), run, None, str(tmp_path / "full")), nprocs=2, join=True)
    full, other = torch.load(str(tmp_path / "full.0")), torch.load(str(tmp_path / "full.1"))
    assert not full["model_is_none"] and other["model_is_none"]  # the final gather: rank 0 only
    checkpoint = os.path.join(run, "checkpoints", "step_00000003")
    shards = sorted(n for n in os.listdir(checkpoint) if n.endswith(".distcp"))
    assert len(shards) == 2 and os.path.exists(os.path.join(checkpoint, "meta.pt"))
    sizes = [os.path.getsize(os.path.join(checkpoint, n)) for n in shards]
    assert max(sizes) < 0.75 * sum(sizes)  # each rank wrote its own part of the weights and Adam state

    # Resume at step 3 on two processes (FSDP) and on one: both equal the uninterrupted run.
    for name in ("two", "one"):
        resumed = str(tmp_path / name)
        os.makedirs(resumed)
        for f in ("run.json", "checkpoints"):
            os.symlink(os.path.join(run, f), os.path.join(resumed, f))
        if name == "two":
            mp.spawn(
                _fsdp_worker, args=(2, _free_port(), resumed, checkpoint, str(tmp_path / name)), nprocs=2, join=True
            )
            got = torch.load(str(tmp_path / "two.0"))
            losses, weights = got["losses"], got["weights"]
        else:
            result = train(
                tiny_model(),
                random_ids(batch=40, length=16, seed=3),
                None,
                fp32_config(micro_batch=4, fsdp=True, save_every=3, keep_checkpoints=5),
                out_dir=resumed,
                resume=checkpoint,
                progress=False,
            )
            losses, weights = [h["loss"] for h in result.history], result.model.state_dict()
        # fp32; the process count changes only the order of sums: 1e-5.
        assert_close(torch.tensor(losses), torch.tensor(full["losses"]), atol=1e-5, rtol=0)
        for k, v in full["weights"].items():
            assert_close(weights[k], v, atol=1e-5, rtol=0)


# ---- kill and resume ---------------------------------------------------------------------------------

RUN_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from tests.test_train import tiny_model, fp32_config
from tests.conftest import random_ids
from dha.train import Hooks, train
torch.set_num_threads(1)
out, resume, delay = sys.argv[1], (sys.argv[2] or None), float(sys.argv[3])
cfg = fp32_config(tokens=12 * 128, save_every=3, eval_every=4)
hooks = Hooks(on_step_end=lambda model, step, record: time.sleep(delay))  # slow steps: time to kill
train(tiny_model(), random_ids(batch=40, length=16, seed=3), random_ids(batch=5, length=16, seed=4), cfg,
      hooks=hooks, out_dir=out, resume=resume, progress=False)
"""


def _run_script(out: str, resume: str = "", delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT.format(repo=REPO), out, resume, str(delay)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _final(out: str) -> tuple[list[float], dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    return losses, load(out, tokenizer=False).model.state_dict()


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    reference = _run_script(full)
    victim = _run_script(killed, delay=0.3)
    kill_when(victim, os.path.join(killed, "checkpoints", "step_00000006.pt"))
    assert not os.path.exists(os.path.join(killed, "dha_config.json"))  # it really stopped mid-run
    resumed = _run_script(killed, resume=killed)
    for p in (reference, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert b"resuming" in err and b"step 6" in err
    losses_full, weights_full = _final(full)
    losses_resumed, weights_resumed = _final(killed)
    # Same process setup, same order of operations: identical up to fp32 rounding (1e-6).
    assert_close(torch.tensor(losses_resumed), torch.tensor(losses_full), atol=1e-6, rtol=0)
    for k, v in weights_full.items():
        assert_close(weights_resumed[k], v, atol=1e-6, rtol=0)


# ---- distillation -------------------------------------------------------------------------------------


def test_distill_loss_against_kl_div():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    for T in (1.0, 2.0):
        reference = (
            F.kl_div(
                F.log_softmax(student / T, -1).flatten(0, 1),
                F.log_softmax(teacher / T, -1).flatten(0, 1),
                log_target=True,
                reduction="sum",
            )
            * T
            * T
        )
        assert_close(distill_loss_sum(student, teacher, T), reference, atol=1e-5, rtol=1e-6)
        assert_close(distill_loss_sum(teacher, teacher, T), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_distillation_in_training():
    batch = random_ids(batch=4, length=16, seed=6)
    cfg = fp32_config(
        tokens=2 * 64, batch_tokens=64, micro_batch=2, distill=True, distill_weight=1.0, distill_temperature=2.0
    )
    # Teacher left out = the student as given: the KL is zero at step 1, so the objective is zero.
    same = train(tiny_model(), batch, None, cfg, progress=False)
    assert same.history[0]["distill_loss"] == pytest.approx(0.0, abs=1e-6)
    assert same.history[0]["objective"] == pytest.approx(0.0, abs=1e-6)
    # Another teacher: the logged KL is torch's kl_div, batchmean over predicted tokens, times T^2.
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    with torch.no_grad():
        s, t = student(batch[:, :-1]) / 2.0, teacher(batch[:, :-1]) / 2.0
    reference = (
        F.kl_div(
            F.log_softmax(s, -1).flatten(0, 1),
            F.log_softmax(t, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        ).item()
        * 4.0
    )
    other = train(student, batch, None, cfg, teacher=teacher, progress=False)
    assert other.history[0]["distill_loss"] == pytest.approx(reference, abs=1e-5)
    assert other.history[-1]["distill_loss"] < other.history[0]["distill_loss"]


# ---- hooks: extra loss, parameter groups with negative lr ---------------------------------------------


def _multiplier_run(lr: float) -> tuple[list[float], list[float]]:
    lam = nn.Parameter(torch.tensor(0.5))

    def extra_loss(model, step):
        violation = model.embed.weight.detach().pow(2).mean() + 1.0  # > 0, a stand-in for a constraint
        return lam * violation, {"lambda": lam.item()}

    values = []
    hooks = Hooks(
        extra_loss=extra_loss,
        param_groups=lambda model: [{"params": [lam], "lr": lr}],
        on_step_end=lambda model, step, record: values.append(lam.item()),
    )
    cfg = fp32_config(tokens=4 * 64, batch_tokens=64, lr=1e-3, warmup_steps=0, min_lr_ratio=1.0)
    result = train(tiny_model(), random_ids(batch=8, length=16, seed=7), None, cfg, hooks=hooks, progress=False)
    return [h["extra_loss"] for h in result.history], values


def test_negative_lr_group_ascends_positive_descends():
    ascent_terms, ascent_values = _multiplier_run(-0.1)
    descent_terms, descent_values = _multiplier_run(0.1)
    assert all(b > a for a, b in zip(ascent_terms, ascent_terms[1:])), ascent_terms
    assert all(b < a for a, b in zip(descent_terms, descent_terms[1:])), descent_terms
    # Adam's first step moves a parameter by lr * g / (|g| + eps) = lr * sign(g) (Kingma & Ba 2015,
    # m_hat / sqrt(v_hat) = g / |g|); the gradient of lam * violation is violation ~ 1 > 0. The descent
    # group is clipped with the model (its g may shrink to ~1e-3), so eps = 1e-8 leaves up to ~1e-5.
    assert ascent_values[0] == pytest.approx(0.5 + 0.1, abs=1e-5)
    assert descent_values[0] == pytest.approx(0.5 - 0.1, abs=1e-5)


# ---- the CLI, bad input ------------------------------------------------------------------------------


def tiny_source(path: str, layers: int = 2, seed: int = 0) -> str:
    """A native checkpoint of tiny_model with a word-level tokenizer (tests.conftest)."""
    return save_tiny_source(path, tiny_model(seed, layers))


def snapshot(directory: str) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def cli_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))  # token cache inside the test's dir
    source = tiny_source(str(tmp_path / "tiny"))
    data = text_file(str(tmp_path / "data.txt"))
    common = ["--data", data, "--block-size", "16", "--batch-tokens", "64", "--dtype", "float32", "--no-progress"]
    return tmp_path, source, data, common


def test_cli_train_writes_a_loadable_run(cli_setup, capsys):
    tmp_path, source, _, common = cli_setup
    out = str(tmp_path / "run")
    assert main(["train", source, *common, "--tokens", "256", "--out", out, "--eval-every", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["tokens"] == 256
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert os.listdir(os.path.join(out, "tensorboard"))
    trained = load(out)  # the run directory is a SOURCE
    assert trained.tokenizer is not None and trained.provenance["trained"]["steps"] == 4
    assert not torch.equal(
        trained.model.state_dict()["layers.0.attn.q_proj.weight"],
        load(source).model.state_dict()["layers.0.attn.q_proj.weight"],
    )


def test_cli_bad_inputs_exit_2_and_overwrite_nothing(cli_setup, capsys):
    tmp_path, source, data, common = cli_setup
    run = str(tmp_path / "run")
    assert main(["train", source, *common, "--tokens", "192", "--out", run, "--save-every", "1"]) == 0
    before = snapshot(run)
    other = tiny_source(str(tmp_path / "other"), layers=3)
    short = text_file(str(tmp_path / "short.txt"), documents=1, words=8)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    cases = {
        "shorter than one block": [
            "train",
            source,
            *common,
            "--data",
            short,
            "--tokens",
            "192",
            "--out",
            str(tmp_path / "a"),
        ],
        "smaller than one optimizer step": ["train", source, *common, "--tokens", "63", "--out", str(tmp_path / "b")],
        "different run": ["train", source, *common, "--tokens", "192", "--lr", "0.1", "--out", run],
        "already holds this run": ["train", source, *common, "--tokens", "192", "--out", run],
        "holds no dha run": ["train", source, *common, "--tokens", "192", "--out", str(stranger)],
        "holds a different run (differs in model.": ["train", other, *common, "--tokens", "192", "--resume", run],
        "a run resumes in its own directory": [
            "train",
            source,
            *common,
            "--tokens",
            "192",
            "--resume",
            run,
            "--out",
            str(tmp_path / "c"),
        ],
    }
    for expected, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and err.splitlines()[-1].startswith("dha: error:"), (expected, err)
    assert snapshot(run) == before
    assert (stranger / "notes.txt").read_text() == "mine" and os.listdir(stranger) == ["notes.txt"]
    assert not any(os.path.exists(tmp_path / d) for d in "abc")


def test_a_run_written_before_a_config_field_existed_still_resumes():
    """run.json from before TrainConfig.data_start: the missing field counts as its default."""
    from dataclasses import asdict

    from dha.resume import differences

    cfg = TrainConfig(tokens=64)
    new = {"format": 1, "run": {}, "config": asdict(cfg), "model": None}
    old = {**new, "config": {k: v for k, v in asdict(cfg).items() if k != "data_start"}}
    assert differences(old, new) == []
    moved = {**new, "config": {**asdict(cfg), "data_start": 8}}
    assert differences(old, moved) == ["config.data_start"]
    # the same for a model config field added since (ModelConfig.num_experts)
    model = ModelConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, head_dim=4, intermediate_size=8)
    new = {**new, "model": model.to_dict()}
    old = {**new, "model": {k: v for k, v in model.to_dict().items() if k != "num_experts"}}
    assert differences(old, new) == []
    assert differences(old, {**new, "model": {**model.to_dict(), "num_experts": 4}}) == ["model.num_experts"]
