"""The safety net under add-markers: wrong placements are refused, and converted templates are right.

1. `verify_placement` (the check add-markers runs before it writes anything) is handed hand-made wrong
   placements of markers in a small tool-calling template (a block one character short, a block around
   user text, an end-of-turn left out, a render one byte different, tool calls left outside the block)
   and must refuse each with its reason; the right placement must pass.
2. The tool-call shapes real datasets write are in the verification set: a template that prints tool
   calls only for `content: None` (a fixture written for this test, the DeepSeek-R1 pattern) gets its
   tool calls trained, and the template add-markers writes from the old probe set alone is refused.
3. An independent check, written here apart from add-markers' and lint's code: every template of the
   dev set that add-markers converts renders byte-identically to the original on generated conversations
   and every tool-call shape, trains every character of each assistant message's content, tool-call
   names and arguments and the end-of-turn after the last answer, and no user, system or tool text.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import jinja2
import pytest
import trl
from transformers.utils.chat_template_utils import render_jinja_template

import sft_toolkit.lint
import sft_toolkit.markers.trace
from sft_toolkit.markers import MarkerError, Refusal, add_markers, verify_placement
from sft_toolkit.masks import render
from sft_toolkit.preprocess import canonical_messages
from sft_toolkit.probes import PROBES, TOOL_SHAPE_PROBES, WEATHER_TOOL, generated_conversations
from sft_toolkit.problems import InputError

MARKER = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
FIXTURES = Path(__file__).parent / "fixtures" / "templates"
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
DEV_SET = sorted(p.stem for p in TRL_TEMPLATES.glob("*.jinja") if not p.stem.endswith("_training"))

# ----------------------------------------------------------------------------------------- 1. wrong placements

HEADER = "{{- '<|im_start|>assistant\\n' }}"
CONTENT = "{%- if message.content %}{{- message.content }}{%- endif %}"
CALLS = (
    "{%- for call in message.tool_calls or [] %}"
    "{{- '<tool_call>' + call.function.name + ' ' + call.function.arguments | tojson + '</tool_call>' }}"
    "{%- endfor %}"
)
END = "{{- '<|im_end|>' }}"
OTHERS = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"


def chat_template(assistant: str, others: str = OTHERS) -> str:
    return (
        "{%- for message in messages %}{%- if message.role == 'assistant' %}"
        + assistant
        + "{%- else %}"
        + others
        + "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


ORIGINAL = chat_template(HEADER + CONTENT + CALLS + END + "{{- '\\n' }}")
RIGHT = chat_template(HEADER + "{%- generation %}" + CONTENT + CALLS + END + "{%- endgeneration %}{{- '\\n' }}")

WRONG = {
    "block one character short": (
        chat_template(
            HEADER + "{%- generation %}" + CONTENT + CALLS + "{{- '<|im_end|' }}{%- endgeneration %}{{- '>\\n' }}"
        ),
        Refusal.OUTPUT_UNTRAINED,
        "'>'",
    ),
    "block around user text": (
        chat_template(
            HEADER + "{%- generation %}" + CONTENT + CALLS + END + "{%- endgeneration %}{{- '\\n' }}",
            "{%- generation %}" + OTHERS + "{%- endgeneration %}",
        ),
        Refusal.TRAINED_OUTSIDE,
        "What is 2 + 3?",
    ),
    "end-of-turn left out": (
        chat_template(HEADER + "{%- generation %}" + CONTENT + CALLS + "{%- endgeneration %}" + END + "{{- '\\n' }}"),
        Refusal.OUTPUT_UNTRAINED,
        "'<|im_end|>'",
    ),
    "render one byte different": (
        chat_template(HEADER + "{%- generation %}" + CONTENT + CALLS + END + "{%- endgeneration %}{{- '\\r' }}"),
        Refusal.RENDER_DIFFERS,
        "\\r",
    ),
    "tool calls outside the block": (
        chat_template(
            HEADER
            + "{%- generation %}"
            + CONTENT
            + "{%- endgeneration %}"
            + CALLS
            + "{%- generation %}"
            + END
            + "{%- endgeneration %}{{- '\\n' }}"
        ),
        Refusal.OUTPUT_UNTRAINED,
        "<tool_call>",
    ),
}


def test_the_right_placement_passes_verification():
    assert verify_placement(ORIGINAL, RIGHT) == []


@pytest.mark.parametrize("case", sorted(WRONG))
def test_a_wrong_placement_is_refused_with_its_reason(case):
    marked, reason, shown = WRONG[case]
    findings = verify_placement(ORIGINAL, marked)
    assert findings, f"{case}: verification accepted it"
    assert findings[0].rule == reason, [f.message for f in findings]
    assert shown in findings[0].message  # the message shows the text that is wrong


def test_add_markers_places_the_markers_the_right_placement_has():
    converted = add_markers(ORIGINAL).source
    assert verify_placement(ORIGINAL, converted) == []
    for probe in TOOL_SHAPE_PROBES:
        ours, right = (
            render(converted, probe.messages, tools=probe.tools),
            render(RIGHT, probe.messages, tools=probe.tools),
        )
        assert (ours.text, ours.trained_chars()) == (right.text, right.trained_chars()), probe.name


# ------------------------------------------------------------------------ 2. tool-call shapes in verification

CALLS_ONLY_WHEN_NONE = (FIXTURES / "calls_only_when_content_is_none.jinja").read_text()
NULL_CONTENT_AS_GIVEN = next(p for p in TOOL_SHAPE_PROBES if p.keep_none)


def test_tool_calls_printed_only_for_content_none_are_trained():
    converted = add_markers(CALLS_ONLY_WHEN_NONE).source
    out = render(converted, NULL_CONTENT_AS_GIVEN.messages, tools=NULL_CONTENT_AS_GIVEN.tools, keep_none=True)
    trained = "".join(out.text[a:b] for a, b in out.spans)
    assert '<|call|>get_weather\n{"city": "Bergen"}<|/call|>' in trained
    assert '<|call|>get_weather\n{"city": "Cork"}<|/call|><|/calls|><|end|>' in trained


def test_the_conversion_the_old_probes_allowed_is_refused(monkeypatch):
    """With the probe set add-markers had before the tool-call shapes, the content-none branch is never
    rendered, so it gets no markers and verification passes; the full set refuses that template."""
    with monkeypatch.context() as patch:
        patch.setattr(sft_toolkit.markers.trace, "VERIFICATION_PROBES", PROBES)
        patch.setattr(sft_toolkit.lint, "VERIFICATION_PROBES", PROBES)
        old = add_markers(CALLS_ONLY_WHEN_NONE).source
    out = render(old, NULL_CONTENT_AS_GIVEN.messages, tools=NULL_CONTENT_AS_GIVEN.tools, keep_none=True)
    assert "get_weather" not in "".join(out.text[a:b] for a, b in out.spans)  # the bug the issue describes
    findings = verify_placement(CALLS_ONLY_WHEN_NONE, old)
    assert findings and findings[0].rule == Refusal.OUTPUT_UNTRAINED
    assert NULL_CONTENT_AS_GIVEN.name in findings[0].message


def test_verify_placement_says_why_it_cannot_check_an_original():
    with pytest.raises(InputError, match="line 1"):
        verify_placement("{% for m in messages %}{{ m.content ", RIGHT)
    untraceable = "{% filter upper %}{% for m in messages %}{{ m.content }}{% endfor %}{% endfilter %}"
    with pytest.raises(MarkerError, match="could not be traced"):
        verify_placement(untraceable, RIGHT)


# ---------------------------------------------------------------------------- 3. the independent check


@cache
def converted(name: str) -> str | None:
    try:
        return add_markers((TRL_TEMPLATES / f"{name}.jinja").read_text()).source
    except MarkerError:
        return None


def with_string_arguments(messages: list[dict]) -> list[dict]:
    def string(arguments):
        return arguments if isinstance(arguments, str) else json.dumps(arguments)

    return [
        {
            **m,
            "tool_calls": [
                {**call, "function": {**call["function"], "arguments": string(call["function"]["arguments"])}}
                for call in m["tool_calls"]
            ],
        }
        if m.get("tool_calls")
        else m
        for m in messages
    ]


def with_null_content(messages: list[dict]) -> list[dict]:
    return [{**m, "content": None} if m.get("tool_calls") and not m.get("content") else m for m in messages]


def conversations() -> list[tuple[str, list[dict], bool]]:
    """(name, messages, keep None values): generated conversations as training gives them to the template
    (`canonical_messages`), and those with tool calls also with the arguments as JSON strings, and with empty
    content beside tool calls made null and passed on as given; every tool-call shape probe, with its
    arguments as objects and as JSON strings."""
    out = []
    for k, messages in enumerate(generated_conversations(16, seed=7)):
        out.append((f"generated-{k}", canonical_messages(messages), False))
        if any(m.get("tool_calls") for m in messages):
            out += [
                (f"generated-{k}-string-arguments", with_string_arguments(messages), False),
                (f"generated-{k}-null-content", with_null_content(messages), True),
                (
                    f"generated-{k}-null-content-string-arguments",
                    with_null_content(with_string_arguments(messages)),
                    True,
                ),
            ]
    for probe in TOOL_SHAPE_PROBES:
        out += [
            (probe.name, canonical_messages(probe.messages), probe.keep_none),
            (f"{probe.name}-string-arguments", with_string_arguments(probe.messages), probe.keep_none),
        ]
    return out


def render_as(template: str, messages: list[dict], keep_none: bool) -> tuple[str, list[bool]]:
    """The text and which characters are trained, straight from transformers' renderer; None values are
    dropped first unless `keep_none` (as `apply_chat_template` drops them)."""
    if not keep_none:
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    texts, spans = render_jinja_template(
        conversations=[messages],
        tools=[WEATHER_TOOL],
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
    message's content must be trained wherever it is printed; each tool call's argument values, and its name
    before them, where they are printed before the next message's text; the first character after the last
    answer that isn't whitespace (its end-of-turn). Other messages' text must not be trained."""
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
        for call in message.get("tool_calls") or []:
            arguments = call["function"]["arguments"]
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            values = [
                at_value
                for value in map(str, arguments.values())
                if (at_value := (text.find(value, position, stop), value))[0] >= 0
            ]
            if not values:
                continue  # the template doesn't print this call
            name = call["function"]["name"]
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
                check(i, "end-of-turn", eot_at, 1, want=True)
        cursor = end
    return problems


