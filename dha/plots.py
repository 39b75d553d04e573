"""The figures dha writes: heads kept per layer, and the training curves of a DHA run.

`pyplot()` is the one place matplotlib is set up (the non-interactive Agg backend, so figures are
written without a display); the analysis heatmaps (`dha.analyze`) and the speed plot (`dha.bench`)
draw with it too. Every figure is written by `save`: a temp file renamed into place.
"""

from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_file


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, **savefig) -> None:
    """Write `fig` to `path` atomically (its format from the extension, png without one), then close it."""
    plt = pyplot()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or "png", **savefig)
    finally:
        plt.close(fig)


def plot_allocation(plan, path: str) -> None:
    """Bar chart of the key and value heads a dha.plan.Plan keeps per layer (source counts as outlines)."""
    plt = pyplot()
    L = len(plan.layers)
    x = np.arange(L)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * L + 2), 3.5))
    ax.bar(x - 0.2, plan.source_key_heads, 0.4, fill=False, edgecolor="tab:blue", linewidth=0.8)
    ax.bar(x + 0.2, plan.source_value_heads, 0.4, fill=False, edgecolor="tab:orange", linewidth=0.8)
    ax.bar(x - 0.2, plan.key_heads(), 0.4, color="tab:blue", label="key heads")
    ax.bar(x + 0.2, plan.value_heads(), 0.4, color="tab:orange", label="value heads")
    ax.set_xlabel("layer")
    ax.set_ylabel("heads kept (outline: source)")
    ax.set_xticks(x if L <= 32 else x[::2])
    budget = f"{plan.kv_budget:g}" if plan.kv_budget is not None else "?"
    ax.set_title(f"{plan.method} plan: budget {budget}, kept {plan.kv_fraction():.3f} of the KV heads")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    save(fig, path)


# ---- the training curves of a DHA run (dha.pipeline): log records with "stage" fusion | continued ----


def _merge_line(ax, log: list[dict]) -> None:
    fusion_end = max((r["tokens"] for r in log if r["stage"] == "fusion"), default=None)
    if fusion_end is not None and any(r["stage"] == "continued" for r in log):
        ax.axvline(fusion_end, color="grey", linestyle=":", linewidth=1)
        ax.text(fusion_end, ax.get_ylim()[1], " merge", va="top", fontsize="small", color="grey")


def plot_loss(log: list[dict], path: str) -> None:
    """Training LM loss against tokens (both stages); the fusion distance on a second axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for stage, color in (("fusion", "tab:purple"), ("continued", "tab:blue")):
        rs = [r for r in log if r["kind"] == "train" and r["stage"] == stage]
        if rs:
            ax.plot(
                [r["tokens"] for r in rs], [r["loss"] for r in rs], color=color, linewidth=1, label=f"LM loss ({stage})"
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("LM loss (nats/token)")
    dist = [r for r in log if r["kind"] == "train" and "fusion/distance" in r]
    handles, labels = ax.get_legend_handles_labels()
    if dist:
        ax2 = ax.twinx()
        line = ax2.plot(
            [r["tokens"] for r in dist],
            [max(r["fusion/distance"], 1e-12) for r in dist],
            color="tab:green",
            linewidth=1,
            label="fusion distance (mean over groups)",
        )
        ax2.set_yscale("log")
        ax2.set_ylabel("fusion distance (relative)")
        handles += line
        labels += [line[0].get_label()]
    _merge_line(ax, log)
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    ax.set_title("DHA training: fusion stage, then continued training after the merge")
    fig.tight_layout()
    save(fig, path)


def plot_perplexity(log: list[dict], source_ppl: float | None, path: str) -> None:
    """Held-out perplexity against tokens (the evaluations of both stages), the source as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for stage, color in (("fusion", "tab:purple"), ("continued", "tab:blue")):
        rs = [r for r in log if r["kind"] == "eval" and r["stage"] == stage]
        if rs:
            ax.plot(
                [r["tokens"] for r in rs],
                [r["ppl"] for r in rs],
                "o-",
                color=color,
                markersize=3,
                linewidth=1,
                label=stage,
            )
    if source_ppl is not None:
        ax.axhline(source_ppl, color="black", linestyle="--", linewidth=1, label="source")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    _merge_line(ax, log)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title("Held-out perplexity during DHA training")
    fig.tight_layout()
    save(fig, path)


def plot_position_ratio(names: list[str], positions: list[dict], path: str) -> None:
    """Perplexity ratio to the first model against position in the window, one line per other model.

    positions: each model's `dha.longctx.position_report` (same window and buckets); a bucket is
    drawn at its geometric middle, on a log axis of token positions."""
    plt = pyplot()
    base = positions[0]["buckets"]
    mids = [np.sqrt(max(b["start"], 1) * b["end"]) for b in base]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    styles = ("-", "--", ":")  # past ten lines the colours repeat: the line style tells them apart
    for i, (name, result) in enumerate(zip(names[1:], positions[1:])):
        ratios = [r["ppl"] / b["ppl"] for r, b in zip(result["buckets"], base)]
        ax.plot(mids, ratios, marker="o", linestyle=styles[(i // 10) % 3], label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--", label=names[0])
    ax.set_xscale("log", base=2)
    ax.set_xticks(mids, [f"{b['start']}-{b['end']}" for b in base], rotation=30, fontsize=8)
    ax.set_xlabel(f"position in the window (tokens; {positions[0]['windows']} windows of {positions[0]['window']})")
    ax.set_ylabel(f"perplexity / {names[0]}'s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, dpi=120)


def plot_retrieval(names: list[str], grids: list[dict], path: str, per_row: int = 6) -> None:
    """Passkey retrieval heatmaps, one per model, `per_row` to a row: share found per needle depth
    (rows) and prompt length (columns)."""
    plt = pyplot()
    cols = min(per_row, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 2.2 * cols, 0.4 + 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(grids) :]:
        ax.set_visible(False)
    for ax, name, grid in zip(axes.flat, names, grids):
        lengths, depths = [str(n) for n in grid["lengths"]], grid["depths"]
        share = np.array([[grid["found"][n][d] / grid["per_cell"] for n in lengths] for d in range(len(depths))])
        ax.imshow(share, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        for i in range(len(depths)):
            for j, n in enumerate(lengths):
                ax.text(j, i, f"{grid['found'][n][i]}/{grid['per_cell']}", ha="center", va="center", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("prompt tokens")
    for row in axes:
        row[0].set_ylabel("needle depth")
    fig.suptitle(f"passkey found ({grids[0]['haystack']} haystack)", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=120)
