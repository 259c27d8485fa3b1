"""`sft-toolkit check-data RECIPE.yaml [--format text|json] [--report FILE] [--max-zero-rows N] [--KEY VALUE ...]`

The CI gate: exit 0 when the dataset is fit to train, 1 when any row, packed sequence or step would
train on nothing (or assistant tokens would be trained without their context), or any row's mask misses the
assistant's text or trains another message's (content coverage), 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..check_data import check_data, to_markdown
from ..outputs import check_derived_file, check_output_file, recipe_inputs, write_file
from ..recipe import load_recipe
from ._common import add_overrides_argument, parse_overrides, path_argument, print_data_report, process_count


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check-data",
        help="fail when any example would train on zero tokens",
        description="Run the trainer's preprocessing on a recipe's dataset and account for every trainable token.",
    )
    p.add_argument("recipe", help="recipe YAML (TRL's argument names plus the toolkit's keys)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument(
        "--report",
        metavar="FILE",
        type=path_argument,
        help="write the JSON report to FILE and a Markdown report beside it",
    )
    p.add_argument("--max-zero-rows", type=int, help="rows allowed to end with zero trainable tokens (default 0)")
    p.add_argument(
        "--world-size", type=process_count, default=1, help="number of training processes, for step accounting"
    )
    add_overrides_argument(p)  # the same overrides train takes: the gate checks what that run would train


TAKES_OVERRIDES = True


def run(args) -> int:
    overrides = parse_overrides(args.overrides)
    if args.max_zero_rows is not None:
        overrides["max_zero_rows"] = args.max_zero_rows
    recipe = load_recipe(args.recipe, overrides)
    inputs = recipe_inputs(recipe)
    reports = _report_paths(args.report) if args.report else ()
    for path in reports:  # a path that can't be written is bad input (2), refused before the check, never "not fit"
        check_output_file(path, inputs, example="report.json")
    if reports:  # the one of the two the user did not name replaces only a report the toolkit wrote
        named = Path(args.report)
        twin = reports[1] if named == reports[0] else reports[0]
        check_derived_file(twin, named, _markdown_report if twin.suffix == ".md" else _json_report)
    report, _ = check_data(recipe, world_size=args.world_size)
    for warning in report.warnings:
        print(f"sft-toolkit check-data: warning: {warning}", file=sys.stderr)
    data = report.to_json()
    if reports:
        write_file(reports[0], json.dumps(data, indent=2) + "\n", inputs)
        write_file(reports[1], to_markdown(report, args.recipe), inputs)
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print_data_report(report, args.recipe)
    return 0 if report.ok else 1


def _markdown_report(path: Path) -> bool:
    """Whether `path` reads as a Markdown report `to_markdown` wrote (its title and verdict lines)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[:3]
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) == 3 and lines[0].startswith("# check-data: ") and lines[2].startswith(("**PASS", "**FAIL"))


def _json_report(path: Path) -> bool:
    """Whether `path` reads as a JSON report `Report.to_json` wrote (its verdict, settings and problems)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"ok", "settings", "problems"} <= data.keys()


def _report_paths(report: str) -> tuple[Path, Path]:
    """--report FILE: the JSON report at FILE (FILE.json for FILE.md) and the Markdown report beside it."""
    json_path = Path(report)
    if json_path.suffix.lower() == ".md":  # (REPORT.MD too: the Markdown is written where it is named)
        return json_path.with_suffix(".json"), json_path
    return json_path, json_path.with_suffix(".md")
