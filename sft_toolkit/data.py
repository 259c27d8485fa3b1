"""Load conversational data from wherever the user keeps it, as `trl sft` loads it, with errors that name the
dataset, config, split and line.

`datasets` does the loading (hub ids, local directories, folders whose dataset card lists `configs:`,
`.jsonl`/`.json`/`.parquet`/`.csv` files, `save_to_disk` folders) and TRL's own `get_dataset` combines a
`datasets:` mixture; this module adds what they lack for our purposes: a broken `.jsonl` line is named by
number before `datasets` gets to report it as a pyarrow error, a missing config or split is named with the
ones that exist, and each row of a mixture keeps the source it came from, so reports can count per source.
An alignment-handbook recipe's `dataset_mixture` is built here step by step as the handbook's `get_dataset`
builds it (seeded shuffles, a `weight` share of each source), which TRL's `get_dataset` does not reproduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .formats import conversation
from .problems import InputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FILE_SPLITS = ["train"]  # `datasets` reads a lone data file as one split, "train"


def load_rows(
    source: str,
    split: str = "train",
    *,
    streaming: bool = False,
    name: str | None = None,
    split_key: str = "dataset_train_split",
    config_key: str = "dataset_config",
):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) for `source`, with row order kept.

    name: the dataset's config (`load_dataset(..., name=)`, as `trl sft` passes `dataset_config`).
    split_key / config_key: the recipe keys an error about the split or config names.
    """
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise InputError(
                    f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv"
                )
            _no_config(source, name, config_key, "a single data file")
            _require_split(source, split, FILE_SPLITS, split_key)
            check_json_file(path)
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        if path.is_dir():
            if _saved_to_disk(path):
                _no_config(source, name, config_key, "a save_to_disk folder")
                loaded = datasets.load_from_disk(str(path))
                splits = list(loaded) if isinstance(loaded, datasets.DatasetDict) else FILE_SPLITS
                _require_split(source, split, splits, split_key)
                return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            with fresh_cache([path]):
                check_json_data_files(source, split, name=name)
                try:
                    return _load_builder(source, name, split, streaming, split_key, config_key)
                except InputError:
                    raise
                except Exception as err:  # noqa: BLE001 - a folder's files that don't load together: which, and why
                    raise InputError(
                        f"{source}: cannot load dataset ({folder_load_failure(source, split, name, err)})"
                    ) from None
        if looks_local(source):
            raise InputError(f"{source}: no such file or directory")
        return _load_builder(source, name, split, streaming, split_key, config_key)
    except InputError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise InputError(f"{source}: cannot load dataset split {split!r} ({_first_line(err)})") from None
    except Exception as err:  # datasets wraps hub/network/parse failures in many types
        raise InputError(f"{source}: cannot load dataset ({type(err).__name__}: {_first_line(err)})") from None


