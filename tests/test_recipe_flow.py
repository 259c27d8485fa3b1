"""A recipe flows through the guard, prepare and training unchanged: each repair makes a new recipe, which the
guard hands on (`Guarded.recipe`) with a typed record of the change (`Repairs`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
from test_train import recipe_keys, rows_with_long_prompts, unmarked_template

from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.check_data import check_splits
from sft_toolkit.prepare import prepare
from sft_toolkit.prepared import load_prepared
from sft_toolkit.recipe import build_recipe, with_changes
from sft_toolkit.train import guard, prepared_trainer_args

CONFIGS = ("script", "sft", "model", "toolkit", "mixture")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def snapshot(recipe) -> dict:
    """Every field of every config the recipe holds, deep-copied (and which object each config is)."""
    return {
        name: (id(config), {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(config)})
        for name in CONFIGS
        for config in [getattr(recipe, name)]
    }


def test_repair_raising_max_length_leaves_the_recipe_and_hands_on_a_new_one(assets, tmp_path):
    keys = recipe_keys(
        assets, tmp_path, rows_with_long_prompts(assets, 2), max_length=64, mask_guard="repair", max_length_limit=2048
    )
    recipe = build_recipe(keys)
    before = snapshot(recipe)
    guarded = guard(recipe)
    assert snapshot(recipe) == before  # not one field of the given recipe changed
    raised = guarded.repairs.max_length
    assert raised.before == 64 and raised.after > 64 and guarded.repairs.packing_strategy is None
    assert guarded.recipe.sft.max_length == raised.after and guarded.recipe.sft is not recipe.sft
    assert guarded.report.settings["max_length"] == raised.after  # the report describes the recipe handed on
    assert any(note.startswith(f"max_length 64 -> {raised.after}") for note in guarded.repairs.notes)
    # the returned recipe is the one the datasets were built with: checking it again gives the same accounting
    again, _, _ = check_splits(guarded.recipe)
    assert again.truncated_assistant_tokens == guarded.report.truncated_assistant_tokens == 0


def test_repair_switching_to_bfd_leaves_the_recipe_and_report_and_hands_on_new_ones(assets, tmp_path):
    keys = recipe_keys(
        assets,
        tmp_path,
        rows_with_long_prompts(assets),
        max_length=64,
        packing=True,
        packing_strategy="wrapped",
        mask_guard="repair",
    )
    recipe = build_recipe(keys)
    before = snapshot(recipe)
    guarded = guard(recipe)
    assert snapshot(recipe) == before
    assert recipe.sft.packing_strategy == "wrapped" and guarded.recipe.sft.packing_strategy == "bfd"
    assert guarded.repairs.packing_strategy.before == "wrapped" and guarded.repairs.packing_strategy.after == "bfd"
    assert guarded.repairs.dropped_sequences > 0  # bfd's overflow left sequences with nothing to train
    assert guarded.report.sequences == len(guarded.dataset) and guarded.report.zero_trainable_sequences == 0
    # the report of the bfd check itself still counts the dropped sequences: the guard made a new report
    checked, _, _ = check_splits(guarded.recipe)
    assert checked.sequences == len(guarded.dataset) + guarded.repairs.dropped_sequences


def test_markers_repair_points_the_new_recipe_at_the_written_template(assets, tmp_path):
    from trl.chat_template_utils import has_generation_markers

    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()[:8]]
    template = str(unmarked_template(tmp_path))
    recipe = build_recipe(recipe_keys(assets, tmp_path, rows, chat_template_path=template, mask_guard="repair"))
    before = snapshot(recipe)
    guarded = guard(recipe)
    assert snapshot(recipe) == before and recipe.sft.chat_template_path == template
    written = Path(guarded.recipe.sft.chat_template_path)
    assert str(written) == guarded.repairs.chat_template_path and written.parent == Path(recipe.sft.output_dir)
    assert has_generation_markers(written.read_text()) and not has_generation_markers(Path(template).read_text())
    assert guarded.report.trainable_tokens > 0


def test_loading_a_prepared_dataset_applies_its_repairs_to_a_new_recipe(assets, tmp_path):
    keys = recipe_keys(
        assets, tmp_path, rows_with_long_prompts(assets, 2), max_length=64, mask_guard="repair", max_length_limit=2048
    )
    applied = prepare(build_recipe(keys), tmp_path / "prepared").manifest["applied"]["max_length"]
    recipe = build_recipe({**keys, "prepared": str(tmp_path / "prepared")})
    before = snapshot(recipe)
    loaded = load_prepared(recipe)
    assert snapshot(recipe) == before and recipe.sft.max_length == 64
    assert loaded.recipe.sft.max_length == applied == loaded.repairs.max_length.after
    assert loaded.repairs.max_length.before == 64


def test_trainer_arguments_are_a_new_config(assets, tmp_path):
    recipe = build_recipe(recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0)))
    before = snapshot(recipe)
    args = prepared_trainer_args(recipe)
    assert snapshot(recipe) == before and recipe.sft.assistant_only_loss
    assert args is not recipe.sft and not args.assistant_only_loss and args.chat_template_path is None
    assert args.dataset_kwargs["skip_prepare_dataset"] and args.output_dir == recipe.sft.output_dir


def test_with_changes_copies_without_rebuilding_the_config(assets, tmp_path):
    """TrainingArguments' __post_init__ has side effects (here: a deprecation warning emitted again), which
    `dataclasses.replace` would run; `with_changes` copies the built config and sets only what it is told."""
    recipe = build_recipe(recipe_keys(assets, tmp_path, [], truncation_mode="keep_end"))
    with warnings.catch_warnings(record=True) as rebuilt:
        warnings.simplefilter("always")
        dataclasses.replace(recipe.sft, max_length=7)
    assert any("keep_end" in str(w.message) for w in rebuilt)  # what with_changes avoids
    with warnings.catch_warnings(record=True) as copied:
        warnings.simplefilter("always")
        changed = with_changes(recipe.sft, max_length=7)
    assert copied == [] and changed.max_length == 7 and recipe.sft.max_length != 7
    others = [f.name for f in dataclasses.fields(changed) if f.name != "max_length"]
    assert all(getattr(changed, name) == getattr(recipe.sft, name) for name in others)
    with pytest.raises(TypeError, match="no field max_lenght"):
        with_changes(recipe.sft, max_lenght=7)
