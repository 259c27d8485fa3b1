"""Rows and datasets the data gate used to pass without having proved their mask right.

- a conversation whose content coverage could not be checked (the render it is checked on fails, or is not the
  render its tokens came from) is counted in `coverage_unchecked_rows`, as prompt/completion rows are, never
  passed as checked;
- a row that asks for the generation prompt in its `chat_template_kwargs` is checked on the render it is trained
  on, instead of its check failing unseen; one whose `chat_template_kwargs` truncate its tokens is checked on the
  characters its tokens keep;
- `NaN` / `Infinity` in a JSON or JSON Lines file inside a dataset folder is refused by file, line and field,
  as in a single file, instead of loading as null (a `weight: NaN` turn trained);
- a folder's data files that `datasets` reads into no split are named in the report's warnings;
- without `max_length`, rows with nothing to train are counted as the sequences they stay, not as dropped;
- `chat_template_kwargs` written as JSON text is a named malformed row, not a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from sft_toolkit import preprocess
from sft_toolkit.cli import main
from sft_toolkit.masks import TemplateRaised

CORPUS = Path(__file__).parent / "bad_inputs"
TOKENIZER = CORPUS / "tokenizer"

# ChatML with generation blocks, whose system header says today's date with the month's name (Llama 3.x's
# templates print `strftime_now`'s date the same way): the text changes with the day it is rendered on.
DATED_CHATML = (
    "{{- '<|im_start|>system\\nToday is ' + strftime_now('%-d %B %Y') + '.<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set text = message.content %}"
    "{%- else %}{%- set text = message.content | map(attribute='text') | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.role == 'assistant' %}{%- generation %}{{- text + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{{- text + '<|im_end|>' }}{%- endif %}{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PARTS_ROW = {
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "2 + 2 = "}, {"type": "text", "text": "4."}]},
    ]
}


def check(tmp_path: Path, rows: list[dict] | None, template: str | None = None, **keys) -> tuple[int, dict, str]:
    """Exit code, JSON report ({} on exit 2) and output of `check-data` over these rows (or `keys`' dataset)."""
    recipe = {"model_name_or_path": str(TOKENIZER), "chat_template_path": "chatml", "assistant_only_loss": True}
    if rows is not None:
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        recipe["dataset_name"] = str(tmp_path / "rows.jsonl")
    if template is not None:
        (tmp_path / "template.jinja").write_text(template)
        recipe["chat_template_path"] = str(tmp_path / "template.jinja")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, **keys}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["check-data", str(tmp_path / "recipe.yaml"), "--report", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text()) if code != 2 else {}
    return code, report, out.getvalue()


# ------------------------------------------------------------------------------ conversations left unchecked


def test_a_conversation_whose_check_render_fails_is_counted_unchecked_not_passed(tmp_path, monkeypatch):
    """The row is tokenized (its render succeeds there), but the render its text is checked on fails: no verdict,
    so the row is listed as unchecked, in the JSON report, the text output and the Markdown report."""

    def fails(*args, **kwargs):
        raise TemplateRaised("renders differently this time")

    monkeypatch.setattr(preprocess, "render", fails)
    code, report, out = check(tmp_path, [PARTS_ROW], DATED_CHATML)
    assert code == 0, out
    assert report["coverage_unchecked_rows"] == [0] and report["coverage_problem_rows"] == []
    assert "content coverage not checked for 1 rows (0)" in out
    assert "| rows whose content coverage could not be checked | 1 |" in (tmp_path / "report.md").read_text()


class _MidnightClock:
    """`datetime` whose `now()` alternates between the last second of 30 November and 1 December."""

    calls = 0

    @classmethod
    def now(cls):
        cls.calls += 1
        return datetime(2026, 11, 30, 23, 59, 59) if cls.calls % 2 else datetime(2026, 12, 1)


def test_a_conversation_rendered_differently_when_checked_is_counted_unchecked(tmp_path, monkeypatch):
    """A template that prints today's date, with the day changing between the render the row's tokens come from
    and the render its text is checked on: the text checked is not the text trained, so no verdict."""
    import transformers.utils.chat_template_utils as chat_template_utils

    monkeypatch.setattr(chat_template_utils, "datetime", _MidnightClock)
    code, report, out = check(tmp_path, [PARTS_ROW], DATED_CHATML)
    assert code == 0, out
    assert report["coverage_unchecked_rows"] == [0] and report["coverage_problem_rows"] == []


def test_the_same_rows_rendered_alike_are_checked(tmp_path):
    """The dated template on a steady clock, the same row: checked (neither unchecked nor a problem)."""
    code, report, out = check(tmp_path, [PARTS_ROW], DATED_CHATML)
    assert code == 0 and report["coverage_unchecked_rows"] == [] and report["coverage_problem_rows"] == [], out


