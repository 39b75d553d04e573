"""What the serving layout costs against the free DHA layout at the same KV budget, no training.

SmolLM2-135M on the built-in pydoc text: one calibration pass (4,096 train tokens, with gradients),
then the cost search with --layout free and with --layout serving, each plan aligned-merged,
held-out perplexity on 8,192 tokens (512-token windows), as in benchmarks/dha_vs_baselines.py.

    python benchmarks/serving_layout_cost.py --kv-budget 0.5 --out benchmarks/results/serving_layout_half.json
"""

from __future__ import annotations

import argparse
import json
import sys

from dha.calibration import calibrate
from dha.checkpoint import load
from dha.data import blocks, calibration_blocks, load_tokens
from dha.evaluate import perplexity
from dha.merge import aligned_merge, closed_form_merges
from dha.search import SearchOptions, search
from dha.serving import serving_layout_problem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-budget", type=float, default=0.5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    loaded = load(None)
    splits = load_tokens(None, loaded.tokenizer)
    windows = blocks(splits.heldout, 512)[:16]
    calib = calibration_blocks(splits.train, 4096, 256)
    cal = calibrate(loaded.model, calib, gradients=True)
    rows = [
        {"layout": "source", "ppl": perplexity(loaded.model, windows, 4, progress=False)["ppl"], "kv_fraction": 1.0}
    ]
    for layout in ("free", "serving"):
        plan = search(
            loaded.model, args.kv_budget, calib, SearchOptions(layout=layout, progress=False), calibration=cal
        )
        merged = aligned_merge(loaded.model, plan.layers, closed_form_merges(cal.stats, plan.layers))
        rows.append(
            {
                "layout": layout,
                "ppl": perplexity(merged, windows, 4, progress=False)["ppl"],
                "kv_fraction": plan.kv_fraction(),
                "key_heads": plan.key_heads(),
                "value_heads": plan.value_heads(),
                "serving_problem": serving_layout_problem(merged.config),
            }
        )
        print(
            f"{layout:>8}: ppl {rows[-1]['ppl']:.3f}, KV kept {plan.kv_fraction():.4f}, "
            f"serving check: {rows[-1]['serving_problem'] or 'ok'}",
            file=sys.stderr,
            flush=True,
        )
    report = {
        "kv_budget": args.kv_budget,
        "eval_tokens": int(windows.numel()),
        "rows": rows,
        "command": "python benchmarks/serving_layout_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
