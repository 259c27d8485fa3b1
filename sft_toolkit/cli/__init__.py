"""`sft-toolkit` command line: one small module per command, one exit-code policy for all of them.

Exit codes: 0 fine, 1 a check failed (lint errors, zero-mask data), 2 unusable input or invocation
(one line on stderr naming the file/row/field, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..masks import RenderLimit
from ..problems import InputError
from . import add_markers, check_data, lint, merge, prepare, quickstart, show, train

COMMANDS = {
    "lint": lint,
    "add-markers": add_markers,
    "show": show,
    "check-data": check_data,
    "prepare": prepare,
    "train": train,
    "quickstart": quickstart,
    "merge": merge,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft-toolkit",
        description="Train chat models only on what the assistant says, and never silently on nothing.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' deprecation notices about its own defaults are not the user's business here.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.|trl\.")
    args, extra = build_parser().parse_known_args(argv)
    if getattr(COMMANDS[args.command], "TAKES_OVERRIDES", False):  # --KEY VALUE: recipe keys, read by the command
        args.overrides = list(args.overrides) + extra
    elif extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command].run(args)
    except (InputError, RenderLimit) as err:  # a runaway template is unusable input too
        print(f"sft-toolkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sft-toolkit {args.command}: interrupted", file=sys.stderr)
        return 130
