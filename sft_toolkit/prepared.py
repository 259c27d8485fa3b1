"""A prepared dataset on disk: what shaped it, and the checks that let `train` trust it without re-tokenizing.

`sft-toolkit prepare` writes DIR/dataset/ (`datasets.save_to_disk`: input_ids, labels, seq_lengths when
packed, and each token's source row and position, src_rows / src_pos; bfd's packs hold whole rows, so there no
src_pos: `show` derives it), DIR/manifest.json and the ownership
record that lets a later prepare replace DIR (`outputs.replace_dir`). A saved
dataset is where masks get lost most easily: one built with another template, another max_length or
another tokenizer looks exactly like a good one, and TRL's `skip_prepare_dataset` path checks nothing.
So the manifest records every recipe key that shaped the data and hashes of the tokenizer and template,
and `load_prepared` rejects any difference by name, then re-checks the labels column (vectorized, one
pass over memory-mapped Arrow) before the trainer sees it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .check_data import Report
from .guarded import Change, Guarded, Repairs
from .outputs import Input, replace_dir
from .problems import InputError
from .recipe import GuardMode, Recipe

FORMAT = 1
MANIFEST = "manifest.json"
DATASET = "dataset"
KIND = "prepared dataset"  # what the ownership record says the directory holds
BATCH = 1000
SHOWN = 10
APPLIED = ("max_length", "packing_strategy")  # the settings the guard's repairs may change


def shaping_keys(recipe) -> dict:
    """The recipe keys the prepared data depends on (only those that matter for the settings in force):
    change any of them and the tokens or labels could differ. The template and tokenizer are compared by
    content (hashes), not by path, so the same files on another machine match."""
    sft, script, toolkit = recipe.sft, recipe.script, recipe.toolkit
    keys = {
        "dataset_name": script.dataset_name,
        "dataset_train_split": script.dataset_train_split,
        "assistant_only_loss": sft.assistant_only_loss,
        "dataset_text_field": sft.dataset_text_field,
        "max_length": sft.max_length,
        "packing": sft.packing,
        "shuffle_dataset": sft.shuffle_dataset,
        "role_map": toolkit.role_map,
        "mask_guard": toolkit.mask_guard,
    }
    if sft.packing:
        keys["packing_strategy"] = sft.packing_strategy
    elif sft.max_length is not None:
        keys["truncation_mode"] = sft.truncation_mode
    if sft.shuffle_dataset:
        keys["seed"] = sft.seed
    if toolkit.mask_guard == "repair":
        keys["max_length_limit"] = toolkit.max_length_limit
    if sft.completion_only_loss:
        keys["completion_only_loss"] = sft.completion_only_loss
    if toolkit.train_roles is not None or toolkit.train_turns != "all":  # which assistant turns are trained
        keys.update(train_roles=toolkit.train_roles, train_turns=toolkit.train_turns)
    keys.update(_source_keys(recipe))
    return keys


SOURCE_KEYS = ("dataset_config", "datasets", "test_split_size", "dataset_mixture")  # which rows, besides dataset_name


def _source_keys(recipe) -> dict:
    """Where the rows come from, where the recipe says more than dataset_name: its config, or a mixture (each
    source, and the seeded split that takes the eval rows out of it)."""
    keys = {}
    if recipe.script.dataset_config is not None:
        keys["dataset_config"] = recipe.script.dataset_config
    mixture = getattr(recipe, "mixture", None)
    if mixture is not None and mixture.datasets:
        keys["datasets"] = [{k: v for k, v in vars(source).items() if v is not None} for source in mixture.datasets]
        if mixture.test_split_size is not None:
            keys.update(test_split_size=mixture.test_split_size, seed=recipe.sft.seed)
    handbook = getattr(recipe, "handbook_mixture", None)
    if handbook is not None:
        keys["dataset_mixture"] = json.loads(json.dumps(dataclasses.asdict(handbook)))  # as the manifest holds it
    return keys


def tokenizer_sha256(tokenizer) -> str:
    """The tokenizer's content: its full serialization (vocabulary, merges, normalizer, pre/post-processor,
    added tokens) and its special tokens; not its path, which differs between machines."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True)
    return hashlib.sha256((body + "\n" + special).encode()).hexdigest()


