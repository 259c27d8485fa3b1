"""Several ranks: the in-training guard decides on every rank's count, so one empty rank stops them all.

A guard that looked only at its own rank would leave the other rank waiting in the next collective, and one
that stopped only when every rank is empty would let the step through. Here exactly one rank's batch is
empty, at a step known in advance from the dataset the trainer receives (a sequential sampler: rank r takes
sequences r, r + 2, ...), and both ranks must stop at that step, naming that rank and its rows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import free_port, launch_two, recipe_keys, rows_with_long_prompts

from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.recipe import build_recipe
from sft_toolkit.train import FAIL_AT_ENV, guard

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def first_step_with_an_empty_rank(trainable_per_sequence: list[int]) -> tuple[int, list[int]]:
    """The 1-based step at which some rank's one-sequence batch has nothing to train, and that step's counts."""
    for start in range(0, len(trainable_per_sequence) - WORLD_SIZE + 1, WORLD_SIZE):
        counts = trainable_per_sequence[start : start + WORLD_SIZE]
        if 0 in counts:
            return start // WORLD_SIZE + 1, counts
    raise AssertionError("the dataset has no step with an empty rank")


def logged_trainable_tokens(stdout: str) -> list[int]:
    """Each training log's `trainable_tokens`, as the trainer prints its log lines."""
    return [int(tokens) for tokens in re.findall(r"'trainable_tokens': '?(\d+)", stdout)]


def test_two_ranks_log_every_steps_trainable_tokens_over_both_ranks(assets, tmp_path):
    steps = 4
    keys = recipe_keys(
        assets,
        tmp_path,
        rows_with_long_prompts(assets, 0),
        max_length=128,
        max_steps=steps,
        per_device_train_batch_size=1,
        train_sampling_strategy="sequential",
    )
    dataset = guard(build_recipe(keys)).dataset
    trainable = [sum(label != -100 for label in labels[1:]) for labels in dataset["labels"]]
    # step k trains sequence 2(k-1) on rank 0 and 2(k-1)+1 on rank 1
    expected = [trainable[2 * step] + trainable[2 * step + 1] for step in range(steps)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(keys))
    proc = launch_two(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged_trainable_tokens(proc.stdout) == expected


def test_exactly_one_empty_rank_stops_both_ranks_at_that_step(assets, tmp_path):
    good = rows_with_long_prompts(assets, 0)[:12]
    long_prompt = rows_with_long_prompts(assets, 1)[-1]  # truncated to max_length: nothing left to train
    rows = good[:5] + [long_prompt] + good[5:]
    keys = recipe_keys(
        assets,
        tmp_path,
        rows,
        max_length=64,
        packing=True,
        mask_guard="warn",
        per_device_train_batch_size=1,
        max_steps=20,
        train_sampling_strategy="sequential",
    )
    dataset = guard(build_recipe(keys)).dataset  # what every rank trains on, in the order it trains
    trainable = [sum(label != -100 for label in labels[1:]) for labels in dataset["labels"]]
    step, counts = first_step_with_an_empty_rank(trainable)
    assert counts.count(0) == 1, f"the test needs exactly one empty rank at step {step}, got {counts}"
    empty_rank = counts.index(0)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(keys))
    proc = launch_two(recipe)  # its timeout is the "no rank left hanging" assertion
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    stops = re.findall(
        r"stopped by the mask guard: step (\d+): zero trainable tokens on rank\(s\) ([\d, ]+) of 2", proc.stdout
    )
    assert len(stops) == WORLD_SIZE, output[-3000:]  # every rank stopped ...
    assert {int(stopped_step) for stopped_step, _ in stops} == {step}  # ... at that very step ...
    assert {ranks.strip() for _, ranks in stops} == {str(empty_rank)}  # ... naming the empty rank alone
    assert re.search(rf"rank {empty_rank}'s batch holds dataset rows 5\b", proc.stdout), output[-3000:]


MULTI_NODE_CONFIG = Path(__file__).parents[1] / "recipes" / "accelerate" / "multi_node.yaml"
NODE_FAILURE_SECONDS = 120  # a failure on one node ends the other within this (startup included)


def launch_nodes(recipe: Path, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Two 'machines' of one process each on this host, started as two launchers, as SLURM would start them."""
    port = free_port()
    launchers = []
    for machine_rank in range(2):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(MULTI_NODE_CONFIG),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            "--module",
            "sft_toolkit",
            "train",
            str(recipe),
        ]
        launchers.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            )
        )
    finished = []
    for launcher in launchers:
        stdout, stderr = launcher.communicate(timeout=NODE_FAILURE_SECONDS)  # the "no node left hanging" assertion
        finished.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr))
    return finished


def test_two_nodes_train_and_a_failure_on_one_ends_the_other_with_the_cause(assets, tmp_path):
    keys = recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0), max_length=128, max_steps=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(keys))
    main_node, other_node = launch_nodes(recipe)
    assert main_node.returncode == 0 and other_node.returncode == 0, main_node.stderr[-3000:]
    summary = json.loads(main_node.stdout[main_node.stdout.index("{\n") :])
    assert summary["trainable_tokens"] > 0 and summary["last_loss"] < summary["first_loss"]

    (tmp_path / "failing").mkdir()
    keys = recipe_keys(assets, tmp_path / "failing", rows_with_long_prompts(assets, 0), max_length=128, max_steps=200)
    recipe.write_text(yaml.safe_dump(keys))
    started = time.monotonic()
    main_node, other_node = launch_nodes(recipe, env={FAIL_AT_ENV: "1:3"})  # global rank 1 is node 1's process
    assert time.monotonic() - started < NODE_FAILURE_SECONDS
    assert main_node.returncode != 0 and other_node.returncode != 0
    assert '"output_dir"' not in main_node.stdout  # node 0 did not finish as if nothing happened
    # Node 1's launcher names its rank and the exception; node 0's names the peer that went away.
    cause = other_node.stderr[other_node.stderr.index("Root Cause") :]
    assert "rank      : 1" in cause and "RuntimeError: injected failure on rank 1" in cause, other_node.stderr[-3000:]
    assert "Connection closed by peer" in main_node.stderr, main_node.stderr[-3000:]


def test_the_main_process_prepares_the_data_and_the_other_rank_loads_it(assets, tmp_path):
    rows = rows_with_long_prompts(assets, 0)
    keys = recipe_keys(assets, tmp_path, rows, max_length=128, max_steps=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(keys))
    counts = tmp_path / "counts"
    counts.mkdir()
    entry = Path(__file__).parent / "helpers" / "count_tokenized_rows.py"
    env = {"COUNT_DIR": str(counts), "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = launch_two(recipe, entry=(str(entry),), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenized = {path.stem: int(path.read_text()) for path in counts.iterdir()}
    assert tokenized == {"rank-0": len(rows), "rank-1": 0}  # once per job: rank 1 found rank 0's work cached


def test_an_fsdp_launch_on_cpu_is_refused_instead_of_running_as_ddp(assets, tmp_path):
    # accelerate turns FSDP on only for accelerator devices: on CPU the same launch would silently run DDP.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0), max_length=128)))
    config = Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
    proc = launch_two(recipe, launcher=("--config_file", str(config), "--mixed_precision", "no"))
    assert proc.returncode != 0
    assert proc.stderr.count("accelerate's config asks for FSDP, but this run is MULTI_CPU") == 2, proc.stderr[-3000:]
    assert "accelerate/state.py:986" in proc.stderr  # the reason names where accelerate decides
    # each rank says it in one line (the launcher then reports the exit code 2 of its processes)
    assert "sft_toolkit/train.py" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before training wrote anything
