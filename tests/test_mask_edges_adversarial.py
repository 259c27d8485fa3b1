"""Adversarial: check-data's mask read at the generation spans' edges equals transformers' walk over every offset,
for `tokenizers` pipelines built to break the premise the edges rest on (a tokenization's offsets are in order).

check-data marks the tokens TRL trains on without reading a row's offsets into Python (`masks.batch_assistant_mask`
and `masks.span_token_ranges`). That is only right where the offsets are in order, so these tests build pipelines
out of every `tokenizers` part that moves offsets: normalizers that expand, delete or case-fold characters (NFKC
ligatures and compatibility characters, 'İ', `Replace` with longer and empty content, `Prepend`, `Strip`,
`BertNormalizer`), pre-tokenizers that add or split spaces (ByteLevel's and Metaspace's prefix, Split in every
behaviour, Digits, Punctuation, UnicodeScripts), BPE with byte fallback, WordPiece, Unigram and WordLevel models,
added tokens with lstrip/rstrip/single_word/normalized, and post-processors that trim offsets; and texts that mix
those characters with whitespace runs, newlines and added-token strings. The premise fails for two kinds of pipeline,
and the edges then mark other tokens than the walk: a post-processor that trims offsets, and added tokens that strip
the whitespace around them. `masks.offsets_in_order` says so for both, and their rows are walked.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mask_properties import transformers_mask
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from sft_toolkit.masks import batch_assistant_mask, offsets_in_order, span_token_ranges

ADDED_SPECIAL = ["<|im_start|>", "<|im_end|>"]
# Added tokens that are not special, one per option that changes where an added token matches and what it covers.
ADDED = [
    AddedToken("<tool>", normalized=False),
    AddedToken("call", single_word=True, normalized=True),
    AddedToken(" ab", normalized=True),
    AddedToken("FI", normalized=False),
]
# Added tokens that take in the whitespace around them (Phi-3's chat tokens strip on the right), and a newline that is
# an added token of its own.
STRIPPING = [
    AddedToken("<|im_end|>", rstrip=True, special=True),
    AddedToken("<tool>", lstrip=True, rstrip=True, special=True),
    AddedToken("\n", special=True),
]

# Characters that normalizers expand, fold, decompose or delete, spaces the pipeline may add or trim, and characters
# whose bytes split into several tokens.
CHARACTERS = [
    "a",
    "b",
    "x",
    "A",
    "I",
    "7",
    "42",
    ".",
    ",",
    "'s",
    "~",
    "\u0130",  # İ: lowercases to 'i' + a combining dot
    "\u1e9e",  # ẞ: lowercases to ß
    "\ufb01",  # ﬁ: NFKC 'fi'
    "\ufb03",  # ﬃ
    "\u00a8",  # ¨: NFKC ' ' + combining diaeresis (a space written for one character)
    "\u00b4",  # ´: NFKC ' ' + combining acute
    "\u00b8",  # ¸: NFKC ' ' + combining cedilla (not in the training corpus: its bytes stay apart)
    "\u02d8",  # ˘: NFKC ' ' + combining breve
    "\u2474",  # ⑴: NFKC '(1)'
    "\u33c2",  # ㏂: NFKC 'a.m.'
    "\u00bd",  # ½: NFKC '1⁄2'
    "\u2026",  # …: NFKC '...'
    "\uff71",  # halfwidth katakana
    "\u2126",  # Ohm sign: NFKC Omega
    "\u00e9",
    "e\u0301",
    "\u0301",
    "\u2615",
    "\U0001f600",
    "\u4e2d",  # a CJK character: BertNormalizer writes spaces around it
    "\u00ad",  # soft hyphen: BertNormalizer deletes it
    "\u200b",
    "\ufeff",
    "\x00",
    " ",
    "  ",
    "\t",
    "\n",
    " \n",
    "\n\n",
    "\u00a0",
    "\u3000",
    *ADDED_SPECIAL,
    *(token.content for token in ADDED),
    # as chat templates write them
    "<|im_start|>assistant\n",
    "<|im_end|>\n",
    " <tool> \n",
]


@st.composite
def rows(draw):
    """A text made of CHARACTERS, and generation spans whose edges fall anywhere, but often where two pieces meet
    (an added token's edge, a character a normalizer rewrote): empty, touching, at the text's ends, in order."""
    pieces = draw(st.lists(st.sampled_from(CHARACTERS), max_size=16))
    text = "".join(pieces)
    joints = sorted({0, len(text), *itertools.accumulate(map(len, pieces))})
    edge = st.one_of(st.sampled_from(joints), st.integers(0, len(text)))
    edges = sorted(draw(st.lists(edge, max_size=6)))
    return text, [(edges[i], edges[i + 1]) for i in range(0, len(edges) - 1, 2)]


CORPUS = [
    "<|im_start|>user\nHello world, call <tool> now.<|im_end|>\n<|im_start|>assistant\nSure: 42 ab ﬁle!<|im_end|>\n",
    "İstanbul ẞtraße café e\u0301 ☕ 😀 中文 ｱ ⑴ ½ … ¨ ´ ~x~ FI fi\t\ttab\n\nnew  lines\u3000and\u00a0spaces",
] * 3


def _bpe_byte_level():
    model = models.BPE()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    return model, trainer


def _bpe_byte_fallback():
    # Metaspace-style BPE with the 256 byte tokens of Llama 2 / Mistral v0.3 (`byte_fallback`).
    model = models.BPE(unk_token="<unk>", byte_fallback=True)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", *bytes_], show_progress=False)
    return model, trainer


def _wordpiece():
    model = models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=8)
    return model, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)


def _unigram():
    model = models.Unigram()
    return model, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False
    )


def _wordlevel():
    model = models.WordLevel(unk_token="[UNK]")
    return model, trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False)


NFKC_EXPANDING = normalizers.Sequence(
    [
        normalizers.NFKC(),
        normalizers.Lowercase(),
        normalizers.Replace("~", "  ab"),  # one character becomes four, two of them spaces
        normalizers.Replace("x", ""),  # a character no token covers
        normalizers.Strip(),
    ]
)
GPT2_REGEX = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# name -> (model and trainer, normalizer, pre-tokenizer, post-processor[, added tokens]). Byte-level BPE only with a
# pre-tokenizer that ends in ByteLevel (its alphabet); the other models with any.
PIPELINES = {
    "byte-level, prefix space": (_bpe_byte_level, None, pre_tokenizers.ByteLevel(add_prefix_space=True), None),
    "byte-level, prefix space, trimmed (GPT-2 style)": (
        _bpe_byte_level,
        None,
        pre_tokenizers.ByteLevel(add_prefix_space=True),
        processors.ByteLevel(trim_offsets=True),
    ),
    "byte-level, trimmed, no prefix space (GPT-2)": (
        _bpe_byte_level,
        None,
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        processors.ByteLevel(trim_offsets=True),
    ),
    "NFKC expanding, byte-level, Roberta trimmed": (
        _bpe_byte_level,
        NFKC_EXPANDING,
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False),
    ),
    "NFKC expanding, byte-level untrimmed, template": (
        _bpe_byte_level,
        NFKC_EXPANDING,
        pre_tokenizers.ByteLevel(add_prefix_space=True),
        processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 0)]),
            ]
        ),
    ),
    "NFKD, split in every behaviour, byte-level without regex": (
        _bpe_byte_level,
        normalizers.Sequence([normalizers.NFKD(), normalizers.Replace(Regex(r"\s+"), " ")]),
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(GPT2_REGEX, behavior="isolated"),
                pre_tokenizers.Split(Regex(r"\d"), behavior="merged_with_previous"),
                pre_tokenizers.Split(",", behavior="merged_with_next"),
                pre_tokenizers.Split(Regex(r"\n+"), behavior="contiguous"),
                pre_tokenizers.Split("~", behavior="removed"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        processors.ByteLevel(trim_offsets=False),
    ),
    "lowercase, Metaspace always, byte fallback": (
        _bpe_byte_fallback,
        normalizers.Lowercase(),
        pre_tokenizers.Metaspace(prepend_scheme="always", split=True),
        processors.TemplateProcessing(
            single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 0), ("<|im_end|>", 1)]
        ),
    ),
    "prepend and replace, Metaspace first, byte fallback": (
        _bpe_byte_fallback,
        normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581"), normalizers.Replace("\u2615", "")]
        ),
        pre_tokenizers.Metaspace(prepend_scheme="first", split=False),
        None,
    ),
    "BERT": (
        _wordpiece,
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True),
        pre_tokenizers.BertPreTokenizer(),
        processors.BertProcessing(("[SEP]", 1), ("[CLS]", 0)),
    ),
    "NFKD strip accents, digits, punctuation, WordPiece": (
        _wordpiece,
        normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()]),
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.Punctuation(behavior="isolated"),
            ]
        ),
        None,
    ),
    "NFKC expanding, unicode scripts, Unigram": (
        _unigram,
        NFKC_EXPANDING,
        pre_tokenizers.Sequence([pre_tokenizers.UnicodeScripts(), pre_tokenizers.Metaspace()]),
        None,
    ),
    "NFKC expanding, whitespace, Unigram, trimmed": (
        _unigram,
        NFKC_EXPANDING,
        pre_tokenizers.Whitespace(),
        processors.ByteLevel(trim_offsets=True),
    ),
    "whitespace-keeping split, WordLevel, trimmed": (
        _wordlevel,
        normalizers.NFKC(),
        pre_tokenizers.Split(Regex(r"\S+\s*"), behavior="isolated"),
        processors.Sequence([processors.ByteLevel(trim_offsets=True), processors.TemplateProcessing(single="$A")]),
    ),
    "byte-level, stripping added tokens": (
        _bpe_byte_level,
        None,
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        None,
        STRIPPING,
    ),
    "NFKC expanding, whitespace, WordPiece, stripping added tokens": (
        _wordpiece,
        NFKC_EXPANDING,
        pre_tokenizers.Whitespace(),
        None,
        STRIPPING,
    ),
}


def _build(model_and_trainer, normalizer, pre_tokenizer, post_processor, added=ADDED):
    model, trainer = model_and_trainer()
    tokenizer = Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens(ADDED_SPECIAL)
    for token in added:
        (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return tokenizer


class Pipelines(dict):
    """Tokenizers by name, shown by name only in a failure report."""

    def __repr__(self):
        return f"Pipelines({list(self)})"


@pytest.fixture(scope="module")
def pipelines():
    """PIPELINES built, and the real vocabularies (whose offsets must take the edges' fast path)."""
    from sft_toolkit import offline_tokenizers

    built = Pipelines((name, _build(*parts)) for name, parts in PIPELINES.items())
    for name in offline_tokenizers.NAMES:
        built[name] = offline_tokenizers.load(name).backend_tokenizer
    return built


def _in_order(offsets) -> bool:
    return all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(offsets, offsets[1:]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(rows(), min_size=1, max_size=3))
def test_the_mask_is_transformers_walk_for_every_pipeline(pipelines, batch):
    """For every pipeline, check-data's mask (edges where `offsets_in_order`, else the walk) marks exactly the
    tokens transformers' walk over the row's offsets marks."""
    for name, tokenizer in pipelines.items():
        encodings = tokenizer.encode_batch([text for text, _ in batch], add_special_tokens=False)
        spans = [row_spans for _, row_spans in batch]
        expected = [m for e, s in zip(encodings, spans) for m in transformers_mask(e.offsets, s)]
        found = batch_assistant_mask(
            encodings, spans, [len(e.ids) for e in encodings], in_order=offsets_in_order(tokenizer)
        )
        assert found.tolist() == expected, name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=rows())
def test_offsets_are_in_order_where_offsets_in_order_says_so(pipelines, row):
    """The premise itself: every pipeline `offsets_in_order` lets take the edges writes offsets whose starts and
    ends are both non-decreasing, whatever its normalizer, pre-tokenizer, model and added tokens do, when encoding
    as check-data and `apply_chat_template` do (`add_special_tokens=False`; the special tokens a post-processor adds
    have offsets (0, 0) wherever they stand)."""
    text, _ = row
    for name, tokenizer in pipelines.items():
        if offsets_in_order(tokenizer):
            assert _in_order(tokenizer.encode(text, add_special_tokens=False).offsets), name


def test_offsets_in_order_keeps_the_real_vocabularies_on_the_edges(pipelines):
    """Every real vocabulary has offsets in order, and an ordinary chat row is read at its spans' edges."""
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4, caf\u00e9 \u2615.<|im_end|>\n"
    answer = text.index("It is")
    spans = [(answer, text.index("<|im_end|>", answer) + len("<|im_end|>\n"))]
    for name in ("qwen2", "llama3", "mistral_tekken", "mistral_v3"):
        tokenizer = pipelines[name]
        assert offsets_in_order(tokenizer), name
        encoding = tokenizer.encode(text, add_special_tokens=False)
        ranges = span_token_ranges(encoding, spans, len(encoding.ids))
        assert ranges is not None, name
        marked = [i for first, stop in ranges for i in range(first, stop)]
        assert marked == [i for i, m in enumerate(transformers_mask(encoding.offsets, spans)) if m], name


def test_trimmed_offsets_break_the_premise_and_are_walked(pipelines):
    """A post-processor that trims offsets writes them out of order: ByteLevel's prefix space before the text after
    an added token shares that text's first character, and trimming moves the space's token past it. The edges
    then mark the trailing newline of a turn that transformers' walk does not, so those rows are walked."""
    tokenizer = pipelines["byte-level, prefix space, trimmed (GPT-2 style)"]
    text = "<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\n"
    spans = [(text.index("hi"), text.index("<|im_start|>user"))]
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert not _in_order(encoding.offsets)
    assert not offsets_in_order(tokenizer)
    expected = transformers_mask(encoding.offsets, spans)
    edges = span_token_ranges(encoding, spans, len(encoding.ids))
    assert [i for first, stop in edges for i in range(first, stop)] != [i for i, m in enumerate(expected) if m]
    found = batch_assistant_mask([encoding], [spans], [len(encoding.ids)], in_order=offsets_in_order(tokenizer))
    assert found.tolist() == expected


def test_nfkc_space_and_trimming_break_the_premise(pipelines):
    """The same without added tokens: NFKC writes '¸' as a space and a combining mark, both at the '¸', and
    RobertaProcessing trims the space's token past it: a span of the '¸' alone marks nothing in transformers' walk,
    and its second byte's token at the edges."""
    tokenizer = pipelines["NFKC expanding, byte-level, Roberta trimmed"]
    text = "a\u00b8b"
    spans = [(1, 2)]
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert not _in_order(encoding.offsets)
    assert not offsets_in_order(tokenizer)
    expected = transformers_mask(encoding.offsets, spans)
    edges = span_token_ranges(encoding, spans, len(encoding.ids))
    assert [i for first, stop in edges for i in range(first, stop)] != [i for i, m in enumerate(expected) if m]
    found = batch_assistant_mask([encoding], [spans], [len(encoding.ids)], in_order=offsets_in_order(tokenizer))
    assert found.tolist() == expected


def test_stripping_added_tokens_break_the_premise(pipelines):
    """An added token that strips the whitespace after it (`rstrip`) takes in a newline that is an added token of its
    own, which follows with offsets inside it: an empty span right before that newline's end marks only the stripping
    token in transformers' walk, and the newline's token too at the edges."""
    tokenizer = pipelines["byte-level, stripping added tokens"]
    text = "hi<|im_end|>\n\nok"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert not _in_order(encoding.offsets)
    assert not offsets_in_order(tokenizer)
    spans = [(text.index("ok") - 1, text.index("ok") - 1)]
    expected = transformers_mask(encoding.offsets, spans)
    edges = span_token_ranges(encoding, spans, len(encoding.ids))
    assert [i for first, stop in edges for i in range(first, stop)] != [i for i, m in enumerate(expected) if m]
    found = batch_assistant_mask([encoding], [spans], [len(encoding.ids)], in_order=offsets_in_order(tokenizer))
    assert found.tolist() == expected
