"""The preprocessing `SFTTrainer` runs, step for step, with every row and token accounted for.

TRL's `SFTTrainer._prepare_dataset` tokenizes conversations with `apply_chat_template(...,
return_assistant_tokens_mask=True)`, builds `labels`, truncates (or packs) and silently filters rows
left with nothing to train; one row without assistant tokens aborts the whole run with an error that
names no row. We need the opposite: per-row reasons, and counts of what truncation and packing cost.
So we drive TRL's own pieces (`trl.data_utils._tokenize`, its template selection, `pack_dataset`) in
the same order with the same arguments, and carry extra columns through packing where needed: the source
row and position of every token (`provenance_columns`). `tests/test_check_data_matches_trl.py` proves the
result is what the trainer sees, token for token. Chat rows go through the same steps a batch at a time where the tokenizer
allows it (`_tokenize_rows`: one tokenizer call per batch, masks by transformers' rule from the offsets),
because per row, Python around the tokenizer (transformers' token-by-token mask loop, a second render for
content coverage) costs about as much as the tokenizer itself; the tests hold that path to TRL's too.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import math
from pathlib import Path

import jinja2

from . import coverage, formats
from . import policy as control
from .formats import RowFormat
from .masks import (
    RenderLimit,
    TemplateRaised,
    batch_assistant_mask,
    normalize_messages,
    offsets_in_order,
    render,
    template_error_text,
)
from .probes import text_of
from .problems import InputError
from .templates import bundled_names, load_template

# Why a row ends with zero trainable tokens (stable strings: JSON consumers match on them).
NO_ASSISTANT_TURN = "no_assistant_turn"
EMPTY_ASSISTANT_CONTENT = "empty_assistant_content"
TEMPLATE_MARKS_NOTHING = "template_marks_nothing"
TEMPLATE_ERROR = "template_error"
PAST_MAX_LENGTH = "all_assistant_tokens_past_max_length"
ALL_TURNS_SWITCHED_OFF = "all_turns_switched_off"
MASK_MARKS_NOTHING = "mask_marks_nothing"  # a pre-tokenized row whose labels / assistant_masks mark no token
EMPTY_COMPLETION = "empty_completion"  # a prompt/completion row whose completion has no content
ROW_TOO_LARGE = "row_too_large"  # more text than MAX_ROW_CHARS: not tokenized

# Tokenizing a row costs time and memory in proportion to its text (about 220 bytes of peak memory per
# character with the Qwen2 vocabulary, 3-4 s for 2 million characters: `python benchmarks/render_bounds.py
# --large 2000000`), charged to the row, not to the template's render budget. A row with more characters of
# text than this (every string in its messages and tools; ~500k tokens, four times a 128k context) is not
# tokenized: it is reported as a row with nothing to train (ROW_TOO_LARGE), named and counted like the others,
# instead of stopping the dataset. Read at call time (tests lower it).
MAX_ROW_CHARS = 2_000_000

# Whether each row's mask is also held against its assistant text (content coverage, `_coverage`). Read at call
# time: `benchmarks/check_data.py --coverage-cost` turns it off to measure what the check costs.
CHECK_COVERAGE = True

KNOWN_ROLES = {"system", "user", "assistant", "tool", "developer", "ipython", "function"}


def load_tokenizer_for(recipe):
    """The tokenizer `SFTTrainer` would use: from `model_name_or_path`, with `chat_template_path` applied.

    `chat_template_path` may also name a bundled template (e.g. `chatml`): an extension of TRL's key.
    """
    from .data import looks_local
    from .tokenizer import load_tokenizer

    model = recipe.model.model_name_or_path
    if looks_local(model) and not Path(model).expanduser().exists():
        raise InputError(
            f"{recipe.source}: model_name_or_path: {model}: no such directory (a local model directory or a hub id)"
        )
    try:
        tokenizer = load_tokenizer(
            model, revision=recipe.model.model_revision, trust_remote_code=recipe.sft.trust_remote_code
        )
    except InputError as err:
        raise InputError(f"{recipe.source}: model_name_or_path: {err}") from None
    path = recipe.sft.chat_template_path
    if path:
        if path in bundled_names() or path.endswith((".jinja", ".j2")):
            try:
                tokenizer.chat_template = load_template(path).source
            except InputError as err:
                raise InputError(f"{recipe.source}: chat_template_path: {err}") from None
        else:
            raise InputError(
                f"{recipe.source}: chat_template_path: {path!r} must be a .jinja file or a bundled template "
                f"name ({', '.join(bundled_names())}); cloning another tokenizer's template is not supported"
            )
    _set_eos_token(tokenizer, recipe)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _set_eos_token(tokenizer, recipe) -> None:
    """SFTConfig.eos_token replaces the tokenizer's before SFTTrainer prepares the data (the template's
    `eos_token` and the end of plain-text rows), so the toolkit's preparation applies it first too."""
    eos = recipe.sft.eos_token
    if eos is None:
        return
    if eos not in tokenizer.get_vocab():
        raise InputError(
            f"{recipe.source}: eos_token: {eos!r} is not in the vocabulary of "
            f"{recipe.model.model_name_or_path}; give one of its tokens (e.g. the template's end of turn)"
        )
    tokenizer.eos_token = eos


def training_template(tokenizer, sft) -> str | None:
    """The template the trainer renders with: TRL swaps in its own training template for a few known models."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not tokenizer.chat_template:
        raise InputError(
            "the tokenizer has no chat template; set chat_template_path (a .jinja file or a bundled name)"
        )
    if isinstance(tokenizer.chat_template, dict) and "default" not in tokenizer.chat_template:
        # transformers renders a row without tools with `default`, and TRL's marker check reads it: both raise
        raise InputError(
            f"{tokenizer.name_or_path}: the tokenizer's chat templates are all named "
            f"({', '.join(map(repr, sorted(tokenizer.chat_template)))}) and none is 'default', which transformers "
            "renders rows without tools with (and TRL's SFTTrainer reads, failing with KeyError 'default'); set "
            "chat_template_path to the template to train with"
        )
    if sft.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        name = f"chat template {sft.chat_template_path or tokenizer.name_or_path}"
        try:  # TRL renders the template (with a tool call) to decide
            return get_training_chat_template(tokenizer)
        except ValueError:
            return None
        except RenderLimit as err:
            raise InputError(f"{name}: {err}") from None
        except Exception as err:  # noqa: BLE001 - what the template raised where the trainer would stop too
            raise InputError(
                f"{name}: it fails to render TRL's tool-call check ({template_error_text(err)}); the "
                "trainer stops there as well: fix the template"
            ) from None
    return None


def template_kwargs_problem(example: dict) -> str | None:
    """A row's `chat_template_kwargs` that is not a mapping (TRL unpacks it into `apply_chat_template`'s arguments,
    and fails on anything else); None when it is one, or absent."""
    extra = example.get("chat_template_kwargs")
    if extra is None or isinstance(extra, dict):
        return None
    return (
        f"field 'chat_template_kwargs' must be an object of template variables (e.g. "
        f'{{"enable_thinking": false}}), got {type(extra).__name__}'
        + (": write the object itself, not its JSON text" if isinstance(extra, str) else "")
    )


def row_problem(example: dict) -> str | None:
    """A malformed row: say which field is wrong and how (None when the row is usable)."""
    if problem := template_kwargs_problem(example):
        return problem
    messages = example.get("messages")
    if not isinstance(messages, list):
        return "field 'messages' must be a list of {role, content} objects"
    if not messages:
        return "field 'messages' is empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object, got {type(m).__name__}"
        role = m.get("role")
        if not isinstance(role, str):
            return f"messages[{i}].role is missing"
        if role not in KNOWN_ROLES:
            return (
                f"messages[{i}].role {role!r} is not one of {', '.join(sorted(KNOWN_ROLES))} "
                "(rename it, or map it with the recipe key role_map)"
            )
        problem = _content_problem(m, i) or _tool_calls_problem(m, i) or control.message_problem(i, m)
        if problem:
            return problem
    return None


def _content_problem(m: dict, i: int) -> str | None:
    content = m.get("content")
    if content is None:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            return None  # an assistant turn that only calls tools: the template renders the calls
        extra = " and the turn makes no tool_calls" if m.get("role") == "assistant" else ""
        return (
            f"messages[{i}].content is missing or null{extra}; give the text (only an assistant turn with "
            "tool_calls may have null content)"
        )
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                return (
                    f"messages[{i}].content[{j}] is a {kind!r} part; text-only training takes "
                    '[{"type": "text", "text": ...}] parts only: remove it or make it text'
                )
        return None
    if not isinstance(content, str):
        return f"messages[{i}].content must be a string, got {type(content).__name__}"
    return None


def _tool_calls_problem(m: dict, i: int) -> str | None:
    calls = m.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        return f"messages[{i}].tool_calls must be a list, got {type(calls).__name__}"
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f'messages[{i}].tool_calls[{j}] needs a function name ({{"function": {{"name", "arguments"}}}})'
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as err:
                return (
                    f"messages[{i}].tool_calls[{j}].function.arguments is a string that is not JSON ({err.msg}); "
                    "give the arguments as an object"
                )
            if not isinstance(parsed, dict):
                return f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object"
    return None


def canonical_messages(messages: list[dict]) -> list[dict]:
    """The one shape every template renders the same way (a valid row, see `row_problem`).

    - Content given as text parts `[{"type": "text", "text": ...}]` stays a list of parts, as TRL and
      transformers pass it: vision-language templates iterate over the parts and render nothing of a string.
      `messages_for_template` joins them where a template needs a string.
    - Tool-call `arguments` given as a JSON string (OpenAI's format) become the object: templates differ
      (chatml and llama3 write `arguments | tojson`, which double-encodes a string; qwen3 copies a string
      as is), while an object renders as JSON in all of them, as mistral-common does by parsing the string.
    Anything else is left as it is (`row_problem` names it).
    """
    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = dict(m)
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_parsed_arguments(call) for call in m["tool_calls"]]
        out.append(m)
    return out


def has_text_parts(messages: list[dict]) -> bool:
    """Whether any message's content is a list of text parts (a valid row, see `row_problem`)."""
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages)


