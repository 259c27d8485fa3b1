"""prepare once, train from the saved dataset: same labels and loss as from raw, mismatches refused by name,
pre-tokenized datasets checked like conversations, no rank re-tokenizes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import datasets
import pytest
import yaml
from test_train import launch_two, recipe_keys, rows_with_long_prompts

from sft_toolkit.assets import build_quickstart_assets
from sft_toolkit.check_data import check_data
from sft_toolkit.cli import main
from sft_toolkit.data import load_rows
from sft_toolkit.prepare import prepare
from sft_toolkit.prepared import load_prepared
from sft_toolkit.problems import InputError
from sft_toolkit.recipe import build_recipe, read_yaml
from sft_toolkit.templates import bundled_path
from sft_toolkit.train import GuardStop, guard, train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_quickstart_assets(tmp_path_factory.mktemp("assets"))


def quiet(_):
    pass


def test_prepare_then_train_gives_the_raw_runs_labels_and_first_loss(assets, tmp_path):
    keys = recipe_keys(
        assets,
        tmp_path,
        rows_with_long_prompts(assets, 0),
        max_length=128,
        packing=True,
        shuffle_dataset=True,
        max_steps=2,
    )
    raw_data = guard(build_recipe(keys)).dataset
    prepare(build_recipe(keys), tmp_path / "prepared")
    saved = datasets.load_from_disk(str(tmp_path / "prepared" / "dataset"))
    for column in ("input_ids", "labels", "seq_lengths"):
        assert saved[column] == raw_data[column]
    # The source rows ride along (bfd packs rows whole: no src_pos, `show` derives it); TRL's trainer keeps only
    # its signature columns, so they cost nothing.
    assert "src_rows" in saved.column_names and "src_pos" not in saved.column_names

    from_raw = train(build_recipe(keys), log=quiet)
    said = []
    from_prepared = train(
        build_recipe({**keys, "prepared": str(tmp_path / "prepared"), "output_dir": str(tmp_path / "run2")}),
        log=said.append,
    )
    assert any("not re-tokenized" in s for s in said)
    assert from_prepared.history[0] == pytest.approx(from_raw.history[0], rel=1e-6)
    assert from_prepared.report.trainable_tokens == from_raw.report.trainable_tokens


@pytest.mark.parametrize(
    "case",
    [{"packing": True, "packing_strategy": "bfd"}, {"packing": False, "truncation_mode": "keep_end"}],
    ids=["bfd", "keep_end"],
)
def test_every_saved_token_points_to_its_source_row_and_position(assets, tmp_path, case):
    rows = rows_with_long_prompts(assets, 2)[-8:]
    keys = recipe_keys(assets, tmp_path, rows, max_length=64, mask_guard="warn", **case)
    _, final = check_data(build_recipe(keys), keep_provenance=True)
    _, whole = check_data(build_recipe({**keys, "packing": False, "max_length": None}))  # each row untruncated
    if case["packing"]:  # bfd packs each row's first max_length tokens whole: a position is its document offset
        assert "src_pos" not in final.column_names
        positions = [[p for n in lengths for p in range(n)] for lengths in final["seq_lengths"]]
    else:
        assert final.features["src_pos"].feature.dtype == "int32"
        positions = final["src_pos"]
    assert final.features["src_rows"].feature.dtype == "int32"
    for ids, src_rows, src_pos in zip(final["input_ids"], final["src_rows"], positions, strict=True):
        assert ids == [whole[r]["input_ids"][p] for r, p in zip(src_rows, src_pos, strict=True)]


@pytest.fixture(scope="module")
def prepared(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mismatch")
    keys = recipe_keys(assets, folder, rows_with_long_prompts(assets, 0), max_length=128, packing=True)
    prepare(build_recipe(keys), folder / "prepared")
    return {**keys, "prepared": str(folder / "prepared")}


def other_template(tmp_path) -> str:
    path = tmp_path / "chatml_edited.jinja"
    path.write_text(bundled_path("chatml").read_text().replace("<|im_start|>", "<|im_start|> "))
    return str(path)


def other_tokenizer(tmp_path, assets) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    tokenizer.add_tokens(["<|unit|>"])
    tokenizer.save_pretrained(tmp_path / "other")
    return str(tmp_path / "other")


MISMATCHES = {
    "max_length": (lambda tmp, assets: {"max_length": 256}, "max_length: recipe 256, prepared 128"),
    "packing_strategy": (
        lambda tmp, assets: {"packing_strategy": "wrapped"},
        "packing_strategy: recipe 'wrapped', prepared 'bfd'",
    ),
    "packing": (lambda tmp, assets: {"packing": False}, "packing: recipe False, prepared True"),
    "mask_guard": (lambda tmp, assets: {"mask_guard": "warn"}, "mask_guard: recipe 'warn', prepared 'reject'"),
    "template": (lambda tmp, assets: {"chat_template_path": other_template(tmp)}, "chat template: recipe sha256"),
    "tokenizer": (lambda tmp, assets: {"model_name_or_path": other_tokenizer(tmp, assets)}, "tokenizer: recipe "),
    "dataset_config": (
        lambda tmp, assets: {"dataset_config": "all"},
        "dataset_config: recipe 'all', prepared '(not set)'",
    ),
}


@pytest.mark.parametrize("name", MISMATCHES)
def test_each_manifest_mismatch_is_rejected_with_the_difference_named(assets, prepared, tmp_path, name):
    change, named = MISMATCHES[name]
    with pytest.raises(InputError, match="prepared with other settings") as err:
        load_prepared(build_recipe({**prepared, **change(tmp_path, assets)}))
    assert named in str(err.value)
    load_prepared(build_recipe(prepared))  # and the unchanged recipe is accepted


def test_a_tokenizer_with_named_templates_prepares_and_each_template_is_in_the_fingerprint(assets, tmp_path):
    """transformers keeps several named templates as a dict (rows with tools render with `tool_use`): prepare
    fingerprints all of them, so a prepared dataset no longer matches once the tool_use template changes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    (model / "additional_chat_templates").mkdir()
    tool_use = model / "additional_chat_templates" / "tool_use.jinja"
    tool_use.write_text(bundled_path("chatml").read_text())
    keys = recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0)[:8], model_name_or_path=str(model))
    keys = {**keys, "chat_template_path": None}
    prepare(build_recipe(keys), tmp_path / "prepared")
    keys["prepared"] = str(tmp_path / "prepared")
    load_prepared(build_recipe(keys))  # the same tokenizer and templates: accepted
    tool_use.write_text(bundled_path("chatml").read_text().replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(InputError, match="chat template: recipe sha256"):
        load_prepared(build_recipe(keys))


def test_a_prepared_dataset_edited_after_prepare_is_rejected(prepared, tmp_path):
    edited = tmp_path / "edited"
    data = datasets.load_from_disk(str(Path(prepared["prepared"]) / "dataset"))
    data.select(range(len(data) - 1)).save_to_disk(str(edited / "dataset"))
    (edited / "manifest.json").write_text((Path(prepared["prepared"]) / "manifest.json").read_text())
    with pytest.raises(InputError, match="changed since prepare wrote it \\(sequences"):
        load_prepared(build_recipe({**prepared, "prepared": str(edited)}))

    wrong = data.map(lambda labels: {"labels": [7 if t != -100 else t for t in labels]}, input_columns="labels")
    wrong.save_to_disk(str(tmp_path / "wrong" / "dataset"))
    (tmp_path / "wrong" / "manifest.json").write_text((Path(prepared["prepared"]) / "manifest.json").read_text())
    with pytest.raises(InputError, match="sequence 0, position \\d+: a trained label differs from its input_id"):
        load_prepared(build_recipe({**prepared, "prepared": str(tmp_path / "wrong")}))


def pretokenized(tmp_path, assets, columns: dict, **keys) -> dict:
    """A user's own tokenized dataset (ids below the tiny tokenizer's 512, which loads in milliseconds)."""
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "tokens"))
    return {
        "model_name_or_path": str(assets["model"]),
        "dataset_name": str(tmp_path / "tokens"),
        "assistant_only_loss": True,
        "max_length": 8,
        "output_dir": str(tmp_path / "run"),
        **keys,
    }


