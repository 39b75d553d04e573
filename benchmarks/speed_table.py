"""Markdown tables from `dha bench` result files (benchmarks/decode_speed.sh writes them).

    python benchmarks/speed_table.py benchmarks/results/speed_grid_fp32.json [...]

One table per file: a row per model, a column per (batch, context) point, decode tokens/s with
the ratio to the file's first model (and prefill where it was timed).
"""

from __future__ import annotations

import json
import sys


def table(report: dict) -> str:
    points = sorted({(r["batch_size"], r["context"]) for r in report["results"]})
    cell = {(r["model"], r["batch_size"], r["context"]): r for r in report["results"]}
    timed_prefill = any(r["prefill_tokens_per_s"] is not None for r in report["results"])
    what = "prefill tok/s (x) / decode tok/s (x)" if timed_prefill else "decode tok/s (x)"
    head = "| model | KV B/token | " + " | ".join(f"b{b} x {c}" for b, c in points) + " |"
    lines = [
        f"`{report.get('command', 'dha bench')}`: {what}, {report['threads']} threads, {report['device']}",
        "",
        head,
        "|---|---:|" + "---:|" * len(points),
    ]
    for m in report["models"]:
        cells = []
        for b, c in points:
            r = cell[(m["name"], b, c)]
            text = f"{r['decode_tokens_per_s']:,.1f} ({r['ratios']['decode_tokens_per_s']:.2f}x)"
            if r["prefill_tokens_per_s"] is not None:
                text = f"{r['prefill_tokens_per_s']:,.0f} ({r['ratios']['prefill_tokens_per_s']:.2f}x) / " + text
            cells.append(text)
        lines.append(f"| {m['name']} | {m['kv_bytes_per_token']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(table(json.load(f)) + "\n")