def joined_parts(messages: list[dict]) -> list[dict]:
    """Each list of text parts joined into one string (back to back, as the templates that iterate parts
    write them)."""
    return [
        {**m, "content": "".join(p["text"] for p in m["content"])}
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


def messages_for_template(template: str, messages: list[dict], *, tools=None, template_kwargs=None) -> list[dict]:
    """The messages in the shape `template` renders: content parts kept, as TRL and transformers pass them,
    unless the template needs strings. Decided by rendering both shapes: the parts are joined when that
    render shows more of the messages' texts (templates that iterate parts render nothing of a string), or
    when the parts' render prints a part itself (a text-only template writes the list's repr,
    `[{'type': 'text', ...}]`, around the text, or fails on `content + ...`). Messages without parts are
    returned as they are, unrendered."""
    if not has_text_parts(messages):
        return messages
    joined = joined_parts(messages)
    parts = [
        part for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for part in m["content"]
    ]

    def shown(candidate) -> int:
        try:
            text = render(
                template,
                control.strip_control(candidate),
                tools=tools,
                template_kwargs=template_kwargs,
                placeholders=False,
            ).text
        except (InputError, TemplateRaised, RenderLimit):
            return -1  # the render that counts (tokenizing) reports what is wrong
        if candidate is messages and any(str(part) in text or json.dumps(part) in text for part in parts):
            return -1
        return sum(piece in text for m in joined for piece in coverage.content_pieces(m))

    return joined if shown(joined) > shown(messages) else messages


def _parsed_arguments(call):
    if not isinstance(call, dict):
        return call
    if isinstance(call.get("function"), dict):
        return {**call, "function": _parsed_arguments(call["function"])}
    if isinstance(call.get("arguments"), str):
        try:
            parsed = json.loads(call["arguments"])
        except json.JSONDecodeError:
            return call
        return {**call, "arguments": parsed} if isinstance(parsed, dict) else call
    return call


def zero_reason(messages: list[dict]) -> str:
    """Why a well-formed row got no trainable tokens from the template."""
    assistant = [m for m in messages if m.get("role") == "assistant"]
    if not assistant:
        return NO_ASSISTANT_TURN
    if all(not text_of(m.get("content")) and not m.get("tool_calls") for m in assistant):  # text parts too
        return EMPTY_ASSISTANT_CONTENT
    return TEMPLATE_MARKS_NOTHING


def _code_salt() -> str:
    """datasets fingerprints a module-level function by its name, not its code, so a cached map from an older
    toolkit would be reused after an upgrade; passing this module's source hash as an argument prevents it."""
    import hashlib
    import sys

    sources = (
        Path(__file__),
        Path(control.__file__),
        Path(sys.modules[render.__module__].__file__),
        Path(coverage.__file__),
    )
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]