ROWS = {
    "input_ids": [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35], [41, 42] * 6],
    "assistant_masks": [[0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 0, 0], [0] * 10 + [1, 1]],
}


def test_a_pretokenized_zero_mask_row_is_rejected_with_the_row_named(assets, tmp_path, capsys):
    keys = pretokenized(tmp_path, assets, ROWS)
    report, _ = check_data(build_recipe(keys))
    assert report.zero_mask_rows == [
        {"index": 2, "reason": "mask_marks_nothing"},
        {"index": 3, "reason": "all_assistant_tokens_past_max_length"},
    ]
    assert report.truncated_assistant_tokens == 2 and report.max_length_to_keep_all == 12  # lengths vs max_length
    with pytest.raises(GuardStop, match=r"Rows with nothing to train: 2 \(mask_marks_nothing\), 3 "):
        guard(build_recipe(keys))

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(keys))
    assert main(["check-data", str(recipe)]) == 1
    assert "row 2: mask_marks_nothing" in capsys.readouterr().out
    assert main(["prepare", str(recipe), "-o", str(tmp_path / "out")]) == 1
    assert "nothing saved" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_pretokenized_rows_are_labelled_packed_and_refused_as_trl_would_not(assets, tmp_path):
    from trl import SFTConfig, SFTTrainer

    good = {k: [v for i, v in enumerate(col) if i != 2] for k, col in ROWS.items()}
    keys = pretokenized(tmp_path, assets, good, packing=True, max_length=12)
    report, ours = check_data(build_recipe(keys))
    assert report.ok and report.sequences == len(ours) < 3  # packed
    # The same labels and packing as SFTTrainer's own preparation of the same pre-tokenized dataset.
    args = SFTConfig(output_dir=str(tmp_path / "trl"), packing=True, max_length=12, use_cpu=True, report_to="none")
    theirs = SFTTrainer(
        model=str(assets["model"]),
        args=args,
        train_dataset=datasets.load_from_disk(keys["dataset_name"]),
        processing_class=_tokenizer(assets),
    ).train_dataset
    assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]

    no_mask = pretokenized(tmp_path / "a", assets, {"input_ids": ROWS["input_ids"]})
    with pytest.raises(InputError, match="pre-tokenized .* no 'labels' or 'assistant_masks'"):
        check_data(build_recipe(no_mask))
    report, data = check_data(build_recipe({**no_mask, "assistant_only_loss": False, "max_length": None}))
    assert data["labels"] == data["input_ids"]  # continued pretraining on tokens: every token trains

    bad = pretokenized(
        tmp_path / "b", assets, {"input_ids": [[1, 2, 3], [4, 5, 6]], "labels": [[-100, 2, 3], [-100, 9, 6]]}
    )
    with pytest.raises(InputError, match=r"row 1: labels\[1\] is 9 but input_ids\[1\] is 5"):
        check_data(build_recipe(bad))