def rendering_template(tokenizer, sft) -> str | None:
    """The chat template rows are rendered with (TRL's training variant where it swaps one in)."""
    from .preprocess import training_template

    if not tokenizer.chat_template:
        return None
    return training_template(tokenizer, sft) or tokenizer.chat_template


def _sha256(template: str | dict | None) -> str | None:
    """A template's fingerprint; of a tokenizer's named templates (a dict), of all of them with their names."""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest() if template is not None else None


def versions() -> dict:
    import datasets
    import transformers
    import trl

    from . import __version__

    return {
        "sft_toolkit": __version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }


def dataset_summary(dataset) -> dict:
    """Numbers the re-check recomputes: a dataset dir swapped or edited after prepare no longer matches.

    Counted from `labels` alone: prepare builds each sequence's labels with its input_ids (cut and packed
    together), so their lengths are its tokens, and `recheck` holds the saved dataset to both. The token ids are
    not read here, so with `dataset_num_proc` the main process never reads them (its maps and the save run in
    workers), which keeps its peak memory at check-data's."""
    tokens = trainable = 0
    for table in dataset.select_columns(["labels"]).with_format("arrow").iter(batch_size=BATCH):
        labels = (table if isinstance(table, pa.Table) else pa.Table.from_pydict(table))["labels"]
        tokens += int(pc.sum(pc.list_value_length(labels)).as_py() or 0)
        trainable += int(pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() or 0)
    return {"sequences": len(dataset), "tokens": tokens, "trainable_tokens": trainable}


def tokenizer_entry(tokenizer) -> dict:
    """The manifest's `tokenizer`: its name and content hash (`tokenizer_sha256`)."""
    return {"name_or_path": tokenizer.name_or_path, "sha256": tokenizer_sha256(tokenizer)}


def build_manifest(
    recipe_keys: dict,
    tokenizer: dict,
    template: str | None,
    report: Report,
    repairs: list[str],
    applied: dict,
    dataset,
) -> dict:
    """`tokenizer`: `tokenizer_entry` of the tokenizer the data was prepared with."""
    return {
        "format": FORMAT,
        "recipe": recipe_keys,
        "applied": applied,  # settings in force after the guard's repairs (what train must use)
        "repairs": repairs,
        "tokenizer": tokenizer,
        "template": {"sha256": _sha256(template)},  # None: plain text or pre-tokenized rows, no template used
        "versions": versions(),
        "accounting": report.to_json(),
        "dataset": dataset_summary(dataset),
    }


def save(
    out_dir: str | Path, dataset, manifest: dict, inputs: Iterable[Input] = (), *, num_proc: int | None = None
) -> Path:
    """Write DIR/dataset and DIR/manifest.json into a fresh folder renamed into place (`outputs.replace_dir`):
    DIR is replaced only when it is new, empty or a prepared directory the toolkit wrote, and never when it
    is, holds or lies inside one of `inputs`. `num_proc` (the recipe's dataset_num_proc): the dataset is written
    in that many shards by as many processes, as its maps were, so the main process doesn't read every token."""

    def fill(folder: Path) -> None:
        dataset.save_to_disk(str(folder / DATASET), num_proc=num_proc)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    return replace_dir(out_dir, KIND, fill, inputs)


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    if not Path(prepared_dir).is_dir():
        raise InputError(
            f"{prepared_dir}: {'no such directory' if not os.path.lexists(prepared_dir) else 'not a directory'}; "
            "give the folder `sft-toolkit prepare -o DIR` saved"
        )
    if not path.is_file():
        raise InputError(
            f"{prepared_dir}: no {MANIFEST}; not a directory `sft-toolkit prepare` wrote (or it did not "
            "finish): run prepare again"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); run prepare again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(
            f"{path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
            f"is not {FORMAT}; prepare it again with this version of sft-toolkit"
        )
    missing = [
        key for key in ("recipe", "tokenizer", "template", "accounting") if not isinstance(manifest.get(key), dict)
    ]
    if missing:
        raise InputError(f"{path}: field(s) {', '.join(missing)} missing or not objects; run prepare again")
    return manifest


