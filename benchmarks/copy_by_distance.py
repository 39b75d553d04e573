"""How well a model copies a span of text from far back: the loss on a repeated span by distance.

Each prompt is a window of --data (a text nothing trained on, read from its start) whose last
--span tokens repeat --span tokens from DISTANCE tokens earlier. A model that reads that far
predicts the repeat (after its first few tokens, --skip, which only say where the copy starts)
with a loss far below the text's own; one that cannot read that far predicts it as fresh text.
Unlike a passkey (found or not, a few prompts), this is a mean loss over --windows x (span - skip)
tokens per distance, on any text.
Writes JSON: per model, the mean loss at each distance.

    python benchmarks/copy_by_distance.py smollm2-135m runs/dha --data ~/.cache/dha/man1_400.txt \\
        --out benchmarks/results/copy_by_distance.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dha.atomic import write_json  # noqa: E402
from dha.checkpoint import load  # noqa: E402
from dha.longctx import long_windows  # noqa: E402


def copy_prompts(ids: torch.Tensor, length: int, span: int, distance: int, windows: int) -> torch.Tensor:
    """(windows, length) token ids: the first `windows` windows of `ids`, each with its last `span`
    tokens replaced by a repeat of the `span` tokens that start `distance` positions before them."""
    text = long_windows(ids, length, windows)[:, : length - span]
    start = length - span - distance
    return torch.cat([text, text[:, start : start + span]], dim=1)


@torch.no_grad()
def copy_loss(model, prompts: torch.Tensor, span: int, skip: int) -> float:
    """Mean next-token loss (nats) on the repeats' tokens after their first `skip`."""
    losses = []
    for row in prompts:
        logits = model.logits(model.features(row[None, :-1])[:, -span:])[0].float()  # the repeat's only
        losses.append(F.cross_entropy(logits[skip:], row[-span + skip :]))
    return torch.stack(losses).mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--data", required=True, help="a text file nothing trained on")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--span", type=int, default=64)
    p.add_argument("--skip", type=int, default=4, help="first tokens of each repeat not scored")
    p.add_argument("--distances", default="1024,3072,5120,7168,8000")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    distances = [int(d) for d in args.distances.split(",")]
    if not all(args.span <= d <= args.length - args.span for d in distances):
        p.error(f"--distances must be in [{args.span}, {args.length - args.span}] (--span, --length - --span)")
    result = {k: getattr(args, k) for k in ("data", "length", "span", "skip", "windows")}
    result |= {"distances": distances, "loss": {}}
    tokenizer = None
    for name in args.models:
        loaded = load(name, torch.float32)
        model = loaded.model.eval()
        if tokenizer is None:
            tokenizer = loaded.tokenizer
            with open(args.data) as f:
                ids = torch.tensor(tokenizer(f.read(args.windows * args.length * 8))["input_ids"])
            if len(ids) < args.windows * args.length:
                p.error(f"--data has {len(ids):,} tokens: too few for {args.windows} windows of {args.length}")
        losses = []
        for d in distances:
            losses.append(
                copy_loss(model, copy_prompts(ids, args.length, args.span, d, args.windows), args.span, args.skip)
            )
            print(name, d, f"{losses[-1]:.3f}", file=sys.stderr, flush=True)
        result["loss"][name] = losses
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