def text_chars(value) -> int:
    """Characters of text in a row's value: every string in it, keys included (what tokenizing costs)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(k) + text_chars(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(text_chars(v) for v in value)
    return 0


def row_record(index: int, problem: str | None = None) -> dict:
    """One tokenized row as every tokenizing path returns it, before tokenizing: no tokens yet.

    input_ids / labels: what the trainer gets; src_row: the row's index in its dataset; n_trainable / span: its
    trainable tokens and the positions they spread over; reason: why it trains nothing (a zero-mask reason);
    problem: why it can't be used at all (bad input, named by the caller).
    """
    return {
        "input_ids": [],
        "labels": [],
        "src_row": index,
        "n_trainable": 0,
        "span": 0,
        "reason": "",
        "problem": problem or "",
    }


def _too_large(chars: int, limit: int) -> str:
    return f"{ROW_TOO_LARGE}: {chars:,} characters of text (limit {limit:,})"


def _tokenize_row(
    example,
    index,
    tokenizer,
    template,
    assistant_only_loss,
    template_name="",
    code_salt=None,
    policy=None,
    max_row_chars=None,
):
    """TRL's `tokenize_fn` (conversational language-modeling case), minus its abort, plus accounting.

    `policy` (per-message training control) changes the mask only for rows it concerns; other rows go
    through exactly TRL's path. The template's render runs in its own budget (masks.render_budget);
    tokenizing is the row's cost, bounded by `max_row_chars` (default MAX_ROW_CHARS).
    """
    from trl.data_utils import _tokenize

    problem = row_problem(example)
    out = {**row_record(index, problem), **coverage.columns()}
    if problem:
        return out
    tools = example.get("tools")
    limit = MAX_ROW_CHARS if max_row_chars is None else max_row_chars
    if (chars := text_chars(example["messages"]) + text_chars(tools)) > limit:
        out["reason"] = _too_large(chars, limit)
        return out
    tools = json.loads(tools) if isinstance(tools, str) else tools
    original = canonical_messages(example["messages"])
    original = messages_for_template(
        tokenizer.get_chat_template(template, tools),
        original,
        tools=tools,
        template_kwargs=_template_variables(tokenizer, example),
    )
    messages = original
    controlled = policy is not None and control.needs_control(messages, policy)
    if controlled:
        if not assistant_only_loss:
            out["problem"] = (
                "per-message training control (train/weight fields, train_roles, train_turns) needs "
                "assistant_only_loss: true; without it every token is trained"
            )
            return out
        messages = control.strip_control(messages)
    kwargs = {"chat_template": template, "tools": tools, **(example.get("chat_template_kwargs") or {})}
    try:
        processed = _tokenize(tokenizer, messages, return_assistant_tokens_mask=assistant_only_loss, **kwargs)
    except RenderLimit as err:  # a runaway template (time, memory, size): no row can be trusted to finish
        raise InputError(f"{template_name}: row {index}: {err}") from None
    except jinja2.TemplateSyntaxError as err:  # no row can render: unusable input, not a per-row reason
        raise InputError(
            f"{template_name}: line {err.lineno}: syntax error ({err.message}); run `sft-toolkit lint` on the template"
        ) from None
    except Exception as err:  # noqa: BLE001 - any error the template hit (IndexError, OverflowError, ...)
        # The template failed on this row (raise_exception, or an error it hit): the row is reported, by number.
        out["reason"] = f"{TEMPLATE_ERROR}: {template_error_text(err)}"
        return out
    ids = list(processed["input_ids"])
    kept = None
    if assistant_only_loss:
        mask = processed["assistant_masks"]
        if controlled:
            try:
                mask, kept, text = _controlled_mask(tokenizer, original, processed, kwargs, policy)
            except control.MappingError as err:
                out["problem"] = f"{err}"
                return out
        labels = [t if m else -100 for t, m in zip(ids, mask)]
    else:
        labels = list(ids)
    trainable, span = _trainable_and_span(labels)
    out.update(input_ids=ids, labels=labels, n_trainable=trainable, span=span)
    reason = zero_reason(
        messages if kept is None else [m for i, m in enumerate(messages) if m.get("role") != "assistant" or i in kept]
    )
    if kept is not None and not kept and any(m.get("role") == "assistant" for m in messages):
        reason = ALL_TURNS_SWITCHED_OFF
    # A row whose assistant turns are all empty still trains the end-of-turn token: it teaches the model to
    # answer with nothing, so it counts as a zero-mask row although TRL's labels are not all -100.
    if trainable == 0 or (assistant_only_loss and reason == EMPTY_ASSISTANT_CONTENT):
        out["reason"] = reason
    if assistant_only_loss and not out["reason"] and CHECK_COVERAGE:
        found = _coverage(tokenizer, template, tools, example, original if controlled else messages, kept, processed)
        if found is None:
            out.update(coverage.columns(unchecked=True))
            return out
        if kept is not None:  # switched-off turns, held to the final labels (what the trainer gets)
            spans = coverage.trained_spans(processed.encodings[0].offsets, labels)
            found = sorted(
                [*found, *coverage.switched_off_problems(text, spans, original, kept)], key=lambda p: p.message
            )
        out.update(coverage.columns(found))
    return out


# The columns every chat row comes out with (`_tokenize_row`), in this order.
CHAT_COLUMNS = (*row_record(0), *coverage.columns())


def _tokenize_rows(
    batch,
    indices,
    tokenizer,
    template,
    assistant_only_loss,
    template_name="",
    code_salt=None,
    policy=None,
    max_row_chars=None,
):
    """`_tokenize_row` for a batch of rows, with one tokenizer call for the whole batch (a fast tokenizer's Rust
    `encode_batch`, on every core) instead of one per row, and the render's spans used twice (the mask and the
    content coverage) instead of rendering the row again for the coverage.

    Each row is rendered as `apply_chat_template` renders it (`render_jinja_template` with the tokenizer's special
    tokens and the row's `chat_template_kwargs`, the template compiled once per process by transformers' cache);
    the batch's masks are transformers' rule read at the generation spans' edges (`masks.batch_assistant_mask`),
    its ids, labels and counts are built in numpy and returned as an Arrow table (no Python int per token). Rows
    this does not cover take `_tokenize_row` unchanged, so they are reported exactly as before: a malformed or
    oversized row, text parts, per-message control, a `chat_template_kwargs` key that `apply_chat_template` itself
    would take, a render that fails; and the whole batch when the tokenizer call fails.
    `tests/test_check_data_matches_trl.py` proves the result equals TRL's, row for row.
    """
    row_kwargs = {
        "tokenizer": tokenizer,
        "template": template,
        "assistant_only_loss": assistant_only_loss,
        "template_name": template_name,
        "code_salt": code_salt,
        "policy": policy,
        "max_row_chars": max_row_chars,
    }
    names = list(batch)
    rows = [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]
    special = tokenizer.special_tokens_map
    limit = MAX_ROW_CHARS if max_row_chars is None else max_row_chars
    by_row: dict[int, dict] = {}  # position in the batch -> `_tokenize_row`'s record
    rendered = []  # (position in the batch, messages, text, spans)
    for k, row in enumerate(rows):
        found = _rendered_row(row, tokenizer, template, special, policy or control.TurnPolicy(), limit)
        if found is None:
            by_row[k] = _tokenize_row(row, indices[k], **row_kwargs)
        else:
            rendered.append((k, *found))
    encoded = None
    if rendered:
        try:
            encoded = _encodings(tokenizer, [text for _, _, text, _ in rendered])
        except Exception:  # noqa: BLE001 - the row path tokenizes (and reports) each row on its own
            for k, *_ in rendered:
                by_row[k] = _tokenize_row(rows[k], indices[k], **row_kwargs)
            rendered = []
        except BaseException as err:
            if type(err).__name__ != "PanicException":  # a Rust panic (pyo3) is a BaseException, not an Exception
                raise
            # The tokenizer crashed inside Rust; its later results in this process can't be trusted (tests
            # found batches that no longer matched their texts after one), so no row is tokenized with it again.
            raise InputError(
                f"the tokenizer {tokenizer.name_or_path} crashed on this data (tokenizers: {err}); its pipeline "
                "(tokenizer.json: normalizer, added tokens) can't encode these rows: fix or replace it"
            ) from None
    in_order = offsets_in_order(tokenizer.backend_tokenizer)
    return _chat_table(len(rows), indices, by_row, rendered, encoded, in_order)


def _encodings(tokenizer, texts: list[str]) -> list:
    """The Rust encodings of `tokenizer(texts, add_special_tokens=False)`: straight from the backend's
    `encode_batch` when that call would make no other change (transformers' own `__call__` and `_encode_plus`, no
    truncation, padding or input-mode switch, special tokens split as the tokenizer says), which spares its Python
    copies of every id list; through the call otherwise."""
    from transformers import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = tokenizer.backend_tokenizer
    if (
        type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        and not hasattr(tokenizer, "_switch_to_input_mode")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(tokenizer.split_special_tokens)
    ):
        return backend.encode_batch(texts, add_special_tokens=False)
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False).encodings


def _chat_table(size: int, indices, by_row: dict[int, dict], rendered: list, encoded, in_order: bool):
    """The batch's CHAT_COLUMNS as an Arrow table: the rendered rows' tokens, labels and counts from their
    encodings (`encoded`, in `rendered`'s order) in numpy (labels by transformers' mask rule, read at the spans'
    edges when the tokenizer's offsets are `in_order`, the zero-mask
    reason, the content-coverage problem from the same render's spans), and the records `_tokenize_row`
    returned for the others, in batch order."""
    import numpy as np
    import pyarrow as pa

    token_counts = np.zeros(size, dtype=np.int64)
    for k, out in by_row.items():
        token_counts[k] = len(out["input_ids"])
    ids = labels = np.zeros(0, dtype=np.int64)
    scalars = {name: [None] * size for name in CHAT_COLUMNS[2:]}
    for k, out in by_row.items():
        for name in scalars:
            scalars[name][k] = out[name]
    if rendered:
        positions = np.array([k for k, *_ in rendered])
        lists = [encoding.ids for encoding in encoded]
        counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        token_counts[positions] = counts
        total = int(counts.sum())
        ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)
        mask = batch_assistant_mask(encoded, [row_spans for *_, row_spans in rendered], counts, in_order=in_order)
        labels = np.where(mask, ids, -100)
        starts = np.concatenate([[0], np.cumsum(counts)])
        trained = np.flatnonzero(mask)
        trained_before = np.searchsorted(trained, starts)  # trained tokens before each row's start
        per_row = np.diff(trained_before)
        for j, (k, messages, text, row_spans) in enumerate(rendered):
            trainable = int(per_row[j])
            span = 0
            if trainable:
                first = int(trained[trained_before[j]] - starts[j])
                last = int(trained[trained_before[j + 1] - 1] - starts[j])
                span = max(last + 1, int(counts[j]) - first)
            record = {"src_row": indices[k], "n_trainable": trainable, "span": span, "reason": ""}
            record.update(problem="", **coverage.columns())
            reason = zero_reason(messages)
            if trainable == 0 or reason == EMPTY_ASSISTANT_CONTENT:
                record["reason"] = reason
            elif CHECK_COVERAGE:
                found = coverage.coverage_problems(text, row_spans, messages)
                if found:
                    record.update(coverage.columns(found))
            for name in scalars:
                scalars[name][k] = record[name]
    if by_row and rendered:  # both kinds: the tokens in batch order
        pieces_ids, pieces_labels = [], []
        batch_start = dict(zip((k for k, *_ in rendered), np.concatenate([[0], np.cumsum(counts)])))
        for k in range(size):
            if k in by_row:
                pieces_ids.append(np.asarray(by_row[k]["input_ids"], dtype=np.int64))
                pieces_labels.append(np.asarray(by_row[k]["labels"], dtype=np.int64))
            else:
                start = batch_start[k]
                pieces_ids.append(ids[start : start + token_counts[k]])
                pieces_labels.append(labels[start : start + token_counts[k]])
        ids, labels = np.concatenate(pieces_ids), np.concatenate(pieces_labels)
    elif by_row:
        ids = np.fromiter(itertools.chain.from_iterable(by_row[k]["input_ids"] for k in range(size)), dtype=np.int64)
        labels = np.fromiter(itertools.chain.from_iterable(by_row[k]["labels"] for k in range(size)), dtype=np.int64)
    list_offsets = pa.array(np.concatenate([[0], np.cumsum(token_counts)]), type=pa.int32())
    columns = {
        "input_ids": pa.ListArray.from_arrays(list_offsets, pa.array(ids, type=pa.int64())),
        "labels": pa.ListArray.from_arrays(list_offsets, pa.array(labels, type=pa.int64())),
        **{
            name: pa.array(values, type=pa.string() if name in _TEXT_COLUMNS else pa.int64())
            for name, values in scalars.items()
        },
    }
    return pa.table(columns)


_TEXT_COLUMNS = ("reason", "problem", "coverage_reason", "coverage_problems")


def _rendered_row(row, tokenizer, template, special, policy, limit):
    """(messages, text, generation spans) of a row the batch path tokenizes, rendered as `apply_chat_template`
    renders it; None for a row `_tokenize_row` must take (see `_tokenize_rows`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if row_problem(row):
        return None
    tools, extra = row.get("tools"), row.get("chat_template_kwargs") or {}
    if text_chars(row["messages"]) + text_chars(tools) > limit or not isinstance(extra, dict):
        return None
    if set(extra) & _apply_chat_template_parameters(type(tokenizer)):
        return None
    messages = canonical_messages(row["messages"])
    if (
        has_text_parts(messages)
        or any(m.get(key) is not None for m in messages for key in control.CONTROL_KEYS)
        or control.needs_control(messages, policy)
    ):
        return None
    try:
        tools = json.loads(tools) if isinstance(tools, str) else tools
        texts, spans = render_jinja_template(
            conversations=[normalize_messages(messages)],
            tools=tools,
            chat_template=tokenizer.get_chat_template(template, tools),
            return_assistant_tokens_mask=True,
            **{**special, **extra},
        )
    except Exception:  # noqa: BLE001 - the row path renders it again and reports what the template did
        return None
    return messages, texts[0], [tuple(span) for span in spans[0]]


@functools.cache
def _apply_chat_template_parameters(tokenizer_class) -> frozenset[str]:
    """The names `apply_chat_template` takes itself: a row's `chat_template_kwargs` key among them changes the
    call, not the template's variables, so such a row takes the row path."""
    return frozenset(inspect.signature(tokenizer_class.apply_chat_template).parameters)


def _template_variables(tokenizer, example) -> dict:
    """What `apply_chat_template` gives the template besides messages and tools: the tokenizer's special
    tokens and the row's own `chat_template_kwargs`."""
    return {**tokenizer.special_tokens_map, **(example.get("chat_template_kwargs") or {})}


def _coverage(tokenizer, template, tools, example, messages, kept, processed) -> list[coverage.CoverageProblem] | None:
    """The row's content-coverage problems (sft_toolkit/coverage.py), from its render's spans.

    `kept`: the trained assistant messages under per-message control (None: all of them, `messages` carry
    no control fields). `processed`: the row's tokenization (`apply_chat_template`'s, with its assistant mask).
    The row is rendered again for its text, as `apply_chat_template` rendered it (a row's `add_generation_prompt`
    in `chat_template_kwargs` included); None (unchecked: counted in the report, never a pass) where that render
    fails, though the same render succeeded while tokenizing, or its spans don't give the row's tokens their mask
    (a template that renders differently on each call: the text checked would not be the text trained).
    """
    variables = _template_variables(tokenizer, example)
    generation_prompt = bool(variables.pop("add_generation_prompt", False))
    try:
        rendered = render(
            tokenizer.get_chat_template(template, tools),
            control.strip_control(messages),
            add_generation_prompt=generation_prompt,
            tools=tools,
            template_kwargs=variables,
            placeholders=False,
        )
        spans = rendered.spans
        if kept is not None:
            spans = [span for i, own in control.assign_spans(messages, rendered).items() if i in kept for span in own]
    except (InputError, TemplateRaised, RenderLimit, control.MappingError):
        return None
    offsets = processed.encodings[0].offsets
    if any(end > len(rendered.text) for _, end in offsets) or control.token_mask(
        processed, rendered.spans, len(processed["input_ids"])
    ) != list(processed["assistant_masks"]):
        return None
    # Only the characters the row's tokens cover can be trained: a row whose `chat_template_kwargs` truncate its
    # tokens (`truncation`, `max_length`: `apply_chat_template` arguments, which TRL passes on too) loses the rest.
    characters = [(start, end) for start, end in offsets if start < end]
    covered = (min(s for s, _ in characters), max(e for _, e in characters)) if characters else (0, 0)
    spans = [(max(a, covered[0]), min(b, covered[1])) for a, b in spans if min(b, covered[1]) > max(a, covered[0])]
    return coverage.coverage_problems(rendered.text, spans, messages, kept)


def _controlled_mask(tokenizer, messages, processed, kwargs, policy) -> tuple[list[int], set[int], str]:
    """The mask of the trained assistant messages only, their indices, and the rendered text the tokens' offsets
    point into (raises control.MappingError).

    The spans come from rendering the row again, as `apply_chat_template` did; a mask rebuilt from all
    of them must equal transformers' own, which proves the spans and the tokens belong together.
    """
    clean = control.strip_control(messages)
    template = tokenizer.get_chat_template(kwargs.get("chat_template"), kwargs.get("tools"))
    extra = {k: v for k, v in kwargs.items() if k not in ("chat_template", "tools")}
    rendered = render(
        template,
        clean,
        tools=kwargs.get("tools"),
        template_kwargs={**tokenizer.special_tokens_map, **extra},
        placeholders=False,
    )
    n = len(processed["input_ids"])
    if control.token_mask(processed, rendered.spans, n) != list(processed["assistant_masks"]):
        raise control.MappingError(
            "the template's generation spans don't line up with its token mask "
            "(does it render differently on each call?)"
        )
    chosen = control.selected(messages, policy)
    spans = control.assign_spans(messages, rendered)
    kept = {i for i in spans if chosen[i]}
    mask = control.token_mask(processed, [span for i in sorted(kept) for span in spans[i]], n)
    return mask, kept, rendered.text


def _trainable_and_span(labels: list[int]) -> tuple[int, int]:
    """Trainable tokens, and the shortest max_length that keeps all of them (for either truncation side)."""
    trained_at = [i for i, t in enumerate(labels) if t != -100]
    return len(trained_at), (max(trained_at[-1] + 1, len(labels) - trained_at[0]) if trained_at else 0)


# Which path a dataset takes is its row format's (`formats.FORMATS`, in TRL's order); these name the questions
# the trainer's steps ask.
def is_pretokenized(columns) -> bool:
    """TRL's own test (`is_processed = "input_ids" in column_names`): such rows skip template and tokenization."""
    return _format_kind(columns) is RowFormat.PRE_TOKENIZED


def renders_conversations(recipe) -> bool:
    """Whether the recipe's rows go through the chat template (not plain text, not pre-tokenized), judged from
    the first row's fields without loading the rest; a dataset that can't be read is reported by check_data."""
    from .data import first_train_row

    try:
        first = first_train_row(recipe)
    except Exception:  # noqa: BLE001 - any unreadable dataset: check_data loads it again and names the problem
        return True
    return first is None or formats.renders_template(list(first), lambda: first)


def is_prompt_completion(columns) -> bool:
    """TRL's prompt-completion rows (`"prompt" in example`), told from plain text and conversations."""
    return _format_kind(columns) is RowFormat.PROMPT_COMPLETION


def is_conversational_prompt(row: dict) -> bool:
    """A prompt-completion row whose prompt is a list of messages (rendered with the chat template)."""
    return is_prompt_completion(list(row)) and formats.renders_template(list(row), lambda: row)


def renders_template(dataset) -> bool:
    """Whether the dataset's rows meet the chat template: conversations, and conversational prompt/completion."""
    return formats.renders_template(dataset.column_names, lambda: next(iter(dataset), None))


def _format_kind(columns) -> RowFormat | None:
    """The row format told from the columns alone (the formats that need the first row see none)."""
    fmt = formats.row_format(columns, lambda: None)
    return fmt.kind if fmt is not None else None


def tokenize(
    dataset, tokenizer, template, sft, *, role_map: dict | None = None, desc: str = "Tokenizing", policy=None
):
    """Tokenized dataset with columns input_ids, labels, src_row, n_trainable, span, reason, problem (and, for
    conversations and prompt/completion rows, coverage_reason / coverage_message / coverage_problems: the row's
    content-coverage problems, see `coverage.columns`).

    `policy` (a `policy.TurnPolicy`, default: every assistant message) and the messages' own `train`
    fields decide which assistant messages are trained; rows they don't concern keep TRL's mask as it is.

    Conversations go through the chat template; plain text (`dataset_text_field`, no mask) and
    pre-tokenized rows (`input_ids` plus `labels` or `assistant_masks`) take TRL's matching paths.
    """
    from datasets import Dataset

    if is_pretokenized(dataset.column_names):
        return from_tokens(dataset, sft)
    if is_prompt_completion(dataset.column_names):  # TRL's tokenize_fn takes this case first
        return _tokenize_prompt_completion(dataset, tokenizer, template, sft, policy=policy, desc=desc)
    dataset = to_chatml(dataset, sft, role_map)
    if "messages" not in dataset.column_names:
        if sft.dataset_text_field in dataset.column_names and not sft.assistant_only_loss:
            return _tokenize_text(dataset, tokenizer, sft)
        raise InputError(_no_messages_hint(dataset.column_names, sft))
    if sft.assistant_only_loss:
        _need_offsets(tokenizer)
    kwargs = {
        "with_indices": True,
        "remove_columns": dataset.column_names,
        "fn_kwargs": {
            "tokenizer": tokenizer,
            "template": template,
            "assistant_only_loss": sft.assistant_only_loss,
            "code_salt": _code_salt(),
            "policy": policy or control.TurnPolicy(),
            "max_row_chars": MAX_ROW_CHARS,
            "template_name": f"chat template {sft.chat_template_path or tokenizer.name_or_path}",
        },
    }
    if isinstance(dataset, Dataset):
        kwargs.update(num_proc=sft.dataset_num_proc, desc=desc)
    if sft.assistant_only_loss and getattr(tokenizer, "is_fast", False):
        return dataset.map(_tokenize_rows, batched=True, features=_chat_features(), **kwargs)
    return dataset.map(_tokenize_row, **kwargs)


def _need_offsets(tokenizer) -> None:
    """InputError unless the tokenizer gives token offsets, which `assistant_only_loss` needs: transformers builds
    the assistant mask from them (`apply_chat_template` fails on every row of a Python tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(
            f"assistant_only_loss: true needs a fast tokenizer: transformers builds the assistant mask from the "
            f"tokens' character offsets, which {type(tokenizer).__name__} (a Python tokenizer) does not give, so "
            "every row would fail in the trainer as well; give the model a tokenizer.json (a fast tokenizer), or "
            "set assistant_only_loss: false (prompt/completion rows then train their completion)"
        )


def _chat_features():
    """The types of CHAT_COLUMNS, as `datasets` infers them from `_tokenize_row`'s records."""
    from datasets import Features, List, Value

    ints, text = Value("int64"), Value("string")
    types = {"input_ids": List(ints), "labels": List(ints), **{name: text for name in _TEXT_COLUMNS}}
    return Features({name: types.get(name, ints) for name in CHAT_COLUMNS})


def _tokenize_prompt_completion(dataset, tokenizer, template, sft, *, policy=None, desc: str = "Tokenizing"):
    """TRL's prompt-completion path, row for row: the prompt alone (with the generation prompt when it is
    conversational) and prompt + completion are tokenized; the completion starts where the two diverge
    (`common_prefix_length`), and the labels keep the tokens that every applicable mask marks: the completion
    mask when `completion_only_loss` (TRL's default for these rows), the assistant mask when
    `assistant_only_loss` (conversational rows only: TRL refuses it for plain text, and so do we)."""
    first = next(iter(dataset), None)
    conversational = first is not None and is_conversational_prompt(first)
    if sft.assistant_only_loss and first is not None and not conversational:
        raise InputError(
            "prompt/completion rows of plain text with assistant_only_loss: true (TRL refuses this too: "
            "the option needs conversational rows); set assistant_only_loss: false, and "
            "completion_only_loss (on by default for prompt/completion rows) trains the completion only"
        )
    if sft.assistant_only_loss and conversational:
        _need_offsets(tokenizer)
    completion_only = True if sft.completion_only_loss is None else sft.completion_only_loss
    fn_kwargs = {
        "tokenizer": tokenizer,
        "template": template,
        "assistant_only_loss": sft.assistant_only_loss,
        "completion_only_loss": completion_only,
        "code_salt": _code_salt(),
        # TRL appends eos to plain completions, judged on the first row (its `add_eos` step)
        "eos": None if conversational else (tokenizer.eos_token or ""),
        "text_field": sft.dataset_text_field,
        "policy": policy or control.TurnPolicy(),
        "max_row_chars": MAX_ROW_CHARS,
        "template_name": f"chat template {sft.chat_template_path or tokenizer.name_or_path}",
    }
    return dataset.map(
        _prompt_completion_row,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs=fn_kwargs,
        **_map_kwargs(dataset, sft, desc),
    )


def _prompt_completion_row(
    example,
    index,
    tokenizer,
    template,
    assistant_only_loss,
    completion_only_loss,
    eos,
    text_field,
    policy,
    template_name="",
    code_salt=None,
    max_row_chars=None,
):
    """TRL's `tokenize_fn` (prompt-completion case), minus its abort, plus accounting."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt, completion = example.get("prompt"), example.get("completion")
    problem = _prompt_completion_problem(prompt, completion, policy) or template_kwargs_problem(example)
    out = {**row_record(index, problem), **coverage.columns()}
    if out["problem"]:
        return out
    limit = MAX_ROW_CHARS if max_row_chars is None else max_row_chars
    if (chars := text_chars(prompt) + text_chars(completion) + text_chars(example.get("tools"))) > limit:
        out["reason"] = _too_large(chars, limit)
        return out
    masks = []
    if isinstance(prompt, list):
        prompt, completion = canonical_messages(prompt), canonical_messages(completion)
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"chat_template": template, "tools": tools, **(example.get("chat_template_kwargs") or {})}
        # The tokens' offsets for content coverage, from the same call (they change no token)
        offsets = (
            {"tokenizer_kwargs": {"return_offsets_mapping": True}}
            if CHECK_COVERAGE and getattr(tokenizer, "is_fast", False) and "tokenizer_kwargs" not in kwargs
            else {}
        )
        try:  # the template's render is bounded by the sandbox (masks.render_budget); tokenizing is the row's cost
            prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
            processed = _tokenize(
                tokenizer, prompt + completion, return_assistant_tokens_mask=assistant_only_loss, **offsets, **kwargs
            )
        except RenderLimit as err:
            raise InputError(f"{template_name}: row {index}: {err}") from None
        except jinja2.TemplateSyntaxError as err:
            raise InputError(
                f"{template_name}: line {err.lineno}: syntax error ({err.message}); run `sft-toolkit "
                "lint` on the template"
            ) from None
        except Exception as err:  # noqa: BLE001 - any error the template hit, as for chat rows
            out["reason"] = f"{TEMPLATE_ERROR}: {template_error_text(err)}"
            return out
        ids = list(processed["input_ids"])
        if assistant_only_loss:
            masks.append(processed["assistant_masks"])
        empty = all(not m.get("content") and not m.get("tool_calls") for m in completion)
    else:
        if eos is not None and text_field not in example and not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        ids = list(_tokenize(tokenizer, prompt + completion)["input_ids"])
        empty = completion in ("", eos)
    if completion_only_loss:
        start = common_prefix_length(prompt_ids, ids)
        masks.append([0] * start + [1] * (len(ids) - start))
    labels = [t if all(bits) else -100 for t, *bits in zip(ids, *masks)]
    trainable, span = _trainable_and_span(labels)
    out.update(input_ids=ids, labels=labels, n_trainable=trainable, span=span)
    # As with an empty assistant turn: at most the end-of-turn trains, teaching the model to answer nothing.
    if empty and (completion_only_loss or assistant_only_loss):
        out["reason"] = EMPTY_COMPLETION
    elif trainable == 0:
        out["reason"] = zero_reason(example["completion"]) if isinstance(example["prompt"], list) else EMPTY_COMPLETION
    if (completion_only_loss or assistant_only_loss) and not out["reason"] and CHECK_COVERAGE:
        offsets = processed.get("offset_mapping") if isinstance(prompt, list) else None
        found = _prompt_completion_coverage(
            tokenizer, template, example, prompt, completion, ids, labels, offsets, completion_only_loss
        )
        if found is None:  # the row's trained characters could not be told
            out.update(coverage.columns(unchecked=True))
        else:
            out.update(coverage.columns(found))
    return out


def _prompt_completion_coverage(
    tokenizer, template, example, prompt, completion, ids, labels, offsets=None, completion_only_loss=True
) -> list[coverage.CoverageProblem] | None:
    """A prompt/completion row's content-coverage problems (sft_toolkit/coverage.py): the characters of its
    trained tokens held against its prompt (none may be trained, nor, for conversational rows, the generation
    prompt) and its completion's assistant messages (all must be). The tokens' offsets are those TRL's own call
    returned (`offsets`, into the row's text rendered here once more), or else the text is tokenized once more
    and must give the row's ids; a tokenizer without offsets (a Python one) has the trained characters read from
    decoded token prefixes (`decoded_trained_spans`). None (unchecked, counted in the report, never a pass) where
    the decoded prefixes are not the row's text, or the row does not render or tokenize to the same ids again. A text row is the prompt (message 0) and the completion (message 1),
    tokenized as TRL does: with the tokenizer's special tokens (`completion`: with eos where TRL appends it;
    conversational rows: canonical messages). Without `completion_only_loss` (assistant_only_loss alone) the prompt is no boundary: the row is
    held to the rules of a conversation, every assistant message of it trained."""
    conversational = isinstance(prompt, list)
    if conversational:
        messages = prompt + completion
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools

        def rendered(conversation, add_generation_prompt=False) -> str:
            return render(
                tokenizer.get_chat_template(template, tools),
                conversation,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                template_kwargs=_template_variables(tokenizer, example),
                placeholders=False,
            ).text

        try:
            text = rendered(messages)
        except (InputError, TemplateRaised, RenderLimit):
            return None  # the same render succeeded while tokenizing: the template is not deterministic; unchecked
    else:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["completion"]}]
        text = prompt + completion
    if not getattr(tokenizer, "is_fast", False):
        spans = decoded_trained_spans(tokenizer, ids, labels, text)
        if spans is None:
            return None
    else:
        if offsets is None or len(offsets) != len(ids):
            encoded = tokenizer(text, add_special_tokens=not conversational, return_offsets_mapping=True)
            if list(encoded["input_ids"]) != ids:
                return None  # not the row's tokens (a template that renders differently on each call): unchecked
            offsets = encoded["offset_mapping"]
        if any(end > len(text) for _, end in offsets[-1:]):
            return None  # offsets into another text (a template that renders differently on each call): unchecked
        spans = coverage.trained_spans(offsets, labels)
    prompt_messages = (len(prompt) if conversational else 1) if completion_only_loss else 0
    found = coverage.coverage_problems(text, spans, messages, prompt_messages=prompt_messages)
    if conversational and completion_only_loss:
        try:
            boundary = coverage.generation_prompt_problem(
                text, spans, messages, prompt_messages, lambda: rendered(prompt, add_generation_prompt=True)
            )
        except (InputError, TemplateRaised, RenderLimit):
            boundary = None  # the same render succeeded while tokenizing
        if boundary is not None:
            found = sorted([*found, boundary], key=lambda problem: problem.message)
    return found


def decoded_trained_spans(tokenizer, ids: list[int], labels: list[int], text: str) -> list[tuple[int, int]] | None:
    """The characters of `text` a row's trained tokens cover, for a tokenizer that gives no offsets: each run of
    trained tokens [a, b) spans from the length of the decoded ids[:a] to that of ids[:b] (two decodes a run, so
    a row costs about two decodes of its tokens per run). None when a decoded prefix is not a prefix of `text`
    (a tokenizer that adds a token in front, or decodes other text than it read): the row can't be checked.
    A decode past the end of `text` (the eos a tokenizer appends) ends at the text's end."""

    def upto(k: int) -> int | None:
        decoded = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(decoded):
            return len(decoded)
        return len(text) if decoded.startswith(text) else None

    spans, start = [], None
    for k, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = k
        elif label == -100 and start is not None:
            first, last = upto(start), upto(k)
            if first is None or last is None:
                return None
            spans.append((first, last))
            start = None
    return spans


def _prompt_completion_problem(prompt, completion, policy) -> str:
    if isinstance(prompt, str) and isinstance(completion, str):
        return ""
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        return (
            f"fields 'prompt' and 'completion' must both be text or both be lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    if not completion:
        return "field 'completion' is an empty list; give the completion's messages"
    problem = row_problem({"messages": prompt + completion})
    if problem:
        return f"prompt + completion {problem}" if problem.startswith("messages[") else problem
    if control.needs_control(prompt + completion, policy):
        return (
            "per-message training control (train/weight fields, train_roles, train_turns) applies to 'messages' "
            "rows; a prompt/completion row trains its completion: drop those fields or use 'messages'"
        )
    return ""


def _tokenize_text(dataset, tokenizer, sft):
    """TRL's language-modeling path for plain text (assistant_only_loss: false): append eos unless present,
    tokenize, train every token."""
    field = sft.dataset_text_field
    eos = tokenizer.eos_token or ""
    return dataset.map(
        _text_row,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "field": field,
            "eos": eos,
            "code_salt": _code_salt(),
            "max_row_chars": MAX_ROW_CHARS,
        },
        **_map_kwargs(dataset, sft, "Tokenizing"),
    )


def _text_row(example, index, tokenizer, field, eos, code_salt=None, max_row_chars=None):
    from trl.data_utils import _tokenize

    text = example[field]
    out = row_record(index, "" if isinstance(text, str) else f"field {field!r} must be a string")
    if out["problem"]:
        return out
    limit = MAX_ROW_CHARS if max_row_chars is None else max_row_chars
    if len(text) > limit:
        out["reason"] = _too_large(len(text), limit)
        return out
    ids = list(_tokenize(tokenizer, text if text.endswith(eos) else text + eos)["input_ids"])
    trainable, span = _trainable_and_span(ids)
    out.update(input_ids=ids, labels=ids, n_trainable=trainable, span=span)
    return out


def from_tokens(dataset, sft):
    """A user's pre-tokenized rows, checked and labelled as TRL's preparation would label them.

    TRL keeps a `labels` column as is and builds one from `assistant_masks` (and `completion_mask` when
    `completion_only_loss`); with no mask at all it trains every token, so under `assistant_only_loss` a
    dataset without a mask would silently train user turns too: refused here.
    """
    columns = dataset.column_names
    _check_token_types(dataset)
    if "completion_mask" in columns and "labels" not in columns and sft.completion_only_loss is None:
        raise InputError(
            "the dataset is pre-tokenized with a 'completion_mask' column, which the trainer applies only with "
            "completion_only_loss: true (unset, TRL turns it off for rows without 'prompt'/'completion', and every "
            "token the mask leaves out would be trained); set completion_only_loss: true to train what the mask "
            "marks, or false to train every token"
        )
    # With `labels`, TRL ignores the mask columns: each row's labels must then train what its masks mark.
    ignored = [c for c in ("assistant_masks", "completion_mask") if c in columns] if "labels" in columns else []
    if "labels" in columns:
        label_from = ["labels"]  # kept as is, like TRL; checked against input_ids below
    else:
        label_from = [c for c in ("assistant_masks",) if c in columns]
        if sft.completion_only_loss and "completion_mask" in columns:
            label_from.append("completion_mask")
    if not label_from and sft.assistant_only_loss:
        raise InputError(
            f"the dataset is pre-tokenized (has 'input_ids') but has no 'labels' or 'assistant_masks' "
            f"column (columns: {', '.join(columns)}), so nothing says which tokens are the assistant's; "
            "add one, or set assistant_only_loss: false to train on every token"
        )
    return dataset.map(
        _tokens_row,
        with_indices=True,
        remove_columns=columns,
        fn_kwargs={"label_from": label_from, "code_salt": _code_salt(), "ignored": ignored},
        **_map_kwargs(dataset, sft, "Checking tokens"),
    )


TOKEN_COLUMNS = ("input_ids", "labels", "assistant_masks", "completion_mask")


def _check_token_types(dataset) -> None:
    """Token ids, labels and masks must be integers (masks may be booleans). A column of floats (a parquet
    file written from floats, NaN in a .jsonl column) would reach the trainer as float tensors, and a NaN mask
    entry counts as true: refused, naming the column and the first row whose value is not a whole number."""
    features = dataset.features or {}  # a streamed dataset may not know them: its rows are checked one by one
    for column in [c for c in TOKEN_COLUMNS if c in features]:
        feature = features[column]
        while hasattr(feature, "feature"):  # List / Sequence of ...
            feature = feature.feature
        kind = getattr(feature, "dtype", "")
        is_mask = column in ("assistant_masks", "completion_mask")
        if kind.startswith(("int", "uint")) or kind == "null" or (is_mask and kind == "bool"):
            continue
        where = ""
        if kind.startswith("float"):  # the error path only: find the first value that is not a whole number
            for row, values in enumerate(dataset[column]):
                bad = next((v for v in values or () if not math.isfinite(v) or v != int(v)), None)
                if bad is not None:
                    where = f" (row {row}, counted from 0: {bad!r})"
                    break
        raise InputError(
            f"field {column!r} holds {kind or type(feature).__name__} values{where}; token ids, labels and masks "
            "must be whole numbers (integers; masks 0/1 or true/false): write the column as integers, and fix or "
            "remove rows with NaN, Infinity or fractions"
        )


def _tokens_row(example, index, label_from, code_salt=None, ignored=()):
    """label_from: ["labels"], or the mask columns whose product marks the trained tokens ([] = every token);
    ignored: mask columns the trainer ignores beside `labels`, which must agree with them."""
    ids = example["input_ids"]
    out = row_record(index, _tokens_problem(example, label_from) or _ignored_mask_problem(example, ignored))
    if out["problem"]:
        return out
    ids = list(ids)
    if label_from == ["labels"]:
        labels = list(example["labels"])
    else:
        labels = [t if all(example[m][i] for m in label_from) else -100 for i, t in enumerate(ids)]
    trainable, span = _trainable_and_span(labels)
    out.update(
        input_ids=ids, labels=labels, n_trainable=trainable, span=span, reason="" if trainable else MASK_MARKS_NOTHING
    )
    return out


def _ignored_mask_problem(example, ignored) -> str:
    """Where a row's `labels` and a mask column beside them disagree (the trainer keeps the labels and ignores
    the column, so the mask the row was written with is not the one trained)."""
    if not ignored:
        return ""
    labels = example["labels"]
    for column in ignored:
        mask = example[column]
        if mask is None or len(mask) != len(labels):
            return f"field {column!r} has {len(mask or [])} entries for {len(labels)} labels"
        wrong = next((i for i, (label, bit) in enumerate(zip(labels, mask)) if (label != -100) != bool(bit)), None)
        if wrong is not None:
            trains = "trains" if labels[wrong] != -100 else "does not train"
            return (
                f"labels[{wrong}] {trains} a token its {column!r} marks {mask[wrong]}; the trainer keeps "
                f"'labels' as they are and ignores {column!r}: make them agree, or drop one of them"
            )
    return ""


def _tokens_problem(example, label_from) -> str:
    ids = example["input_ids"]
    if not ids:
        return "field 'input_ids' is empty"
    for m in label_from:
        if example[m] is None or len(example[m]) != len(ids):
            return f"field {m!r} has {len(example[m] or [])} entries for {len(ids)} input_ids"
    if label_from == ["labels"]:
        bad = next((i for i, (t, label) in enumerate(zip(ids, example["labels"])) if label not in (-100, t)), None)
        if bad is not None:
            return (
                f"labels[{bad}] is {example['labels'][bad]} but input_ids[{bad}] is {ids[bad]}: labels must be "
                "the input_ids (unshifted; the model shifts them) with -100 where nothing is trained"
            )
    return ""


def to_chatml(dataset, sft, role_map: dict | None = None):
    """Rows of a conversation format become `messages` through their format's converter (`formats.FORMATS`:
    ShareGPT's `conversations` of {from, value} get ChatML role names), the converter `show` uses on one row."""
    fmt = formats.dataset_format(dataset, sft.dataset_text_field)
    if fmt is None or not fmt.changes_rows:  # rows of another path, or `messages` already
        return dataset
    return dataset.map(
        fmt.to_messages,
        fn_kwargs={"role_map": role_map},
        remove_columns=list(fmt.replaces),
        **_map_kwargs(dataset, sft, "Converting to ChatML"),
    )


def _no_messages_hint(columns: list[str], sft) -> str:
    if "conversations" in columns:
        return (
            "the 'conversations' column is not ShareGPT-style {from, value} messages and there is no "
            "'messages' column; give each row a 'messages' list of {role, content} (ShareGPT rows of "
            "{from, value} are converted, role names mapped with the recipe key role_map)"
        )
    if "prompt" in columns and "text" not in columns:
        return (
            f"a 'prompt' column without 'completion' (columns: {', '.join(columns)}); prompt/completion rows need "
            "both (text, or lists of messages), and conversations a 'messages' list of {role, content}"
        )
    if "text" in columns or "prompt" in columns:
        kind = "plain 'text'" if "text" in columns else "'prompt'/'completion'"
        loss = (
            "the recipe sets assistant_only_loss: true, which needs conversations with assistant turns; "
            if sft.assistant_only_loss
            else ""
        )
        pretrain = (
            " — or, for continued pretraining on the text, set assistant_only_loss: false"
            if "text" in columns and sft.assistant_only_loss
            else ""
        )
        return (
            f"a non-conversational dataset ({kind} columns: {', '.join(columns)}) and no 'messages' column; "
            f"{loss}the toolkit checks and trains conversations: give each row a 'messages' list of "
            "{role, content} (e.g. user = the prompt, assistant = the completion)" + pretrain
        )
    return (
        f"no 'messages' column (columns: {', '.join(columns)}); assistant-only training needs each row's "
        "conversation as a 'messages' list of {role, content} (rename the column; ShareGPT 'conversations' "
        "of {from, value} are converted)"
    )


PROVENANCE = ("src_rows", "src_pos")


def truncate(tokenized, sft, *, provenance: bool = False):
    """TRL's truncation (no packing): slice input_ids and labels (and provenance) to max_length, keep_start or keep_end.

    `provenance`: also tag each kept token with its source row and its position in the row's tokenization
    (src_rows / src_pos, as `add_provenance` tags them before the cut), in the same pass over the tokens."""
    sl = slice(None, sft.max_length) if sft.truncation_mode == "keep_start" else slice(-sft.max_length, None)
    kwargs = _map_kwargs(tokenized, sft, "Truncating")
    if provenance and not kwargs:
        tokenized = add_provenance(tokenized, sft)
    cut_columns = [c for c in ("input_ids", "labels", *PROVENANCE) if c in tokenized.column_names]
    if kwargs:  # an Arrow dataset: the same slices, cut from the Arrow list offsets in numpy, a batch at a time
        keep_end = sft.truncation_mode != "keep_start"
        fn_kwargs = {"columns": cut_columns, "max_length": sft.max_length, "keep_end": keep_end}
        arrow = tokenized.with_format("arrow")
        if provenance:
            return arrow.map(_truncate_and_tag_arrow, batched=True, fn_kwargs=fn_kwargs, **kwargs).with_format(None)
        return arrow.map(_truncate_arrow, batched=True, fn_kwargs=fn_kwargs, **kwargs).with_format(None)

    def cut(example):
        return {c: example[c][sl] for c in cut_columns}

    return tokenized.map(cut)


def _truncate_arrow(batch, columns, max_length, keep_end):
    for name in columns:
        batch = batch.set_column(
            batch.schema.get_field_index(name), name, _sliced_lists(batch[name], max_length, keep_end)
        )
    return batch


def _truncate_and_tag_arrow(batch, columns, max_length, keep_end, tags=PROVENANCE):
    """`_truncate_arrow`, then src_rows / src_pos (those in `tags`) of the kept tokens: a row cut to its last
    `max_length` tokens keeps positions from its length less `max_length`."""
    import numpy as np
    import pyarrow as pa

    lengths = np.diff(batch["input_ids"].combine_chunks().offsets.to_numpy().astype(np.int64))
    batch = _truncate_arrow(batch, columns, max_length, keep_end)
    kept = np.minimum(lengths, max_length)
    offsets = np.concatenate([[0], np.cumsum(kept)])
    first = lengths - kept if keep_end else np.zeros(len(kept), dtype=np.int64)
    values = {
        "src_rows": lambda: np.repeat(batch["src_row"].to_numpy(), kept).astype(np.int32),
        "src_pos": lambda: (np.arange(offsets[-1]) - np.repeat(offsets[:-1] - first, kept)).astype(np.int32),
    }
    list_offsets = pa.array(offsets, type=pa.int32())
    for name in (name for name in PROVENANCE if name in tags):
        batch = batch.append_column(name, pa.ListArray.from_arrays(list_offsets, pa.array(values[name]())))
    return batch


def _sliced_lists(lists, max_length: int, keep_end: bool):
    """Each list cut to its first (or, keep_end, last) `max_length` items: Python's `items[:n]` / `items[-n:]`."""
    import numpy as np
    import pyarrow as pa

    lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)  # into the unsliced values
    kept = np.minimum(np.diff(offsets), max_length)
    starts = offsets[1:] - kept if keep_end else offsets[:-1]
    new_offsets = np.concatenate([[0], np.cumsum(kept)])
    take = np.arange(new_offsets[-1]) - np.repeat(new_offsets[:-1], kept) + np.repeat(starts, kept)
    values = lists.values.take(pa.array(take))
    return pa.ListArray.from_arrays(pa.array(new_offsets, type=lists.offsets.type), values)


def drop_fully_masked(truncated, sft):
    """TRL's filter after truncation: rows with no label left contribute no loss and are removed."""
    kwargs = _map_kwargs(truncated, sft, "Dropping fully masked examples")
    if kwargs:  # an Arrow dataset: each row's trained labels counted from the Arrow buffers
        return truncated.with_format("arrow").filter(_any_trained_arrow, batched=True, **kwargs).with_format(None)
    return truncated.filter(lambda example: any(label != -100 for label in example["labels"]))


def _any_trained_arrow(batch) -> list[bool]:
    import numpy as np

    labels = batch["labels"].combine_chunks()
    offsets = labels.offsets.to_numpy().astype(np.int64)
    flags = labels.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]] != -100
    trained = np.concatenate([[0], np.cumsum(flags)])
    return (trained[offsets[1:] - offsets[0]] > trained[offsets[:-1] - offsets[0]]).tolist()


