"""Recipes: one flat YAML file with TRL's own argument names, plus the toolkit's keys.

The keys are the fields of TRL's `ScriptArguments`, `SFTConfig`, `ModelConfig` and `DatasetMixtureConfig`
(what `trl sft --config` reads) and of `ToolkitArguments` below. We build those very dataclasses, so TRL's
defaults and its own validation apply; on top of that every key is checked by name (an unknown key names the
closest valid one, a renamed one its new spelling), by what the toolkit does with it (`recipe_keys`: a key it
refuses says why), by type (before TRL's `__post_init__` would fail on it with a traceback) and by range
(`VALUE_RANGES`: a batch size of 0 or a NaN learning rate is refused by name, not met as a traceback or a
silent cut). A key written twice in the file is refused with both line numbers. Values are read as `trl sft
--config` reads them: text given for a number or a boolean converts as TrlParser's argparse converts it
(`learning_rate: 1e-5`), and `env:` sets environment variables as TrlParser does.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .problems import InputError
from .recipe_keys import ENV_KEY, HANDBOOK_MIXTURE_KEY, OLD_VALUES, RECIPE_KEYS, Handling, renamed_message

if TYPE_CHECKING:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig


class GuardMode(enum.StrEnum):
    """What the mask guard does when the data would train on nothing (`mask_guard`; see `train.guard`)."""

    REJECT = "reject"  # stop before any weights load, with the numbers and the fix
    REPAIR = "repair"  # make the smallest change that makes the run sound, and say so
    WARN = "warn"  # go on, saying what is wrong


@dataclass
class ToolkitArguments:
    """The toolkit's own recipe keys (TRL has no names for these)."""

    mask_guard: str = field(
        default="reject",
        metadata={
            "choices": [mode.value for mode in GuardMode],
            "help": "what to do when the data would train on nothing: reject, repair or warn",
        },
    )
    max_zero_rows: int = field(default=0, metadata={"help": "rows allowed to end with zero trainable tokens"})
    max_length_limit: int | None = field(
        default=None,
        metadata={
            "help": "repair may raise max_length up to this many tokens (what memory allows) to keep assistant tokens"
        },
    )
    role_map: dict | None = field(
        default=None,
        metadata={
            "help": "role names of ShareGPT-style rows -> ChatML roles (default: human->user, gpt->assistant, ...)"
        },
    )
    train_roles: list | str | None = field(
        default=None,
        metadata={
            "help": "assistant messages to train: assistant (all, default), answers (without tool calls), tool_calls"
        },
    )
    train_turns: str = field(
        default="all",
        metadata={"choices": ["all", "last"], "help": "all assistant turns, or only the conversation's last one"},
    )
    prepared: str | None = field(
        default=None,
        metadata={
            "help": "train from a dataset `sft-toolkit prepare` saved (a directory); checked against this recipe"
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "after LoRA training, also save the base model with the adapter merged in (output_dir/merged)"
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "start afresh in an output_dir that holds an earlier run: its checkpoints are deleted (only "
            "folders whose trainer_state.json shows they are checkpoints) and its model overwritten (TRL's "
            "name; transformers 5 no longer has the field)"
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "stop after this many evaluations without improvement of metric_for_best_model (transformers' "
            "EarlyStoppingCallback); needs eval_strategy and metric_for_best_model"
        },
    )


@dataclass(frozen=True)
class HandbookSource:
    """One source of an alignment-handbook `dataset_mixture`, with the defaults its ScriptArguments gives."""

    id: str
    config: str | None = None
    split: str = "train"
    columns: list | None = None
    weight: float | None = 1.0  # the share of the source kept after a shuffle with the mixture's seed


@dataclass(frozen=True)
class HandbookMixture:
    """The alignment-handbook's `dataset_mixture` (its scripts' ScriptArguments), loaded by `data.load_splits`
    as the handbook's `get_dataset` loads it."""

    datasets: tuple[HandbookSource, ...]
    seed: int = 0
    test_split_size: float | None = None


