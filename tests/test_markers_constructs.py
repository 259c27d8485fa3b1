"""Constructs of real templates that add-markers converts, each in a small template written for this test.

Every template here reproduces one construct seen in official chat templates (not copied from any): it must
convert, render byte-identically to the original on every conversation of the independent check in
`test_markers_safety`, and train exactly each assistant message's output there (content, tool calls, the
end-of-turn after the last answer) and none of the other messages' text.
"""

from __future__ import annotations

import pytest
from helpers.independent_check import check_conversion, render_as

from sft_toolkit.markers import MarkerError, add_markers, verify_placement


def assert_converts_right(original: str) -> str:
    """The converted template, after checking it renders like `original` and trains exactly the assistant's
    output on every conversation of the independent check the original renders."""
    marked = add_markers(original).source
    problems, checked = check_conversion(original, marked)
    assert not problems, problems
    assert checked >= 10, f"only {checked} conversations rendered"
    return marked


CHATML_LOOP = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_comments_after_the_last_statement_are_skipped():
    # A licence line after `endfor` (unsloth's templates end this way) is no tag the parse must match.
    marked = assert_converts_right(CHATML_LOOP + "\n{#- Licensed under the Apache License, Version 2.0 #}")
    assert marked.endswith("{#- Licensed under the Apache License, Version 2.0 #}")


def test_a_plus_chain_with_a_markup_operand_is_traced_whole():
    # `"..."|safe + value` is Markup: `+` escapes the other operand (the tool's JSON prints as `&#34;`), so the
    # operands' own texts are not what the expression prints; the chain is kept whole, not split.
    tools_prompt = (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}"
        "{{- 'Use the function '|safe + tool.function.name + ':\\n'|safe + tool.function | tojson }}"
        "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    )
    assert_converts_right(tools_prompt + CHATML_LOOP)


def test_a_refusal_inside_a_statement_names_the_code_that_defeated_it():
    # The conversation loop sits inside an `if` that starts on line 1 and also prints a BOS: the refusal names
    # the line inside that can't be marked and why, not the `if` around it (which the role can't condition).
    source = (
        "{% if messages %}<s>\n{% for m in messages %}"
        "{% set text = '<' + m.role + '>' + m.content + '</s>\\n[' + m.role + ']' %}\n"
        "{{ text }}{% endfor %}{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(MarkerError) as err:
        add_markers(source)
    assert err.value.line == 3
    assert "`text`" in str(err.value)


# command-r's format: a closing system instruction printed after the conversation, glued to the last turn's
# end-of-turn; tool calls with no end-of-turn of their own (the next message's header ends them).
CLOSING_INSTRUCTION = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}{{- '<|START|><|BOT|>Action:' }}"
    "{%- for call in message.tool_calls %}{{- ' ' + call.function.name + ' ' + call.function.arguments|tojson }}"
    "{%- endfor %}{{- '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|START|><|BOT|>' + message.content + '<|END|>' }}"
    "{%- elif message.role == 'tool' %}{{- '<|START|><|SYSTEM|><results>' + message.content + '</results><|END|>' }}"
    "{%- else %}{{- '<|START|><|' + message.role|upper + '|>' + message.content + '<|END|>' }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|START|><|SYSTEM|>Answer the last question.<|END|>' }}"
    "{%- if add_generation_prompt %}{{- '<|START|><|BOT|>' }}{%- endif %}"
)


def test_text_written_after_the_whole_conversation_is_not_the_last_turns_end():
    # The end-of-turn is what follows an answer also when the conversation goes on (`<|END|>`, not
    # `<|END|><|START|><|SYSTEM|>Answer`), and a conversation ending in a tool call ends where the closing
    # instruction starts: the instruction stays untrained, the answers' `<|END|>` is trained.
    marked = assert_converts_right(CLOSING_INSTRUCTION)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, trained = render_as(marked, messages, keep_none=False)
    trained_text = "".join(c for c, flag in zip(text, trained) if flag)
    assert trained_text.endswith("Hello<|END|>")
    assert "Answer the last question" not in trained_text


