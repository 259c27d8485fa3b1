"""`sft-toolkit show CONVERSATION [--row N] --template T [--tokenizer TOK] [--html FILE] [--format F]`
and `sft-toolkit show DIR [--sequence N] [--tokenizer TOK] [--html FILE] [--format F]` for a prepared dataset."""

from __future__ import annotations

import json
from dataclasses import replace

from rich.console import Console

from .. import policy as control
from .. import show
from ..data import read_conversation, read_template_kwargs
from ..masks import DEFAULT_SPECIAL_TOKENS, Rendered, RenderLimit, TemplateRaised, render, tokenize
from ..outputs import check_output_file, existing_inputs, write_file
from ..preprocess import canonical_messages, messages_for_template, row_problem
from ..problems import InputError
from ..show import char_views, to_html, to_plain, to_rich, token_views
from ..templates import load_template
from ..tokenizer import load_tokenizer
from ._common import path_argument


def add_parser(sub) -> None:
    p = sub.add_parser(
        "show",
        help="show which tokens of a conversation are trained",
        description="Render a conversation and colour every token by whether it is trained.",
    )
    p.add_argument(
        "conversation",
        help="a .json file with one conversation, a dataset (file, directory, hub id), "
        "or a prepared dataset directory (`prepare -o DIR`, or a save_to_disk folder with input_ids/labels)",
    )
    p.add_argument("--row", type=int, help="row of the dataset to show (default 0)")
    p.add_argument(
        "--sequence",
        type=int,
        help="prepared dataset: the (packed) sequence to show token by token; "
        "without it, a table of every sequence's trained tokens and source rows",
    )
    p.add_argument("--template", help="template (file, tokenizer dir, bundled name); default: the tokenizer's own")
    p.add_argument(
        "--tokenizer", help="tokenizer directory, hub id or offline:NAME (without it: characters, not tokens)"
    )
    p.add_argument("--html", metavar="FILE", type=path_argument, help="also write a self-contained HTML page")
    p.add_argument(
        "--format",
        choices=("text", "plain", "json"),
        default="text",
        help="text: coloured; plain: ⟦trained⟧ markers and │ token breaks; json: one object per token",
    )


def _tokenizer_template(tokenizer, tools, name: str) -> tuple[str, str]:
    """The template training renders this conversation with, and its name: of a tokenizer's named templates,
    `tool_use` for a conversation with tools, else `default` (transformers' `get_chat_template`)."""
    if not isinstance(tokenizer.chat_template, dict):
        return tokenizer.chat_template, name
    try:
        source = tokenizer.get_chat_template(None, tools)
    except ValueError:
        raise InputError(
            f"{name}: the tokenizer's chat templates are all named "
            f"({', '.join(map(repr, sorted(tokenizer.chat_template)))}) and none is 'default'; pass --template"
        ) from None
    chosen = next(label for label, text in tokenizer.chat_template.items() if text == source)
    return source, f"{name} (chat template {chosen!r})"


def run(args) -> int:
    if args.html:  # refused before the work, not after it
        check_output_file(args.html, _inputs(args), example="page.html")
    if show.is_prepared(args.conversation):
        return run_prepared(args)
    if args.sequence is not None:
        raise InputError(
            f"{args.conversation}: --sequence applies to a prepared dataset directory; use --row for a "
            "dataset of conversations"
        )
    messages, tools = read_conversation(args.conversation, args.row)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.template:
        template = load_template(args.template)
        source, name = template.source, template.origin
    elif tokenizer is not None and tokenizer.chat_template:
        source, name = _tokenizer_template(tokenizer, tools, args.tokenizer)
    else:
        raise InputError("show needs --template, or a --tokenizer that has a chat template")
    # Text parts joined, JSON-string tool arguments parsed (as trained); the messages' own train/weight fields
    # switch turns off exactly as training does (sft_toolkit/policy.py).
    if problem := row_problem({"messages": messages}):  # what training would refuse, show refuses too
        raise InputError(f"{args.conversation}: {problem}")
    # The row's chat_template_kwargs reach the template as in training; content parts stay parts unless the
    # template needs strings (decided by rendering, as check-data does).
    template_kwargs = read_template_kwargs(args.conversation, args.row)
    variables = {**(tokenizer.special_tokens_map if tokenizer is not None else {}), **template_kwargs}
    where = f"{args.conversation}{'' if args.row is None else f' row {args.row}'}"
    messages = messages_for_template(
        source,
        canonical_messages(messages),
        tools=tools,
        template_kwargs=variables if tokenizer is not None else {**DEFAULT_SPECIAL_TOKENS, **template_kwargs},
    )
    controlled, plain = control.has_flags(messages), control.strip_control(messages)
    try:
        if tokenizer is not None:
            tm = tokenize(tokenizer, plain, template=source, tools=tools, template_kwargs=template_kwargs)
            if controlled:
                tm = replace(tm, mask=control.controlled_token_mask(tm, messages, control.TurnPolicy()))
            views = token_views(tm)
            summary = f"{tm.trainable} of {len(tm.ids)} tokens trained"
        else:
            rendered = render(source, plain, tools=tools, template_kwargs=template_kwargs)
            if controlled:
                rendered = Rendered(rendered.text, control.kept_spans(messages, rendered, control.TurnPolicy()))
            views = char_views(rendered.text, rendered.spans)
            trained = sum(e - s for s, e in rendered.spans)
            summary = f"{trained} of {len(rendered.text)} characters trained (pass --tokenizer to see tokens)"
    except control.MappingError as err:
        raise InputError(f"{args.conversation}: {err}") from None
    except TemplateRaised as err:
        raise InputError(f"{where}: the chat template {name} refuses this conversation: {err}") from None
    except RenderLimit as err:
        raise InputError(f"{name}: {err}") from None
    title = f"{args.conversation}{'' if args.row is None else f' row {args.row}'} with {name}"
    if args.format == "json":
        print(
            json.dumps(
                {"summary": summary, "template": name, "tokens": [v.__dict__ for v in views]}, ensure_ascii=False
            )
        )
    elif args.format == "plain":
        print(to_plain(views))
        print(summary)
    else:
        console = Console(highlight=False)
        console.print(to_rich(views))
        console.print(f"\n[bold]{summary}[/]  ([black on #8fd694] trained [/] [#aaaaaa on #2b2b2b] not trained [/])")
    if args.html:
        write_file(args.html, to_html(views, title, summary), _inputs(args))
    return 0


