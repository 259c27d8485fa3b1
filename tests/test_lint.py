"""Each lint rule: a broken template that triggers it, paired with the fixed one that does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trl

from sft_toolkit.lint import lint
from sft_toolkit.probes import VERIFICATION_PROBES
from sft_toolkit.rules import RULES

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
GOOD = (FIXTURES / "good_chatml.jinja").read_text()
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"


def rules(source: str, **kwargs) -> dict[str, list]:
    found: dict[str, list] = {}
    for f in lint(source, "t", **kwargs).findings:
        found.setdefault(f.rule, []).append(f)
    return found


def test_fixed_template_is_clean():
    result = lint(GOOD, "good")
    assert result.ok and result.findings == []


# (fixture, rule, severity, expected line or None)
BROKEN = [
    ("S001_syntax_error", "S001", "error", 2),
    ("S002_no_markers", "S002", "error", None),
    ("S003_unclosed_block", "S003", "error", 7),
    ("S003_nested_blocks", "S003", "error", 5),
    ("S004_user_branch", "S004", "error", 4),
    ("S005_eot_after_block", "S005", "error", 7),
    ("R001_last_turn_only", "R001", "error", 5),
    ("R002_header_in_mask", "R002", "error", 4),
    ("R002_user_in_mask", "R002", "error", 4),
    ("R003_eot_untrained", "R003", "error", 5),
    ("R004_prompt_mismatch", "R004", "error", 4),
    ("R005_extra_newline", "R005", "error", None),
    ("R006_eot_inside_token", "R006", "warning", 5),
    ("R007_render_error", "R007", "error", None),
    ("R008_blocks_not_per_message", "R008", "warning", None),
    ("I001_rejects_system", "I001", "info", None),
]
# What a rule needs besides the template (the fixed template is linted with the same): R005 compares with a
# reference, R006 reads a vocabulary (Qwen's has one token for '>\n' and one for '<|im_end|>').
LINT_ARGUMENTS = {
    "R005": lambda request: {"reference": GOOD},
    "R006": lambda request: {"tokenizer": request.getfixturevalue("qwen_tokenizer")},
}


@pytest.mark.parametrize("name,rule,severity,line", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_template_triggers_rule(name, rule, severity, line, request):
    arguments = LINT_ARGUMENTS[rule](request) if rule in LINT_ARGUMENTS else {}
    found = rules((FIXTURES / f"{name}.jinja").read_text(), **arguments)
    assert rule in found, f"{rule} not reported; got {sorted(found)}"
    finding = found[rule][0]
    assert finding.severity == severity
    assert finding.line == line
    assert rule not in rules(GOOD, **arguments)


def test_every_registered_rule_has_a_broken_fixture():
    """Adding a rule means adding a fixture `CODE_what.jinja` that breaks it, listed above."""
    covered = {rule for _, rule, _, _ in BROKEN}
    assert covered == set(RULES)
    for name, rule, severity, _ in BROKEN:
        assert name.startswith(f"{rule}_") and (FIXTURES / f"{name}.jinja").is_file()
        assert severity in RULES[rule].severities
    assert {path.stem for path in FIXTURES.glob("[A-Z][0-9][0-9][0-9]_*.jinja")} == {b[0] for b in BROKEN}


def test_syntax_error_names_line_and_column():
    (finding,) = rules((FIXTURES / "S001_syntax_error.jinja").read_text())["S001"]
    assert "at 2:" in finding.message


def test_rejected_probe_is_info_not_error():
    result = lint((FIXTURES / "I001_rejects_system.jinja").read_text(), "t")
    assert result.ok
    assert {f.rule for f in result.findings} == {"I001"}
    assert "System role not supported" in result.findings[0].message


def test_eot_untrained_is_caught_when_static_rule_cannot_see_it():
    # The end-of-turn comes from a variable, so the static S005 rule is blind; the rendered R003 is not.
    found = rules((FIXTURES / "R003_eot_untrained.jinja").read_text())
    assert "S005" not in found and "R003" in found


def test_header_newline_in_mask_names_the_header():
    (finding,) = rules((FIXTURES / "R002_header_in_mask.jinja").read_text())["R002"]
    assert "role header" in finding.message and "'\\n'" in finding.message


def test_reference_mismatch_reports_first_difference():
    reference = GOOD.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert "R005" not in rules(GOOD, reference=reference)
    changed = reference.replace("message.content + '<|im_end|>' }}", "message.content | trim + '<|im_end|>' }}", 1)
    changed = changed.replace("'\\n' }}", "'\\n\\n' }}", 1)  # one extra newline after each assistant turn
    assert changed != reference
    found = rules(GOOD, reference=changed)
    assert "R005" in found
    assert "reference" in found["R005"][0].message


def test_trl_qwen2_5_training_template_trains_the_header_newline():
    """TRL's own training template puts the header's '\\n' inside the block: a real-world R002."""
    found = rules((TRL_TEMPLATES / "qwen2_5_training.jinja").read_text())
    assert "R002" in found and "role header" in found["R002"][0].message


def test_trl_qwen3_training_is_not_byte_identical_to_qwen3():
    found = rules(
        (TRL_TEMPLATES / "qwen3_training.jinja").read_text(), reference=(TRL_TEMPLATES / "qwen3.jinja").read_text()
    )
    assert "R005" in found


def test_untrained_token_boundary_is_a_warning(llama3_tokenizer):
    """ChatML on the Llama 3 vocabulary: '<|im_end|>' is not one token, and a BPE token crosses the block's end."""
    result = lint(GOOD, "good", tokenizer=llama3_tokenizer)
    boundary = [f for f in result.findings if f.rule == "R006"]
    assert boundary and all(f.severity == "warning" for f in boundary)
    assert result.ok  # a warning doesn't fail lint
    assert "inside token" in boundary[0].message


