"""Plots of the benchmark results (benchmarks/results/*.json) for docs/results.md and docs/method.md.

    python benchmarks/plot_results.py            # -> docs/images/*.png

- dha_vs_baselines_smollm2.png: held-out perplexity / source against training tokens, SmolLM2 at
  1/3 of its KV cache (every mean_target_smollm2_third_*.json and dha_vs_baselines_smollm2_16k.json), and
  the source itself trained the same way (mean_target_smollm2_source_*.json);
- small_mha.png: the small MHA model at 50% and 25%, each method (no training);
- ablations_smollm2.png: the DHA ablations on SmolLM2 at 1/2 (ablations_smollm2_half_*.json), each
  variant with no training and after 16,384 tokens.
- aligned_vs_baselines_smollm2.png: SmolLM2 at 1/3, every method of aligned_vs_baselines.sh against
  training tokens (seed 0), on held-out pydoc and on the man pages, as ratios to the source. The
  dha rows of files made before position-free key pairs (their "note" says so) are drawn as
  dha+exactpairs; gqa and prune with no training come from the 1/2 file (their floor is 1/3).
Only what the result files hold is drawn; a missing file is skipped. Files made while the dha
method's continued training re-read its fusion stage's rows say so ("reread_fusion_rows"); their
trained dha rows are labelled "(re-read)" (dashed in the SmolLM2 plot). Also prints the table of the
mean-target DHA on SmolLM2 at 1/3 in docs/results.md (held-out ppl and ratio to the source, per
method and token count) as Markdown.
"""

from __future__ import annotations

import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
IMAGES = os.path.join(REPO, "docs", "images")
COLORS = {
    "gqa": "tab:gray",
    "gqa-similar": "tab:brown",
    "svd": "tab:green",
    "prune": "tab:purple",
    "dha": "tab:red",
    "dha+pca": "tab:orange",
    "source": "black",
}


def rows(pattern: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path) as f:
            report = json.load(f)
        old_defaults = report.get("search_defaults", {})
        for r in report["rows"]:
            if "same_as" in r:
                continue
            out.append(
                {
                    **r,
                    "source_ppl": report["source_ppl"],
                    "search_defaults": old_defaults,
                    "reread": bool(report.get("reread_fusion_rows")) and reread(r),
                }
            )
    return out


def reread(row: dict) -> bool:
    """A trained dha row with a fusion stage, from a file made while continued training re-read fusion's rows."""
    return (
        row["method"].startswith("dha")
        and "pca" not in row["method"]
        and "nofusion" not in row["method"]
        and row["tokens"] > 0
    )


def smollm2_rows() -> list[dict]:
    """Benchmark 2: every method at 1/3, and the control (the source trained the same way)."""
    data = (
        rows("mean_target_smollm2_third_*.json")
        + rows("dha_vs_baselines_smollm2_16k.json")
        + rows("mean_target_smollm2_source_*.json")
    )
    for r in data:  # both kinds of dha run are here: name the old ones
        if r["reread"]:
            r["method"] += " (re-read)"
    return data


REREAD_NOTE = (
    "hatched: dha variants with fusion, trained: made while continued training re-read the fusion rows (fixed since)"
)


def plot_smollm2() -> str | None:
    data = smollm2_rows()
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in sorted({r["method"] for r in data}):
        pts = sorted((r["tokens"], r["ppl_ratio"]) for r in data if r["method"] == method)
        style = "o--" if method.endswith("(re-read)") else "o-"
        ax.plot(
            [t / 1000 for t, _ in pts],
            [p for _, p in pts],
            style,
            label=method,
            color=COLORS.get(method.removesuffix(" (re-read)")),
            alpha=0.5 if style == "o--" else 1.0,
        )
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("held-out perplexity / source")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_title("SmolLM2-135M at 1/3 of its KV cache (pydoc held-out)")
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save(fig, "dha_vs_baselines_smollm2.png")


def bars(ax, data: list[dict], title: str) -> None:
    """One group of bars per method, one bar per training-token count: perplexity / source, log scale."""
    methods = list(dict.fromkeys(r["method"] for r in data))
    tokens = sorted({r["tokens"] for r in data})
    width = 0.8 / len(tokens)
    handles, hatched = [], False
    for i, t in enumerate(tokens):
        # where a run was repeated after the re-read fix, the new one
        cell = [
            min((r for r in data if r["method"] == m and r["tokens"] == t), key=lambda r: r["reread"], default=None)
            for m in methods
        ]
        vals = [r["ppl_ratio"] if r else float("nan") for r in cell]
        made = ax.bar([j + i * width for j in range(len(methods))], vals, width, label=f"{t:,} tokens")
        handles.append(Patch(facecolor=made.patches[0].get_facecolor(), label=f"{t:,} tokens"))
        for patch, r in zip(made.patches, cell):
            if r and r["reread"]:
                patch.set_hatch("/////")
                hatched = True
    if hatched and not getattr(ax.figure, "reread_noted", False):
        ax.figure.text(0.01, 0.01, REREAD_NOTE, fontsize=7)
        ax.figure.reread_noted = True  # once per figure, however many panels
    ax.set_xticks([j + width * (len(tokens) - 1) / 2 for j in range(len(methods))], methods, rotation=20)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_ylabel("held-out perplexity / source")
    ax.set_title(title)
    ax.legend(handles=handles, fontsize="small")


