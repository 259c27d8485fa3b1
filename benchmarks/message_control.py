"""Benchmark: what per-message training control costs check-data.

    python benchmarks/message_control.py --rows 5000

The same synthetic three-turn conversations (real Qwen2 vocabulary, bundled `chatml`, no packing) go
through `check_data` under three recipes: no control (TRL's mask as it is), `train_turns: last` (every row
needs control) and `train: false` on each row's first turn. Each recipe runs in one call with `datasets`
caching off; the best of `--repeat` runs is kept. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sft_toolkit import offline_tokenizers  # noqa: E402
from sft_toolkit.check_data import check_data  # noqa: E402
from sft_toolkit.recipe import load_recipe  # noqa: E402


def rows(n: int, flag: bool) -> list[dict]:
    out = []
    for i in range(n):
        first = {"role": "assistant", "content": f"Hello! Happy to help with question {i}."}
        if flag:
            first["train"] = False
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"Hi, I have a question ({i})."},
                    first,
                    {"role": "user", "content": f"What is {i} times {i + 7}?"},
                    {"role": "assistant", "content": f"{i} x {i + 7} = {i * (i + 7)}."},
                    {"role": "user", "content": "And plus one?"},
                    {"role": "assistant", "content": f"{i * (i + 7) + 1}."},
                ]
            }
        )
    return out


def measure(folder: Path, data: list[dict], keys: dict, repeat: int) -> tuple[float, int]:
    path = folder / f"data-{time.monotonic_ns()}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    recipe_keys = {
        "model_name_or_path": str(offline_tokenizers.cached("qwen2")),
        "dataset_name": str(path),
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        "max_length": 1024,
        **keys,
    }
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_keys))
    best, trainable = float("inf"), 0
    for _ in range(repeat):
        start = time.process_time()
        report, _ = check_data(load_recipe(str(recipe_path)))
        best = min(best, time.process_time() - start)
        trainable = report.trainable_tokens
    return best, trainable


def main() -> None:
    import datasets

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    datasets.disable_caching()
    offline_tokenizers.load("qwen2")
    cases = [
        ("no control", False, {}),
        ("train_turns: last", False, {"train_turns": "last"}),
        ("train: false on the first answer", True, {}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        results = [(name, *measure(Path(tmp), rows(args.rows, flag), keys, args.repeat)) for name, flag, keys in cases]
    base = results[0][1]
    print(
        f"python benchmarks/message_control.py --rows {args.rows} --repeat {args.repeat}  "
        f"({platform.processor() or platform.machine()}, best of {args.repeat})"
    )
    print("| control | check-data CPU s | vs no control | trainable tokens |")
    print("|---|---:|---:|---:|")
    for name, seconds, trainable in results:
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f}x | {trainable} |")


if __name__ == "__main__":
    main()