def test_no_boundary_warning_when_eot_is_one_token(qwen_tokenizer):
    result = lint(GOOD, "good", tokenizer=qwen_tokenizer)
    assert not [f for f in result.findings if f.rule == "R006"]


def test_probe_texts_are_unique_within_each_probe():
    for probe in VERIFICATION_PROBES:
        texts = [m[key] for m in probe.messages for key in ("content", "reasoning_content", "thinking") if m.get(key)]
        assert len(texts) == len(set(texts)), probe.name


def test_allow_pragma_keeps_the_finding_visible_as_info():
    source = (FIXTURES / "R004_prompt_mismatch.jinja").read_text()
    allowed = "{# sft-toolkit: allow R004 (this format moves its header by design) #}" + source
    result = lint(allowed, "t")
    assert result.ok
    (finding,) = [f for f in result.findings if f.rule == "R004"]
    assert finding.severity == "info" and "by design" in finding.message


@pytest.mark.parametrize(
    "test, severity",
    [
        ("message.role == 'tool'", "error"),  # selects tool turns: would train tool text
        ("message.role != 'tool'", "warning"),  # selects every role but tool: not an S004 error
        ("not message.role == 'tool'", "warning"),
        ("message.role == 'tool' or message.tool_calls", "warning"),  # not only about the role
    ],
)
def test_s004_reads_negated_and_mixed_role_conditions(test, severity):
    source = (
        "{% for message in messages %}{% if " + test + " %}{% generation %}{{ message.content }}"
        "{% endgeneration %}{% else %}{{ message.content }}{% endif %}{% endfor %}"
    )
    s004 = [f for f in lint(source, "t").findings if f.rule == "S004"]
    assert [f.severity for f in s004] == [severity]


