"""`sft-toolkit prepare RECIPE.yaml -o DIR [--format text|json] [--world-size N] [--mask-guard ...] [--KEY VALUE ...]`

Exactly the preprocessing `train` runs (template, tokenization, labels, truncation or packing, the mask
guard's repairs), once, saved to DIR/dataset with DIR/manifest.json; then `train RECIPE.yaml --prepared
DIR` trains from it on any number of machines and ranks without re-tokenizing. Exit 0 saved, 1 the mask
guard refused (nothing saved), 2 bad input. Overrides are read as by `train`, so both see one recipe.
"""

from __future__ import annotations

import json
import shlex
import sys

from ..prepare import prepare
from ..recipe import GuardMode, load_recipe
from ..train import GuardStop
from ._common import add_overrides_argument, parse_overrides, path_argument, print_data_report, process_count


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize, mask and pack once under the mask guard; save for train --prepared",
        description="Run train's preprocessing and mask guard once and save the dataset with a "
        "manifest that train --prepared checks.",
    )
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        type=path_argument,
        help="where to save (DIR/dataset, DIR/manifest.json)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument(
        "--world-size", type=process_count, default=1, help="number of training processes, for step accounting"
    )
    p.add_argument("--mask-guard", choices=[mode.value for mode in GuardMode], help="override the recipe's mask_guard")
    add_overrides_argument(p)


TAKES_OVERRIDES = True


def run(args) -> int:
    overrides = parse_overrides(args.overrides)
    if args.mask_guard:
        overrides["mask_guard"] = args.mask_guard
    recipe = load_recipe(args.recipe, overrides)
    try:
        result = prepare(recipe, args.output, world_size=args.world_size)
    except GuardStop as stop:
        print(f"sft-toolkit prepare: stopped by the mask guard, nothing saved: {stop}", flush=True)
        return 1
    for left in result.leftovers:
        print(
            f"sft-toolkit prepare: note: {left} is what an interrupted prepare left (no command reads it); "
            f"if no prepare is running, remove it with: rm -r {shlex.quote(str(left))}",
            file=sys.stderr,
        )
    if args.format == "json":
        print(json.dumps({"prepared": str(result.path), **result.manifest}, indent=2))
        return 0
    print_data_report(result.report, args.recipe)
    for note in result.notes:
        print(f"  mask guard ({recipe.toolkit.mask_guard}): {note}")
    summary = result.manifest["dataset"]
    print(
        f"saved {summary['sequences']} sequences ({summary['trainable_tokens']} trainable of {summary['tokens']} "
        f"tokens) to {result.path}; train with: sft-toolkit train {shlex.quote(args.recipe)} --prepared "
        f"{shlex.quote(str(result.path))}{' (and the same overrides)' if args.overrides else ''}"
    )
    return 0
