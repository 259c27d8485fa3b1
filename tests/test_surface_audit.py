"""The command line as a user meets it with their own folders: what an audit of the outer surface found.

Each test is one thing a careful user tried (an output inside their dataset folder, a tokenizer_config.json that
transformers 5 saved without its template, a path with a space in a command the toolkit prints) and what they
must see: their files kept byte for byte, the template transformers would use, a printed command that works.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil

import pytest
from test_no_data_loss import fake_checkpoint, home, no_training, refused, run, tiny_model, tree, write_recipe

from sft_toolkit.cli import main
from sft_toolkit.prepared import load_prepared
from sft_toolkit.recipe import load_recipe
from sft_toolkit.templates import load_template

__all__ = ["home", "no_training", "tiny_model"]  # fixtures, shared with test_no_data_loss


# --- an output file never goes inside a dataset folder --------------------------------------------------------


def data_folder_recipe(home) -> str:
    """The recipe reading `data/` (a folder of .jsonl files) rather than one file of it."""
    return write_recipe(home, "folder.yaml", dataset_name="data")


@pytest.mark.parametrize("report", ["data/report.json", "data/report.md", "data/sub/report.json"])
def test_a_report_is_never_written_into_the_dataset_folder(home, report):
    """A new .json beside the rows would be loaded as rows the next time (datasets reads every file there)."""
    recipe = data_folder_recipe(home)
    refused(home, ["check-data", recipe, "--report", report], "lies inside the input dataset_name (data)")
    code, err = run(["check-data", recipe], home)
    assert code == 0, err  # the dataset still loads


def test_a_page_is_never_written_into_the_dataset_or_prepared_folder_it_shows(home):
    refused(home, ["show", "data", "--template", "chatml", "--html", "data/page.html"], "lies inside the input")
    code, err = run(["prepare", "recipe.yaml", "-o", "prepared"], home)
    assert code == 0, err
    refused(home, ["show", "prepared", "--html", "prepared/page.html"], "lies inside the input CONVERSATION")
    code, err = run(["prepare", "recipe.yaml", "-o", "prepared"], home)  # still the toolkit's to replace
    assert code == 0, err


def test_a_report_beside_a_tokenizer_or_a_dataset_file_is_still_written(home):
    """Only a folder that is read as data is closed: a new file in the model's folder changes nothing it loads."""
    for report in ("model/report.json", "data_report.json"):
        code, err = run(["check-data", "recipe.yaml", "--report", report], home)
        assert code == 0, err
        assert json.loads((home / report).read_text())["ok"] is True


# --- a tokenizer_config.json is read as transformers reads its folder ------------------------------------------