def _chatml_with_prefill(assistant: str) -> str:
    """ChatML whose generation prompt pre-fills an empty think block, as qwen3.5's no-think template does."""
    return (
        "{%- for m in messages %}{%- if m.role == 'assistant' %}"
        + assistant
        + "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    )


@pytest.mark.parametrize(
    "assistant,ok",
    [
        # the pre-filled think block trained, as TRL's training templates do
        (
            "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ '<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>' }}"
            "{% endgeneration %}{{ '\\n' }}",
            True,
        ),
        # or left to the prompt
        (
            "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% generation %}{{ m.content + '<|im_end|>' }}"
            "{% endgeneration %}{{ '\\n' }}",
            True,
        ),
        # the role header's newline is still the prompt's, not the assistant's
        (
            "{{ '<|im_start|>assistant' }}{% generation %}{{ '\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>' }}"
            "{% endgeneration %}{{ '\\n' }}",
            False,
        ),
    ],
)
def test_prefill_after_the_role_header_may_be_trained_or_not(assistant, ok):
    found = rules(_chatml_with_prefill(assistant))
    assert ("R002" not in found) == ok, found.get("R002")
    if not ok:
        assert "role header '<|im_start|>assistant\\n'" in found["R002"][0].message


def _inline_tool_responses(tool_block: str) -> str:
    """A gemma4-like format: tool responses are written inside the model's turn, which ends with <end> only
    after its final answer; a turn that only calls tools has no end-of-turn text of its own."""
    return (
        "{%- for m in messages %}"
        "{%- if m.role == 'user' %}{{ '<user>' + m.content + '<end>\\n' }}"
        "{%- elif m.role == 'assistant' %}"
        "{%- if not (loop.previtem and loop.previtem.role == 'tool') %}{{ '<model>' }}{% endif %}"
        "{%- generation %}{%- for c in m.tool_calls or [] %}{{ '<call>' + c.function.name + '</call>' }}{% endfor %}"
        "{%- if not m.tool_calls %}{{ m.content + '<end>' }}{% endif %}{%- endgeneration %}"
        "{%- if not m.tool_calls %}{{ '\\n' }}{% endif %}"
        "{%- elif m.role == 'tool' %}" + tool_block + "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt and messages[-1].role != 'tool' %}{{ '<model>' }}{% endif %}"
    )


def test_tool_response_inside_the_model_turn_is_not_assistant_output():
    """The turn that calls a tool ends before the tool's answer, even though its end-of-turn text comes later."""
    good = rules(_inline_tool_responses("{{ '<response>' + m.content + '</response>' }}"))
    assert not {"R001", "R002", "R003"} & set(good), good
    bad = rules(
        _inline_tool_responses("{% generation %}{{ '<response>' + m.content + '</response>' }}{% endgeneration %}")
    )
    assert "R002" in bad and "temperature_c" in bad["R002"][0].message


GLM_LIKE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{ '<|user|>\\n' + m.content }}"
    "{%- elif m.role == 'assistant' %}{{ '<|assistant|>' }}{% generation %}{{ '\\n' + m.content }}"
    "{%- for c in m.tool_calls or [] %}{{ '<tool_call>' + c.function.name + '</tool_call>' }}{% endfor %}"
    "{% endgeneration %}"
    "{%- elif m.role == 'tool' %}{{ '<|observation|>\\n' + m.content }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_template_without_end_of_turn_text_is_an_error_and_its_tool_calls_may_be_trained():
    """GLM-4 writes nothing after an assistant's content: the next role tag ends the turn. Its tool calls are
    still the assistant's (the turn ends where the conversation cut after it ends), but no stop token is
    trained on any probe: the model never learns to stop, an error."""
    found = rules(GLM_LIKE)
    assert not {"R001", "R002"} & set(found), found
    (error,) = found["R003"]
    assert error.severity == "error" and "never learns to stop" in error.message
    assert not lint(GLM_LIKE, "t").ok


