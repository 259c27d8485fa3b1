"""Load conversational data from wherever the user keeps it, with errors that name the file and line.

`datasets` does the loading (hub ids, local directories, `.jsonl`/`.json`/`.parquet`/`.csv` files,
`save_to_disk` folders); this module only adds what it lacks for our purposes: a broken `.jsonl` line
is named by number before `datasets` gets to report it as a pyarrow error.
"""

from __future__ import annotations

import json
from pathlib import Path

from .problems import InputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, split: str = "train", *, streaming: bool = False):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) for `source`, with row order kept."""
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise InputError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
            if path.suffix.lower() == ".jsonl":
                check_jsonl(path)
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(str(path), split=split, streaming=streaming)
        if looks_local(source):
            raise InputError(f"{source}: no such file or directory")
        return datasets.load_dataset(source, split=split, streaming=streaming)
    except InputError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise InputError(f"{source}: cannot load dataset split {split!r} ({_first_line(err)})") from None
    except Exception as err:  # datasets wraps hub/network/parse failures in many types
        raise InputError(f"{source}: cannot load dataset ({type(err).__name__}: {_first_line(err)})") from None


def check_jsonl(path: Path) -> None:
    """Name the first broken line of a JSON Lines file (datasets would report a pyarrow offset), and say
    so when there is no row at all (datasets fails on an empty file with a bare StopIteration)."""
    rows = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows += 1
    if not rows:
        raise InputError(f"{path}: the dataset is empty (no rows); give at least one conversation, one JSON object "
                         "per line")


def looks_local(spec: str) -> bool:
    """A path the user means on this machine (not a hub id `org/name`): a known file suffix, an explicit
    directory prefix, or more than one '/'. Used to say "no such file" instead of a hub lookup failure."""
    return (spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1
            or Path(spec).suffix.lower() in {*FILE_BUILDERS, ".jinja", ".j2", ".yaml", ".yml"})


def read_conversation(source: str, row: int | None = None) -> tuple[list[dict], list[dict] | None]:
    """Messages (and tools) from a JSON file holding one conversation, or from row `row` of a dataset."""
    path = Path(source)
    if row is None and path.suffix.lower() == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{source}: not valid JSON ({err})") from None
        return _messages_of(data, source)
    rows = load_rows(source)
    index = row or 0
    if not 0 <= index < len(rows):
        raise InputError(f"{source}: --row {index} is out of range (the dataset has {len(rows)} rows)")
    return _messages_of(rows[index], f"{source} row {index}")


def _messages_of(data, where: str) -> tuple[list[dict], list[dict] | None]:
    if isinstance(data, list):
        return data, None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        tools = data.get("tools")
        if isinstance(tools, str):
            tools = json.loads(tools)
        return data["messages"], tools
    raise InputError(f"{where}: expected a list of messages or an object with a 'messages' list")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_template_kwargs(source: str, row: int | None = None) -> dict:
    """The `chat_template_kwargs` of the conversation `read_conversation` reads ({} when it has none): the
    variables TRL passes to the template for that row (e.g. `enable_thinking`)."""
    path = Path(source)
    if row is None and path.suffix.lower() == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{source}: not valid JSON ({err})") from None
        where = source
    else:
        data, where = load_rows(source)[row or 0], f"{source} row {row or 0}"
    kwargs = data.get("chat_template_kwargs") if isinstance(data, dict) else None
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InputError(f"{where}: chat_template_kwargs must be an object of template variables, got "
                         f"{type(kwargs).__name__}")
    return kwargs
