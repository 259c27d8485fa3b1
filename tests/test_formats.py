"""Every row format, one converter or path each: how a dataset of it is recognised, in TRL's order, and what one
row of it becomes. check-data, prepare, train (through preprocess) and show (through data.read_conversation)
all read rows through `formats`, so a format added here is read the same way by every command."""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset

from sft_toolkit import formats
from sft_toolkit.data import read_conversation
from sft_toolkit.formats import FORMATS, RowFormat
from sft_toolkit.problems import InputError

SHAREGPT_ROW = {"conversations": [{"from": "human", "value": "What is 2 + 1?"}, {"from": "gpt", "value": "3."}]}
MESSAGES_ROW = {
    "messages": [{"role": "user", "content": "What is 2 + 1?"}, {"role": "assistant", "content": "3."}],
    "tools": json.dumps([{"type": "function", "function": {"name": "add", "parameters": {}}}]),
}
# One row of each format, in TRL's order.
ROWS = {
    RowFormat.PRE_TOKENIZED: {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "messages": MESSAGES_ROW["messages"]},
    RowFormat.PROMPT_COMPLETION: {
        "prompt": [{"role": "user", "content": "What is 2 + 1?"}],
        "completion": [{"role": "assistant", "content": "3."}],
    },
    RowFormat.SHAREGPT: SHAREGPT_ROW,
    RowFormat.MESSAGES: MESSAGES_ROW,
    RowFormat.TEXT: {"text": "The sky is blue."},
}


def test_formats_are_listed_once_each_in_trls_order():
    assert [fmt.kind for fmt in FORMATS] == list(ROWS) == list(RowFormat)


@pytest.mark.parametrize("kind", list(ROWS), ids=[kind.name for kind in ROWS])
def test_a_dataset_and_one_row_of_each_format_are_recognised_as_it(kind):
    row = ROWS[kind]
    assert formats.one_row_format(row).kind is kind
    assert formats.dataset_format(Dataset.from_list([row])).kind is kind


def test_a_row_of_no_known_format_is_none_and_show_says_what_it_expects():
    assert formats.one_row_format({"question": "?", "answer": "!"}) is None
    with pytest.raises(InputError, match="row 4: expected a list of messages or an object with a 'messages' list"):
        formats.conversation({"question": "?"}, "data.jsonl row 4")


def test_the_sharegpt_converter_renames_keys_and_maps_role_names():
    converted = formats.conversation(SHAREGPT_ROW, "row 0")
    assert converted["messages"] == [
        {"role": "user", "content": "What is 2 + 1?"},
        {"role": "assistant", "content": "3."},
    ]
    assert "conversations" not in converted
    custom = {"conversations": [{"from": "asker", "value": "Hi?"}, {"from": "answerer", "value": "Hello."}]}
    mapped = formats.conversation(custom, "row 0", role_map={"asker": "user", "answerer": "assistant"})
    assert [m["role"] for m in mapped["messages"]] == ["user", "assistant"]
    assert SHAREGPT_ROW["conversations"][0] == {"from": "human", "value": "What is 2 + 1?"}  # the input is kept


def test_sharegpt_is_told_from_a_conversations_column_of_role_content_messages():
    other = {"conversations": [{"role": "user", "content": "Hi?"}]}
    assert formats.one_row_format(other) is None
    assert formats.dataset_format(Dataset.from_list([SHAREGPT_ROW])).changes_rows


def test_a_messages_row_is_read_as_it_is():
    fmt = formats.one_row_format(MESSAGES_ROW)
    assert not fmt.changes_rows and formats.conversation(MESSAGES_ROW, "row 0") == MESSAGES_ROW


@pytest.mark.parametrize("kind", [RowFormat.PRE_TOKENIZED, RowFormat.PROMPT_COMPLETION, RowFormat.TEXT])
def test_rows_trained_without_a_conversation_are_refused_by_show_with_their_format(kind):
    """A pre-tokenized row that also carries messages trains its input_ids: show refuses to draw the messages."""
    with pytest.raises(InputError, match=re.escape(f"this row is {kind.value}")):
        formats.conversation(ROWS[kind], "row 0")


def test_which_formats_meet_the_chat_template():
    def meets(row):
        return formats.renders_template(list(row), lambda: row)

    assert meets(SHAREGPT_ROW) and meets(MESSAGES_ROW) and meets(ROWS[RowFormat.PROMPT_COMPLETION])
    assert not meets({"prompt": "2 + 1 =", "completion": " 3."})  # a text prompt is tokenized as it is
    assert not meets(ROWS[RowFormat.PRE_TOKENIZED]) and not meets(ROWS[RowFormat.TEXT])


def test_show_reads_a_dataset_row_through_the_same_converter(tmp_path):
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps(SHAREGPT_ROW) + "\n")
    messages, tools = read_conversation(str(sharegpt), 0)
    assert messages == formats.conversation(SHAREGPT_ROW, "row 0")["messages"] and tools is None
    single = tmp_path / "one.json"
    single.write_text(json.dumps(MESSAGES_ROW))
    messages, tools = read_conversation(str(single))
    assert messages == MESSAGES_ROW["messages"] and tools[0]["function"]["name"] == "add"