def test_missing_stop_accepted_by_the_template_with_a_reason_passes_and_stays_visible():
    allowed = "{# sft-toolkit: allow R003 (the next role tag ends the turn) #}" + GLM_LIKE
    result = lint(allowed, "t")
    assert result.ok
    (info,) = [f for f in result.findings if f.rule == "R003"]
    assert info.severity == "info" and "the next role tag ends the turn" in info.message


def test_end_of_turn_skipped_after_the_last_turn_is_still_required_on_the_others():
    """A template that writes <|im_end|> after every message but the conversation's last: the end-of-turn is
    found where a user message follows, and leaving it untrained there is R003 (not the no-end-of-turn
    warning)."""
    source = (
        "{%- for m in messages -%}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{%- else %}{{ m.content }}{%- endif %}"
        "{%- if not (loop.last and m.role == 'assistant') %}{{ '<|im_end|>\\n' }}{% endif %}{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    found = rules(source)
    assert [f.severity for f in found["R003"]] == ["error"] and "'<|im_end|>'" in found["R003"][0].message


def test_tool_result_printed_with_tojson_is_not_part_of_the_turn_before_it():
    """The next message's text is also found JSON-escaped, so a turn can't reach over a tool result."""
    source = (
        "{%- for m in messages -%}"
        "{%- if m.role == 'assistant' %}{{ '<|assistant|>\\n' }}{% generation %}"
        "{%- for c in m.tool_calls or [] %}{{ '<call>' + c.function.name + '</call>' }}{% endfor %}"
        "{{ m.content }}{% endgeneration %}"
        "{%- elif m.role == 'tool' %}{% generation %}{{ '<|tool|>\\n' + m.content | tojson }}{% endgeneration %}"
        "{%- else %}{{ '<|' + m.role + '|>\\n' + m.content }}{%- endif %}{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    found = rules(source)
    assert "R002" in found and "temperature_c" in found["R002"][0].message


# A template that leaves assistant turns unmarked when the caller switches thinking off.
SWITCHED = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' %}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ m.content + '<|im_end|>' }}"
    "{%- else %}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{%- endif %}{{ '\\n' }}"
    "{%- else %}{{ m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_switches_are_the_boolean_variables_a_template_reads_from_its_context():
    from sft_toolkit.lint import template_switches

    source = (
        "{%- set keep = keep | default(false) %}{%- set mode = 'x' %}"
        "{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}"
        "{%- for m in messages %}{% if m.role == 'assistant' and enable_thinking == false %}x{% endif %}"
        "{% if keep and tools_in_user_message %}{{ date_string }}{% endif %}{% endfor %}"
        "{% if custom_tools %}{% for t in custom_tools %}{{ t }}{% endfor %}{% endif %}{% if mode %}{% endif %}"
    )
    assert template_switches(source) == ["keep", "tools_in_user_message", "enable_thinking"]
    assert template_switches((TRL_TEMPLATES / "qwen3.jinja").read_text()) == ["enable_thinking"]


def test_lint_probes_each_switch_both_ways_and_names_the_setting_that_shows_a_finding():
    result = lint(SWITCHED, "t")
    assert not result.ok
    (finding,) = [f for f in result.findings if f.rule == "R001"]
    assert finding.message.endswith("with enable_thinking=false]")


def test_lint_kwargs_render_every_probe_with_them(tmp_path, capsys):
    from sft_toolkit.cli import main

    path = tmp_path / "switched.jinja"
    path.write_text(SWITCHED)
    (finding,) = [
        f for f in lint(SWITCHED, "t", template_kwargs={"enable_thinking": False}).findings if f.rule == "R001"
    ]
    assert "with enable_thinking" not in finding.message  # every probe rendered with it: no other setting
    assert lint(GOOD, "t", template_kwargs={"enable_thinking": False}).ok
    assert main(["lint", str(path), "--kwargs", '{"enable_thinking": false}', "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["results"][0]["ok"] is False
    assert main(["lint", str(path), "--kwargs", "[1]"]) == 2
    assert "--kwargs" in capsys.readouterr().err
