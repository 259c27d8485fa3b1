"""An independent check of a converted chat template, written apart from add-markers', lint's and the probes' code.

add-markers verifies its own output; a bug shared by its tracer, its labels and its verifier would pass
that verification. This check uses none of them: its own conversations (every message shape real datasets
write), transformers' own renderer (`render_jinja_template`, which is what `apply_chat_template` calls) and a
plain walk through the rendered text. A converted template passes when, on every conversation the original
renders, it renders the same text byte for byte, trains every character of each assistant message's content,
reasoning, tool-call names and argument values the text shows and the end-of-turn after the last answer,
and trains no user, system or tool text.

    problems, checked = check_conversion(original, converted)
"""

from __future__ import annotations

import enum
import itertools
import json
import random
import re

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template

MARKER = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_tide",
        "description": "The next high tide at a harbour.",
        "parameters": {
            "type": "object",
            "properties": {
                "harbour": {"type": "string", "description": "The harbour's name."},
                "unit": {"type": "string", "description": "Metres or feet.", "enum": ["metres", "feet"]},
            },
            "required": ["harbour"],
        },
    },
}


def call(harbour: str, unit: str, call_id: str | None = None, *, as_string: bool = False) -> dict:
    arguments = {"harbour": harbour, "unit": unit}
    function = {"name": "lookup_tide", "arguments": json.dumps(arguments) if as_string else arguments}
    return {**({"id": call_id} if call_id else {}), "type": "function", "function": function}


def result(text: str, *, name: bool = True, call_id: str | None = None) -> dict:
    return {
        "role": "tool",
        **({"name": "lookup_tide"} if name else {}),
        **({"tool_call_id": call_id} if call_id else {}),
        "content": text,
    }


def shapes() -> list[tuple[str, list[dict]]]:
    """One conversation per message shape; every text unique, so a message is found by its text."""
    return [
        ("plain", [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A wren."}]),
        (
            "system-multi-turn",
            [
                {"role": "system", "content": "Answer like a sailor."},
                {"role": "user", "content": "Is the sea calm?"},
                {"role": "assistant", "content": "Aye, flat as a plate."},
                {"role": "user", "content": "And tomorrow?"},
                {"role": "assistant", "content": "A swell from the west, matey."},
            ],
        ),
        (
            "empty-content-call",
            [
                {"role": "user", "content": "When is high tide in Brest?"},
                {"role": "assistant", "content": "", "tool_calls": [call("Brest", "metres")]},
                result('{"time": "14:05", "height": 6.1}'),
                {"role": "assistant", "content": "High tide in Brest is at 14:05."},
            ],
        ),
        (
            "null-content-parallel-calls-with-ids",
            [
                {"role": "system", "content": "Be brief about tides."},
                {"role": "user", "content": "Tides in Hull and Cobh?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("Hull", "feet", "hull00001"), call("Cobh", "metres", "cobh00002")],
                },
                result('{"time": "09:12"}', call_id="hull00001"),
                result('{"time": "10:48"}', name=False, call_id="cobh00002"),
                {"role": "assistant", "content": "Hull at 09:12, Cobh at 10:48."},
            ],
        ),
        (
            "text-beside-calls-two-rounds",
            [
                {"role": "user", "content": "Compare Oban and Wick tides."},
                {"role": "assistant", "content": "Oban first.", "tool_calls": [call("Oban", "metres", "oban00003")]},
                result('{"time": "11:30"}', call_id="oban00003"),
                {"role": "assistant", "content": "", "tool_calls": [call("Wick", "feet", "wick00004")]},
                result('{"time": "12:40"}', name=False, call_id="wick00004"),
                {"role": "assistant", "content": "Oban 11:30, Wick 12:40."},
            ],
        ),
        (
            "reasoning-content",
            [
                {"role": "user", "content": "Is 221 a prime?"},
                {"role": "assistant", "reasoning_content": "221 is 13 times 17.", "content": "No, 13 x 17."},
                {"role": "user", "content": "Is 223?"},
                {"role": "assistant", "reasoning_content": "No divisor up to 14.", "content": "Yes, it is."},
            ],
        ),
        (
            "thinking-with-call",
            [
                {"role": "user", "content": "Can I sail out of Ayr at noon?"},
                {
                    "role": "assistant",
                    "thinking": "The tide at Ayr decides it.",
                    "content": "",
                    "tool_calls": [call("Ayr", "metres", "ayr000005")],
                },
                result('{"time": "12:20"}', call_id="ayr000005"),
                {"role": "assistant", "thinking": "12:20 is near noon.", "content": "Yes, high tide is 12:20."},
            ],
        ),
        (
            "reasoning-before-call",
            [
                {"role": "system", "content": "You plan harbour trips."},
                {"role": "user", "content": "Plan a Dover departure."},
                {
                    "role": "assistant",
                    "reasoning_content": "Dover tide first, then the plan.",
                    "content": "",
                    "tool_calls": [call("Dover", "feet")],
                },
                result('{"time": "16:55"}'),
                {"role": "assistant", "reasoning_content": "Leave before 16:55.", "content": "Leave by 16:00."},
            ],
        ),
        (
            "ends-in-call",
            [
                {"role": "user", "content": "Fetch the tide for Leith."},
                {"role": "assistant", "content": None, "tool_calls": [call("Leith", "metres", "leith0006")]},
            ],
        ),
    ]


def generated(count: int, seed: int) -> list[tuple[str, list[dict]]]:
    """Random conversations mixing the shapes: 1-3 rounds, a system prompt or none, calls or none."""
    rng = random.Random(seed)
    words = "harbour keel mast gull 12 feet knots é ⚓ west calm swell yes no".split()
    harbours = ["Brest", "Hull", "Oban", "Wick", "Ayr"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 7))).capitalize() + rng.choice(".?!")

    out = []
    for k in range(count):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": text()})
            if rng.random() < 0.4:
                ids = [f"{rng.randrange(10**9):09d}" for _ in range(rng.randint(1, 2))]
                turn = {"role": "assistant", "content": text() if rng.random() < 0.3 else ""}
                turn["tool_calls"] = [call(rng.choice(harbours), rng.choice(["metres", "feet"]), i) for i in ids]
                if rng.random() < 0.4:
                    turn["reasoning_content"] = text()
                messages.append(turn)
                messages += [
                    result(f'{{"time": "{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"}}', call_id=i) for i in ids
                ]
            answer = {"role": "assistant", "content": text()}
            if rng.random() < 0.3:
                answer["reasoning_content"] = text()
            messages.append(answer)
        out.append((f"generated-{seed}-{k}", messages))
    return out


