"""Which key heads carry passkey retrieval, and what a conversion does to their attention.

For passkey prompts (dha.longctx) the attention of the prompt's last position (where the answer
starts) is read in every layer: per query head, the probability mass on the needle's key digits
(a retrieval head puts most of it there, Wu et al. 2024). Per key head, the mass of the query heads
that read it, summed. With --compare, the same prompts run through a converted model: its mass on
the needle per layer shows where retrieval attention is lost; and, when the converted model has a
plan.json, the groups each strong source key head went into.

    python benchmarks/retrieval_heads.py --length 2048 --prompts 6 --compare runs/dha-0 \\
        --out benchmarks/results/retrieval_heads_half.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dha.checkpoint import load  # noqa: E402
from dha.longctx import key_head_mass, needle_attention  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="smollm2-135m")
    p.add_argument("--compare", nargs="*", default=[])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--top", type=int, default=10, help="strongest source key heads listed")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    source = load(args.source, torch.float32)
    mass = needle_attention(source.model, source.tokenizer, args.length, args.prompts)
    heads = key_head_mass(source.model, mass)
    ranked = sorted(((m, l, j) for l, row in enumerate(heads) for j, m in enumerate(row)), reverse=True)[: args.top]
    result = {
        "length": args.length,
        "prompts": args.prompts,
        "source": args.source,
        "source_layer_mass": mass.sum(1).tolist(),
        "source_key_heads": heads,
        "strongest": [{"layer": l, "key_head": j, "mass": m} for m, l, j in ranked],
        "compare": [],
    }
    for other in args.compare:
        loaded = load(other, torch.float32)
        m2 = needle_attention(loaded.model, source.tokenizer, args.length, args.prompts)
        entry = {"model": other, "layer_mass": m2.sum(1).tolist()}
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
