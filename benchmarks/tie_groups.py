"""Which key groups keep exact maps under position-free pairs (the tie rule, dha.merge.TIE).

For each setting, DHA's default stage 1 (calibration on 4,096 train tokens, the cost search, the
closed-form merges; no training): how many key groups merge with every pair exact, how many of
them are single heads, and how many merge with a position-free block. A group that exact maps fit
as well as the position-free block (single heads, copies) keeps exact maps. Writes --out.

    python benchmarks/tie_groups.py --out benchmarks/results/tie_groups.json
"""

from __future__ import annotations

import argparse
import sys

from dha.atomic import write_json
from dha.data import calibration_blocks, load_tokens
from dha.options import TrainConfig
from dha.pipeline import plan_and_merges

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dha_vs_baselines import dha_config, source_model  # noqa: E402

SETTINGS = (("smollm2", 0.5), ("smollm2", 0.3334), ("mha-permuted", 0.2223), ("mha-permuted", 0.4445))


def count(setup: str, kv_budget: float) -> dict:
    loaded = source_model(setup, 0)
    splits = load_tokens(None, loaded.tokenizer)
    cfg = dha_config("dha", kv_budget, 0, 4096, TrainConfig(tokens=1))
    calib = calibration_blocks(splits.train, cfg.calib_tokens, 256)
    plan, merges = plan_and_merges(loaded.model, calib, cfg, cfg.search, None, lambda message: None)
    rotary = loaded.model.config.rotary_dim
    groups = [
        (len(members), merge.rotary == rotary)
        for layer, lm in zip(plan.layers, merges)
        for members, merge in zip(layer.key_groups, lm["key"])
    ]
    return {
        "setup": setup,
        "kv_budget": kv_budget,
        "key_groups": len(groups),
        "exact": sum(exact for _, exact in groups),
        "exact_single_heads": sum(exact and n == 1 for n, exact in groups),
        "single_heads": sum(n == 1 for n, _ in groups),
        "position_free": sum(not exact for _, exact in groups),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for setup, budget in SETTINGS:
        rows.append(count(setup, budget))
        print(rows[-1], flush=True)
    if args.out:
        write_json(
            args.out, {"command": "python benchmarks/tie_groups.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
