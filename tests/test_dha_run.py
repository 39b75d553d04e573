"""`dha convert --method dha --tokens N` as a run: resume after SIGKILL, torchrun (DDP), one run per --out.

The reference for each is the same command run uninterrupted in one process: a resumed run must
equal it to fp32 rounding (1e-6), a two-process run to the reordering of sums (1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

from dha.checkpoint import load
from dha.cli import main
from tests.conftest import kill_when
from tests.test_train import REPO, _free_port, text_file, tiny_source

TOKENS = 640  # 10 steps of 64 tokens: 3 fusion, 7 continued


@pytest.fixture
def run_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("DHA_CACHE", str(tmp_path / "cache"))
    source = tiny_source(str(tmp_path / "tiny"))
    data = text_file(str(tmp_path / "data.txt"))
    return tmp_path, source, data


def convert_args(source: str, data: str, out: str, *extra: str) -> list[str]:
    return [
        "convert",
        source,
        "--method",
        "dha",
        "--kv-budget",
        "0.5",
        "--data",
        data,
        "--block-size",
        "16",
        "--calib-block-size",
        "16",
        "--batch-tokens",
        "64",
        "--fusion-fraction",
        "0.3",
        "--calib-tokens",
        "256",
        "--tokens",
        str(TOKENS),
        "--eval-every",
        "4",
        "--train-dtype",
        "float32",
        "--no-progress",
        "--json",
        "--out",
        out,
        *extra,
    ]


def final_run(out: str) -> tuple[list[float], dict]:
    """The training losses of both stages (log.jsonl) and the converted model's weights."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["stage"], r["step"]) for r in train] == [("fusion", s) for s in (1, 2, 3)] + [
        ("continued", s) for s in range(1, 8)
    ]
    return [r["loss"] for r in train], load(out, tokenizer=False).model.state_dict()


# ---- SIGKILL, then --resume -------------------------------------------------------------------------

