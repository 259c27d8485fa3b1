"""A LoRA run on the tiny quickstart model: trainable tokens in the trainer's logs, and the merged export
(`merge_adapter: true` and `sft-toolkit merge`) as an ordinary model with the training chat template."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from sft_toolkit import train as train_module
from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.cli import main
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import build_recipe
from sft_toolkit.templates import load_template

STEPS, ACCUMULATION = 3, 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def lora_keys(assets, run_dir: Path, **keys) -> dict:
    return {
        "model_name_or_path": str(assets["model"]),
        "dataset_name": str(assets["eval"]),
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        "output_dir": str(run_dir),
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": ACCUMULATION,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "dataloader_num_workers": 0,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "merge_adapter": True,
        **keys,
    }


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """One LoRA run with merge_adapter: true; records each micro-batch's labels and the trainer itself."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    batches, trainers = [], []
    original_class, original_wrap = train_module.guarded_trainer_class, train_module._with_source_rows

    def recording_wrap(collate):
        wrapped = original_wrap(collate)

        def collate_and_record(examples):
            batch = wrapped(examples)
            batches.append(batch["labels"].clone())
            return batch

        return collate_and_record

    def recording_class():
        class Recording(original_class()):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                trainers.append(self)

        return Recording

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "_with_source_rows", recording_wrap)
        patch.setattr(train_module, "guarded_trainer_class", recording_class)
        said = []
        outcome = train_module.train(build_recipe(lora_keys(assets, run_dir)), log=said.append)
    return {"run_dir": run_dir, "outcome": outcome, "batches": batches, "trainer": trainers[0], "said": said}


def test_each_logged_step_carries_its_trainable_tokens_and_the_running_total(lora_run):
    logs = [entry for entry in lora_run["trainer"].state.log_history if "loss" in entry]
    assert len(logs) == STEPS
    # The dataloader may fetch one batch ahead; the first STEPS * ACCUMULATION micro-batches are the trained ones.
    counted = [int((labels != -100).sum()) for labels in lora_run["batches"][: STEPS * ACCUMULATION]]
    per_step = [sum(counted[i * ACCUMULATION : (i + 1) * ACCUMULATION]) for i in range(STEPS)]
    assert all(n > 0 for n in per_step)
    assert [entry["trainable_tokens"] for entry in logs] == per_step
    running = [sum(per_step[: i + 1]) for i in range(STEPS)]
    assert [entry["trainable_tokens_total"] for entry in logs] == running


def test_a_resumed_run_continues_the_total_from_the_log_history():
    history = [
        {"loss": 1.0, "trainable_tokens": 40, "trainable_tokens_total": 40},
        {"eval_loss": 2.0},
        {"loss": 0.9, "trainable_tokens": 35, "trainable_tokens_total": 75},
    ]
    assert train_module.trainable_token_logs(history, 30) == {"trainable_tokens": 30, "trainable_tokens_total": 105}
    assert train_module.trainable_token_logs([], 12) == {"trainable_tokens": 12, "trainable_tokens_total": 12}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_merge_adapter_saves_an_ordinary_model_that_predicts_like_the_adapter(lora_run, assets):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = lora_run["run_dir"] / "merged"
    assert any(f"saved the merged model to {merged_dir}" in s for s in lora_run["said"])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name in merged.state_dict())
    adapter = AutoPeftModelForCausalLM.from_pretrained(lora_run["run_dir"]).eval()
    base = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = torch.tensor([tokenizer("What is 2 + 3? It is 5.")["input_ids"]])
    assert torch.allclose(logits(merged, ids), logits(adapter, ids), atol=1e-4)
    assert not torch.allclose(logits(merged, ids), logits(base, ids), atol=1e-3)  # the adapter changed something
    assert tokenizer.chat_template == load_template("chatml").source  # the template it was trained with


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_merge_command_writes_a_new_directory_and_never_into_a_users(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("my notes")
    code, _, err = run_cli(["merge", str(lora_run["run_dir"]), "-o", str(users)])
    assert code == 2 and "exists and is not empty" in err and "Traceback" not in err
    assert [p.name for p in users.iterdir()] == ["notes.txt"] and (users / "notes.txt").read_text() == "my notes"

    target = tmp_path / "exported" / "model"
    code, out, err = run_cli(["merge", str(lora_run["run_dir"]), "-o", str(target)])
    assert code == 0, err
    assert f"saved the merged model and tokenizer to {target}" in out
    AutoModelForCausalLM.from_pretrained(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging folder left behind


def test_merge_of_a_folder_without_adapter_is_refused(assets, tmp_path):
    code, _, err = run_cli(["merge", str(assets["model"]), "-o", str(tmp_path / "out")])
    assert code == 2 and "no LoRA adapter here (adapter_config.json is missing)" in err
    assert not (tmp_path / "out").exists()


def test_merge_adapter_into_a_non_empty_folder_is_refused_before_training(assets, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "merged").mkdir(parents=True)
    (run_dir / "merged" / "model.safetensors").write_text("the user's")
    with pytest.raises(InputError, match="merged: exists and is not empty"):
        train_module.train(build_recipe(lora_keys(assets, run_dir)), log=lambda _: None)
    assert sorted(p.name for p in run_dir.iterdir()) == ["merged"]  # nothing trained, nothing saved
    assert (run_dir / "merged" / "model.safetensors").read_text() == "the user's"


def test_merge_adapter_needs_lora(assets, tmp_path):
    with pytest.raises(InputError, match="merge_adapter: true merges a LoRA adapter .* needs use_peft: true"):
        build_recipe(lora_keys(assets, tmp_path / "run", use_peft=False))


def test_the_training_log_file_is_json_serialisable(lora_run):
    json.dumps(lora_run["trainer"].state.log_history)  # what report_to integrations and trainer_state.json get