def test_a_row_asking_for_the_generation_prompt_is_checked_on_the_render_it_trains_on(tmp_path):
    """`chat_template_kwargs: {add_generation_prompt: true}` is an `apply_chat_template` argument: the row used to
    be checked by a render that failed on it (passed as checked, whatever its mask). Its mask trains a user
    message (the template's generation block runs over it) and is reported like the row without the key."""
    template = (CORPUS / "templates" / "trains_user_text.jinja").read_text()
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6."},
    ]
    rows = [{"messages": messages, "chat_template_kwargs": {"add_generation_prompt": True}}, {"messages": messages}]
    code, report, out = check(tmp_path, rows, template)
    assert code == 1, out
    found = [(r["index"], r["reason"], r["message"]) for r in report["coverage_problem_rows"]]
    assert found == [(0, "non_assistant_text_trained", 2), (1, "non_assistant_text_trained", 2)]
    assert report["coverage_unchecked_rows"] == []


def test_a_row_whose_template_kwargs_truncate_its_tokens_leaves_the_answer_untrained_and_fails(tmp_path):
    """`chat_template_kwargs: {truncation: true, max_length: N}` are `apply_chat_template` arguments, which TRL
    passes on as well: the row's tokens end N tokens in, mid-answer. The row used to pass, its cut answer counted
    as neither truncated nor wrong; the characters past its last token are untrained, and it fails."""
    messages = [
        {"role": "user", "content": "What is the answer?"},
        {"role": "assistant", "content": "The answer is forty-two, as everyone knows."},
    ]
    code, whole, out = check(tmp_path, [{"messages": messages}])
    assert code == 0 and whole["coverage_problem_rows"] == [], out
    cut = {"truncation": True, "max_length": whole["tokens"] - 10}  # ten tokens short of the end of the answer
    code, report, out = check(tmp_path, [{"messages": messages, "chat_template_kwargs": cut}])
    assert report["tokens"] == whole["tokens"] - 10 and 0 < report["trainable_tokens"] < whole["trainable_tokens"]
    assert code == 1, out
    assert [(r["index"], r["reason"], r["message"]) for r in report["coverage_problem_rows"]] == [
        (0, "assistant_content_untrained", 1)
    ]


# ------------------------------------------------------------------------------ NaN in a dataset folder


def conversation(answer: str, weight: str) -> str:
    return (
        '{"messages": [{"role": "user", "content": "Say ' + answer + '."}, '
        '{"role": "assistant", "content": "' + answer + '", "weight": ' + weight + "}]}\n"
    )


