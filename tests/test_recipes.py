"""Every shipped recipe parses: its keys are TRL's or the toolkit's, with the right types."""

from pathlib import Path

import pytest
import yaml

from sft_toolkit.recipe import build_recipe, read_yaml

RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((Path(__file__).parents[1] / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_is_valid(path):
    keys = read_yaml(str(path))
    keys.pop("bf16", None)  # bf16 needs a GPU to build the config here; its type is still checked below
    recipe = build_recipe(keys, source=str(path))
    # Conversations train only the assistant; a plain-text recipe (continued pretraining) trains every token.
    assert recipe.sft.assistant_only_loss is ("dataset_text_field" not in keys)
    assert isinstance(read_yaml(str(path)).get("bf16", False), bool)


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_names_a_distributed_type(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED")
