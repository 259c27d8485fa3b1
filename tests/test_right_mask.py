"""check-data proves the right mask, not only a non-empty one: for prompt/completion rows the trained tokens are
the completion's assistant output and nothing of the prompt, every problem a row has is reported, and a mask
column the trainer would ignore is refused.

TRL builds a prompt/completion row's mask from two tokenizations (the prompt alone, with the generation prompt,
and prompt + completion): the completion starts where they stop agreeing (`common_prefix_length`), and when that
is inside the prompt TRL only logs a warning once. Each case here writes its own template or row, and the
labels are held to what `trl.data_utils` builds for the same row.
"""

from __future__ import annotations

import contextlib
import io
import json
import types
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from trl.data_utils import _tokenize, common_prefix_length

from sft_toolkit import preprocess
from sft_toolkit.cli import main
from sft_toolkit.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).parent / "bad_inputs" / "tokenizer"

# ChatML, with a system prompt that reads differently when the template is asked for a generation prompt: the
# prompt rendered alone and prompt + completion part inside the system message.
SYSTEM_DEPENDS_ON_GENERATION_PROMPT = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
    "{%- if m.role == 'system' and not add_generation_prompt %}{{ ' Think first.' }}{%- endif %}"
    "{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The same ChatML, rendering the prompt alike in both cases, with tool calls and generation blocks.
CHATML_WITH_TOOLS = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' %}{% generation %}{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}{{ '<call>' + c.function.name + ' ' + c.function.arguments | tojson"
    " + '</call>' }}{%- endfor %}{{ '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{ m.content + '<|im_end|>' }}{%- endif %}{{ '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
PROMPT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
ANSWER = {"role": "assistant", "content": "Paris is the capital."}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER))


def sft(**keys):
    defaults = {
        "assistant_only_loss": False,
        "completion_only_loss": None,
        "dataset_num_proc": None,
        "chat_template_path": "test",
        "dataset_text_field": "text",
    }
    return types.SimpleNamespace(**{**defaults, **keys})


def tokenized(tokenizer, template, rows, **keys) -> list[dict]:
    return list(preprocess.tokenize(Dataset.from_list(rows), tokenizer, template, sft(**keys)))


