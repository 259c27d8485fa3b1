"""No silent keys: every recipe key is passed where `trl sft` passes it, applied by the toolkit, or refused by name.

The decision table (sft_toolkit/recipe_keys.py) must name every field of the installed TRL's argument classes;
`trl sft`'s own `main` (trl/scripts/sft.py) is run up to the trainer and compared with what the toolkit hands
its trainer. Values are checked by type and range before TRL sees them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import typing
from pathlib import Path

import pytest
import torch

from sft_toolkit import train as train_module
from sft_toolkit.cli import main
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import VALUE_RANGES, ToolkitArguments, build_recipe
from sft_toolkit.recipe_keys import RECIPE_KEYS, RENAMED, Handling

TOKENIZER = Path(__file__).parent / "bad_inputs" / "tokenizer"


def trl_classes():
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    return (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)


def all_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    return {f.name: (cls, f) for cls in (*trl_classes(), ToolkitArguments) for f in dataclasses.fields(cls) if f.init}


def base_keys(tmp_path) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                     {"role": "assistant", "content": f"{i + 1}."}]}) + "\n"
                            for i in range(4)))
    return {"model_name_or_path": str(TOKENIZER), "chat_template_path": "chatml", "assistant_only_loss": True,
            "dataset_name": str(data), "max_length": 128, "output_dir": str(tmp_path / "run"), "use_cpu": True,
            "bf16": False, "report_to": "none"}


def test_every_field_of_the_installed_trl_has_a_decision():
    fields = all_fields()
    assert sorted(set(fields) - set(RECIPE_KEYS)) == [], "new fields nobody decided about: add them to RECIPE_KEYS"
    assert sorted(set(RECIPE_KEYS) - set(fields)) == [], "RECIPE_KEYS names fields that no longer exist"


def test_refused_keys_are_refused_at_load_with_their_reason(tmp_path):
    fields = all_fields()
    refused = [key for key, rule in RECIPE_KEYS.items() if rule.handling is Handling.REFUSED]
    assert refused
    for key in refused:
        default = fields[key][1].default
        assert isinstance(default, bool), f"{key}: give the test a non-default value for it"
        with pytest.raises(InputError, match=f"{key}: not supported: ") as err:
            build_recipe({**base_keys(tmp_path), key: not default})
        assert RECIPE_KEYS[key].note in str(err.value)
        build_recipe({**base_keys(tmp_path), key: default})  # the default changes nothing, so it is accepted


def test_a_refused_key_is_exit_2_on_the_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**base_keys(tmp_path), "push_to_hub": True}.items()))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["check-data", str(recipe)]) == 2
    assert "push_to_hub: not supported" in err.getvalue() and "Traceback" not in err.getvalue()


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_renamed_keys_say_the_new_spelling(old, tmp_path):
    fields = all_fields()
    assert old not in fields  # still a field: then it is not renamed
    renamed = RENAMED[old]
    if renamed.new is not None:
        assert renamed.new in fields
    with pytest.raises(InputError, match=f"'{old}' is ") as err:
        build_recipe({**base_keys(tmp_path), old: 1})
    assert (f"write {renamed.new}: 1" if renamed.new else renamed.how) in str(err.value)


# ---- what the trainer receives, compared with `trl sft` ----------------------------------------------------------

class TrainerReached(Exception):
    """Raised by the stand-in trainer once it has the arguments it was built with."""


def stand_in_trainer(seen: dict):
    class StandIn:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise TrainerReached

    return StandIn


def through_trl_sft(keys: dict, monkeypatch) -> dict:
    """The keyword arguments `trl sft` (trl/scripts/sft.py `main`) builds its SFTTrainer with for this recipe."""
    import datasets
    import trl
    from trl.scripts import sft as trl_sft

    recipe = build_recipe(keys)
    seen: dict = {}
    with monkeypatch.context() as patch, pytest.raises(TrainerReached):
        patch.setattr(trl, "SFTTrainer", stand_in_trainer(seen))
        patch.setattr(datasets, "load_dataset", lambda *a, **k: {"train": ["row"], "test": ["row"]})
        trl_sft.main(recipe.script, recipe.sft, recipe.model, recipe.mixture)
    return seen


def through_toolkit(keys: dict, monkeypatch) -> dict:
    seen: dict = {}
    monkeypatch.setattr(train_module, "guarded_trainer_class", lambda: stand_in_trainer(seen))
    with pytest.raises(TrainerReached):
        train_module.train(build_recipe(keys), log=lambda _: None)
    return seen


NON_DEFAULT = {  # keys that reach the model loading or the trainer, set away from their defaults
    "model_revision": "main", "trust_remote_code": True, "attn_implementation": "eager", "dtype": "bfloat16",
    "model_init_kwargs": {"low_cpu_mem_usage": True}, "use_peft": True, "lora_r": 4, "lora_alpha": 8,
    "lora_dropout": 0.1, "lora_target_modules": ["q_proj", "v_proj"], "use_rslora": True,
    "learning_rate": 3e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "gradient_accumulation_steps": 2,
    "per_device_train_batch_size": 3, "max_steps": 7, "logging_steps": 2, "seed": 5, "weight_decay": 0.01,
    "gradient_checkpointing": True, "save_strategy": "no", "loss_type": "dft", "eos_token": "<|im_end|>",
}


def compare_with_trl_sft(keys: dict, monkeypatch) -> tuple[dict, dict]:
    theirs = through_trl_sft(keys, monkeypatch)
    ours = through_toolkit(keys, monkeypatch)
    assert ours["model"] == theirs["model"]
    assert ours["peft_config"] == theirs["peft_config"]
    differing = {f.name for f in dataclasses.fields(theirs["args"])
                 if getattr(ours["args"], f.name) != getattr(theirs["args"], f.name)}
    # Only what the toolkit applies itself (its data preparation) may reach the trainer changed.
    assert {key: RECIPE_KEYS[key].handling for key in differing} == {
        key: Handling.DATA_PREPARATION for key in differing}
    assert differing <= {"chat_template_path", "dataset_kwargs", "assistant_only_loss"}
    return ours, theirs


def test_model_and_trainer_keys_reach_the_trainer_as_trl_sft_passes_them(tmp_path, monkeypatch):
    ours, theirs = compare_with_trl_sft({**base_keys(tmp_path), **NON_DEFAULT}, monkeypatch)
    assert ours["args"].model_init_kwargs == theirs["args"].model_init_kwargs == {
        "revision": "main", "trust_remote_code": True, "attn_implementation": "eager", "dtype": "bfloat16",
        "low_cpu_mem_usage": True}
    assert ours["quantization_config"] is theirs["quantization_config"] is None
    assert ours["peft_config"].r == 4 and ours["peft_config"].use_rslora
    for key, value in NON_DEFAULT.items():
        if RECIPE_KEYS[key].handling is Handling.TRAINER:
            assert getattr(ours["args"], key) == getattr(theirs["args"], key)


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_quantization_config_is_trl_sfts(bits, tmp_path, monkeypatch):
    """Built without a GPU (the config object needs none); the toolkit's check for CUDA/bitsandbytes is lifted."""
    monkeypatch.setattr(train_module, "quantization_missing", lambda: [])
    keys = {**base_keys(tmp_path), "use_peft": True, bits: True, "dtype": "bfloat16", "bnb_4bit_quant_type": "fp4",
            "use_bnb_nested_quant": True, "bnb_4bit_quant_storage": "bfloat16"}
    ours, theirs = compare_with_trl_sft(keys, monkeypatch)
    assert ours["quantization_config"].to_dict() == theirs["quantization_config"].to_dict()
    built = ours["quantization_config"]
    assert getattr(built, bits) is True
    if bits == "load_in_4bit":
        assert (built.bnb_4bit_quant_type, built.bnb_4bit_use_double_quant) == ("fp4", True)