@contextlib.contextmanager
def fresh_cache(paths):
    """Load local data folders into a cache of their own current files.

    `datasets` (5.2) keys the cache of a folder whose dataset card lists `configs:` by the folder's name and
    config alone, not by its files: a folder edited since, or another folder of the same name elsewhere,
    loads the rows cached first (measured: two `data/` folders with different rows gave the first one's
    rows). So while loading, the cache root is a directory named by a hash of the folders' file names,
    sizes and modification times; unchanged data reuses its cache, changed data gets a new one.
    """
    import datasets

    folders = sorted(str(Path(p).resolve()) for p in paths if Path(p).is_dir())
    if not folders:
        yield
        return
    digest = hashlib.sha256()
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                stat = os.stat(os.path.join(root, name))
                digest.update(f"{os.path.join(root, name)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = Path(saved) / "sft_toolkit_local" / digest.hexdigest()[:16]
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = saved


def _no_config(source: str, name: str | None, config_key: str, what: str) -> None:
    if name is not None:
        raise InputError(f"{source}: {config_key}: {name!r}, but {what} has no configs; remove {config_key}")


def _require_split(source: str, split: str, splits: list[str], split_key: str) -> None:
    if split not in splits:
        raise InputError(
            f"{source}: {split_key}: no split {split!r} (its splits: {', '.join(splits)}); set "
            f"{split_key} to one of them" + _EVAL_HINT.get(split_key, "")
        )


_EVAL_HINT = {"dataset_test_split": ", split one off with datasets: + test_split_size, or set eval_strategy: no"}


def _load_builder(
    source: str, name: str | None, split: str, streaming: bool, split_key: str, config_key: str, **load_kwargs
):
    """`datasets.load_dataset` for a hub id or a data folder, its config and split errors said in recipe terms."""
    import datasets

    try:
        return datasets.load_dataset(source, name=name, split=split, streaming=streaming, **load_kwargs)
    except ValueError as err:
        text = str(err)
        if text.startswith("Config name is missing"):
            raise InputError(
                f"{source}: the dataset has several configs ({', '.join(_configs(source, text))}) and "
                f"the recipe names none; set {config_key} to one of them"
            ) from None
        if text.startswith("BuilderConfig") and "not found" in text:
            raise InputError(
                f"{source}: {config_key}: {name!r} is not one of the dataset's configs "
                f"({', '.join(_configs(source, text))}); set {config_key} to one of them"
            ) from None
        if text.startswith("Unknown split"):
            _require_split(source, split, _splits(source, name, text), split_key)
        raise


def _configs(source: str, message: str) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_config_names(source))
    except Exception:  # noqa: BLE001 - fall back to the list `datasets` printed
        return _listed(message)


def _splits(source: str, name: str | None, message: str) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(source, name))
    except Exception:  # noqa: BLE001 - fall back to the list `datasets` printed
        return _listed(message)


def _listed(message: str) -> list[str]:
    """The names in the first `[...]` of a `datasets` error message."""
    inside = message[message.find("[") + 1 : message.find("]")] if "[" in message else ""
    return [part.strip().strip("'\"") for part in inside.split(",") if part.strip()] or ["(unknown)"]


def eval_enabled(sft) -> bool:
    """Whether the trainer evaluates: `trl sft` passes the test split only when eval_strategy is not "no"."""
    return str(getattr(sft.eval_strategy, "value", sft.eval_strategy)) != "no"


@dataclass
class Splits:
    """What `trl sft` hands the trainer: the train split, and the eval split when evaluation is on.

    A mixture (`datasets:`) also says, for each row of each split, the source it came from (an index into
    `sources`); for one dataset `sources` is empty and the per-row arrays are None.
    """

    train: object
    eval: object | None = None
    train_label: str = ""  # how messages name the split, e.g. "data/ split 'train'"
    eval_label: str = ""
    sources: list[str] = field(default_factory=list)
    train_source: np.ndarray | None = None
    eval_source: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)  # for the user: e.g. `datasets` wins over `dataset_name`


def load_splits(recipe, *, with_eval: bool | None = None) -> Splits:
    """The recipe's train (and eval) rows, loaded as `trl sft` loads them (trl/scripts/sft.py).

    `datasets:` (a mixture, TRL's `get_dataset`) wins over `dataset_name`, as in `trl sft`; otherwise
    `dataset_name` with `dataset_config` (passed as `name=`), `dataset_train_split` and `dataset_test_split`.
    with_eval: load the eval split (default: when eval_strategy is not "no").
    """
    script = recipe.script
    with_eval = eval_enabled(recipe.sft) if with_eval is None else with_eval
    mixture = getattr(recipe, "mixture", None)
    if mixture is not None and mixture.datasets:
        return _load_mixture(recipe, with_eval)
    if getattr(recipe, "handbook_mixture", None) is not None:
        return _load_handbook_mixture(recipe, with_eval)
    source, config = script.dataset_name, script.dataset_config
    where = f"{source}" + (f" (config {config!r})" if config else "")
    train = load_rows(source, script.dataset_train_split, name=config)
    splits = Splits(train=train, train_label=where)
    if unread := unread_data_files(source, name=config):
        splits.notes.append(unread_files_note(f"dataset_name: {source}", unread))
    if with_eval:
        splits.eval = load_rows(source, script.dataset_test_split, name=config, split_key="dataset_test_split")
        splits.eval_label = f"{where} split {script.dataset_test_split!r}"
    return splits


