"""Verify: the marked template renders the original byte for byte, trains exactly the labelled characters and
every piece of assistant output, and passes lint; `verify_placement` is the public check (step 4 of `markers`)."""

from __future__ import annotations

import json
from enum import Enum

from ..lint import lint, settings_for
from ..masks import TemplateRaised, render
from ..probes import text_of
from ..problems import ERROR, Finding, InputError
from ..turns import first_difference
from .label import Label
from .source import Template, strip_markers, with_special_tokens
from .trace import Trace, trace_all


class Refusal(str, Enum):
    """Why verification refuses a marked template: the `rule` of each finding `verify_placement` returns."""

    RENDER_FAILED = "render-failed"  # the marked template fails where the original renders
    RENDER_DIFFERS = "render-differs"  # not byte-identical to the original
    OUTPUT_UNTRAINED = "output-untrained"  # assistant output or its end-of-turn left outside every block
    TRAINED_OUTSIDE = "trained-outside-turn"  # user/system/tool text or template text between turns trained
    MARKERS_UNRECOGNISED = "markers-unrecognised"  # TRL's has_generation_markers doesn't see the blocks
    LINT = "lint"  # a lint error on the marked template


def verify_placement(original: str, marked: str, *, tokenizer=None, relaxed_whitespace: bool = False) -> list[Finding]:
    """Why `marked` is not `original` with correctly placed generation markers; [] when it is.

    The checks add-markers runs before it writes anything: on every probe render (whole, prefixes, with and
    without the generation prompt) the marked template renders the original's text byte for byte, trains
    every character of each assistant turn and its end-of-turn and nothing else, leaves no assistant content,
    reasoning or tool-call name or argument it shows untrained, and passes lint. `relaxed_whitespace` lets
    whitespace inside a turn stay untrained. Raises InputError when the original doesn't parse, MarkerError
    when its output can't be traced to its source.
    """
    template = Template.parse(strip_markers(original))
    traces, _ = trace_all(template, tokenizer, settings_for(original))
    return check_traces(original, marked, traces, tokenizer, relaxed_whitespace, template)


def check_traces(
    original: str, marked: str, traces: list[Trace], tokenizer, relaxed: bool, template: Template | None = None
) -> list[Finding]:
    """Byte-identical on every traced render, every labelled character trained as labelled, every piece of
    assistant output the render shows trained, lint passes. Given the `template` the traces were made from, a
    finding at a character of a render names the template line that wrote that character."""
    problems = []

    def refuse(reason: Refusal, message: str, line: int | None = None) -> None:
        problems.append(Finding(reason.value, ERROR, message, line))

    kwargs = with_special_tokens(dict(tokenizer.special_tokens_map) if tokenizer is not None else {})
    for trace in traces:
        probe = trace.probe
        try:
            out = render(
                marked,
                probe.messages,
                add_generation_prompt=trace.prompt,
                tools=probe.tools,
                template_kwargs={**kwargs, **probe.template_kwargs},
                placeholders=False,
                keep_none=probe.keep_none,
            )
        except (TemplateRaised, InputError) as err:
            refuse(Refusal.RENDER_FAILED, f"{trace.name}: {err}")
            continue
        if out.text != trace.text:
            at = first_difference(out.text, trace.text)
            refuse(
                Refusal.RENDER_DIFFERS,
                f"{trace.name}: renders {out.text[at : at + 30]!r} where the original "
                f"renders {trace.text[at : at + 30]!r}",
                source_line(trace, at, template),
            )
            continue
        trained = out.trained_chars()
        wrong = [
            (label == Label.UNTRAINED and trained[i])
            or (label == Label.TRAINED and not trained[i] and not (relaxed and trace.text[i].isspace()))
            for i, label in enumerate(trace.labels)
        ]
        if True in wrong:
            start = wrong.index(True)
            end = wrong.index(False, start) if False in wrong[start:] else len(wrong)
            shown = f"{trace.name}: {trace.text[start:end][:60]!r} (characters {start}-{end})"
            line = source_line(trace, start, template)
            if trained[start]:
                refuse(Refusal.TRAINED_OUTSIDE, f"{shown} trained outside the assistant turn", line)
            else:
                refuse(Refusal.OUTPUT_UNTRAINED, f"{shown} of the assistant turn untrained", line)
        else:
            if missed := _untrained_output(probe.messages, out.text, trained, relaxed):
                refuse(Refusal.OUTPUT_UNTRAINED, f"{trace.name}: {missed} is untrained")
    from trl.chat_template_utils import has_generation_markers

    if not has_generation_markers(marked):
        refuse(Refusal.MARKERS_UNRECOGNISED, "TRL would not recognise the markers (only `+` forms of the tag)")
    if not problems:
        result = lint(marked, "marked", tokenizer=tokenizer, reference=original)
        for f in result.findings:
            if f.severity == ERROR:
                refuse(Refusal.LINT, f"lint {f.rule}: {f.message}")
    return problems


def source_line(trace: Trace, position: int, template: Template | None) -> int | None:
    """The line of `template` whose text or expression wrote character `position` of the traced render."""
    if template is None:
        return None
    for emission in trace.emissions:
        if emission.start <= position < emission.end:
            return template.pieces[emission.piece].line
    return None


def _untrained_output(messages: list[dict], text: str, trained: list[bool], relaxed: bool) -> str | None:
    """The first piece of assistant output the render shows but leaves untrained, named; None when all is.

    Checked apart from the labels (which come from `turns.locate_turns`): each assistant message's content and
    reasoning, found after the message before it, and each tool call's argument values and the name before
    them, found before the next message's text. Output the template doesn't print is not looked for."""
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            own = text_of(message.get("content"))
            if own and message.get("role") != "system" and (at := text.find(own, cursor)) >= 0:
                cursor = at + len(own)
            continue
        following = next((text_of(m.get("content")) for m in messages[i + 1 :] if m.get("role") != "assistant"), "")
        forms = {following, json.dumps(following)[1:-1], json.dumps(following, ensure_ascii=False)[1:-1]}
        stop = min((at for form in forms if form and (at := text.find(form, cursor)) >= 0), default=len(text))
        pieces = [
            (key, value)
            for key in ("reasoning_content", "thinking", "content")
            if (value := text_of(message.get(key)))
        ]
        position = cursor
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            values = _argument_values(function.get("arguments"))
            found = [at for value in values if (at := text.find(value, position, stop)) >= 0]
            if not found:
                continue  # the template doesn't print this call
            name = str(function.get("name"))
            name_at = text.rfind(name, position, min(found))
            if name_at >= 0:
                pieces.append(("tool call name", name, name_at))
            for value in values:
                if (at := text.find(value, position, stop)) >= 0:
                    pieces.append(("tool call argument", value, at))
                    position = at + len(value)
        for piece in pieces:
            what, value = piece[0], piece[1]
            at = piece[2] if len(piece) == 3 else text.find(value, cursor)
            if at < 0:
                continue
            if not all(trained[k] or (relaxed and text[k].isspace()) for k in range(at, at + len(value))):
                return f"message {i}'s {what} {value[:40]!r} (character {at})"
    return None


def _argument_values(arguments) -> list[str]:
    """The texts a tool call's arguments show in any serialization: each value (of the object, or of the JSON
    string parsed), or the string itself when it is not a JSON object."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return [arguments] if arguments else []
        arguments = parsed if isinstance(parsed, dict) else {"": arguments}
    if not isinstance(arguments, dict):
        return []
    return [value if isinstance(value, str) else json.dumps(value) for value in arguments.values() if value != ""]
