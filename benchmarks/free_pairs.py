"""Position-free pairs in DHA's key merge: perplexity with no training, by the number of pairs.

SmolLM2-135M (the built-in model) converted by `--method dha --tokens 0` at --kv-budget, with
--free-pairs K for each K given ("auto": the default rule, dha.options.FREE_ANGLE over
FREE_CONTEXT tokens). Each model is scored on held-out pydoc text in 512-token windows (4,096
tokens) and in windows of --long tokens (8,192 tokens in all), as ratios to the source on the same
windows: the merge treats the free pairs as if they did not turn, and the longer the window, the
further they do turn. Writes --out after every row.

    python benchmarks/free_pairs.py --free-pairs 0,4,6,8,10 --out benchmarks/results/free_pairs_third.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from dha.atomic import write_json
from dha.data import blocks, load_tokens
from dha.evaluate import perplexity
from dha.options import TrainConfig
from dha.pipeline import run_dha

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dha_vs_baselines import dha_config, source_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--free-pairs", default="0,auto", help="comma-separated counts, or auto")
    p.add_argument("--kv-budget", type=float, default=0.3334)
    p.add_argument("--long", type=int, default=2048, help="tokens per window of the second score")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    loaded = source_model("smollm2", 0)
    splits = load_tokens(None, loaded.tokenizer)
    short, long = blocks(splits.heldout, 512)[:8], blocks(splits.heldout, args.long)[: max(1, 8192 // args.long)]
    ppl = lambda m, w: perplexity(m, w, batch_size=1, progress=False)["ppl"]  # noqa: E731
    source = {"ppl512": ppl(loaded.model, short), "ppl_long": ppl(loaded.model, long)}
    template = TrainConfig(tokens=1, block_size=256, batch_tokens=1024)
    report = {
        "kv_budget": args.kv_budget,
        "long": args.long,
        "source": source,
        "rows": [],
        "command": "python benchmarks/free_pairs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    for k in args.free_pairs.split(","):
        t0 = time.perf_counter()
        cfg = dha_config("dha", args.kv_budget, 0, 4096, template)
        cfg = replace(cfg, search=replace(cfg.search, free_pairs=None if k == "auto" else int(k)))
        result = run_dha(loaded, splits, cfg, progress=False)
        model = result.loaded.model
        row = {
            "free_pairs": result.loaded.plan.notes.get("options", {}).get("free_pairs", k),
            "asked": k,
            "ppl512": ppl(model, short),
            "ppl_long": ppl(model, long),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        row["x512"], row["x_long"] = row["ppl512"] / source["ppl512"], row["ppl_long"] / source["ppl_long"]
        report["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:
            write_json(args.out, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