def with_string_arguments(messages: list[dict]) -> list[dict]:
    def as_string(c: dict) -> dict:
        arguments = c["function"]["arguments"]
        return (
            {**c, "function": {**c["function"], "arguments": json.dumps(arguments)}}
            if isinstance(arguments, dict)
            else c
        )

    return [
        {**m, "tool_calls": [as_string(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages
    ]


def with_null_content(messages: list[dict]) -> list[dict]:
    return [{**m, "content": None} if m.get("tool_calls") and not m.get("content") else m for m in messages]


def conversations(generated_count: int = 12, seed: int = 11) -> list[tuple[str, list[dict], bool]]:
    """(name, messages, keep None values): each conversation as `apply_chat_template` gives it (None values
    dropped); those with tool calls also with the arguments as JSON strings, and with empty content beside
    calls made null and passed on as given (as `render_jinja_template` and inference servers do)."""
    out = []
    for name, messages in [*shapes(), *generated(generated_count, seed)]:
        out.append((name, messages, False))
        if any(m.get("tool_calls") for m in messages):
            out += [
                (f"{name}/string-arguments", with_string_arguments(messages), False),
                (f"{name}/null-content", with_null_content(messages), True),
                (f"{name}/null-content/string-arguments", with_null_content(with_string_arguments(messages)), True),
            ]
    return out


class Tools(enum.Enum):
    """When the conversation declares the tool: templates differ in which they can render."""

    WHEN_CALLED = "when called"  # only in conversations with tool calls (what most datasets do)
    ALWAYS = "always"  # in every conversation (templates that loop over `tools` unguarded)
    NEVER = "never"  # in none (templates that fail on any tool definition)


def render_as(
    template: str, messages: list[dict], keep_none: bool, tools: Tools = Tools.WHEN_CALLED
) -> tuple[str, list[bool]]:
    """The text and which characters are trained, straight from transformers' renderer, with the tool
    declared as `tools` says."""
    declared = tools is Tools.ALWAYS or (tools is Tools.WHEN_CALLED and any(m.get("tool_calls") for m in messages))
    if not keep_none:
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    texts, spans = render_jinja_template(
        conversations=[messages],
        tools=[TOOL] if declared else None,
        chat_template=template,
        return_assistant_tokens_mask=bool(MARKER.search(template)),
        bos_token="<s>",
        eos_token="</s>",
    )
    trained = [False] * len(texts[0])
    for start, end in spans[0] if spans else []:
        trained[start:end] = [True] * (end - start)
    return texts[0], trained


def as_text_parts(messages: list[dict]) -> list[dict]:
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
        for m in messages
    ]


def text_of(content) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content if isinstance(content, str) else ""


def shown_at(text: str, piece: str, start: int, stop: int | None = None) -> int:
    """Where `piece` is first printed in text[start:stop], as written or JSON-escaped (-1 when it isn't)."""
    forms = {piece, json.dumps(piece)[1:-1], json.dumps(piece, ensure_ascii=False)[1:-1]}
    found = [at for form in forms if (at := text.find(form, start, len(text) if stop is None else stop)) >= 0]
    return min(found, default=-1)


def wrong_characters(text: str, trained: list[bool], messages: list[dict]) -> list[str]:
    """Walk the messages through the text in order, each looked for after the one before. An assistant
    message's content and reasoning must be trained where they are printed before the next message's text;
    each tool call's argument values, and its name before them, likewise; what the text shows after the last
    answer up to the next whitespace, or its first special tag (its end-of-turn, `<|im_end|>`). Other messages' text must not be trained."""
    problems, cursor = [], 0

    def check(i: int, what: str, at: int, length: int, want: bool) -> None:
        if any(flag != want for flag in trained[at : at + length]):
            state = "not fully trained" if want else "trained"
            problems.append(f"message {i} ({messages[i]['role']}) {what} {text[at : at + length]!r} {state}")

    for i, message in enumerate(messages):
        content = text_of(message.get("content"))
        if message["role"] != "assistant":
            if content and (at := shown_at(text, content, cursor)) >= 0:
                check(i, "text", at, len(content), want=False)
                cursor = at + len(content) if message["role"] != "system" else cursor
            continue
        following = next((text_of(m.get("content")) for m in messages[i + 1 :] if m["role"] != "assistant"), "")
        stop = shown_at(text, following, cursor) if following else -1
        stop = stop if stop >= 0 else len(text)
        end, position = cursor, cursor
        for key in ("reasoning_content", "thinking"):
            if (reasoning := text_of(message.get(key))) and (at := text.find(reasoning, cursor, stop)) >= 0:
                check(i, "reasoning", at, len(reasoning), want=True)
        for tool_call in message.get("tool_calls") or []:
            arguments = tool_call["function"]["arguments"]
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            values = [
                (at, value) for value in map(str, arguments.values()) if (at := text.find(value, position, stop)) >= 0
            ]
            if not values:
                continue  # the template doesn't print this call
            name = tool_call["function"]["name"]
            if (name_at := text.rfind(name, position, values[0][0])) >= 0:
                check(i, "tool-call name", name_at, len(name), want=True)
            for at, value in values:
                check(i, "tool-call argument", at, len(value), want=True)
                position = end = max(end, at + len(value))
        if content and (at := text.find(content, cursor)) >= 0:
            check(i, "content", at, len(content), want=True)
            end = max(end, at + len(content))
            rest = text[at + len(content) :]
            if i == len(messages) - 1 and rest.strip() and not message.get("tool_calls"):
                eot_at = at + len(content) + len(rest) - len(rest.lstrip())
                check(i, "end-of-turn", eot_at, len(end_of_turn(rest.split()[0])), want=True)
        cursor = end
    return problems


def end_of_turn(word: str) -> str:
    """The end-of-turn at the start of `word`: its first special tag when it opens with one (`<|im_end|>` of
    `<|im_end|><|im_start|>system`, where the text glues the next header on), else the whole word."""
    tag = re.match(r"<[^<>\s]*>|\[[^\[\]\s]*\]", word)
    return tag.group(0) if tag else word


RENDER_FAILURES = (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError)


def check_conversion(original: str, converted: str, cases=None) -> tuple[list[str], int]:
    """(problems, conversations checked): every conversation the original renders (content as a string, or
    as text parts for templates that only read parts; with the tool declared, or without it for templates
    that fail on it) rendered by both; the converted one must give the same
    text and train exactly what `wrong_characters` asks for. The original failing or raising on a
    conversation leaves nothing to compare."""
    problems, checked = [], 0
    for case, given, keep_none in conversations() if cases is None else cases:
        for tools, messages in itertools.product(Tools, (given, as_text_parts(given))):
            try:
                expected, _ = render_as(original, messages, keep_none, tools)
                break
            except RENDER_FAILURES:
                continue
        else:
            continue
        try:
            text, trained = render_as(converted, messages, keep_none, tools)
        except RENDER_FAILURES as err:
            problems.append(f"{case}: the converted template fails where the original renders: {err}")
            continue
        checked += 1
        if text != expected:
            at = next((k for k, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
            problems.append(
                f"{case}: renders {text[at : at + 40]!r} where the original renders {expected[at : at + 40]!r}"
            )
            continue
        problems += [f"{case}: {p}" for p in wrong_characters(text, trained, messages)]
    return problems, checked
