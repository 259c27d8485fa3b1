"""Build the CPU quickstart's local assets: a tiny chat model, its tokenizer, and train/eval data.

    python scripts/build_quickstart_assets.py OUTDIR

Writes OUTDIR/data/train.jsonl (2000 rows), OUTDIR/data/eval.jsonl (200 rows) and OUTDIR/tiny-chat/
(a byte-level BPE tokenizer with the chatml template and a randomly initialised two-layer Qwen2),
skipping whatever already exists, and prints each path. Needs no network and no GPU; the same
OUTDIR contents come out on every run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sft_toolkit.assets import build_quickstart_assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="directory to write data/ and tiny-chat/ into")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = build_quickstart_assets(args.outdir)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    print(f"  ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
