"""Nothing lost in a training run, quickstart, a report or a leftover: what transformers, TRL and PEFT would delete or
write over under a user's path is either provably the toolkit's, or the run is refused up front with exit 2 naming
the path (and the user's files survive byte for byte).

The paths these cover, in the installed versions (transformers 5, TRL 1.16, PEFT 0.21):
- transformers' `_finalize_training` with save_total_limit 1 and a best checkpoint rmtree's every `checkpoint-*`
  folder in output_dir but the best one, without asking whether it is a checkpoint;
- TRL's `SFTTrainer._save_checkpoint` writes the model card to output_dir/README.md at every save;
- the final `save_model(output_dir)` writes the model, tokenizer and training_args.bin over files of those names,
  and `save_pretrained` deletes `model-0000N-of-0000M.safetensors` files it does not rewrite;
- the mask guard's repair writes output_dir/training_chat_template.jinja;
- quickstart builds its assets beside the recipe's model, where a `tiny-chat` folder may be the user's;
- `check-data --report FILE` also writes the Markdown report beside FILE;
- `merge -o DIR` stages the merged model beside DIR;
- a killed `prepare -o DIR` leaves `.DIR.partial-*`, which the next prepare names (and never removes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_eval_train import small_dataset
from test_no_data_loss import home, no_training, refused, run, tiny_model, tree, write_recipe

from sft_toolkit import outputs
from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.problems import InputError

__all__ = ["home", "no_training", "tiny_model"]  # fixtures, shared with test_no_data_loss

TRAINS = {
    "max_steps": 2,
    "save_steps": 1,
    "per_device_train_batch_size": 2,
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "max_length": 128,
}


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.md").write_text("my notes, not a checkpoint")
    return path


# --- transformers' end-of-training cleanup ------------------------------------------------------------------


def test_best_checkpoint_cleanup_deletes_only_proven_checkpoints(home, tiny_model):
    """save_total_limit 1 with a best checkpoint: transformers deletes every `checkpoint-*` folder but the best at
    the end; the toolkit lets it delete only checkpoints, never folders that merely carry the name."""
    assets = {"train": tiny_model.parent / "data" / "train.jsonl", "eval": tiny_model.parent / "data" / "eval.jsonl"}
    small_dataset(assets, home / "evaldata")
    run_dir = home / "run"
    named = users_folder(run_dir / "checkpoint-7")  # a step this run never saves, so not refused up front
    lettered = users_folder(run_dir / "checkpoint-notes")
    kept = {path: tree(path) for path in (named, lettered)}
    write_recipe(
        home,
        model_name_or_path=str(tiny_model),
        dataset_name="evaldata",
        dataset_config="all",
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        save_total_limit=1,
        per_device_eval_batch_size=2,
        **TRAINS,
    )
    code, err = run(["train", "recipe.yaml"], home)
    assert code == 0, err
    assert {path: tree(path) for path in (named, lettered)} == kept
    proven = [p.name for p in outputs.checkpoint_entries(run_dir) if outputs.checkpoint_step(p) is not None]
    assert len(proven) == 1  # the limit still holds for the run's own checkpoints


# --- files the run writes at the top of output_dir -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overwrite"),
    [
        ("README.md", False),  # TRL's model card, at every checkpoint save
        ("tokenizer_config.json", False),  # the final save's tokenizer
        ("training_args.bin", False),
        ("model-00001-of-00002.safetensors", False),  # save_pretrained deletes shards it does not rewrite
        ("config.json", True),  # a base model of the user's: overwrite_output_dir deletes checkpoints only
        ("model.safetensors", True),
        ("training_chat_template.jinja", False),  # the mask guard's repaired template
        (".sft-toolkit-owned", False),  # the record that proves the run's own files
    ],
)
def test_a_users_file_the_run_would_write_is_refused_up_front(home, no_training, name, overwrite):
    (home / "run").mkdir()
    (home / "run" / name).write_bytes(b"the user's own " + name.encode())
    write_recipe(home, overwrite_output_dir=overwrite)
    refused(home, ["train", "recipe.yaml"], f"run/{name}")


def test_the_model_card_is_never_written_through_a_link(home, no_training):
    (home / "run").mkdir()
    (home / "mine.md").write_text("my own README")
    (home / "run" / "README.md").symlink_to(home / "mine.md")
    refused(home, ["train", "recipe.yaml"], "run/README.md")


def test_a_run_replaces_its_own_files_and_keeps_the_users_others(home, tiny_model):
    run_dir = home / "run"
    users_folder(run_dir / "runs")  # e.g. TensorBoard logs of the user's own
    (run_dir / "my_eval.txt").write_text("kept")
    write_recipe(home, model_name_or_path=str(tiny_model), overwrite_output_dir=True, save_total_limit=1, **TRAINS)
    code, err = run(["train", "recipe.yaml"], home)
    assert code == 0, err
    first = (run_dir / "model.safetensors").read_bytes()
    assert (run_dir / "README.md").is_file() and (run_dir / outputs.OWNER_FILE).is_file()
    write_recipe(
        home,
        model_name_or_path=str(tiny_model),
        overwrite_output_dir=True,
        save_total_limit=1,
        **{**TRAINS, "learning_rate": 0.05},
    )
    code, err = run(["train", "recipe.yaml"], home)  # its own earlier files are proven: replaced
    assert code == 0, err
    assert (run_dir / "model.safetensors").read_bytes() != first
    assert (run_dir / "my_eval.txt").read_text() == "kept" and (run_dir / "runs" / "notes.md").is_file()
    (run_dir / "tokenizer.json").write_text("{}")  # changed by hand: no longer provably the toolkit's
    refused(home, ["train", "recipe.yaml"], "run/tokenizer.json")


def test_the_repaired_template_is_never_written_over_a_users_file(home):
    (home / "plain.jinja").write_text(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (home / "run").mkdir()
    (home / "run" / "training_chat_template.jinja").write_text("my template")
    write_recipe(home, chat_template_path="plain.jinja", mask_guard="repair")
    refused(home, ["train", "recipe.yaml"], "run/training_chat_template.jinja")


# --- quickstart -------------------------------------------------------------------------------------------------


def test_quickstart_never_deletes_a_folder_named_like_its_model(tmp_path):
    mine = users_folder(tmp_path / "tiny-chat")
    kept = tree(mine)
    with pytest.raises(InputError, match="tiny-chat"):
        build_quickstart_assets(tmp_path)
    assert tree(mine) == kept


# --- check-data --report ----------------------------------------------------------------------------------------


def test_the_markdown_report_beside_never_replaces_a_users_file(home):
    (home / "reports").mkdir()
    (home / "reports" / "data.md").write_text("# my own notes")
    refused(home, ["check-data", "recipe.yaml", "--report", "reports/data.json"], "reports/data.md")
    (home / "reports" / "data.md").unlink()
    for _ in range(2):  # its own report is replaced
        code, err = run(["check-data", "recipe.yaml", "--report", "reports/data.json"], home)
        assert code == 0, err


# --- leftovers of a killed prepare -----------------------------------------------------------------------------


def test_a_killed_prepares_leftover_is_named_and_kept(home):
    leftover = home / ".out.partial-0123456789abcdef"
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    kept = tree(leftover)
    code, err = run(["prepare", "recipe.yaml", "-o", "out"], home)
    assert code == 0, err
    assert tree(leftover) == kept
    assert str(leftover.name) in err and "rm -r" in err, err


# --- the staging folder of checkpoint saves --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["link", "file", "users_folder"])
def test_a_users_staging_folder_name_is_refused(home, no_training, kind):
    staging = home / "run" / ".incomplete"
    (home / "run").mkdir()
    if kind == "link":
        users_folder(home / "elsewhere")
        staging.symlink_to(home / "elsewhere")
    elif kind == "file":
        staging.write_text("mine")
    else:
        users_folder(staging)
    refused(home, ["train", "recipe.yaml"], "run/.incomplete")


# --- merge -----------------------------------------------------------------------------------------------------


def test_merge_never_removes_a_folder_beside_its_target_and_names_it(home, tiny_model):
    write_recipe(home, model_name_or_path=str(tiny_model), use_peft=True, lora_r=4, **TRAINS)
    code, err = run(["train", "recipe.yaml"], home)
    assert code == 0, err
    beside = [users_folder(home / f".merged.incomplete-{os.getpid()}"), users_folder(home / ".merged.incomplete-0")]
    kept = {path: tree(path) for path in beside}
    code, err = run(["merge", "run", "-o", "merged"], home)
    assert code == 0, err
    assert {path: tree(path) for path in beside} == kept
    assert (home / "merged" / "model.safetensors").is_file()
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(".merged")) == sorted(p.name for p in beside)
    # ... and named, with the command that removes them, as a killed prepare's leftovers are.
    assert all(path.name in err for path in beside) and "rm -r" in err, err


def test_the_final_save_is_placed_over_recorded_files_only(tmp_path):
    run_dir, staged = tmp_path / "run", tmp_path / "run" / outputs.STAGING / outputs.FINAL_SAVE
    staged.mkdir(parents=True)
    (run_dir / "model.safetensors").write_text("an earlier run's weights")
    (run_dir / "model-00001-of-00002.safetensors").write_text("the user's shard, never recorded")
    outputs.record_run_files(run_dir, ["model.safetensors"])
    for name in ("model.safetensors.index.json", "model-00001-of-00001.safetensors", "config.json"):
        (staged / name).write_text(f"new {name}")
    (run_dir / "config.json").write_text("the user's, put there during the run")
    before = tree(tmp_path)
    with pytest.raises(InputError, match=r"run/config.json is not a file sft-toolkit wrote.*kept whole at"):
        outputs.place_final_save(staged, run_dir)
    assert tree(tmp_path) == before  # nothing moved
    (run_dir / "config.json").unlink()
    placed = outputs.place_final_save(staged, run_dir)
    assert placed == sorted(
        p.name for p in run_dir.iterdir() if p.name.startswith(("config", "model.s", "model-00001-of-00001"))
    )
    assert not (run_dir / "model.safetensors").exists()  # the earlier run's weights: recorded, and stale now
    assert (run_dir / "model-00001-of-00002.safetensors").read_text() == "the user's shard, never recorded"
    assert not (run_dir / outputs.STAGING).exists()
    assert all(outputs.run_file_problem(run_dir, name) is None for name in placed)


def test_an_output_dir_link_is_checked_where_it_points(home, no_training):
    (home / "elsewhere").mkdir()
    (home / "elsewhere" / "README.md").write_text("the README of the folder the link points to")
    (home / "run").symlink_to(home / "elsewhere")
    refused(home, ["train", "recipe.yaml"], "run/README.md is not a file sft-toolkit wrote")
