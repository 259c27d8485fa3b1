"""Nothing the user owns is lost: every output path that is not provably the toolkit's is refused with exit 2,
before any work, and the user's files survive byte for byte (the whole folder is hashed before and after).

Each case builds a folder as a user might have it, runs the command in this process (an exception that
escaped `main` would fail the test; a printed traceback is asserted absent), and compares the folder's
tree: every file's bytes, every link's target. The training cases replace the guard with one that fails
the test, so a refusal is proven to come before any data is read or weights load.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sft_toolkit import outputs
from sft_toolkit import train as train_module
from sft_toolkit.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CONVERSATION = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def tree(root: Path) -> dict:
    """Every entry under root: a file's sha256, a link's target, a folder; links are not followed."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = ("dir",)
            else:
                found[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def run(argv: list[str], cwd: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    said = out.getvalue() + err.getvalue()
    assert "Traceback" not in said, said
    return code, err.getvalue()


@pytest.fixture
def home(tmp_path) -> Path:
    """A user's folder: the tiny tokenizer (also standing in for a model folder), a dataset and a recipe."""
    shutil.copytree(CORPUS / "tokenizer", tmp_path / "model")
    (tmp_path / "data").mkdir()
    shutil.copy(CORPUS / "data" / "sharegpt.jsonl", tmp_path / "data" / "train.jsonl")
    (tmp_path / "conversation.json").write_text(json.dumps(CONVERSATION))
    write_recipe(tmp_path)
    return tmp_path


def write_recipe(folder: Path, name: str = "recipe.yaml", **keys) -> str:
    recipe = {
        "model_name_or_path": "model",
        "dataset_name": "data/train.jsonl",
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        "max_length": 256,
        "output_dir": "run",
        "max_steps": 2,
        "save_strategy": "steps",
        "save_steps": 1,
        **keys,
    }
    (folder / name).write_text(yaml.safe_dump(recipe))
    return name


def prepare_into(home: Path, out: str) -> None:
    code, err = run(["prepare", "recipe.yaml", "-o", out], home)
    assert code == 0, err


def refused(home: Path, argv: list[str], says: str) -> None:
    """The command exits 2 with a message naming the problem, and nothing under `home` changed."""
    before = tree(home)
    code, err = run(argv, home)
    assert code == 2, err
    assert says in err, err
    assert tree(home) == before


# --- prepare -o DIR ----------------------------------------------------------------------------------------


def test_prepare_keeps_a_users_dataset_folder(home):
    (home / "out" / "dataset").mkdir(parents=True)
    (home / "out" / "dataset" / "my_raw_data.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    refused(home, ["prepare", "recipe.yaml", "-o", "out"], "out: exists and is not a prepared dataset directory")


def test_a_hand_written_manifest_does_not_make_a_folder_the_toolkits(home):
    (home / "out" / "dataset").mkdir(parents=True)
    (home / "out" / "manifest.json").write_text('{"format": 1}')
    (home / "out" / "dataset" / "notes.txt").write_text("mine")
    refused(home, ["prepare", "recipe.yaml", "-o", "out"], f"no {outputs.OWNER_FILE} record")


def test_a_manifest_copied_from_a_real_prepare_does_not_either(home):
    prepare_into(home, "real")
    (home / "out" / "dataset").mkdir(parents=True)
    shutil.copy(home / "real" / "manifest.json", home / "out" / "manifest.json")
    (home / "out" / "dataset" / "my_raw_data.jsonl").write_text("mine")
    refused(home, ["prepare", "recipe.yaml", "-o", "out"], f"no {outputs.OWNER_FILE} record")


def test_a_users_file_inside_a_prepared_folder_keeps_it(home):
    prepare_into(home, "out")
    (home / "out" / "dataset" / "my_notes.txt").write_text("mine")
    refused(
        home, ["prepare", "recipe.yaml", "-o", "out"], "holds dataset/my_notes.txt, which the toolkit did not write"
    )


def test_a_prepared_file_changed_by_hand_is_not_replaced(home):
    prepare_into(home, "out")
    (home / "out" / "manifest.json").write_text('{"edited": true}')
    refused(home, ["prepare", "recipe.yaml", "-o", "out"], "manifest.json changed since the toolkit wrote it")


def test_prepare_never_replaces_through_a_symlink(home):
    prepare_into(home, "real")  # even the toolkit's own folder is not replaced through a link to it
    (home / "link").symlink_to("real")
    refused(home, ["prepare", "recipe.yaml", "-o", "link"], "link: is a symbolic link")


def test_prepare_keeps_a_dataset_saved_inside_its_output(home):
    # The worst case of old: the recipe's dataset_name is DIR/dataset, a folder prepare itself wrote.
    prepare_into(home, "out")
    write_recipe(home, "again.yaml", dataset_name="out/dataset")
    refused(home, ["prepare", "again.yaml", "-o", "out"], "out: contains the input dataset_name (out/dataset)")


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("recipe.yaml", "exists and is a file"),
        ("model", "is the input model_name_or_path"),
        ("data", "contains the input dataset_name"),
        ("model/sub", "lies inside the input model_name_or_path"),
    ],
)
def test_prepare_never_writes_over_an_input_or_a_file(home, target, says):
    refused(home, ["prepare", "recipe.yaml", "-o", target], says)


def test_prepare_replaces_its_own_folder_and_leaves_nothing_beside_it(home):
    prepare_into(home, "out")
    first = (home / "out" / "manifest.json").read_text()
    write_recipe(home, max_length=512)
    prepare_into(home, "out")
    assert (
        json.loads((home / "out" / "manifest.json").read_text())["recipe"]["max_length"]
        == 512
        != json.loads(first)["recipe"]["max_length"]
    )
    assert outputs.ownership_problem(home / "out", "prepared dataset") is None
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_an_interrupted_prepare_leaves_the_old_folder_and_no_half_one(home, monkeypatch):
    import datasets

    prepare_into(home, "out")
    before = tree(home)

    def interrupted(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", interrupted)
    assert run(["prepare", "recipe.yaml", "-o", "out"], home)[0] == 130
    assert run(["prepare", "recipe.yaml", "-o", "new"], home)[0] == 130
    assert tree(home) == before  # the old folder intact, no `new`, no half folder under any name


# --- train's output_dir ------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """A refusal must come before the data is read and before the model loads."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("train went past its output_dir check")

    monkeypatch.setattr(train_module, "guard", must_not_run)
    monkeypatch.setattr(train_module, "load_prepared", must_not_run)


def fake_checkpoint(folder: Path, step: int | None, *, state_step: int | None = None) -> Path:
    """checkpoint-N as a trainer leaves it (trainer_state.json with its step), or a user's folder so named."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(64))
    if state_step is not None:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": state_step}))
    return path


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"output_dir": "model"}, "output_dir: model: is the input model_name_or_path"),
        ({"output_dir": "model/run"}, "output_dir: model/run: lies inside the input model_name_or_path"),
        ({"output_dir": ".", "model_name_or_path": "model"}, "output_dir: .: contains the input model_name_or_path"),
        (
            {"output_dir": "prepared/run", "prepared": "prepared"},
            "output_dir: prepared/run: lies inside the input prepared",
        ),
        ({"output_dir": "recipe.yaml"}, "output_dir: recipe.yaml: is a file"),
    ],
    ids=["model", "inside_model", "holds_model", "inside_prepared", "a_file"],
)
def test_train_refuses_an_output_dir_that_is_an_input_or_a_file(home, no_training, keys, says):
    (home / "prepared").mkdir()
    write_recipe(home, **keys)
    refused(home, ["train", "recipe.yaml"], says)


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite_output_dir"])
def test_train_keeps_a_users_checkpoint_folder(home, no_training, overwrite):
    fake_checkpoint(home / "run", 2)  # no trainer_state.json: a user's folder, whatever its name
    write_recipe(home, overwrite_output_dir=overwrite)
    refused(home, ["train", "recipe.yaml"], "this run may save checkpoint-2, and run/checkpoint-2 is a folder without")


@pytest.mark.parametrize("resume", [None, True], ids=["fresh", "resuming"])
def test_train_never_writes_through_a_checkpoint_symlink(home, no_training, resume):
    fake_checkpoint(home / "mine", 1, state_step=1)
    fake_checkpoint(home / "run", 1, state_step=1)
    (home / "run" / "checkpoint-2").symlink_to(home / "mine" / "checkpoint-1")
    write_recipe(home, resume_from_checkpoint=resume, overwrite_output_dir=True)
    refused(home, ["train", "recipe.yaml"], "run/checkpoint-2 is a symbolic link, not a checkpoint")


def test_train_keeps_an_earlier_run_unless_told(home, no_training):
    fake_checkpoint(home / "run", 4, state_step=4)
    write_recipe(home)
    refused(home, ["train", "recipe.yaml"], "holds an earlier run (checkpoint-4)")
    (home / "run" / "checkpoint-4").rename(home / "run" / "elsewhere")
    (home / "run" / "model.safetensors").write_bytes(b"weights")
    write_recipe(home, save_strategy="no")
    refused(home, ["train", "recipe.yaml"], "holds an earlier run (model.safetensors)")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from sft_toolkit.assets import build_quickstart_assets

    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))["model"]


def test_overwrite_output_dir_deletes_only_proven_checkpoints(home, tiny_model):
    earlier = fake_checkpoint(home / "run", 1, state_step=1)
    mislabelled = fake_checkpoint(home / "run", 7, state_step=3)  # its state says step 3: not provably checkpoint-7
    torn = fake_checkpoint(home / "run", 9)  # no trainer_state.json
    (home / "run" / "notes.md").write_text("my notes on this run")
    kept = {p: tree(p) for p in (mislabelled, torn)}
    write_recipe(
        home,
        model_name_or_path=str(tiny_model),
        overwrite_output_dir=True,
        max_steps=2,
        save_steps=1,
        save_total_limit=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        report_to="none",
    )
    earlier_weights = (earlier / "model.safetensors").read_bytes()
    code, err = run(["train", "recipe.yaml"], home)
    assert code == 0, err
    assert {p: tree(p) for p in (mislabelled, torn)} == kept  # never counted, rotated or deleted
    assert (home / "run" / "notes.md").read_text() == "my notes on this run"
    # The earlier checkpoint-1 was replaced by this run's, which rotation (save_total_limit 1) then removed.
    assert not earlier.exists() or (earlier / "model.safetensors").read_bytes() != earlier_weights
    assert outputs.checkpoint_step(home / "run" / "checkpoint-2") == 2


def test_rotation_and_replacement_touch_only_proven_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    old, new = fake_checkpoint(run_dir, 1, state_step=1), fake_checkpoint(run_dir, 3, state_step=3)
    os.utime(old, ns=(1, 1))
    fake_checkpoint(tmp_path / "mine", 2, state_step=2)
    (run_dir / "checkpoint-2").symlink_to(tmp_path / "mine" / "checkpoint-2")
    foreign = fake_checkpoint(run_dir, 0)
    mine = tree(tmp_path / "mine")
    outputs.rotate_checkpoints(run_dir, 1, keep=[new])
    assert not old.exists() and new.exists() and foreign.exists() and (run_dir / "checkpoint-2").is_symlink()
    assert tree(tmp_path / "mine") == mine
    for path in (run_dir / "checkpoint-2", foreign):
        with pytest.raises(outputs.InputError, match="not a checkpoint the trainer wrote"):
            outputs.remove_checkpoint(path)
    assert tree(tmp_path / "mine") == mine and foreign.exists()


# --- output files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["add-markers", "chatml", "-o", "data"], "data: is a directory; give a file path (e.g. data/training.jinja)"),
        (["add-markers", "mine.jinja", "-o", "mine.jinja"], "mine.jinja: is the input INPUT"),
        (["add-markers", "chatml", "-o", "conversation.json/x.jinja"], "conversation.json is a file, not a folder"),
        (["check-data", "recipe.yaml", "--report", "data"], "data: is a directory"),
        (["check-data", "recipe.yaml", "--report", "recipe.yaml"], "recipe.yaml: is the input recipe file"),
        (["check-data", "recipe.yaml", "--report", "data/train.jsonl"], "data/train.jsonl: is the input dataset_name"),
        (["check-data", "recipe.yaml", "--report", "model/tokenizer.json"], "is part of the input model_name_or_path"),
        (["show", "conversation.json", "--template", "chatml", "--html", "data"], "data: is a directory"),
        (
            ["show", "conversation.json", "--template", "chatml", "--html", "conversation.json"],
            "is the input CONVERSATION",
        ),
    ],
    ids=[
        "markers_dir",
        "markers_over_input",
        "markers_under_file",
        "report_dir",
        "report_over_recipe",
        "report_over_data",
        "report_in_model",
        "html_dir",
        "html_over_input",
    ],
)
def test_output_files_are_never_written_over_inputs_or_folders(home, argv, says):
    (home / "mine.jinja").write_text(_bundled("chatml"))
    refused(home, argv, says)


def _bundled(name: str) -> str:
    from sft_toolkit.templates import load_template

    return load_template(name).source


def test_a_missing_output_folder_is_created_and_the_file_written_whole(home):
    code, err = run(["add-markers", "chatml", "-o", "new/folder/training.jinja"], home)
    assert code == 0, err
    assert (home / "new" / "folder" / "training.jinja").read_text() == _bundled("chatml")  # chatml is marked
    code, err = run(["check-data", "recipe.yaml", "--report", "reports/data.json"], home)
    assert code == 0, err
    assert json.loads((home / "reports" / "data.json").read_text())["ok"] is True
    assert sorted(p.name for p in (home / "reports").iterdir()) == ["data.json", "data.md"]  # no temporary file


def test_prepare_never_replaces_the_folder_it_runs_in(home):
    write_recipe(
        home, "absolute.yaml", model_name_or_path=str(home / "model"), dataset_name=str(home / "data" / "train.jsonl")
    )
    (home / "empty").mkdir()  # empty, so ownership allows it; renaming the working directory away does not
    before = tree(home)
    code, err = run(["prepare", str(home / "absolute.yaml"), "-o", "."], home / "empty")
    assert code == 2 and ".: is or holds the current directory" in err, err
    assert tree(home) == before
