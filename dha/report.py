"""report.md of a dha conversion, from its summary.json: how the run was made, the table against the
source, long context (perplexity by position, passkeys), the heads each layer keeps, the plots.

Plain functions from the summary dict to lines of markdown; nothing here runs a model.
"""

from __future__ import annotations


def format_number(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def long_context_markdown(rows: list[dict]) -> list[str]:
    """The report's long-context tables: perplexity by position (ratio to the source) and passkeys found."""
    lines = []
    source = rows[0]
    if "by_position" in source:
        buckets = source["by_position"]["buckets"]
        lines += [
            (
                "## Long context: perplexity by position "
                f"({source['by_position']['window']:,}-token window of held-out text)"
            ),
            "",
            "| model | " + " | ".join(f"{b['start']}-{b['end']}" for b in buckets) + " |",
            "|---|" + "---:|" * len(buckets),
        ]
        for r in rows:
            cells = [
                f"{b['ppl']:.2f} ({b['ppl'] / s['ppl']:.3f}x)" for b, s in zip(r["by_position"]["buckets"], buckets)
            ]
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Each cell: perplexity of the tokens at those positions, and in brackets its ratio to the source's.",
            "",
        ]
    if "retrieval" in source:
        grid = source["retrieval"]
        lines += [
            (
                f"## Long context: passkey retrieval ({grid['prompts_per_length']} prompts per length, "
                f"{grid['haystack']} haystack)"
            ),
            "",
            "| model | " + " | ".join(f"{n} tokens" for n in grid["lengths"]) + " |",
            "|---|" + "---:|" * len(grid["lengths"]),
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | "
                + " | ".join(f"{v}/{grid['prompts_per_length']}" for v in r["retrieval"]["found_per_length"].values())
                + " |"
            )
        lines.append("")
    return lines


def report_markdown(summary: dict, plots: list[str]) -> str:
    """report.md: how the run was made, the table against the source, long context, heads per layer, the plots."""
    rows = summary["results"]
    lines = ["# DHA conversion report", "", *run_markdown(summary), ""]
    lines += against_source_markdown(rows)
    lines += long_context_markdown(rows)
    lines += heads_markdown(summary)
    lines += plots_markdown(plots)
    return "\n".join(lines)


def run_markdown(summary: dict) -> list[str]:
    """The report's list of what was done: source, data, budget, search, tokens, fusion, training, time."""
    lines = [
        f"- source: `{summary['source']}`",
        f"- data: `{summary['data']}` (calibration and training on its train split; evaluation on its held-out split)",
        f"- KV budget: {summary['kv_budget']:g}; kept {summary['kv_fraction']:.4f} of the source's KV heads",
        f"- search: {summary['search']['search']} ({summary['calibration_tokens']:,} calibration tokens)",
        f"- training tokens: {summary['tokens']:,} = fusion {summary['fusion_tokens']:,} "
        f"+ continued {summary['continued_tokens']:,}"
        + ("" if summary["tokens"] else " (tokens 0: groups merged, no training)"),
    ]
    if summary["fusion_tokens"]:
        fu = summary["fusion"]
        lines.append(
            f"- fusion: toward the {summary['merge']} merge, {fu['schedule']} schedule "
            f"(weight {fu['weight']:g}, eps {fu['eps']:g}), "
            f"base K/V weights {'trained' if fu['train_base'] else 'frozen'}, "
            f"maps {'trained' if fu['learn_maps'] else 'frozen'}; "
            f"fusion distance at the merge: {format_number(summary['fusion_distance_at_merge'], '.3g')}"
        )
    if summary.get("train"):
        tr = summary["train"]
        lines.append(
            f"- training: lr {tr['lr']:g}, batch {tr['batch_tokens']:,} tokens of blocks of {tr['block_size']}, "
            f"autocast {tr['dtype']}"
            + (f", distillation (weight {tr['distill_weight']:g})" if tr["distill"] else "")
            + (
                f", attention distillation (weight {tr['attention_distill']:g}, last {tr['attention_queries']} queries)"
                if tr.get("attention_distill")
                else ""
            )
            + (
                f", far attention distillation (weight {tr['far_attention_distill']:g}, "
                f"keys {tr['far_distance']:,} positions back or more)"
                if tr.get("far_attention_distill")
                else ""
            )
            + (f", recall spans of {tr['recall_tokens']} tokens" if tr.get("recall_tokens") else "")
        )
    lines.append("- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items()))
    return lines


def against_source_markdown(rows: list[dict]) -> list[str]:
    """The report's main table: each model's KV heads, KV cache and held-out perplexity, and their ratios to the
    source's (rows[0])."""
    source = rows[0]
    lines = [
        "## Against the source",
        "",
        "| model | KV heads | KV bytes/token (bf16) | KV cache vs source | held-out ppl | ppl vs source |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["kv_bytes_per_token_bf16"] / source["kv_bytes_per_token_bf16"]
        rel = (r["heldout_ppl"] / source["heldout_ppl"]) if (r["heldout_ppl"] and source["heldout_ppl"]) else None
        lines.append(
            f"| {r['model']} | {r['kv_heads']} | {r['kv_bytes_per_token_bf16']:,} | {ratio:.1%} | "
            f"{format_number(r['heldout_ppl'], '.3f')} | {'n/a' if rel is None else format(rel, '.3f') + 'x'} |"
        )
    lines += ["", f"Perplexity on {source['heldout_tokens']:,} held-out tokens (non-overlapping windows).", ""]
    return lines


def heads_markdown(summary: dict) -> list[str]:
    """The report's table of the key and value heads each layer keeps."""
    lines = ["## Heads per layer", "", "| layer | key heads | value heads |", "|---:|---:|---:|"]
    for l, (k, v) in enumerate(zip(summary["key_heads"], summary["value_heads"])):
        lines.append(f"| {l} | {k} | {v} |")
    lines.append("")
    return lines


PLOT_CAPTIONS = {
    "allocation.png": "Key and value heads kept per layer (outline: the source).",
    "loss.png": "Training loss against tokens; fusion distance on the right axis; the dotted line is the merge.",
    "perplexity.png": (
        "Held-out perplexity against tokens (the training evaluations' windows); "
        "the dashed line is the source on the same windows."
    ),
}


def plots_markdown(plots: list[str]) -> list[str]:
    """The report's plots (files in the same directory), each with its caption."""
    lines = ["## Plots", ""]
    for p in plots:
        lines += [f"![{p}]({p})", "", PLOT_CAPTIONS.get(p, ""), ""]
    return lines