def test_quantization_is_refused_before_loading_where_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "quantization_missing", lambda: ["a CUDA GPU (none is visible)"])
    monkeypatch.setattr(train_module, "check_data", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(InputError, match=r"load_in_4bit: quantized loading needs a CUDA GPU \(none is visible\)"):
        train_module.train(build_recipe({**base_keys(tmp_path), "use_peft": True, "load_in_4bit": True}))


def test_quantization_missing_names_what_this_machine_lacks():
    import importlib.util

    missing = " ".join(train_module.quantization_missing())
    assert ("CUDA" in missing) is (not torch.cuda.is_available())
    assert ("bitsandbytes" in missing) is (importlib.util.find_spec("bitsandbytes") is None)


def test_quantization_without_lora_is_refused_at_load(tmp_path):
    with pytest.raises(InputError, match="load_in_8bit: a quantized model trains only through a LoRA adapter"):
        build_recipe({**base_keys(tmp_path), "load_in_8bit": True})


# ---- values ---------------------------------------------------------------------------------------------------

def numeric_fields() -> dict[str, set]:
    out = {}
    for cls in (*trl_classes(), ToolkitArguments):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            if f.init and args & {int, float}:
                out[f.name] = args
    return out


def test_every_numeric_key_has_a_range_and_its_default_is_in_it():
    numeric = numeric_fields()
    assert sorted(set(numeric) - set(VALUE_RANGES)) == []
    assert sorted(set(VALUE_RANGES) - set(numeric)) == []
    fields = all_fields()
    for key, allowed in VALUE_RANGES.items():
        default = fields[key][1].default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert allowed.admits(default), key


@pytest.mark.parametrize("key", sorted(VALUE_RANGES))
def test_a_value_out_of_range_is_refused_by_name(key, tmp_path):
    allowed = VALUE_RANGES[key]
    if allowed.low is not None:
        outside = allowed.low - 1 if allowed.low_inclusive else allowed.low
    else:
        outside = allowed.high + 1 if allowed.high_inclusive else allowed.high
    outside = int(outside) if float(outside).is_integer() else outside
    assert not allowed.admits(outside)
    with pytest.raises(InputError, match=f": {key}: {outside!r} is out of range; it must be "):
        build_recipe({**base_keys(tmp_path), key: outside})


@pytest.mark.parametrize("key", sorted(k for k, types in numeric_fields().items() if float in types))
def test_a_float_key_refuses_nan_and_infinity(key, tmp_path):
    for value in (math.nan, math.inf):
        with pytest.raises(InputError, match=f": {key}: {value} is not a finite number"):
            build_recipe({**base_keys(tmp_path), key: value})


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(ToolkitArguments)], ids=lambda f: f.name)
def test_toolkit_keys_are_type_checked(field, tmp_path):
    """`from __future__ import annotations` makes `field.type` a string; the check must resolve it."""
    assert isinstance(field.type, str)
    annotation = typing.get_type_hints(ToolkitArguments)[field.name]
    accepted = set(typing.get_args(annotation)) or {annotation}
    wrong = next(v for v in (3.5, {"a": 1}, 7) if type(v) not in accepted and not (
        isinstance(v, int) and float in accepted))
    with pytest.raises(InputError, match=f": {field.name}: (expected|.* is not one of)"):
        build_recipe({**base_keys(tmp_path), field.name: wrong})


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    from sft_toolkit.recipe import read_yaml

    recipe = tmp_path / "twice.yaml"
    recipe.write_text("max_length: 64\nseed: 1\nrole_map:\n  human: user\n  human: assistant\n")
    with pytest.raises(InputError, match=r"key 'human' is written twice \(lines 4 and 5\); keep one"):
        read_yaml(str(recipe))
    recipe.write_text("max_length: 64\nseed: 1\nmax_length: 32\n")
    with pytest.raises(InputError, match=r"key 'max_length' is written twice \(lines 1 and 3\)"):
        read_yaml(str(recipe))
    recipe.write_text("max_length: 64\nseed: 1\n")
    assert read_yaml(str(recipe)) == {"max_length": 64, "seed": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_qlora_on_this_cpu_machine_is_exit_2_naming_the_key(tmp_path):
    recipe = tmp_path / "qlora.yaml"
    keys = {**base_keys(tmp_path), "use_peft": True, "load_in_4bit": True}
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(recipe)]) == 2
    assert "load_in_4bit: quantized loading needs a CUDA GPU (none is visible)" in err.getvalue()
    assert "Traceback" not in err.getvalue() and not (tmp_path / "run").exists()


def test_eos_token_ends_plain_text_rows_as_sft_trainer_appends_it(tmp_path):
    """SFTTrainer sets `eos_token` on the tokenizer before it prepares the data, then ends every text with it."""
    from transformers import AutoTokenizer

    from sft_toolkit.check_data import check_data

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Plain text number {i}."}) + "\n" for i in range(3)))
    keys = {**base_keys(tmp_path), "dataset_name": str(data), "assistant_only_loss": False}
    default_eos = AutoTokenizer.from_pretrained(TOKENIZER).eos_token
    for eos in (None, "<|endoftext|>"):
        _, dataset = check_data(build_recipe({**keys, "eos_token": eos}))
        expected = AutoTokenizer.from_pretrained(TOKENIZER).convert_tokens_to_ids(eos or default_eos)
        assert [ids[-1] for ids in dataset["input_ids"]] == [expected] * 3
    assert default_eos != "<|endoftext|>"
