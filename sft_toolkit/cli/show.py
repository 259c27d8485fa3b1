"""`sft-toolkit show CONVERSATION [--row N] --template T [--tokenizer TOK] [--html FILE] [--plain]`"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..data import read_conversation
from ..masks import RenderLimit, render, tokenize
from ..preprocess import canonical_messages
from ..problems import InputError
from ..show import char_views, to_html, to_plain, to_rich, token_views
from ..templates import load_template
from ..tokenizer import load_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser("show", help="show which tokens of a conversation are trained",
                       description="Render a conversation and colour every token by whether it is trained.")
    p.add_argument("conversation", help="a .json file with one conversation, or a dataset (file, directory, hub id)")
    p.add_argument("--row", type=int, help="row of the dataset to show (default 0)")
    p.add_argument("--template", help="template (file, tokenizer dir, bundled name); default: the tokenizer's own")
    p.add_argument("--tokenizer", help="tokenizer directory, hub id or offline:NAME (without it: characters, not tokens)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")
    p.add_argument("--format", choices=("text", "plain", "json"), default="text",
                   help="text: coloured; plain: ⟦trained⟧ markers and │ token breaks; json: one object per token")


def run(args) -> int:
    messages, tools = read_conversation(args.conversation, args.row)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.template:
        template = load_template(args.template)
        source, name = template.source, template.origin
    elif tokenizer is not None and tokenizer.chat_template:
        source, name = tokenizer.chat_template, args.tokenizer
    else:
        raise InputError("show needs --template, or a --tokenizer that has a chat template")
    messages = canonical_messages(messages)  # text parts joined, JSON-string tool arguments parsed: as trained
    try:
        if tokenizer is not None:
            tm = tokenize(tokenizer, messages, template=source, tools=tools)
        else:
            rendered = render(source, messages, tools=tools)
    except RenderLimit as err:
        raise InputError(f"{name}: {err}") from None
    if tokenizer is not None:
        views = token_views(tm)
        summary = f"{tm.trainable} of {len(tm.ids)} tokens trained"
    else:
        views = char_views(rendered.text, rendered.spans)
        trained = sum(e - s for s, e in rendered.spans)
        summary = f"{trained} of {len(rendered.text)} characters trained (pass --tokenizer to see tokens)"
    title = f"{args.conversation}{'' if args.row is None else f' row {args.row}'} with {name}"
    if args.format == "json":
        print(json.dumps({"summary": summary, "tokens": [v.__dict__ for v in views]}, ensure_ascii=False))
    elif args.format == "plain":
        print(to_plain(views))
        print(summary)
    else:
        console = Console(highlight=False)
        console.print(to_rich(views))
        console.print(f"\n[bold]{summary}[/]  ([black on #8fd694] trained [/] [#aaaaaa on #2b2b2b] not trained [/])")
    if args.html:
        Path(args.html).write_text(to_html(views, title, summary), encoding="utf-8")
    return 0
