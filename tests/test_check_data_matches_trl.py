"""check-data's numbers are the trainer's numbers: compare with the dataset TRL's SFTTrainer really builds."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

from sft_toolkit import offline_tokenizers
from sft_toolkit.check_data import check_data
from sft_toolkit.data import load_rows
from sft_toolkit.recipe import build_recipe
from sft_toolkit.templates import bundled_path


def conversations() -> list[dict]:
    """Rows TRL accepts (every row has assistant tokens), some long enough to be truncated or split."""
    rows = []
    for i in range(24):
        user = f"Question {i}: what is {i} times {i + 3}?" + (" Please explain every step." * (i % 5) * 6)
        turns = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": f"{i} x {i + 3} = {i * (i + 3)}." + " Indeed." * (i % 3) * 10},
        ]
        if i % 4 == 0:
            turns += [
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"Doubled it is {2 * i * (i + 3)}."},
            ]
        if i % 6 == 1:
            turns.insert(0, {"role": "system", "content": "You are a patient maths tutor."})
        rows.append({"messages": turns})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trl")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    tokenizer_dir = offline_tokenizers.cached("qwen2")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=151_936,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    return folder, data, tokenizer_dir, model


CASES = [
    {"packing": False, "max_length": None},
    {"packing": False, "max_length": 96, "truncation_mode": "keep_start"},
    {"packing": False, "max_length": 96, "truncation_mode": "keep_end"},
    {"packing": True, "max_length": 128, "packing_strategy": "bfd"},
    {"packing": True, "max_length": 128, "packing_strategy": "bfd_split"},
    {"packing": True, "max_length": 128, "packing_strategy": "wrapped"},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_labels_equal_sfttrainer(setup, case):
    folder, data, tokenizer_dir, model = setup
    keys = {
        "model_name_or_path": str(tokenizer_dir),
        "dataset_name": str(data),
        "assistant_only_loss": True,
        "chat_template_path": str(bundled_path("chatml")),
        "output_dir": str(folder / "out"),
        **case,
    }
    recipe = build_recipe(keys)
    report, ours = check_data(recipe)

    trainer_args = {k: v for k, v in keys.items() if k not in ("model_name_or_path", "dataset_name")}
    args = SFTConfig(**trainer_args, use_cpu=True, report_to="none")
    tokenizer = offline_tokenizers.load("qwen2")
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_rows(str(data)), processing_class=tokenizer)
    theirs = trainer.train_dataset

    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]
    trained_by_trl = sum(sum(1 for t in labels if t != -100) for labels in theirs["labels"])
    assert report.trainable_tokens == trained_by_trl
    assert report.sequences == len(theirs)
    zero_sequences = sum(all(t == -100 for t in labels) for labels in theirs["labels"])
    assert report.zero_trainable_sequences == zero_sequences
    if not case["packing"]:
        # Nothing lost: every row is either trained or reported as dropped.
        assert report.rows == len(theirs) + report.dropped_rows
    if "seq_lengths" in theirs.column_names:
        assert ours["seq_lengths"] == theirs["seq_lengths"]


def prompt_completions(conversational: bool) -> list[dict]:
    """Prompt/completion rows TRL accepts, conversational (some with a system turn, one two-turn prompt) or text."""
    rows = []
    for i in range(12):
        question = f"Question {i}: what is {i} times {i + 3}?" + " Show the steps." * (i % 4) * 5
        answer = f"{i} x {i + 3} = {i * (i + 3)}." + " Indeed." * (i % 3) * 8
        if conversational:
            prompt = [{"role": "user", "content": question}]
            if i % 5 == 1:
                prompt.insert(0, {"role": "system", "content": "You are a patient maths tutor."})
            if i % 6 == 2:
                prompt += [{"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Go on."}]
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": question, "completion": " " + answer})
    return rows


PROMPT_COMPLETION_CASES = [
    {"conversational": True, "assistant_only_loss": True},
    {"conversational": True, "assistant_only_loss": True, "max_length": 64, "truncation_mode": "keep_end"},
    {"conversational": True, "assistant_only_loss": False, "packing": True, "max_length": 128},
    {"conversational": False, "assistant_only_loss": False, "completion_only_loss": False},
    {"conversational": False, "assistant_only_loss": False, "max_length": 48},
]


@pytest.mark.parametrize("case", PROMPT_COMPLETION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_prompt_completion_labels_equal_sfttrainer(setup, case):
    folder, _, tokenizer_dir, model = setup
    case = dict(case)
    data = folder / f"pc_{case.pop('conversational')}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_completions("True" in data.name)))
    keys = {
        "model_name_or_path": str(tokenizer_dir),
        "dataset_name": str(data),
        "chat_template_path": str(bundled_path("chatml")),
        "output_dir": str(folder / "out"),
        **case,
    }
    report, ours = check_data(build_recipe(keys))

    trainer_args = {k: v for k, v in keys.items() if k not in ("model_name_or_path", "dataset_name")}
    args = SFTConfig(**trainer_args, use_cpu=True, report_to="none")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=load_rows(str(data)), processing_class=offline_tokenizers.load("qwen2")
    )
    theirs = trainer.train_dataset

    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]
    assert report.trainable_tokens == sum(sum(1 for t in labels if t != -100) for labels in theirs["labels"])
    assert report.sequences == len(theirs)
    if not case.get("packing"):  # every row is trained, or reported as dropped (past max_length)
        assert report.rows == len(theirs) + report.dropped_rows == 12
        assert len(report.zero_mask_rows) == report.dropped_rows


def test_eval_split_equals_sfttrainer_eval_dataset_with_its_own_packing(setup):
    """The eval split is prepared as TRL prepares it: packed per `eval_packing` (here: not), not per `packing`."""
    from sft_toolkit.check_data import check_splits

    folder, data, tokenizer_dir, model = setup
    split = folder / "with_test"
    split.mkdir(exist_ok=True)
    rows = data.read_text().splitlines()
    (split / "train.jsonl").write_text("\n".join(rows[:16]) + "\n")
    (split / "test.jsonl").write_text("\n".join(rows[16:]) + "\n")
    keys = {
        "model_name_or_path": str(tokenizer_dir),
        "dataset_name": str(split),
        "assistant_only_loss": True,
        "chat_template_path": str(bundled_path("chatml")),
        "output_dir": str(folder / "out"),
        "packing": True,
        "max_length": 128,
        "eval_packing": False,
        "eval_strategy": "steps",
        "eval_steps": 10,
    }
    report, _, ours = check_splits(build_recipe(keys))

    trainer_args = {k: v for k, v in keys.items() if k not in ("model_name_or_path", "dataset_name")}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**trainer_args, use_cpu=True, report_to="none"),
        train_dataset=load_rows(str(split / "train.jsonl")),
        eval_dataset=load_rows(str(split / "test.jsonl")),
        processing_class=offline_tokenizers.load("qwen2"),
    )
    theirs = trainer.eval_dataset
    assert "seq_lengths" not in theirs.column_names  # not packed
    assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
    assert report.eval.rows == len(rows) - 16 == report.eval.sequences + report.eval.dropped_rows


CITIES = ["Paris", "Zürich", "東京", "São Paulo", "Reykjavík"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def varied_conversations(n: int) -> list[dict]:
    """Rows of the shapes check-data's batch path meets at scale: one to three rounds, system prompts, tool
    calls with their results (and the tool list the template writes), non-ASCII text whose characters become
    several byte-level tokens (a token can straddle a generation span's edge), and answers long enough for
    truncation to cut and packing to place."""
    rows = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        messages = [{"role": "system", "content": f"You answer in {city}'s style ☕."}] if i % 4 == 1 else []
        for turn in range(1 + i % 3):
            messages.append({"role": "user", "content": f"Row {i}, turn {turn}: what about {city}? 🙂" * (1 + i % 2)})
            answer = f"In {city} it is {i % 30} degrees; é → ü." + " More detail follows." * ((i * 7 + turn) % 40)
            messages.append({"role": "assistant", "content": answer})
        row = {"messages": messages, "tools": None}
        if i % 5 == 0:
            call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
            messages[-1:-1] = [
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": f'{{"city": "{city}", "celsius": {i % 30}}}'},
            ]
            row["tools"] = [WEATHER_TOOL]
        rows.append(row)
    return rows


@pytest.mark.parametrize(
    "case",
    [
        {"packing": False, "max_length": 160, "truncation_mode": "keep_start"},
        {"packing": True, "max_length": 256, "packing_strategy": "bfd"},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_labels_equal_sfttrainer_on_hundreds_of_varied_rows(setup, case):
    """check-data's batch path (one tokenizer call per batch, masks from the offsets) against SFTTrainer on 400
    rows with tool calls, non-ASCII text, truncation and packing: the same tokens, labels and counts."""
    folder, _, tokenizer_dir, model = setup
    data = folder / "varied.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in varied_conversations(400)))
    keys = {
        "model_name_or_path": str(tokenizer_dir),
        "dataset_name": str(data),
        "assistant_only_loss": True,
        "chat_template_path": str(bundled_path("chatml")),
        "output_dir": str(folder / "out"),
        **case,
    }
    report, ours = check_data(build_recipe(keys))

    trainer_args = {k: v for k, v in keys.items() if k not in ("model_name_or_path", "dataset_name")}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**trainer_args, use_cpu=True, report_to="none"),
        train_dataset=load_rows(str(data)),
        processing_class=offline_tokenizers.load("qwen2"),
    )
    theirs = trainer.train_dataset
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]
    assert report.trainable_tokens == sum(sum(1 for t in labels if t != -100) for labels in theirs["labels"])
    assert report.sequences == len(theirs)
    assert report.truncated_assistant_tokens > 0  # the case cuts answers: truncation was exercised
    if case["packing"]:
        assert ours["seq_lengths"] == theirs["seq_lengths"]
    else:
        assert report.rows == len(theirs) + report.dropped_rows == 400


def test_batch_path_gives_the_row_paths_records_for_every_kind_of_row(setup, monkeypatch):
    """The batch path's record of every row equals the row path's (`_tokenize_row`, the per-row call of TRL's
    tokenization that the tests above hold against SFTTrainer), and the rows it can't take are handed to that
    path: malformed rows, rows past the size limit, rows under per-message control, rows the template fails on."""
    from datasets import Dataset

    from sft_toolkit import preprocess
    from sft_toolkit.policy import TurnPolicy

    _, _, tokenizer_dir, _ = setup
    monkeypatch.setattr(preprocess, "MAX_ROW_CHARS", 8000)
    rows = varied_conversations(60)
    rows[3]["messages"][0]["role"] = "robot"  # malformed: a problem, named
    rows[7]["messages"] = [{"role": "user", "content": "Only a question?"}]  # no assistant turn
    for message in rows[8]["messages"][1::2]:
        message["content"] = ""  # empty answers
    rows[9]["messages"][-1]["content"] = "x " * 5000  # past MAX_ROW_CHARS
    rows[11]["messages"][-1]["train"] = False  # per-message control: the row path's mask
    rows[13]["messages"][-1]["content"] = "Quoting the question: Row 13, turn 0: what about Reykjavík? 🙂"
    rows[17]["messages"][0]["content"] = "FAIL"  # the template below refuses it
    recipe = build_recipe(
        {
            "model_name_or_path": str(tokenizer_dir),
            "dataset_name": "unused.jsonl",
            "assistant_only_loss": True,
            "chat_template_path": "chatml",
            "output_dir": "unused",
        }
    )
    tokenizer = preprocess.load_tokenizer_for(recipe)
    refuse = "{%- for m in messages if m.content == 'FAIL' %}{{ raise_exception('no FAIL') }}{%- endfor %}"
    template = refuse + tokenizer.chat_template
    dataset = Dataset.from_list(rows)
    by_row = dataset.map(
        preprocess._tokenize_row,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "template": template, "assistant_only_loss": True, "policy": TurnPolicy()},
    )
    handed_over = []
    row_path = preprocess._tokenize_row
    monkeypatch.setattr(
        preprocess,
        "_tokenize_row",
        lambda example, index, **kw: handed_over.append(index) or row_path(example, index, **kw),
    )
    batched = preprocess.tokenize(dataset, tokenizer, template, recipe.sft)

    assert batched.to_list() == by_row.to_list()
    assert set(handed_over) == {3, 9, 11, 17}
    records = batched.to_list()
    assert records[3]["problem"] and records[17]["reason"].startswith(preprocess.TEMPLATE_ERROR)
    assert records[7]["reason"] == preprocess.NO_ASSISTANT_TURN
    assert records[8]["reason"] == preprocess.EMPTY_ASSISTANT_CONTENT
    assert records[9]["reason"].startswith(preprocess.ROW_TOO_LARGE)


def benchmark_conversations(path, n: int) -> None:
    """The first `n` rows of `benchmarks/check_data.py`'s synthetic conversations (1-4 turns, system prompts,
    log-normal lengths, ~11% of the assistant tokens past max_length 1024)."""
    import importlib.util
    from pathlib import Path

    source = Path(__file__).resolve().parent.parent / "benchmarks" / "check_data.py"
    spec = importlib.util.spec_from_file_location("benchmark_check_data", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_dataset(path, n)


@pytest.mark.parametrize(
    "case",
    [{"packing": False}, {"packing": True, "packing_strategy": "bfd"}],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_check_data_and_prepare_equal_sfttrainer_on_the_benchmarks_rows(setup, tmp_path, case):
    """At the largest size CI affords (2000 of the benchmark's rows, ~1.1M tokens, the real Qwen2 vocabulary, two
    batches of the batch path): check-data's final dataset and the one `prepare` saves hold SFTTrainer's input_ids,
    labels and seq_lengths, and the report counts its sequences and trainable tokens."""
    from datasets import load_from_disk

    from sft_toolkit.prepare import prepare

    _, _, tokenizer_dir, model = setup
    data = tmp_path / "benchmark.jsonl"
    benchmark_conversations(data, 2000)
    keys = {
        "model_name_or_path": str(tokenizer_dir),
        "dataset_name": str(data),
        "assistant_only_loss": True,
        "chat_template_path": str(bundled_path("chatml")),
        "max_length": 1024,
        "output_dir": str(tmp_path / "out"),
        "mask_guard": "warn",
        **case,
    }
    report, ours = check_data(build_recipe(keys))
    prepared = prepare(build_recipe(keys), tmp_path / "prepared")
    saved = load_from_disk(str(prepared.path / "dataset"))

    trainer_args = {k: v for k, v in keys.items() if k not in ("model_name_or_path", "dataset_name", "mask_guard")}
    theirs = SFTTrainer(
        model=model,
        args=SFTConfig(**trainer_args, use_cpu=True, report_to="none"),
        train_dataset=load_rows(str(data)),
        processing_class=offline_tokenizers.load("qwen2"),
    ).train_dataset
    columns = ["input_ids", "labels"] + (["seq_lengths"] if case["packing"] else [])
    for name in columns:
        expected = theirs[name]
        assert ours[name] == expected and saved[name] == expected, name
    trainable = sum(sum(1 for t in labels if t != -100) for labels in theirs["labels"])
    for counted in (report, prepared.report):
        assert counted.trainable_tokens == trainable and counted.sequences == len(theirs)
        assert counted.truncated_assistant_tokens > 0  # max_length cut answers: truncation was exercised
    if not case["packing"]:
        assert report.rows == len(theirs) + report.dropped_rows == 2000 and report.dropped_rows > 0


def test_batch_encodings_equal_the_tokenizer_call_whatever_the_backend_was_left_with():
    """The batch path reads the Rust encodings straight from the backend only when the tokenizer's own call would
    change nothing: a backend left truncating (transformers switches that off for a call without truncation)
    goes through the call, and gets every token."""
    from sft_toolkit import preprocess

    tokenizer = offline_tokenizers.load("qwen2")
    texts = ["<|im_start|>user\nHello, world: é ☕<|im_end|>\n", "x"]
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [e.ids for e in preprocess._encodings(tokenizer, texts)] == expected
    tokenizer.backend_tokenizer.enable_truncation(2)
    assert [e.ids for e in preprocess._encodings(tokenizer, texts)] == expected