def _tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


def test_prepare_cli_writes_the_manifest_contract(prepared, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in prepared.items() if k != "prepared"}))
    assert main(["prepare", str(recipe), "-o", str(tmp_path / "out"), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert printed["prepared"] == str(tmp_path / "out") and printed["recipe"] == manifest["recipe"]
    assert manifest["format"] == 1 and manifest["recipe"]["max_length"] == 128
    assert set(manifest["tokenizer"]) >= {"name_or_path", "sha256"} and len(manifest["template"]["sha256"]) == 64
    assert set(manifest["versions"]) == {"sft_toolkit", "trl", "transformers", "datasets"}
    assert manifest["accounting"]["ok"] and manifest["accounting"]["sequences"] == manifest["dataset"]["sequences"]
    # `show DIR` reads the same directory: each sequence's documents and their source rows.
    assert main(["show", str(tmp_path / "out"), "--sequence", "0", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    saved = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))[0]
    assert [d["row"] for d in shown["documents"]] == list(dict.fromkeys(saved["src_rows"]))
    # train --prepared with another max_length: exit 2, the difference named on stderr.
    assert main(["train", str(recipe), "--prepared", str(tmp_path / "out"), "--max_length", "64"]) == 2
    assert "max_length: recipe 64, prepared 128" in capsys.readouterr().err


def test_two_processes_train_from_a_prepared_dataset_without_the_raw_data(assets, tmp_path):
    keys = recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0), max_length=128, max_steps=2)
    prepare(build_recipe(keys), tmp_path / "prepared")
    Path(keys["dataset_name"]).unlink()  # no rank can re-tokenize: the raw rows are gone
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**keys, "prepared": str(tmp_path / "prepared")}))
    proc = launch_two(recipe)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("sequences re-checked; not re-tokenized") == 2  # each rank checked the same data
    assert '"trainable_tokens"' in proc.stdout


