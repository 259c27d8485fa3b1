"""Recipes: one flat YAML file with TRL's own argument names, plus the toolkit's keys.

The keys are the fields of TRL's `ScriptArguments`, `SFTConfig` and `ModelConfig` (what `trl sft
--config` reads) and of `ToolkitArguments` below. We build those very dataclasses, so TRL's defaults and
its own validation apply; on top of that every key is checked by name (an unknown key names the
closest valid one) and by type (before TRL's `__post_init__` would fail on it with a traceback).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .problems import InputError

GUARD_POLICIES = ("reject", "repair", "warn")


@dataclass
class ToolkitArguments:
    """The toolkit's own recipe keys (TRL has no names for these)."""

    mask_guard: str = field(default="reject", metadata={"choices": list(GUARD_POLICIES),
                            "help": "what to do when the data would train on nothing: reject, repair or warn"})
    max_zero_rows: int = field(default=0, metadata={"help": "rows allowed to end with zero trainable tokens"})
    max_length_limit: int | None = field(default=None, metadata={
        "help": "repair may raise max_length up to this many tokens (what memory allows) to keep assistant tokens"})
    role_map: dict | None = field(default=None, metadata={
        "help": "role names of ShareGPT-style rows -> ChatML roles (default: human->user, gpt->assistant, ...)"})
    train_roles: list | None = field(default=None, metadata={
        "help": "assistant messages to train: assistant (all, default), answers (without tool calls), tool_calls"})
    train_turns: str = field(default="all", metadata={"choices": ["all", "last"],
                             "help": "all assistant turns, or only the conversation's last one"})
    prepared: str | None = field(default=None, metadata={
        "help": "train from a dataset `sft-toolkit prepare` saved (a directory); checked against this recipe"})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "stop after this many evaluations without improvement of metric_for_best_model (transformers' "
                "EarlyStoppingCallback); needs eval_strategy and metric_for_best_model"})


@dataclass
class Recipe:
    script: object  # trl.ScriptArguments
    sft: object  # trl.SFTConfig
    model: object  # trl.ModelConfig
    toolkit: ToolkitArguments
    source: str
    keys: dict
    mixture: object = None  # trl.DatasetMixtureConfig: `datasets`, `streaming`, `test_split_size`

    @property
    def tokenizer_name(self) -> str:
        return self.model.model_name_or_path


def _groups():
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    return {"script": ScriptArguments, "sft": SFTConfig, "model": ModelConfig, "mixture": DatasetMixtureConfig,
            "toolkit": ToolkitArguments}


def load_recipe(path: str, overrides: dict | None = None) -> Recipe:
    """Read, check and build a recipe; `overrides` (from the command line) win over the file."""
    keys = read_yaml(path)
    keys.update(overrides or {})
    return build_recipe(keys, source=path)


def read_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise InputError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping of key: value, got {type(data).__name__}")
    return data