def pack(tokenized, sft, *, provenance: bool = True):
    """TRL's `pack_dataset`, with each token's source row (and, but for bfd, its position in the row) carried along
    so each packed token knows where it came from (`provenance: False`: input_ids and labels only, exactly TRL's
    columns). bfd packs each row's first max_length tokens whole, so there a token's position in its row is its
    offset in its document and no `src_pos` is carried (`show` derives it)."""
    from trl.data_utils import pack_dataset

    columns = provenance_columns(sft) if provenance else ()
    if provenance and all(c in tokenized.column_names for c in columns):  # tagged already (`cut_for_bfd`)
        packable = tokenized.select_columns(["input_ids", "labels", *columns])
    elif provenance:
        packable = tokenized.select_columns(["input_ids", "labels", "src_row"])
        packable = add_provenance(packable, sft, columns).select_columns(["input_ids", "labels", *columns])
    else:
        packable = tokenized.select_columns(["input_ids", "labels"])
    if sft.shuffle_dataset:
        packable = packable.shuffle(seed=sft.seed)
    return pack_dataset(packable, sft.max_length, sft.packing_strategy, _map_kwargs(tokenized, sft, "Packing"))


def cut_for_bfd(tokenized, sft):
    """input_ids and labels cut to their first max_length tokens, with src_rows, ready for bfd packing (`pack`).

    bfd keeps each row's first max_length tokens and packs them whole (TRL's `_pack_bfd` cuts them so first), so
    cutting before packing changes no packed token. It serves memory: the caller releases the tokenized table
    before packing reads this one, so the process never holds the uncut tokens and a separate src_rows table at
    once (what made `prepare`'s bfd peak 1.14× TRL's with one process). A streamed dataset is returned as it is
    (`pack` tags it)."""
    kwargs = _map_kwargs(tokenized, sft, "Tagging tokens")
    if not kwargs:
        return tokenized
    columns = ["input_ids", "labels"]
    fn_kwargs = {"columns": columns, "max_length": sft.max_length, "keep_end": False, "tags": ("src_rows",)}
    return (
        tokenized.select_columns([*columns, "src_row"])
        .with_format("arrow")
        .map(_truncate_and_tag_arrow, batched=True, fn_kwargs=fn_kwargs, **kwargs)
        .with_format(None)
        .select_columns([*columns, "src_rows"])
    )


