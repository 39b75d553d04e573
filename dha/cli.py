"""The `dha` command: wiring only. Each verb parses its options and calls one function elsewhere.

Bad input (UserError) prints one line `dha: error: ...` and exits 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError

SOURCE_HELP = "model: a dha checkpoint dir, a Hugging Face model dir, a .gguf file, or a hub id (default: smollm2-135m, built in)"


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (the checkpoint's own)")


# ---- inspect -------------------------------------------------------------------------------------

def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's shape: heads per layer, parameters, KV-cache bytes per token",
                       description="Show family, layers, query/key/value heads per layer, parameters and KV-cache bytes per token.")
    _add_source(p)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from .checkpoint import load, parse_dtype
    from .report import inspect_model, print_inspect

    loaded = load(args.source, parse_dtype(args.dtype), tokenizer=False)
    info = inspect_model(loaded)
    if args.json:
        print(json.dumps(info))
    else:
        print_inspect(info)
    return 0


# ---- generate ------------------------------------------------------------------------------------

def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (greedy or sampled), from the KV cache",
                       description="Prefill the prompt, then decode token by token from the compact KV cache.")
    _add_source(p)
    p.add_argument("--prompt", default="The Python interpreter", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import time

    import torch

    from .checkpoint import load, parse_dtype
    from .model import generate

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    loaded = load(args.source, parse_dtype(args.dtype))
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer")
    ids = torch.tensor([loaded.tokenizer(args.prompt)["input_ids"]])
    t0 = time.perf_counter()
    out = generate(loaded.model, ids, args.max_new_tokens, args.temperature, torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - t0
    text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "seconds": seconds}))
    else:
        print(args.prompt + text)
        print(f"[{args.max_new_tokens} tokens in {seconds:.2f}s]", file=sys.stderr)
    return 0


VERBS = [add_inspect, add_generate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dha",
        description="Shrink a transformer's KV cache by Decoupled-Head Attention (adaptive heads fusion), and measure what it costs.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"dha: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dha: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
