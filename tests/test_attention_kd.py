"""Attention distillation (dha.attention_kd, `--attention-distill`): the distributions it reads are
the attention each layer applies, the term is the KL between two models' attention computed here
by hand, checkpointed blocks give the same gradients, and training with it pulls the student's
attention toward the teacher's.

fp32 on the CPU throughout: 1e-6 for probabilities, 1e-5 for attention outputs and summed KLs, and
for gradients 1e-5 of each weight's largest (a 1e-6 absolute bound failed by 7e-8 on one machine's
kernels)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from dha.attention_kd import AttentionTap, last_queries_scores, masked_log_probs
from dha.cli import main
from dha.memory import Training, attention_tap_numbers
from dha.model import ModelConfig, Transformer, causal_window_mask
from dha.options import TrainConfig
from dha.rows import rows_at, skip_positions
from dha.train import set_checkpointing, train
from tests.conftest import save_tiny_source, text_file
from tests.helpers import scaled_init_

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

H, HD = 6, 8


def small_model(seed=0, decoupled=True, layers=2) -> Transformer:
    maps = dict(key_index=[[0, 1, 2, 0, 1, 2]] * layers, value_index=[[0, 0, 0, 1, 1, 1]] * layers) if decoupled else {}
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=48,
        num_layers=layers,
        num_heads=H,
        head_dim=HD,
        intermediate_size=64,
        tie_word_embeddings=False,
        **maps,
    )
    return scaled_init_(Transformer(cfg), std=0.2, seed=seed)


@contextlib.contextmanager
def captured(model):
    """Every layer's (q, k, v, mask) as its attend gets them (after RoPE)."""
    seen = {}

    def wrap(l, attend):
        def wrapped(q, k, v, mask):
            seen[l] = (q, k, v, mask)
            return attend(q, k, v, mask)

        return wrapped

    for l, block in enumerate(model.layers):
        block.attn.attend = wrap(l, block.attn.attend)
    try:
        yield seen
    finally:
        for block in model.layers:
            del block.attn.attend


def reference_log_probs(q, k, key_index, allowed) -> torch.Tensor:
    """(B, H, T, S) attention log-probabilities, head by head, written out (-inf where masked)."""
    heads = []
    for h in range(q.shape[1]):
        scores = q[:, h] @ k[:, key_index[h]].transpose(-1, -2) / HD**0.5  # (B, T, S)
        heads.append(torch.where(allowed, scores, torch.tensor(float("-inf"))).log_softmax(-1))
    return torch.stack(heads, 1)


def reference_probs(q, k, key_index, allowed) -> torch.Tensor:
    return reference_log_probs(q, k, key_index, allowed).exp()


IDS = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))


def last_queries_log_probs(attn, q, k, mask, queries):
    """The tap's distribution over all keys (AttentionTap._log_probs, "all")."""
    return masked_log_probs(*last_queries_scores(attn, q, k, mask, queries))


def test_the_distributions_are_the_attention_each_layer_applies():
    model = small_model()
    with torch.no_grad(), captured(model) as seen:
        model(IDS)
    attn = model.layers[1].attn
    q, k, v, mask = seen[1]
    T = q.shape[2]
    probs = last_queries_log_probs(attn, q, k, mask, queries=7).exp()  # (B, H, 7, S)
    expected = reference_probs(q, k, attn.key_index.tolist(), torch.ones(T, T).tril().bool())[:, :, -7:]
    assert (probs - expected).abs().max().item() <= 1e-6
    output = attn.attend(q, k, v, mask)[:, :, -7:]  # what the layer applies (SDPA)
    assert (probs @ v.index_select(1, attn.value_index) - output).abs().max().item() <= 1e-5
    window = causal_window_mask(0, T, T, 5, q.device)  # an explicit mask is followed: a window of 5
    windowed = last_queries_log_probs(attn, q, k, window, queries=3).exp()
    assert (windowed - reference_probs(q, k, attn.key_index.tolist(), window)[:, :, -3:]).abs().max().item() <= 1e-6
    assert last_queries_log_probs(attn, q, k, mask, queries=100).shape[2] == T  # at most the row


def tap_term(teacher, student, ids, queries):
    tap = AttentionTap(queries)
    with torch.no_grad(), tap.record(teacher):
        teacher(ids)
    with tap.compare(student, 1.0):
        student(ids)
    return tap.take()


