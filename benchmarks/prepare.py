"""Benchmark: the preprocessing each `train` run pays from raw data vs from a dataset `prepare` saved.

    python benchmarks/prepare.py                          # 100k rows, no packing and bfd packing
    python benchmarks/prepare.py --rows 10000 --configs "packing bfd"

Data: quickstart-like rows (`sft_toolkit.assets.arithmetic_conversations`, seed 0; unit conversions and
sums, 1-2 turns, ~54 tokens each) with the quickstart's tokenizer and the bundled `chatml` template,
`assistant_only_loss: true`, `max_length: 256`.

What is measured, per configuration, each call in a fresh subprocess with an empty `HF_DATASETS_CACHE`
and `datasets.disable_caching()` (so no call reuses another's Arrow conversion or cached maps); imports
happen before the clock starts:

* from raw: `train.guard(recipe)`: what `train RECIPE.yaml` runs before loading the model, on every
  run and on every rank (tokenizer, .jsonl check and load, tokenization with accounting, truncation or
  packing, the guard's decision);
* prepare: `prepare.prepare(recipe, DIR)`: the same guard, with provenance kept, plus `save_to_disk`
  and the manifest; paid once;
* from prepared: `prepared.load_prepared(recipe)`: what `train --prepared DIR` runs instead (manifest
  vs recipe and tokenizer hashes, `load_from_disk`, the vectorized labels re-check).

Out of the clock, the prepared dataset must have the same sequences and trainable tokens as the one
from raw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"no packing": {"packing": False}, "packing bfd": {"packing": True, "packing_strategy": "bfd"}}
COMMON = {"chat_template_path": "chatml", "assistant_only_loss": True, "max_length": 256}


def _keys(workdir: Path, config: str) -> dict:
    return {
        "model_name_or_path": str(workdir / "assets" / "tiny-chat"),
        "dataset_name": str(workdir / "rows.jsonl"),
        "output_dir": str(workdir / "run"),
        **COMMON,
        **CONFIGS[config],
    }


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _counts(dataset) -> tuple[int, int]:
    import pyarrow.compute as pc

    labels = dataset.with_format("arrow")[:]["labels"]
    return len(dataset), int(pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() or 0)


def measure(side: str, workdir: Path, config: str) -> dict:
    """Runs in a fresh subprocess (see run_measure)."""
    import warnings

    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    from sft_toolkit.prepare import prepare
    from sft_toolkit.prepared import load_prepared
    from sft_toolkit.recipe import build_recipe
    from sft_toolkit.train import guard

    datasets.disable_caching()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    keys = _keys(workdir, config)
    prepared_dir = workdir / f"prepared-{config.replace(' ', '-')}"
    if side == "from prepared":
        keys["prepared"] = str(prepared_dir)
    recipe = build_recipe(keys)
    cpu0, start = _cpu_seconds(), time.perf_counter()
    if side == "from raw":
        dataset = guard(recipe).dataset
    elif side == "prepare":
        prepare(recipe, prepared_dir)
        dataset = None
    else:
        dataset = load_prepared(recipe).dataset
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak}
    if dataset is not None:
        out["sequences"], out["trainable_tokens"] = _counts(dataset)
    else:
        out["size_mib"] = sum(f.stat().st_size for f in prepared_dir.rglob("*") if f.is_file()) / 2**20
    return out


def run_measure(side: str, workdir: Path, config: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as cache:
        env = {
            **os.environ,
            "HF_DATASETS_CACHE": cache,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore",
        }
        cmd = [sys.executable, __file__, "_measure", side, str(workdir), config]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"measurement failed ({side}, {config}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (the fastest is kept)")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/prepare.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])

    from sft_toolkit.assets import build_quickstart_assets, write_dataset

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        workdir = Path(tmp)
        build_quickstart_assets(workdir / "assets")
        write_dataset(workdir / "rows.jsonl", args.rows, seed=0)
        print(f"# {args.rows} rows -> {(workdir / 'rows.jsonl').stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
        results = {}
        for config in args.configs:
            for side in ("from raw", "prepare", "from prepared"):
                runs = [run_measure(side, workdir, config) for _ in range(args.repeats if side != "prepare" else 1)]
                results[config, side] = min(runs, key=lambda r: r["seconds"])
                print(
                    f"#   {config:12s} {side:14s} {results[config, side]['seconds']:7.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
            raw, loaded = results[config, "from raw"], results[config, "from prepared"]
            assert (raw["sequences"], raw["trainable_tokens"]) == (loaded["sequences"], loaded["trainable_tokens"]), (
                f"{config}: prepared {loaded} != raw {raw}"
            )

    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}; {args.rows} quickstart-like rows, quickstart tokenizer, chatml, "
        "max_length 256, assistant_only_loss",
        "",
        "| config | from raw s (every run, every rank) | prepare s (once) | from prepared s (every run) | saved per run s "
        "| speed-up | prepared dir MiB | peak RSS raw / prepared MiB | sequences | trainable tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in args.configs:
        raw, once, loaded = (results[config, s] for s in ("from raw", "prepare", "from prepared"))
        lines.append(
            f"| {config} | {raw['seconds']:.1f} | {once['seconds']:.1f} | {loaded['seconds']:.2f} | "
            f"{raw['seconds'] - loaded['seconds']:.1f} | {raw['seconds'] / loaded['seconds']:.0f}x | "
            f"{once['size_mib']:.0f} | {raw['peak_rss_mib']:.0f} / {loaded['peak_rss_mib']:.0f} | "
            f"{loaded['sequences']} | {loaded['trainable_tokens']} |"
        )
    lines += ["", f"Total benchmark wall time: {time.perf_counter() - t0:.0f} s"]
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        print(json.dumps(measure(sys.argv[2], Path(sys.argv[3]), sys.argv[4])))
    else:
        main()
