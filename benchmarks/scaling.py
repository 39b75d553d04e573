"""Peak memory and wall time of `dha convert --tokens 0` (--method dha and svd) against model size.

Cases (bf16 checkpoints written to a temporary directory; random weights: speed and memory only):
- tiny: a 2-layer random LLaMA (hidden 64), the constant overheads;
- smollm2-135m: the built-in default (SmolLM2-135M-Instruct), cast to bf16; smollm2-135m-mha: its
  exact MHA expansion (every query head its own key and value head);
- qwen2.5-0.5b, llama-3.2-1b, llama-3.2-3b: random-weight LLaMA models of those models' real
  shapes (hidden, intermediate, layers, heads, key/value heads, head dim, vocabulary, tied head);
- llama-3.2-1b-4l, -8l: the 1B shape with 4 and 8 layers (with the 16-layer one: time against layers
  at a fixed width; the 8-layer case runs last, if the budget allows).

Every conversion is its own process, `python -m dha convert SRC --method M --kv-budget 0.5
--tokens 0 --data D --calib-tokens C --calib-block-size 256 --out OUT --json`; its peak resident memory
is the kernel's high-water mark of that process (ru_maxrss of the waited child, os.wait4: VmHWM,
which counts the memory-mapped weights' resident pages too) and its wall time is from start to
exit; the anonymous part of the resident memory (everything but file-backed pages such as the
memory-mapped weights) is sampled every 20 ms. The data is a text file of 400 pydoc-topic
paragraphs with a held-out fraction of 0.003 (one paragraph), so the final perplexity table of
`--method dha` scores about 200 tokens: the conversion is what is measured. Cases run smallest
first; one whose time, extrapolated from the largest case before it (linear in parameters), would
take the conversions' wall time past --budget-s is skipped and listed.

    python benchmarks/scaling.py --out benchmarks/results/scaling_cpu.json [--budget-s 1200] [--cases a,b] [--add]

Writes the JSON (command, machine, one row per case and method, the fits) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> LLaMA shape (from each model's config.json); "layers" may be cut for the layer sweep
SHAPES = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_dim=16, vocab=49152, theta=10000.0),
    "qwen2.5-0.5b": dict(
        hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, head_dim=64, vocab=151936, theta=1e6
    ),
    "llama-3.2-1b-4l": dict(
        hidden=2048, intermediate=8192, layers=4, heads=32, kv_heads=8, head_dim=64, vocab=128256, theta=5e5
    ),
    "llama-3.2-1b-8l": dict(
        hidden=2048, intermediate=8192, layers=8, heads=32, kv_heads=8, head_dim=64, vocab=128256, theta=5e5
    ),
    "llama-3.2-1b": dict(
        hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256, theta=5e5
    ),
    "llama-3.2-3b": dict(
        hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, head_dim=128, vocab=128256, theta=5e5
    ),
}
# Shapes extrapolated to (not run): Mistral-7B-v0.1 and Llama-3-70B (both 8 key/value heads of dim 128,
# as Llama-3.2-3B).
EXTRAPOLATE = {
    "mistral-7b": dict(
        hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32000, tie=False
    ),
    "llama-3-70b": dict(
        hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=128256, tie=False
    ),
}
CASES = [
    "tiny",
    "smollm2-135m",
    "smollm2-135m-mha",
    "qwen2.5-0.5b",
    "llama-3.2-1b-4l",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.2-1b-8l",
]
METHODS = ("svd", "dha")


def layer_params(s: dict) -> int:
    D, hd = s["hidden"], s["head_dim"]
    return D * s["heads"] * hd * 2 + D * s["kv_heads"] * hd * 2 + 3 * D * s["intermediate"] + 2 * D


def params(s: dict) -> int:
    """Parameters of a LLaMA of shape s (tied output matrix unless s["tie"] is False)."""
    head = 0 if s.get("tie", True) else s["vocab"] * s["hidden"]
    return s["vocab"] * s["hidden"] + head + s["layers"] * layer_params(s) + s["hidden"]


# ---- checkpoints (each made in its own process, so its memory is returned before the measurements)


def make_random_llama(name: str, directory: str) -> None:
    """A LLaMA HF directory of SHAPES[name], bf16 random weights (std 0.02, norms 1), SmolLM2's tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from dha.checkpoint import load

    s = SHAPES[name]
    LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": s["theta"]},
        torch_dtype="bfloat16",
    ).save_pretrained(directory)
    g = torch.Generator().manual_seed(0)
    D, hd = s["hidden"], s["head_dim"]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.bfloat16) * 0.02

    sd = {"model.embed_tokens.weight": rand(s["vocab"], D), "model.norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    for l in range(s["layers"]):
        p = f"model.layers.{l}."
        sd |= {
            p + "self_attn.q_proj.weight": rand(s["heads"] * hd, D),
            p + "self_attn.k_proj.weight": rand(s["kv_heads"] * hd, D),
            p + "self_attn.v_proj.weight": rand(s["kv_heads"] * hd, D),
            p + "self_attn.o_proj.weight": rand(D, s["heads"] * hd),
            p + "mlp.gate_proj.weight": rand(s["intermediate"], D),
            p + "mlp.up_proj.weight": rand(s["intermediate"], D),
            p + "mlp.down_proj.weight": rand(D, s["intermediate"]),
            p + "input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
        }
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    load(None).tokenizer.save_pretrained(directory)


def make_smollm2(name: str, directory: str) -> None:
    """The built-in default (or its MHA expansion) as a bf16 native checkpoint."""
    import torch

    from dha.checkpoint import load, save
    from dha.transforms import expand_to_mha

    loaded = load(None)
    if name.endswith("-mha"):
        loaded.model = expand_to_mha(loaded.model)
    loaded.model = loaded.model.to(torch.bfloat16)
    save(directory, loaded)


def make_data(path: str) -> None:
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 200]
    with open(path, "w") as f:
        f.write("\n\n".join(paragraphs[:400]) + "\n")