@dataclass(frozen=True)
class Recipe:
    """A checked recipe. It is not changed as it flows through a command: a step that changes a setting (the
    mask guard's repairs) makes a new recipe (`with_sft`) and hands that one on."""

    script: ScriptArguments
    sft: SFTConfig
    model: ModelConfig
    toolkit: ToolkitArguments
    source: str
    keys: dict
    mixture: DatasetMixtureConfig | None = None  # `datasets`, `streaming`, `test_split_size`
    env: dict = field(default_factory=dict)  # `env:` as set in os.environ (name -> text), as TrlParser sets it
    handbook_mixture: HandbookMixture | None = None  # `dataset_mixture`, the alignment-handbook's mixture

    @property
    def tokenizer_name(self) -> str:
        return self.model.model_name_or_path

    @property
    def guard_mode(self) -> GuardMode:
        return GuardMode(self.toolkit.mask_guard)

    def with_sft(self, **changes) -> Recipe:
        """A new recipe whose SFTConfig has `changes`; this one, and its SFTConfig, stay as they are."""
        return dataclasses.replace(self, sft=with_changes(self.sft, **changes))


def with_changes(config, **changes):
    """A copy of the dataclass `config` with `changes` set; `config` itself stays as it is.

    Not `dataclasses.replace`: that builds the object again through `__post_init__`, and TrainingArguments'
    (SFTConfig's base) has side effects: it emits its deprecation warnings again, reads and writes accelerate's
    environment variables, registers a new DeepSpeed config globally, and validates against the environment of
    that moment. A shallow copy keeps every field as it was built (and the distributed state already set up);
    only the named fields change. Nested values (dicts, lists) are shared, so a change sets a new one.
    """
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise TypeError(f"{type(config).__name__} has no field {', '.join(unknown)}")
    changed = copy.copy(config)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed


def _groups():
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    return {
        "script": ScriptArguments,
        "sft": SFTConfig,
        "model": ModelConfig,
        "mixture": DatasetMixtureConfig,
        "toolkit": ToolkitArguments,
    }


def load_recipe(path: str, overrides: dict | None = None) -> Recipe:
    """Read, check and build a recipe; `overrides` (from the command line) win over the file. As `build_recipe`,
    this sets the recipe's `env:` entries in os.environ."""
    keys = read_yaml(path)
    keys.update(overrides or {})
    return build_recipe(keys, source=path)