def _load_mixture(recipe, with_eval: bool) -> Splits:
    """A `datasets:` mixture through TRL's own `get_dataset` (columns, fraction, concatenation), each source
    checked first so that an error names it. `test_split_size` splits the combined rows as TRL does
    (`train_test_split`), with the recipe's `seed` so that check-data and train see the same split."""
    import datasets
    from trl import DatasetMixtureConfig, get_dataset

    script, mixture = recipe.script, recipe.mixture
    notes = []
    if script.dataset_name:
        notes.append(
            f"both datasets and dataset_name are set: as trl sft does, the datasets mixture is loaded and "
            f"dataset_name ({script.dataset_name}) is ignored"
        )
    sources = [_loadable(i, source) for i, source in enumerate(mixture.datasets)]
    labels = [_source_label(i, source) for i, source in enumerate(mixture.datasets)]
    for label, source in zip(labels, sources):
        if source.data_dir is None and source.data_files is None:
            if unread := unread_data_files(source.path, name=source.name):
                notes.append(unread_files_note(label, unread))
    lengths = []
    with fresh_cache([source.path for source in sources]):
        for i, source in enumerate(sources):
            one = _mixture_call(
                labels[i],
                lambda: get_dataset(DatasetMixtureConfig(datasets=[dataclasses.replace(source, fraction=None)]))[
                    "train"
                ],
                source,
                i,
            )
            lengths.append(len(one))
        combined = _mixture_call(
            "combining the sources", lambda: get_dataset(DatasetMixtureConfig(datasets=sources))["train"]
        )
    taken = _taken_rows(lengths, [s.fraction for s in sources])
    if sum(taken) != len(combined):
        raise RuntimeError(f"mixture rows per source {taken} don't add up to the {len(combined)} rows TRL combined")
    origin = np.repeat(np.arange(len(sources)), taken)
    parts = {"train": (combined, origin)}
    if mixture.test_split_size is not None:
        index = datasets.Dataset.from_dict({"row": np.arange(len(combined))})
        try:
            split = index.train_test_split(test_size=mixture.test_split_size, seed=recipe.sft.seed)
        except ValueError as err:
            raise InputError(f"test_split_size: {mixture.test_split_size}: {_first_line(err)}") from None
        parts = {
            name: (combined.select(split[name]["row"]), origin[np.asarray(split[name]["row"], dtype=np.int64)])
            for name in ("train", "test")
        }
    names = list(parts)

    def pick(split: str, key: str):
        if split not in parts:
            hint = (
                "; set test_split_size to split one off the mixture, or eval_strategy: no"
                if key == "dataset_test_split"
                else ""
            )
            raise InputError(
                f"the mixture has no split {split!r} (its splits: {', '.join(names)}); set {key} to one of them{hint}"
            )
        return parts[split]

    return _mixture_splits(pick, script, "datasets mixture", labels, notes, with_eval)


SOURCE_COLUMN = "__sft_toolkit_source__"  # rides along a handbook mixture's shuffles and split, then is dropped


