"""`sft-toolkit add-markers INPUT [-o OUTPUT] [--tokenizer TOK] [--format text|json]`

Exit 0: a verified training template was written (to OUTPUT, or to stdout without -o). Exit 1: no verified
template could be made; nothing is written and the message names the construct and its line. Exit 2: the
input can't be read or parsed.
"""

from __future__ import annotations

import json
import sys

from ..markers import MarkerError, add_markers
from ..masks import RenderLimit
from ..outputs import check_output_file, existing_inputs, write_file
from ..problems import InputError
from ..templates import load_template, load_templates
from ..tokenizer import load_tokenizer
from ._common import path_argument


def add_parser(sub) -> None:
    p = sub.add_parser(
        "add-markers",
        help="add verified {%% generation %%} markers to a chat template",
        description="Rewrite an inference chat template so that exactly the assistant's output "
        "and end-of-turn are inside {% generation %} blocks, verified byte-identical "
        "to the input on the probe corpus and clean under lint.",
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        help="a .jinja file, a tokenizer directory, a tokenizer_config.json, or a bundled template name",
    )
    p.add_argument("-o", "--output", type=path_argument, help="where to write the training template (default: stdout)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer directory, hub id or offline:NAME: its special tokens are used "
        "when rendering, and lint adds token-level checks",
    )
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text: the template (stdout) or a summary (with -o); json: one report object",
    )


def run(args) -> int:
    template = load_template(args.input)
    inputs = existing_inputs([("INPUT", args.input), ("template", template.origin), ("--tokenizer", args.tokenizer)])
    if args.output:  # refused before the work, not after it
        check_output_file(args.output, inputs, example="training.jinja")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    report = {"input": template.origin, "output": args.output, "ok": False}
    # A tokenizer's other named templates: transformers renders rows with tools with `tool_use`, while a recipe's
    # chat_template_path replaces all of them with the one converted here. The user is told, not left to find out.
    others = [other.origin for other in load_templates(args.input) if other.origin != template.origin]
    if others:
        report["other_templates"] = others
        if args.format == "text":
            print(
                f"sft-toolkit add-markers: note: {args.input} also has the named template(s) {', '.join(others)}, "
                "which this does not convert; transformers renders rows with tools with the one named tool_use, "
                "and a chat_template_path set to this output replaces all of them: convert each one that your "
                "data reaches, or check the training renders with `sft-toolkit check-data`",
                file=sys.stderr,
            )
    try:
        result = add_markers(template.source, tokenizer=tokenizer)
    except (InputError, RenderLimit) as err:  # the template can't be rendered (or traced) within the bounds
        raise InputError(f"{template.origin}: {err}") from None
    except MarkerError as err:
        report["error"] = {"message": err.args[0], "line": err.line}
        if args.format == "json":
            print(json.dumps(report, indent=2))
        else:
            where = f"{template.origin}:{err.line}" if err.line else template.origin
            print(
                f"sft-toolkit add-markers: {where}: could not add verified markers: {err.args[0]}. "
                "Nothing was written; place the markers by hand (see templates/README.md) and check with "
                "`sft-toolkit lint`.",
                file=sys.stderr,
            )
        return 1
    if args.output:
        write_file(args.output, result.source, inputs)
    report.update(
        ok=True,
        generation_blocks=result.blocks,
        role_conditions=result.role_conditions,
        whitespace_left_untrained=result.relaxed_whitespace,
        already_marked=result.blocks == 0 and result.source == template.source,
    )
    if args.format == "json":
        if not args.output:
            report["template"] = result.source
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    if not args.output:
        sys.stdout.write(result.source)
    summary = (
        "already has markers that pass lint; unchanged"
        if report["already_marked"]
        else f"{result.blocks} generation block(s), {result.role_conditions} role condition(s)"
        + (
            "; some whitespace inside assistant turns stays untrained (the template's code shares it with "
            "the role header)"
            if result.relaxed_whitespace
            else ""
        )
    )
    print(
        f"{template.origin}: verified ({summary}){' -> ' + args.output if args.output else ''}",
        file=sys.stderr if not args.output else sys.stdout,
    )
    return 0
