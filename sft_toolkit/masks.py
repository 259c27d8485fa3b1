"""Which characters and tokens of a rendered conversation the model learns from: the one home of that answer.

Everything goes through transformers' own renderer (`render_jinja_template`, the function behind
`apply_chat_template(..., return_assistant_tokens_mask=True)`), so the spans reported here are the spans
TRL's `assistant_only_loss` uses, not a re-implementation that could drift from them.
"""

from __future__ import annotations

import _signal
import json
import re
import signal
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template

from .problems import InputError

# Placeholders for the special-token variables templates read (`bos_token`, ...) when no tokenizer is given.
# transformers passes `tokenizer.special_tokens_map` to the template; these stand in for it in static use.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
}


# A generation tag in any whitespace-control form (`{%- generation %}`, `{%+ generation +%}`, ...).
GENERATION_MARKER = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")


class TemplateRaised(Exception):
    """The template itself refused the conversation (`raise_exception`, e.g. roles must alternate)."""


class RenderLimit(Exception):
    """A render ran past RENDER_SECONDS or wrote more than `over_render_limit` allows (a runaway template)."""


# Templates are code (from a tokenizer or a user). transformers renders them in jinja's
# ImmutableSandboxedEnvironment, which blocks unsafe attributes and caps `range()` at 100,000 items but bounds
# neither time (nested loops: 100,000 x 100,000 iterations) nor output size. Read at call time: tests lower them.
RENDER_SECONDS = 10.0
RENDER_CHARS_FLOOR = 1_000_000  # fixed text a template may add (system prompts, tool instructions) ...
RENDER_GROWTH = 20  # ... plus this many characters per character of the conversation (JSON)


def over_render_limit(size: int, messages, tools=None, *, tokens: bool = False) -> int | None:
    """The limit a render of `size` characters (or tokens) exceeds, None when it is within it.

    An honest template writes its own text (the floor) plus a few copies of the conversation. In tokens
    (check-data gets only token ids back) the floor assumes a typical 4 characters per token. Renders below
    the floor, i.e. all normal ones, cost one comparison.
    """
    floor = RENDER_CHARS_FLOOR // 4 if tokens else RENDER_CHARS_FLOOR
    if size <= floor:
        return None
    limit = floor + RENDER_GROWTH * len(json.dumps([messages, tools], default=str))
    return limit if size > limit else None


@contextmanager
def render_budget(what: str):
    """Stop the code inside after RENDER_SECONDS with `RenderLimit`.

    A timer signal, because a render is Python bytecode (jinja compiles templates to Python): the signal
    handler runs between bytecodes and raises inside the runaway loop, which a watchdog thread could not
    do, and the whole bound costs about 3.4 µs, where tokenizing a 461-token conversation takes 700 µs
    (`python benchmarks/render_bounds.py`). Signals reach only a process's main thread: datasets' `num_proc`
    workers are processes and run rows in their main thread, so they are bounded too; in any other thread,
    or under an outer timer that is already armed (left alone), the render runs unbounded.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return

    def stop(signum, frame):
        raise RenderLimit(f"{what}{': ' if what else ''}the chat template ran longer than {RENDER_SECONDS:g} s and "
                          "was stopped (a loop that does not end?); fix the template")

    # `_signal.signal` is the C function behind `signal.signal`, without its enum conversions (5 µs a call
    # against 0.5, twice per render).
    previous = _signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def template_error_text(err: Exception) -> str:
    """The error with the template line it happened on (jinja maps its frames to `<template>` lines)."""
    lines = [line for frame, line in traceback.walk_tb(err.__traceback__) if frame.f_code.co_filename == "<template>"]
    where = f" (template line {lines[-1]})" if lines else ""
    if isinstance(err, RecursionError):  # Python's wording varies with the stack depth it was hit at
        return f"RecursionError: a macro or loop calls itself without end{where}"
    name = "" if isinstance(err, jinja2.TemplateError) else f"{type(err).__name__}: "
    return f"{name}{err}{where}"


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and the character spans inside `{% generation %}` blocks (the trained text)."""

    text: str
    spans: list[tuple[int, int]]

    def trained_chars(self) -> list[bool]:
        flags = [False] * len(self.text)
        for start, end in self.spans:
            for i in range(start, end):
                flags[i] = True
        return flags