def test_two_phase_recipes_base_lm_then_assistant_only_sft(assets, tmp_path):
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "recipes" / "two_phase" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    corpus = make_corpus.write_corpus(tmp_path / "corpus.jsonl", rows=200)

    base = {
        **read_yaml(str(ROOT / "recipes" / "two_phase" / "1_base.yaml")),
        "model_name_or_path": str(assets["model"]),
        "dataset_name": str(corpus),
        "output_dir": str(tmp_path / "base"),
        "max_steps": 2,
    }
    first = train(build_recipe(base), log=quiet)
    assert first.report.trainable_tokens == first.report.tokens  # plain text: every token trains

    sft = {
        **read_yaml(str(ROOT / "recipes" / "two_phase" / "2_sft.yaml")),
        "model_name_or_path": str(tmp_path / "base"),
        "dataset_name": recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 0))["dataset_name"],
        "output_dir": str(tmp_path / "sft"),
        "max_steps": 2,
    }
    prepare(build_recipe(sft), tmp_path / "sft-data")
    second = train(build_recipe({**sft, "prepared": str(tmp_path / "sft-data")}), log=quiet)
    assert 0 < second.report.trainable_tokens < second.report.tokens  # assistant tokens only
    assert (tmp_path / "sft" / "model.safetensors").exists()


def test_plain_text_rows_are_tokenized_as_trl_tokenizes_them(assets, tmp_path):
    from trl import SFTConfig, SFTTrainer

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} km = {i * 1000} m. " * (1 + i % 7)}) + "\n" for i in range(30)))
    keys = {"model_name_or_path": str(assets["model"]), "dataset_name": str(data), "packing": True, "max_length": 32}
    with pytest.raises(
        InputError, match="plain 'text'.* continued pretraining on the text, set assistant_only_loss: false"
    ):
        check_data(build_recipe({**keys, "assistant_only_loss": True}))
    report, ours = check_data(build_recipe({**keys, "assistant_only_loss": False}))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), packing=True, max_length=32, use_cpu=True, report_to="none")
    theirs = SFTTrainer(
        model=str(assets["model"]), args=args, train_dataset=load_rows(str(data)), processing_class=_tokenizer(assets)
    ).train_dataset
    assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
    assert report.trainable_tokens == sum(len(ids) for ids in ours["input_ids"])


