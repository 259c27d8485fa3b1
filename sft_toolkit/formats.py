"""Every row format the toolkit reads, in one place: how rows of each are recognised and what they become.

TRL's SFTTrainer tells rows apart by their fields, in a fixed order: pre-tokenized rows (`input_ids`) are
trained as they are, prompt/completion rows take their own path, ShareGPT rows (`conversations` of
{from, value}) are converted to `messages`, `messages` meet the chat template, and plain text (the
`dataset_text_field`) is tokenized as it is. `FORMATS` lists them in that order; each is one `Format`: a test
on the dataset's columns (and its first row), and, for conversations, a converter `row -> row with
"messages"` (torchtune's idea: one small transform per source format). check-data, prepare and train
(through `preprocess`) and show (through `data.read_conversation`) all ask `row_format` and convert with the
same converter, so every command reads a row the same way. Adding a format: one `Format` here (its test and,
for a conversation, its converter) and its test in tests/test_formats.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from .problems import InputError


class RowFormat(Enum):
    PRE_TOKENIZED = "pre-tokenized (input_ids)"
    PROMPT_COMPLETION = "prompt/completion"
    SHAREGPT = "ShareGPT (conversations of {from, value})"
    MESSAGES = "messages"
    TEXT = "plain text"


# ShareGPT's role names. TRL's `maybe_convert_to_chatml` renames the keys but keeps these values, and
# chat templates then skip 'human' turns and never train 'gpt' ones (TRL aborts on the first such row);
# so we also map the names. A recipe's `role_map` replaces this table.
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "observation": "tool",
    "function_call": "assistant",
}


def sharegpt_to_chatml(example: dict, role_map: dict | None = None) -> dict:
    """One ShareGPT row (`conversations` of {from, value}) as `messages` of {role, content}: TRL's own
    `maybe_convert_to_chatml`, then the role names mapped (`role_map`, default `SHAREGPT_ROLES`). The given row
    is left as it is (TRL's function renames the keys of the message dicts in place: it gets copies)."""
    from trl.data_utils import maybe_convert_to_chatml

    roles = SHAREGPT_ROLES if role_map is None else role_map
    conversations = example["conversations"]
    example = {**example, "conversations": [dict(m) if isinstance(m, dict) else m for m in conversations]}
    example = maybe_convert_to_chatml(example)
    example["messages"] = [{**m, "role": roles.get(m.get("role"), m.get("role"))} for m in example["messages"]]
    return example


def messages_as_they_are(example: dict, role_map: dict | None = None) -> dict:
    """A row that already holds `messages` of {role, content}: nothing to convert (`role_map` is ShareGPT's)."""
    return example


def _is_sharegpt(first_row: Mapping | None) -> bool:
    from trl.data_utils import is_conversational_from_value

    return first_row is not None and is_conversational_from_value(first_row)


# A row converter: the row and the recipe's role_map in, the row with a `messages` list out.
Converter = Callable[[dict, dict | None], dict]


@dataclass(frozen=True)
class Format:
    """One row format. `recognises(columns, first_row, text_field)` says whether a dataset is in it;
    `first_row()` reads the first row only when a format needs it. `to_messages` converts one row of a
    conversation format (None: the rows keep their own shape, for their own tokenizing path), consuming the
    columns in `replaces`. `meets_template(first_row)`: whether its rows are rendered with the chat template."""

    kind: RowFormat
    recognises: Callable[[Sequence[str], Callable[[], Mapping | None], str], bool]
    to_messages: Converter | None = None
    replaces: tuple[str, ...] = ()
    meets_template: Callable[[Callable[[], Mapping | None]], bool] = lambda first_row: False

    @property
    def changes_rows(self) -> bool:
        """Whether its converter rewrites rows (a dataset of it is mapped through the converter)."""
        return self.to_messages is not None and self.to_messages is not messages_as_they_are


FORMATS: tuple[Format, ...] = (
    Format(RowFormat.PRE_TOKENIZED, lambda columns, first_row, text_field: "input_ids" in columns),
    Format(
        RowFormat.PROMPT_COMPLETION,
        lambda columns, first_row, text_field: "prompt" in columns and "completion" in columns,
        # A conversational prompt (a list of messages) is rendered with the chat template; a text one is not.
        meets_template=lambda first_row: isinstance((first_row() or {}).get("prompt"), list),
    ),
    Format(
        RowFormat.SHAREGPT,
        lambda columns, first_row, text_field: "conversations" in columns and _is_sharegpt(first_row()),
        to_messages=sharegpt_to_chatml,
        replaces=("conversations",),
        meets_template=lambda first_row: True,
    ),
    Format(
        RowFormat.MESSAGES,
        lambda columns, first_row, text_field: "messages" in columns,
        to_messages=messages_as_they_are,
        meets_template=lambda first_row: True,
    ),
    Format(RowFormat.TEXT, lambda columns, first_row, text_field: text_field in columns),
)


def row_format(
    columns: Sequence[str], first_row: Callable[[], Mapping | None], text_field: str = "text"
) -> Format | None:
    """The first format (in TRL's order) that recognises a dataset with these columns, or None.
    `first_row` is called (once) only when a format needs the first row to decide."""
    columns = list(columns or ())
    first_row = functools.cache(first_row)
    return next((fmt for fmt in FORMATS if fmt.recognises(columns, first_row, text_field)), None)


def renders_template(columns: Sequence[str], first_row: Callable[[], Mapping | None]) -> bool:
    """Whether rows with these columns meet the chat template: conversations, and conversational
    prompt/completion (the first row's prompt is a list of messages)."""
    first_row = functools.cache(first_row)
    fmt = row_format(columns, first_row)
    return fmt is not None and fmt.meets_template(first_row)


def dataset_format(dataset, text_field: str = "text") -> Format | None:
    """`row_format` of a `datasets` Dataset or IterableDataset."""
    return row_format(dataset.column_names, lambda: next(iter(dataset), None), text_field)


def one_row_format(row: Mapping, text_field: str = "text") -> Format | None:
    """`row_format` of a single row (its keys are the columns)."""
    return row_format(list(row), lambda: row, text_field)


def conversation(row: Mapping, where: str, role_map: dict | None = None) -> dict:
    """One row as training reads it (for `show`): converted to a row with a `messages` list by its format's
    converter. Raises InputError naming `where` when the row is not a conversation."""
    fmt = one_row_format(row)
    if fmt is not None and fmt.to_messages is not None:
        converted = fmt.to_messages(dict(row), role_map)
        if isinstance(converted.get("messages"), list):
            return converted
    kind = ""
    if fmt is not None and fmt.to_messages is None:
        kind = f"; this row is {fmt.kind.value}, which show does not draw (check-data accounts for it)"
    raise InputError(f"{where}: expected a list of messages or an object with a 'messages' list{kind}")
