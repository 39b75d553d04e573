"""Gather conversions' final tables and training logs into one result file.

Each `dha convert` run directory holds summary.json (its settings and final table: held-out
perplexity of the source, the merge without training and the result, with the by-position table
when --context was given) and log.jsonl (one line per step). This keeps, per run: the training
settings, the final table without the per-index losses, the result's perplexity over the source's,
and the loss, gradient norm and learning rate of each step.

    python benchmarks/conversion_summaries.py runs/long/recall256_49k_s0 runs/long/recall256_49k_s1 \
        --out benchmarks/results/long_context_recipe_budgets.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dha.atomic import write_json

TRAIN_KEYS = ("lr", "seed", "tokens", "block_size", "batch_tokens")
STEP_KEYS = ("step", "loss", "heldout_loss", "grad_norm", "lr")


def final_table(summary: dict) -> list[dict]:
    rows = []
    for row in summary["results"]:
        row = dict(row)
        if "by_position" in row:
            row["by_position"] = {k: v for k, v in row["by_position"].items() if k != "nll_by_index"}
        rows.append(row)
    return rows


def gather(run: str) -> dict:
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    table = final_table(summary)
    return {
        "tokens": summary["tokens"],
        "train": {k: summary["train"].get(k) for k in TRAIN_KEYS},
        "results": table,
        "ppl_ratio_to_source": table[-1]["heldout_ppl"] / table[0]["heldout_ppl"],
        "log": [{k: s[k] for k in STEP_KEYS if k in s} for s in steps],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="dha convert output directories")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    models = {os.path.basename(os.path.normpath(run)): gather(run) for run in args.runs}
    for name, m in models.items():
        ratio = m["ppl_ratio_to_source"]
        print(f"{name:<28} lr {m['train']['lr']:<8g} tokens {m['tokens']:>7,}  ppl / source {ratio:.4f}")
    write_json(args.out, {"command": " ".join(["python", *sys.argv]), "models": models})


if __name__ == "__main__":
    main()
