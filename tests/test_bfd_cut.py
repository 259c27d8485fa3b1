"""bfd packing of rows cut to max_length first (`preprocess.cut_for_bfd`, what prepare does to keep its memory at
TRL's) gives TRL's packed dataset, and each packed token's src_rows names the row it came from."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from datasets import Dataset
from trl.data_utils import pack_dataset

from sft_toolkit import preprocess


def tokenized_rows(n: int, max_length: int) -> Dataset:
    rng = random.Random(7)
    rows = {"input_ids": [], "labels": [], "src_row": []}
    for row in range(n):
        length = rng.choice([0, 1, 3, max_length - 1, max_length, max_length + 1, 3 * max_length, rng.randint(1, 40)])
        ids = [rng.randint(0, 999) for _ in range(length)]
        rows["input_ids"].append(ids)
        rows["labels"].append([t if rng.random() < 0.6 else -100 for t in ids])
        rows["src_row"].append(row)
    return Dataset.from_dict(rows)


@pytest.mark.parametrize("num_proc", [None, 2])
def test_cut_rows_pack_as_trl_packs_the_uncut_ones(num_proc):
    sft = SimpleNamespace(
        max_length=16, packing_strategy="bfd", shuffle_dataset=False, seed=0, dataset_num_proc=num_proc
    )
    tokenized = tokenized_rows(200, sft.max_length)
    cut = preprocess.cut_for_bfd(tokenized, sft)
    assert max(len(ids) for ids in cut["input_ids"]) == sft.max_length
    packed = preprocess.pack(cut, sft)
    assert sorted(packed.column_names) == ["input_ids", "labels", "seq_lengths", "src_rows"]
    trl = pack_dataset(
        tokenized.select_columns(["input_ids", "labels"]), sft.max_length, "bfd", {"num_proc": num_proc}
    )
    assert packed.select_columns(trl.column_names).to_dict() == trl.to_dict()
    documents = 0
    for sequence in packed:
        start = 0
        for length in sequence["seq_lengths"]:
            rows = set(sequence["src_rows"][start : start + length])
            assert len(rows) == 1
            row = tokenized[rows.pop()]
            assert sequence["input_ids"][start : start + length] == row["input_ids"][: sft.max_length]
            assert sequence["labels"][start : start + length] == row["labels"][: sft.max_length]
            start += length
            documents += 1
    assert documents == sum(1 for ids in tokenized["input_ids"] if ids)


def test_cut_rows_pack_as_the_uncut_ones_with_their_provenance():
    sft = SimpleNamespace(max_length=16, packing_strategy="bfd", shuffle_dataset=False, seed=0, dataset_num_proc=None)
    tokenized = tokenized_rows(200, sft.max_length)
    packed_cut = preprocess.pack(preprocess.cut_for_bfd(tokenized, sft), sft)
    packed_whole = preprocess.pack(tokenized, sft)
    assert dict(packed_cut.features) == dict(packed_whole.features)
    assert packed_cut.to_dict() == packed_whole.to_dict()
