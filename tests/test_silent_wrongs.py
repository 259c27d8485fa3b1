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
from pathlib import Path

import pytest
from conftest import write_recipe
from test_no_data_loss import home, no_training, refused, run, tiny_model
from test_no_data_loss import write_recipe as write_run_recipe

from sft_toolkit import coverage, offline_tokenizers, outputs, preprocess
from sft_toolkit.check_data import REASON_HELP, check_data
from sft_toolkit.cli import main
from sft_toolkit.policy import TurnPolicy
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import load_recipe

__all__ = ["home", "no_training", "tiny_model"]  # fixtures, shared with test_no_data_loss

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


def test_switched_off_problems_read_the_trained_characters_in_message_order():
    """A switched-off answer quoted by a trained one is not its own occurrence; its own, trained, is reported."""
    messages = [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi", "train": False},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "I said hi"},
    ]
    text = "U: Say hi\nA: hi\nU: Again\nA: I said hi\n"
    own, quoted = text.index("A: hi") + 3, text.index("I said hi")
    last_answer = [(quoted, quoted + len("I said hi"))]
    assert coverage.switched_off_problems(text, last_answer, messages, {3}) == []
    assert coverage.switched_off_problems(text, [(own, own + 1), *last_answer], messages, {3}) == [
        coverage.CoverageProblem(coverage.SWITCHED_OFF_TURN_TRAINED, 1)
    ]


def test_the_policys_mask_follows_transformers_rule_on_trimmed_offsets(tmp_path):
    """A tokenizer whose offsets leave a lone space out (ByteLevel's trim_offsets, as GPT-2's): transformers marks
    tokens by overlap with the spans; the policy's mask of a subset of them follows the same rule, so a row with a
    switched-off turn trains exactly the kept one (it used to be refused: "spans don't line up with its token
    mask")."""
    import shutil

    from sft_toolkit.tokenizer import load_tokenizer

    folder = tmp_path / "trimmed"
    shutil.copytree(Path(__file__).parent / "bad_inputs" / "tokenizer", folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = load_tokenizer(str(folder))
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Sure. "},
            {"role": "assistant", "content": "Here it is.", "train": False},
        ]
    }
    record = preprocess._tokenize_row(row, 0, tokenizer, MERGED_TURNS, True, policy=TurnPolicy())
    assert record["problem"] == ""
    assert trained_text(tokenizer, record) == "Sure."  # the trailing space's token has no characters: untrained
    assert record["coverage_problems"] == ""


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


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (
            {"dataset_mixture": {"datasets": [{"id": "mixdata"}]}},
            "output_dir: mixdata/run: lies inside the input dataset_mixture.datasets[0].id",
        ),
        ({"datasets": [{"path": "mixdata"}]}, "output_dir: mixdata/run: lies inside the input datasets[0].path"),
    ],
    ids=["handbook-mixture", "trl-mixture"],
)
def test_an_output_dir_inside_a_mixtures_dataset_folder_is_refused(home, no_training, keys, says):
    """As for dataset_name: a run writing into a dataset folder would change the rows the next load reads."""
    (home / "mixdata").mkdir()
    (home / "data" / "train.jsonl").rename(home / "mixdata" / "train.jsonl")
    write_run_recipe(home, dataset_name=None, output_dir="mixdata/run", **keys)
    refused(home, ["train", "recipe.yaml"], says)


def test_a_report_over_a_mixtures_data_file_is_refused(home):
    """A TRL mixture source that names its files (`path: json`, `data_files: {...}`): each file is an input, which
    `check-data --report FILE` must not overwrite."""
    (home / "mixdata").mkdir()
    (home / "data" / "train.jsonl").rename(home / "mixdata" / "train.jsonl")
    sources = [{"path": "json", "data_files": {"train": ["mixdata/train.jsonl"]}}]
    write_run_recipe(home, dataset_name=None, datasets=sources)
    refused(home, ["check-data", "recipe.yaml", "--report", "mixdata/train.jsonl"], "datasets[0].data_files")


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


def test_a_placed_checkpoint_carries_no_staging_record(home, tiny_model):
    """The record says "a save is being staged here": once checkpoint-N is renamed into place it is a checkpoint,
    and a record left in it would make any copy of it put back under .incomplete/ the toolkit's to remove."""
    write_run_recipe(
        home,
        model_name_or_path=str(tiny_model),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=2,
    )
    code, err = run(["train", "recipe.yaml"], home)
    assert code == 0, err
    checkpoints = sorted((home / "run").glob("checkpoint-*"))
    assert [outputs.checkpoint_step(c) for c in checkpoints] == [1, 2]
    assert [c.name for c in checkpoints if (c / outputs.STAGING_RECORD).exists()] == []
    assert not (home / "run" / outputs.STAGING).exists()