def reference_term(teacher, student, ids, n, far=0, positions=None):
    """The term written out from both models' attention (reference_probs), with the student's graph;
    and the student's logits. far > 0: the far term, over the keys at least `far` positions back by
    `positions` (B, T) (None: 0..T-1), a query with no such key counting 0."""
    at = {} if positions is None else {"positions": positions}
    with torch.no_grad(), captured(teacher) as t_seen:
        teacher(ids, **at)
    with captured(student) as s_seen:
        logits = student(ids, **at)
    B, T = ids.shape
    allowed = torch.ones(T, T).tril().bool().expand(B, T, T)
    if far:
        pos = torch.arange(T).expand(B, T) if positions is None else positions
        allowed = allowed & (pos[:, :, None] - pos[:, None, :] >= far)
    counted = allowed.any(-1)[:, None, -n:]  # (B, 1, n): queries with a key to read
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # (those read every key here, and count 0)
    per_layer = []
    for l in range(len(student.layers)):
        index = teacher.layers[l].attn.key_index.tolist()
        log_p_t = reference_log_probs(*t_seen[l][:2], index, allowed)[:, :, -n:]
        log_p_s = reference_log_probs(*s_seen[l][:2], index, allowed)[:, :, -n:]
        p_t = log_p_t.exp()
        kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(-1)  # (B, H, n); 0 log 0 = 0
        per_layer.append((kl * counted).mean(1).sum())  # mean over heads, sum over rows and queries
    return torch.stack(per_layer).mean(), logits


def test_the_term_is_the_kl_between_the_two_models_attention():
    teacher, student = small_model(seed=0), small_model(seed=1)
    with torch.no_grad():
        assert tap_term(teacher, copy.deepcopy(teacher), IDS, 9).abs().item() <= 1e-6  # the same model: 0
        term = tap_term(teacher, student, IDS, 9)
        expected, _ = reference_term(teacher, student, IDS, 9)
    assert expected.item() > 0.01
    assert abs(term.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())


# Skipped positions (as dha.rows.skip_positions makes them): row 0 jumps 20 positions after its
# 15th token, row 1 none. With far = 18, row 0's last queries read the keys before the jump and a
# few after; row 1's first queries have no far key.
SKIPPED = torch.stack([torch.cat([torch.arange(15), torch.arange(35, 60)]), torch.arange(40)])


def test_the_far_term_is_the_kl_over_the_far_keys_renormalized():
    """Against the KL written out over the keys at least `far` positions back, by the rows' position
    ids; a query with no such key counts 0, and without positions the distance is the index's."""
    teacher, student = small_model(seed=0), small_model(seed=1)
    for positions, far, n in ((SKIPPED, 18, 30), (None, 18, 30), (SKIPPED, 30, 9)):
        tap = AttentionTap(n, far=far)
        at = {} if positions is None else {"positions": positions}
        with torch.no_grad():
            with tap.record(teacher, positions):
                teacher(IDS, **at)
            with tap.compare(student, 1.0, 1.0, positions):
                student(IDS, **at)
            expected, _ = reference_term(teacher, student, IDS, n, far, positions)
            whole, _ = reference_term(teacher, student, IDS, n, 0, positions)
        assert expected.item() > 0.01 and abs(expected.item() - whole.item()) > 0.01  # not the whole row's
        assert abs(tap.take("far").item() - expected.item()) <= 1e-5 * max(1.0, expected.item()), (far, n)
        assert abs(tap.take().item() - whole.item()) <= 1e-5 * max(1.0, whole.item())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_far_terms_gradient_is_that_of_the_terms_written_out(checkpointing):
    """weight * AKD + far_weight * FAR: the gradient of both written out, on skipped positions."""
    teacher, (weight, far_weight) = small_model(seed=0), (0.3, 0.7)
    reference = small_model(seed=1).train()
    term, logits = reference_term(teacher, reference, IDS, 30, 0, SKIPPED)
    far_term, _ = reference_term(teacher, reference, IDS, 30, 18, SKIPPED)
    (logits.square().mean() + weight * term + far_weight * far_term).backward()
    student = small_model(seed=1).train()
    set_checkpointing(student, checkpointing)
    tap = AttentionTap(30, far=18)
    with torch.no_grad(), tap.record(teacher, SKIPPED):
        teacher(IDS, positions=SKIPPED)
    with tap.compare(student, weight, far_weight, SKIPPED):
        student(IDS, positions=SKIPPED).square().mean().backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in student.named_parameters():
        assert (p.grad - grads[n]).abs().max().item() <= 1e-5 * grads[n].abs().max().item(), n


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_gradient_is_that_of_the_term_written_out(checkpointing):
    """The tap adds weight * term to the objective's gradient through each layer's attention output;
    checkpointed blocks run it again when they are recomputed in the backward pass."""
    teacher, weight = small_model(seed=0), 0.7
    reference = small_model(seed=1).train()
    term, logits = reference_term(teacher, reference, IDS, 11)
    (logits.square().mean() + weight * term).backward()
    student = small_model(seed=1).train()
    set_checkpointing(student, checkpointing)
    tap = AttentionTap(11)
    with torch.no_grad(), tap.record(teacher):
        teacher(IDS)
    with tap.compare(student, weight):
        student(IDS).square().mean().backward()
    assert abs(tap.take().item() - term.item()) <= 1e-5 * max(1.0, term.item())
    grads = {n: p.grad for n, p in reference.named_parameters()}
    assert any("k_proj" in n for n in grads)
    for n, p in student.named_parameters():  # float32 rounding of SDPA against the written-out softmax
        assert (p.grad - grads[n]).abs().max().item() <= 1e-5 * grads[n].abs().max().item(), n


