"""`sft-toolkit lint TEMPLATE... [--tokenizer TOK] [--reference ORIG.jinja] [--kwargs JSON] [--format text|json]`"""

from __future__ import annotations

import json

from rich.console import Console

from ..lint import lint
from ..masks import RenderLimit
from ..problems import ERROR, INFO, WARNING, InputError
from ..templates import load_template, load_templates
from ..tokenizer import load_tokenizer

COLORS = {ERROR: "red", WARNING: "yellow", INFO: "cyan"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lint",
        help="check chat templates for assistant-only training",
        description="Static (Jinja AST) and rendered checks of chat templates' generation markers.",
    )
    p.add_argument(
        "templates",
        nargs="+",
        metavar="TEMPLATE",
        help="a .jinja file, a tokenizer directory, a tokenizer_config.json, or a bundled template name; a "
        "tokenizer with several named templates (tool_use, ...) has each linted",
    )
    p.add_argument("--tokenizer", help="tokenizer directory, hub id or offline:NAME, for token-level checks")
    p.add_argument("--reference", help="the original inference template: any byte difference is an error")
    p.add_argument(
        "--kwargs",
        metavar="JSON",
        help="template variables every probe renders with, as a dataset's "
        "chat_template_kwargs gives them (e.g. '{\"enable_thinking\": false}'); the template's own "
        "boolean switches are also probed both ways",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")


def run(args) -> int:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    reference = load_template(args.reference).source if args.reference else None
    template_kwargs = _kwargs(args.kwargs)
    results = []
    for template in [template for spec in args.templates for template in load_templates(spec)]:
        try:
            results.append(
                lint(
                    template.source,
                    template.origin,
                    tokenizer=tokenizer,
                    reference=reference,
                    template_kwargs=template_kwargs,
                )
            )
        except RenderLimit as err:  # a runaway template: stop at the first probe instead of running every one
            raise InputError(f"{template.origin}: {err}") from None
    if args.format == "json":
        print(json.dumps({"results": [r.to_json() for r in results]}, indent=2, ensure_ascii=False))
    else:
        _print_text(results)
    return 0 if all(r.ok for r in results) else 1


def _kwargs(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"--kwargs: not valid JSON ({err.msg}); give an object, e.g. '{{\"enable_thinking\": false}}'"
        ) from None
    if not isinstance(value, dict):
        raise InputError(f"--kwargs: must be a JSON object of template variables, got {type(value).__name__}")
    return value


def _print_text(results) -> None:
    console = Console(highlight=False, soft_wrap=True)
    for result in results:
        errors = sum(f.severity == ERROR for f in result.findings)
        warnings = sum(f.severity == WARNING for f in result.findings)
        verdict = "[green]ok[/]" if result.ok else "[red]FAIL[/]"
        console.print(f"[bold]{result.template}[/]: {verdict} ({errors} errors, {warnings} warnings)")
        for f in result.findings:
            where = f"{result.template}:{f.line}" if f.line else result.template
            console.print(f"  {where}: [{COLORS[f.severity]}]{f.severity}[/] {f.rule} ", end="")
            console.print(f.message, markup=False)