# ------------------------------------------------------------------------------ a tokenizer without offsets


@pytest.fixture(scope="module")
def python_tokenizer(tmp_path_factory):
    """ByT5's tokenizer: pure Python (no tokenizer.json, `is_fast` False), so it gives no token offsets."""
    from transformers import ByT5Tokenizer

    folder = tmp_path_factory.mktemp("byt5")
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def check_rows(tmp_path, tokenizer_dir, rows, template, **keys) -> tuple[int, dict, str]:
    data, template_path = tmp_path / "rows.jsonl", tmp_path / "template.jinja"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template_path.write_text(template)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model_name_or_path": str(tokenizer_dir),
                "chat_template_path": str(template_path),
                "dataset_name": str(data),
                "assistant_only_loss": False,
                **keys,
            }
        )
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check-data", str(recipe), "--report", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text()) if code != 2 else {}
    return code, report, out.getvalue() + err.getvalue()


def test_a_prompt_trained_by_a_python_tokenizer_is_found(tmp_path, python_tokenizer):
    """Offsets recovered from decoded token prefixes: the prompt text a template trains is reported, as with a fast
    tokenizer, instead of the row passing unchecked."""
    from test_right_mask import ANSWER, PROMPT, SYSTEM_DEPENDS_ON_GENERATION_PROMPT

    rows = [{"prompt": PROMPT, "completion": [ANSWER]}]
    code, report, out = check_rows(tmp_path, python_tokenizer, rows, SYSTEM_DEPENDS_ON_GENERATION_PROMPT)
    assert code == 1, out
    (problem,) = report["coverage_problem_rows"]
    assert problem["reason"] == "prompt_text_trained" and problem["message"] == 1
    assert report["coverage_unchecked_rows"] == []


def test_python_tokenizer_rows_that_train_the_completion_pass_checked(tmp_path, python_tokenizer):
    from test_right_mask import CHATML_WITH_TOOLS

    rows = [
        {
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "completion": [{"role": "assistant", "content": "Paris."}],
        },
        {"prompt": "The capital of France is", "completion": " Paris."},
    ]
    code, report, out = check_rows(tmp_path, python_tokenizer, rows[:1], CHATML_WITH_TOOLS)
    assert code == 0 and report["coverage_unchecked_rows"] == [], out
    (tmp_path / "text").mkdir()
    code, report, out = check_rows(tmp_path / "text", python_tokenizer, rows[1:], CHATML_WITH_TOOLS)
    assert code == 0 and report["coverage_unchecked_rows"] == [], out


def test_rows_whose_coverage_cant_be_read_are_counted_not_passed_as_checked(tmp_path, python_tokenizer, monkeypatch):
    from test_right_mask import CHATML_WITH_TOOLS

    monkeypatch.setattr(preprocess, "decoded_trained_spans", lambda *args: None)  # decoded text not the row's
    rows = [
        {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello."}]}
    ]
    code, report, out = check_rows(tmp_path, python_tokenizer, rows, CHATML_WITH_TOOLS)
    assert report["coverage_unchecked_rows"] == [0]
    assert "content coverage not checked for 1 rows (0)" in out
    assert "| rows whose content coverage could not be checked | 1 |" in (tmp_path / "report.md").read_text()


def test_conversations_with_a_python_tokenizer_and_assistant_only_loss_are_refused(tmp_path, python_tokenizer):
    """transformers builds the assistant mask from offsets: every row used to fail as `template_error`, blaming the
    template; the tokenizer is named instead (exit 2)."""
    from test_right_mask import CHATML_WITH_TOOLS

    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    code, _, out = check_rows(tmp_path, python_tokenizer, rows, CHATML_WITH_TOOLS, assistant_only_loss=True)
    assert code == 2
    assert "assistant_only_loss: true needs a fast tokenizer" in out and "ByT5Tokenizer" in out


def test_a_row_that_renders_differently_when_checked_is_counted_unchecked_not_passed(tmp_path, monkeypatch):
    """A fast tokenizer's row whose re-render (for its text) fails, though the same render succeeded while the row
    was tokenized (a template that is not deterministic): no verdict, so the row is listed as unchecked."""
    from test_right_mask import CHATML_WITH_TOOLS

    from sft_toolkit.masks import TemplateRaised

    def fails(*args, **kwargs):
        raise TemplateRaised("renders differently this time")

    monkeypatch.setattr(preprocess, "render", fails)
    rows = [
        {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello."}]}
    ]
    tokenizer = Path(__file__).parent / "bad_inputs" / "tokenizer"
    code, report, out = check_rows(tmp_path, tokenizer, rows, CHATML_WITH_TOOLS)
    assert code == 0 and report["coverage_unchecked_rows"] == [0], out
    assert report["coverage_problem_rows"] == []