def plot_small_mha() -> str | None:
    # (the *_seed*.json files are data-order controls of one row, not part of the comparison)
    panels = [
        (b, [r for f in ("50k", "dha_50k_distinct") for r in rows(f"mean_target_small_mha_{b}_{f}.json")])
        for b in ("0.5", "0.25")
    ]
    panels = [(b, d) for b, d in panels if d]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, (budget, data) in zip(axes[0], panels):
        bars(ax, data, f"small MHA model, budget {budget}")
    fig.tight_layout()
    return save(fig, "small_mha.png")


def plot_ablations() -> str | None:
    data = [r for r in rows("ablations_smollm2_half_*.json") if r["method"].startswith("dha")]
    for r in data:  # files made before sensitivity weighting was the default: say what their cost-search rows were
        if r["search_defaults"].get("sensitivity") is False and "learned" not in r["method"]:
            r["method"] += "+nosensitivity"
        r["method"] = r["method"].replace("+sensitivity", "")  # the default since: plain dha
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.2))
    bars(ax, data, "DHA ablations, SmolLM2-135M at 1/2 of its KV cache")
    fig.tight_layout()
    return save(fig, "ablations_smollm2.png")


def aligned_rows() -> list[dict]:
    data = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "smollm2_*.json"))):
        name = os.path.basename(path)
        if not (name.startswith("smollm2_third_") or name == "smollm2_half_0.json"):
            continue
        if any(tag in name for tag in ("seed1", "seed2", "lr3e-4", "nodistill")):
            continue  # seed and setting controls of one cell, in docs/results.md's tables
        with open(path) as f:
            report = json.load(f)
        exact_pairs = "before position-free" in report.get("note", "")
        for r in report["rows"]:
            if name.startswith("smollm2_half") and (r["kv_fraction"] > 0.34 or r["method"] not in ("gqa", "prune")):
                continue
            method = "dha+exactpairs" if exact_pairs and r["method"] == "dha" else r["method"]
            data.append({**r, "method": method})
    if data:
        data.append({"method": "source", "tokens": 0, "ppl_ratio": 1.0, "second_ppl_ratio": 1.0})
    return data


def plot_aligned() -> str | None:
    data = aligned_rows()
    if not data:
        return None
    tokens = sorted({r["tokens"] for r in data})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {**COLORS, "dha+exactpairs": "tab:orange", "dha+mean": "tab:pink"}
    for ax, key, title in (
        (axes[0], "ppl_ratio", "held-out pydoc"),
        (axes[1], "second_ppl_ratio", "man pages (never trained on)"),
    ):
        for method in dict.fromkeys(r["method"] for r in data):
            pts = sorted((tokens.index(r["tokens"]), r[key]) for r in data if r["method"] == method and r.get(key))
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                "o-",
                label=method,
                color=colors.get(method),
                linewidth=2.5 if method == "dha" else 1.2,
            )
        ax.set_xticks(range(len(tokens)), [f"{t:,}" for t in tokens])
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel("training tokens")
        ax.set_title(f"SmolLM2-135M at 1/3 of its KV cache: {title}", fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity / source")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    return save(fig, "aligned_vs_baselines_smollm2.png")


def save(fig, name: str) -> str:
    os.makedirs(IMAGES, exist_ok=True)
    path = os.path.join(IMAGES, name)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def smollm2_table() -> str:
    data = smollm2_rows()
    tokens = sorted({r["tokens"] for r in data})
    lines = ["| method | " + " | ".join(f"{t:,} tokens" for t in tokens) + " |", "|---|" + "---:|" * len(tokens)]
    for method in dict.fromkeys(r["method"] for r in data):
        cells = []
        for t in tokens:
            r = next((r for r in data if r["method"] == method and r["tokens"] == t), None)
            cells.append(f"{r['ppl']:,.1f} ({r['ppl_ratio']:.2f}x)" if r else "")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(smollm2_table())
    for made in (plot_smollm2(), plot_small_mha(), plot_ablations(), plot_aligned()):
        if made:
            print(made)