def read_yaml(path: str) -> dict:
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{path}: is a directory; give the recipe's .yaml file")
    if not file.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except DuplicateKey as err:
        raise InputError(f"{path}: {err}") from None
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


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice: YAML keeps the last value without a word."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key written twice in one mapping (naming both lines)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if first is not None:
                raise DuplicateKey(f"key '{key}' is written twice (lines {first} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def build_recipe(keys: dict, source: str = "<recipe>") -> Recipe:
    """The checked recipe of `keys` (InputError naming `source` and the key otherwise).

    Not free of side effects: as TrlParser does, the `env:` entries are set in os.environ first, before the other
    keys are checked, so they stay set when the recipe is then refused, and stay set for the rest of the process
    (a second recipe built in it without them does not unset them)."""
    groups = _groups()
    fields = {
        name: (group, f)
        for group, cls in groups.items()
        for f in dataclasses.fields(cls)
        for name in [f.name]
        if f.init
    }
    by_group: dict[str, dict] = {group: {} for group in groups}
    hints = {group: typing.get_type_hints(cls) for group, cls in groups.items()}
    env = _environment(source, keys[ENV_KEY]) if ENV_KEY in keys else {}
    handbook_mixture = handbook_mixture_from(source, keys.get(HANDBOOK_MIXTURE_KEY))
    for key, value in keys.items():
        if key in (ENV_KEY, HANDBOOK_MIXTURE_KEY):
            continue
        if key not in fields:
            renamed = renamed_message(str(key), value)
            if renamed:
                raise InputError(f"{source}: {renamed}")
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else "; see TRL's SFTConfig/ScriptArguments/ModelConfig"
            raise InputError(f"{source}: unknown key '{key}'{hint}")
        group, f = fields[key]
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            value = "true" if value else None  # transformers' own `train(resume_from_checkpoint=True)` meaning
        value = as_trl_parses(value, hints[group][key])
        _check_refused(source, key, value, f)
        _check_value(source, key, value, f, hints[group][key])
        _check_range(source, key, value)
        by_group[group][key] = value
    sft_keys = by_group["sft"]
    sft_keys.setdefault("report_to", "none")
    if not _has_accelerator():
        # Preparing data needs no GPU; TRL's bf16 default would otherwise refuse to build the config on CPU.
        sft_keys.setdefault("use_cpu", True)
    if sft_keys.get("deepspeed") is not None:
        _check_deepspeed(source, sft_keys["deepspeed"])  # TrainingArguments imports it while it is built
    accelerator_config = sft_keys.get("accelerator_config")
    if isinstance(accelerator_config, str) and not accelerator_config.startswith("{"):
        if not Path(accelerator_config).is_file():  # transformers opens it as a JSON file while the config is built
            raise InputError(
                f"{source}: accelerator_config: {accelerator_config!r} is no JSON file (transformers reads text "
                "there as the path of one); write a mapping, or the path of an existing file (an accelerate launch "
                "config belongs to `accelerate launch --config_file`)"
            )
    _check_source_keys(source, keys.get("datasets"))
    try:
        built = {group: groups[group](**values) for group, values in by_group.items()}
    except (ValueError, TypeError) as err:
        raise InputError(f"{source}: {err}") from None
    _check_consistency(source, built, handbook_mixture)
    return Recipe(
        built["script"],
        built["sft"],
        built["model"],
        built["toolkit"],
        source,
        dict(keys),
        mixture=built["mixture"],
        env=env,
        handbook_mixture=handbook_mixture,
    )


def handbook_mixture_from(source: str, value) -> HandbookMixture | None:
    """`dataset_mixture` read as the alignment-handbook's ScriptArguments reads it (a `datasets` list of `id`,
    `config`, `split` (default train), `columns`, `weight` (default 1.0); `seed` (default 0);
    `test_split_size`), and refused by name where the handbook would fail later or ignore a key."""
    if value is None:
        return None
    where = f"{source}: {HANDBOOK_MIXTURE_KEY}"
    if not isinstance(value, dict) or not isinstance(value.get("datasets"), list) or not value["datasets"]:
        raise InputError(
            f"{where}: expected a mapping with datasets: (a list of sources: id, config, split, columns, weight), "
            "seed and test_split_size"
        )
    _no_other_keys(where, value, ("datasets", "seed", "test_split_size"))
    sources = []
    for i, entry in enumerate(value["datasets"]):
        at = f"{where}.datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise InputError(f"{at}: expected a mapping with id (a hub id or a local path), got {entry!r}")
        _no_other_keys(at, entry, tuple(f.name for f in dataclasses.fields(HandbookSource)))
        # `config: null` is no config to the handbook (`.get("config")`); a null split would load every split.
        for key, kinds, what in (("config", (str, type(None)), "a string"), ("split", (str,), "a string")):
            if key in entry and not isinstance(entry[key], kinds):
                raise InputError(f"{at}.{key}: expected {what}, got {entry[key]!r}")
        columns = entry.get("columns")
        if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
            raise InputError(f"{at}.columns: expected a list of column names, got {columns!r}")
        weight = entry.get("weight", 1.0)
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1
        ):
            raise InputError(f"{at}.weight: expected a share of the source from 0 to 1, got {weight!r}")
        sources.append(HandbookSource(**{**entry, "weight": weight}))
    given = [set(s.columns) for s in sources if s.columns is not None]
    if any(columns != given[0] for columns in given):
        raise InputError(
            f"{where}: the sources' columns differ ({'; '.join(', '.join(sorted(c)) for c in given)}); the "
            "handbook requires the same columns in every source"
        )
    seed = value.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED.admits(seed):
        raise InputError(f"{where}.seed: expected an integer from 0 to {2**32 - 1}, got {seed!r}")
    size = value.get("test_split_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0):
        raise InputError(f"{where}.test_split_size: expected a number of rows or a fraction above 0, got {size!r}")
    return HandbookMixture(tuple(sources), seed, size)


def _check_source_keys(source: str, sources) -> None:
    """A `datasets:` source with a key TRL's DatasetConfig does not have (its constructor raises a TypeError that
    names neither the source nor the keys it has): refused by name, with the key it is closest to."""
    from trl.scripts.utils import DatasetConfig

    known = [f.name for f in dataclasses.fields(DatasetConfig)]
    for i, entry in enumerate(sources if isinstance(sources, list) else ()):
        for key in entry if isinstance(entry, dict) else ():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                raise InputError(
                    f"{source}: datasets[{i}]: unknown key '{key}'"
                    f"{f'; did you mean {close[0]!r}?' if close else ''} (a source's keys: {', '.join(known)})"
                )


def _no_other_keys(where: str, mapping: dict, known: tuple[str, ...]) -> None:
    """The handbook reads only `known` from `mapping` and ignores the rest: refused here, by name."""
    other = [str(key) for key in mapping if key not in known]
    if other:
        close = difflib.get_close_matches(other[0], known, n=1, cutoff=0.6)
        raise InputError(
            f"{where}: {', '.join(other)}: not read by the handbook's mixture (it reads {', '.join(known)})"
            + (f"; did you mean '{close[0]}'?" if close else "")
        )


def _environment(source: str, env) -> dict:
    """`env:` as TrlParser reads it: a mapping whose entries are set as environment variables, each value as
    text, before anything else of the recipe is built (a CUDA_VISIBLE_DEVICES there takes effect)."""
    if not isinstance(env, dict):
        raise InputError(f"{source}: env: expected a mapping of environment variable -> value, got {env!r}")
    texts = {}
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name:
            raise InputError(f"{source}: env: {name!r} is not an environment variable name")
        if isinstance(value, (dict, list)):
            raise InputError(f"{source}: env: {name}: expected a single value, got {value!r}")
        texts[name] = str(value)  # TrlParser's `os.environ[key] = str(value)`: true -> "True", null -> "None"
    os.environ.update(texts)
    return texts


def as_trl_parses(value, annotation):
    """`value` as `trl sft --config` hands it on. TrlParser sets each config value as an argparse default, and
    argparse passes a default that is text through the argument's type: `learning_rate: 1e-5` (text to YAML,
    which reads a number only with a dot) becomes 1e-05, `bf16: "false"` False, `max_length: "2048"` 2048.
    Only text meets that conversion, and only for a field that takes no text; text that does not convert is
    returned as it is, for the type check to name."""
    from transformers.hf_argparser import string_to_bool

    if not isinstance(value, str):
        return value
    allowed = _base_types(_argparse_annotation(annotation))
    if not allowed or str in allowed:
        return value
    for kind, convert in ((bool, string_to_bool), (int, int), (float, float)):
        if kind in allowed:
            try:
                return convert(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                return value
    return value


def _argparse_annotation(annotation):
    """The one type transformers' HfArgumentParser gives the argument of a field (`_parse_dataclass_field`): of
    a Union without None, the member other than str when the second one is not str (`str | bool` is a bool
    argument); of a Union with None and without bool, the member other than None in the first two places
    (`dict | str | None` is a str argument)."""
    args = typing.get_args(annotation)
    if not (isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union):
        return annotation
    if type(None) not in args:
        return args[0] if args[1] is str else args[1]
    if bool not in args:
        return args[0] if args[1] is type(None) else args[1]
    return annotation


def _check_deepspeed(source: str, config) -> None:
    """`deepspeed: ds.json` (or a mapping): the file must exist and DeepSpeed must be installed, else
    transformers stops with a traceback while the config is built."""
    import importlib.util

    if isinstance(config, str) and not Path(config).is_file():
        raise InputError(f"{source}: deepspeed: {config}: no such file (a DeepSpeed JSON config, or a mapping)")
    if importlib.util.find_spec("deepspeed") is None:
        raise InputError(
            f"{source}: deepspeed: DeepSpeed is not installed; pip install 'sft-toolkit[deepspeed]' "
            "(it trains on CUDA GPUs), or remove the key"
        )


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_refused(source: str, key: str, value, f: dataclasses.Field) -> None:
    """A key the toolkit refuses (see `recipe_keys`) is an error unless it says what its default says."""
    rule = RECIPE_KEYS.get(key)
    if rule is not None and rule.handling is Handling.REFUSED and value != f.default:
        raise InputError(f"{source}: {key}: not supported: {rule.note}")


def _check_value(source: str, key: str, value, f: dataclasses.Field, annotation) -> None:
    """`annotation` is the field's resolved type (`typing.get_type_hints`): under `from __future__ import
    annotations`, `f.type` is only the annotation's text."""
    choices = f.metadata.get("choices")
    if isinstance(value, str) and (key, value) in OLD_VALUES:
        raise InputError(f"{source}: {key}: {value!r} is no longer a value: {OLD_VALUES[key, value]}")
    renamed = isinstance(value, str) and (key, value) in TRL_RENAMED_VALUES
    # A list or mapping is no choice (and can't be looked up in a set of them).
    listed = bool(choices) and isinstance(value, (str, int, float)) and value in choices
    if choices and value is not None and not listed and not renamed:
        raise InputError(f"{source}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if key == "dataset_kwargs" and isinstance(value, str):
        value = _json_mapping(source, key, value)  # transformers' `_VALID_DICT_FIELDS` reads JSON text as one
    if key == "dataset_kwargs" and isinstance(value, dict):
        _check_dataset_kwargs(source, value)
    allowed = _base_types(annotation) | ({str} if key in TEXT_FOR_A_LIST else set())
    if not allowed or value is None and type(None) in allowed:
        return
    if isinstance(value, bool) and bool not in allowed:
        raise InputError(f"{source}: {key}: expected {_names(allowed)}, got a boolean ({value})")
    if isinstance(value, int) and float in allowed:
        return
    if not isinstance(value, tuple(allowed)):
        raise InputError(f"{source}: {key}: expected {_names(allowed)}, got {type(value).__name__} ({value!r})")


def _json_mapping(source: str, key: str, text: str) -> dict:
    """The mapping `text` spells in JSON, as TrainingArguments reads text given for a mapping field."""
    try:
        value = json.loads(text) if text.startswith("{") else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InputError(f"{source}: {key}: expected a mapping (or its JSON text), got {text!r}")
    return value


# Values outside a field's choices that TRL's own `__post_init__` still takes, replacing them by the new value
# with a FutureWarning: the toolkit lets them through for TRL to do the same.
TRL_RENAMED_VALUES = {("packing_strategy", "bfd-requeue")}

# List fields whose text value TrlParser keeps as text and TRL hands on as it is, to a consumer that means
# something by it: PEFT's target_modules takes "all-linear", or one regular expression over module names.
TEXT_FOR_A_LIST = {"lora_target_modules"}


def _check_dataset_kwargs(source: str, kwargs: dict) -> None:
    """TRL's SFTTrainer reads only `skip_prepare_dataset` from `dataset_kwargs`; older TRL also read
    `add_special_tokens` and `append_concat_token` (still in handbook recipes), which now change nothing."""
    ignored = sorted(str(name) for name in kwargs if name != "skip_prepare_dataset")
    if ignored:
        raise InputError(
            f"{source}: dataset_kwargs: {', '.join(ignored)}: TRL's SFTTrainer reads only skip_prepare_dataset "
            "from dataset_kwargs, so these would change nothing (the chat template and eos_token decide the "
            "special tokens); remove them"
        )


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts: `low`/`high` bounds (None: unbounded), each inclusive or not."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    also: tuple = ()  # values outside the bounds that mean something (max_steps: -1, "use the epochs")

    def admits(self, value) -> bool:
        if value in self.also:
            return True
        above = self.low is None or (value >= self.low if self.low_inclusive else value > self.low)
        below = self.high is None or (value <= self.high if self.high_inclusive else value < self.high)
        return above and below

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.low_inclusive else '>'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<=' if self.high_inclusive else '<'} {self.high:g}")
        extra = "".join(f" or {v}" for v in self.also)
        return " and ".join(parts) + extra


POSITIVE = Range(0, low_inclusive=False)
NOT_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_inclusive=False)  # a probability or a share that can't be all of it
SEED = Range(0, 2**32 - 1)  # what numpy and torch accept

# Every numeric key of the recipe (TRL's and the toolkit's) and the values that make sense for it; null stays
# allowed where the key's type allows it. tests/test_recipe_keys.py checks that no numeric key is missing here.
VALUE_RANGES: dict[str, Range] = {
    # lengths and counts of things: at least one
    "max_length": POSITIVE,
    "max_length_limit": POSITIVE,
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "eval_accumulation_steps": POSITIVE,
    "dataset_num_proc": POSITIVE,
    "dataloader_prefetch_factor": POSITIVE,
    "torch_empty_cache_steps": POSITIVE,
    "ddp_bucket_cap_mb": POSITIVE,
    "ddp_timeout": POSITIVE,
    "lora_r": POSITIVE,
    "lora_alpha": POSITIVE,
    "pad_to_multiple_of": POSITIVE,
    "save_total_limit": POSITIVE,
    # steps: a whole number, or below 1 a fraction of the training steps (transformers' own reading)
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "warmup_steps": NOT_NEGATIVE,
    "num_train_epochs": POSITIVE,
    "max_steps": Range(1, also=(-1,)),
    "eval_delay": NOT_NEGATIVE,
    # optimizer (a learning rate of 0 is allowed: it evaluates and saves without changing the weights)
    "learning_rate": NOT_NEGATIVE,
    "weight_decay": NOT_NEGATIVE,
    "adam_beta1": Range(0, 1, high_inclusive=False),
    "adam_beta2": Range(0, 1, high_inclusive=False),
    "adam_epsilon": POSITIVE,
    "max_grad_norm": NOT_NEGATIVE,
    "label_smoothing_factor": FRACTION,
    "lora_dropout": FRACTION,
    "neftune_noise_alpha": NOT_NEGATIVE,
    "router_aux_loss_coef": NOT_NEGATIVE,
    # the rest
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": NOT_NEGATIVE,
    "local_rank": Range(-1),
    "max_zero_rows": NOT_NEGATIVE,
    "test_split_size": POSITIVE,
    "early_stopping_patience": POSITIVE,
}


def _check_range(source: str, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # the type check speaks for non-numbers; `pad_to_multiple_of: auto` and null are not numbers
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{source}: {key}: {value} is not a finite number")
    allowed = VALUE_RANGES.get(key)
    if allowed is not None and not allowed.admits(value):
        raise InputError(f"{source}: {key}: {value!r} is out of range; it must be {allowed.describe()}")


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
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }
    return " or ".join(sorted(names.get(t, t.__name__) for t in allowed))


def _check_consistency(source: str, built: dict, handbook_mixture: HandbookMixture | None = None) -> None:
    from .policy import policy_from

    sft = built["sft"]
    toolkit = built["toolkit"]
    if not policy_from(toolkit.train_roles, toolkit.train_turns, source).is_default and not sft.assistant_only_loss:
        raise InputError(
            f"{source}: train_roles / train_turns choose assistant turns to train, which needs "
            "assistant_only_loss: true (without it every token is trained)"
        )
    if sft.packing and sft.max_length is None:
        raise InputError(f"{source}: packing: true needs max_length (the packed sequence length); set max_length")
    resume = sft.resume_from_checkpoint
    if isinstance(resume, str) and resume != "true" and not Path(resume).is_dir():
        raise InputError(
            f"{source}: resume_from_checkpoint: {resume}: no such checkpoint directory (give a "
            "checkpoint-N directory, or true for the last complete one in output_dir)"
        )
    model = built["model"]
    if toolkit.merge_adapter and not model.use_peft:
        raise InputError(
            f"{source}: merge_adapter: true merges a LoRA adapter into its base model, which needs "
            "use_peft: true (a full fine-tune already saves a whole model)"
        )
    quantized = "load_in_4bit" if model.load_in_4bit else "load_in_8bit" if model.load_in_8bit else None
    if quantized and not model.use_peft:
        raise InputError(
            f"{source}: {quantized}: a quantized model trains only through a LoRA adapter; set "
            f"use_peft: true (QLoRA), or remove {quantized}"
        )
    mixture = built["mixture"]
    for key, streaming in (("dataset_streaming", built["script"].dataset_streaming), ("streaming", mixture.streaming)):
        if streaming:
            raise InputError(
                f"{source}: {key}: true is refused: the mask guard counts every row, token and step "
                "before training starts, which a stream can't give without reading it all; set "
                f"{key}: false (datasets memory-maps the data from disk, so it needs no more memory)"
            )
    for i, entry in enumerate(mixture.datasets):
        if not dataclasses.is_dataclass(entry) or not isinstance(entry.path, str):
            raise InputError(
                f"{source}: datasets[{i}]: each source is a mapping with path (and name, data_dir, "
                f"data_files, split, columns, fraction), got {entry!r}"
            )
    if mixture.test_split_size is not None and not mixture.datasets:
        raise InputError(
            f"{source}: test_split_size splits a datasets: mixture; with dataset_name, name the eval "
            "split with dataset_test_split"
        )
    _check_eval(source, built)
    for key, value in (
        ("chat_template_path", built["sft"].chat_template_path),
        ("prepared", built["toolkit"].prepared),
    ):
        if isinstance(value, str) and not value.strip():  # (trl sft fails on an empty chat_template_path)
            raise InputError(f"{source}: {key}: {value!r} names no file or folder; give a path, or remove the key")
    if not built["model"].model_name_or_path:
        raise InputError(
            f"{source}: model_name_or_path is required (a local directory or a hub id; the tokenizer "
            "is loaded from it)"
        )
    if handbook_mixture is not None and mixture.datasets:
        raise InputError(
            f"{source}: datasets (trl sft's mixture) and dataset_mixture (the alignment-handbook's) are both set; "
            "keep one"
        )
    if (
        not built["script"].dataset_name
        and not built["toolkit"].prepared
        and not mixture.datasets
        and handbook_mixture is None
    ):
        raise InputError(
            f"{source}: dataset_name is required (a hub id, a local directory, or a .jsonl/.json/"
            ".parquet file), or datasets: (a mixture), or prepared: DIR (a dataset `sft-toolkit prepare` "
            "saved)"
        )


def _check_eval(source: str, built: dict) -> None:
    """Evaluation as `trl sft` runs it: the test split goes to the trainer only when eval_strategy is not "no"."""
    sft, toolkit = built["sft"], built["toolkit"]
    strategy = str(getattr(sft.eval_strategy, "value", sft.eval_strategy))
    if strategy == "no" and sft.do_eval:  # TrainingArguments sets do_eval itself only for an eval_strategy
        raise InputError(
            f"{source}: do_eval: true with eval_strategy: no evaluates nothing (trl sft passes no eval "
            "dataset then); set eval_strategy: epoch or steps, or remove do_eval"
        )
    if toolkit.early_stopping_patience is not None:
        if strategy == "no" or not sft.metric_for_best_model:
            raise InputError(
                f"{source}: early_stopping_patience needs evaluation to compare: set eval_strategy "
                "(epoch or steps) and load_best_model_at_end: true (or metric_for_best_model)"
            )
        if toolkit.early_stopping_patience < 1:
            raise InputError(
                f"{source}: early_stopping_patience: {toolkit.early_stopping_patience}: give at least 1 "
                "(evaluations without improvement before stopping)"
            )
    if strategy != "no" and toolkit.prepared:
        raise InputError(
            f"{source}: prepared: {toolkit.prepared} holds the train split only, and eval_strategy: "
            f"{strategy} needs the eval split checked from the raw data; train without prepared, or "
            "set eval_strategy: no"
        )
