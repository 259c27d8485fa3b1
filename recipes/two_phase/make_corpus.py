"""Plain text for the two-phase example's first (base LM) run: the quickstart's kind of dialogues written
as prose, one `{"text": ...}` row each, with no chat format and no roles, as a continued-pretraining
corpus would be. Seed 2, so none of it is the SFT run's data (seed 0).

    python recipes/two_phase/make_corpus.py                      # -> outputs/two_phase/corpus.jsonl
    python recipes/two_phase/make_corpus.py OUT.jsonl --rows 500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sft_toolkit.assets import arithmetic_conversations


def write_corpus(path: Path, rows: int = 2000, seed: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [
        " ".join(m["content"] for m in row["messages"] if m["role"] != "system")
        for row in arithmetic_conversations(rows, seed)
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="outputs/two_phase/corpus.jsonl")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    print(write_corpus(Path(args.out), args.rows))
