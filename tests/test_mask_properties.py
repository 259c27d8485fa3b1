"""Property: for any conversation, a bundled template trains exactly the assistant's output.

Generated conversations (hypothesis) go through the same checks lint runs on its probes: no trained
character outside an assistant turn's output (R002), every assistant turn with content trained (R001),
its end-of-turn trained (R003).
"""

from __future__ import annotations

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


ROW = st.tuples(
    st.lists(st.tuples(POSITIONS, POSITIONS).map(sorted), max_size=20),
    st.lists(st.tuples(POSITIONS, POSITIONS).map(sorted), max_size=4),
    st.booleans(),
    st.integers(-4, 8),
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(ROW, max_size=6))
@example(rows=[([(0, 5)], [], True, 0), ([(6, 7)], [(0, 10)], True, 0)])  # in order only if rows overlap
@example(rows=[([(0, 3)], [], True, -2), ([(1, 2)], [(0, 5)], True, 0)])  # a token past its text's width
def test_batch_assistant_mask_is_each_rows_own_mask(rows):
    """The batch path's one search over a whole batch marks, row by row, what the row's own mask marks:
    rows without tokens or spans, rows whose spans would match the next row's tokens if positions weren't
    shifted apart, rows out of order (the batch falls back to the rows' own masks), and a text wider than
    every offset in it."""
    from sft_toolkit.masks import assistant_mask, batch_assistant_mask

    shaped = []
    for offsets, spans, ordered, slack in rows:
        if ordered:
            offsets, spans = sorted(offsets), sorted(spans, key=lambda s: s[1])
        width = max(max([end for _, end in offsets + spans], default=0) + slack, 0)
        shaped.append((offsets, spans, width))
    expected = [m for offsets, spans, _ in shaped for m in assistant_mask(offsets, spans).tolist()]
    found = batch_assistant_mask(
        [p for offsets, _, _ in shaped for token in offsets for p in token],
        [len(offsets) for offsets, _, _ in shaped],
        [p for _, spans, _ in shaped for span in spans for p in span],
        [len(spans) for _, spans, _ in shaped],
        [width for _, _, width in shaped],
    )
    assert found.tolist() == expected
