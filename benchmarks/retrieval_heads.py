"""Which key heads carry passkey retrieval, and what a conversion does to their attention.

For passkey prompts (dha.longctx) the attention of the prompt's last position (where the answer
starts) is read in every layer: per query head, the probability mass on the needle's key digits
(a retrieval head puts most of it there, Wu et al. 2024). Per key head, the mass of the query heads
that read it, summed. With --compare, the same prompts run through a converted model: its mass on
the needle per layer shows where retrieval attention is lost; and, when the converted model has a
plan.json, the groups each strong source key head went into. Every mass is also written per depth
(`..._by_depth`: depth, then layer), so that a needle far back can be told from one near the question.

    python benchmarks/retrieval_heads.py --length 2048 --prompts 6 --compare runs/dha-0 \\
        --out benchmarks/results/retrieval_heads_half.json
    python benchmarks/retrieval_heads.py --length 8192 --prompts 5 --per-depth 2 --compare runs/dha-0 \\
        --out benchmarks/results/retrieval_heads_half_8k.json   # 2 prompts at each of 5 depths
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dha.checkpoint import load  # noqa: E402
from dha.longctx import RetrievalOptions, key_head_mass, needle_attention_by_depth  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--compare", nargs="*", default=[])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=6, help="depths, from 8%% to 92%%")
    p.add_argument("--per-depth", type=int, default=1, help="prompts at each depth")
    p.add_argument("--top", type=int, default=10, help="strongest source key heads listed")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    source = load(args.source, torch.float32)
    probe = dict(length=args.length, depths=args.prompts, per_depth=args.per_depth)
    by_depth = needle_attention_by_depth(source.model, source.tokenizer, **probe)
    mass = by_depth.mean(0)
    heads = key_head_mass(source.model, mass)
    ranked = sorted(((m, l, j) for l, row in enumerate(heads) for j, m in enumerate(row)), reverse=True)[: args.top]
    result = {
        "length": args.length,
        "prompts": args.prompts,
        "per_depth": args.per_depth,
        "depths": RetrievalOptions(lengths=[args.length], depths=args.prompts).depth_values(),
        "source": args.source,
        "source_layer_mass": mass.sum(1).tolist(),
        "source_layer_mass_by_depth": by_depth.sum(2).tolist(),
        "source_key_heads": heads,
        "strongest": [{"layer": l, "key_head": j, "mass": m} for m, l, j in ranked],
        "compare": [],
    }
    for other in args.compare:
        loaded = load(other, torch.float32)
        d2 = needle_attention_by_depth(loaded.model, source.tokenizer, **probe)
        entry = {"model": other, "layer_mass": d2.mean(0).sum(1).tolist(), "layer_mass_by_depth": d2.sum(2).tolist()}
        plan_path = os.path.join(other, "plan.json")
        if os.path.exists(plan_path):
            plan = json.load(open(plan_path))
            entry["groups_of_strongest"] = [
                [g for g in plan["layers"][l]["key_groups"] if j in g] for _, l, j in ranked
            ]
        result["compare"].append(entry)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for m, l, j in ranked:
        print(f"layer {l:2d} key head {j}: needle mass {m:.3f}")
    print("per layer (source" + "".join(f" / {os.path.basename(c['model'])}" for c in result["compare"]) + "):")
    for l in range(len(mass)):
        print(f"  {l:2d} {mass[l].sum():.3f}" + "".join(f" {c['layer_mass'][l]:.3f}" for c in result["compare"]))
    strong = [l for l in range(len(mass)) if mass[l].sum() > 0.05]
    tables = [result["source_layer_mass_by_depth"]] + [c["layer_mass_by_depth"] for c in result["compare"]]
    print(f"per depth, layers {strong} (source / each compared model):")
    for d, depth in enumerate(result["depths"]):
        print(f"  {depth:.2f} " + " / ".join(" ".join(f"{t[d][l]:.3f}" for l in strong) for t in tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
