"""Property: for any conversation, a bundled template trains exactly the assistant's output.

Generated conversations (hypothesis) go through the same checks lint runs on its probes: no trained
character outside an assistant turn's output (R002), every assistant turn with content trained (R001),
its end-of-turn trained (R003).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sft_toolkit.lint import _check_probe
from sft_toolkit.masks import TemplateRaised, render
from sft_toolkit.probes import PROBES, Probe
from sft_toolkit.templates import bundled_names, load_template
from sft_toolkit.turns import end_of_turn

# Letters, digits, punctuation, spaces, newlines and some non-ASCII; no control tokens (a user who writes
# '<|im_end|>' into a message is another problem: transformers' sanitize_control_tokens).
TEXT = (
    st.text(
        alphabet=st.characters(
            codec="utf-8",
            categories=("L", "N", "P", "Zs"),
            include_characters="\n\u00e9\u2615",
            exclude_characters="<>[]{}|%#",
        ),
        min_size=1,
        max_size=40,
    )
    .map(str.strip)
    .filter(bool)
)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(TEXT)}]
    texts = [m["content"] for m in messages]
    # Unique, non-nested texts: the checks find each message by searching for its text.
    if len(set(texts)) != len(texts) or any(a != b and a in b for a in texts for b in texts):
        from hypothesis import reject

        reject()
    return messages


@pytest.mark.parametrize("name", bundled_names())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(messages=conversations())
# Found by hypothesis: a one-letter answer also occurs inside Mistral's `[/INST]` markup.
@example(
    messages=[
        {"role": "system", "content": "0"},
        {"role": "user", "content": "2"},
        {"role": "assistant", "content": "N"},
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "3"},
    ]
)
def test_bundled_template_trains_exactly_the_assistant_output(name, messages):
    source = load_template(name).source
    probe = Probe("generated", messages)
    try:
        full = render(source, messages)
    except TemplateRaised:
        return  # the template refuses this conversation (e.g. Gemma 1/2 and a system message)
    eot = end_of_turn(source, PROBES[0], {})
    problems = [
        (rule, msg)
        for rule, _, msg, _, _ in _check_probe(source, probe, full, eot, {})
        if rule in ("R001", "R002", "R003")
    ]
    assert problems == []


def transformers_mask(offsets, spans) -> list[bool]:
    """The loop `apply_chat_template(return_assistant_tokens_mask=True)` runs over a tokenization's offsets
    (transformers 5, tokenization_utils_base.py), written out as the reference."""
    mask, span_idx = [False] * len(offsets), 0
    for token_id, (token_start, token_end) in enumerate(offsets):
        while span_idx < len(spans) and token_start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx == len(spans):
            break
        if token_end > spans[span_idx][0]:
            mask[token_id] = True
    return mask


POSITIONS = st.integers(0, 60)


@settings(max_examples=300, deadline=None)
@given(
    offsets=st.lists(st.tuples(POSITIONS, POSITIONS).map(sorted), max_size=30),
    spans=st.lists(st.tuples(POSITIONS, POSITIONS).map(sorted), max_size=5),
    ordered=st.booleans(),
)
def test_assistant_mask_is_transformers_rule(offsets, spans, ordered):
    """check-data's batch path marks exactly the tokens transformers marks, for offsets in order (every fast
    tokenizer: tokens that share a character, empty tokens, tokens straddling a span's edge, empty spans) and
    for any other offsets and spans (the loop)."""
    from sft_toolkit.masks import assistant_mask

    if ordered:
        offsets, spans = sorted(offsets), sorted(spans, key=lambda s: s[1])
    assert assistant_mask(offsets, spans).tolist() == transformers_mask(offsets, spans)


EDGE_TEXT = st.text(
    alphabet=st.characters(
        codec="utf-8",
        categories=("L", "N", "P", "Zs", "Mn", "So"),
        include_characters="\n\t ~\u00e9\u0301\u2615\U0001f600",
    ),
    max_size=40,
)


@st.composite
def rows_with_spans(draw):
    """A text and generation spans: empty ones, ones that touch, ones at the text's ends; in order, or not (which
    no render writes, and transformers' walk still reads its own way)."""
    text = draw(EDGE_TEXT)
    edges = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    spans = [(edges[i], edges[i + 1]) for i in range(0, len(edges) - 1, 2)]
    return text, draw(st.permutations(spans)) if draw(st.booleans()) else spans


