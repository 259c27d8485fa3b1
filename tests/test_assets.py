"""The CPU quickstart's local assets: learnable data, a tiny tokenizer, a tiny model (sft_toolkit.assets)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from sft_toolkit import assets
from sft_toolkit.templates import bundled_names

ROOT = Path(__file__).resolve().parents[1]
ANSWER = re.compile(r"^(\d+) (\S+) = (\d+) (\S+)\.$|^(\d+) ([+-]) (\d+) = (-?\d+)\.$")
FACTORS = {(a, b): f for a, _, b, _, f in assets._UNITS}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return assets.build_quickstart_assets(tmp_path_factory.mktemp("quickstart"))


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["model"])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------------------------------
# Data


def test_same_seed_same_rows_other_seed_other_rows():
    assert assets.arithmetic_conversations(300, 7) == assets.arithmetic_conversations(300, 7)
    assert assets.arithmetic_conversations(300, 7) != assets.arithmetic_conversations(300, 8)


def test_rows_are_chats_with_correct_answers_in_the_fixed_format():
    rows = assets.arithmetic_conversations(500, 0)
    systems = two_turn = 0
    for row in rows:
        messages = row["messages"]
        if messages[0]["role"] == "system":
            systems += 1
            messages = messages[1:]
        assert [m["role"] for m in messages] in (["user", "assistant"], ["user", "assistant"] * 2)
        two_turn += len(messages) == 4
        for answer in (m["content"] for m in messages if m["role"] == "assistant"):
            m = ANSWER.match(answer)
            assert m, answer
            if m.group(1):  # a unit conversion, either direction
                value, src, result, dst = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
                if (src, dst) in FACTORS:
                    assert result == value * FACTORS[src, dst], answer
                else:
                    assert value == result * FACTORS[dst, src], answer
            else:
                x, op, y, z = int(m.group(5)), m.group(6), int(m.group(7)), int(m.group(8))
                assert z == (x + y if op == "+" else x - y), answer
    assert 100 < systems < 250 and 75 < two_turn < 200
    assert len({r["messages"][-2]["content"] for r in rows}) > 400  # varied questions


def test_write_dataset_writes_jsonl(tmp_path):
    path = assets.write_dataset(tmp_path / "sub" / "d.jsonl", 20, 3)
    assert _rows(path) == assets.arithmetic_conversations(20, 3)


# --------------------------------------------------------------------------------------------------
# Tokenizer


def test_special_tokens_are_single_ids(tokenizer):
    for i, token in enumerate(assets.SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == i
        assert tokenizer.encode(f"x{token}y", add_special_tokens=False)[1:-1] == [i]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi", add_special_tokens=False)
    assert len(tokenizer) <= 512


def test_rendered_conversations_round_trip(built, tokenizer):
    texts = assets.render_conversations(_rows(built["train"])[:300] + _rows(built["eval"]))
    for text in texts:
        assert text.count("<|im_start|>") >= 2
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode("Ünïcode ✓ 12 + 7 = 19.\n\t")) == "Ünïcode ✓ 12 + 7 = 19.\n\t"


def test_tokenizer_training_is_deterministic(tmp_path):
    texts = assets.render_conversations(assets.arithmetic_conversations(200, 5))
    a = assets.train_tokenizer(texts, tmp_path / "a", vocab_size=400)
    b = assets.train_tokenizer(texts, tmp_path / "b", vocab_size=400)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


@pytest.mark.skipif("chatml" not in bundled_names(), reason="templates/chatml.jinja not present")
def test_chat_template_is_chatml_and_masks_the_answers(built, tokenizer):
    from sft_toolkit.templates import load_template

    assert tokenizer.chat_template == load_template("chatml").source
    messages = _rows(built["train"])[0]["messages"]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    answers = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert tokenizer.decode(trained) == answers


# --------------------------------------------------------------------------------------------------
# Model and the whole build


def test_model_loads_and_gives_vocab_sized_logits(built, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built["model"])
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings and model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    size = sum(p.stat().st_size for p in built["model"].iterdir())
    assert size < 5 * 1024 * 1024


def test_build_is_idempotent_and_cli_prints_paths(built, capsys):
    root = built["model"].parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    spec = importlib.util.spec_from_file_location(
        "build_quickstart_assets", ROOT / "scripts" / "build_quickstart_assets.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(root)]) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert {k: Path(v) for k, v in printed.items()} == built
    assert len(_rows(built["train"])) == 2000 and len(_rows(built["eval"])) == 200
    assert _rows(built["eval"]) != _rows(built["train"])[:200]
