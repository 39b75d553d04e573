"""The `dha` command: wiring only. Each verb (a module here) parses its options and calls one function
below it. Building the parser imports no torch, so `dha --help` starts fast; a verb imports what it
runs inside its run function.

Bad input (UserError) prints one line `dha: error: ...` and exits 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import analyze, bench, convert, eval, export, generate, inspect, train
from .common import add_device_option

VERBS = [
    inspect.add_inspect,
    generate.add_generate,
    eval.add_eval,
    export.add_export,
    analyze.add_analyze,
    convert.add_convert,
    train.add_train,
    bench.add_bench,
]


def given_options(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dest names of the options written on the command line `argv` (not defaults)."""
    flags = {o: a.dest for a in p._actions for o in a.option_strings}
    return {flags[tok.split("=", 1)[0]] for tok in argv if tok.split("=", 1)[0] in flags}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dha",
        description="Shrink a transformer's KV cache by Decoupled-Head Attention (adaptive heads fusion), "
        "and measure what it costs.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    for verb_parser in sub.choices.values():
        verb_parser.allow_abbrev = False  # an abbreviated flag would slip past the checks of what was given
        add_device_option(verb_parser)
        verb_parser.set_defaults(parser=verb_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.given = given_options(args.parser, argv)
    try:
        from ..device import resolve_device

        args.device = str(resolve_device(args.device))  # an unknown or absent device fails here, before any work
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"dha: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dha: interrupted", file=sys.stderr)
        return 130
