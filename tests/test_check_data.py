"""check-data: each zero-mask reason names its row; exit codes and report keys as other tools rely on them."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import yaml
from conftest import write_recipe

from sft_toolkit import offline_tokenizers
from sft_toolkit.check_data import check_data
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import build_recipe

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "templates"


def qa(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


GOOD_ROWS = [qa(f"What is {i} + 1?", f"{i} + 1 = {i + 1}.") for i in range(10)]


def run(path: str) -> dict:
    from sft_toolkit.recipe import load_recipe

    report, _ = check_data(load_recipe(path))
    return report.to_json()


def test_clean_dataset_passes(tmp_path):
    report = run(write_recipe(tmp_path, GOOD_ROWS, max_length=64))
    assert report["ok"] and report["zero_mask_rows"] == [] and report["rows"] == 10
    assert report["trainable_tokens"] > 0 and report["dropped_rows"] == 0


def test_each_zero_mask_reason_names_its_row(tmp_path):
    rows = list(GOOD_ROWS)
    rows[2] = {"messages": [{"role": "user", "content": "Anyone there?"}]}
    rows[4] = {"messages": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]}
    rows[6] = qa("A very long question. " * 80, "Short answer.")
    report = run(write_recipe(tmp_path, rows, max_length=64))
    assert not report["ok"]
    assert report["zero_mask_rows"] == [
        {"index": 2, "reason": "no_assistant_turn"},
        {"index": 4, "reason": "empty_assistant_content"},
        {"index": 6, "reason": "all_assistant_tokens_past_max_length"},
    ]
    assert report["dropped_rows"] == 2  # rows 2 and 6: TRL filters them after truncation, silently
    assert report["truncated_assistant_tokens"] > 0
    assert report["trl_would_abort"] is True


def test_template_without_markers_marks_nothing(tmp_path):
    report = run(write_recipe(tmp_path, GOOD_ROWS[:3], chat_template_path=str(FIXTURES / "S002_no_markers.jinja")))
    assert [r["reason"] for r in report["zero_mask_rows"]] == ["template_marks_nothing"] * 3


def test_template_rejecting_a_row_is_named(tmp_path):
    rows = [GOOD_ROWS[0], {"messages": [{"role": "system", "content": "Be brief."}] + GOOD_ROWS[1]["messages"]}]
    report = run(write_recipe(tmp_path, rows, chat_template_path=str(FIXTURES / "I001_rejects_system.jinja")))
    (row,) = report["zero_mask_rows"]
    assert row["index"] == 1 and row["reason"].startswith("template_error") and "System role" in row["reason"]


def test_bfd_split_orphans_assistant_tokens_and_wastes_sequences(tmp_path):
    rows = GOOD_ROWS + [qa("Tell me a story. " * 30, "Once upon a time. " * 30)]
    report = run(write_recipe(tmp_path, rows, max_length=64, packing=True, packing_strategy="bfd_split"))
    assert report["orphaned_assistant_tokens"] > 0 and report["orphaned_rows"] == [10]
    assert not report["ok"]
    bfd = run(write_recipe(tmp_path, rows, max_length=64, packing=True, packing_strategy="bfd"))
    assert bfd["orphaned_assistant_tokens"] == 0
    assert bfd["truncated_assistant_tokens"] > 0


def test_zero_trainable_steps_are_counted(tmp_path):
    rows = [qa("Long prompt. " * 60, "ok")] * 4 + GOOD_ROWS[:4]
    report = run(
        write_recipe(
            tmp_path, rows, max_length=64, packing=True, packing_strategy="bfd", per_device_train_batch_size=2
        )
    )
    assert report["zero_trainable_sequences"] == 4
    assert report["zero_trainable_steps"] >= 1


def test_malformed_rows_are_bad_input_naming_row_and_field(tmp_path):
    rows = [GOOD_ROWS[0], {"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]}]
    with pytest.raises(InputError, match=r"row 1: messages\[1\]\.role is missing"):
        run(write_recipe(tmp_path, rows))


def test_unknown_recipe_key_suggests_the_closest(tmp_path):
    with pytest.raises(InputError, match="unknown key 'max_lenght'; did you mean 'max_length'"):
        build_recipe({"model_name_or_path": "x", "dataset_name": "y", "max_lenght": 10})


def test_wrong_type_names_the_key():
    with pytest.raises(InputError, match="max_length: expected an integer or null"):
        build_recipe({"model_name_or_path": "x", "dataset_name": "y", "max_length": "long"})


def test_packing_without_max_length_is_rejected():
    with pytest.raises(InputError, match="packing: true needs max_length"):
        build_recipe({"model_name_or_path": "x", "dataset_name": "y", "packing": True, "max_length": None})


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sft_toolkit", "check-data", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_exit_codes_json_and_report(tmp_path):
    rows = list(GOOD_ROWS)
    rows[5] = {"messages": [{"role": "user", "content": "Anyone?"}]}
    recipe = write_recipe(tmp_path, rows)
    proc = cli(recipe, "--format", "json", "--report", str(tmp_path / "report.json"))
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    for key, kind in {
        "ok": bool,
        "rows": int,
        "zero_mask_rows": list,
        "trainable_tokens": int,
        "dropped_rows": int,
        "truncated_assistant_tokens": int,
        "orphaned_assistant_tokens": int,
        "zero_trainable_sequences": int,
    }.items():
        assert isinstance(data[key], kind), key
    assert data["zero_mask_rows"] == [{"index": 5, "reason": "no_assistant_turn"}]
    assert json.loads((tmp_path / "report.json").read_text()) == data
    assert "| 5 | no_assistant_turn |" in (tmp_path / "report.md").read_text()
    assert cli(recipe, "--max-zero-rows", "1").returncode == 0


def test_cli_bad_input_exits_two_without_traceback(tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text(json.dumps(GOOD_ROWS[0]) + "\n{not json\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(offline_tokenizers.cached("qwen2")),
                "dataset_name": str(data),
                "chat_template_path": "chatml",
            }
        )
    )
    proc = cli(str(recipe))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{data}:2: not valid JSON" in proc.stderr


def test_sharegpt_rows_are_converted_like_sfttrainer_does(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"What is {i} + 1?"},
                {"from": "gpt", "value": f"{i} + 1 = {i + 1}."},
            ]
        }
        for i in range(5)
    ]
    sharegpt = run(write_recipe(tmp_path, rows))
    chatml = run(write_recipe(tmp_path, GOOD_ROWS[:5]))
    assert sharegpt["ok"] and sharegpt["trainable_tokens"] == chatml["trainable_tokens"] > 0


def test_sharegpt_role_map_is_a_recipe_option(tmp_path):
    rows = [{"conversations": [{"from": "asker", "value": "Hi?"}, {"from": "answerer", "value": "Hello."}]}]
    report = run(write_recipe(tmp_path, rows, role_map={"asker": "user", "answerer": "assistant"}))
    assert report["ok"]
    with pytest.raises(InputError, match="role 'asker' is not one of"):
        run(write_recipe(tmp_path, rows))


# ------------------------------------------------------------------------------------------ content coverage

TRL_TEMPLATES = __import__("pathlib").Path(__import__("trl").__file__).parent / "chat_templates"
TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "That is 8."},
]


def as_parts(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def coverage_of(tmp_path, rows, template) -> dict:
    return run(write_recipe(tmp_path, rows, chat_template_path=str(template)))


def one_problem(index: int, reason: str, message: int) -> dict:
    """A `coverage_problem_rows` entry of a row with a single problem."""
    return {
        "index": index,
        "reason": reason,
        "message": message,
        "reasons": [reason],
        "problems": [{"reason": reason, "message": message}],
    }


def test_a_turn_the_template_leaves_untrained_fails_the_gate_naming_row_and_message(tmp_path):
    """The template trains only the last assistant turn: the mask is not empty, but message 1 is not learned."""
    rows = [qa("Hi?", "Hello."), {"messages": TWO_TURNS}]
    report = coverage_of(tmp_path, rows, FIXTURES / "R001_last_turn_only.jinja")
    assert report["zero_mask_rows"] == [] and report["trainable_tokens"] > 0
    assert report["coverage_problem_rows"] == [one_problem(1, "assistant_content_untrained", 1)]
    assert not report["ok"]


def test_user_text_inside_a_generation_block_fails_the_gate(tmp_path):
    report = coverage_of(tmp_path, [{"messages": TWO_TURNS}], FIXTURES / "R002_user_in_mask.jinja")
    assert report["coverage_problem_rows"] == [one_problem(0, "non_assistant_text_trained", 2)]
    assert not report["ok"]


def test_a_turn_switched_off_is_exempt_from_coverage(tmp_path):
    off = [dict(m) for m in TWO_TURNS]
    off[1]["train"] = False
    report = coverage_of(tmp_path, [{"messages": off}], FIXTURES / "good_chatml.jinja")
    assert report["ok"] and report["coverage_problem_rows"] == []


@pytest.mark.parametrize("name", ["smolvlm_training", "idefics3_training", "llava_next_training"])
def test_vision_templates_train_assistant_text_of_content_parts_and_string_content_is_caught(tmp_path, name):
    """Templates that iterate over content parts: rows written with parts keep them and pass; where a template
    renders nothing of a string, a row that trains only the end-of-turn markup fails (or is refused)."""
    template = TRL_TEMPLATES / f"{name}.jinja"
    (tmp_path / "parts").mkdir()
    report = coverage_of(tmp_path / "parts", [{"messages": as_parts(TWO_TURNS)}], template)
    assert report["ok"] and report["coverage_problem_rows"] == [], report["problems"]
    (tmp_path / "string").mkdir()
    report = coverage_of(tmp_path / "string", [{"messages": TWO_TURNS}], template)
    assert not report["ok"]
    assert report["coverage_problem_rows"] or report["zero_mask_rows"]


def test_text_parts_are_joined_for_a_template_that_needs_strings(tmp_path):
    report = coverage_of(tmp_path, [{"messages": as_parts(TWO_TURNS)}], "chatml")
    strings = run(write_recipe(tmp_path, [{"messages": TWO_TURNS}]))
    assert report["ok"] and report["trainable_tokens"] == strings["trainable_tokens"]


def test_cli_reports_coverage_problems_in_json_and_markdown(tmp_path):
    from sft_toolkit.cli import main

    recipe = write_recipe(
        tmp_path, [{"messages": TWO_TURNS}], chat_template_path=str(FIXTURES / "R002_user_in_mask.jinja")
    )
    assert main(["check-data", recipe, "--format", "json", "--report", str(tmp_path / "report.json")]) == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["coverage_problem_rows"] == [one_problem(0, "non_assistant_text_trained", 2)]
    assert any("train the wrong text" in p for p in data["problems"])
    markdown = (tmp_path / "report.md").read_text()
    assert "| 0 | 2 | non_assistant_text_trained |" in markdown and "generation" in markdown


# ChatML whose assistant turns open with an empty think block when the row switches thinking off.
THINKING_SWITCH = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' %}{% generation %}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{%- else %}{{ m.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_each_rows_chat_template_kwargs_reach_the_template_also_under_per_message_control(tmp_path):
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_SWITCH)
    off = [dict(m) for m in TWO_TURNS]
    off[1]["train"] = False
    rows = [
        {"messages": TWO_TURNS, "chat_template_kwargs": {"enable_thinking": True}},
        {"messages": TWO_TURNS, "chat_template_kwargs": {"enable_thinking": False}},
        {"messages": off, "chat_template_kwargs": {"enable_thinking": True}},
        {"messages": off, "chat_template_kwargs": {"enable_thinking": False}},
    ]
    from sft_toolkit.recipe import load_recipe

    report, final = check_data(load_recipe(write_recipe(tmp_path, rows, chat_template_path=str(template))))
    assert report.ok, report.problems()
    tokenizer = offline_tokenizers.load("qwen2")
    trained = [
        tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        for ids, labels in zip(final["input_ids"], final["labels"])
    ]
    assert [text.count("<think>") for text in trained] == [0, 2, 0, 1]
    assert "It is 5." not in trained[3] and "That is 8." in trained[3]


def test_check_data_takes_the_recipe_overrides_train_takes(tmp_path):
    """`check-data RECIPE --max_length 8` gates the run `train RECIPE --max_length 8` would start."""
    from sft_toolkit.cli import main

    row = {
        "messages": [{"role": "user", "content": "Convert 3 km to m."}, {"role": "assistant", "content": "3000 m."}]
    }
    recipe = write_recipe(tmp_path, [row])
    assert main(["check-data", recipe, "--format", "json"]) == 0
    assert main(["check-data", recipe, "--format", "json", "--max_length", "8"]) == 1  # the answer is cut away
    assert main(["check-data", recipe, "--max_lenght", "8"]) == 2  # a misspelt key is bad input, named


def test_a_tokenizer_that_crashes_in_rust_is_bad_input(tmp_path):
    """A tokenizer.json whose normalizer makes `tokenizers` panic (a Replace whose regex matches the empty string:
    'index out of bounds' inside Rust) is named as the tokenizer at fault (exit 2), not a traceback: a Rust panic
    is a BaseException that the per-row fallback does not catch, and the tokenizer is not used again."""
    import shutil
    from pathlib import Path

    from sft_toolkit.cli import main

    folder = tmp_path / "crashing"
    shutil.copytree(Path(__file__).parent / "bad_inputs" / "tokenizer", folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"Regex": "^"}, "content": "x"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    recipe = write_recipe(tmp_path, [qa("Hi", "Hello")], model_name_or_path=str(folder), chat_template_path="chatml")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-data", recipe])
    assert code == 2
    assert "crashed on this data" in err.getvalue() and "Traceback" not in err.getvalue()
