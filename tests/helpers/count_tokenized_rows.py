"""`sft-toolkit train RECIPE` that also writes how many rows this rank tokenized to COUNT_DIR/rank-N.txt.

A test entry point for `accelerate launch` (tests/test_scale_out.py): it wraps the per-row and
per-batch tokenizers that `datasets.map` calls, so the test can see which ranks did the work and which loaded it from the cache.
"""

import atexit
import os
import sys
from pathlib import Path

from sft_toolkit import preprocess
from sft_toolkit.cli import main

tokenized: set[int] = set()  # indices of the rows this rank tokenized
tokenize_row = preprocess._tokenize_row  # what datasets.map calls per row (or the batch path hands a row to)
tokenize_rows = preprocess._tokenize_rows  # what datasets.map calls per batch of chat rows (a fast tokenizer)


def counting_tokenize_row(example, index, *args, **kwargs):
    tokenized.add(index)
    return tokenize_row(example, index, *args, **kwargs)


def counting_tokenize_rows(batch, indices, *args, **kwargs):
    tokenized.update(indices)
    return tokenize_rows(batch, indices, *args, **kwargs)


preprocess._tokenize_row = counting_tokenize_row
preprocess._tokenize_rows = counting_tokenize_rows
atexit.register(
    lambda: (Path(os.environ["COUNT_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.txt").write_text(str(len(tokenized)))
)
sys.exit(main(["train", *sys.argv[1:]]))
