"""The GPU runbook (benchmarks/gpu_suite.py) measures what it reports, and says why it skips what it can't run.

The suite is written to be run when a GPU is lent, so its first GPU run must not be its first run at all:
`--smoke` takes every path the machine allows (the tiny quickstart model on CPU) and the CUDA-only parts
say so. The figures must be measurements, not placeholders: the plain and guarded trainers see the same
batches, tokens/s is the counted tokens over the measured seconds, and the isolation probe both passes the
training forward and sees the leak a cached forward makes.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"
MEASURED_CONFIGS = ("no packing (sdpa)", "bfd padding-free (sdpa)")


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_suite(tmp_path: Path, *options: str) -> tuple[dict, str]:
    out = tmp_path / "results"
    returned = load_suite().main([*options, "--out", str(out)])
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(returned))  # the file holds what the run measured
    return written, (out / "results.md").read_text()


def assert_measured_throughput(results: dict, steps: int) -> None:
    for label in MEASURED_CONFIGS:
        part = results["throughput"][label]
        assert part["status"] == "measured", part
        plain, guarded = part["plain"], part["guarded"]
        for run in (plain, guarded):
            assert run["steps"] == steps and run["seconds"] > 0
            assert 0 < run["trainable_tokens"] <= run["tokens"]
            assert math.isclose(run["tokens_per_s"], run["tokens"] / run["seconds"])
            assert math.isclose(run["step_s"], run["seconds"] / steps)
        # same data, seed and sampler: both trainers count the same batches
        assert (plain["tokens"], plain["trainable_tokens"]) == (guarded["tokens"], guarded["trainable_tokens"])
        assert math.isclose(part["guard_overhead"], guarded["step_s"] / plain["step_s"] - 1)
    assert results["throughput"]["bfd padding-free (sdpa)"]["plain"]["padding"] == 0  # padding-free


def test_smoke_run_measures_every_cpu_path_and_says_why_it_skips_the_rest(tmp_path):
    results, markdown = run_suite(tmp_path, "--smoke")
    no_cuda = "--smoke runs on CPU" if torch.cuda.is_available() else "no CUDA device"
    assert results["complete"] is True
    assert results["device"].startswith("CPU") and results["date"]
    assert "--smoke" in results["command"] and results["versions"]["accelerate"]
    assert_measured_throughput(results, steps=2)

    for attn in ("eager", "sdpa"):
        probe = results["packing_isolation"][attn]
        assert probe["status"] == "measured", probe
        # the training forward keeps packed sequences apart; a cached forward doesn't, and the probe sees it
        assert probe["verdict"] == "isolated" and probe["training_forward_max_diff"] <= probe["tolerance"]
        assert probe["use_cache_max_diff"] > probe["tolerance"]

    flash = results["throughput"]["bfd padding-free (flash varlen)"]
    assert flash["status"] == "skipped" and flash["reason"].startswith(no_cuda)
    assert "installed" in flash["reason"]  # and whether flash_attn / kernels are
    for part in ("fsdp2", "deepspeed_zero3", "qlora"):
        assert results[part]["status"] == "skipped" and results[part]["reason"].startswith(no_cuda)
    assert "accelerate/state.py:986" in results["fsdp2"]["reason"]

    assert results["device"] in markdown and results["command"] in markdown
    for label in (*MEASURED_CONFIGS, "guard overhead", "eager", f"skipped: {no_cuda}"):
        assert label in markdown


@pytest.mark.slow
def test_suite_with_alternating_repeated_runs_times_every_step_it_plans(tmp_path):
    """Extra to the smoke run (`make test-slow`): each trainer runs twice, alternating, and keeps its faster run,
    over more steps. On a CUDA machine this is the real suite at its default sizes; on CPU, the tiny model at
    sizes a shared 2-core machine finishes in a few minutes."""
    cpu = ["--model", "tiny", "--rows", "400", "--max-length", "128", "--batch", "4", "--steps", "6", "--warmup", "2"]
    results, _ = run_suite(tmp_path, *([] if torch.cuda.is_available() else cpu))
    assert results["complete"] is True
    assert_measured_throughput(results, steps=results["setup"]["timed_steps"])
    assert all(results["throughput"][label]["runs_each"] == 2 for label in MEASURED_CONFIGS)


def test_parts_runs_only_the_parts_named_and_the_report_says_which(tmp_path):
    results, markdown = run_suite(tmp_path, "--smoke", "--parts", "packing_isolation", "qlora")
    assert results["complete"] is True and results["parts"] == ["packing_isolation", "qlora"]
    assert results["throughput"] == {} and "fsdp2" not in results and "deepspeed_zero3" not in results
    assert results["packing_isolation"]["eager"]["status"] == "measured"
    assert results["qlora"]["status"] == "skipped"
    assert "parts: packing_isolation, qlora" in markdown
    assert "| config | trainer |" not in markdown and "| fsdp2 |" not in markdown and "| qlora |" in markdown