def build_recipe(keys: dict, source: str = "<recipe>") -> Recipe:
    groups = _groups()
    fields = {name: (group, f) for group, cls in groups.items() for f in dataclasses.fields(cls) for name in [f.name]
              if f.init}
    by_group: dict[str, dict] = {group: {} for group in groups}
    for key, value in keys.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else "; see TRL's SFTConfig/ScriptArguments/ModelConfig"
            raise InputError(f"{source}: unknown key '{key}'{hint}")
        group, f = fields[key]
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            value = "true" if value else None  # transformers' own `train(resume_from_checkpoint=True)` meaning
        _check_value(source, key, value, f)
        by_group[group][key] = value
    sft_keys = by_group["sft"]
    sft_keys.setdefault("report_to", "none")
    if not _has_accelerator():
        # Preparing data needs no GPU; TRL's bf16 default would otherwise refuse to build the config on CPU.
        sft_keys.setdefault("use_cpu", True)
    try:
        built = {group: groups[group](**values) for group, values in by_group.items()}
    except (ValueError, TypeError) as err:
        raise InputError(f"{source}: {err}") from None
    _check_consistency(source, built)
    return Recipe(built["script"], built["sft"], built["model"], built["toolkit"], source, dict(keys),
                  mixture=built["mixture"])


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_value(source: str, key: str, value, f: dataclasses.Field) -> None:
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise InputError(f"{source}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    allowed = _base_types(f.type)
    if not allowed or value is None and type(None) in allowed:
        return
    if isinstance(value, bool) and bool not in allowed:
        raise InputError(f"{source}: {key}: expected {_names(allowed)}, got a boolean ({value})")
    if isinstance(value, int) and float in allowed:
        return
    if not isinstance(value, tuple(allowed)):
        raise InputError(f"{source}: {key}: expected {_names(allowed)}, got {type(value).__name__} ({value!r})")


def _base_types(annotation) -> set[type]:
    """Plain Python types a field accepts; empty when the annotation is too rich to check simply."""
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union:
        out = set()
        for arg in typing.get_args(annotation):
            inner = _base_types(arg)
            if not inner:
                return set()
            out |= inner
        return out
    if annotation is type(None):
        return {type(None)}
    origin = typing.get_origin(annotation)
    if origin in (list, dict, tuple):
        return {origin}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {str}
    if annotation in (bool, int, float, str, list, dict):
        return {annotation}
    return set()


def _names(allowed: set[type]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(sorted(names.get(t, t.__name__) for t in allowed))


def _check_consistency(source: str, built: dict) -> None:
    from .policy import policy_from

    sft = built["sft"]
    toolkit = built["toolkit"]
    if not policy_from(toolkit.train_roles, toolkit.train_turns, source).is_default and not sft.assistant_only_loss:
        raise InputError(f"{source}: train_roles / train_turns choose assistant turns to train, which needs "
                         "assistant_only_loss: true (without it every token is trained)")
    if sft.packing and sft.max_length is None:
        raise InputError(f"{source}: packing: true needs max_length (the packed sequence length); set max_length")
    resume = sft.resume_from_checkpoint
    if isinstance(resume, str) and resume != "true" and not Path(resume).is_dir():
        raise InputError(f"{source}: resume_from_checkpoint: {resume}: no such checkpoint directory (give a "
                         "checkpoint-N directory, or true for the last complete one in output_dir)")
    mixture = built["mixture"]
    for key, streaming in (("dataset_streaming", built["script"].dataset_streaming), ("streaming", mixture.streaming)):
        if streaming:
            raise InputError(f"{source}: {key}: true is refused: the mask guard counts every row, token and step "
                             "before training starts, which a stream can't give without reading it all; set "
                             f"{key}: false (datasets memory-maps the data from disk, so it needs no more memory)")
    for i, entry in enumerate(mixture.datasets):
        if not dataclasses.is_dataclass(entry) or not isinstance(entry.path, str):
            raise InputError(f"{source}: datasets[{i}]: each source is a mapping with path (and name, data_dir, "
                             f"data_files, split, columns, fraction), got {entry!r}")
    if mixture.test_split_size is not None and not mixture.datasets:
        raise InputError(f"{source}: test_split_size splits a datasets: mixture; with dataset_name, name the eval "
                         "split with dataset_test_split")
    _check_eval(source, built)
    if not built["model"].model_name_or_path:
        raise InputError(f"{source}: model_name_or_path is required (a local directory or a hub id; the tokenizer "
                         "is loaded from it)")
    if not built["script"].dataset_name and not built["toolkit"].prepared and not mixture.datasets:
        raise InputError(f"{source}: dataset_name is required (a hub id, a local directory, or a .jsonl/.json/"
                         ".parquet file), or datasets: (a mixture), or prepared: DIR (a dataset `sft-toolkit prepare` "
                         "saved)")


def _check_eval(source: str, built: dict) -> None:
    """Evaluation as `trl sft` runs it: the test split goes to the trainer only when eval_strategy is not "no"."""
    sft, toolkit = built["sft"], built["toolkit"]
    strategy = str(getattr(sft.eval_strategy, "value", sft.eval_strategy))
    if strategy == "no" and sft.do_eval:  # TrainingArguments sets do_eval itself only for an eval_strategy
        raise InputError(f"{source}: do_eval: true with eval_strategy: no evaluates nothing (trl sft passes no eval "
                         "dataset then); set eval_strategy: epoch or steps, or remove do_eval")
    if toolkit.early_stopping_patience is not None:
        if strategy == "no" or not sft.metric_for_best_model:
            raise InputError(f"{source}: early_stopping_patience needs evaluation to compare: set eval_strategy "
                             "(epoch or steps) and load_best_model_at_end: true (or metric_for_best_model)")
        if toolkit.early_stopping_patience < 1:
            raise InputError(f"{source}: early_stopping_patience: {toolkit.early_stopping_patience}: give at least 1 "
                             "(evaluations without improvement before stopping)")
    if strategy != "no" and toolkit.prepared:
        raise InputError(f"{source}: prepared: {toolkit.prepared} holds the train split only, and eval_strategy: "
                         f"{strategy} needs the eval split checked from the raw data; train without prepared, or "
                         "set eval_strategy: no")
