"""Datasets as `trl sft` loads them, eval splits guarded like train, prompt/completion rows accounted like chats.

Every case goes through `sft_toolkit.cli.main` in this process with the tiny byte-level tokenizer of the
bad-input corpus, so each reads as what a user sees: the exit code and the JSON report (or the message).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from sft_toolkit.cli import main

TOKENIZER = Path(__file__).parent / "bad_inputs" / "tokenizer"


def qa(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def rows(n: int, start: int = 0) -> list[dict]:
    return [qa(f"What is {i} + 1?", f"{i} + 1 = {i + 1}.") for i in range(start, start + n)]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def card(configs: dict[str, dict[str, str]]) -> str:
    """A dataset card whose `configs:` map each config name to {split: file}."""
    entries = [
        {"config_name": name, "data_files": [{"split": s, "path": f} for s, f in files.items()]}
        for name, files in configs.items()
    ]
    return "---\n" + yaml.safe_dump({"configs": entries}, sort_keys=False) + "---\n"


def check(tmp_path: Path, **keys) -> tuple[int, dict | None, str]:
    """Exit code, JSON report (None unless the check ran) and stderr of `check-data --format json`."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(TOKENIZER),
                "chat_template_path": "chatml",
                "assistant_only_loss": True,
                "max_length": 256,
                **keys,
            }
        )
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-data", str(recipe), "--format", "json"])
    return code, json.loads(out.getvalue()) if out.getvalue().strip() else None, err.getvalue()


@pytest.fixture
def multi_config(tmp_path) -> Path:
    """A local dataset folder with two configs (`maths`: train + test, `greetings`: train only)."""
    folder = tmp_path / "multi"
    write_jsonl(folder / "maths" / "train.jsonl", rows(6))
    write_jsonl(folder / "maths" / "test.jsonl", rows(3, start=100))
    write_jsonl(folder / "greetings" / "train.jsonl", [qa("Hello!", "Hi, how can I help?")] * 4)
    (folder / "README.md").write_text(
        card(
            {
                "maths": {"train": "maths/train.jsonl", "test": "maths/test.jsonl"},
                "greetings": {"train": "greetings/train.jsonl"},
            }
        )
    )
    return folder


def test_dataset_config_picks_the_config_as_trl_sft_passes_it(tmp_path, multi_config):
    code, report, _ = check(tmp_path, dataset_name=str(multi_config), dataset_config="greetings")
    assert code == 0 and report["rows"] == 4
    code, report, _ = check(tmp_path, dataset_name=str(multi_config), dataset_config="maths")
    assert code == 0 and report["rows"] == 6


def test_several_configs_and_none_named_lists_them(tmp_path, multi_config):
    code, report, err = check(tmp_path, dataset_name=str(multi_config))
    assert code == 2 and report is None
    assert "several configs (maths, greetings)" in err and "set dataset_config" in err


def test_an_unknown_config_is_named_with_those_that_exist(tmp_path, multi_config):
    code, _, err = check(tmp_path, dataset_name=str(multi_config), dataset_config="mathz")
    assert code == 2 and "dataset_config: 'mathz' is not one of the dataset's configs (maths, greetings)" in err


def test_eval_split_is_accounted_with_the_same_keys_as_train(tmp_path, multi_config):
    code, report, _ = check(tmp_path, dataset_name=str(multi_config), dataset_config="maths", eval_strategy="epoch")
    assert code == 0 and report["ok"]
    assert report["eval"]["rows"] == 3 and report["eval"]["trainable_tokens"] > 0
    assert set(report["eval"]) == set(report)  # the same keys as the top level
    code, report, _ = check(tmp_path, dataset_name=str(multi_config), dataset_config="maths")
    assert report["eval"] is None  # eval_strategy: no, as trl sft: no eval dataset, nothing to check


def test_a_zero_mask_eval_row_fails_the_gate_with_its_index_in_the_eval_split(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", rows(6))
    evals = rows(4, start=50)
    evals[2] = qa("Say nothing.", "")
    write_jsonl(folder / "test.jsonl", evals)
    code, report, _ = check(tmp_path, dataset_name=str(folder), eval_strategy="steps", eval_steps=5)
    assert code == 1 and not report["ok"]
    assert report["zero_mask_rows"] == [] and report["eval"]["zero_mask_rows"] == [
        {"index": 2, "reason": "empty_assistant_content"}
    ]
    assert any(p.startswith("eval split: 1 rows end with zero trainable tokens") for p in report["problems"])


def test_a_missing_eval_split_names_it_and_the_splits_that_exist(tmp_path, multi_config):
    code, _, err = check(tmp_path, dataset_name=str(multi_config), dataset_config="greetings", eval_strategy="epoch")
    assert code == 2
    assert "dataset_test_split: no split 'test' (its splits: train)" in err and "eval_strategy: no" in err
    data = write_jsonl(tmp_path / "one.jsonl", rows(3))
    code, _, err = check(tmp_path, dataset_name=str(data), eval_strategy="epoch", dataset_test_split="dev")
    assert code == 2 and "dataset_test_split: no split 'dev' (its splits: train)" in err


def test_a_save_to_disk_folder_gives_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows(5)), "validation": Dataset.from_list(rows(2))}).save_to_disk(saved)
    code, report, _ = check(tmp_path, dataset_name=str(saved), eval_strategy="epoch", dataset_test_split="validation")
    assert code == 0 and (report["rows"], report["eval"]["rows"]) == (5, 2)


