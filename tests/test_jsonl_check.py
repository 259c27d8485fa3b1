"""The .jsonl check runs once per file state: a file checked before is not checked again, a changed one is."""

from __future__ import annotations

import json

import pytest

from sft_toolkit.data import check_jsonl
from sft_toolkit.problems import InputError


def test_a_file_changed_after_its_check_is_checked_again(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": []}) + "\n", encoding="utf-8")
    check_jsonl(path)
    check_jsonl(path)  # unchanged: passes again
    path.write_text(json.dumps({"messages": []}) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"rows\.jsonl:2: not valid JSON"):
        check_jsonl(path)


def test_a_broken_file_fails_every_time(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    for _ in range(2):
        with pytest.raises(InputError, match="must be a JSON object"):
            check_jsonl(path)