def _load_handbook_mixture(recipe, with_eval: bool) -> Splits:
    """`dataset_mixture` as the alignment-handbook's `get_dataset` builds it: each source's split (with its
    config) and `columns`; of each, a `weight` share (`int(len * weight)` rows) after a shuffle with the mixture's
    `seed`; all of them concatenated and shuffled with that seed; `test_split_size` split off with it
    (`train_test_split`). A column naming each row's source rides along (shuffles and splits permute by seed and
    length only), so reports count per source."""
    import datasets

    script, mixture = recipe.script, recipe.handbook_mixture
    notes = []
    if script.dataset_name:
        notes.append(
            f"both dataset_mixture and dataset_name are set: as the handbook does, the mixture is loaded and "
            f"dataset_name ({script.dataset_name}) is ignored"
        )
    parts, labels = [], []
    for i, source in enumerate(mixture.datasets):
        where = f"dataset_mixture.datasets[{i}]"
        rows = load_rows(
            source.id, source.split, name=source.config, split_key=f"{where}.split", config_key=f"{where}.config"
        )
        if unread := unread_data_files(source.id, name=source.config):
            notes.append(unread_files_note(f"{where} ({source.id})", unread))
        if source.columns is not None:
            missing = [column for column in source.columns if column not in rows.column_names]
            if missing:
                raise InputError(
                    f"{where} ({source.id}): columns: no column {', '.join(missing)} (its columns: "
                    f"{', '.join(rows.column_names)})"
                )
            rows = rows.select_columns(source.columns)
        if source.weight is not None:
            rows = rows.shuffle(seed=mixture.seed).select(range(int(len(rows) * source.weight)))
        parts.append(rows.add_column(SOURCE_COLUMN, [i] * len(rows)))
        config = f", config {source.config!r}" if source.config else ""
        labels.append(f"{where} ({source.id}{config}, split {source.split!r}, weight {source.weight})")
    try:
        combined = datasets.concatenate_datasets(parts).shuffle(seed=mixture.seed)
    except ValueError as err:
        raise InputError(
            f"dataset_mixture: the sources can't be concatenated ({_first_line(err)}); give every source the same "
            "columns: [...]"
        ) from None
    splits = {"train": combined}
    if mixture.test_split_size is not None:
        try:
            splits = dict(combined.train_test_split(test_size=mixture.test_split_size, seed=mixture.seed))
        except ValueError as err:
            raise InputError(
                f"dataset_mixture.test_split_size: {mixture.test_split_size}: {_first_line(err)}"
            ) from None

    def pick(split: str, key: str):
        if split not in splits:
            raise InputError(
                f"the mixture has no split {split!r} (its splits: {', '.join(splits)}); set {key} to one of them"
                + (
                    "; set dataset_mixture.test_split_size, or eval_strategy: no"
                    if key == "dataset_test_split"
                    else ""
                )
            )
        rows = splits[split]
        return rows.remove_columns(SOURCE_COLUMN), np.asarray(rows[SOURCE_COLUMN], dtype=np.int64)

    return _mixture_splits(pick, script, "dataset_mixture", labels, notes, with_eval)


def _mixture_splits(pick, script, mixture: str, labels, notes, with_eval: bool) -> Splits:
    """A mixture's train split (and eval split, `with_eval`), each with its rows' sources, as `pick` cuts them."""
    train, train_source = pick(script.dataset_train_split, "dataset_train_split")
    out = Splits(
        train=train,
        train_label=f"{mixture} split {script.dataset_train_split!r}",
        sources=labels,
        train_source=train_source,
        notes=notes,
    )
    if with_eval:
        out.eval, out.eval_source = pick(script.dataset_test_split, "dataset_test_split")
        out.eval_label = f"{mixture} split {script.dataset_test_split!r}"
    return out