def _edited_tokenizer(tmp_path, name, **parts):
    """The test tokenizer (tests/bad_inputs/tokenizer) with some of its pipeline replaced."""
    import shutil

    from sft_toolkit.tokenizer import load_tokenizer

    folder = tmp_path / name
    shutil.copytree(Path(__file__).parent / "bad_inputs" / "tokenizer", folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec.update(parts)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def edge_tokenizers(tmp_path_factory):
    """Every real vocabulary the tests build, the test tokenizer, one whose normalizer deletes `~` (characters
    no token covers) and one that trims its offsets (GPT-2's ByteLevel `trim_offsets`: tokens of no characters)."""
    from sft_toolkit import offline_tokenizers
    from sft_toolkit.tokenizer import load_tokenizer

    tmp_path = tmp_path_factory.mktemp("edge-tokenizers")
    found = {name: offline_tokenizers.load(name) for name in offline_tokenizers.NAMES}
    found["test"] = load_tokenizer(str(Path(__file__).parent / "bad_inputs" / "tokenizer"))
    found["deletes ~"] = _edited_tokenizer(
        tmp_path, "deleting", normalizer={"type": "Replace", "pattern": {"String": "~"}, "content": ""}
    )
    found["trimmed"] = _edited_tokenizer(
        tmp_path,
        "trimmed",
        post_processor={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    )
    return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(rows_with_spans(), min_size=1, max_size=4))
def test_batch_assistant_mask_is_transformers_rule_on_real_encodings(edge_tokenizers, rows):
    """check-data's batch path marks, row by row, exactly the tokens transformers' walk over the row's offsets
    marks, for every real vocabulary: tokens that share a character (a multi-byte character's byte tokens),
    combining marks, spans that are empty, touch, or start on a character the normalizer deleted or trimming left
    out (read from the offsets then), and spans out of order (walked)."""
    from sft_toolkit.masks import batch_assistant_mask, offsets_in_order

    for name, tokenizer in edge_tokenizers.items():
        backend = tokenizer.backend_tokenizer
        encodings = backend.encode_batch([text for text, _ in rows], add_special_tokens=False)
        expected = [m for e, (_, spans) in zip(encodings, rows) for m in transformers_mask(e.offsets, spans)]
        counts = [len(e.ids) for e in encodings]
        found = batch_assistant_mask(
            encodings, [spans for _, spans in rows], counts, in_order=offsets_in_order(backend)
        )
        assert found.tolist() == expected, name


def test_the_edges_decide_where_they_can_and_the_offsets_decide_elsewhere(edge_tokenizers):
    """Which way a row's mask is found: at its spans' edges; from every offset when an edge is a character no token
    covers, or the spans are out of order."""
    from sft_toolkit.masks import span_token_ranges

    text = "Hello ~world \u2615 done"
    spans = [(text.index("~"), len(text))]
    qwen = edge_tokenizers["qwen2"].backend_tokenizer.encode(text, add_special_tokens=False)
    assert span_token_ranges(qwen, spans, len(qwen.ids)) == [(qwen.char_to_token(text.index("~")), len(qwen.ids))]
    assert span_token_ranges(qwen, [(6, 8), (0, 2)], len(qwen.ids)) is None
    deleting = edge_tokenizers["deletes ~"].backend_tokenizer.encode(text, add_special_tokens=False)
    assert span_token_ranges(deleting, spans, len(deleting.ids)) is None