# hermes' tool format: a tool result closes one way when it is the last message (what the generation prompt
# follows) and another when a message follows it (what training renders), so prompt and training part inside
# the tool's text; the tool-call turn's header has no newline of its own (each call starts with one).
TOOL_RESULT_CLOSED_TWO_WAYS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}{{- '<|im_start|>tool\\n<tool_response>\\n' + message.content }}"
    "{%- if loop.last %}{{- '\\n</tool_response>' }}{%- else %}{{- '\\n</tool_response>\\n' }}{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}{{- '<|im_start|>assistant' }}"
    "{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>\\n' + call.function.name + ' ' + call.function.arguments|tojson + '\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_turn_starts_after_the_prompts_header_when_prompt_and_training_part_before_it():
    # After a tool result, training writes `\n</tool_response>\n<|im_end|><|im_start|>assistant\n` where the
    # prompt writes `\n</tool_response><|im_end|><|im_start|>assistant\n`: the turn begins after the header
    # both write, so the tool's closing markup stays untrained and the tool calls after it are trained.
    marked = assert_converts_right(TOOL_RESULT_CLOSED_TWO_WAYS)
    messages = [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [weather_call("Oslo")]},
        {"role": "tool", "content": "4 C"},
        {"role": "assistant", "content": "", "tool_calls": [weather_call("Rome")]},
        {"role": "tool", "content": "21 C"},
        {"role": "assistant", "content": "Cold and warm."},
    ]
    text, trained = render_as(marked, messages, keep_none=False)
    trained_text = "".join(c if flag else "\0" for c, flag in zip(text, trained))
    assert '<tool_call>\nget_weather {"city": "Rome"}\n</tool_call><|im_end|>' in trained_text
    assert "</tool_response>" not in trained_text


def weather_call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def end_of_turn_in_the_next_pass(turn: str) -> str:
    """jamba's layout: each pass prints the previous message's `<|eom|>` before its own turn, and the last one
    is printed after the loop; `turn` prints a message's header and text."""
    return (
        "{%- set ns = namespace(count=0) %}{%- set chat = messages %}"
        "{%- for message in chat %}"
        "{%- if ns.count > 0 %}{{- '<|eom|>' }}{%- endif %}" + turn + "{%- set ns.count = ns.count + 1 %}"
        "{%- endfor %}"
        "{%- if ns.count > 0 %}{{- '<|eom|>' }}{%- endif %}"
        "{%- if add_generation_prompt %}{{- '<|bom|><|assistant|>' }}{%- endif %}"
    )


def test_an_end_of_turn_printed_in_the_next_messages_pass_is_conditioned_on_the_previous_role():
    # The same `<|eom|>` ends an assistant's turn and a user's: it is trained where the previous message (in
    # the loop: `loop.previtem`; after it: the list's last) is the assistant's, and nowhere else.
    marked = assert_converts_right(
        end_of_turn_in_the_next_pass("{{- '<|bom|><|' + message.role + '|> ' + message.content }}")
    )
    assert "loop.previtem.role == 'assistant'" in marked
    assert "(chat|last).role == 'assistant'" in marked
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
    text, trained = render_as(marked, messages, keep_none=False)
    runs = "".join(c if flag else "\0" for c, flag in zip(text, trained)).split("\0")
    assert [run for run in runs if run] == [" Hello<|eom|>", " See you<|eom|>"]


def test_a_variable_operand_is_split_after_the_role_header_it_ends_with():
    # `'<|bom|>' + prefix + content` where `prefix` is `<|assistant|> ` and the prompt writes `<|assistant|>`:
    # the space is the model's, so the operand is split where the header ends.
    turn = "{%- set prefix = '<|' + message.role + '|> ' %}{{- '<|bom|>' + prefix + message.content }}"
    marked = assert_converts_right(end_of_turn_in_the_next_pass(turn))
    assert "prefix[:prefix.find('<|assistant|>') + 13]" in marked