def test_prepare_again_into_the_same_directory_replaces_it_and_refuses_foreign_ones(prepared, tmp_path):
    keys = {k: v for k, v in prepared.items() if k != "prepared"}
    prepare(build_recipe(keys), tmp_path / "out")
    prepare(build_recipe({**keys, "max_length": 64, "mask_guard": "warn"}), tmp_path / "out")
    load_prepared(build_recipe({**keys, "max_length": 64, "mask_guard": "warn", "prepared": str(tmp_path / "out")}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="exists and is not a prepared dataset"):
        prepare(build_recipe(keys), tmp_path / "mine")
    without_data = {k: v for k, v in prepared.items() if k != "dataset_name"}
    with pytest.raises(InputError, match="dataset_name is not set; this recipe trains from prepared"):
        check_data(build_recipe(without_data))
    load_prepared(build_recipe(without_data))  # a recipe that names only the prepared data trains from it


def test_repairs_made_at_prepare_time_are_applied_when_training_from_it(assets, tmp_path):
    keys = recipe_keys(
        assets, tmp_path, rows_with_long_prompts(assets, 2), max_length=64, mask_guard="repair", max_length_limit=2048
    )
    result = prepare(build_recipe(keys), tmp_path / "prepared")
    raised = result.manifest["applied"]["max_length"]
    assert raised > 64 and result.manifest["recipe"]["max_length"] == 64
    assert any("max_length 64 ->" in r for r in result.manifest["repairs"])
    recipe = build_recipe({**keys, "prepared": str(tmp_path / "prepared")})
    loaded = load_prepared(recipe)  # sequences longer than 64 pass: the repaired max_length is in force
    assert loaded.recipe.sft.max_length == raised and max(len(ids) for ids in loaded.dataset["input_ids"]) > 64
    assert any(n.startswith("prepare applied: max_length 64 ->") for n in loaded.repairs.notes)


def test_template_without_markers_repaired_at_prepare_is_repaired_alike_at_train(assets, tmp_path):
    source = bundled_path("chatml").read_text()
    source = source[source.index("-#}") + 3 :]  # the header comment, which names the markers
    plain = tmp_path / "chatml_plain.jinja"
    plain.write_text(re.sub(r"\{%-? *(end)?generation *-?%\}", "", source))  # an inference template
    keys = recipe_keys(
        assets,
        tmp_path,
        rows_with_long_prompts(assets, 0),
        max_length=128,
        max_steps=1,
        chat_template_path=str(plain),
        mask_guard="repair",
    )
    result = prepare(build_recipe(keys), tmp_path / "prepared")
    assert any("added {% generation %} markers" in n for n in result.notes)
    said = []
    outcome = train(build_recipe({**keys, "prepared": str(tmp_path / "prepared")}), log=said.append)
    assert any("not re-tokenized" in s for s in said) and outcome.report.trainable_tokens > 0


def test_pretokenized_rows_need_no_template_markers(assets, tmp_path):
    keys = pretokenized(
        tmp_path,
        assets,
        {k: v[:2] for k, v in ROWS.items()},
        chat_template_path=str(ROOT / "tests" / "fixtures" / "templates" / "S002_no_markers.jinja"),
    )
    guarded = guard(build_recipe(keys))  # reject would stop a conversation dataset here
    assert guarded.report.ok and guarded.repairs.notes == ()


def test_dataset_num_proc_saves_in_shards_what_one_process_saves(assets, tmp_path, capsys):
    """With dataset_num_proc: 2 the prepared dataset is written by two processes, in shards (the main process
    doesn't read every token); it holds what one process saves, and `show` reads it."""
    keys = recipe_keys(assets, tmp_path, rows_with_long_prompts(assets, 2), max_length=64, mask_guard="warn")
    prepare(build_recipe(keys), tmp_path / "one")
    prepare(build_recipe({**keys, "dataset_num_proc": 2}), tmp_path / "two")
    one = datasets.load_from_disk(str(tmp_path / "one" / "dataset"))
    two = datasets.load_from_disk(str(tmp_path / "two" / "dataset"))
    assert len(list((tmp_path / "two" / "dataset").glob("*.arrow"))) == 2
    assert one.to_dict() == two.to_dict()
    assert main(["show", str(tmp_path / "two"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == len(one)
