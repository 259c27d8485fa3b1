"""Training with an eval split as `trl sft` runs it: checked before the model loads, evaluated at eval_strategy
(`eval_loss` logged), best checkpoint loaded at the end, early stopping; and the handbook-shaped recipe end to end.
All on the tiny quickstart model, a few rows, a few steps."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import transformers

from sft_toolkit.assets import DATASET_CARD, build_quickstart_assets
from sft_toolkit.cli import main
from sft_toolkit.recipe import build_recipe
from sft_toolkit.train import GuardStop, train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def small_dataset(assets, folder: Path, train_rows: int = 16, eval_rows: int = 8, edit_eval=None) -> Path:
    """The quickstart's data folder in small: its dataset card (config `all`: train and test) and a few rows."""
    folder.mkdir(parents=True, exist_ok=True)
    train_lines = Path(assets["train"]).read_text().splitlines()[:train_rows]
    eval_rows_ = [json.loads(line) for line in Path(assets["eval"]).read_text().splitlines()[:eval_rows]]
    if edit_eval:
        edit_eval(eval_rows_)
    (folder / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows_))
    (folder / "README.md").write_text(DATASET_CARD)
    return folder


def recipe_keys(assets, tmp_path, data: Path, **keys) -> dict:
    return {
        "model_name_or_path": str(assets["model"]),
        "dataset_name": str(data),
        "dataset_config": "all",
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "dataloader_num_workers": 0,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "max_steps": 4,
        **keys,
    }


def test_handbook_recipe_runs_end_to_end_with_only_model_and_data_paths_changed(assets, tmp_path):
    data = small_dataset(assets, tmp_path / "data")
    recipe = ROOT / "recipes" / "handbook_smollm2_sft.yaml"
    out = io.StringIO()
    verbosity = transformers.logging.get_verbosity()  # the recipe's log_level: info holds for the whole process
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "train",
                str(recipe),
                "--model_name_or_path",
                str(assets["model"]),
                "--dataset_name",
                str(data),
                # a handful of rows and steps: one epoch, written under the test's folder
                "--num_train_epochs",
                "1",
                "--output_dir",
                str(tmp_path / "run"),
            ]
        )
    transformers.logging.set_verbosity(verbosity)
    assert code == 0, out.getvalue()[-2000:]
    printed = json.loads(out.getvalue()[out.getvalue().index("{\n") :])
    assert printed["eval"]["rows"] == 8 and printed["eval"]["zero_mask_rows"] == []
    assert printed["eval_loss"] > 0  # evaluated at the end of the epoch (eval_strategy: epoch)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_eval_loss_is_logged_at_eval_strategy(assets, tmp_path):
    data = small_dataset(assets, tmp_path / "data")
    outcome = train(build_recipe(recipe_keys(assets, tmp_path, data)), log=lambda _: None)
    assert outcome.report.eval.rows == 8
    assert outcome.metrics["first_eval_loss"] > 0 and outcome.metrics["eval_loss"] > 0
    assert outcome.metrics["eval_loss"] != outcome.metrics["first_eval_loss"]  # evaluated at steps 2 and 4
    # each evaluation's log carries the eval split's trainable tokens, as check-data counts them
    assert outcome.metrics["eval_trainable_tokens"] == outcome.report.eval.trainable_tokens > 0


def test_a_zero_mask_eval_row_stops_the_run_before_the_model_loads(assets, tmp_path):
    def empty_answer(rows):
        for message in rows[5]["messages"]:
            if message["role"] == "assistant":
                message["content"] = ""

    data = small_dataset(assets, tmp_path / "data", edit_eval=empty_answer)
    with pytest.raises(
        GuardStop,
        match=r"eval split: 1 rows end with zero trainable tokens.*Eval split rows with "
        r"nothing to evaluate: 5 \(empty_assistant_content\)",
    ):
        train(build_recipe(recipe_keys(assets, tmp_path, data)), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_early_stopping_and_the_best_checkpoint_loaded_at_the_end(assets, tmp_path):
    # learning_rate 0: the eval loss never improves on the first evaluation, so patience 1 stops at the second.
    data = small_dataset(assets, tmp_path / "data")
    keys = recipe_keys(
        assets,
        tmp_path,
        data,
        learning_rate=0.0,
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        max_steps=6,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        early_stopping_patience=1,
    )
    outcome = train(build_recipe(keys), log=lambda _: None)
    assert len(outcome.history) == 2  # two logged steps of six: stopped early
    best = Path(outcome.metrics["best_model_checkpoint"])
    assert best == tmp_path / "run" / "checkpoint-1" and (best / "trainer_state.json").exists()


def test_early_stopping_without_evaluation_is_refused(assets, tmp_path):
    from sft_toolkit.problems import InputError

    data = small_dataset(assets, tmp_path / "data")
    with pytest.raises(InputError, match="early_stopping_patience needs evaluation"):
        build_recipe(recipe_keys(assets, tmp_path, data, eval_strategy="no", early_stopping_patience=2))
