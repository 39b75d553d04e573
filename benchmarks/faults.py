"""Faults survived: SIGKILL at random moments of `dha convert --method dha --tokens N`, then --resume.

    python benchmarks/faults.py [--trials 30] [--seed 0] [--out benchmarks/results/faults.json]

On the tests' tiny model and text (tests/conftest.py), with the default recipe (no fusion stage),
each trial starts the conversion in a child process (every optimizer step slowed by --delay
seconds, so that kills land in every stage), kills
it with SIGKILL at a uniformly random moment of its expected wall time, and then checks the one
promise: the output directory is absent, or it holds a finished model equal to the uninterrupted
run's, or it is not loadable as a model and `--resume` finishes it equal to the uninterrupted run
(losses and weights, fp32, atol 1e-6). The source checkpoint and the data must be byte-identical
(sha256) at the end. Also: a corrupted checkpoint before --resume, and two conversions into one
--out, must each end with exit status 2 and one line. Prints a table; writes a JSON result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from dha.checkpoint import load  # noqa: E402
from tests.test_dha_run import KILL_SCRIPT  # noqa: E402
from tests.test_dha_run import convert_args as test_convert_args  # noqa: E402
from tests.test_train import text_file, tiny_source  # noqa: E402


def convert_args(source: str, data: str, out: str, *extra: str) -> list[str]:
    """The tests' conversion under the current default recipe: no fusion stage (the aligned merge
    at once, every step trains the merged model)."""
    args = test_convert_args(source, data, out, *extra)
    i = args.index("--fusion-fraction")
    return args[:i] + args[i + 2 :]


def sha256_tree(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]:
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def start(args: list[str], delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(repo=REPO), str(delay), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate(timeout=600)
    return p.returncode, err.decode()


def result_of(out: str) -> tuple[list[float], dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"kind": "train"' in line]
    return losses, load(out, tokenizer=False).model.state_dict()


def equal(a: tuple, b: tuple) -> bool:
    if len(a[0]) != len(b[0]) or a[1].keys() != b[1].keys():
        return False
    close = torch.allclose(torch.tensor(a[0]), torch.tensor(b[0]), atol=1e-6, rtol=0)
    return close and all(torch.allclose(a[1][k], b[1][k], atol=1e-6, rtol=0) for k in a[1])


def stage_at_kill(out: str) -> str:
    """Where the run was, read from what it left."""
    if not os.path.isdir(out) or not [n for n in os.listdir(out) if n != ".lock"]:
        return "starting"
    names = os.listdir(out)
    if "dha_config.json" in names:
        return "finished"
    if any(n.startswith(".final-") for n in names):
        return "saving"
    if "stage1.pt" not in names:
        return "search"
    return "continued" if os.path.isdir(os.path.join(out, "continued")) else "fusion"


def kill_trial(source: str, data: str, out: str, at: float, delay: float, reference: tuple) -> dict:
    victim = start(convert_args(source, data, out, "--save-every", "2"), delay)
    time.sleep(at)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stage = stage_at_kill(out)
    row = {"kill_at_s": round(at, 2), "stage": stage, "exited_before_kill": victim.returncode == 0}
    if stage == "starting":
        row["outcome"], row["ok"] = "no run directory (a new command starts afresh)", True
        if os.path.isdir(out):  # at most the lock file: --resume starts anew
            code, err = finish(start(convert_args(source, data, out, "--resume", out), 0.0))
            row["ok"] = code == 0 and equal(result_of(out), reference)
        return row
    if stage == "finished":
        row["outcome"], row["ok"] = "finished model", equal(result_of(out), reference)
        return row
    try:
        load(out, tokenizer=False)
        loads_as_model = True
    except Exception:
        loads_as_model = False
    code, err = finish(start(convert_args(source, data, out, "--save-every", "2", "--resume", out), 0.0))
    row["outcome"] = "resumed"
    row["ok"] = (not loads_as_model) and code == 0 and equal(result_of(out), reference)
    if code != 0:
        row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {code}"
    return row


def corrupt_checkpoint_case(source: str, data: str, out: str, delay: float) -> dict:
    victim = start(convert_args(source, data, out, "--save-every", "1"), delay)
    checkpoint = os.path.join(out, "continued", "checkpoints", "step_00000002.pt")
    while not os.path.exists(checkpoint) and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with open(checkpoint, "r+b") as f:
        f.truncate(os.path.getsize(checkpoint) // 2)
    code, err = finish(start(convert_args(source, data, out, "--save-every", "1", "--resume", out), 0.0))
    return {
        "case": "corrupt checkpoint, then --resume",
        "exit": code,
        "message": err.strip(),
        "ok": code == 2 and err.count("\n") == 1,
    }


def concurrent_case(source: str, data: str, out: str, delay: float) -> dict:
    first = start(convert_args(source, data, out), 4 * delay)  # slow: still running when the others come
    while not os.path.exists(os.path.join(out, "run.json")) and first.poll() is None:
        time.sleep(0.02)
    second, third = (
        start(convert_args(source, data, out), 0.0),
        start(convert_args(source, data, out, "--resume", out), 0.0),
    )
    (code2, err2), (code3, err3) = finish(second), finish(third)
    assert first.poll() is None, "the first run ended before the others were refused: raise --delay"
    code1, _ = finish(first)
    return {
        "case": "two conversions into one --out",
        "first_exit": code1,
        "second_exit": code2,
        "second_message": err2.strip(),
        "resume_while_running_exit": code3,
        "resume_message": err3.strip(),
        "ok": code1 == 0 and code2 == 2 and code3 == 2,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.25, help="seconds added to every optimizer step of a killed run")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "faults.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="dha-faults-")
    os.environ["DHA_CACHE"] = os.path.join(work, "cache")
    source, data = tiny_source(os.path.join(work, "tiny")), text_file(os.path.join(work, "data.txt"))
    hashes = {"source": sha256_tree(source), "data": sha256_tree(data)}

    code, err = finish(
        start(convert_args(source, data, os.path.join(work, "reference")), 0.0)
    )  # also fills the token cache
    assert code == 0, err
    reference = result_of(os.path.join(work, "reference"))
    t0 = time.perf_counter()
    code, err = finish(start(convert_args(source, data, os.path.join(work, "slow"), "--save-every", "2"), args.delay))
    assert code == 0, err
    span = time.perf_counter() - t0  # the killed runs' expected wall time

    rows = []
    for i in range(args.trials):
        row = kill_trial(source, data, os.path.join(work, f"kill{i}"), rng.uniform(0, span), args.delay, reference)
        rows.append(row)
        print(
            f"trial {i:>2}: killed at {row['kill_at_s']:>5.2f}s in {row['stage']:<10} -> {row['outcome']:<45} "
            f"{'ok' if row['ok'] else 'FAILED'}",
            flush=True,
        )
    cases = [
        corrupt_checkpoint_case(source, data, os.path.join(work, "corrupt"), args.delay),
        concurrent_case(source, data, os.path.join(work, "twice"), args.delay),
    ]
    for c in cases:
        print(f"{c['case']}: {'ok' if c['ok'] else 'FAILED'}")
    unchanged = {k: sha256_tree(source if k == "source" else data) == v for k, v in hashes.items()}
    print(f"source and data byte-identical (sha256): {unchanged}")
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r["stage"], [0, 0])
        by_stage[r["stage"]][0] += 1
        by_stage[r["stage"]][1] += r["ok"]
    print("stage at kill: trials (passed) " + ", ".join(f"{k} {n} ({ok})" for k, (n, ok) in by_stage.items()))
    result = {
        "command": " ".join(["python", "benchmarks/faults.py", *sys.argv[1:]]),
        "trials": rows,
        "cases": cases,
        "by_stage": by_stage,
        "unchanged_sha256": unchanged,
        "span_s": round(span, 2),
        "passed": all(r["ok"] for r in rows) and all(c["ok"] for c in cases) and all(unchanged.values()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{'PASSED' if result['passed'] else 'FAILED'}; wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
