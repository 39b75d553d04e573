"""The long-context results as plots and a markdown table, from `long_context_lean.py` JSON lines.

The first model is the reference (the source): every other model's perplexity by position is drawn
as a ratio to it (docs/images/long_context_by_position.png), and the table is printed: per model
the ratio in each position bucket, the 4k-8k ratio over the 0-1k one (both as ratios to the
source), and passkeys found per length.

    python benchmarks/plot_long_context.py benchmarks/results/long_context_half.jsonl --out docs/images
    python benchmarks/plot_long_context.py benchmarks/results/long_context_half_20.jsonl --out docs/images \
        --retrieval smollm2-135m,pv2k_fp0_98k,pose2k_98k,pose2k_98k_s1,pv8k_fp0_98k,control2k_98k   # passkey heatmaps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dha.plots import plot_position_ratio, plot_retrieval  # noqa: E402


def read(paths: list[str]) -> dict[str, dict]:
    """{model name: {"by_position": ..., "retrieval": {merged grid of every length}}}, in file order."""
    models: dict[str, dict] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                m = models.setdefault(os.path.basename(r["model"].rstrip("/")), {})
                if r["kind"] == "by_position":
                    m["by_position"] = r
                else:
                    m.setdefault("retrieval", []).append(r)
    return models


def found(grids: list[dict]) -> dict[str, str]:
    return {
        str(g["lengths"][0]): f"{g['found_per_length'][str(g['lengths'][0])]}/{g['prompts_per_length']}" for g in grids
    }


def merged_grid(grids: list[dict]) -> dict:
    """One model's per-length passkey records as one grid (lengths ascending), as plot_retrieval reads it."""
    grids = sorted(grids, key=lambda g: g["lengths"][0])
    found = {str(g["lengths"][0]): g["found"][str(g["lengths"][0])] for g in grids}
    return {**grids[0], "lengths": [g["lengths"][0] for g in grids], "found": found}


def bucket_nll(model: dict, start: int, end: int) -> float:
    """Mean NLL over the indices [start, end) of the window (from the per-index NLL)."""
    values = model["by_position"]["nll_by_index"][max(start, 1) - 1 : end - 1]
    return sum(values) / len(values)


def table(names: list[str], models: list[dict]) -> list[str]:
    base = models[0]
    buckets = base["by_position"]["buckets"]
    lengths = list(found(base.get("retrieval", [])))
    head = (
        "| model | "
        + " | ".join(f"{b['start']}-{b['end']}" for b in buckets)
        + " | 4k-8k / 0-1k | "
        + " | ".join(f"passkey {n}" for n in lengths)
        + " |"
    )
    lines = [head, "|---|" + "---:|" * (len(buckets) + 1 + len(lengths))]
    near = {id(m): math.exp(bucket_nll(m, 0, 1024)) for m in models}
    far = {id(m): math.exp(bucket_nll(m, 4096, 8192)) for m in models}
    for name, m in zip(names, models):
        ratios = [r["ppl"] / b["ppl"] for r, b in zip(m["by_position"]["buckets"], buckets)]
        trend = (far[id(m)] / far[id(base)]) / (near[id(m)] / near[id(base)])
        got = found(m.get("retrieval", []))
        cells = [got.get(n, "-") for n in lengths]
        lines.append(
            f"| {name} | " + " | ".join(f"{r:.3f}x" for r in ratios) + f" | {trend:.3f} | " + " | ".join(cells) + " |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="long_context_lean.py outputs; the first model is the reference")
    p.add_argument("--out", default="docs/images")
    p.add_argument(
        "--retrieval",
        default=None,
        metavar="NAMES",
        help="only draw these models' passkey grids side by side (comma-separated run directory names) in "
        "long_context_retrieval.png",
    )
    args = p.parse_args(argv)
    read_models = read(args.files)
    if args.retrieval:
        chosen = args.retrieval.split(",")
        missing = [n for n in chosen if "retrieval" not in read_models.get(n, {})]
        if missing:
            p.error(f"no passkey records for {', '.join(missing)}")
        grids = [merged_grid(read_models[n]["retrieval"]) for n in chosen]
        plot_retrieval(chosen, grids, os.path.join(args.out, "long_context_retrieval.png"))
        return 0
    names = [n for n, m in read_models.items() if "by_position" in m]
    models = [read_models[n] for n in names]
    plot_position_ratio(
        names, [m["by_position"] for m in models], os.path.join(args.out, "long_context_by_position.png")
    )
    print("\n".join(table(names, models)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