def provenance_columns(sft) -> tuple[str, ...]:
    """The provenance columns a packed dataset carries: src_rows, and src_pos unless bfd packs rows whole."""
    return ("src_rows",) if sft.packing_strategy == "bfd" else PROVENANCE


def add_provenance(tokenized, sft, columns: tuple[str, ...] = PROVENANCE):
    """src_rows / src_pos (or those of them in `columns`): each token's source row and its position in that row's
    tokenization (int32: columns as long as input_ids). On an Arrow dataset they are built from input_ids' list
    offsets in numpy, a batch at a time, without turning a single token into a Python object, into a table of
    their own that is joined to the tokenized one column by column (the tokens are not copied)."""
    from datasets import Dataset, Features, List, Value, concatenate_datasets

    kwargs = _map_kwargs(tokenized, sft, "Tagging tokens")
    if not isinstance(tokenized, Dataset):
        return tokenized.map(_provenance, fn_kwargs={"columns": columns}, **kwargs)
    tagged = tokenized.remove_columns([c for c in PROVENANCE if c in tokenized.column_names])
    tags = (
        tagged.select_columns(["input_ids", "src_row"])
        .with_format("arrow")
        .map(
            _provenance_arrow,
            batched=True,
            remove_columns=["input_ids", "src_row"],
            features=Features({c: List(Value("int32")) for c in columns}),
            fn_kwargs={"columns": columns},
            **kwargs,
        )
        .with_format(None)
    )
    return concatenate_datasets([tagged, tags], axis=1)


def _provenance(example, columns=PROVENANCE):
    n = len(example["input_ids"])
    tagged = {"src_rows": [example["src_row"]] * n, "src_pos": list(range(n))}
    return {name: tagged[name] for name in columns}


def _provenance_arrow(batch, columns=PROVENANCE):
    """The provenance columns of a batch (a table of them only)."""
    import numpy as np
    import pyarrow as pa

    ids = batch["input_ids"].combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]  # a sliced batch's offsets don't start at 0
    lengths = np.diff(offsets)
    rows = np.repeat(batch["src_row"].to_numpy(), lengths).astype(np.int32)
    pos = (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    list_offsets = pa.array(offsets, type=pa.int32())
    tags = {"src_rows": rows, "src_pos": pos}
    return pa.table({name: pa.ListArray.from_arrays(list_offsets, pa.array(tags[name])) for name in columns})


def _map_kwargs(dataset, sft, desc: str) -> dict:
    from datasets import Dataset

    return {"num_proc": sft.dataset_num_proc, "desc": desc} if isinstance(dataset, Dataset) else {}
