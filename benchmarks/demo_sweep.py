"""The `make demo` setting (SmolLM2-135M, KV budget 1/2, 24,576 tokens) under other training recipes.

Stage 1 (calibration, search, closed-form merges) runs once and is kept in --stage1 (reused when
it exists); each variant then runs DHA's fusion and continued training (dha.pipeline) with some
settings changed, and is scored on the demo's held-out windows (the final table's: windows of 512
of the held-out split, all of it), as a ratio to the source. A variant is a comma-separated list
of KEY=VALUE, where KEY is a field of dha.train.TrainConfig, of dha.fuse.FusionOptions (prefix
"fusion.") or fusion_fraction:

    python benchmarks/demo_sweep.py --variants "default" "lr=1e-3" "distill_weight=1.0" "fusion_fraction=0" \
        --seeds 0,1 --out benchmarks/results/demo_sweep.json

Prints one line per run and writes every run (settings, ppl, ratio, seconds) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields, replace

import torch

from dha.atomic import write_json
from dha.checkpoint import load
from dha.data import calibration_blocks, load_tokens
from dha.distributed import setup_distributed
from dha.evaluate import perplexity
from dha.options import FusionOptions, TrainConfig
from dha.pipeline import (
    DHAConfig,
    StageRun,
    continued_stage,
    fusion_stage,
    heldout_blocks,
    load_stage1,
    plan_and_merges,
    save_stage1,
    split_tokens,
)
from dha.search import SearchOptions


def parse_variant(text: str) -> dict:
    if text == "default":
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def typed(cls, key: str, value: str):
    kinds = {f.name: f.type for f in fields(cls)}
    if key not in kinds:
        raise SystemExit(f"{cls.__name__} has no field {key!r}")
    kind = str(kinds[key])
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    if "float" in kind:
        return float(value)
    if "int" in kind:
        return int(value)
    return value


def configure(base: DHAConfig, variant: dict, seed: int) -> DHAConfig:
    train, fusion, fraction = replace(base.train, seed=seed), base.fusion, base.fusion_fraction
    for key, value in variant.items():
        if key == "fusion_fraction":
            fraction = float(value)
        elif key.startswith("fusion."):
            name = key[len("fusion.") :]
            fusion = replace(fusion, **{name: typed(FusionOptions, name, value)})
        else:
            train = replace(train, **{key: typed(TrainConfig, key, value)})
    return replace(base, train=train, fusion=fusion, fusion_fraction=fraction)


def demo_stage1(loaded, splits, config: DHAConfig, path: str | None = None) -> tuple:
    """(plan, merges) of dha.pipeline's stage 1 for `config` on the built-in text, kept in `path`
    (default: one file per KV budget in the cache) and read back from there when it exists."""
    path = path or os.path.join(os.path.expanduser("~/.cache/dha"), f"demo_stage1_{config.kv_budget:g}.pt")
    if os.path.exists(path):
        return load_stage1(path)
    calib = calibration_blocks(splits.train, config.calib_tokens, config.calib_block_size)
    t0 = time.perf_counter()
    plan, merges = plan_and_merges(loaded.model, calib, config, SearchOptions(progress=False), None, lambda m: None)
    print(f"stage 1: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_stage1(path, plan, merges)
    return plan, merges


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--seeds", default="0")
    p.add_argument("--tokens", type=int, default=24576)
    p.add_argument("--kv-budget", type=float, default=0.5)
    p.add_argument(
        "--stage1", default=None, help="stage 1 file to read or write (default: one per --kv-budget in ~/.cache/dha)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    loaded = load(None)
    splits = load_tokens(None, loaded.tokenizer)
    template = TrainConfig(tokens=1, batch_tokens=1024, distill=True, eval_every=0)
    base = DHAConfig(kv_budget=args.kv_budget, tokens=args.tokens, train=template)
    plan, merges = demo_stage1(loaded, splits, base, args.stage1)
    windows = heldout_blocks(splits.heldout, base.final_eval_tokens, base.final_eval_block_size)
    source_ppl = perplexity(loaded.model, windows, batch_size=4, progress=False)["ppl"]
    print(f"source ppl {source_ppl:.3f} on {windows.numel()} tokens", file=sys.stderr)
    heldout_train = None  # no evaluations during training: only the final score counts here
    d = setup_distributed("cpu")
    runs = []
    for text in args.variants:
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = configure(base, parse_variant(text), seed)
            stages = split_tokens(
                config.tokens, config.fusion_fraction, config.train.batch_tokens, config.train.block_size
            )
            run = StageRun(None, False, {}, d, False)
            t0 = time.perf_counter()
            model, _, _ = fusion_stage(
                loaded.model, plan, merges, config, stages, splits, heldout_train, loaded.model, run, lambda m: None
            )
            model, _ = continued_stage(model, config, stages, splits, heldout_train, loaded.model, run, lambda m: None)
            seconds = time.perf_counter() - t0
            ppl = perplexity(model.eval(), windows, batch_size=4, progress=False)["ppl"]
            row = {
                "variant": text,
                "seed": seed,
                "ppl": ppl,
                "ratio": ppl / source_ppl,
                "train_seconds": round(seconds, 1),
            }
            runs.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out:
                write_json(
                    args.out,
                    {
                        "command": "python benchmarks/demo_sweep.py " + " ".join(argv or sys.argv[1:]),
                        "source_ppl": source_ppl,
                        "heldout_tokens": int(windows.numel()),
                        "runs": runs,
                    },
                )
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