def mismatches(manifest: dict, recipe, tokenizer) -> list[str]:
    """Every difference between how the data was prepared and how this recipe would prepare it, named."""
    out = []
    theirs = manifest.get("recipe", {})
    for key, value in shaping_keys(recipe).items():
        if key == "dataset_name" and value is None:
            continue  # a recipe with only `prepared:` trains on what was prepared, wherever it came from
        if key not in theirs or theirs[key] != value:
            out.append(f"{key}: recipe {value!r}, prepared {theirs.get(key, '(not set)')!r}")
    ours = shaping_keys(recipe)
    for key in sorted(set(theirs) - set(ours)):
        source_key = key in SOURCE_KEYS or key == "seed" and "test_split_size" in theirs
        if source_key and ours["dataset_name"] is None and "datasets" not in ours and "dataset_mixture" not in ours:
            continue  # (a recipe with only `prepared:`, as above)
        out.append(f"{key}: recipe (not in force), prepared {theirs[key]!r}")
    sha = tokenizer_sha256(tokenizer)
    if manifest.get("tokenizer", {}).get("sha256") != sha:
        out.append(
            f"tokenizer: recipe {tokenizer.name_or_path} (sha256 {sha[:12]}), prepared "
            f"{manifest.get('tokenizer', {}).get('name_or_path')} "
            f"(sha256 {str(manifest.get('tokenizer', {}).get('sha256'))[:12]})"
        )
    prepared_sha = manifest.get("template", {}).get("sha256")
    template_sha = _sha256(rendering_template(tokenizer, recipe.sft)) if prepared_sha is not None else None
    if prepared_sha != template_sha:  # (plain-text and pre-tokenized data were rendered with no template)
        out.append(
            f"chat template: recipe sha256 {str(template_sha)[:12]}, prepared "
            f"sha256 {str(manifest.get('template', {}).get('sha256'))[:12]}"
        )
    return out


def load_prepared(recipe: Recipe, world_size: int = 1) -> Guarded:
    """The prepared dataset for this recipe, checked; returned like `train.guard` returns one: the accounting,
    the dataset, the recipe with the settings prepare's repairs applied (max_length, packing_strategy; `recipe`
    itself stays as it is), and those settings as `Repairs` whose notes are the repairs prepare applied and
    warnings.

    Raises InputError naming each difference from the recipe or tokenizer, or what is wrong in the data.
    Every rank of a multi-process run calls this and memory-maps the same files: nothing is re-tokenized.
    """
    import datasets

    from .preprocess import load_tokenizer_for

    folder = Path(recipe.toolkit.prepared)
    manifest = read_manifest(folder)
    tokenizer = load_tokenizer_for(recipe)
    differences = mismatches(manifest, recipe, tokenizer)
    if differences:
        raise InputError(
            f"{folder}: prepared with other settings than {recipe.source} — "
            + "; ".join(differences)
            + f". Run `sft-toolkit prepare {shlex.quote(str(recipe.source))} -o {shlex.quote(str(folder))}` again "
            "(with the same --KEY VALUE overrides as this command, if it has any), or fix the recipe"
        )
    try:
        dataset = datasets.load_from_disk(str(folder / DATASET))
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{folder / DATASET}: cannot load the prepared dataset ({err}); run prepare again") from None
    # The guard's repairs at prepare time (e.g. a raised max_length) are in force.
    applied = {key: value for key, value in manifest.get("applied", {}).items() if key in APPLIED}
    changed = {key: Change(getattr(recipe.sft, key), value) for key, value in applied.items()}
    changed = {key: change for key, change in changed.items() if change.before != change.after}
    recipe = recipe.with_sft(**applied)
    stats = recheck(dataset, recipe, manifest, folder)
    report = Report.from_json(manifest["accounting"])
    sft = recipe.sft
    per_step = sft.per_device_train_batch_size * sft.gradient_accumulation_steps * world_size
    report.settings = {
        **report.settings,
        "per_device_train_batch_size": sft.per_device_train_batch_size,
        "gradient_accumulation_steps": sft.gradient_accumulation_steps,
        "world_size": world_size,
    }
    report.steps = math.ceil(len(stats.zero) / per_step)
    report.zero_trainable_steps = sum(
        bool(stats.zero[i : i + per_step].all()) for i in range(0, len(stats.zero), per_step)
    )
    notes = [f"prepare applied: {r}" for r in manifest.get("repairs", [])]
    ours = versions()
    notes += [
        f"warning: prepared with {name} {v}, training with {ours.get(name)}"
        for name, v in manifest.get("versions", {}).items()
        if ours.get(name) != v
    ]
    if stats.zero.any():
        notes.append(f"warning: {int(stats.zero.sum())} sequences have zero trainable tokens (mask_guard warn)")
    repairs = Repairs(
        max_length=changed.get("max_length"), packing_strategy=changed.get("packing_strategy"), notes=tuple(notes)
    )
    return Guarded(report, dataset, None, recipe, repairs)  # the train split only: no eval split is prepared


