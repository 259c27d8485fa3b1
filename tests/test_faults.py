"""Faults are survived: a run killed at any moment resumes from its last complete checkpoint, and one rank
failing ends every rank, promptly, naming the cause."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import launch_two

from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.outputs import make_staging
from sft_toolkit.train import FAIL_AT_ENV, STAGING, last_complete_checkpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def write_recipe(assets, tmp_path: Path, **keys) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(Path(assets["train"]).read_text().splitlines()[:64]) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(assets["model"]),
                "dataset_name": str(data),
                "chat_template_path": "chatml",
                "assistant_only_loss": True,
                "max_length": 128,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "output_dir": str(tmp_path / "run"),
                "use_cpu": True,
                "bf16": False,
                "seed": 0,
                "dataloader_num_workers": 0,
                **keys,
            }
        )
    )
    return recipe


def train_cmd(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sft_toolkit", "train", str(recipe), *overrides]


def step_of(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def test_killed_run_resumes_from_the_last_complete_checkpoint(assets, tmp_path):
    # Save every step, so the kill below often lands inside a save; whatever it hits, every checkpoint-N
    # left visible must be complete, because saves are written aside and renamed into place.
    recipe = write_recipe(assets, tmp_path, max_steps=500, save_strategy="steps", save_steps=1, save_total_limit=3)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(recipe),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint-3").is_dir():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    visible = sorted(run.glob("checkpoint-*"), key=step_of)
    assert visible and all(
        json.loads((c / "trainer_state.json").read_text())["global_step"] == step_of(c) for c in visible
    )
    last_good = step_of(visible[-1])
    # What a plain transformers save killed half-way leaves (weights started, no trainer_state.json), and what
    # our own save leaves when killed: resume must take neither.
    torn = run / f"checkpoint-{last_good + 100}"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 100)
    make_staging(run / STAGING / f"checkpoint-{last_good + 50}")

    resumed = subprocess.run(
        train_cmd(recipe, "--resume_from_checkpoint", "true", "--max_steps", str(last_good + 2), "--save_steps", "1"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"{torn} is incomplete" in resumed.stdout
    assert f"resume: from {run / f'checkpoint-{last_good}'}" in resumed.stdout
    final = json.loads((run / f"checkpoint-{last_good + 2}" / "trainer_state.json").read_text())
    assert final["global_step"] == last_good + 2
    # Steps up to last_good come from the checkpoint; only the last two were trained by the resumed run.
    assert [h["step"] for h in final["log_history"] if "loss" in h] == list(range(1, last_good + 3))
    assert (run / "model.safetensors").is_file()
    # train ends with check-data's accounting: all 64 rows in, none dropped or cut.
    summary = json.loads(resumed.stdout[resumed.stdout.rindex('{\n  "output_dir"') :])
    assert summary["rows"] == 64 and summary["dropped_rows"] == 0 and summary["truncated_assistant_tokens"] == 0


def test_a_save_cut_short_leaves_no_checkpoint_behind(assets, tmp_path, monkeypatch):
    # A kill rarely lands inside a tiny model's save, so cut one short deterministically: the RNG state is
    # saved after the weights and optimizer, before trainer_state.json.
    from transformers import Trainer

    from sft_toolkit.recipe import load_recipe
    from sft_toolkit.train import train

    class Killed(BaseException):
        pass

    save_rng_state = Trainer._save_rng_state

    def dies_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise Killed
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_2)
    recipe = load_recipe(str(write_recipe(assets, tmp_path, max_steps=3, save_strategy="steps", save_steps=1)))
    with pytest.raises(Killed):
        train(recipe, log=lambda _: None)
    run = tmp_path / "run"
    assert (run / STAGING / "checkpoint-2" / "model.safetensors").is_file()  # the save had begun ...
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # ... but never became visible
    assert last_complete_checkpoint(str(run)) == str(run / "checkpoint-1")


def test_last_complete_checkpoint_skips_torn_directories(tmp_path):
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    said = []
    assert last_complete_checkpoint(str(tmp_path), said.append) == str(tmp_path / "checkpoint-2")
    assert len(said) == 2 and "checkpoint-6 is incomplete" in said[0] and "checkpoint-4 is incomplete" in said[1]
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None


def test_one_rank_raising_ends_every_rank_with_the_cause(assets, tmp_path, monkeypatch):
    recipe = write_recipe(assets, tmp_path, max_steps=200, save_strategy="no")
    monkeypatch.setenv(FAIL_AT_ENV, "1:3")  # rank 1 raises at step 3; rank 0 waits in the next collective
    proc = launch_two(recipe)  # its timeout is the "no rank left hanging" assertion
    assert proc.returncode != 0 and '"output_dir"' not in proc.stdout
    # The launcher's summary names the failing rank and its exception (torch's `record` on the train command).
    summary = proc.stderr[proc.stderr.index("Root Cause") :]
    assert "rank      : 1" in summary and "RuntimeError: injected failure on rank 1" in summary, proc.stderr[-3000:]
