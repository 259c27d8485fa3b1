"""The safety net under add-markers: wrong placements are refused, and converted templates are right.

1. `verify_placement` (the check add-markers runs before it writes anything) is handed hand-made wrong
   placements of markers in a small tool-calling template (a block one character short, a block around
   user text, an end-of-turn left out, a render one byte different, tool calls left outside the block)
   and must refuse each with its reason; the right placement must pass. The independent check (3) sees
   each of them too.
2. The tool-call shapes real datasets write are in the verification set: a template that prints tool
   calls only for `content: None` (a fixture written for this test, the DeepSeek-R1 pattern) gets its
   tool calls trained, and the template add-markers writes from the old probe set alone is refused; so
   do templates whose tool-call code only Mistral-style call ids or calls without tool definitions reach.
   A template that reads `continue_final_message` converts without a traceback.
3. The independent check (`tests/helpers/independent_check.py`, written apart from add-markers' and
   lint's code): every template of the dev set that add-markers converts renders byte-identically to the
   original on its conversations, trains every character of each assistant message's content, reasoning,
   tool-call names and arguments and the end-of-turn after the last answer, and no user, system or tool
   text. tests/test_markers_corpus.py runs it over real templates nobody here wrote.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import trl
from helpers.independent_check import check_conversion

import sft_toolkit.lint
import sft_toolkit.markers.trace
import sft_toolkit.turns
from sft_toolkit.markers import MarkerError, Refusal, add_markers, verify_placement
from sft_toolkit.masks import render
from sft_toolkit.probes import PROBES, TOOL_SHAPE_PROBES
from sft_toolkit.problems import InputError

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


def one_tag_a_line(template: str) -> str:
    """The same template with each tag on its own line (`{%-` and `{{-` trim the newline: the render is equal)."""
    return template.replace("{%-", "\n{%-").replace("{{-", "\n{{-").lstrip("\n")


@pytest.mark.parametrize(
    ("case", "line_text"),
    [("block around user text", OTHERS), ("end-of-turn left out", END), ("render one byte different", "'\\n'")],
)
def test_a_refusal_names_the_template_line_that_wrote_the_wrong_text(case, line_text):
    original, (marked, reason, _) = one_tag_a_line(ORIGINAL), WRONG[case]
    lines = original.splitlines()
    expected = next(number for number, line in enumerate(lines, 1) if line_text in line and line != HEADER)
    findings = verify_placement(original, one_tag_a_line(marked))
    assert findings[0].rule == reason and findings[0].line == expected, (findings[0], lines[expected - 1])


@pytest.mark.parametrize("case", sorted(WRONG))
def test_the_independent_check_sees_each_wrong_placement_too(case):
    marked, _, shown = WRONG[case]
    problems, checked = check_conversion(ORIGINAL, marked)
    assert checked > 0 and problems, f"{case}: the independent check accepted it"
    assert check_conversion(ORIGINAL, RIGHT) == ([], checked)


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


# Templates whose tool-call code no probe reached in its usual shape: one that refuses call ids that aren't
# 9 characters (Mistral's templates; found converted with untrained tool calls in the template corpus:
# axolotl's mistral_v2v3 and mistral_v3_tekken, llama.cpp's Mistral-Nemo-Instruct-2407) and one that fails
# on the tool definitions it is given (llama.cpp's deepseek-r1: tool calls without definitions rendered
# untrained).
UNREACHED_TOOL_CODE = ["calls_need_nine_character_ids", "fails_on_tool_definitions"]


def conversion_without_fallback_shapes(monkeypatch, source: str) -> str:
    """What add-markers wrote before tool probes had their fallback shapes (`probes.fallback_variants`)."""
    with monkeypatch.context() as patch:
        patch.setattr(sft_toolkit.turns, "fallback_variants", lambda probe: iter(()))
        return add_markers(source).source


@pytest.mark.parametrize("name", UNREACHED_TOOL_CODE)
def test_tool_calls_only_fallback_shapes_reach_are_trained(name, monkeypatch):
    source = (FIXTURES / f"{name}.jinja").read_text()
    problems, checked = check_conversion(source, add_markers(source).source)
    assert checked >= 5 and problems == []
    old = conversion_without_fallback_shapes(monkeypatch, source)
    assert any("tool-call name" in p for p in check_conversion(source, old)[0])  # the silent wrong, seen
    findings = verify_placement(source, old)  # and refused by verification now
    assert findings and findings[0].rule == Refusal.OUTPUT_UNTRAINED and "get_weather" in findings[0].message


def test_a_template_that_reads_continue_final_message_converts_without_a_traceback():
    """transformers cuts the text after the final message under `continue_final_message` but not the
    generation spans, which then run past the text (llama.cpp's NVIDIA-Nemotron-Nano-v2 raised IndexError
    in add-markers' lint pass): a render keeps only spans inside its text."""
    source = ORIGINAL + "{%- if continue_final_message is defined and continue_final_message %}{%- endif %}"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    cut = render(RIGHT, messages, template_kwargs={"continue_final_message": True})
    assert cut.text.endswith("Hello there") and cut.spans and all(end <= len(cut.text) for _, end in cut.spans)
    assert "".join(cut.text[a:b] for a, b in cut.spans) == "Hello there"
    assert verify_placement(source, add_markers(source).source) == []


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


@pytest.mark.parametrize("name", DEV_SET)
def test_converted_template_passes_the_independent_check(name):
    marked = converted(name)
    if marked is None:
        pytest.skip("add-markers refuses this template (tests/test_add_markers.py says which)")
    problems, checked = check_conversion((TRL_TEMPLATES / f"{name}.jinja").read_text(), marked)
    assert not problems, f"{name}: {problems[:5]}"
    assert checked >= 5, f"{name}: only {checked} conversations rendered"  # gemma refuses tool and system roles


def test_the_hand_placement_examples_in_templates_readme_are_right():
    """Every original / hand-marked pair of jinja blocks in templates/README.md's section on refusals."""
    readme = (Path(__file__).resolve().parents[1] / "templates" / "README.md").read_text()
    section = readme[readme.index("## When add-markers refuses a template") :]
    blocks = re.findall(r"```jinja\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 8
    for original, by_hand in zip(blocks[::2], blocks[1::2]):
        assert "{% generation %}" not in original and "{% generation %}" in by_hand
        assert verify_placement(original, by_hand) == [], by_hand
