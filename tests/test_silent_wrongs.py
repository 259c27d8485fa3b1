"""Wrongs that used to pass silently: each test names what the user would have trained, or lost, without a word.

- a turn switched off (`train: false`, `weight: 0`, `train_roles`, `train_turns`) whose characters the final labels
  still train: check-data fails the row with `switched_off_turn_trained`, read from the labels themselves;
- rows whose content coverage can't be read from token offsets (a Python tokenizer) are checked another way or
  refused by name, never passed as checked;
- a folder of the user's under output_dir/.incomplete/ (where saves are staged) is refused up front, never removed.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import write_recipe
from test_no_data_loss import home, no_training, refused

from sft_toolkit import coverage, offline_tokenizers, outputs, preprocess
from sft_toolkit.check_data import REASON_HELP, check_data
from sft_toolkit.cli import main
from sft_toolkit.policy import TurnPolicy
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import load_recipe

__all__ = ["home", "no_training"]  # fixtures, shared with test_no_data_loss

# ChatML that writes consecutive assistant messages as one turn, their blocks back to back (as templates that merge
# split answers do): a token can then straddle two assistant messages.
MERGED_TURNS = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- if loop.first or loop.previtem.role != 'assistant' %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    "{% generation %}{{ m.content }}"
    "{%- if loop.last or loop.nextitem.role != 'assistant' %}{{ '<|im_end|>' }}{%- endif %}{% endgeneration %}"
    "{%- if loop.last or loop.nextitem.role != 'assistant' %}{{ '\\n' }}{%- endif %}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen():
    return offline_tokenizers.load("qwen2")


def trained_text(tokenizer, record) -> str:
    return tokenizer.decode([t for t in record["labels"] if t != -100])


# ------------------------------------------------------------------------------ switched-off turns


def straddling_row(**flag):
    """'Hel' + 'lo there.' render as one token 'Hello': switching off the first message can't untrain it."""
    return {
        "messages": [
            {"role": "user", "content": "Greet me."},
            {"role": "assistant", "content": "Hel", **flag},
            {"role": "assistant", "content": "lo there."},
        ]
    }


@pytest.mark.parametrize("flag", [{"train": False}, {"weight": 0}], ids=["train", "weight"])
def test_a_switched_off_turn_the_labels_still_train_is_reported(qwen, flag):
    record = preprocess._tokenize_row(straddling_row(**flag), 0, qwen, MERGED_TURNS, True, policy=TurnPolicy())
    assert "Hel" in trained_text(qwen, record)  # what the trainer would learn from
    assert coverage.problems_from(record["coverage_problems"]) == [
        coverage.CoverageProblem(coverage.SWITCHED_OFF_TURN_TRAINED, 1)
    ]


def test_a_recipe_policy_that_switches_a_trained_turn_off_is_reported(qwen):
    """train_turns: last switches message 1 off; the token it shares with message 2 trains it anyway."""
    record = preprocess._tokenize_row(straddling_row(), 0, qwen, MERGED_TURNS, True, policy=TurnPolicy(turns="last"))
    assert record["coverage_reason"] == coverage.SWITCHED_OFF_TURN_TRAINED and record["coverage_message"] == 1


def test_switched_off_turns_that_are_untrained_pass(qwen):
    """The same template with a space between the messages: 'Hello' and ' there.' are separate tokens."""
    row = {
        "messages": [
            {"role": "user", "content": "Greet me."},
            {"role": "assistant", "content": "Hello", "train": False},
            {"role": "assistant", "content": " there."},
        ]
    }
    record = preprocess._tokenize_row(row, 0, qwen, MERGED_TURNS, True, policy=TurnPolicy())
    assert "Hello" not in trained_text(qwen, record) and record["coverage_problems"] == ""


def test_check_data_fails_the_row_and_names_the_reason(tmp_path):
    template = tmp_path / "merged.jinja"
    template.write_text(MERGED_TURNS)
    rows = [straddling_row(train=False), {"messages": straddling_row()["messages"][:2]}]
    recipe = write_recipe(tmp_path, rows, chat_template_path=str(template))
    report, _ = check_data(load_recipe(recipe))
    assert not report.ok
    assert report.coverage_problem_rows == [
        {
            "index": 0,
            "reason": "switched_off_turn_trained",
            "message": 1,
            "reasons": ["switched_off_turn_trained"],
            "problems": [{"reason": "switched_off_turn_trained", "message": 1}],
        }
    ]
    assert "switched off" in REASON_HELP["switched_off_turn_trained"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["check-data", recipe, "--report", str(tmp_path / "report.json")])
    assert code == 1
    assert "row 0 message 1: switched_off_turn_trained" in out.getvalue()
    assert "train a switched-off turn" in json.loads((tmp_path / "report.json").read_text())["problems"][0]
    assert "switched_off_turn_trained" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------ nothing lost under .incomplete/


@pytest.mark.parametrize("name", ["final", "checkpoint-2"])
def test_a_users_folder_under_the_staging_folder_is_refused_up_front(home, no_training, name):
    """`.incomplete/final` and `.incomplete/checkpoint-N` are the names the toolkit stages its saves under; a folder
    of the user's under such a name is refused (exit 2, named), never removed or saved into."""
    folder = home / "run" / ".incomplete" / name
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    refused(home, ["train", "recipe.yaml"], f"run/.incomplete/{name}")
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_staging_folder_the_toolkit_made_is_its_own_and_no_other_is(tmp_path):
    run_dir = tmp_path / "run"
    staged = outputs.make_staging(run_dir / outputs.STAGING / "checkpoint-3")
    (staged / "model.safetensors").write_text("half a save")  # what a killed save leaves
    outputs.check_run_files(run_dir, "output_dir")  # the toolkit's own leftover: accepted, replaced on the next save
    outputs.remove_staging(staged)
    assert not staged.exists()

    users = run_dir / outputs.STAGING / "final"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"final.*no record"):
        outputs.check_run_files(run_dir, "output_dir")
    with pytest.raises(InputError, match=r"final.*no record"):
        outputs.remove_staging(users)
    assert (users / "notes.txt").read_text() == "mine"
