"""Parity with `trl sft` on the keys real recipes use: each key of PUBLIC_RECIPES (alignment-handbook, open-r1
and TRL's own example recipes) is read the way TRL's TrlParser reads it, or refused with a message that names
the key and what to write instead. The recipes here are written for the test, in the public recipes' shapes."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from test_recipe_keys import base_keys, compare_with_trl_sft

from sft_toolkit.cli import main
from sft_toolkit.data import load_splits
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import HandbookMixture, HandbookSource, load_recipe
from sft_toolkit.recipe_keys import FOREIGN, PUBLIC_RECIPES, RENAMED

ENV_NAME = "SFT_TOOLKIT_PARITY_PROBE"
CHATML_INLINE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HONORED = None


def refused(*fragments: str) -> tuple[str, ...]:
    return fragments


# key -> (YAML text of the recipe's line(s), what the toolkit must do: HONORED, or fragments its refusal says).
# The YAML is text on purpose: `learning_rate: 1e-5` is a string to YAML, and TrlParser still reads a number.
CASES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "model_name_or_path": ("", HONORED),  # in every recipe below
    "model_revision": ("model_revision: main", HONORED),
    "torch_dtype": ("torch_dtype: bfloat16", refused("'torch_dtype' is now spelled 'dtype'", "write dtype: bfloat16")),
    "attn_implementation": ("attn_implementation: flash_attention_2", HONORED),
    "use_flash_attention_2": (
        "use_flash_attention_2: true",
        refused("'use_flash_attention_2' is not a key of trl sft", "attn_implementation: flash_attention_2"),
    ),
    "trust_remote_code": ("trust_remote_code: true", HONORED),
    "use_peft": ("use_peft: true", HONORED),
    "load_in_4bit": ("use_peft: true\nload_in_4bit: true", HONORED),
    "lora_r": ("use_peft: true\nlora_r: 16", HONORED),
    "lora_alpha": ("use_peft: true\nlora_alpha: 16", HONORED),
    "lora_dropout": ("use_peft: true\nlora_dropout: 0.05", HONORED),
    "lora_target_modules": ("use_peft: true\nlora_target_modules:\n- q_proj\n- v_proj", HONORED),
    "chat_template": (
        f"chat_template: {yaml.safe_dump(CHATML_INLINE, width=10_000).splitlines()[0]}",
        refused("'chat_template' is not a key of trl sft", "write chat_template_path: FILE"),
    ),
    "dataset_mixture": (
        "dataset_mixture:\n  datasets:\n  - id: org/chats\n    config: default\n    split: train_sft\n"
        "    columns:\n    - messages\n    weight: 0.5\n  seed: 0\n  test_split_size: 10",
        HONORED,  # the handbook's key, loaded as its get_dataset loads it: see the tests below
    ),
    "dataset_mixer": ("dataset_mixer:\n  org/chats: 1.0", refused("'dataset_mixer' is not a key", "write datasets:")),
    "dataset_splits": (
        "dataset_splits:\n- train_sft\n- test_sft",
        refused("'dataset_splits' is not a key", "dataset_train_split: SPLIT"),
    ),
    "dataset_configs": ("dataset_configs:\n- all", refused("'dataset_configs' is not a key", "dataset_config: NAME")),
    "preprocessing_num_workers": (
        "preprocessing_num_workers: 12",
        refused("'preprocessing_num_workers' is not a key", "dataset_num_proc: N"),
    ),
    "dataset_name": ("", HONORED),
    "dataset_config": ("dataset_config: all", HONORED),
    "dataset_train_split": ("dataset_train_split: train_sft", HONORED),
    "dataset_test_split": ("dataset_test_split: test_sft", HONORED),
    "dataset_num_proc": ("dataset_num_proc: 12", HONORED),
    "dataset_kwargs": (
        "dataset_kwargs:\n  add_special_tokens: false\n  append_concat_token: false",
        refused("dataset_kwargs: add_special_tokens, append_concat_token: TRL's SFTTrainer reads only"),
    ),
    "eos_token": ("eos_token: <|im_end|>", HONORED),
    "assistant_only_loss": ("assistant_only_loss: true", HONORED),
    "packing": ("packing: true", HONORED),
    "packing_strategy": (
        "packing: true\npacking_strategy: ffd",
        refused("packing_strategy: 'ffd'", "write packing_strategy: bfd"),
    ),
    "max_length": ("max_length: 256", HONORED),
    "max_seq_length": ("max_seq_length: 256", refused("'max_seq_length' is now spelled 'max_length'")),
    "bf16": ("bf16: false", HONORED),
    "do_eval": ("do_eval: true\neval_strategy: epoch", HONORED),
    "do_train": ("do_train: true", HONORED),
    "eval_strategy": ("eval_strategy: 'no'", HONORED),
    "evaluation_strategy": ("evaluation_strategy: epoch", refused("write eval_strategy: epoch")),
    "gradient_accumulation_steps": ("gradient_accumulation_steps: 4", HONORED),
    "gradient_checkpointing": ("gradient_checkpointing: true", HONORED),
    "gradient_checkpointing_kwargs": ("gradient_checkpointing_kwargs:\n  use_reentrant: false", HONORED),
    "learning_rate": ("learning_rate: 1e-5", HONORED),  # text to YAML (no dot); a number to TrlParser
    "log_level": ("log_level: info", HONORED),
    "logging_steps": ("logging_steps: 5", HONORED),
    "logging_strategy": ("logging_strategy: steps", HONORED),
    "lr_scheduler_type": ("lr_scheduler_type: cosine_with_min_lr", HONORED),
    "lr_scheduler_kwargs": (
        "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs:\n  min_lr_rate: 0.1",
        HONORED,
    ),
    "max_grad_norm": ("max_grad_norm: 0.2", HONORED),
    "max_steps": ("max_steps: -1", HONORED),
    "num_train_epochs": ("num_train_epochs: 3", HONORED),
    "neftune_noise_alpha": ("neftune_noise_alpha: 5", HONORED),
    "weight_decay": ("weight_decay: 0.1", HONORED),
    "output_dir": ("", HONORED),
    "overwrite_output_dir": ("overwrite_output_dir: true", HONORED),  # the toolkit's key; see the test below
    "per_device_train_batch_size": ("per_device_train_batch_size: 4", HONORED),
    "per_device_eval_batch_size": ("per_device_eval_batch_size: 8", HONORED),
    "remove_unused_columns": ("remove_unused_columns: true", HONORED),
    "report_to": ("report_to:\n- tensorboard\n- wandb", HONORED),
    "run_name": ("run_name: sft-run", HONORED),
    "save_strategy": ('save_strategy: "steps"', HONORED),
    "save_steps": ("save_steps: 0.2", HONORED),
    "save_total_limit": ("save_total_limit: 1", HONORED),
    "seed": ("seed: 42", HONORED),
    "warmup_ratio": (
        "warmup_ratio: 0.1",
        refused("'warmup_ratio' is now spelled 'warmup_steps'", "warmup_steps: 0.1"),
    ),
    "ddp_timeout": ("ddp_timeout: 18000", HONORED),
    "average_tokens_across_devices": ("average_tokens_across_devices: true", HONORED),
    "use_liger_kernel": ("use_liger_kernel: true", HONORED),
    "use_liger": (
        "use_liger: true",
        refused("'use_liger' is now spelled 'use_liger_kernel'", "write use_liger_kernel: True"),
    ),
    "push_to_hub": ("push_to_hub: true", refused("push_to_hub: not supported", "uploads nothing")),
    "hub_model_id": ("hub_model_id: someone/tiny-sft", refused("hub_model_id: not supported", "only to upload")),
    "hub_strategy": ("hub_strategy: every_save", HONORED),  # transformers' default: it changes nothing
    "hub_model_revision": (
        "hub_model_revision: v00.00",
        refused("'hub_model_revision' is not a key of trl sft (open-r1", "uploads nothing"),
    ),
    "callbacks": ("callbacks:\n- push_to_hub_revision", refused("'callbacks' is not a key of trl sft (open-r1")),
    "benchmarks": ("benchmarks:\n- aime24", refused("'benchmarks' is not a key of trl sft (open-r1")),
    "system_prompt": ("system_prompt: Be brief.", refused("'system_prompt' is not a key of trl sft")),
    "push_to_hub_revision": ("push_to_hub_revision: true", refused("'push_to_hub_revision' is not a key")),
    "overwrite_hub_revision": ("overwrite_hub_revision: true", refused("'overwrite_hub_revision' is not a key")),
    "wandb_entity": ("wandb_entity: someone", refused("'wandb_entity' is not a key", "env: {WANDB_ENTITY: NAME}")),
    "wandb_project": ("wandb_project: sft", refused("'wandb_project' is not a key", "env: {WANDB_PROJECT: NAME}")),
    "auto_insert_empty_system_msg": ("auto_insert_empty_system_msg: true", refused("'auto_insert_empty_system_msg'")),
    "truncation_side": ("truncation_side: left", refused("'truncation_side' is not a key", "keep_end (left)")),
    "text_column": ("text_column: text", refused("'text_column' is not a key", "dataset_text_field: COLUMN")),
    "tokenizer_name_or_path": ("tokenizer_name_or_path: org/tok", refused("'tokenizer_name_or_path' is not a key")),
    "model_code_revision": ("model_code_revision: main", refused("'model_code_revision'", "model_revision: REVISION")),
    "base_model_revision": ("base_model_revision: main", refused("'base_model_revision'", "model_revision: REVISION")),
    "env": (f"env:\n  {ENV_NAME}: 1", HONORED),
    "accelerate_config": (
        "accelerate_config: zero2",
        refused("'accelerate_config' is not a key of trl sft", "accelerate launch --config_file FILE -m sft_toolkit"),
    ),
    "num_processes": (
        "num_processes: 2",
        refused("'num_processes' is not a key", "accelerate launch --num_processes"),
    ),
}


def unset_probe(monkeypatch) -> None:
    """ENV_NAME absent for the test and again after it: `delenv` alone records nothing to undo when the variable
    is absent, so what the recipe (or TrlParser) sets would outlive the test."""
    monkeypatch.setenv(ENV_NAME, "")
    monkeypatch.delenv(ENV_NAME)


def test_every_public_recipe_key_has_a_case():
    assert sorted(CASES) == sorted(PUBLIC_RECIPES)


def write_recipe(tmp_path: Path, lines: str) -> Path:
    given = yaml.safe_load(lines) or {}
    base = {key: value for key, value in base_keys(tmp_path).items() if key not in given}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base, sort_keys=False) + lines + "\n", encoding="utf-8")
    return recipe


def trl_parse(recipe: Path) -> tuple[dict, list[str]]:
    """What `trl sft --config recipe` builds: every field of its four argument classes, and the config keys it
    hands on to `accelerate launch` instead (TrlParser's remaining strings)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig))
    with contextlib.redirect_stderr(io.StringIO()):
        *configs, remaining = parser.parse_args_and_config(["--config", str(recipe)], return_remaining_strings=True)
    fields = {name: value for config in configs for name, value in vars(config).items()}
    return fields, [item[2:] for item in remaining[::2]]


def toolkit_fields(recipe) -> dict:
    return {
        name: value
        for config in (recipe.script, recipe.sft, recipe.model, recipe.mixture, recipe.toolkit)
        for name, value in vars(config).items()
    }


@pytest.mark.parametrize("key", sorted(CASES))
def test_a_public_recipe_key_is_read_as_trl_sft_reads_it_or_refused_by_name(key, tmp_path, monkeypatch):
    lines, refusal = CASES[key]
    unset_probe(monkeypatch)
    recipe = write_recipe(tmp_path, lines)
    theirs, handed_on = trl_parse(recipe)
    written = yaml.safe_load(recipe.read_text())
    if refusal is not None:
        with pytest.raises(InputError) as err:
            load_recipe(str(recipe))
        message = str(err.value)
        assert message.startswith(f"{recipe}: ") and key in message
        for fragment in refusal:
            assert fragment in message
        if key in RENAMED or key in FOREIGN:
            assert key in handed_on, "trl sft 1.16 reads this key itself: honor it as it does, don't refuse it"
        return
    ours = load_recipe(str(recipe))
    if key == "env":  # TrlParser sets the variable; so does the toolkit, with the same text
        assert os.environ[ENV_NAME] == "1" and ours.env == {ENV_NAME: "1"}
        return
    if key == "overwrite_output_dir":  # transformers 5 dropped it; the toolkit's own key keeps TRL's name
        assert key in handed_on and ours.toolkit.overwrite_output_dir is True
        return
    if key == "dataset_mixture":  # trl sft hands it to accelerate launch; the handbook's ScriptArguments reads it
        assert key in handed_on
        assert ours.handbook_mixture == HandbookMixture(
            (HandbookSource("org/chats", "default", "train_sft", ["messages"], 0.5),), seed=0, test_split_size=10
        )
        return
    assert handed_on == []
    mine = toolkit_fields(ours)
    for name in written:
        assert mine[name] == theirs[name], f"{name}: the toolkit reads {mine[name]!r}, trl sft {theirs[name]!r}"


@pytest.mark.parametrize(
    "lines",
    [
        "learning_rate: 2e-5\nwarmup_steps: '0.1'",
        "bf16: 'false'\nmax_length: '2048'\nseed: '42'",
        "use_peft: 'true'\nlora_alpha: '16'\nlora_target_modules: all-linear",
        "packing: true\npacking_strategy: bfd-requeue",
        "loss_type: chunked_nll",
        "include_num_input_tokens_seen: 'false'",
        "include_num_input_tokens_seen: '1'",
    ],
    ids=[
        "exponent-without-dot",
        "quoted-numbers",
        "quoted-lora",
        "bfd-requeue",
        "chunked_nll",
        "str-or-bool-false",
        "str-or-bool-one",
    ],
)
def test_values_trl_sft_still_converts_are_converted_the_same_way(lines, tmp_path):
    """TrlParser passes text through each argument's type (argparse), and TRL maps deprecated values itself."""
    recipe = write_recipe(tmp_path, lines)
    theirs, handed_on = trl_parse(recipe)
    mine = toolkit_fields(load_recipe(str(recipe)))
    assert handed_on == []
    for name in yaml.safe_load(lines):
        assert mine[name] == theirs[name] and type(mine[name]) is type(theirs[name]), name


def test_dataset_kwargs_written_as_json_text_is_refused_like_the_mapping(tmp_path):
    """TRL's SFTConfig reads a dataset_kwargs given as JSON text as the mapping it spells (transformers'
    `_VALID_DICT_FIELDS`), so keys it ignores are refused in that spelling too."""
    recipe = write_recipe(tmp_path, """dataset_kwargs: '{"add_special_tokens": false}'""")
    theirs, _ = trl_parse(recipe)
    assert theirs["dataset_kwargs"] == {"add_special_tokens": False}  # what trl sft hands SFTTrainer
    with pytest.raises(InputError, match="dataset_kwargs: add_special_tokens: TRL's SFTTrainer reads only"):
        load_recipe(str(recipe))


def test_dataset_kwargs_text_that_is_no_json_mapping_is_refused_by_name(tmp_path):
    """TRL hands such text on as it is, and SFTTrainer fails on it (`str` has no `get`)."""
    recipe = write_recipe(tmp_path, "dataset_kwargs: skip_prepare_dataset")
    with pytest.raises(InputError, match=r"dataset_kwargs: expected a mapping \(or its JSON text\)"):
        load_recipe(str(recipe))


def test_accelerator_config_text_naming_no_file_is_refused_by_name(tmp_path):
    """transformers reads text given for accelerator_config as the path of a JSON file (FileNotFoundError when
    there is none); a launcher's config name written there (`zero2`) is refused by name, not a traceback."""
    recipe = write_recipe(tmp_path, "accelerator_config: zero2")
    with pytest.raises(InputError, match=r"accelerator_config: 'zero2' is no JSON file"):
        load_recipe(str(recipe))


@pytest.mark.parametrize(
    "lines, says",
    [
        ("packing: true\npacking_strategy: [bfd]", r"packing_strategy: \['bfd'\] is not one of bfd"),
        ("log_level: [info]", r"log_level: \['info'\] is not one of "),
        ("log_level: {level: info}", r"log_level: \{'level': 'info'\} is not one of "),
    ],
    ids=["list-for-a-trl-choice", "list-for-a-transformers-choice", "mapping-for-a-choice"],
)
def test_a_list_or_mapping_for_a_key_with_choices_is_refused_by_name(lines, says, tmp_path):
    with pytest.raises(InputError, match=says):
        load_recipe(str(write_recipe(tmp_path, lines)))


def test_text_that_is_no_number_is_still_refused_by_name(tmp_path):
    recipe = write_recipe(tmp_path, "learning_rate: fast")
    with pytest.raises(InputError, match=r"learning_rate: expected a number, got str \('fast'\)"):
        load_recipe(str(recipe))


def test_env_must_be_a_mapping_of_single_values(tmp_path, monkeypatch):
    unset_probe(monkeypatch)
    for lines, says in (
        ("env: CUDA_VISIBLE_DEVICES=0", "env: expected a mapping"),
        (f"env:\n  {ENV_NAME}:\n  - 1", f"env: {ENV_NAME}: expected a single value"),
        ("env:", "env: expected a mapping"),  # TrlParser: "`env` field should be a dict"
    ):
        with pytest.raises(InputError, match=says):
            load_recipe(str(write_recipe(tmp_path, lines)))
    assert ENV_NAME not in os.environ


@pytest.mark.parametrize("key", ["hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "hub_strategy"])
def test_upload_settings_away_from_their_default_are_refused(key, tmp_path):
    value = {"hub_token": "hf_x", "hub_private_repo": True, "hub_always_push": True, "hub_revision": "v1"}.get(
        key, "end"
    )
    recipe = write_recipe(tmp_path, f"{key}: {value}")
    with pytest.raises(InputError, match=f"{key}: not supported: transformers reads it only to upload"):
        load_recipe(str(recipe))


def test_keys_that_reach_the_trainer_reach_it_as_trl_sfts_main_passes_them(tmp_path, monkeypatch):
    """gradient_checkpointing_kwargs, lr_scheduler_kwargs, report_to, use_liger_kernel and the rest of the
    honored trainer keys of the public recipes: trl sft's own `main` and the toolkit's train build their
    trainers with equal SFTConfigs (only the toolkit's own data preparation fields may differ)."""
    public = {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "report_to": ["tensorboard"],
        "use_liger_kernel": True,
        "average_tokens_across_devices": True,
        "ddp_timeout": 18000,
        "neftune_noise_alpha": 5,
        "run_name": "sft-run",
        "save_steps": 0.2,
        "max_grad_norm": 0.2,
        "hub_strategy": "every_save",
    }
    ours, theirs = compare_with_trl_sft({**base_keys(tmp_path), **public}, monkeypatch)
    for key, value in public.items():
        assert getattr(ours["args"], key) == getattr(theirs["args"], key) == value, key


def test_a_handbook_shaped_recipe_is_exit_2_naming_the_key_and_what_to_write(tmp_path):
    recipe = write_recipe(tmp_path, CASES["chat_template"][0] + "\nlearning_rate: 2.0e-05")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["check-data", str(recipe)]) == 2
    assert "'chat_template' is not a key of trl sft" in err.getvalue() and "chat_template_path" in err.getvalue()
    assert "Traceback" not in err.getvalue()


# ---- the alignment-handbook's dataset_mixture ----------------------------------------------------------------


def chat_rows(path: Path, tag: str, count: int, extra: bool) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{tag} question {i}?"},
                {"role": "assistant", "content": f"{tag} answer {i}."},
            ],
            **({"extra": i} if extra else {}),
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def handbook_get_dataset(sources: list[dict], seed: int, test_split_size) -> dict:
    """The alignment-handbook's get_dataset, step by step, with `datasets` itself (a local file's split is train)."""
    import datasets

    parts = []
    for source in sources:
        rows = datasets.load_dataset("json", data_files=source["id"], split=source.get("split", "train"))
        if source.get("columns") is not None:
            rows = rows.select_columns(source["columns"])
        weight = source.get("weight", 1.0)
        if weight is not None:
            rows = rows.shuffle(seed=seed).select(range(int(len(rows) * weight)))
        parts.append(rows)
    combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    if test_split_size is None:
        return {"train": combined}
    return dict(combined.train_test_split(test_size=test_split_size, seed=seed))


def mixture_recipe(tmp_path: Path, **mixture) -> tuple[Path, list[dict]]:
    sources = [
        {
            "id": str(chat_rows(tmp_path / "first.jsonl", "first", 9, extra=True)),
            "columns": ["messages"],
            "weight": 0.5,
        },
        {"id": str(chat_rows(tmp_path / "second.jsonl", "second", 6, extra=False)), "columns": ["messages"]},
    ]
    body = {"dataset_mixture": {"datasets": sources, "seed": 3, **mixture}, "eval_strategy": "epoch"}
    recipe = write_recipe(tmp_path, yaml.safe_dump(body, sort_keys=False))
    text = recipe.read_text().replace(f"dataset_name: {tmp_path / 'data.jsonl'}\n", "")
    recipe.write_text(text, encoding="utf-8")
    return recipe, sources


def test_dataset_mixture_loads_the_rows_the_handbooks_get_dataset_gives(tmp_path):
    recipe, sources = mixture_recipe(tmp_path, test_split_size=3)
    splits = load_splits(load_recipe(str(recipe)))
    expected = handbook_get_dataset(sources, seed=3, test_split_size=3)
    assert splits.train["messages"] == expected["train"]["messages"]
    assert splits.eval["messages"] == expected["test"]["messages"]
    assert splits.train.column_names == splits.eval.column_names == ["messages"]
    assert len(splits.train) + len(splits.eval) == int(9 * 0.5) + 6
    for rows, origin in ((splits.train, splits.train_source), (splits.eval, splits.eval_source)):
        tags = [row[0]["content"].split()[0] for row in rows["messages"]]
        assert tags == [("first", "second")[i] for i in origin]  # each row's source, through both shuffles


def test_the_first_training_row_comes_from_the_mixture_not_the_ignored_dataset_name(tmp_path):
    """What the toolkit decides from the first row (whether rows render the chat template) is decided on a row
    the run trains: with dataset_mixture set, dataset_name is ignored, as the handbook ignores it."""
    from sft_toolkit.data import first_train_row

    mixture = {"datasets": [{"id": str(chat_rows(tmp_path / "mixed.jsonl", "mixed", 3, extra=False))}]}
    recipe = load_recipe(str(write_recipe(tmp_path, yaml.safe_dump({"dataset_mixture": mixture}))))
    assert recipe.script.dataset_name  # base_keys' data.jsonl, which the mixture overrides
    assert first_train_row(recipe) == load_splits(recipe, with_eval=False).train[0]
    assert first_train_row(recipe)["messages"][0]["content"].startswith("mixed ")


def test_a_null_config_is_no_config_as_the_handbook_reads_it(tmp_path):
    """The handbook's ScriptArguments reads each source with `.get("config")`: `config: null` is no config."""
    mixture = {"datasets": [{"id": "org/chats", "config": None, "split": "train_sft"}]}
    recipe = load_recipe(str(write_recipe(tmp_path, yaml.safe_dump({"dataset_mixture": mixture}))))
    assert recipe.handbook_mixture.datasets == (HandbookSource("org/chats", None, "train_sft"),)


def test_a_dataset_mixture_recipe_checks_through_the_command_line(tmp_path):
    recipe, _ = mixture_recipe(tmp_path, test_split_size=3)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["check-data", str(recipe), "--format", "json"]) == 0
    report = json.loads(out.getvalue())
    assert [source["rows"] for source in report["sources"]] == [
        sum(1 for i in load_splits(load_recipe(str(recipe))).train_source if i == n) for n in (0, 1)
    ]