def perturbed(model) -> Transformer:
    """A copy with noise on its key projections, as a merge leaves them."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for block in out.layers:
            w = block.attn.k_proj.weight
            w.add_(torch.randn(w.shape, generator=g) * w.std())
    return out


def attention_gap(teacher, student, rows, queries) -> float:
    with torch.no_grad():
        return tap_term(teacher, student, rows[:, :-1], queries).item() / (rows.shape[0] * queries)


def test_training_with_the_term_pulls_the_students_attention_to_the_teachers():
    """Logit distillation alone, then with the attention term at the same steps: the student's
    attention ends nearer the teacher's with it. The logged term is the mean KL per query (a step
    over every row logs the gap measured before it)."""
    teacher = small_model(seed=0)
    rows = torch.randint(0, 97, (32, 33), generator=torch.Generator().manual_seed(7))
    base = dict(tokens=16 * 33 * 4, block_size=33, batch_tokens=4 * 33, micro_batch=2, lr=1e-2)
    base.update(warmup_steps=1, dtype="float32", eval_every=0, distill=True, distill_weight=1.0)
    gaps = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig(**base, attention_distill=weight, attention_queries=8)
        student = perturbed(teacher)
        before = attention_gap(teacher, student, rows, 8)
        result = train(student, rows, None, cfg, teacher=teacher, progress=False)
        gaps[weight] = attention_gap(teacher, result.model, rows, 8)
        assert ("attention_distill_loss" in result.history[0]) == bool(weight)
    one_step = TrainConfig(
        **{**base, "tokens": 32 * 33, "batch_tokens": 32 * 33}, attention_distill=2.0, attention_queries=8
    )
    first = train(perturbed(teacher), rows, None, one_step, teacher=teacher, progress=False).history[0]
    assert abs(first["attention_distill_loss"] - before) <= 1e-5  # every row in the step, before its update
    assert first["objective"] == pytest.approx(first["distill_loss"] + 2.0 * first["attention_distill_loss"])
    assert gaps[1.0] < 0.5 * gaps[0.0], gaps


def test_a_step_logs_the_far_term_on_its_skipped_positions():
    """One step over every row, skipped positions on: the logged far term is the mean KL per query
    written out (reference_term) before it on the same rows and positions (dha.rows.rows_at,
    skip_positions), and the objective counts it at its weight."""
    teacher, student = small_model(seed=0), perturbed(small_model(seed=0))
    rows = torch.randint(0, 97, (32, 33), generator=torch.Generator().manual_seed(7))
    cfg = TrainConfig(
        tokens=32 * 33, block_size=33, batch_tokens=32 * 33, micro_batch=8, lr=1e-2, dtype="float32", eval_every=0,
        distill=True, distill_weight=1.0, far_attention_distill=2.0, far_distance=20, attention_queries=8,
        position_span=64,
    )  # fmt: skip
    inputs = rows[rows_at(32, cfg.seed, 0, 32), :-1]
    positions = skip_positions(32, 64, cfg.seed, torch.arange(32))
    with torch.no_grad():
        before = reference_term(teacher, student, inputs, 8, 20, positions)[0].item() / (32 * 8)
    first = train(student, rows, None, cfg, teacher=teacher, progress=False).history[0]
    assert before > 0.01 and abs(first["far_attention_distill_loss"] - before) <= 1e-5
    assert first["objective"] == pytest.approx(first["distill_loss"] + 2.0 * first["far_attention_distill_loss"])


ROWS = torch.randint(0, 97, (16, 33), generator=torch.Generator().manual_seed(5))


def ddp_config(**kw) -> TrainConfig:
    base = dict(tokens=3 * 4 * 33, block_size=33, batch_tokens=4 * 33, lr=3e-3, warmup_steps=1, dtype="float32")
    return TrainConfig(**base, eval_every=0, distill=True, attention_distill=0.5, attention_queries=8, **kw)


def _two_process_worker(rank: int, port: int, out_path: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        cfg = ddp_config(micro_batch=1, activation_checkpointing="on")
        result = train(perturbed(small_model()), ROWS, None, cfg, teacher=small_model(), progress=False)
        if rank == 0:
            weights = {k: v.detach() for k, v in result.model.state_dict().items()}
            torch.save({"history": result.history, "weights": weights}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_checkpointed_match_one_process(tmp_path, monkeypatch):
    """Under DDP, one row a micro batch, blocks checkpointed: the same steps as one process with four
    rows a micro batch (the term is a mean over the global batch's queries, like the LM loss)."""
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_two_process_worker, args=(port, out), nprocs=2, join=True)
    two = torch.load(out)
    cfg = ddp_config(micro_batch=4, activation_checkpointing="off")
    one = train(perturbed(small_model()), ROWS, None, cfg, teacher=small_model(), progress=False)
    for a, b in zip(two["history"], one.history, strict=True):
        for key in ("loss", "distill_loss", "attention_distill_loss", "objective"):
            assert abs(a[key] - b[key]) <= 1e-5, key
    for k, v in one.model.state_dict().items():
        assert (two["weights"][k] - v).abs().max().item() <= 1e-5, k


