"""`dha inspect`: a model's shape, heads per layer, parameters and KV-cache bytes per token."""

from __future__ import annotations

import json

from .common import add_source


def add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a model's shape: heads per layer, parameters, KV-cache bytes per token",
        description="Show family, layers, query/key/value heads per layer, parameters and KV-cache bytes per token.",
    )
    add_source(p)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from ..checkpoint import load, parse_dtype
    from ..summary import inspect_model, print_inspect

    loaded = load(args.source, parse_dtype(args.dtype), tokenizer=False, device=args.device)
    info = inspect_model(loaded)
    if args.json:
        print(json.dumps(info))
    else:
        print_inspect(info)
    return 0