@dataclass
class _Stats:
    tokens: int = 0
    trainable_tokens: int = 0
    longest: int = 0
    zero: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # per sequence: nothing trains
    bad_labels: list[tuple[int, int]] = field(default_factory=list)  # (sequence, position)
    bad_lengths: list[int] = field(default_factory=list)  # sequences whose labels and input_ids differ in length


def _scan(dataset) -> _Stats:
    """One vectorized pass: lengths, labels vs input_ids, trainable tokens per sequence."""
    stats, zero, start = _Stats(), [], 0
    for table in dataset.select_columns(["input_ids", "labels"]).with_format("arrow").iter(batch_size=BATCH):
        table = table if isinstance(table, pa.Table) else pa.Table.from_pydict(table)
        lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
        label_lengths = pc.list_value_length(table["labels"]).to_numpy(zero_copy_only=False)
        stats.bad_lengths += [start + int(i) for i in np.flatnonzero(lengths != label_lengths)]
        stats.longest = max(stats.longest, int(lengths.max(initial=0)))
        stats.tokens += int(lengths.sum())
        if not stats.bad_lengths:
            ids = pc.list_flatten(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
            labels = pc.list_flatten(table["labels"]).to_numpy(zero_copy_only=False).astype(np.int64)
            trained = labels != -100
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            wrong = np.flatnonzero(trained & (labels != ids))
            if len(wrong) and not stats.bad_labels:
                seq = int(np.searchsorted(offsets, wrong[0], side="right") - 1)
                stats.bad_labels.append((start + seq, int(wrong[0] - offsets[seq])))
            running = np.concatenate([[0], np.cumsum(trained)])
            per_seq = running[offsets[1:]] - running[offsets[:-1]]
            stats.trainable_tokens += int(per_seq.sum())
            zero.append(per_seq == 0)
        start += len(lengths)
    stats.zero = np.concatenate(zero) if zero else np.zeros(0, dtype=bool)
    return stats


def recheck(dataset, recipe, manifest: dict, folder: Path) -> _Stats:
    """The cheap re-check before training: labels consistent with input_ids, no zero-trainable sequence
    (unless mask_guard: warn), no sequence past max_length, and the numbers prepare recorded."""
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise InputError(f"{folder / DATASET}: no {', '.join(sorted(missing))} column; run prepare again")
    stats = _scan(dataset)
    where = f"{folder / DATASET}"
    if stats.bad_lengths:
        raise InputError(
            f"{where}: labels and input_ids differ in length in sequences "
            f"{', '.join(map(str, stats.bad_lengths[:SHOWN]))}; run prepare again"
        )
    if stats.bad_labels:
        seq, pos = stats.bad_labels[0]
        raise InputError(
            f"{where}: sequence {seq}, position {pos}: a trained label differs from its input_id "
            "(labels must be the input_ids, -100 where nothing is trained); run prepare again"
        )
    max_length = recipe.sft.max_length
    if max_length is not None and stats.longest > max_length:
        raise InputError(f"{where}: a sequence has {stats.longest} tokens, more than max_length {max_length}")
    zero = np.flatnonzero(stats.zero)
    if len(zero) and recipe.guard_mode is not GuardMode.WARN:
        raise InputError(
            f"{where}: {len(zero)} sequences have zero trainable tokens "
            f"({', '.join(map(str, zero[:SHOWN]))}); run prepare again (with mask_guard: repair to drop them)"
        )
    recorded = manifest.get("dataset", {})
    found = {"sequences": len(dataset), "tokens": stats.tokens, "trainable_tokens": stats.trainable_tokens}
    changed = [f"{k} {recorded.get(k)} recorded, {v} found" for k, v in found.items() if recorded.get(k) != v]
    if changed:
        raise InputError(f"{where}: changed since prepare wrote it ({'; '.join(changed)}); run prepare again")
    return stats