def saved_by_transformers_5(home) -> str:
    """The model folder as transformers 5 saves a tokenizer: the template in chat_template.jinja, none in the
    config (which is all that tells `AutoTokenizer` there is one)."""
    config = json.loads((home / "model" / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    template = load_template("chatml").source
    (home / "model" / "chat_template.jinja").write_text(template)
    return template


def test_lint_of_a_config_beside_its_template_file_lints_that_template(home):
    saved_by_transformers_5(home)
    code, err = run(["lint", "model/tokenizer_config.json"], home)
    assert code == 0, err
    with contextlib.chdir(home):
        assert load_template("model/tokenizer_config.json").origin == "model/chat_template.jinja"


def test_add_markers_of_such_a_config_converts_that_template(home):
    template = saved_by_transformers_5(home)
    code, err = run(["add-markers", "model/tokenizer_config.json", "-o", "marked.jinja"], home)
    assert code == 0, err
    assert (home / "marked.jinja").read_text() == template  # chatml is marked already: unchanged


def test_add_markers_never_writes_over_the_template_a_config_stands_for(home):
    saved_by_transformers_5(home)
    refused(
        home,
        ["add-markers", "model/tokenizer_config.json", "-o", "model/chat_template.jinja"],
        "is the input template (model/chat_template.jinja)",
    )


# --- commands the toolkit prints work when pasted ------------------------------------------------------------


def test_prepares_train_command_works_with_spaces_and_overrides(home):
    shutil.move(home / "data", home / "my data")
    write_recipe(home, "my recipe.yaml", dataset_name="my data/train.jsonl")
    code, out, err = run_out(["prepare", "my recipe.yaml", "-o", "my prepared", "--max_length", "128"], home)
    assert code == 0, err
    printed = out.rsplit("train with: ", 1)[1].strip()
    assert printed.endswith(" (and the same overrides)"), printed
    argv = shlex.split(printed.removesuffix(" (and the same overrides)"))
    assert argv == ["sft-toolkit", "train", "my recipe.yaml", "--prepared", "my prepared"]


def test_the_prepare_suggested_after_a_mismatch_works_when_followed(home):
    code, err = run(["prepare", "recipe.yaml", "-o", "prepared"], home)
    assert code == 0, err
    before = tree(home)
    code, err = run(["train", "recipe.yaml", "--prepared", "prepared", "--max_length", "128"], home)
    assert code == 2 and "max_length: recipe 128, prepared 256" in err, err
    assert "with the same --KEY VALUE overrides as this command" in err, err
    assert tree(home) == before
    suggested = shlex.split(err.split("Run `", 1)[1].split("`", 1)[0])
    assert suggested == ["sft-toolkit", "prepare", "recipe.yaml", "-o", "prepared"]
    code, err = run([*suggested[1:], "--max_length", "128"], home)  # followed, with this command's override
    assert code == 0, err
    with contextlib.chdir(home):
        recipe = load_recipe("recipe.yaml", {"max_length": 128, "prepared": "prepared"})
        assert len(load_prepared(recipe).dataset) > 0  # no mismatch left


def run_out(argv: list[str], cwd) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


# --- options are checked where they are read ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check-data", "prepare"])
@pytest.mark.parametrize("count", ["0", "-2"])
def test_world_size_below_one_is_refused_with_the_option_named(home, command, count, capsys):
    """0 divided the step accounting by zero (a traceback); -2 counted steps of a negative batch."""
    output = ["-o", "prepared"] if command == "prepare" else []
    before = tree(home)
    with contextlib.chdir(home), pytest.raises(SystemExit) as stop:
        main([command, "recipe.yaml", *output, "--world-size", count])
    assert stop.value.code == 2
    said = capsys.readouterr().err
    assert f"argument --world-size: '{count}' is not a number of training processes" in said, said
    assert "Traceback" not in said and tree(home) == before


# --- quickstart's summary -------------------------------------------------------------------------------------


def test_quickstart_says_no_step_was_logged_rather_than_printing_nan():
    """`quickstart --max-steps 10` runs fewer steps than its recipe's logging_steps (50): no loss is logged on the way,
    and the summary printed `loss nan → nan`, which reads as a diverged run."""
    from sft_toolkit.cli.quickstart import progress

    short = progress({"train_loss": 6.15, "global_step": 10}, logging_steps=50)
    assert "nan" not in short
    assert "no step logged (logging_steps 50 is more than the steps run), mean loss 6.150" in short
    logged = progress({"first_loss": 6.0, "last_loss": 1.5, "first_accuracy": 0.1, "last_accuracy": 0.9}, 50)
    assert logged == "loss 6.000 → 1.500, assistant-token accuracy 0.100 → 0.900"


@pytest.mark.parametrize(
    "argv",
    [
        ["check-data", "recipe.yaml", "--report", ""],
        ["add-markers", "chatml", "-o", ""],
        ["show", "conversation.json", "--template", "chatml", "--html", ""],
        ["prepare", "recipe.yaml", "-o", ""],
        ["merge", "run", "-o", ""],
        ["train", "recipe.yaml", "--prepared", ""],
    ],
    ids=["report", "markers", "html", "prepare", "merge", "prepared"],
)
def test_an_empty_output_path_is_refused_not_ignored(home, argv, capsys):
    """`--report ""` wrote no report and exited 0; `add-markers -o ""` printed to stdout as if no -o was given;
    `prepare -o ""` was read as the current folder; `train --prepared ""` trained from the recipe's dataset."""
    before = tree(home)
    with contextlib.chdir(home), pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    said = capsys.readouterr().err
    assert "'' names no file or folder; give a path" in said, said
    assert tree(home) == before


# --- show reads a JSON array of rows as the dataset it is -----------------------------------------------------


def test_show_of_a_json_array_of_rows_shows_row_0_as_its_help_says(home):
    """`--row` defaults to 0 (its help); a .json holding a list of rows was read as one conversation instead and
    refused with `messages[0].role is missing`."""
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]},
    ]
    (home / "rows.json").write_text(json.dumps(rows))
    shown = {}
    for row in (None, 0, 1):
        code, out, err = run_out(
            [
                "show",
                "rows.json",
                "--template",
                "chatml",
                "--format",
                "plain",
                *([] if row is None else ["--row", str(row)]),
            ],
            home,
        )
        assert code == 0, err
        shown[row] = out
    assert shown[None] == shown[0] != shown[1]
    assert "Hello!" in shown[None] and "See you" in shown[1]