def run_prepared(args) -> int:
    """Pack boundaries, per-sequence trained counts, and every token's source row and training flag.

    Without --sequence: the table of all sequences (and, with --html, a page for sequence 0)."""
    if args.row is not None or args.template:
        raise InputError(
            f"{args.conversation}: a prepared dataset is already tokenized; --row and --template don't "
            "apply (use --sequence N)"
        )
    prepared = show.load_prepared(args.conversation)
    sequences = show.summaries(prepared.dataset)
    if args.sequence is None:
        if args.format == "json":
            print(
                json.dumps(
                    {
                        "sequences": len(sequences),
                        "tokens": sum(s.length for s in sequences),
                        "trainable": sum(s.trainable for s in sequences),
                        "zero_trainable_sequences": sum(s.trainable == 0 for s in sequences),
                        "per_sequence": [s.to_json() for s in sequences],
                    }
                )
            )
        else:
            print("\n".join(show.overview_lines(sequences)))
        if not args.html or not sequences:
            return 0
    index = args.sequence or 0
    if not 0 <= index < len(sequences):
        raise InputError(
            f"{args.conversation}: --sequence {index} is out of range (the dataset has {len(sequences)} sequences)"
        )
    name = args.tokenizer or prepared.tokenizer_name
    if not name:
        raise InputError(f"{args.conversation}: no manifest.json naming the tokenizer; pass --tokenizer")
    try:
        tokenizer = load_tokenizer(name)
    except InputError as err:
        raise InputError(
            f"{err} (named by {args.conversation}/manifest.json; --tokenizer overrides it)"
            if not args.tokenizer
            else str(err)
        ) from None
    summary, example = sequences[index], prepared.dataset[index]
    tokens = show.packed_tokens(example, show.token_texts(tokenizer, example["input_ids"]), summary.documents)
    if args.html:
        title = f"{args.conversation} sequence {index}"
        write_file(args.html, show.packed_html(summary, tokens, len(sequences), title, sequences), _inputs(args))
    if args.sequence is None:
        return 0
    if args.format == "json":
        print(
            json.dumps(
                {
                    "sequence": index,
                    "sequences": len(sequences),
                    "length": summary.length,
                    "trainable": summary.trainable,
                    "documents": [d.to_json() for d in summary.documents],
                    "tokens": [t.__dict__ for t in tokens],
                },
                ensure_ascii=False,
            )
        )
    elif args.format == "plain":
        print(show.packed_plain(summary, tokens, len(sequences)))
    else:
        Console(highlight=False).print(show.packed_rich(summary, tokens, len(sequences)))
    return 0


def _inputs(args) -> list:
    """What show reads; a dataset folder (or prepared one) is read file by file, so nothing is written inside it."""
    found = existing_inputs(
        [("CONVERSATION", args.conversation), ("--template", args.template), ("--tokenizer", args.tokenizer)]
    )
    return [replace(item, whole_folder=item.key == "CONVERSATION" and item.path.is_dir()) for item in found]
