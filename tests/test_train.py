"""Training under the mask guard: reject before loading weights, repair and say so, stop on every rank at once."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.recipe import build_recipe
from sft_toolkit.train import GuardStop, train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def rows_with_long_prompts(assets, n_long: int = 6) -> list[dict]:
    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()[:40]]
    long = {
        "messages": [
            {"role": "user", "content": "Convert 3 km to m. " * 40},
            {"role": "assistant", "content": "3 km = 3000 m."},
        ]
    }
    return rows + [long] * n_long


def recipe_keys(assets, tmp_path, rows, **keys) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model_name_or_path": str(assets["model"]),
        "dataset_name": str(data),
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "dataloader_num_workers": 0,
        **keys,
    }


def test_wrapped_packing_seed_failure_is_rejected_before_loading_the_model(assets, tmp_path):
    keys = recipe_keys(
        assets, tmp_path, rows_with_long_prompts(assets), max_length=64, packing=True, packing_strategy="wrapped"
    )
    with pytest.raises(GuardStop, match="mask guard \\(reject\\).*trained without the conversation"):
        train(build_recipe(keys), log=lambda _: None)
    assert not (tmp_path / "run").exists()  # nothing was trained or saved


def test_repair_switches_to_bfd_drops_empty_sequences_and_trains_every_step(assets, tmp_path):
    keys = recipe_keys(
        assets,
        tmp_path,
        rows_with_long_prompts(assets),
        max_length=64,
        packing=True,
        packing_strategy="wrapped",
        mask_guard="repair",
    )
    said = []
    outcome = train(build_recipe(keys), log=said.append)
    assert any("packing_strategy wrapped -> bfd" in s for s in said)
    assert any(s.startswith("mask guard (repair): dropped") for s in said)
    assert outcome.metrics["first_loss"] > 0 and outcome.metrics["last_loss"] > 0
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_zero_trainable_step_stops_training(assets, tmp_path):
    # warn lets the zero-trainable sequences through; the in-training guard must catch the step.
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Convert 3 km to m. " * 40},
                {"role": "assistant", "content": "3 km = 3000 m."},
            ]
        }
    ] * 4
    keys = recipe_keys(
        assets, tmp_path, rows, max_length=64, packing=True, mask_guard="warn", per_device_train_batch_size=1
    )
    with pytest.raises(GuardStop, match="step 1: zero trainable tokens on rank\\(s\\) 0") as stop:
        train(build_recipe(keys), log=lambda _: None)
    # the message names the dataset rows in the empty batch (every row here is one of 0..3)
    assert re.search(r"rank 0's batch holds dataset rows [0-3]\b", str(stop.value))


def test_non_finite_loss_stops_before_the_optimizer_step(assets, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(broken)
    keys = recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0), max_length=128)
    keys["model_name_or_path"] = str(broken)
    with pytest.raises(GuardStop, match="step 1: non-finite loss"):
        train(build_recipe(keys), log=lambda _: None)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(
    recipe: Path,
    *,
    launcher: tuple[str, ...] = ("--multi_gpu",),
    entry: tuple[str, ...] = ("--module", "sft_toolkit", "train"),
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Two processes under `accelerate launch` (DDP on gloo by default): `launcher` holds the launcher's own
    options (a `--config_file`, ...), `entry` what it starts, given the recipe; `env` is added to the environment."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--main_process_port", str(free_port()), *entry, str(recipe)]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=environment)


def test_two_processes_train_then_stop_together_on_a_zero_token_rank(assets, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0), max_length=128, max_steps=3))
    )
    proc = launch_two(good)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert '"trainable_tokens"' in proc.stdout

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    rows = rows_with_long_prompts(assets, 6)[:8] + rows_with_long_prompts(assets, 6)[40:]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            recipe_keys(
                assets,
                bad_dir,
                rows,
                max_length=64,
                packing=True,
                mask_guard="warn",
                per_device_train_batch_size=1,
                max_steps=50,
            )
        )
    )
    proc = launch_two(bad)  # the timeout above is the "no rank left hanging" assertion
    assert proc.returncode != 0
    steps = re.findall(r"stopped by the mask guard: step (\d+): zero trainable tokens", proc.stdout)
    assert len(steps) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # both ranks ...
    assert len(set(steps)) == 1  # ... at the same step
    assert re.search(r"batch holds dataset rows \d+", proc.stdout + proc.stderr)  # the rows are named


def test_packing_isolation_probe_tells_isolated_from_leaking(assets, tmp_path):
    from datasets import Dataset

    from sft_toolkit.preprocess import load_tokenizer_for
    from sft_toolkit.train import ISOLATION_TOLERANCE, guarded_trainer_class, packing_isolation, prepared_trainer_args

    recipe = build_recipe(
        recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0), max_length=128, packing=True)
    )
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]], "seq_lengths": [[3]]})
    trainer = guarded_trainer_class()(
        model=str(assets["model"]),
        args=prepared_trainer_args(recipe),
        train_dataset=dataset,
        processing_class=load_tokenizer_for(recipe),
    )
    assert trainer.padding_free
    # The forward compute_loss makes (no cache) keeps packed sequences apart ...
    assert packing_isolation(trainer) <= ISOLATION_TOLERANCE
    # ... a forward with a cache builds a causal mask over the whole row, and the probe sees the leak.
    assert packing_isolation(trainer, use_cache=True) > ISOLATION_TOLERANCE


def test_resume_from_checkpoint_gives_the_same_loss_curve(assets, tmp_path):
    rows = rows_with_long_prompts(assets, 0)
    (tmp_path / "a").mkdir()
    first = recipe_keys(
        assets,
        tmp_path / "a",
        rows,
        max_length=128,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        output_dir=str(tmp_path / "a" / "run"),
    )
    whole = train(build_recipe(first), log=lambda _: None)
    (tmp_path / "b").mkdir()
    second = {
        **first,
        "output_dir": str(tmp_path / "b" / "run"),
        "resume_from_checkpoint": str(tmp_path / "a" / "run" / "checkpoint-2"),
    }
    resumed = train(build_recipe(second), log=lambda _: None)
    assert resumed.metrics["last_loss"] == pytest.approx(whole.metrics["last_loss"], rel=1e-4)
    # The resumed run carries steps 1-2 from the checkpoint state and computes steps 3-4 itself.
    assert len(resumed.history) == len(whole.history) == 4
    assert resumed.history == pytest.approx(whole.history, rel=1e-4)


def test_repair_raises_max_length_within_the_limit(assets, tmp_path):
    rows = rows_with_long_prompts(assets, 2)  # long prompts push their answers past max_length 64
    keys = recipe_keys(assets, tmp_path, rows, max_length=64, mask_guard="repair", max_steps=1)
    said = []
    train(build_recipe({**keys, "max_length_limit": 16}), log=said.append)
    assert any(s.startswith("mask guard (repair): kept max_length 64") for s in said)
    said.clear()
    outcome = train(build_recipe({**keys, "max_length_limit": 2048, "overwrite_output_dir": True}), log=said.append)
    raised = [s for s in said if "max_length 64 ->" in s]
    assert raised and "assistant tokens lost to truncation" in raised[0] and "-> 0," in raised[0]
    assert outcome.report.truncated_assistant_tokens == 0 and outcome.report.zero_mask_rows == []


def unmarked_template(tmp_path) -> Path:
    """Qwen2.5's inference template with its own system prompt: one changed line, so TRL's lookup of known
    templates misses it and nothing marks the assistant's turns."""
    import trl

    source = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    path = tmp_path / "custom_qwen.jinja"
    path.write_text(
        source.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "You convert units.")
    )
    return path


def test_template_without_markers_is_rejected_with_the_fix(assets, tmp_path):
    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()[:8]]
    keys = recipe_keys(assets, tmp_path, rows, chat_template_path=str(unmarked_template(tmp_path)))
    with pytest.raises(GuardStop, match="no \\{% generation %\\} markers.*sft-toolkit add-markers"):
        train(build_recipe(keys), log=lambda _: None)


def test_repair_adds_verified_markers_and_trains_with_them(assets, tmp_path):
    from trl.chat_template_utils import has_generation_markers

    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()[:8]]
    keys = recipe_keys(
        assets, tmp_path, rows, chat_template_path=str(unmarked_template(tmp_path)), mask_guard="repair", max_steps=2
    )
    said = []
    outcome = train(build_recipe(keys), log=said.append)
    assert any("added {% generation %} markers" in s for s in said)
    assert outcome.report.trainable_tokens > 0 and not outcome.report.zero_mask_rows
    saved = (tmp_path / "run" / "chat_template.jinja").read_text()
    assert has_generation_markers(saved) and "You convert units." in saved
