"""DHA against the baselines at equal KV budget and equal training tokens, in one run.

Setups (SmolLM2-135M and the built-in pydoc text unless --setup PATH):

  --setup smollm2      SmolLM2 itself (3 KV heads per layer) at --kv-budget (default 0.34: one
                       K and one V head per layer, plus what the budget's rounding leaves over)
  --setup mha-permuted SmolLM2 expanded to MHA (9 KV heads, exact) with every layer's query heads
                       randomly permuted: identical heads scattered (docs/method.md, "The exact test"). At 3/9 the
                       search must recover the original groups and reproduce the source with 0 tokens.

  --setup PATH         any checkpoint `dha.checkpoint.load` reads (benchmark 3: the small MHA
                       model of benchmarks/train_small_mha.py)

Methods: the names of `dha convert --method`, and DHA ablations written dha+CHANGE[+CHANGE], each
switching one default of `--method dha` off: nofusion (no fusion stage: the merge at once, all
tokens after it; the default since the recipe sweep), mean (fuse toward the group mean for 30% of
the tokens: the old DHA), pca (PCA-merge the searched groups, all tokens after the merge), uniform (same K
and V counts in every layer), coupled (keys and values share groups and counts), learned (the
paper-faithful learned search instead of the cost DP), nosensitivity (the cost DP on the relative
costs alone), exactpairs (every RoPE pair merged exactly: no position-free pairs), fusionF (fusion
fraction F, e.g. fusion0.6). `source` is the control: the unconverted
model trained by the same loop on the same tokens (how much of a gain is just fine-tuning on the text).

Result files made before the search's sensitivity weighting became the default say so
in their "note": their `dha` rows are what `dha+nosensitivity` is now.

For each method and each token count: convert (dha: search + fusion + merge + continued training
by dha.pipeline.run_dha; baselines: dha.convert.convert then dha.train.train with the same
TrainConfig), then held-out perplexity on the same windows, as a ratio to the source's. Each row
also has its wall time and the process's peak resident memory during it ("peak_rss_gib": the
source, the teacher and the row's own models together).

    python benchmarks/dha_vs_baselines.py --setup smollm2 --tokens 0,16384 --methods gqa,svd,dha
    python benchmarks/dha_vs_baselines.py --setup mha-permuted --kv-budget 0.3334 --tokens 0 \\
        --methods gqa-similar,svd,dha
    python benchmarks/dha_vs_baselines.py --kv-budget 0.5 --tokens 16384 --methods dha,dha+nofusion,dha+uniform

A method whose converted model is bit-identical to one already run (gqa-similar and gqa at one
head per layer: a single group can be formed only one way) is not trained again: its row copies
that result and says so in "same_as".

Prints a table and one JSON line; --out FILE also writes the JSON there.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import replace

import torch

from dha.atomic import write_json
from dha.baselines import ConvertOptions
from dha.bench import memory_now, reset_peak_memory
from dha.budget import source_heads
from dha.checkpoint import load
from dha.convert import METHODS, convert
from dha.data import blocks, calibration_blocks, load_tokens
from dha.evaluate import perplexity
from dha.options import FusionOptions, TrainConfig
from dha.pipeline import DHAConfig, run_dha
from dha.search import SearchOptions
from dha.train import train
from dha.transforms import expand_to_mha, permute_query_heads

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for tests.helpers
from tests.helpers import identity_plan  # noqa: E402

# nofusion: the aligned merge at once, all tokens after it | mean: fuse toward the group mean (the old
# target) | plain: the aligned merge in the plain (PCA) metric | pca: plain + nofusion (the old
# --merge pca recipe) | nodistill: no distillation | frozenmaps: the merge maps are not trained
DHA_CHANGES = (
    "nofusion",
    "mean",
    "plain",
    "pca",
    "nodistill",
    "frozenmaps",
    "uniform",
    "coupled",
    "learned",
    "nosensitivity",
    "exactpairs",
)


def dha_config(
    method: str, kv_budget: float, tokens: int, calib_tokens: int, train_cfg: TrainConfig, learned_steps: int = 240
) -> DHAConfig:
    """DHAConfig of "dha" or an ablation "dha+change+...", see the module doc."""
    changes = method.split("+")[1:]
    # the old mean-target DHA is its old recipe: 30% of the tokens in fusion (a mean merge without fusion is ruin)
    fraction = 0.3 if "mean" in changes else DHAConfig(kv_budget).fusion_fraction
    for c in [c for c in changes if c.startswith("fusion")]:
        fraction = float(c[len("fusion") :])
        changes.remove(c)
    unknown = [c for c in changes if c not in DHA_CHANGES]
    if unknown:
        raise SystemExit(f"unknown DHA change(s) {unknown}; choose from {', '.join(DHA_CHANGES)}")
    search = SearchOptions(
        search="learned" if "learned" in changes else "cost",
        metric="plain" if {"plain", "pca"} & set(changes) else "weighted",
        allocation="uniform" if "uniform" in changes else "adaptive",
        decoupled="coupled" not in changes,
        sensitivity="nosensitivity" not in changes,
        free_pairs=0 if "exactpairs" in changes else None,
        steps=learned_steps,
        progress=False,
    )
    fusion = FusionOptions(learn_maps="frozenmaps" not in changes)
    train = replace(train_cfg, tokens=max(tokens, 1), distill=train_cfg.distill and "nodistill" not in changes)
    return DHAConfig(
        kv_budget=kv_budget,
        tokens=tokens,
        calib_tokens=calib_tokens,
        final_eval_tokens=512,
        fusion_fraction=0.0 if {"nofusion", "pca"} & set(changes) else fraction,
        merge="mean" if "mean" in changes else "aligned",
        fusion=fusion,
        search=search,
        train=train,
    )


def second_windows(path: str, tokenizer, max_tokens: int) -> torch.Tensor:
    """512-token windows of a second text, all of it (train and held-out parts alike: nothing trains on it)."""
    splits = load_tokens(path, tokenizer)
    stream = torch.cat([splits.heldout, splits.train])
    return blocks(stream, 512)[: max(1, max_tokens // 512)]


def fingerprint(model) -> str:
    """sha256 of the model's config and weights: equal for bit-identical conversions."""
    h = hashlib.sha256(repr(model.config).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def source_model(setup: str, seed: int):
    loaded = load(None if setup in ("smollm2", "mha-permuted") else setup)
    if setup == "mha-permuted":
        # Permute the query heads of the GQA model first, then expand: the copies of each KV
        # head land on scattered positions. (Permuting after expanding would only move the maps
        # and leave the copied K/V heads contiguous.)
        g = torch.Generator().manual_seed(seed)
        cfg = loaded.model.config
        perms = [torch.randperm(cfg.num_heads, generator=g).tolist() for _ in range(cfg.num_layers)]
        loaded.model = expand_to_mha(permute_query_heads(loaded.model, perms)).eval()
    return loaded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", default="smollm2", help="smollm2 | mha-permuted | PATH of a checkpoint (module doc)")
    p.add_argument("--kv-budget", type=float, default=0.34)
    p.add_argument("--methods", default="gqa,gqa-similar,svd,prune,dha")
    p.add_argument("--tokens", default="0,16384", help="comma-separated training-token budgets")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored (windows of 512)")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument(
        "--lr", type=float, default=TrainConfig(tokens=1).lr, help="peak learning rate (default: dha train's)"
    )
    p.add_argument(
        "--learned-steps", type=int, default=240, help="optimisation steps of the learned search (dha+learned)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every method's training distils from the source (dha's default; default on)",
    )
    p.add_argument(
        "--second-text",
        default=None,
        help="a second text (any --data form) that nothing trains or calibrates on: every model is also scored on it",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    loaded = source_model(args.setup, args.seed)
    splits = load_tokens(None, loaded.tokenizer)
    windows = blocks(splits.heldout, 512)[: max(1, args.eval_tokens // 512)]
    calib = calibration_blocks(splits.train, args.calib_tokens, 256)
    source_ppl = perplexity(loaded.model, windows, batch_size=4, progress=False)["ppl"]
    print(f"source ({args.setup}): ppl {source_ppl:.3f} on {windows.numel()} held-out tokens", file=sys.stderr)
    second = second_windows(args.second_text, loaded.tokenizer, args.eval_tokens) if args.second_text else None
    second_source = (
        perplexity(loaded.model, second, batch_size=4, progress=False)["ppl"] if second is not None else None
    )
    train_cfg = TrainConfig(
        tokens=1,
        block_size=256,
        batch_tokens=args.batch_tokens,
        micro_batch=4,
        lr=args.lr,
        eval_every=0,
        eval_tokens=2048,
        seed=args.seed,
        distill=args.distill,
    )
    rows = []

    def summary() -> dict:
        return {
            "setup": args.setup,
            "kv_budget": args.kv_budget,
            "source_ppl": source_ppl,
            "learned_steps": args.learned_steps,
            "second_text": args.second_text,
            "second_source_ppl": second_source,
            "distill": args.distill,
            "seed": args.seed,
            "eval_tokens": int(windows.numel()),
            "train": {"batch_tokens": args.batch_tokens, "lr": args.lr},
            "rows": rows,
            "seconds": round(time.perf_counter() - t_start, 1),
            "command": "python benchmarks/dha_vs_baselines.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }

    dha_plans = {}  # the search is deterministic: run it once per search setting, reuse it for every token budget
    done = {}  # (fingerprint of the converted model, tokens) -> row
    for method in args.methods.split(","):
        if (method != "source" and method.split("+")[0] not in METHODS) or (
            "+" in method and not method.startswith("dha+")
        ):
            raise SystemExit(f"unknown method {method}")
        for tokens in [int(t) for t in args.tokens.split(",")]:
            t0 = time.perf_counter()
            reset_peak_memory(torch.device("cpu"))
            same_as = None
            if method.startswith("dha"):
                cfg = dha_config(method, args.kv_budget, tokens, args.calib_tokens, train_cfg, args.learned_steps)
                search_key = repr(cfg.search)  # variants that differ after the search share its plan
                result = run_dha(loaded, splits, cfg, plan=dha_plans.get(search_key), progress=False)
                dha_plans[search_key] = result.loaded.plan
                model, plan = result.loaded.model, result.loaded.plan
            else:
                if method == "source":  # the control: no conversion, the same training
                    model, plan = copy.deepcopy(loaded.model), identity_plan(*source_heads(loaded.model))
                else:
                    converted = convert(
                        loaded,
                        method,
                        args.kv_budget,
                        calib,
                        ConvertOptions(seed=args.seed, calib_tokens=args.calib_tokens),
                    )
                    model, plan = converted.model, converted.plan
                key = (fingerprint(model), tokens)
                if key in done:
                    same_as = done[key]
                elif tokens:
                    teacher = loaded.model if train_cfg.distill else None
                    model = train(
                        model, splits.train, None, replace(train_cfg, tokens=tokens), teacher=teacher, progress=False
                    ).model
            if same_as is not None:
                ppl, ppl2 = same_as["ppl"], same_as.get("second_ppl")
            else:
                model.eval()
                ppl = perplexity(model, windows, batch_size=4, progress=False)["ppl"]
                ppl2 = perplexity(model, second, batch_size=4, progress=False)["ppl"] if second is not None else None
            row = {
                "method": method,
                "tokens": tokens,
                "ppl": ppl,
                "ppl_ratio": ppl / source_ppl,
                "second_ppl": ppl2,
                "second_ppl_ratio": ppl2 / second_source if ppl2 else None,
                "kv_fraction": plan.kv_fraction(),
                "key_heads": sum(plan.key_heads()),
                "value_heads": sum(plan.value_heads()),
                "seconds": round(time.perf_counter() - t0, 1),
                "peak_rss_gib": round(memory_now(torch.device("cpu"))[1] / 2**30, 2),
            }
            if same_as is not None:
                row["same_as"] = same_as["method"]
            elif not method.startswith("dha"):
                done[key] = row
            rows.append(row)
            if args.out:  # after every row: a long grid killed part way keeps what it measured
                write_json(args.out, summary())
            print(
                f"{method:>12} {tokens:>8} tokens  ppl {ppl:10.3f}  x{ppl / source_ppl:8.3f}  "
                f"KV {row['kv_fraction']:.1%}  ({row['seconds']} s)"
                + (f"  second text x{row['second_ppl_ratio']:.3f}" if ppl2 else ""),
                file=sys.stderr,
                flush=True,
            )

    print(f"\n{'method':>12} {'tokens':>8} {'ppl':>10} {'/ source':>9} {'KV kept':>8}")
    print(f"{'source':>12} {'':>8} {source_ppl:10.3f} {1:9.3f} {1:8.1%}")
    for r in rows:
        print(f"{r['method']:>12} {r['tokens']:>8} {r['ppl']:10.3f} {r['ppl_ratio']:9.3f} {r['kv_fraction']:8.1%}")
    report = summary()
    if args.out:
        write_json(args.out, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