@pytest.mark.parametrize("name", DEV_SET)
def test_converted_template_passes_the_independent_check(name):
    marked = converted(name)
    if marked is None:
        pytest.skip("add-markers refuses this template (tests/test_add_markers.py says which)")
    original = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    checked = 0
    for case, given, keep_none in conversations():
        for messages in (given, as_text_parts(given)):  # vision-language templates want content as parts
            try:
                expected, _ = render_as(original, messages, keep_none)
                break
            except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError):
                continue
        else:
            continue  # the original refuses or fails on it: nothing to compare
        text, trained = render_as(marked, messages, keep_none)
        assert text == expected, f"{name}/{case}: the converted template renders other text"
        problems = wrong_characters(text, trained, messages)
        assert not problems, f"{name}/{case}: {problems}"
        checked += 1
    assert checked >= 5, f"{name}: only {checked} conversations rendered"  # gemma refuses tool and system roles


def test_the_hand_placement_example_in_templates_readme_is_right():
    readme = (Path(__file__).resolve().parents[1] / "templates" / "README.md").read_text()
    section = readme[readme.index("## When add-markers refuses a template") :]
    original, by_hand = re.findall(r"```jinja\n(.*?)```", section, flags=re.S)[:2]
    assert verify_placement(original, by_hand) == []
