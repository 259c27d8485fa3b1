"""add-markers' techniques for constructs real templates use, each on a small template written here.

Each template reproduces one construct that add-markers refused (or verified wrong) before the technique:
the converted template must render byte-identically to the original and train exactly the assistant's
output on every conversation of the independent check (`tests/helpers/independent_check.py`), and a wrong
placement of the same template must still be refused by verification.

- a `+` chain cut at a lone operand that may be undefined (a message without `content`) keeps failing
  where the whole chain failed (boundaries);
- code that prints the model's text after a tool result and text the prompt gives after a user message is
  duplicated under the previous message's role; an empty message printed after a tool-call turn has ended,
  under whether the message has text (conditions);
- a `{{ macro(...) }}` that prints a whole turn, header included, is split after the header (boundaries);
- tool calls printed as a message of their own after the content's end-of-turn belong to the turn (turns);
- a role header the prompt gives after an end-of-turn the training text leaves out stays given (turns);
- an end-of-turn written right before the next user's header, without whitespace, is found (turns);
- a role header the prompt writes after a user message, written by the message's code after a tool result,
  may stay untrained (label).
"""

from __future__ import annotations

import pytest
from helpers.independent_check import check_conversion, render_as

from sft_toolkit.markers import add_markers, verify_placement
from sft_toolkit.masks import render
from sft_toolkit.problems import InputError

USER_AND_TOOL = (
    "{%- if message.role == 'user' -%}<|user|>{{ message.content }}<|end|>"
    "{%- elif message.role == 'tool' -%}<|tool|>{{ message.content }}<|end|>"
    "{%- elif message.role == 'system' -%}<|system|>{{ message.content }}<|end|>"
)
CALLS = "{%- for call in message.tool_calls or [] -%}<call>{{ call.function.name }} {{ call.function.arguments | tojson }}</call>{%- endfor -%}"


def loop(body: str, prompt: str) -> str:
    return "{%- for message in messages -%}" + USER_AND_TOOL + body + "{%- endif -%}{%- endfor -%}" + prompt


TEMPLATES = {
    # The assistant's text is `set` from the message and printed after its header in one `+` chain.
    "undefined-operand": loop(
        "{%- else -%}{%- set content = message.content -%}"
        "{{- '<|assistant|>' + content }}" + CALLS + "{{- '<|end|>' }}",
        "{%- if add_generation_prompt %}<|assistant|>{% endif -%}",
    ),
    # The prompt gives an empty reasoning block after a user message and nothing after a tool result, where
    # the model goes on with its turn: the same `<think>` is given in one place and written in the other (the
    # header names the role otherwise than the user's, so all the prompt writes counts as given: gemma).
    "previous-role": loop(
        "{%- else -%}{%- if loop.first or loop.previtem.role != 'tool' %}<|model|>{% endif -%}"
        "{%- if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif -%}"
        "{{ message.content }}" + CALLS + "<|end|>",
        "{%- if add_generation_prompt and messages[-1].role != 'tool' %}<|model|><think></think>{% endif -%}",
    ),
    # Tool calls end the turn; text beside them is printed after it as a second header, and an empty one too.
    "message-has-text": loop(
        "{%- else -%}{%- if message.tool_calls -%}<|assistant|>" + CALLS + "<|end|>{%- endif -%}"
        "{%- if message.content is not none -%}<|assistant|>{{ message.content }}<|end|>{%- endif -%}",
        "{%- if add_generation_prompt %}<|assistant|>{% endif -%}",
    ),
    # A macro prints the whole turn, header included.
    "macro-turn": "{%- macro turn(role, text) -%}<|{{ role }}|>{{ text }}<|end|>{%- endmacro -%}"
    + loop(
        "{%- else -%}{{- turn('assistant', message.content) -}}" + CALLS,
        "{%- if add_generation_prompt %}<|assistant|>{% endif -%}",
    ),
    # The calls are a message of their own, after the content's end-of-turn.
    "calls-after-end": loop(
        "{%- else -%}<|assistant|>{{ message.content }}<|end|>"
        "{%- if message.tool_calls %}<|function call|>" + CALLS + "<|end|>{% endif -%}",
        "{%- if add_generation_prompt %}<|assistant|>{% endif -%}",
    ),
    # A run of tool results ends with `<|end|>` only at the end of the conversation: before an assistant
    # message training writes its header right after the result, where the prompt writes `<|end|><|assistant|>`.
    "missing-end-of-turn": "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}<|user|>{{ message.content }}<|end|>"
    "{%- elif message.role == 'tool' -%}<|tool|>{{ message.content }}{% if loop.last %}<|end|>{% endif -%}"
    "{%- elif message.role == 'system' -%}<|system|>{{ message.content }}<|end|>"
    "{%- else -%}<|assistant|>{{ message.content }}" + CALLS + "<|end|>"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt %}<|assistant|>{% endif -%}",
    # The end-of-turn is glued to the next user's header, and the last answer (as at inference) has none.
    "glued-end-of-turn": "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}<|user|>{{ message.content }}"
    "{%- elif message.role == 'tool' -%}<|tool|>{{ message.content }}"
    "{%- elif message.role == 'system' -%}<|system|>{{ message.content }}"
    "{%- else -%}<|assistant|>{{ message.content }}" + CALLS + "{% if not loop.last %}<|eos|>{% endif %}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt %}<|assistant|>{% endif -%}",
    # After tool results the prompt writes nothing; the message's code writes the header all the same.
    "header-after-tool": loop(
        "{%- else -%}<|assistant|>{{ message.content }}" + CALLS + "<|end|>",
        "{%- if add_generation_prompt and messages[-1].role != 'tool' %}<|assistant|>{% endif -%}",
    ),
}


