"""`dha export`: a Hugging Face checkpoint (stock class or remote code), a GGUF file, or a
Nemotron-NAS directory."""

from __future__ import annotations

import json
import sys

from ..errors import UserError
from .common import add_json_option, add_source


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a Hugging Face checkpoint (stock class when the layout allows, else with its own code)",
        description="Write SOURCE as a Hugging Face checkpoint: the family's stock class (e.g. LlamaForCausalLM) "
        "when every layer is GQA with the same number of equal groups (query heads are reordered to "
        "make groups contiguous), otherwise a checkpoint carrying its modeling code "
        "(trust_remote_code=True). The export is reloaded with transformers and its logits compared "
        "with ours before it is kept. --format gguf / nemotron-nas write layouts serving engines run with "
        "each layer's own key/value head count (llama.cpp, vLLM). Prints a summary, then one JSON line.",
    )
    add_source(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="new (or empty) output directory; with --format gguf a new .gguf file",
    )
    p.add_argument(
        "--format",
        default="hf",
        choices=("hf", "gguf", "nemotron-nas"),
        help="hf: transformers checkpoint (default); gguf: a llama.cpp file (llama, or deci for per-layer "
        "head counts); nemotron-nas: a DeciLMForCausalLM directory for vLLM (see README, Serving)",
    )
    p.add_argument("--outtype", default="f32", choices=("f32", "f16", "q8_0"), help="gguf: weight type (default f32)")
    p.add_argument(
        "--pad",
        action="store_true",
        help="gguf, nemotron-nas: duplicate heads to hold a decoupled or "
        "uneven layout exactly (a larger KV cache; the summary says how much)",
    )
    p.add_argument(
        "--force-remote-code", action="store_true", help="write the remote-code kind even when a stock class fits"
    )
    p.add_argument(
        "--atol", type=float, default=1e-4, help="largest |logit difference| (fp32) accepted in the reload check"
    )
    add_json_option(p)
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from ..atomic import check_out
    from ..checkpoint import load, parse_dtype
    from ..export import ExportMismatch, export, summary_lines

    if not args.atol >= 0:
        raise UserError("--atol must be 0 or positive")
    if args.format != "hf":
        return run_export_serving(args)
    if args.pad or args.outtype != "f32":
        raise UserError("--pad and --outtype are for --format gguf / nemotron-nas")
    check_out(args.out)  # before loading: a large model takes a while
    loaded = load(args.source, parse_dtype(args.dtype), device=args.device)
    try:
        result = export(loaded, args.out, force_remote_code=args.force_remote_code, atol=args.atol)
    except ExportMismatch as e:  # our failure, not the user's input: exit 1
        print(f"dha: error: {e}", file=sys.stderr)
        return 1
    if not args.json:
        for line in summary_lines(result):
            print(line)
    print(json.dumps({"out": result.out, "kind": result.kind, "max_abs_diff": result.max_abs_diff, **result.to_dict()}))
    return 0


def run_export_serving(args) -> int:
    """export --format gguf | nemotron-nas: layouts serving engines run (dha.gguf, dha.nemotron)."""
    from ..atomic import check_out
    from ..checkpoint import load, parse_dtype

    if args.force_remote_code:
        raise UserError("--force-remote-code is for --format hf")
    if args.format == "gguf":
        from ..gguf import check_gguf_out, export_gguf, summary_lines

        check_gguf_out(args.out)
        result = export_gguf(
            load(args.source, parse_dtype(args.dtype), device=args.device), args.out, args.outtype, pad=args.pad
        )
    else:
        from ..nemotron import export_nemotron, summary_lines

        if args.outtype != "f32":
            raise UserError("--outtype is for --format gguf (nemotron-nas keeps the model's dtype; use --dtype)")
        check_out(args.out)
        result = export_nemotron(load(args.source, parse_dtype(args.dtype), device=args.device), args.out, pad=args.pad)
    if not args.json:
        for line in summary_lines(result):
            print(line)
    print(json.dumps({"format": args.format, **result.to_dict()}))
    return 0