def _loadable(i: int, source):
    """A mixture source as `datasets.load_dataset` takes it: a local data file becomes its builder with
    `data_files` (an extension: TRL passes `path` as is, and `datasets` can't load a file given as `path`)."""
    path = Path(source.path)
    where = f"datasets[{i}]: {source.path}"
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise InputError(f"{where}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
        if source.name is not None or source.data_files is not None:
            raise InputError(f"{where}: a single data file takes no name / data_files; remove them")
        if source.split != "train":
            raise InputError(f"{where}: split: no split {source.split!r} (a single data file's splits: train)")
        check_json_file(path)
        return dataclasses.replace(source, path=builder, data_files=str(path))
    if not path.exists() and looks_local(source.path) and source.data_files is None:
        raise InputError(f"{where}: no such file or directory")
    if path.is_dir() or (source.path == "json" and source.data_files is not None):
        try:
            check_json_data_files(
                source.path, source.split, name=source.name, data_dir=source.data_dir, data_files=source.data_files
            )
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
    return source


def _source_label(i: int, source) -> str:
    extra = "".join(
        f", {k}={getattr(source, k)!r}"
        for k in ("name", "data_dir", "data_files", "fraction")
        if getattr(source, k) is not None
    )
    return f"datasets[{i}] ({source.path}{extra}, split {source.split!r})"


def _mixture_call(label: str, load, source=None, i: int | None = None):
    """Run a `get_dataset` call; say a failure in recipe terms, naming the source."""
    try:
        if source is None:
            return load()
        try:
            return load()
        except ValueError as err:  # the config / split errors, said with what exists
            text = str(err)
            if text.startswith(("Config name is missing", "BuilderConfig", "Unknown split")):
                _load_builder(
                    source.path,
                    source.name,
                    source.split,
                    False,
                    f"datasets[{i}].split",
                    f"datasets[{i}].name",
                    data_dir=source.data_dir,
                    data_files=source.data_files,
                )
            raise
    except InputError as err:
        raise InputError(f"{label}: {err}") from None
    except Exception as err:  # noqa: BLE001 - datasets / TRL failures of many types
        if source is not None and Path(source.path).is_dir():
            kwargs = {"data_dir": source.data_dir, "data_files": source.data_files}
            reason = folder_load_failure(source.path, source.split, source.name, err, **kwargs)
            raise InputError(f"{label}: cannot load ({reason})") from None
        raise InputError(f"{label}: cannot load ({type(err).__name__}: {_first_line(err)})") from None


def _taken_rows(lengths: list[int], fractions: list[float | None]) -> list[int]:
    """Rows each source contributes, as TRL's `get_dataset` takes them (the first round(weight * total))."""
    if all(f is None for f in fractions):
        return list(lengths)
    weights = [f / sum(fractions) for f in fractions]
    total = min(n / w for n, w in zip(lengths, weights) if w > 0)
    return [round(w * total) for w in weights]


def first_train_row(recipe) -> dict | None:
    """The first training row, read without loading the rest where the source allows it."""
    mixture = getattr(recipe, "mixture", None)
    if mixture is not None and mixture.datasets or getattr(recipe, "handbook_mixture", None) is not None:
        train = load_splits(recipe, with_eval=False).train  # a mixture's first row is known once it is built
        return train[0] if len(train) else None
    script = recipe.script
    return next(
        iter(load_rows(script.dataset_name, script.dataset_train_split, streaming=True, name=script.dataset_config)),
        None,
    )


def check_json_file(path: Path) -> None:
    """The checks of a `.jsonl` file (`check_jsonl`), and of a `.json` file's rows when it holds a list of them
    (a `.json` file of JSON Lines is checked as one); other files are datasets' to read."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        check_jsonl(path)
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_bytes(), parse_constant=NonFinite)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":  # JSON Lines written to a .json file, which datasets reads as such
                check_jsonl(path)
            return  # datasets says what is wrong with the file
        except (OSError, UnicodeDecodeError):
            return
        for index, row in enumerate(rows if isinstance(rows, list) else []):
            where = _non_finite_row_field(row)
            if where:
                raise InputError(f"{path}: row {index} (counted from 0): {where} {NON_FINITE_HELP}")


def check_json_data_files(source: str, split: str, **load_kwargs) -> None:
    """`check_json_file`'s NaN/Infinity check on each JSON / JSON Lines file that `datasets.load_dataset(source,
    split=split, **load_kwargs)` reads for a local folder (or the `json` builder given `data_files`): the files as
    `datasets` resolves them (`load_dataset_builder`: the dataset card's `configs:`, else its data-file patterns,
    the builder its files' extensions pick), so a `weight: NaN` in one file of a folder is named like one in a
    single file instead of loading as null (a switched-off turn trained). Files another builder reads are not
    JSON; a source `datasets` can't resolve is left for the load to report."""
    resolved = _split_files(source, split, **load_kwargs)
    if resolved is None or resolved[0] != "json":
        return
    for file in resolved[1]:
        if file.suffix.lower() in (".json", ".jsonl") and file.is_file():
            _check_json_values(_under(source, file))


def _split_files(source: str, split: str, **load_kwargs) -> tuple[str, list[Path]] | None:
    """The builder `datasets.load_dataset(source, split=split, **load_kwargs)` uses and the files it reads for the
    split, as `datasets` resolves them (`load_dataset_builder`: the dataset card's `configs:`, else its data-file
    patterns); None when it can't resolve the source (the load says why, in recipe terms)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(source, **load_kwargs)
    except Exception:  # noqa: BLE001 - load_dataset says what is wrong with the source, in recipe terms
        return None
    return builder.name, [Path(f) for f in (builder.config.data_files or {}).get(split, [])]


def unread_data_files(source: str, **load_kwargs) -> list[str]:
    """The data files (`.jsonl`, `.json`, `.parquet`, `.csv`) in a local folder that `datasets.load_dataset(source,
    **load_kwargs)` reads into no split, relative to the folder: it infers a folder's splits from its file names
    (`train`, `test`, `valid`, `dev`... in a name make a split, and once one does, files named after none are left
    out) and reads only the files of the most common format, so rows can go unread without a word. Empty when the
    folder's dataset card lists its `configs:` (the files are then the user's choice) or `datasets` can't
    resolve the folder (the load reports that)."""
    import datasets

    folder = Path(source)
    if not folder.is_dir() or _card_lists_configs(folder) or _saved_to_disk(folder):
        return []
    try:
        with fresh_cache([folder]):
            builder = datasets.load_dataset_builder(source, **load_kwargs)
        read = {Path(f).resolve() for files in (builder.config.data_files or {}).values() for f in files}
    except Exception:  # noqa: BLE001 - load_dataset says what is wrong with the source, in recipe terms
        return []
    unread = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or path.suffix.lower() not in FILE_BUILDERS or path.resolve() in read:
                continue
            unread.append(str(path.relative_to(folder)))
    return unread


def unread_files_note(where: str, unread: list[str]) -> str:
    """The report's warning about a folder's `unread_data_files` (`where`: the recipe key or source naming it)."""
    shown = ", ".join(unread[:10]) + (f" and {len(unread) - 10} more" if len(unread) > 10 else "")
    return (
        f"{where}: {len(unread)} data files in the folder are read into no split, so their rows are not trained or "
        f"counted: {shown} (datasets splits a folder by its file names: a file named after a split, e.g. "
        "test_cases.jsonl, makes names without one unread; and it reads one format only); rename the files, or "
        "list them under configs: in the folder's README.md"
    )


def _saved_to_disk(folder: Path) -> bool:
    """A `save_to_disk` folder (`load_rows` reads it with `load_from_disk`, every file its own)."""
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def _card_lists_configs(folder: Path) -> bool:
    """Whether the folder's README.md (its dataset card) has `configs:` in its YAML header."""
    import yaml

    readme = folder / "README.md"
    try:
        text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
        header = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") and text.count("---") >= 2 else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return True  # a card that can't be read: no verdict on its files
    return isinstance(header, dict) and "configs" in header


def _check_json_values(path: Path) -> None:
    """A NonFinite in a checked field of a `.json` file's rows or a `.jsonl` file's lines, named by file, row
    (or line) and field; lines that are not JSON are left for `datasets` to report. Only text that spells `NaN`
    or `Infinity` is parsed, and a file unchanged since its check in this process is not read again."""
    stat = path.stat()
    state = ("values", str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if state in _CHECKED_JSONL:
        return
    _check_json_text(path)
    _CHECKED_JSONL.add(state)


def _spells_non_finite(raw: bytes) -> bool:
    return b"NaN" in raw or b"Infinity" in raw


def _file_spells_non_finite(path: Path) -> bool:
    """Whether the file's bytes hold `NaN` or `Infinity` anywhere (one scan, memory-mapped: most files don't)."""
    import mmap

    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"NaN") >= 0 or data.find(b"Infinity") >= 0


def _check_json_text(path: Path) -> None:
    try:
        if not _file_spells_non_finite(path):
            return
    except (OSError, ValueError):
        return  # unreadable here: datasets says what is wrong with the file
    if path.suffix.lower() == ".json":
        try:
            text = path.read_bytes()
            if not _spells_non_finite(text):
                return
            rows = json.loads(text, parse_constant=NonFinite)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                return
            rows = None  # JSON Lines written to a .json file, which datasets reads as such
        except (OSError, UnicodeDecodeError):
            return
        if rows is not None:
            for index, row in enumerate(rows if isinstance(rows, list) else []):
                if where := _non_finite_row_field(row):
                    raise InputError(f"{path}: row {index} (counted from 0): {where} {NON_FINITE_HELP}")
            return
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not _spells_non_finite(raw):
                continue
            try:
                row = json.loads(raw, parse_constant=NonFinite)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if where := _non_finite_row_field(row):
                raise InputError(f"{path}:{number}: {where} {NON_FINITE_HELP}")


# The fields of a row that decide what is trained: a NonFinite in one of them changes it without a word.
CHECKED_FIELDS = (
    "messages",
    "conversations",
    "prompt",
    "completion",
    "input_ids",
    "labels",
    "assistant_masks",
    "completion_mask",
)
NON_FINITE_HELP = (
    "is not a JSON number (datasets would read it as null, or its whole column as floats, and train the row as "
    "something else: a message as unmarked, a mask's Infinity as 1); write a finite number (train/weight: 0 or 1, "
    "token ids and mask bits as integers)"
)


def _non_finite_row_field(row) -> str | None:
    """The first checked field of a row holding a NonFinite (`messages[1].weight (NaN)`, `labels[3] (Infinity)`)."""
    if not isinstance(row, dict):
        return None
    for name in CHECKED_FIELDS:
        where = _non_finite_field(row.get(name), name)
        if where:
            return where
    return None


# The .jsonl files `check_jsonl` passed in this process (and a folder's JSON files `_check_json_values` passed,
# tagged "values"), by identity and state (device, inode, size, change
# times): `prepare` reads the dataset three times (the first row twice, then all of it) and a file unchanged
# since its check needs no second one.
_CHECKED_JSONL: set[tuple] = set()


def check_jsonl(path: Path) -> None:
    """Name the first broken line of a JSON Lines file (datasets would report a pyarrow offset), and say
    so when there is no row at all (datasets fails on an empty file with a bare StopIteration)."""
    stat = path.stat()
    state = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if state in _CHECKED_JSONL:
        return
    _check_jsonl_lines(path)
    _CHECKED_JSONL.add(state)


def _check_jsonl_lines(path: Path) -> None:
    rows = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw, parse_constant=NonFinite)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"{path}:{number}: not valid JSON ({err}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            where = _non_finite_row_field(row) if _spells_non_finite(raw) else None  # only such text parses to one
            if where:
                raise InputError(f"{path}:{number}: {where} {NON_FINITE_HELP}")
            rows += 1
    if not rows:
        raise InputError(
            f"{path}: the dataset is empty (no rows); give at least one conversation, one JSON object per line"
        )


class NonFinite(str):
    """`NaN`, `Infinity` or `-Infinity` in a JSON file: Python's json reads them, but they are not JSON, and
    `datasets` turns them into null, or a list of numbers holding one into floats, without a word."""


def _non_finite_field(value, where: str) -> str | None:
    """The first field under `value` holding a NonFinite (`messages[1].weight (NaN)`), None when there is none."""
    if isinstance(value, NonFinite):
        return f"{where} ({value})"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found = _non_finite_field(inner, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}")
        if found:
            return found
    return None


def looks_local(spec: str) -> bool:
    """A path the user means on this machine (not a hub id `org/name`): a known file suffix, an explicit
    directory prefix, or more than one '/'. Used to say "no such file" instead of a hub lookup failure."""
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in {*FILE_BUILDERS, ".jinja", ".j2", ".yaml", ".yml"}
    )


def read_conversation(source: str, row: int | None = None) -> tuple[list[dict], list[dict] | None]:
    """Messages (and tools) from a JSON file holding one conversation, or from row `row` of a dataset."""
    path = Path(source)
    if row is None and path.suffix.lower() == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{source}: not valid JSON ({err})") from None
        if not _is_rows(data):
            return _messages_of(data, source)
    rows = load_rows(source)
    index = row or 0
    if not 0 <= index < len(rows):
        raise InputError(f"{source}: --row {index} is out of range (the dataset has {len(rows)} rows)")
    return _messages_of(rows[index], f"{source} row {index}")


def _is_rows(data) -> bool:
    """Whether a .json file's content is a dataset's rows (a list of conversations, as `datasets` reads a JSON
    array), not one conversation's list of messages."""
    return (
        isinstance(data, list)
        and bool(data)
        and all(
            isinstance(item, dict) and ("messages" in item or "conversations" in item) and "role" not in item
            for item in data
        )
    )


def _messages_of(data, where: str) -> tuple[list[dict], list[dict] | None]:
    """A bare list of messages, or a row read by its format's converter (`formats.conversation`), as check-data
    and train read it."""
    if isinstance(data, list):
        return data, None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a list of messages or an object with a 'messages' list")
    data = conversation(data, where)
    tools = data.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    return data["messages"], tools


def folder_load_failure(source: str, split: str, name: str | None, err: Exception, **load_kwargs) -> str:
    """What stopped `datasets` loading a local folder, in the user's terms: the file whose columns or column types
    differ from the first file's (datasets reads a folder's files into one table, and says only "An error occurred
    while generating the dataset"), else the innermost error datasets wrapped."""
    import datasets

    inner = err
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    reason = f"{type(inner).__name__}: {_first_line(inner)}"
    if isinstance(inner, datasets.table.CastError):
        reason = f"the files' columns differ: {inner.details()}"
    resolved = _split_files(source, split, name=name, **load_kwargs)
    if resolved is None:  # the folder can't be resolved either: the wrapped error is all there is
        return reason
    builder_name, files = resolved
    schemas = []
    for file in files:
        try:
            schemas.append((file, _file_schema(file, builder_name)))
        except Exception as file_err:  # noqa: BLE001 - this file alone does not load: name it
            return f"{_under(source, file)}: {type(file_err).__name__}: {_first_line(file_err)}"
    schemas = [(file, schema) for file, schema in schemas if schema is not None]
    for file, schema in schemas[1:]:
        first_file, first = schemas[0]
        if schema.names != first.names:
            return (
                f"{_under(source, file)} has the columns {schema.names}, {_under(source, first_file)} has "
                f"{first.names}; give every file of the folder the same fields"
            )
        for column in schema:
            if not column.type.equals(first.field(column.name).type):
                return (
                    f"{_under(source, file)}: column {column.name!r} is {column.type}, in "
                    f"{_under(source, first_file)} it is {first.field(column.name).type}; give every file of the folder the same field types "
                    f"(datasets: {reason})"
                )
    return reason


def _file_schema(path: Path, builder: str):
    """The Arrow schema of one data file as pyarrow infers it from the file's first block, without reading the rest
    (None for a format not compared here)."""
    if builder == "json" and path.suffix.lower() == ".jsonl":
        import pyarrow.json

        return pyarrow.json.open_json(path).schema
    if builder == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_schema(path)
    if builder == "csv":
        import pyarrow.csv

        return pyarrow.csv.open_csv(path).schema
    return None


def _under(source: str, file: Path) -> Path:
    """`file` named under the folder as the user gave it (as it is when it lies elsewhere)."""
    try:
        return Path(source) / file.resolve().relative_to(Path(source).resolve())
    except ValueError:
        return file


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_template_kwargs(source: str, row: int | None = None) -> dict:
    """The `chat_template_kwargs` of the conversation `read_conversation` reads ({} when it has none): the
    variables TRL passes to the template for that row (e.g. `enable_thinking`)."""
    path = Path(source)
    data, where = None, source
    if row is None and path.suffix.lower() == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{source}: not valid JSON ({err})") from None
    if data is None or _is_rows(data):  # a dataset (or a JSON array of its rows): the row asked for
        data, where = load_rows(source)[row or 0], f"{source} row {row or 0}"
    kwargs = data.get("chat_template_kwargs") if isinstance(data, dict) else None
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InputError(
            f"{where}: chat_template_kwargs must be an object of template variables, got {type(kwargs).__name__}"
        )
    return kwargs
