"""What the cli commands share: `--KEY VALUE` recipe overrides, and check-data's report, which `prepare` prints
too for what it saved."""

from __future__ import annotations

import argparse

import yaml
from rich.console import Console

from ..check_data import reason_help, row_coverage_problems
from ..problems import InputError

SHOW_ROWS = 20


def add_overrides_argument(parser) -> None:
    """A command that reads a recipe takes `--KEY VALUE` overrides of its keys; the dispatcher passes it the
    arguments its parser doesn't know (`TAKES_OVERRIDES` in the command's module)."""
    parser.add_argument("overrides", nargs="*", help="recipe overrides as --key value pairs")


def process_count(text: str) -> int:
    """`--world-size N`: a number of training processes, 1 or more (argparse names the option when it is not)."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of training processes; give 1 or more")
    return count


def path_argument(text: str) -> str:
    """An option's path (`-o`, `--report`, `--html`, `--prepared`): an empty one names nothing (and was taken as no
    option, or as the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError(f"{text!r} names no file or folder; give a path")
    return text


def parse_overrides(items: list[str]) -> dict:
    out, key = {}, None
    for item in items:
        if item.startswith("--"):
            if key is not None:
                out[key] = True
            key, _, value = item[2:].partition("=")
            if value:
                out[key], key = override_value(value), None
        elif key is not None:
            out[key], key = override_value(item), None
        else:
            raise InputError(f"unexpected argument {item!r}: overrides are --key value pairs")
    if key is not None:
        out[key] = True
    return out


# YAML 1.1 reads these as booleans; `trl sft --eval_strategy no` hands the text on (its argparse converts text to a
# boolean only for a boolean field, as the recipe does for text: `recipe.as_trl_parses`, which takes yes/no too).
YAML_WORD_BOOLEANS = {"yes", "no"}


def override_value(text: str):
    """A `--KEY VALUE` value: a YAML scalar (a number, true/false, null, a list or mapping), except yes/no, which
    YAML 1.1 reads as booleans and trl sft's command line keeps as text (`--save_strategy no`)."""
    return text if text.strip().lower() in YAML_WORD_BOOLEANS else yaml.safe_load(text)


def print_data_report(report, title: str) -> None:
    """A check-data report as text: the verdict, the counts of each split, the problems and the rows behind them."""
    console = Console(highlight=False, soft_wrap=True)
    verdict = "[green]PASS[/]" if report.ok else "[red]FAIL[/]"
    console.print(f"[bold]check-data {title}[/]: {verdict}")
    _print_split(console, report)
    if report.eval is not None:
        verdict = "[green]PASS[/]" if report.eval.ok else "[red]FAIL[/]"
        console.print(f"[bold]eval split[/]: {verdict}")
        _print_split(console, report.eval)


def _print_split(console, report) -> None:
    console.print(
        f"  rows {report.rows}, tokens {report.tokens}, trainable tokens {report.trainable_tokens} "
        f"(before truncation/packing {report.trainable_tokens_before})"
    )
    console.print(
        f"  sequences {report.sequences} ({report.zero_trainable_sequences} with zero trainable tokens), "
        f"steps {report.steps} ({report.zero_trainable_steps} with zero trainable tokens)"
    )
    console.print(
        f"  dropped rows {report.dropped_rows}, assistant tokens lost to truncation "
        f"{report.truncated_assistant_tokens}, trained without context {report.orphaned_assistant_tokens}"
    )
    if report.coverage_unchecked_rows:
        shown = ", ".join(map(str, report.coverage_unchecked_rows[:SHOW_ROWS]))
        console.print(
            f"  content coverage not checked for {len(report.coverage_unchecked_rows)} rows ({shown}"
            f"{', …' if len(report.coverage_unchecked_rows) > SHOW_ROWS else ''}): the tokenizer gives no offsets "
            "and its decoded tokens are not the rows' text, or the row renders or tokenizes differently when "
            "rendered again",
            markup=False,
        )
    for source in report.sources:
        console.print(
            f"  {source['source']}: rows {source['rows']}, trainable tokens {source['trainable_tokens']}, "
            f"zero-mask rows {source['zero_mask_rows']}",
            markup=False,
        )
    for problem in report.problems():
        if not problem.startswith("eval split: "):  # printed under the eval split's own heading
            console.print(f"  [red]✗[/] {problem}", markup=True)
    for row in report.zero_mask_rows[:SHOW_ROWS]:
        console.print(f"    row {row['index']}: {row['reason']} — {reason_help(row['reason'])}", markup=False)
    if len(report.zero_mask_rows) > SHOW_ROWS:
        console.print(f"    … and {len(report.zero_mask_rows) - SHOW_ROWS} more rows (see --format json or --report)")
    for row in report.coverage_problem_rows[:SHOW_ROWS]:
        for problem in row_coverage_problems(row):  # every problem of the row, one line each
            console.print(
                f"    row {row['index']} message {problem['message']}: {problem['reason']} — "
                f"{reason_help(problem['reason'])}",
                markup=False,
            )
    if len(report.coverage_problem_rows) > SHOW_ROWS:
        console.print(
            f"    … and {len(report.coverage_problem_rows) - SHOW_ROWS} more rows (see --format json or --report)"
        )