def trl_completion_mask(tokenizer, template, row) -> tuple[list[int], list[int]]:
    """The input_ids and completion_mask SFTTrainer's tokenize_fn builds for a prompt/completion row."""
    if isinstance(row["prompt"], list):
        prompt_ids = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True, chat_template=template)
        ids = _tokenize(tokenizer, row["prompt"] + row["completion"], chat_template=template)["input_ids"]
    else:
        prompt_ids = _tokenize(tokenizer, row["prompt"])
        ids = _tokenize(tokenizer, row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
    start = common_prefix_length(prompt_ids["input_ids"], ids)
    return list(ids), [0] * start + [1] * (len(ids) - start)


def trained_text(tokenizer, record: dict) -> str:
    return tokenizer.decode([t for t in record["labels"] if t != -100])


def check(tmp_path: Path, rows: list[dict], template: str, tokenizer_dir=TOKENIZER, **keys) -> tuple[int, dict, str]:
    """Exit code, JSON report and text output of `check-data` on these rows with this template."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "template.jinja").write_text(template)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tokenizer_dir),
                "chat_template_path": str(tmp_path / "template.jinja"),
                "dataset_name": str(data),
                "assistant_only_loss": False,
                **keys,
            }
        )
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["check-data", str(recipe), "--report", str(tmp_path / "report.json")])
    return code, json.loads((tmp_path / "report.json").read_text()), out.getvalue()


# ------------------------------------------------------------------------------ conversational prompt/completion


def test_a_prompt_rendered_differently_alone_trains_the_prompt_and_fails_the_gate(tokenizer, tmp_path):
    row = {"prompt": PROMPT, "completion": [ANSWER]}
    (record,) = tokenized(tokenizer, SYSTEM_DEPENDS_ON_GENERATION_PROMPT, [row])
    ids, completion_mask = trl_completion_mask(tokenizer, SYSTEM_DEPENDS_ON_GENERATION_PROMPT, row)
    assert record["input_ids"] == ids  # what TRL trains: the user's question is inside its completion mask
    assert [label != -100 for label in record["labels"]] == [bool(bit) for bit in completion_mask]
    assert PROMPT[1]["content"] in trained_text(tokenizer, record)

    fine = {"prompt": PROMPT[1:], "completion": [ANSWER]}  # no system message: rendered alike
    code, report, text = check(tmp_path, [fine, row], SYSTEM_DEPENDS_ON_GENERATION_PROMPT)
    assert code == 1 and not report["ok"]
    (problem,) = report["coverage_problem_rows"]
    assert problem["index"] == 1 and problem["reason"] == "prompt_text_trained" and problem["message"] == 1
    assert "row 1 message 1: prompt_text_trained" in text and "rows train the wrong text" in text


def test_a_prompt_rendered_alike_trains_exactly_the_completion_and_its_end_of_turn(tokenizer, tmp_path):
    rows = [{"prompt": PROMPT, "completion": [ANSWER]}, {"prompt": PROMPT[1:], "completion": [ANSWER]}]
    for row, record in zip(rows, tokenized(tokenizer, CHATML_WITH_TOOLS, rows)):
        ids, completion_mask = trl_completion_mask(tokenizer, CHATML_WITH_TOOLS, row)
        assert [label != -100 for label in record["labels"]] == [bool(bit) for bit in completion_mask]
        assert trained_text(tokenizer, record) == ANSWER["content"] + "<|im_end|>\n"
        assert not record["coverage_reason"]
    code, report, _ = check(tmp_path, rows, CHATML_WITH_TOOLS)
    assert code == 0 and report["coverage_problem_rows"] == []


def test_a_prompt_whose_end_of_turn_differs_alone_trains_the_generation_prompt(tokenizer, tmp_path):
    """The prompt's last turn ends with another marker when the generation prompt follows: the renders part
    after the user's text, so no prompt text is trained, but the user's end of turn and the assistant header,
    which inference supplies, are."""
    template = (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
        "{%- if loop.last and add_generation_prompt %}{{ '<|endoftext|>\\n' }}{%- else %}{{ '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    row = {"prompt": PROMPT[1:], "completion": [ANSWER]}
    (record,) = tokenized(tokenizer, template, [row])
    _, completion_mask = trl_completion_mask(tokenizer, template, row)
    assert [label != -100 for label in record["labels"]] == [bool(bit) for bit in completion_mask]
    assert (
        trained_text(tokenizer, record) == "<|im_end|>\n<|im_start|>assistant\n" + ANSWER["content"] + "<|im_end|>\n"
    )
    code, report, _ = check(tmp_path, [row], template)
    assert code == 1
    assert report["coverage_problem_rows"][0]["problems"] == [{"reason": "generation_prompt_trained", "message": 0}]


def test_a_prompt_end_the_full_render_drops_is_not_a_failure(tokenizer):
    """TRL's own case for `common_prefix_length`: the generation prompt ends with an empty thought block that
    prompt + completion drops. The completion starts after the shared part, and trains the completion alone."""
    template = CHATML_WITH_TOOLS.replace(
        "{{ '<|im_start|>assistant\\n' }}{%- endif %}", "{{ '<|im_start|>assistant\\n<think></think>' }}{%- endif %}"
    )
    row = {"prompt": PROMPT[1:], "completion": [ANSWER]}
    (record,) = tokenized(tokenizer, template, [row])
    prompt_ids = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True, chat_template=template)["input_ids"]
    assert common_prefix_length(prompt_ids, record["input_ids"]) < len(prompt_ids)  # TRL warns here
    assert trained_text(tokenizer, record) == ANSWER["content"] + "<|im_end|>\n"
    assert not record["coverage_reason"]


TOOL_COMPLETION = [
    {
        "role": "assistant",
        "content": "Let me look that up.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "Sunny and nineteen degrees."},
    {"role": "assistant", "content": "It is sunny in Paris."},
]


def test_a_tool_result_inside_the_completion_is_trained_by_completion_only_loss(tmp_path):
    """completion_only_loss trains the whole completion, tool results included; assistant_only_loss as well
    keeps the assistant's messages only."""
    row = {"prompt": PROMPT[1:], "completion": TOOL_COMPLETION}
    code, report, _ = check(tmp_path, [row], CHATML_WITH_TOOLS)
    assert code == 1
    assert report["coverage_problem_rows"][0]["problems"] == [{"reason": "non_assistant_text_trained", "message": 2}]
    code, report, _ = check(tmp_path, [row], CHATML_WITH_TOOLS, assistant_only_loss=True)
    assert code == 0 and report["coverage_problem_rows"] == []


def test_an_earlier_assistant_turn_in_the_prompt_is_prompt_text(tokenizer):
    """A few-shot prompt holds assistant messages: they are context, and must not be trained."""
    shots = [
        {"role": "user", "content": "Capital of Spain?"},
        {"role": "assistant", "content": "Madrid, of course."},
        *PROMPT[1:],
    ]
    # A template that renders the first message differently when asked for a generation prompt: everything after
    # the first user's text ends up in TRL's completion mask.
    template = SYSTEM_DEPENDS_ON_GENERATION_PROMPT.replace("m.role == 'system'", "loop.first")
    (record,) = tokenized(tokenizer, template, [{"prompt": shots, "completion": [ANSWER]}])
    assert "Madrid, of course." in trained_text(tokenizer, record)
    found = json.loads(record["coverage_problems"])
    # and the assistant header after them, which inference supplies
    assert found == [["prompt_text_trained", 1], ["prompt_text_trained", 2], ["generation_prompt_trained", 2]]


def test_without_completion_only_loss_every_assistant_message_of_the_row_is_trained(tokenizer):
    """assistant_only_loss alone trains the prompt's assistant messages too, as TRL does: the row is then held to
    the rules of a conversation (each assistant message trained, no other text), not to the prompt boundary."""
    shots = [
        {"role": "user", "content": "Capital of Spain?"},
        {"role": "assistant", "content": "Madrid, of course."},
        *PROMPT[1:],
    ]
    row = {"prompt": shots, "completion": [ANSWER]}
    both, assistant_only = (
        tokenized(tokenizer, CHATML_WITH_TOOLS, [row], assistant_only_loss=True, completion_only_loss=flag)[0]
        for flag in (None, False)
    )
    assert "Madrid" not in trained_text(tokenizer, both) and not both["coverage_reason"]
    assert "Madrid, of course." in trained_text(tokenizer, assistant_only) and not assistant_only["coverage_reason"]


# ------------------------------------------------------------------------------ plain-text prompt/completion


@pytest.fixture(scope="module")
def merging_tokenizer_dir(tmp_path_factory):
    """The tiny tokenizer plus the merges that make ` Paris` one token, so `... is Par` + `is.` merge across the
    prompt/completion boundary."""
    spec = json.loads((TOKENIZER / "tokenizer.json").read_text())
    vocab, merges = spec["model"]["vocab"], []
    for left, right in [("Ġ", "P"), ("ĠP", "a"), ("ĠPa", "r"), ("ĠPar", "i"), ("ĠPari", "s")]:
        vocab[left + right] = len(vocab)
        merges.append([left, right])
    spec["model"]["merges"] = merges
    for i, token in enumerate(spec["added_tokens"]):  # the special tokens follow the vocabulary
        token["id"] = len(vocab) + i
    folder = tmp_path_factory.mktemp("merging")
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text((TOKENIZER / "tokenizer_config.json").read_text())
    return folder


def test_text_rows_whose_tokens_merge_across_the_boundary_train_prompt_text(merging_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(str(merging_tokenizer_dir))
    merged = {"prompt": "The capital of France is Par", "completion": "is."}
    clean = {"prompt": "The capital of France is", "completion": " Paris."}
    records = tokenized(tokenizer, None, [clean, merged])
    for row, record in zip([clean, merged], records):
        ids, completion_mask = trl_completion_mask(tokenizer, None, row)
        assert record["input_ids"] == ids
        assert [label != -100 for label in record["labels"]] == [bool(bit) for bit in completion_mask]
    assert trained_text(tokenizer, records[0]) == " Paris.<|im_end|>" and not records[0]["coverage_reason"]
    assert trained_text(tokenizer, records[1]) == " Paris.<|im_end|>"  # " Par" is the prompt's
    assert (records[1]["coverage_reason"], records[1]["coverage_message"]) == ("prompt_text_trained", 0)

    code, report, _ = check(tmp_path, [clean, merged], "{{ '' }}", tokenizer_dir=merging_tokenizer_dir)
    assert code == 1 and [(r["index"], r["reasons"]) for r in report["coverage_problem_rows"]] == [
        (1, ["prompt_text_trained"])
    ]


# ------------------------------------------------------------------------------ every problem of a row


def test_a_row_with_several_problems_names_every_kind(tmp_path):
    """A template that trains the user's text and not the assistant's: both are reported, each with its message,
    in the JSON report, the text output and the Markdown report."""
    inverted = (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'user' %}{% generation %}{{ m.content }}{% endgeneration %}{%- else %}{{ m.content }}"
        "{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
    )
    row = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}]}
    code, report, text = check(tmp_path, [row], inverted, assistant_only_loss=True)
    assert code == 1
    (entry,) = report["coverage_problem_rows"]
    assert (entry["index"], entry["reason"], entry["message"]) == (0, "non_assistant_text_trained", 0)
    assert entry["reasons"] == ["non_assistant_text_trained", "assistant_content_untrained"]
    assert entry["problems"] == [
        {"reason": "non_assistant_text_trained", "message": 0},
        {"reason": "assistant_content_untrained", "message": 1},
    ]
    assert "row 0 message 0: non_assistant_text_trained" in text
    assert "row 0 message 1: assistant_content_untrained" in text
    assert "1 leave assistant text untrained, 1 train user/system/tool text" in " ".join(report["problems"])
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "| 0 | 0 | non_assistant_text_trained |" in markdown and "| 0 | 1 | assistant_content_untrained |" in markdown
    )
    # The guard's note (what `train` logs under mask_guard: repair, which leaves the template alone) names both.
    from sft_toolkit.recipe import load_recipe
    from sft_toolkit.train import guard

    notes = " ".join(guard(load_recipe(str(tmp_path / "recipe.yaml"), {"mask_guard": "repair"})).repairs.notes)
    assert "0 (non_assistant_text_trained, message 0; assistant_content_untrained, message 1)" in notes, notes