# --- command-line overrides read as trl sft's command line reads them ------------------------------------------


def test_strategy_no_on_the_command_line_means_no_as_in_trl_sft(home):
    """`trl sft --eval_strategy no` is text; YAML 1.1 read `no` as false, and the toolkit refused it
    (`eval_strategy: expected a string, got a boolean (False)`). yes/no still switch boolean keys."""
    from sft_toolkit.cli._common import parse_overrides

    overrides = parse_overrides(["--eval_strategy", "no", "--save_strategy=no", "--packing", "yes"])
    with contextlib.chdir(home):
        recipe = load_recipe("recipe.yaml", overrides)
    assert str(getattr(recipe.sft.eval_strategy, "value", recipe.sft.eval_strategy)) == "no"
    assert str(getattr(recipe.sft.save_strategy, "value", recipe.sft.save_strategy)) == "no"
    assert recipe.sft.packing is True
    code, err = run(["check-data", "recipe.yaml", "--eval_strategy", "no", "--packing", "no"], home)
    assert code == 0, err


# --- the ways out an earlier run's refusal offers ----------------------------------------------------------------


def test_resuming_is_offered_only_where_there_is_a_checkpoint(home, no_training):
    """A run saved without checkpoints (save_strategy: no, as the handbook recipe) left only its model: `resume it`
    there starts at step 0 and replaces that model, so it is not offered; with a checkpoint it is."""
    (home / "run").mkdir()
    (home / "run" / "config.json").write_text("{}")
    refused(home, ["train", "recipe.yaml"], "holds an earlier run (config.json)")
    code, err = run(["train", "recipe.yaml"], home)
    assert "resume it" not in err and "set overwrite_output_dir: true" in err, err
    fake_checkpoint(home / "run", 1, state_step=1)
    code, err = run(["train", "recipe.yaml"], home)
    assert code == 2 and "resume it (resume_from_checkpoint: true), set overwrite_output_dir: true" in err, err


def test_quickstart_with_a_users_recipe_builds_nothing_beside_their_model(home):
    """`quickstart --recipe R` built tiny-chat/ beside R's model and data/eval.jsonl and data/README.md (a dataset card
    naming configs) inside the user's data folder, none of which R reads."""
    write_recipe(home, "mine.yaml", max_length=4)  # check-data fails (nothing left to train): no training
    before = tree(home)
    code, out, err = run_out(["quickstart", "--recipe", "mine.yaml"], home)
    assert code == 1 and "3/4 check-data: FAIL" in out, out + err
    assert "1/4 assets: none built (the recipe's model model is not a tiny-chat folder)" in out
    assert tree(home) == before


# --- merge never saves where training deletes whole ----------------------------------------------------------


@pytest.mark.parametrize("target", ["run/checkpoint-1/merged", "run/.incomplete", "run/.incomplete/final/merged"])
def test_merge_never_saves_inside_a_checkpoint_or_the_staging_folder(home, target):
    """RUN_DIR may be a checkpoint-N (merge's help); a merged model saved inside it was deleted with it by the next
    run's rotation or overwrite_output_dir, which prove a checkpoint by its trainer_state.json alone."""
    checkpoint = fake_checkpoint(home / "run", 1, state_step=1)
    (checkpoint / "adapter_config.json").write_text("{}")
    refused(home, ["merge", "run/checkpoint-1", "-o", target], "which training deletes whole")