# The CLI in a child process, every optimizer step slowed by DELAY seconds (time to kill it).
KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
import dha.train
delay = float(sys.argv[1])
real = dha.train.lr_factor
dha.train.lr_factor = lambda *a: (time.sleep(delay), real(*a))[1]
from dha.cli import main
sys.exit(main(sys.argv[2:]))
"""


def child(args: list[str], delay: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(repo=REPO), str(delay), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("stage,step", [("fusion", 2), ("continued", 3)])
def test_sigkill_then_resume_equals_uninterrupted(run_setup, stage, step):
    tmp_path, source, data = run_setup
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    reference = child(convert_args(source, data, full))
    victim = child(convert_args(source, data, killed, "--save-every", "1"), delay=0.3)
    kill_when(victim, os.path.join(killed, stage, "checkpoints", f"step_{step:08d}.pt"))
    assert not os.path.exists(os.path.join(killed, "dha_config.json"))  # not a finished model
    with pytest.raises(Exception):
        load(killed)
    resumed = child(convert_args(source, data, killed, "--save-every", "1", "--resume", killed))
    for p in (reference, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert f"resuming from {os.path.join(killed, stage)}".encode() in err
    losses_full, weights_full = final_run(full)
    losses_resumed, weights_resumed = final_run(killed)
    # Same process setup, same order of operations: equal up to fp32 rounding (1e-6).
    assert_close(torch.tensor(losses_resumed), torch.tensor(losses_full), atol=1e-6, rtol=0)
    for k, v in weights_full.items():
        assert_close(weights_resumed[k], v, atol=1e-6, rtol=0)
    leftovers = [n for n in os.listdir(killed) if n.startswith(".final-") or n == "stage1.pt"]
    assert not leftovers and not os.path.exists(os.path.join(killed, "fusion", "checkpoints"))
    assert os.path.exists(os.path.join(killed, "continued", "log.jsonl"))  # each stage's live log stays


def test_kill_during_search_leaves_a_run_that_resumes(run_setup):
    tmp_path, source, data = run_setup
    out = str(tmp_path / "o")
    victim = child(convert_args(source, data, out, "--save-every", "1"), delay=0.3)
    kill_when(victim, os.path.join(out, "run.json"))
    assert main(convert_args(source, data, out, "--save-every", "1", "--resume", out)) == 0
    assert load(out).plan.method == "dha"


# ---- bad input -----------------------------------------------------------------------------------------


def test_resume_refuses_other_settings_a_finished_run_and_a_foreign_out(run_setup, capsys):
    tmp_path, source, data = run_setup
    out = str(tmp_path / "o")
    victim = child(convert_args(source, data, out, "--save-every", "1"), delay=0.3)
    kill_when(victim, os.path.join(out, "fusion", "checkpoints", "step_00000001.pt"))
    capsys.readouterr()
    assert main(convert_args(source, data, out, "--save-every", "1", "--resume", out, "--lr", "1e-3")) == 2
    assert "holds a different run (differs in config.train.lr)" in capsys.readouterr().err
    assert main(convert_args(source, data, out)) == 2  # not resuming: the run is not overwritten
    assert "already holds this run: pass --resume" in capsys.readouterr().err
    assert main(convert_args(source, data, str(tmp_path / "elsewhere"), "--resume", out)) == 2
    assert "resumes in its own directory" in capsys.readouterr().err
    assert main(convert_args(source, data, out, "--resume", out)) == 0  # --save-every may change on resume
    capsys.readouterr()
    assert main(convert_args(source, data, out, "--resume", out)) == 2
    assert "holds a finished run" in capsys.readouterr().err


def test_corrupt_checkpoint_and_stage1_are_clear_errors(run_setup, capsys):
    tmp_path, source, data = run_setup
    out = str(tmp_path / "o")
    victim = child(convert_args(source, data, out, "--save-every", "1"), delay=0.3)
    checkpoint = os.path.join(out, "fusion", "checkpoints", "step_00000002.pt")
    kill_when(victim, checkpoint)
    with open(checkpoint, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    assert main(convert_args(source, data, out, "--save-every", "1", "--resume", out)) == 2
    assert "unreadable" in capsys.readouterr().err
    os.unlink(checkpoint)
    with open(os.path.join(out, "stage1.pt"), "wb") as f:
        f.write(b"not a torch file")
    assert main(convert_args(source, data, out, "--save-every", "1", "--resume", out)) == 2
    err = capsys.readouterr().err
    assert "stage1.pt is unreadable" in err and err.count("\n") == 1


def test_two_conversions_into_one_out(run_setup):
    tmp_path, source, data = run_setup
    out = str(tmp_path / "o")
    first = child(convert_args(source, data, out), delay=1.5)  # 15 s of steps: still running when the second comes
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "run.json")) and time.time() < deadline:
        time.sleep(0.02)
    second = child(convert_args(source, data, out, "--resume", out))  # even as a resume: the run is in use
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and b"in use by another dha run" in err, err.decode()
    assert first.poll() is None  # refused while the first run held --out
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()
    assert load(out).plan.method == "dha"


def test_plan_from_another_model_is_refused(run_setup, capsys):
    tmp_path, source, data = run_setup
    other = tiny_source(str(tmp_path / "other"), layers=3)
    plan_out = str(tmp_path / "plan3")
    assert main(["convert", other, "--method", "gqa", "--kv-budget", "0.5", "--out", plan_out]) == 0
    capsys.readouterr()
    out = str(tmp_path / "o")
    assert main(convert_args(source, data, out, "--plan", os.path.join(plan_out, "plan.json"))) == 2
    assert "plan" in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing half-written


# ---- torchrun: two processes equal one ------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, args: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        assert main(args) == 0
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(run_setup, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tmp_path, source, data = run_setup
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(convert_args(source, data, one, "--micro-batch", "4")) == 0
    mp.spawn(
        _worker, args=(2, _free_port(), convert_args(source, data, two, "--micro-batch", "2")), nprocs=2, join=True
    )
    losses_one, weights_one = final_run(one)
    losses_two, weights_two = final_run(two)
    # fp32; only the order of summation differs (two ranks of 2 rows against one of 4): 1e-5.
    assert_close(torch.tensor(losses_two), torch.tensor(losses_one), atol=1e-5, rtol=0)
    for k, v in weights_one.items():
        assert_close(weights_two[k], v, atol=1e-5, rtol=0)
    with open(os.path.join(two, "summary.json")) as f:
        assert json.load(f)["processes"] == 2
