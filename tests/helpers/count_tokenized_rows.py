"""`sft-toolkit train RECIPE` that also writes how many rows this rank tokenized to COUNT_DIR/rank-N.txt.

A test entry point for `accelerate launch` (tests/test_scale_out.py): it wraps the per-row tokenizer that
`datasets.map` calls, so the test can see which ranks did the work and which loaded it from the cache.
"""

import atexit
import os
import sys
from pathlib import Path

from sft_toolkit import preprocess
from sft_toolkit.cli import main

tokenized = [0]
tokenize_row = preprocess._tokenize_row  # the function datasets.map calls per row: counted, then called


def counting_tokenize_row(*args, **kwargs):
    tokenized[0] += 1
    return tokenize_row(*args, **kwargs)


preprocess._tokenize_row = counting_tokenize_row
atexit.register(
    lambda: (Path(os.environ["COUNT_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.txt").write_text(str(tokenized[0]))
)
sys.exit(main(["train", *sys.argv[1:]]))