@pytest.mark.parametrize(
    "mixture, says",
    [
        ({"datasets": [{"path": "org/chats"}]}, r"dataset_mixture.datasets\[0\]: expected a mapping with id"),
        ({"datasets": [{"id": "org/chats", "fraction": 0.5}]}, "fraction: not read by the handbook's mixture"),
        ({"datasets": [{"id": "org/chats", "weight": 2}]}, r"weight: expected a share of the source from 0 to 1"),
        (
            {"datasets": [{"id": "a", "columns": ["messages"]}, {"id": "b", "columns": ["text"]}]},
            "the sources' columns differ",
        ),
        ({"datasets": [{"id": "org/chats"}], "shuffle": True}, "shuffle: not read by the handbook's mixture"),
    ],
    ids=["trl-path", "trl-fraction", "weight-above-1", "columns-differ", "unknown-key"],
)
def test_a_dataset_mixture_the_handbook_would_misread_is_refused_by_name(mixture, says, tmp_path):
    recipe = write_recipe(tmp_path, yaml.safe_dump({"dataset_mixture": mixture}))
    with pytest.raises(InputError, match=says):
        load_recipe(str(recipe))


# ---- one handbook-shaped recipe, trained --------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sft_toolkit.assets import build_quickstart_assets

    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def test_a_handbook_shaped_recipe_trains_with_its_mixture_scheduler_and_env(assets, tmp_path, monkeypatch):
    """The keys as a handbook recipe writes them, honored through training: the dataset_mixture's rows, the
    scheduler's lr_scheduler_kwargs (cosine_with_min_lr ends at min_lr_rate * learning_rate, where plain cosine
    ends at 0), gradient checkpointing with its kwargs, `learning_rate: 1e-3` (text to YAML) and env."""
    from sft_toolkit import train as train_module

    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()[:24]]
    for name, part in (("first", rows[:12]), ("second", rows[12:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part), encoding="utf-8")
    recipe = tmp_path / "handbook.yaml"
    recipe.write_text(
        f"""model_name_or_path: {assets["model"]}
chat_template_path: chatml
dataset_mixture:
  datasets:
  - id: {tmp_path / "first.jsonl"}
    columns: [messages]
    weight: 0.5
  - id: {tmp_path / "second.jsonl"}
    columns: [messages]
    weight: 1.0
  seed: 0
assistant_only_loss: true
max_length: 256
env:
  {ENV_NAME}: trained
bf16: false
use_cpu: true
eval_strategy: 'no'
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
learning_rate: 1e-3
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
max_steps: 3
logging_steps: 1
per_device_train_batch_size: 2
output_dir: {tmp_path / "run"}
report_to: none
save_strategy: "no"
seed: 42
""",
        encoding="utf-8",
    )
    unset_probe(monkeypatch)
    trainers = []
    built = train_module.guarded_trainer_class

    def recording():
        class Recording(built()):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                trainers.append(self)

        return Recording

    monkeypatch.setattr(train_module, "guarded_trainer_class", recording)
    outcome = train_module.train(load_recipe(str(recipe)), log=lambda _: None)
    (trainer,) = trainers
    assert os.environ[ENV_NAME] == "trained"
    assert len(outcome.history) == 3 and trainer.state.global_step == 3
    assert [source["rows"] for source in outcome.report.sources] == [6, 12]  # int(12 * 0.5) and all 12
    assert trainer.args.learning_rate == 1e-3
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.1 * 1e-3)
    assert trainer.model.is_gradient_checkpointing
    assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}


@pytest.mark.parametrize("key", sorted(FOREIGN))
def test_every_key_of_another_entry_point_is_refused_with_what_to_write(key, tmp_path):
    """Whether or not a public recipe above carries it: `trl sft` does not read it, so it is refused, by name,
    with where it comes from and what to write instead (not with difflib's closest field name)."""
    recipe = write_recipe(tmp_path, f"{key}: 1")
    _, handed_on = trl_parse(recipe)
    assert key in handed_on
    with pytest.raises(InputError) as err:
        load_recipe(str(recipe))
    assert f"'{key}' is not a key of trl sft ({FOREIGN[key].source}): {FOREIGN[key].instead}" in str(err.value)
    assert "did you mean" not in str(err.value)
