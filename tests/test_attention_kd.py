"""Attention distillation (dha.attention_kd, `--attention-distill`): the distributions it reads are
the attention each layer applies, the term is the KL between two models' attention computed here
by hand, checkpointed blocks give the same gradients, and training with it pulls the student's
attention toward the teacher's.

fp32 on the CPU throughout: 1e-6 for probabilities and gradients, 1e-5 for attention outputs and
summed KLs."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from dha.attention_kd import AttentionTap, last_queries_log_probs
from dha.cli import main
from dha.model import ModelConfig, Transformer, causal_window_mask
from dha.options import TrainConfig
from dha.train import set_checkpointing, train
from tests.conftest import save_tiny_source, text_file
from tests.helpers import scaled_init_

pytestmark = pytest.mark.usefixtures("one_thread")

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


def reference_probs(q, k, key_index, allowed) -> torch.Tensor:
    """(B, H, T, S) attention probabilities, head by head, written out."""
    heads = []
    for h in range(q.shape[1]):
        scores = q[:, h] @ k[:, key_index[h]].transpose(-1, -2) / HD**0.5  # (B, T, S)
        heads.append(torch.where(allowed, scores, torch.tensor(float("-inf"))).softmax(-1))
    return torch.stack(heads, 1)


IDS = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))


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
    with tap.compare(student):
        student(ids)
        term = tap.take()
    return term


def test_the_term_is_the_kl_between_the_two_models_attention():
    teacher, student = small_model(seed=0), small_model(seed=1)
    n = 9
    with torch.no_grad():
        assert tap_term(teacher, copy.deepcopy(teacher), IDS, n).abs().item() <= 1e-6  # the same model: 0
        term = tap_term(teacher, student, IDS, n)
        with captured(teacher) as t_seen, captured(student) as s_seen:
            teacher(IDS), student(IDS)
    T = IDS.shape[1]
    causal = torch.ones(T, T).tril().bool()
    per_layer = []
    for l in range(2):
        index = teacher.layers[l].attn.key_index.tolist()
        p_t = reference_probs(*t_seen[l][:2], index, causal)[:, :, -n:]
        p_s = reference_probs(*s_seen[l][:2], index, causal)[:, :, -n:]
        kl = F.kl_div(p_s.log(), p_t, reduction="none").nan_to_num().sum(-1)  # (B, H, n); 0 * log 0 = 0
        per_layer.append(kl.mean(1).sum())  # mean over heads, sum over rows and queries
    expected = torch.stack(per_layer).mean()
    assert expected.item() > 0.01
    assert abs(term.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())


def test_checkpointed_blocks_give_the_same_term_and_gradients():
    """The tap runs again when a checkpointed block is recomputed in the backward pass."""
    teacher = small_model(seed=0)
    results = []
    for checkpointing in (False, True):
        student = small_model(seed=1).train()
        set_checkpointing(student, checkpointing)
        tap = AttentionTap(11)
        with torch.no_grad(), tap.record(teacher):
            teacher(IDS)
        with tap.compare(student):
            student(IDS)
            term = tap.take()
            term.backward()
        results.append((term.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}))
    (term, grads), (term_ck, grads_ck) = results
    assert abs(term.item() - term_ck.item()) <= 1e-6
    assert grads.keys() == grads_ck.keys() and any("k_proj" in n for n in grads)
    assert max((grads[n] - grads_ck[n]).abs().max().item() for n in grads) <= 1e-6


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
    """Under DDP, one row a micro batch, blocks checkpointed: the same steps as one process with two
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
