"""check-data's content coverage (sft_toolkit/coverage.py) agrees with a plain character-level check on TRL's
own training templates, for rows written with string content and with content parts; and content parts reach
the templates that iterate them, trained exactly as transformers' own assistant mask says."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import trl
from datasets import Dataset
from transformers.utils.chat_template_utils import render_jinja_template

from sft_toolkit import preprocess
from sft_toolkit.tokenizer import load_tokenizer

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
TRAINING_TEMPLATES = sorted(TRL_TEMPLATES.glob("*_training.jinja"))
TOKENIZER = Path(__file__).parent / "bad_inputs" / "tokenizer"
SFT = types.SimpleNamespace(
    assistant_only_loss=True, dataset_num_proc=None, chat_template_path="trl", dataset_text_field="text"
)

# Every text unique and long enough not to occur in any template's markup.
CONVERSATION = [
    {"role": "system", "content": "Answer like a sailor, matey."},
    {"role": "user", "content": "How deep is the harbour basin?"},
    {"role": "assistant", "content": "Forty fathoms at the north quay."},
    {"role": "user", "content": "And at the southern breakwater?"},
    {"role": "assistant", "content": "Barely twelve fathoms near the lighthouse."},
]
ROWS = [CONVERSATION, CONVERSATION[1:]]


def as_parts(messages):
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = load_tokenizer(str(TOKENIZER))
    tokenizer.bos_token = "<|endoftext|>"  # several templates start with bos_token
    return tokenizer


def check_data_rows(tokenizer, template: str, rows: list[list[dict]]) -> list[dict]:
    """What check-data computes for each row: its zero-mask reason and its coverage problem."""
    tokenized = preprocess.tokenize(Dataset.from_list([{"messages": r} for r in rows]), tokenizer, template, SFT)
    return [
        {
            "reason": r["reason"],
            "coverage": r["coverage_reason"],
            "message": r["coverage_message"],
            "labels": r["labels"],
            "input_ids": r["input_ids"],
        }
        for r in tokenized
    ]


def text_of(content) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def independent_check(template: str, messages: list[dict], variables: dict) -> tuple[bool, int | None]:
    """The row is fit when it renders, as given or with its parts joined into strings, with every character of
    each assistant message's text trained and no character of another message's text trained. Otherwise the
    first offending message of the row as given (None when it doesn't render)."""
    joined = [{**m, "content": text_of(m["content"])} for m in messages]
    first = None
    for shape in (messages, joined):
        try:
            texts, spans = render_jinja_template(
                conversations=[shape], chat_template=template, return_assistant_tokens_mask=True, **variables
            )
        except Exception:  # noqa: BLE001 - any failure: this shape can't be trained
            continue
        text, trained = texts[0], set()
        for start, end in spans[0]:
            trained.update(range(start, end))
        bad = None
        for i, message in enumerate(messages):
            content, assistant = text_of(message["content"]), message["role"] == "assistant"
            at = text.find(content)
            chars = set(range(at, at + len(content)))
            if (assistant and (at < 0 or not chars <= trained)) or (not assistant and at >= 0 and chars & trained):
                bad = i
                break
        if bad is None:
            return True, None
        first = bad if first is None else first
    return False, first


def test_all_trl_training_templates_are_checked():
    assert len(TRAINING_TEMPLATES) == 31


@pytest.mark.parametrize("path", TRAINING_TEMPLATES, ids=lambda p: p.stem)
def test_coverage_agrees_with_an_independent_character_check(tokenizer, path):
    template = path.read_text()
    variables = dict(tokenizer.special_tokens_map)
    for shape in (lambda m: m, as_parts):
        rows = [shape(r) for r in ROWS]
        for row, found in zip(rows, check_data_rows(tokenizer, template, rows)):
            fit, first = independent_check(template, row, variables)
            passes = not found["reason"] and not found["coverage"]
            assert passes == fit, (path.stem, row[0]["content"], found["reason"], found["coverage"], first)
            if found["coverage"]:
                assert found["message"] == first
            if passes:  # never only markup: the assistant's texts are among the trained tokens
                trained = tokenizer.decode(
                    [t for t, label in zip(found["input_ids"], found["labels"]) if label != -100]
                )
                assert all(text_of(m["content"]) in trained for m in row if m["role"] == "assistant")


@pytest.mark.parametrize("name", ["smolvlm_training", "idefics3_training", "llava_next_training"])
def test_vision_templates_train_content_parts_as_transformers_masks_them(tokenizer, name):
    """Rows with content parts go to the template as parts: the labels are transformers' own assistant mask."""
    template = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    rows = [as_parts(r) for r in ROWS]
    for row, found in zip(rows, check_data_rows(tokenizer, template, rows)):
        expected = tokenizer.apply_chat_template(
            row, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert found["input_ids"] == list(expected["input_ids"])
        assert [label != -100 for label in found["labels"]] == [bool(m) for m in expected["assistant_masks"]]
        assert not found["coverage"] and not found["reason"]


@pytest.mark.parametrize("name", ["smolvlm_training", "idefics3_training"])
def test_string_content_on_a_parts_template_is_caught_as_markup_only(tokenizer, name):
    template = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    (found,) = check_data_rows(tokenizer, template, [CONVERSATION[1:]])
    assert found["coverage"] == "assistant_content_untrained" and found["message"] == 1
    assert any(label != -100 for label in found["labels"])  # not a zero-mask row: only the end marker trains


# ------------------------------------------------------------------------- what a message's text is, in a render


def problems_of(template: str, messages: list[dict], tools=None, trained=None):
    from sft_toolkit.coverage import coverage_problems
    from sft_toolkit.masks import render

    rendered = render(template, messages, tools=tools)
    return [(p.reason, p.message) for p in coverage_problems(rendered.text, rendered.spans, messages, trained)]


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Reykjavik"}}}
TOOL_ROUND = [
    {"role": "user", "content": "Weather in Reykjavik?"},
    {"role": "assistant", "content": "Let me look that up.", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temperature_c": -3}'},
    {"role": "assistant", "content": "It is -3 degrees in Reykjavik."},
]


def calls_template(calls_trained: bool, content_beside_calls: bool = True) -> str:
    calls = (
        "{%- for c in m.tool_calls or [] %}{{ '<call>' + c.function.name + ' ' + c.function.arguments | tojson"
        " + '</call>' }}{%- endfor %}"
    )
    content = "{{ m.content }}" if content_beside_calls else "{% if not m.tool_calls %}{{ m.content }}{% endif %}"
    body = (
        f"{{% generation %}}{content}{calls}{{{{ '<|im_end|>' }}}}{{% endgeneration %}}"
        if calls_trained
        else f"{{% generation %}}{content}{{% endgeneration %}}{calls}{{{{ '<|im_end|>' }}}}"
    )
    return (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' %}"
        + body
        + "{%- else %}{{ m.content + '<|im_end|>' }}{%- endif %}{{ '\\n' }}{%- endfor %}"
    )


def test_tool_calls_are_assistant_text_that_must_be_trained():
    assert problems_of(calls_template(calls_trained=True), TOOL_ROUND) == []
    assert problems_of(calls_template(calls_trained=False), TOOL_ROUND) == [("assistant_content_untrained", 1)]


def test_a_text_the_template_drops_is_not_a_failure_but_a_row_trained_only_on_markup_is():
    """llama 3.1 writes a turn's tool calls without its content: that text is not in the render, so the check
    can't fault the mask for it. A row where no assistant text shows at all trains only markup."""
    assert problems_of(calls_template(calls_trained=True, content_beside_calls=False), TOOL_ROUND) == []
    markup_only = (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' %}"
        "{% generation %}{{ '<|im_end|>' }}{% endgeneration %}{%- else %}{{ m.content + '<|im_end|>' }}"
        "{%- endif %}{{ '\\n' }}{%- endfor %}"
    )
    assert problems_of(markup_only, TOOL_ROUND[:1] + [{"role": "assistant", "content": "Hello."}]) == [
        ("assistant_content_untrained", 1)
    ]


def test_text_found_trimmed_json_escaped_and_after_reasoning_the_template_drops():
    template = (
        "{%- for m in messages %}{{ '<|' + m.role + '|>' }}{%- if m.role == 'assistant' %}{% generation %}"
        "{{ (m.content.split('</think>')[-1] | trim | tojson)[1:-1] }}{{ '<|end|>' }}{% endgeneration %}"
        "{%- else %}{{ m.content | trim }}{%- endif %}{%- endfor %}"
    )
    messages = [
        {"role": "user", "content": '  Quote me "this"  \n'},
        {"role": "assistant", "content": '<think>drop me</think>\nHe said "yes"\non two lines. '},
    ]
    assert problems_of(template, messages) == []


def test_a_switched_off_turn_is_exempt_and_user_text_quoted_by_the_answer_is_not_blamed():
    template = calls_template(calls_trained=True)
    assert problems_of(template, TOOL_ROUND, trained={3}) == []
    echo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say: be brief."},
        {"role": "assistant", "content": "Be brief."},
    ]
    no_system = template.replace("{%- for m in messages %}", "{%- for m in messages if m.role != 'system' %}")
    assert problems_of(no_system, echo) == []


def test_an_answer_of_empty_text_parts_is_an_empty_answer(tokenizer):
    template = (TRL_TEMPLATES / "smolvlm_training.jinja").read_text()
    row = as_parts([{"role": "user", "content": "Say nothing at all."}, {"role": "assistant", "content": ""}])
    (found,) = check_data_rows(tokenizer, template, [row])
    assert found["reason"] == "empty_assistant_content"
