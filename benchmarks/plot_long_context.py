"""The long-context results as plots and a markdown table, from `dha eval --json` files (one model each).

The first file is the reference (the source): every other model's perplexity by position is drawn
as a ratio to it (docs/images/long_context_by_position.png), passkeys found as heatmaps
(docs/images/long_context_retrieval.png), and the table is printed: per model the ratio in each
position bucket, the 4k-8k ratio over the 0-1k one, and passkeys found per length.

    python benchmarks/plot_long_context.py benchmarks/results/long_context_smollm2-135m.json \\
        benchmarks/results/long_context_dha0.json ... --out docs/images
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dha.plots import plot_position_ratio, plot_retrieval  # noqa: E402


def read(path: str) -> tuple[str, dict]:
    with open(path) as f:
        model = json.loads(f.read().strip().splitlines()[-1])["models"][0]
    return os.path.basename(path).removeprefix("long_context_").removesuffix(".json"), model


def bucket_nll(model: dict, start: int, end: int) -> float:
    """Mean NLL over the indices [start, end) of the window (from the per-index NLL)."""
    values = model["by_position"]["nll_by_index"][max(start, 1) - 1:end - 1]
    return sum(values) / len(values)


def table(names: list[str], models: list[dict]) -> list[str]:
    base = models[0]
    buckets = base["by_position"]["buckets"]
    grid = base["retrieval"]
    head = ("| model | " + " | ".join(f"{b['start']}-{b['end']}" for b in buckets) + " | 4k-8k / 0-1k | "
            + " | ".join(f"passkey {n}" for n in grid["lengths"]) + " |")
    lines = [head, "|---|" + "---:|" * (len(buckets) + 1 + len(grid["lengths"]))]
    near = {id(m): math.exp(bucket_nll(m, 0, 1024)) for m in models}
    far = {id(m): math.exp(bucket_nll(m, 4096, 8192)) for m in models}
    for name, m in zip(names, models):
        ratios = [r["ppl"] / b["ppl"] for r, b in zip(m["by_position"]["buckets"], buckets)]
        trend = (far[id(m)] / far[id(base)]) / (near[id(m)] / near[id(base)])
        found = [f"{v}/{grid['prompts_per_length']}" for v in m["retrieval"]["found_per_length"].values()]
        lines.append(f"| {name} | " + " | ".join(f"{r:.3f}x" for r in ratios) + f" | {trend:.3f} | " + " | ".join(found) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="dha eval --json outputs; the first is the reference")
    p.add_argument("--out", default="docs/images")
    args = p.parse_args(argv)
    names, models = zip(*(read(f) for f in args.files))
    plot_position_ratio(list(names), [m["by_position"] for m in models], os.path.join(args.out, "long_context_by_position.png"))
    plot_retrieval(list(names), [m["retrieval"] for m in models], os.path.join(args.out, "long_context_retrieval.png"))
    print("\n".join(table(list(names), list(models))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
