"""The qk-norm table: dha and svd on the model trained with qk-norm beside the one trained without.

Reads the result files of benchmarks/qk_norm.sh (benchmarks/dha_vs_baselines.py, one per model and
budget) and prints one markdown row per budget and token count: each method's perplexity ratio to
its own source on held-out pydoc and on the second text, for the qk-norm model and the plain one
(with `gqa`, the mean of the projections that ignores the norm, where a file has it), and the two
targets: dha's ratio on the qk-norm model within 1.2x of its ratio on the plain model,
and dha ahead of svd on the qk-norm model.

    python benchmarks/qk_norm_table.py benchmarks/results/qk_norm_{,gqa_}{qknorm,plain}_{0.5,0.3334}.json
    python benchmarks/qk_norm_table.py --qk fullnorm \
        benchmarks/results/qk_norm_{,gqa_}{fullnorm,plain}_{0.5,0.3334}.json

Each file's model is named by its setup directory, less "small-" (qknorm: Qwen3's per-head norms;
fullnorm: OLMo 2's norms over the whole projections; plain: none); --qk picks the qk-norm one.
"""

from __future__ import annotations

import argparse
import json
import os


def rows_by_key(path: str) -> tuple[str, float, dict]:
    """(model name from the setup path, budget, {(method, tokens): row})."""
    with open(path) as f:
        result = json.load(f)
    model = os.path.basename(result["setup"].rstrip("/")).removeprefix("small-")
    return model, result["kv_budget"], {(r["method"], r["tokens"]): r for r in result["rows"]}


def cell(row: dict | None, key: str) -> str:
    return f"{row[key]:.3f}x" if row and row.get(key) is not None else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--qk", default="qknorm", help="the qk-norm model's name (module doc)")
    args = p.parse_args(argv)
    found = {}
    for path in args.results:
        model, budget, rows = rows_by_key(path)
        found.setdefault((model, budget), {}).update(rows)
    print(
        "| budget | tokens | text | dha, qk-norm | dha, plain | dha qk-norm / plain | svd, qk-norm | svd, plain "
        "| gqa, qk-norm | gqa, plain | control, qk-norm | control, plain |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for budget in sorted({b for _, b in found}, reverse=True):
        qk, plain = found.get((args.qk, budget), {}), found.get(("plain", budget), {})
        for tokens in sorted({t for _, t in qk}):
            for text, key in (("pydoc", "ppl_ratio"), ("man pages", "second_ppl_ratio")):
                d_qk, d_plain = qk.get(("dha", tokens)), plain.get(("dha", tokens))
                ratio = d_qk[key] / d_plain[key] if d_qk and d_plain else None
                s_qk, s_plain = qk.get(("svd", tokens)), plain.get(("svd", tokens))
                g_qk, g_plain = qk.get(("gqa", tokens)), plain.get(("gqa", tokens))
                c_qk, c_plain = qk.get(("source", tokens)), plain.get(("source", tokens))
                if ratio is None:
                    print(f"| {budget:g} | {tokens:,} | {text} | missing | | | | | | | | |")
                    continue
                cells = [cell(r, key) for r in (d_qk, d_plain)] + [f"{ratio:.3f}"]
                cells += [cell(r, key) for r in (s_qk, s_plain, g_qk, g_plain, c_qk, c_plain)]
                print(f"| {budget:g} | {tokens:,} | {text} | " + " | ".join(cells) + " |")
                ahead = s_qk is not None and d_qk[key] < s_qk[key]  # no svd row: not shown ahead
                verdicts.append((budget, tokens, text, ratio <= 1.2, ahead))
    met = all(a and b for *_, a, b in verdicts)
    print(f"\ntargets ({len(verdicts)} cells): within 1.2x of the plain model and ahead of svd in every cell: {met}")
    for budget, tokens, text, within, ahead in verdicts:
        if not (within and ahead):
            print(f"  missed at {budget:g}, {tokens:,} tokens, {text}: within 1.2x {within}, ahead of svd {ahead}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