@dataclass(frozen=True)
class TokenMask:
    """A tokenized conversation: ids, the assistant mask TRL trains on, and each token's character offsets."""

    text: str
    ids: list[int]
    mask: list[int]
    offsets: list[tuple[int, int]]
    spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(self.mask)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Drop keys whose value is None, exactly as `apply_chat_template` does before rendering."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def render(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
    placeholders: bool = True,
    keep_none: bool = False,
) -> Rendered:
    """Render like `apply_chat_template` and return the text with its generation spans.

    `placeholders` fills bos_token/eos_token/... when no tokenizer provides them; pass False to render exactly
    as `apply_chat_template` does with a tokenizer's own special tokens. `keep_none` passes None values on to
    the template, as `render_jinja_template` does when called directly (`apply_chat_template` drops them).
    Raises `TemplateRaised` when the template calls `raise_exception` for this conversation, `InputError`
    for any other template failure (syntax, undefined attribute used as a callable, ...; with the template
    line), and `RenderLimit` for a runaway render (see `render_budget`, `over_render_limit`).
    """
    kwargs = {**(DEFAULT_SPECIAL_TOKENS if placeholders else {}), **(template_kwargs or {})}
    # transformers warns (once) when asked for a mask a template can't give; a template without markers
    # simply has no spans, which is what we report.
    marked = bool(GENERATION_MARKER.search(template))
    try:
        with render_budget(""):
            texts, spans = render_jinja_template(
                conversations=[messages if keep_none else normalize_messages(messages)],
                tools=tools,
                chat_template=template,
                return_assistant_tokens_mask=marked,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        if not marked:
            texts, spans = [texts] if isinstance(texts, str) else texts, [[]]
    except jinja2.TemplateSyntaxError as err:
        raise InputError(f"template syntax error at line {err.lineno}: {err.message}") from None
    except jinja2.TemplateError as err:
        # transformers' raise_exception raises a bare TemplateError; jinja's own errors are subclasses.
        if type(err) is jinja2.TemplateError:
            raise TemplateRaised(str(err)) from None
        raise InputError(f"template failed to render: {template_error_text(err)}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as err:
        raise InputError(f"template failed to render: {template_error_text(err)}") from None
    limit = over_render_limit(len(texts[0]), messages, tools)
    if limit:
        raise RenderLimit(f"the chat template wrote {len(texts[0]):,} characters for a conversation of "
                          f"{len(json.dumps(messages, default=str)):,} (limit {limit:,}); fix the template")
    return Rendered(text=texts[0], spans=[tuple(s) for s in spans[0]])


def tokenize(
    tokenizer,
    messages: list[dict],
    *,
    template: str | None = None,
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
) -> TokenMask:
    """Tokenize exactly as TRL does for `assistant_only_loss` (via `apply_chat_template`) and keep offsets.

    The ids and mask come from `apply_chat_template(return_assistant_tokens_mask=True)` itself; offsets come
    from the same call (`return_offsets_mapping`), so token i's text is `text[offsets[i][0]:offsets[i][1]]`.
    """
    template = template or tokenizer.chat_template
    special = {**tokenizer.special_tokens_map, **(template_kwargs or {})}
    rendered = render(template, messages, tools=tools, template_kwargs=special, placeholders=False)
    out = tokenizer.apply_chat_template(
        normalize_messages(messages),
        chat_template=template,
        tools=tools,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenizer_kwargs={"return_offsets_mapping": True},
        **(template_kwargs or {}),
    )
    return TokenMask(
        text=rendered.text,
        ids=list(out["input_ids"]),
        mask=list(out["assistant_masks"]),
        offsets=[tuple(o) for o in out["offset_mapping"]],
        spans=rendered.spans,
    )
