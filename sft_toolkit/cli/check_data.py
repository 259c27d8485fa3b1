"""`sft-toolkit check-data RECIPE.yaml [--format text|json] [--report FILE] [--max-zero-rows N]`

The CI gate: exit 0 when the dataset is fit to train, 1 when any row, packed sequence or step would
train on nothing (or assistant tokens would be trained without their context), or any row's mask misses the
assistant's text or trains another message's (content coverage), 2 on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..check_data import check_data, reason_help, to_markdown
from ..recipe import load_recipe

SHOW_ROWS = 20


def add_parser(sub) -> None:
    p = sub.add_parser("check-data", help="fail when any example would train on zero tokens",
                       description="Run the trainer's preprocessing on a recipe's dataset and account for every "
                                   "trainable token.")
    p.add_argument("recipe", help="recipe YAML (TRL's argument names plus the toolkit's keys)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--report", metavar="FILE", help="write the JSON report to FILE and a Markdown report beside it")
    p.add_argument("--max-zero-rows", type=int, help="rows allowed to end with zero trainable tokens (default 0)")
    p.add_argument("--world-size", type=int, default=1, help="number of training processes, for step accounting")


def run(args) -> int:
    overrides = {} if args.max_zero_rows is None else {"max_zero_rows": args.max_zero_rows}
    recipe = load_recipe(args.recipe, overrides)
    report, _ = check_data(recipe, world_size=args.world_size)
    data = report.to_json()
    if args.report:
        json_path = Path(args.report)
        if json_path.suffix == ".md":
            json_path = json_path.with_suffix(".json")
        json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        json_path.with_suffix(".md").write_text(to_markdown(report, args.recipe), encoding="utf-8")
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        _print_text(report, args.recipe)
    return 0 if report.ok else 1


def _print_text(report, title: str) -> None:
    console = Console(highlight=False, soft_wrap=True)
    verdict = "[green]PASS[/]" if report.ok else "[red]FAIL[/]"
    console.print(f"[bold]check-data {title}[/]: {verdict}")
    console.print(f"  rows {report.rows}, tokens {report.tokens}, trainable tokens {report.trainable_tokens} "
                  f"(before truncation/packing {report.trainable_tokens_before})")
    console.print(f"  sequences {report.sequences} ({report.zero_trainable_sequences} with zero trainable tokens), "
                  f"steps {report.steps} ({report.zero_trainable_steps} with zero trainable tokens)")
    console.print(f"  dropped rows {report.dropped_rows}, assistant tokens lost to truncation "
                  f"{report.truncated_assistant_tokens}, trained without context {report.orphaned_assistant_tokens}")
    for problem in report.problems():
        console.print(f"  [red]✗[/] {problem}", markup=True)
    for row in report.zero_mask_rows[:SHOW_ROWS]:
        console.print(f"    row {row['index']}: {row['reason']} — {reason_help(row['reason'])}", markup=False)
    if len(report.zero_mask_rows) > SHOW_ROWS:
        console.print(f"    … and {len(report.zero_mask_rows) - SHOW_ROWS} more rows (see --format json or --report)")
    for row in report.coverage_problem_rows[:SHOW_ROWS]:
        console.print(f"    row {row['index']} message {row['message']}: {row['reason']} — "
                      f"{reason_help(row['reason'])}", markup=False)
    if len(report.coverage_problem_rows) > SHOW_ROWS:
        console.print(f"    … and {len(report.coverage_problem_rows) - SHOW_ROWS} more rows (see --format json or "
                      "--report)")
