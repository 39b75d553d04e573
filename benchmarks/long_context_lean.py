"""Long-context measures of several models, each piece written as soon as it is measured.

A lighter form of `dha eval --long-context --retrieval` for slow machines: per model, the
perplexity by position over --windows windows of --window held-out tokens of --data, then the
passkey grid at each length in turn (--per-depth keys at 5 depths), each appended to --out (JSON
lines: {"model", "kind": "by_position" | "retrieval", ...}) as soon as it is done, so a run cut
short keeps what it measured. Lengths after the first may take fewer prompts (--far-per-depth).

    OMP_NUM_THREADS=1 python benchmarks/long_context_lean.py smollm2-135m runs/long/dha0 \\
        --data ~/.cache/dha/man1_400.txt --out benchmarks/results/long_context_half.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dha.checkpoint import load  # noqa: E402
from dha.data import load_tokens  # noqa: E402
from dha.longctx import RetrievalOptions, position_report, retrieval  # noqa: E402


def append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--windows", type=int, default=2, help="windows scored by position (0: none, passkeys only)")
    p.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[2048, 8192],
        help="passkey prompt lengths (empty: perplexity by position only)",
    )
    p.add_argument("--per-depth", type=int, default=2)
    p.add_argument("--far-per-depth", type=int, default=1, help="keys per depth at lengths after the first")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    command = "python " + " ".join(sys.argv)
    for name in args.models:
        loaded = load(name, torch.float32)
        heldout = load_tokens(args.data, loaded.tokenizer).heldout
        t = time.time()
        if args.windows:
            by_position = position_report(loaded.model.eval(), heldout, args.window, args.windows, progress=False)
            append(
                args.out,
                {
                    "model": name,
                    "kind": "by_position",
                    "data": args.data,
                    "seconds": round(time.time() - t),
                    "command": command,
                    **by_position,
                },
            )
        for i, length in enumerate(args.lengths):
            t = time.time()
            options = RetrievalOptions(
                lengths=[length], per_depth=args.per_depth if i == 0 else args.far_per_depth, batch_size=1
            )
            grid = retrieval(loaded.model, loaded.tokenizer, options, progress=False)
            append(
                args.out,
                {"model": name, "kind": "retrieval", "seconds": round(time.time() - t), "command": command, **grid},
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
