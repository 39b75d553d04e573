"""What a fusion step costs against a plain training step (the goal: at most 1.3x).

SmolLM2-135M with the demo's plan (KV budget 1/2, the aligned merges of dha.pipeline's stage 1).
Both are the same `dha.train.train` loop on the same batches (float32 master weights, the autocast
dtype of --dtype, distillation from the source when --distill): "plain" trains the source model,
"fusion" the FusedModel under the FusionSchedule hooks (anneal ramping over the steps, the fusion
loss, the trainable merge maps). Repeats alternate the two; a step's time is the loop's own
per-step "seconds" (forward, backward, optimizer step), the first step of each run left out as a
warm-up. Reports the median of each and their ratio.

    python benchmarks/fusion_step.py --steps 4 --repeats 3 --out benchmarks/results/fusion_step.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from demo_sweep import demo_stage1  # benchmarks/demo_sweep.py: the script's directory is on sys.path

from dha.atomic import write_json
from dha.checkpoint import load
from dha.data import load_tokens
from dha.fuse import FusedModel, FusionSchedule
from dha.options import TrainConfig
from dha.pipeline import DHAConfig
from dha.train import resolve_dtype, train


def step_seconds(kind: str, loaded, plan, merges, stream, cfg) -> list[float]:
    teacher = loaded.model if cfg.distill else None
    if kind == "fusion":
        model = FusedModel(loaded.model, plan, merges)
        hooks = FusionSchedule(model, cfg.tokens // cfg.batch_tokens).hooks()
    else:
        model, hooks = copy.deepcopy(loaded.model), None
    result = train(model, stream, None, cfg, teacher=teacher, hooks=hooks, progress=False)
    return [r["seconds"] for r in result.history if r["kind"] == "train"][1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stage1", default=None, help="stage 1 file (default: demo_sweep.py's for KV budget 0.5)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    loaded = load(None)
    splits = load_tokens(None, loaded.tokenizer)
    plan, merges = demo_stage1(loaded, splits, DHAConfig(kv_budget=0.5), args.stage1)
    cfg = TrainConfig(
        tokens=args.steps * args.batch_tokens,
        batch_tokens=args.batch_tokens,
        eval_every=0,
        dtype=args.dtype,
        distill=args.distill,
    )
    times = {"plain": [], "fusion": []}
    for r in range(args.repeats):
        for kind in ("plain", "fusion") if r % 2 == 0 else ("fusion", "plain"):
            t = step_seconds(kind, loaded, plan, merges, splits.train, cfg)
            times[kind] += t
            print(f"repeat {r} {kind}: {', '.join(f'{x:.2f}' for x in t)} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python benchmarks/fusion_step.py " + " ".join(argv or sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "batch_tokens": args.batch_tokens,
        "dtype": args.dtype,
        "autocast": resolve_dtype(args.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "distill": args.distill,
        "step_seconds": times,
        "median": med,
        "ratio": med["fusion"] / med["plain"],
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"plain {med['plain']:.2f} s, fusion {med['fusion']:.2f} s per step: ratio {result['ratio']:.3f}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