# ------------------------------------------------------------------------------ pre-tokenized rows


def check_tokens(tmp_path: Path, rows: list[dict], **keys) -> tuple[int, dict | None, str]:
    """Exit code, JSON report (None when refused) and stderr of `check-data` on pre-tokenized rows."""
    data = tmp_path / "tokens.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(TOKENIZER), "dataset_name": str(data), **keys}))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-data", str(recipe), "--format", "json"])
    return code, json.loads(out.getvalue()) if code != 2 else None, err.getvalue()


def test_a_completion_mask_the_trainer_would_ignore_is_refused(tmp_path):
    """SFTTrainer applies `completion_mask` only when completion_only_loss is true; unset, it is false for rows
    without prompt/completion fields (`"prompt" in dataset_sample`), and every token would train."""
    rows = [{"input_ids": [40, 41, 42, 43, 44], "completion_mask": [0, 0, 0, 1, 1]}]
    code, _, err = check_tokens(tmp_path, rows, assistant_only_loss=False)
    assert code == 2 and "'completion_mask' column" in err and "completion_only_loss: true" in err
    code, report, _ = check_tokens(tmp_path, rows, assistant_only_loss=False, completion_only_loss=True)
    assert code == 0 and report["trainable_tokens"] == 2
    code, report, _ = check_tokens(tmp_path, rows, assistant_only_loss=False, completion_only_loss=False)
    assert code == 0 and report["trainable_tokens"] == 5  # asked for: every token


def test_labels_that_disagree_with_a_mask_beside_them_are_refused_naming_the_row(tmp_path):
    """With a `labels` column the trainer ignores `assistant_masks`: the two must say the same."""
    agree = {"input_ids": [40, 41, 42], "labels": [-100, 41, 42], "assistant_masks": [0, 1, 1]}
    disagree = {"input_ids": [40, 41, 42], "labels": [40, 41, 42], "assistant_masks": [0, 1, 1]}
    code, report, _ = check_tokens(tmp_path, [agree], assistant_only_loss=True)
    assert code == 0 and report["trainable_tokens"] == 2
    code, _, err = check_tokens(tmp_path, [agree, disagree], assistant_only_loss=True)
    assert code == 2 and "row 1: labels[0] trains a token its 'assistant_masks' marks 0" in err