# ---- measuring -----------------------------------------------------------------------------------


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def measure(argv: list[str], env: dict) -> dict:
    """Run argv: wall time, peak RSS (bytes; the kernel's high-water mark, file-backed pages such as
    memory-mapped weights included), peak anonymous RSS (sampled every 20 ms), CPU time, exit status."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
        anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's own rusage: ru_maxrss is its VmHWM
            if pid:
                break
            anon = max(anon, _rss_anon(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        tails = out.read().decode()[-400:], err.read().decode()[-600:]
    return {
        "wall_s": round(wall, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_anon_bytes_sampled": anon,
        "rc": proc.returncode,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "stdout_tail": tails[0],
        "stderr_tail": tails[1],
    }


def weight_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def fit_line(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "points": len(x)}


def run_case(name: str, method: str, src: str, data: str, work: str, calib_tokens: int, env: dict) -> dict:
    out = os.path.join(work, f"out-{name}-{method}")
    argv = [
        sys.executable,
        "-m",
        "dha",
        "convert",
        src,
        "--method",
        method,
        "--kv-budget",
        "0.5",
        "--tokens",
        "0",
        "--data",
        data,
        "--heldout-fraction",
        "0.003",
        "--calib-tokens",
        str(calib_tokens),
        "--calib-block-size",
        "256",
        "--out",
        out,
        "--json",
    ]
    if method == "dha":
        argv.append("--no-progress")
    row = measure(argv, env)
    if row["rc"] == 0 and method == "dha":
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        row["phases_s"] = summary["seconds"]
        row["heldout_tokens_scored"] = summary["results"][0]["heldout_tokens"]
    if row["rc"] == 0:
        row["out_weight_bytes"] = weight_bytes(out)
        shutil.rmtree(out)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="result JSON to write")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument(
        "--budget-s", type=float, default=1200.0, help="skip cases predicted to overrun this much wall time in all"
    )
    ap.add_argument("--work", default=None, help="directory for the checkpoints (default: a new temporary directory)")
    ap.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the conversions (default: torch's own, all cores)"
    )
    ap.add_argument(
        "--add", action="store_true", help="keep the rows already in --out; run only the (case, method) pairs it lacks"
    )
    ap.add_argument(
        "--make", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS
    )  # internal: write one checkpoint
    args = ap.parse_args()
    if args.make:
        name, directory = args.make
        (make_smollm2 if name.startswith("smollm2") else make_random_llama)(name, directory)
        return 0

    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="dha-scaling-")
    data = os.path.join(work, "pydoc_paragraphs.txt")
    make_data(data)
    startup = measure(
        [sys.executable, "-c", "import dha.cli, dha.pipeline, dha.search, dha.baselines, transformers"], env
    )
    rows, skipped, commands, kept = [], [], [], 0
    if args.add:
        with open(args.out) as f:
            before = json.load(f)
        rows, kept = before["cases"], len(before["cases"])
        commands = before.get("commands") or ["python " + before["command"]]
        skipped = [s for s in before["skipped"] if s["case"] not in args.cases.split(",")]
    commands.append(" ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]))
    for name in args.cases.split(","):
        src = os.path.join(work, name)
        if not os.path.exists(src):
            made = measure([sys.executable, os.path.abspath(__file__), "--out", "-", "--make", name, src], env)
            if made["rc"] != 0:
                raise SystemExit(f"making {name} failed: {made['stderr_tail']}")
        n_params = params(SHAPES[name]) if name in SHAPES else None
        if n_params is None:
            from safetensors import safe_open

            with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
                n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        for method in METHODS:
            if any(r["case"] == name and r["method"] == method for r in rows):
                continue
            done = [r for r in rows if r["method"] == method and r["rc"] == 0]
            largest = max(done, key=lambda r: r["params"]) if done else None
            predicted = largest["wall_s"] * n_params / largest["params"] if largest else 0.0
            elapsed = sum(r["wall_s"] for r in rows[kept:])  # this run's conversions only (not making the checkpoints)
            if elapsed + predicted > args.budget_s:
                skipped.append(
                    {
                        "case": name,
                        "method": method,
                        "predicted_wall_s": round(predicted, 1),
                        "elapsed_s": round(elapsed, 1),
                    }
                )
                print(f"skip {name} {method}: predicted {predicted:.0f} s after {elapsed:.0f} s", file=sys.stderr)
                continue
            row = {
                "case": name,
                "method": method,
                "threads": args.threads or os.cpu_count(),
                "params": n_params,
                "layers": SHAPES.get(name, {}).get("layers", 30),
                "weight_bytes": weight_bytes(src),
                **run_case(name, method, src, data, work, args.calib_tokens, env),
            }
            rows.append(row)
            print(
                f"{name:<18} {method:<4} params {n_params / 1e6:8.1f}M  "
                f"weights {row['weight_bytes'] / 2**30:6.2f} GiB  "
                f"peak {row['peak_rss_bytes'] / 2**30:6.2f} GiB  ({row['peak_rss_bytes'] / row['weight_bytes']:.2f}x)  "
                f"{row['wall_s']:7.1f} s  rc {row['rc']}",
                file=sys.stderr,
            )
            if row["rc"] != 0:
                print(row["stderr_tail"], file=sys.stderr)

    fits = {}
    for method in METHODS:
        ok = [r for r in rows if r["method"] == method and r["rc"] == 0]
        if len(ok) >= 2:
            fits[f"{method}_peak_rss_vs_weight_bytes"] = fit_line(
                [r["weight_bytes"] for r in ok], [r["peak_rss_bytes"] for r in ok]
            )
            fits[f"{method}_peak_anon_vs_weight_bytes"] = fit_line(
                [r["weight_bytes"] for r in ok], [r["peak_anon_bytes_sampled"] for r in ok]
            )
        sweep = [r for r in ok if r["case"].startswith("llama-3.2-1b")]
        if len(sweep) >= 2:
            for what in ("wall_s", "cpu_s"):
                fits[f"{method}_{what}_vs_layers_llama-3.2-1b_width"] = fit_line(
                    [r["layers"] for r in sweep], [r[what] for r in sweep]
                )
    result = {
        "commands": commands,
        "calib_tokens": args.calib_tokens,
        "kv_budget": 0.5,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "startup": {k: startup[k] for k in ("wall_s", "peak_rss_bytes")},
        "cases": [{k: v for k, v in r.items() if k not in ("stdout_tail",)} for r in rows],
        "skipped": skipped,
        "fits": fits,
        "extrapolation_shapes": {
            k: {**s, "params": params(s), "layer_params": layer_params(s)} for k, s in EXTRAPOLATE.items()
        },
        "measured_shapes": {k: {**s, "params": params(s), "layer_params": layer_params(s)} for k, s in SHAPES.items()},
    }
    if args.out != "-":
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.out)
    print(json.dumps(fits))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