@pytest.fixture
def folder_with_nan(tmp_path) -> Path:
    """Two JSON Lines files of the same columns; the second switches a turn off with `NaN` (not JSON), which
    `datasets` reads as null: the turn would be trained."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(conversation("yes", "1") + conversation("no", "0"))
    (folder / "b.jsonl").write_text(conversation("maybe", "1") + conversation("never", "NaN"))
    return folder


def test_nan_in_a_jsonl_file_of_a_dataset_folder_is_refused_by_file_line_and_field(tmp_path, folder_with_nan):
    code, report, out = check(tmp_path, None, dataset_name=str(folder_with_nan) + "/")
    assert code == 2, out
    assert f"{folder_with_nan / 'b.jsonl'}:2: messages[1].weight (NaN) is not a JSON number" in out


def test_nan_in_a_dataset_folder_of_a_mixture_is_refused_naming_the_source(tmp_path, folder_with_nan):
    code, report, out = check(tmp_path, None, datasets=[{"path": str(folder_with_nan)}])
    assert code == 2, out
    assert f"datasets[0]: {folder_with_nan}: {folder_with_nan / 'b.jsonl'}:2: messages[1].weight (NaN)" in out


def test_nan_in_json_data_files_of_a_mixture_is_refused_naming_the_source(tmp_path, folder_with_nan):
    """`path: json` with `data_files` (a glob): the files the json builder reads are checked the same way."""
    code, report, out = check(
        tmp_path, None, datasets=[{"path": "json", "data_files": str(folder_with_nan / "*.jsonl")}]
    )
    assert code == 2, out
    assert f"datasets[0]: json: {folder_with_nan / 'b.jsonl'}:2: messages[1].weight (NaN)" in out


def test_nan_in_a_json_file_of_a_dataset_folder_is_refused_by_row(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [json.loads(conversation("yes", "1")), json.loads(conversation("no", "0"))]
    (folder / "rows.json").write_text(json.dumps(rows).replace('"weight": 0', '"weight": Infinity'))
    code, report, out = check(tmp_path, None, dataset_name=str(folder))
    assert code == 2, out
    assert f"{folder / 'rows.json'}: row 1 (counted from 0): messages[1].weight (Infinity)" in out


def test_a_dataset_folder_of_finite_numbers_loads_every_file_and_its_switched_off_turns(tmp_path, folder_with_nan):
    """`weight: 0` written as a number: every row of both files loads, and the switched-off turns are not trained
    (what the NaN would have lost); each such row, with nothing else to train, is named."""
    (folder_with_nan / "b.jsonl").write_text(conversation("maybe", "1") + conversation("never", "0"))
    code, report, out = check(tmp_path, None, dataset_name=str(folder_with_nan))
    assert report["rows"] == 4, out
    assert report["zero_mask_rows"] == [
        {"index": 1, "reason": "all_turns_switched_off"},
        {"index": 3, "reason": "all_turns_switched_off"},
    ]


# ------------------------------------------------------------------------------ folder files read into no split


def folder_of(tmp_path: Path, files: dict[str, int]) -> Path:
    """A dataset folder: each .jsonl file with that many conversations (a .parquet file: written by datasets)."""
    from datasets import Dataset

    folder = tmp_path / "data"
    folder.mkdir()
    for name, rows in files.items():
        lines = [conversation(f"{name} {i}", "1") for i in range(rows)]
        if name.endswith(".parquet"):
            Dataset.from_list([json.loads(line) for line in lines]).to_parquet(str(folder / name))
        else:
            (folder / name).write_text("".join(lines))
    return folder


def test_a_folder_file_named_after_no_split_is_reported_unread(tmp_path):
    """`datasets` reads a folder by its file names: once one names a split (`test_cases.jsonl`: test;
    `more_train.jsonl`: train), a file named after none (`chats.jsonl`) is in no split, its rows neither trained
    nor counted. The report names it, beside rows that count only the file read."""
    folder = folder_of(tmp_path, {"chats.jsonl": 3, "test_cases.jsonl": 1, "more_train.jsonl": 2})
    code, report, out = check(tmp_path, None, dataset_name=str(folder))
    assert code == 0 and report["rows"] == 2, out
    (warning,) = report["warnings"]
    assert warning.startswith(f"dataset_name: {folder}: 1 data files in the folder are read into no split")
    assert "chats.jsonl" in warning and "test_cases.jsonl" not in warning.split("(")[0]
    assert f"warning: {warning}" in out
    assert f"- {warning}" in (tmp_path / "report.md").read_text()


def test_a_folder_file_of_another_format_is_reported_unread(tmp_path):
    """`datasets` reads one format of a folder (the most common one): the parquet file beside two .jsonl files is
    left out, in a mixture source as in dataset_name."""
    folder = folder_of(tmp_path, {"a.jsonl": 1, "b.jsonl": 1, "c.parquet": 5})
    code, report, out = check(tmp_path, None, datasets=[{"path": str(folder)}])
    assert code == 0 and report["rows"] == 2, out
    (warning,) = report["warnings"]
    assert warning.startswith(f"datasets[0] ({folder}, split 'train'): 1 data files") and "c.parquet" in warning


def test_a_folder_whose_files_are_all_read_has_no_warning(tmp_path):
    folder = folder_of(tmp_path, {"a.jsonl": 1, "b.jsonl": 2})
    code, report, out = check(tmp_path, None, dataset_name=str(folder))
    assert code == 0 and report["rows"] == 3 and report["warnings"] == [], out


# ------------------------------------------------------------------------------ counts that add up


def test_without_max_length_rows_with_nothing_to_train_are_counted_as_the_sequences_they_stay(tmp_path):
    """With `max_length: null` (and no packing) TRL drops no row: a row with nothing to train reaches the trainer
    as a sequence with zero trainable tokens. The report used to count it as dropped, and the sequences as one
    fewer than the dataset it hands the trainer."""
    from sft_toolkit.check_data import check_data
    from sft_toolkit.recipe import load_recipe

    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bbb"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "ddd"}]},
    ]
    code, report, out = check(tmp_path, rows, max_length=None, max_zero_rows=1)
    _, trained = check_data(load_recipe(str(tmp_path / "recipe.yaml")))
    empty = sum(all(label == -100 for label in labels) for labels in trained["labels"])
    assert report["sequences"] == len(trained) and report["rows"] == len(trained) + report["dropped_rows"]
    assert report["zero_trainable_sequences"] == empty == 1
    assert code == 1 and "1 of 3 sequences have zero trainable tokens" in out


# ------------------------------------------------------------------------------ bad input named, not a traceback


@pytest.mark.parametrize("prompt_completion", [False, True], ids=["messages", "prompt_completion"])
def test_template_kwargs_given_as_json_text_are_refused_by_row(tmp_path, prompt_completion):
    """`chat_template_kwargs` written as JSON text (as `tools` may be): TRL unpacks it as a mapping and fails; the
    row is named instead of a traceback."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    row = {"prompt": messages[:1], "completion": messages[1:]} if prompt_completion else {"messages": messages}
    written_as_text = {**row, "chat_template_kwargs": '{"enable_thinking": false}'}
    code, _, out = check(tmp_path, [written_as_text])
    assert code == 2, out
    assert "row 0: field 'chat_template_kwargs' must be an object of template variables" in out
    assert "Traceback" not in out