def test_marking_an_end_of_turn_in_the_next_pass_for_every_role_is_refused():
    # The placement the previous-role condition avoids: `<|eom|>` marked in every pass trains the user's.
    original = end_of_turn_in_the_next_pass("{{- '<|bom|><|' + message.role + '|> ' + message.content }}")
    wrong = original.replace(
        "{%- if ns.count > 0 %}{{- '<|eom|>' }}{%- endif %}",
        "{%- if ns.count > 0 %}{%- generation %}{{- '<|eom|>' }}{%- endgeneration %}{%- endif %}",
    )
    assert wrong != original
    assert verify_placement(original, wrong)


# command-a's layout: the assistant's header is printed after the conversation whatever add_generation_prompt
# says (the prompt only adds `<|RESPONSE|>`), every end-of-turn is glued to the next header's `<|START|>`, and
# a tool-call turn ends in `<|END_ACTION|><|END|>`, not the answer's `<|END_RESPONSE|><|END|>`; results of
# parallel calls share one turn, opened only after the tool-call turn.
HEADER_PRINTED_ALWAYS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|START|><|BOT|><|ACTION|>"
    "{%- for call in message.tool_calls %}{{ call.function.name }} {{ call.function.arguments|tojson }}{% endfor %}"
    "<|END_ACTION|><|END|>"
    "{%- elif message.role == 'assistant' %}<|START|><|BOT|><|RESPONSE|>{{ message.content }}<|END_RESPONSE|><|END|>"
    "{%- elif message.role == 'tool' and loop.previtem.role != 'tool' %}<|START|><|SYSTEM|><|RESULT|>"
    "{{- message.content }}<|END_RESULT|>"
    "{%- elif message.role == 'tool' %}<|RESULT|>{{ message.content }}<|END_RESULT|>"
    "{%- else %}<|START|><|{{ message.role|upper }}|>{{ message.content }}<|END|>"
    "{%- endif %}"
    "{%- if message.role == 'tool' and (loop.last or loop.nextitem.role != 'tool') %}<|END|>{%- endif %}"
    "{%- endfor %}<|START|><|BOT|>{%- if add_generation_prompt %}<|RESPONSE|>{%- endif %}"
)


def test_an_end_of_turn_stops_before_the_header_printed_after_the_conversation():
    # The answer's end-of-turn is `<|END_RESPONSE|><|END|>`: the `<|START|>` after it begins the header the
    # template prints after the conversation and before each message, and is never trained (nor in the tool's
    # code, where a tool-call turn without that end-of-turn ends).
    marked = assert_converts_right(HEADER_PRINTED_ALWAYS)
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [weather_call("Oslo")]},
        {"role": "tool", "content": "4 C"},
        {"role": "assistant", "content": "Cold."},
    ]
    text, trained = render_as(marked, messages, keep_none=False)
    runs = "".join(c if flag else "\0" for c, flag in zip(text, trained)).split("\0")
    assert [run for run in runs if run] == [
        '<|ACTION|>get_weather {"city": "Oslo"}<|END_ACTION|><|END|>',
        "Cold.<|END_RESPONSE|><|END|>",
    ]


def test_a_conversation_printed_whole_from_one_variable_is_refused_with_what_to_write():
    # (Under `shout=true` its output comes from a filter block and can't be traced at all; the refusal names
    # what defeats the template's defaults, which says more.)
    source = (
        "{%- if shout %}{% filter upper %}{{ 'hey' }}{% endfilter %}{% endif %}{%- set ns = namespace(out='') %}{%- for message in messages %}"
        "{%- set ns.out = ns.out ~ '<|' ~ message.role ~ '|>' ~ message.content ~ '<|end|>' %}"
        "{%- endfor %}{%- if add_generation_prompt %}{%- set ns.out = ns.out ~ '<|assistant|>' %}{%- endif %}\n"
        "{{- ns.out }}"
    )
    with pytest.raises(MarkerError) as err:
        add_markers(source)
    assert err.value.line == 2
    assert "assembled in `ns.out`" in str(err.value)
    assert "print each message's text where it is built" in str(err.value)
