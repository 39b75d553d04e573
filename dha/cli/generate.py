"""`dha generate`: continue a prompt from the KV cache."""

from __future__ import annotations

import json
import sys

from ..errors import UserError
from .common import add_json_option, add_source, load_dtype


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt (greedy or sampled), from the KV cache",
        description="Prefill the prompt, then decode token by token from the compact KV cache.",
    )
    add_source(p)
    p.add_argument("--prompt", default="The Python interpreter", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    add_json_option(p)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import time

    import torch

    from ..checkpoint import load
    from ..device import synchronize
    from ..model import generate

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    device = torch.device(args.device)
    loaded = load(args.source, load_dtype(args), device=device)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer")
    ids = torch.tensor([loaded.tokenizer(args.prompt)["input_ids"]], device=device)
    synchronize(device)
    t0 = time.perf_counter()
    out = generate(
        loaded.model, ids, args.max_new_tokens, args.temperature, torch.Generator(device).manual_seed(args.seed)
    )
    synchronize(device)
    seconds = time.perf_counter() - t0
    text = loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "seconds": seconds}))
    else:
        print(args.prompt + text)
        print(f"[{args.max_new_tokens} tokens in {seconds:.2f}s]", file=sys.stderr)
    return 0