def independent_check(original: str, marked: str) -> int:
    """Render both on the independent check's conversations: byte-identical, and exactly the assistant's
    output trained. Returns how many conversations were compared."""
    problems, checked = check_conversion(original, marked)
    assert not problems, problems
    return checked


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_construct_converts_renders_identically_and_trains_exactly_the_assistant_output(name):
    original = TEMPLATES[name]
    marked = add_markers(original).source
    assert independent_check(original, marked) >= 10


def test_a_cut_chain_still_fails_on_a_message_without_content():
    original = TEMPLATES["undefined-operand"]
    marked = add_markers(original).source
    assert "'' +" in marked
    without_content = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
    ]
    for template in (original, marked):
        with pytest.raises(InputError):
            render(template, without_content)


def test_the_previous_role_condition_is_kept_in_a_variable_set_at_each_pass():
    marked = add_markers(TEMPLATES["previous-role"]).source
    assert "sft_toolkit_after_tool = (loop.previtem or {}).role == 'tool'" in marked
    assert "if sft_toolkit_after_tool" in marked


def test_an_empty_message_after_the_calls_is_conditioned_on_the_message_having_text():
    marked = add_markers(TEMPLATES["message-has-text"]).source
    assert "if message.content" in marked


def test_the_macro_output_is_split_after_the_header():
    marked = add_markers(TEMPLATES["macro-turn"]).source
    assert "set sft_toolkit_text = turn('assistant', message.content)" in marked


@pytest.mark.parametrize("name", ["missing-end-of-turn", "header-after-tool"])
def test_a_header_the_prompt_gives_elsewhere_stays_untrained(name):
    marked = add_markers(TEMPLATES[name]).source
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [_call()]},
        {"role": "tool", "content": "4 C"},
        {"role": "assistant", "content": "It is 4 C."},
    ]
    text, trained = render_as(marked, messages, keep_none=False)
    header = text.rindex("<|assistant|>")
    assert not any(trained[header : header + len("<|assistant|>")])
    assert all(trained[text.index("It is 4 C.") : text.index("It is 4 C.") + len("It is 4 C.<|end|>")])


WRONG = {
    # `<think>` trained after a user message too, where the prompt gives it
    "previous-role": loop(
        "{%- else -%}{%- if loop.first or loop.previtem.role != 'tool' %}<|model|>{% endif -%}{% generation %}"
        "{%- if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif -%}"
        "{{ message.content }}" + CALLS + "<|end|>"
        "{% endgeneration %}",
        "{%- if add_generation_prompt and messages[-1].role != 'tool' %}<|model|><think></think>{% endif -%}",
    ),
    # the `<|assistant|><|end|>` an empty message prints after the calls' end-of-turn trained
    "message-has-text": loop(
        "{%- else -%}{%- if message.tool_calls -%}<|assistant|>{% generation %}" + CALLS + "<|end|>"
        "{% endgeneration %}{%- endif -%}"
        "{%- if message.content is not none -%}{% generation %}<|assistant|>{{ message.content }}<|end|>"
        "{% endgeneration %}{%- endif -%}",
        "{%- if add_generation_prompt %}<|assistant|>{% endif -%}",
    ),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_verification_refuses_the_placement_the_condition_avoids(name):
    assert verify_placement(TEMPLATES[name], WRONG[name])


def _call() -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}


def test_an_end_of_turn_glued_to_the_next_header_is_trained():
    marked = add_markers(TEMPLATES["glued-end-of-turn"]).source
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    text, trained = render_as(marked, messages, keep_none=False)
    end = text.index("Hello.<|eos|>") + len("Hello.")
    assert all(trained[end : end + len("<|eos|>")])
    assert not any(trained[end + len("<|eos|>") : text.index("Bye")])
