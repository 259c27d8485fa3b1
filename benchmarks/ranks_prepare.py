"""Benchmark: data preparation under several ranks, once per job rather than once per rank.

    python benchmarks/ranks_prepare.py                      # 20k rows, 1 and 2 ranks
    python benchmarks/ranks_prepare.py --rows 5000 --ranks 2

Each run is `sft-toolkit train` for one optimizer step on the tiny quickstart model (so the time is data
preparation, model load and one step), with a fresh, empty `HF_DATASETS_CACHE`: 1 rank as a plain process,
N ranks under `accelerate launch --multi_gpu --num_processes N` on CPU (gloo). Data: quickstart-like rows
(`sft_toolkit.assets.arithmetic_conversations`, seed 0), chatml, `max_length: 256`, no packing.

Printed per run: wall time, CPU time of all processes together, and the peak resident memory of the
largest process (RUSAGE_CHILDREN). With the main process preparing first
(`TrainingArguments.main_process_first`), the other ranks load its cached result instead of tokenizing
again, which shows in the CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sft_toolkit.assets import arithmetic_conversations, build_quickstart_assets  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(recipe: Path, ranks: int, cache: Path) -> dict:
    train = ["--module", "sft_toolkit", "train", str(recipe)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "sft_toolkit", "train", str(recipe)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(ranks),
            "--main_process_port",
            str(free_port()),
            *train,
        ]
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    # A wrapper process per run, so RUSAGE_CHILDREN's peak is this run's alone (KiB on Linux, on stderr's last line).
    measure = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr); sys.exit(code)"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", measure, *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak, cpu = proc.stderr.strip().splitlines()[-1].split()
    return {
        "ranks": ranks,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(float(cpu), 1),
        "peak_rss_mib": round(int(peak) / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        assets = build_quickstart_assets(folder / "assets")
        data = folder / "train.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_conversations(args.rows, seed=0)))
        for ranks in args.ranks:
            recipe = folder / f"recipe-{ranks}.yaml"
            recipe.write_text(
                yaml.safe_dump(
                    {
                        "model_name_or_path": str(assets["model"]),
                        "dataset_name": str(data),
                        "chat_template_path": "chatml",
                        "assistant_only_loss": True,
                        "max_length": 256,
                        "max_steps": 1,
                        "per_device_train_batch_size": 2,
                        "save_strategy": "no",
                        "use_cpu": True,
                        "bf16": False,
                        "output_dir": str(folder / f"run-{ranks}"),
                    }
                )
            )
            print(json.dumps(run(recipe, ranks, folder / f"cache-{ranks}")), flush=True)


if __name__ == "__main__":
    main()