@pytest.mark.parametrize(
    "argv",
    [
        ["check-data", "recipe.yaml", "--report", "run/checkpoint-1/report.json"],
        ["add-markers", "chatml", "-o", "run/checkpoint-1/training.jinja"],
        ["show", "conversation.json", "--template", "chatml", "--html", "run/.incomplete/page.html"],
        ["prepare", "recipe.yaml", "-o", "run/checkpoint-1/prepared"],
    ],
    ids=["report", "markers", "html", "prepare"],
)
def test_no_output_is_written_where_training_deletes_whole(home, argv):
    """A report or prepared folder inside checkpoint-N went with it at the next rotation or overwrite_output_dir."""
    fake_checkpoint(home / "run", 1, state_step=1)
    refused(home, argv, "which training deletes whole")


def test_the_add_markers_command_the_guard_suggests_works_when_pasted(home):
    """The guard's way out for an unmarked template named the path unquoted: a space in it split the command."""
    import re

    unmarked = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", load_template("chatml").source)
    (home / "my template.jinja").write_text(unmarked)
    write_recipe(home, "unmarked.yaml", chat_template_path="my template.jinja")
    code, out, err = run_out(["train", "unmarked.yaml"], home)
    assert code == 1, out + err
    suggested = shlex.split((out + err).split("run `", 1)[1].split("`", 1)[0])
    assert suggested == ["sft-toolkit", "add-markers", "my template.jinja", "-o", "training.jinja"]
    code, out, err = run_out(suggested[1:], home)
    assert code == 0, err
    assert re.search(r"\{%-?\s*generation\s*-?%\}", (home / "training.jinja").read_text())


def test_report_named_in_capitals_gets_the_markdown_it_names(home):
    """`--report REPORT.MD` wrote the JSON report into REPORT.MD and the Markdown into REPORT.md beside it."""
    code, err = run(["check-data", "recipe.yaml", "--report", "REPORT.MD"], home)
    assert code == 0, err
    assert (home / "REPORT.MD").read_text().startswith("# check-data: ")
    assert json.loads((home / "REPORT.json").read_text())["ok"] is True
    assert not (home / "REPORT.md").exists()


# --- a second run replaces what the first one wrote ----------------------------------------------------------


def test_a_merge_and_merge_adapter_run_again_replace_their_own_merged_model(home, tiny_model):
    """`merge -o DIR` a second time, and a merge_adapter run again with overwrite_output_dir, were refused
    ("exists and is not empty") by the merged model the toolkit itself had saved."""
    write_recipe(
        home,
        model_name_or_path=str(tiny_model),
        use_peft=True,
        lora_r=4,
        merge_adapter=True,
        overwrite_output_dir=True,
        max_steps=1,
        save_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=128,
    )
    for _ in range(2):
        code, err = run(["train", "recipe.yaml"], home)
        assert code == 0, err
        assert (home / "run" / "merged" / "model.safetensors").is_file()
    for _ in range(2):
        code, err = run(["merge", "run", "-o", "exported"], home)
        assert code == 0, err
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(".")) == []  # nothing left beside it
    (home / "exported" / "notes.txt").write_text("mine now")
    refused(home, ["merge", "run", "-o", "exported"], "exists and is not empty")


def test_an_output_that_is_an_input_under_another_name_is_refused(home):
    """`-o My.jinja` for `my.jinja` on a case-insensitive disk (macOS, Windows) is the input itself; paths compared
    as text missed it. A hard link stands in for the case variant here."""
    (home / "mine.jinja").write_text(load_template("chatml").source)
    os.link(home / "mine.jinja", home / "Mine.jinja")
    refused(home, ["add-markers", "mine.jinja", "-o", "Mine.jinja"], "is the input INPUT (mine.jinja)")