def test_cli_refuses_the_term_without_a_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    source = save_tiny_source(str(tmp_path / "tiny"), small_model(decoupled=False))
    data = text_file(str(tmp_path / "data.txt"))
    argv = ["train", source, "--data", data, "--tokens", "64", "--block-size", "16", "--no-progress"]
    assert main([*argv, "--attention-distill", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "attention distillation needs a teacher: add --distill" in err and not (tmp_path / "run").exists()
    assert main([*argv, "--distill", "--attention-distill", "-1", "--out", str(tmp_path / "run")]) == 2
    assert "attention distill must be >= 0" in capsys.readouterr().err
    assert main([*argv, "--far-attention-distill", "1", "--out", str(tmp_path / "run")]) == 2
    assert "far attention distillation needs a teacher: add --distill" in capsys.readouterr().err
    assert (
        main(
            [*argv, "--distill", "--far-attention-distill", "1", "--far-distance", "0", "--out", str(tmp_path / "run")]
        )
        == 2
    )
    assert "far distance must be at least 1" in capsys.readouterr().err and not (tmp_path / "run").exists()


# ---- the memory it holds, measured ---------------------------------------------------------------

LAYERS, WIDTH, QUERIES = 12, 2048, 256
STEP = rf"""
import contextlib, copy, json, sys, torch, torch.nn.functional as F
from dha.attention_kd import AttentionTap
from dha.model import ModelConfig, Transformer
from tests.helpers import scaled_init_
torch.set_num_threads(1)
cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers={LAYERS}, num_heads=4, head_dim=16, intermediate_size=128)
teacher = scaled_init_(Transformer(cfg), seed=0)
student = copy.deepcopy(teacher).train()
student.checkpoint_blocks = sys.argv[2] == "on"
tap = AttentionTap({QUERIES}, far=1024 if sys.argv[1] == "far" else 0) if sys.argv[1] != "none" else None
ids = torch.randint(0, 256, (1, {WIDTH}), generator=torch.Generator().manual_seed(0))
def status(field):  # kB -> bytes; VmHWM (peak) starts anew at exec
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
warm = student(ids[:, :65]).sum(); warm.backward()  # the allocator and autograd warmed up, gradients allocated
base = status("VmRSS")
with torch.no_grad(), (tap.record(teacher) if tap else contextlib.nullcontext()):
    teacher(ids[:, :-1])
with tap.compare(student, 1.0, 1.0) if tap else contextlib.nullcontext():
    F.cross_entropy(student(ids[:, :-1]).flatten(0, 1), ids[0, 1:]).backward()
print(json.dumps([status("VmHWM") - base, cfg.to_dict()]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_the_memory_estimate_counts_what_the_term_holds():
    """Peak resident memory of a teacher forward and a student step at 2,048 tokens (12 layers),
    with the term (256 queries), with the far term beside it, and without, blocks checkpointed and
    not, each in a child process (glibc gives blocks over 128 KiB back when freed, so the peak is
    that of live tensors). What the terms add is what dha.memory.attention_tap_numbers says, within
    25%."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = [(tap, ck) for tap in ("tap", "far", "none") for ck in ("off", "on")]
    children = {
        run: subprocess.Popen([sys.executable, "-c", STEP, *run], stdout=subprocess.PIPE, text=True, env=env)
        for run in runs
    }
    measured = {run: json.loads(child.communicate(timeout=300)[0]) for run, child in children.items()}
    cfg = ModelConfig.from_dict(measured[runs[0]][1])
    for tap, ck in runs[:4]:
        added = measured[(tap, ck)][0] - measured[("none", ck)][0]
        training = Training(micro_batch=1, block_size=WIDTH, attention_queries=QUERIES, far_attention=tap == "far")
        predicted = 4 * attention_tap_numbers(cfg, training, ck == "on")
        assert 0.75 * predicted <= added <= 1.25 * predicted, (tap, ck, added, predicted)