def test_a_mixture_loads_each_source_with_its_columns_and_reports_rows_per_source(tmp_path, multi_config):
    extra = write_jsonl(tmp_path / "extra.jsonl", [{**qa("Hi", "Hello."), "source": "web"}] * 3)
    mixture = [
        {"path": str(multi_config), "name": "maths", "split": "train"},
        {"path": str(extra), "columns": ["messages"]},
    ]
    code, report, err = check(tmp_path, datasets=mixture, dataset_name="ignored/by-trl")
    assert code == 0 and report["rows"] == 9
    assert [(s["rows"], s["zero_mask_rows"]) for s in report["sources"]] == [(6, 0), (3, 0)]
    assert sum(s["trainable_tokens"] for s in report["sources"]) == report["trainable_tokens"]
    assert "the datasets mixture is loaded and dataset_name (ignored/by-trl) is ignored" in err


def test_a_mixture_test_split_size_gives_a_seeded_eval_split_checked_per_source(tmp_path, multi_config):
    bad = write_jsonl(tmp_path / "bad.jsonl", [qa("Say nothing.", "")] * 2)
    mixture = [{"path": str(multi_config), "name": "maths"}, {"path": str(bad)}]
    keys = {"datasets": mixture, "test_split_size": 0.5, "eval_strategy": "epoch", "seed": 3}
    code, report, _ = check(tmp_path, **keys)
    assert report["rows"] + report["eval"]["rows"] == 8 and report["eval"]["rows"] == 4
    zero = [s["zero_mask_rows"] for s in report["sources"]] + [s["zero_mask_rows"] for s in report["eval"]["sources"]]
    assert zero[0] == zero[2] == 0 and zero[1] + zero[3] == 2  # the two empty answers, wherever they fell
    assert code == 1
    again = check(tmp_path, **keys)[1]
    assert again["eval"]["zero_mask_rows"] == report["eval"]["zero_mask_rows"]  # the seed fixes the split


def test_a_mixture_without_a_test_split_and_eval_on_says_so(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", rows(3))
    code, _, err = check(tmp_path, datasets=[{"path": str(data)}], eval_strategy="epoch")
    assert code == 2 and "the mixture has no split 'test' (its splits: train)" in err and "test_split_size" in err


def test_a_mixture_source_that_does_not_exist_is_named(tmp_path):
    code, _, err = check(tmp_path, datasets=[{"path": str(tmp_path / "nope.jsonl")}])
    assert code == 2 and "datasets[0]" in err and "no such file or directory" in err


@pytest.mark.parametrize("key", [{"dataset_streaming": True}, {"streaming": True}])
def test_streaming_is_refused_by_name(tmp_path, key):
    data = write_jsonl(tmp_path / "a.jsonl", rows(3))
    source = {"datasets": [{"path": str(data)}]} if "streaming" in key else {"dataset_name": str(data)}
    code, _, err = check(tmp_path, **source, **key)
    name = next(iter(key))
    assert code == 2 and f"{name}: true is refused" in err and f"set {name}: false" in err


def prompt_completion_rows() -> list[dict]:
    conversational = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} + 2?"}],
            "completion": [{"role": "assistant", "content": f"{i} + 2 = {i + 2}."}],
        }
        for i in range(5)
    ]
    conversational[3]["completion"] = [{"role": "assistant", "content": ""}]
    return conversational


def test_conversational_prompt_completion_is_accounted_like_chat_rows(tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", prompt_completion_rows())
    code, report, _ = check(tmp_path, dataset_name=str(data))
    assert code == 1 and report["zero_mask_rows"] == [{"index": 3, "reason": "empty_completion"}]
    assert report["rows"] == 5 and report["trainable_tokens"] > 0


def test_plain_prompt_completion_trains_the_completion_and_flags_an_empty_one(tmp_path):
    items = [{"prompt": f"{i} + 2 =", "completion": f" {i + 2}."} for i in range(4)]
    items[1]["completion"] = ""
    data = write_jsonl(tmp_path / "plain.jsonl", items)
    code, report, _ = check(tmp_path, dataset_name=str(data), assistant_only_loss=False)
    assert code == 1 and report["zero_mask_rows"] == [{"index": 1, "reason": "empty_completion"}]
    # completion_only_loss (TRL's default for these rows): only the completion and its eos train
    code, everything, _ = check(
        tmp_path, dataset_name=str(data), assistant_only_loss=False, completion_only_loss=False
    )
    assert everything["trainable_tokens"] == everything["tokens"] > report["trainable_tokens"]
    code, _, err = check(tmp_path, dataset_name=str(data))
    assert code == 2 and "prompt/completion rows of plain text with assistant_only_loss: true" in err


def test_folders_with_the_same_card_and_name_load_their_own_rows(tmp_path, multi_config):
    # datasets 5.2 caches a carded folder by its name and config only; each must still give its own rows.
    seen = []
    for where, n in (("first", 2), ("second", 5)):
        folder = tmp_path / where / "multi"
        shutil.copytree(multi_config, folder)
        write_jsonl(folder / "maths" / "train.jsonl", rows(n))
        seen.append(check(tmp_path, dataset_name=str(folder), dataset_config="maths")[1]["rows"])
    write_jsonl(tmp_path / "second" / "multi" / "maths" / "train.jsonl", rows(7))  # edited in place
    seen.append(check(tmp_path, dataset_name=str(tmp_path / "second" / "multi"), dataset_config="maths")[1]["rows"])
    assert seen == [2, 5, 7]
