"""prepare: tokenize, mask, truncate or pack once, under the mask guard, and save what `train` would train on.

At scale data is prepared once (on CPU machines) and trained on many times (on GPU machines, many
ranks). This is not a second pipeline: it is `train.guard` (check-data's accounting, then reject /
repair / warn) with each token's provenance kept, saved with `datasets.save_to_disk`, plus a manifest
(`prepared.build_manifest`) that lets `train --prepared DIR` refuse data that this recipe would not
have produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .check_data import Report
from .outputs import check_output_dir, leftovers, recipe_inputs
from .prepared import APPLIED, KIND, build_manifest, rendering_template, save, shaping_keys, tokenizer_entry
from .problems import InputError
from .recipe import Recipe
from .train import guard


@dataclass
class Prepared:
    report: Report
    notes: list[str]  # the guard's repairs or warnings
    manifest: dict
    path: Path  # the directory: DIR/dataset, DIR/manifest.json
    # What an interrupted prepare left beside DIR (`outputs.leftovers`): said, never removed (a folder may carry
    # such a name without being the toolkit's, or be in use by a prepare still running).
    leftovers: list[Path] = field(default_factory=list)


def prepare(recipe: Recipe, out_dir: str | Path, *, world_size: int = 1) -> Prepared:
    """Run the guard on the recipe's raw dataset and save the result. Raises GuardStop when it refuses."""
    if recipe.toolkit.prepared:
        raise InputError(
            f"{recipe.source}: prepared: {recipe.toolkit.prepared} is set; prepare reads the raw "
            "dataset_name, so remove the key (or --prepared) to prepare again"
        )
    if recipe.script.dataset_streaming:
        raise InputError(
            f"{recipe.source}: dataset_streaming: true; prepare saves the whole dataset to disk, so set "
            "dataset_streaming: false"
        )
    inputs = recipe_inputs(recipe)
    check_output_dir(out_dir, KIND, inputs)  # before any work: a directory that isn't ours is refused at once
    keys = shaping_keys(recipe)  # as the recipe asks; the guard's repairs are in `guarded.recipe`
    # The tokenizer's manifest entries are taken before the guard, while no token is in memory: loading a
    # tokenizer after it would add the tokenizer's heap to a process that holds the prepared dataset's pages
    # (the peak `benchmarks/check_data.py` measures). Only a guard that changes the tokenizer or its template
    # (mask_guard: repair adding markers) makes it load again.
    facts = _tokenizer_facts(recipe)
    guarded = guard(recipe, world_size, keep_provenance=True)
    used, notes = guarded.recipe, list(guarded.repairs.notes)
    if _tokenizer_keys(used) != _tokenizer_keys(recipe):
        facts = _tokenizer_facts(used)
    entry, template = facts
    applied = {key: getattr(used.sft, key) for key in APPLIED}
    manifest = build_manifest(keys, entry, template, guarded.report, notes, applied, guarded.dataset)
    path = save(out_dir, guarded.dataset, manifest, inputs, num_proc=used.sft.dataset_num_proc)
    return Prepared(report=guarded.report, notes=notes, manifest=manifest, path=path, leftovers=leftovers(out_dir))


def _tokenizer_keys(recipe: Recipe) -> tuple:
    """The recipe keys `preprocess.load_tokenizer_for` and the template choice read."""
    sft = recipe.sft
    return (
        recipe.model.model_name_or_path,
        recipe.model.model_revision,
        sft.trust_remote_code,
        sft.chat_template_path,
        sft.eos_token,
        sft.assistant_only_loss,
    )


def _tokenizer_facts(recipe: Recipe) -> tuple[dict, str | None]:
    """The manifest's tokenizer entry and the template rows are rendered with (None: rows that meet no template)."""
    from .preprocess import load_tokenizer_for, renders_conversations

    tokenizer = load_tokenizer_for(recipe)
    template = rendering_template(tokenizer, recipe.sft) if renders_conversations(recipe) else None
    return tokenizer_entry(tokenizer), template
