"""Which characters and tokens of a rendered conversation the model learns from: the one home of that answer.

Everything goes through transformers' own renderer (`render_jinja_template`, the function behind
`apply_chat_template(..., return_assistant_tokens_mask=True)`), so the spans reported here are the spans
TRL's `assistant_only_loss` uses, not a re-implementation that could drift from them.

It is also the one home of the render bounds. Chat templates are untrusted code, so every render the toolkit
runs, through this module or through transformers' `apply_chat_template` (TRL's tokenization), happens in
`BoundedSandbox`: transformers' own environment with a time budget, a memory budget and size checks in
jinja's sandbox hooks. Importing this module makes transformers compile chat templates in it (`install`).
"""

from __future__ import annotations

import _signal
import functools
import json
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import jinja2
import numpy as np
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
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
    """A render ran past RENDER_SECONDS, grew the process by more than RENDER_MEMORY, or wrote or built more text
    than `render_chars_limit` allows (a runaway template). The message names the template line."""


# Templates are code (from a tokenizer or a user). transformers renders them in jinja's
# ImmutableSandboxedEnvironment, which blocks unsafe attributes and caps `range()` at 100,000 items but bounds
# neither time (nested loops: 100,000 x 100,000 iterations), nor output size, nor memory (`'a' * 10**9`).
# `BoundedSandbox` below is that environment with one budget for every render, however it is started
# (transformers' `apply_chat_template`, TRL's tokenization, add-markers' traced render, lint, show):
# - time: RENDER_SECONDS per render;
# - memory: the process may grow by RENDER_MEMORY bytes during a render (checked every RENDER_TICK s);
# - size: no string or list the template builds, and not its output, may exceed `render_chars_limit`
#   (RENDER_CHARS_FLOOR + RENDER_GROWTH x the conversation's characters), checked *before* an operator, filter
#   or method that could make one in a single step (`*`, `**`, `+`, `~`, `%`, `center`, `join`, `replace`...).
# Read at call time: tests lower them.
RENDER_SECONDS = 10.0
RENDER_MEMORY = 1 << 30  # bytes
RENDER_TICK = 0.01  # seconds between the time and memory checks
RENDER_CHARS_FLOOR = 1_000_000  # fixed text a template may add (system prompts, tool instructions) ...
RENDER_GROWTH = 20  # ... plus this many characters per character of the conversation (JSON)
RENDER_INT_BITS = 65_536  # integers a template computes (`**`, `*`): far beyond any count or index


def render_chars_limit(conversation_chars: int) -> int:
    """The most characters a render of a conversation (its messages and tools as JSON) may write or build.

    An honest template writes its own text (the floor) plus a few copies of the conversation.
    """
    return RENDER_CHARS_FLOOR + RENDER_GROWTH * conversation_chars


def _rss_bytes() -> int:
    """The process's resident memory now (Linux /proc), else its peak so far (getrusage)."""
    pid = os.getpid()
    fd = _STATM.get(pid)
    if fd is None and pid not in _STATM:
        try:
            fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            fd = None
        _STATM[pid] = fd
    if fd is not None:
        return int(os.pread(fd, 64, 0).split()[1]) * _PAGE
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _in_template(frame) -> bool:
    """Whether `frame` or one of its callers is a compiled template's code."""
    while frame is not None:
        if "__jinja_template__" in frame.f_globals:
            return True
        frame = frame.f_back
    return False


_LATE_TICKS = 10  # ticks a stop may wait for the template's own code to be running (see `tick`)
_STATM: dict[int, int | None] = {}  # an fd per process: a forked worker must read its own /proc/<pid>/statm
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@contextmanager
def render_budget(what: str = ""):
    """Stop the code inside after RENDER_SECONDS, or once the process grew by RENDER_MEMORY, with `RenderLimit`.

    A timer signal every RENDER_TICK seconds, because a render is Python bytecode (jinja compiles templates to
    Python): the handler runs between bytecodes and raises inside the runaway loop, which a watchdog thread
    could not do. A render shorter than one tick (all honest ones) costs the timer's start and stop and one
    memory reading, a few µs (`python benchmarks/render_bounds.py`). Signals reach only a process's main
    thread: datasets' `num_proc` workers are processes and run rows in their main thread, so they are bounded
    too; in any other thread, or under an outer timer that is already armed (left alone, e.g. a render
    inside a render), the code runs without this budget.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return
    seconds, memory = RENDER_SECONDS, RENDER_MEMORY
    start, base, active, late = time.monotonic(), _rss_bytes(), [True], [0]
    prefix = f"{what}: " if what else ""

    def tick(signum, frame):
        if not active[0]:
            return
        over_time, grown = time.monotonic() - start >= seconds, _rss_bytes() - base
        if not over_time and grown <= memory:
            return
        # Raised inside the template's code, the error carries its line; between two chunks of output (the
        # caller's loop) it would not, so wait a few ticks for the template to be running again.
        if late[0] < _LATE_TICKS and not _in_template(frame):
            late[0] += 1
            return
        active[0] = False
        if over_time:
            raise RenderLimit(
                f"{prefix}the chat template ran longer than {seconds:g} s and was stopped (a loop that "
                "does not end?); fix the template"
            )
        raise RenderLimit(
            f"{prefix}the chat template used more than {memory / 2**20:,.0f} MiB of memory "
            f"({grown / 2**20:,.0f} MiB) and was stopped; fix the template"
        )

    # `_signal.signal` is the C function behind `signal.signal`, without its enum conversions (5 µs a call
    # against 0.5, twice per render).
    previous = _signal.signal(signal.SIGALRM, tick)
    interval = min(RENDER_TICK, seconds)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        _signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------------------
# The bounded sandbox: transformers' own environment, with size checks in jinja's sandbox hooks


class _Limits:
    """The size limit of the render in progress: computed from its conversation only when something is big."""

    def __init__(self, variables: dict):
        self.variables, self.conversation = variables, None

    def limit(self) -> int:
        if self.conversation is None:
            self.conversation = len(
                json.dumps([self.variables.get("messages"), self.variables.get("tools")], default=str)
            )
        return render_chars_limit(self.conversation)


_RENDER: ContextVar[_Limits | None] = ContextVar("sft_toolkit_render", default=None)


def _limit() -> int:
    limits = _RENDER.get()
    return limits.limit() if limits is not None else RENDER_CHARS_FLOOR


def _check(size: int, what: str, unit: str = "characters") -> None:
    """Refuse to build `what` of `size` characters (or items) when the render's limit is smaller."""
    if size > RENDER_CHARS_FLOOR and size > (limit := _limit()):
        raise RenderLimit(
            f"the chat template would build {what} of {size:,} {unit} (limit {limit:,}: "
            f"{RENDER_CHARS_FLOOR:,} + {RENDER_GROWTH} per character of the conversation); fix the "
            "template"
        )


def _text_size(value, budget: int | None = None) -> int:
    """How many characters `str(value)` would have, at least (containers summed item by item, stopping early
    once past `budget`), without building it."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return 5
    if isinstance(value, int):
        return value.bit_length() * 3 // 10 + 2
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        budget = _limit() if budget is None else budget
        total = 2
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            total += 2 + _text_size(item, budget)
            if total > budget:
                break
        return total
    return 0


def _check_ints(arguments, name: str) -> None:
    """A width, count or length argument (`center(10**9)`, `batch(10**9, x)`) can be a size: same limit."""
    for value in arguments:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and abs(value) > RENDER_CHARS_FLOOR
            and abs(value) > (limit := _limit())
        ):
            raise RenderLimit(
                f"the chat template passes {value:,} to {name} (limit {limit:,}: a size, width or count "
                f"beyond the longest text the render may build); fix the template"
            )


def _formatted_size(template: str, arguments) -> int:
    """Characters `template % arguments` or `template.format(...)` can write: the text, the arguments, and
    every width or precision written in the template."""
    widths = sum(int(n) for spec in _FORMAT_SPEC.findall(template) for n in spec if n)
    return len(template) + widths + sum(_text_size(a) for a in arguments)


# Widths and precisions in `%` specs (`%-10.3f`) and `{}` fields (`{:>10}`, `{0:^{w}.5}`).
_FORMAT_SPEC = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?|\{[^{}:]*:[^{}\d]*(\d*)(?:\.(\d*))?")


def _replaced_size(text: str, old: str, new: str, count: int = -1) -> int:
    hits = text.count(old) if old else len(text) + 1
    if count is not None and 0 <= count < hits:
        hits = count
    return len(text) + hits * max(0, len(new) - len(old))


def _values(args, kwargs):
    return [*args, *kwargs.values()]


def _method_check(method, args, kwargs) -> None:
    """Size checks for the string methods that can write far more than they read in one call."""
    target = getattr(method, "__self__", None)
    if not isinstance(target, str):
        return
    name = method.__name__
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check(_replaced_size(target, args[0], args[1], args[2] if len(args) > 2 else -1), "a replaced string")
    elif name == "format":
        _check(_formatted_size(target, _values(args, kwargs)), "a formatted string")
    elif name == "format_map" and args and isinstance(args[0], dict):
        _check(_formatted_size(target, list(args[0].values())), "a formatted string")


_SEQUENCES = (str, list, tuple)


def _repeated(value) -> tuple[str, str]:
    return (
        ("a repeated string", "characters")
        if isinstance(value, str)
        else (f"a repeated {type(value).__name__}", "items")
    )


def _joined(value) -> tuple[str, str]:
    return (
        ("a string of two joined (`+`)", "characters")
        if isinstance(value, str)
        else (f"a {type(value).__name__} of two joined (`+`)", "items")
    )


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, bounded: every render runs in `render_budget`, and every operator, call and
    filter that could build a huge string, list or number in one step is checked first (see the limits above).

    `install()` makes transformers build its chat-template environment from this class, so its own
    `apply_chat_template` (and TRL's tokenization through it) renders within the same bounds, with its own
    globals, filters and `{% generation %}` extension, and writes exactly what it wrote before.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = _BoundedFilters(self.filters)
        if self.finalize is None:  # every printed `{{ }}` value passes here; strings cost one isinstance
            self.finalize = self.bounded_value

    def call_binop(self, context, operator, left, right):
        # Honest templates add short strings all the time: one size comparison decides, the checks come after.
        if operator == "+":
            if (
                isinstance(left, _SEQUENCES)
                and isinstance(right, _SEQUENCES)
                and len(left) + len(right) > RENDER_CHARS_FLOOR
            ):
                _check(len(left) + len(right), *_joined(left))
        elif operator == "*":
            if isinstance(right, int) and isinstance(left, _SEQUENCES):
                _check(len(left) * max(right, 0), *_repeated(left))
            elif isinstance(left, int) and isinstance(right, _SEQUENCES):
                _check(len(right) * max(left, 0), *_repeated(right))
            elif (
                isinstance(left, int)
                and isinstance(right, int)
                and (bits := left.bit_length() + right.bit_length()) > RENDER_INT_BITS
            ):
                raise RenderLimit(
                    f"the chat template would compute a number of {bits:,} bits (limit "
                    f"{RENDER_INT_BITS:,}); fix the template"
                )
        elif operator == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and abs(left) > 1
                and right * left.bit_length() > RENDER_INT_BITS
            ):
                raise RenderLimit(
                    f"the chat template would compute a number of about {right * left.bit_length():,} "
                    f"bits (limit {RENDER_INT_BITS:,}); fix the template"
                )
        elif operator == "%" and isinstance(left, str):
            arguments = (
                right if isinstance(right, tuple) else list(right.values()) if isinstance(right, dict) else [right]
            )
            _check_ints(arguments, "`%`")
            _check(_formatted_size(left, arguments), "a formatted string")
        return self.binop_table[operator](left, right)

    def call(self, context, obj, /, *args, **kwargs):
        # What builds a large object in one C-level step: a string method (`ljust(10**9)`, `replace`, `join`,
        # `format`, the sandbox's wrapper of it) or `range`. Macros, filters called as functions and other
        # Python code run as bytecode, which the timer bounds.
        method = getattr(obj, "__wrapped__", obj)
        if (args or kwargs) and (isinstance(getattr(method, "__self__", None), str) or obj is safe_range):
            _check_ints(_values(args, kwargs), "`range`" if obj is safe_range else f"`{method.__name__}`")
            if method.__name__ == "join" and args:
                items = list(args[0])  # a generator is read twice: materialize it once
                _check(sum(_text_size(i) for i in items) + len(method.__self__) * len(items), "a joined string")
                args = (items, *args[1:])
            else:
                _method_check(method, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    @staticmethod
    def bounded_value(value):
        """A printed `{{ }}` value, unchanged; one that is not a string (a list, a dict...) is size-checked first."""
        if not isinstance(value, str):
            _check(_text_size(value), "the printed text of a value")
        return value

    def bounded_join(self, parts) -> str:
        """The `~` operator (jinja's `str_join`), with the result's size checked first."""
        parts = [p if isinstance(p, str) else str(self.bounded_value(p)) for p in parts]
        _check(sum(map(len, parts)), "a string of joined parts (`~`)")
        return "".join(parts)


class _BoundedCodeGenerator(CodeGenerator):
    """jinja's code generator, with `~` going through the sandbox's check."""

    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _filter_size(name: str, args: list, kwargs: dict) -> tuple | None:
    """What a filter that can write far more than it reads would build: (size, what[, unit]), else None."""
    value = args[0] if args else None

    def option(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name == "replace" and isinstance(value, str):
        old, new, count = str(option(1, "old", "")), str(option(2, "new", "")), option(3, "count")
        return _replaced_size(value, old, new, count if isinstance(count, int) else -1), "a replaced string"
    if name == "indent" and isinstance(value, str) and isinstance(width := option(1, "width", 4), str):
        return len(value) + (value.count("\n") + 1) * len(width), "an indented string"
    if name == "wordwrap" and isinstance(value, str):
        width, wrap = option(1, "width", 79), option(4, "wrapstring") or "\n"
        width = width if isinstance(width, int) and width > 0 else 1
        return len(value) + (len(value) // width + 1) * len(str(wrap)), "a wrapped string"
    if name == "format" and isinstance(value, str):
        return _formatted_size(value, _values(args[1:], kwargs)), "a formatted string"
    if name in ("string", "pprint", "tojson", "list"):
        indent = option(2, "indent") if name == "tojson" else None
        scale = 1 + (len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0)
        return _text_size(value) * max(scale, 1), f"the `{name}` text of a value", "characters"
    if name == "sum" and isinstance(option(2, "start"), (list, tuple)):
        return sum(len(v) for v in value if isinstance(v, (list, tuple, str))), "a summed list", "items"
    return None


# Filters whose output can be far larger than their input (a width, a count, a separator, a repr of shared
# items); the others write at most a few times what they read (`escape`: 6x) or less (`trim`, `map`, `sort`).
_AMPLIFYING_FILTERS = frozenset(
    {
        "batch",
        "center",
        "filesizeformat",
        "format",
        "indent",
        "join",
        "list",
        "pprint",
        "replace",
        "slice",
        "string",
        "sum",
        "tojson",
        "truncate",
        "urlize",
        "wordwrap",
    }
)


class _BoundedFilters(dict):
    """The environment's filters, the amplifying ones checked before they run (compiled templates look them
    up by name, and `map`/`select` through `get`)."""

    def __getitem__(self, name):
        return _bounded_filter(name, dict.__getitem__(self, name))

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default


def _bounded_filter(name: str, function):
    if name not in _AMPLIFYING_FILTERS or getattr(function, "_sft_toolkit_bounded", False):
        return function
    # A filter marked `pass_context` / `pass_eval_context` / `pass_environment` gets that object first.
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        if name == "join" and len(args) > skip:  # materialize a generator once: it is read twice
            items = list(args[skip])
            separator = args[skip + 1] if len(args) > skip + 1 else kwargs.get("d", "")
            _check(sum(_text_size(i) for i in items) + len(str(separator)) * len(items), "a joined string")
            args = (*args[:skip], items, *args[skip + 1 :])
        else:
            _check_ints(_values(args[skip + 1 :], kwargs), f"the filter `{name}`")
            size = _filter_size(name, list(args[skip:]), kwargs)
            if size:
                _check(*size)
        return function(*args, **kwargs)

    bounded._sft_toolkit_bounded = True
    return bounded


class _BoundedTemplate(jinja2.Template):
    """A compiled template whose every render (`render`, `generate`) runs in one budget and keeps its output
    within `render_chars_limit`; a `RenderLimit` names the template line it stopped at."""

    def render(self, *args, **kwargs) -> str:
        return "".join(self.generate(*args, **kwargs))

    def generate(self, *args, **kwargs):
        variables = dict(*args, **kwargs)
        limits = _Limits(variables)
        token = _RENDER.set(limits)
        try:
            with render_budget():
                written = 0
                for chunk in super().generate(variables):
                    written += len(chunk)
                    if written > RENDER_CHARS_FLOOR and written > limits.limit():
                        raise RenderLimit(
                            f"the chat template wrote {written:,} characters for a conversation of "
                            f"{limits.conversation:,} (limit {limits.limit():,}) and was stopped; fix "
                            "the template"
                        )
                    yield chunk
        except RenderLimit as err:
            raise RenderLimit(f"{err}{_template_line(err)}") from None
        finally:
            _RENDER.reset(token)


BoundedSandbox.template_class = _BoundedTemplate
BoundedSandbox.code_generator_class = _BoundedCodeGenerator


def install() -> None:
    """Make transformers compile chat templates in `BoundedSandbox` (its compiler names the class it builds).

    Why a patch: TRL tokenizes through transformers' `apply_chat_template`, which offers no hook for the
    environment, and an untrusted template must be bounded there too, not only in the toolkit's own renders.
    The subclass only adds checks before work is done; tests/test_render_bounds.py proves every bundled
    template renders the same text and spans as under transformers' own class. It is process-wide: anything
    else that renders a chat template in this process is bounded as well.
    """
    from transformers.utils import chat_template_utils

    if chat_template_utils.ImmutableSandboxedEnvironment is not BoundedSandbox:
        chat_template_utils.ImmutableSandboxedEnvironment = BoundedSandbox
        chat_template_utils._compile_jinja_template.cache_clear()


install()


def _template_line(err: BaseException) -> str:
    lines = [line for frame, line in traceback.walk_tb(err.__traceback__) if frame.f_code.co_filename == "<template>"]
    return f" (template line {lines[-1]})" if lines else ""


def template_error_text(err: Exception) -> str:
    """The error with the template line it happened on (jinja maps its frames to `<template>` lines)."""
    where = _template_line(err)
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
    line), and `RenderLimit` for a runaway render (see `render_budget`, `BoundedSandbox`).
    """
    kwargs = {**(DEFAULT_SPECIAL_TOKENS if placeholders else {}), **(template_kwargs or {})}
    # transformers warns (once) when asked for a mask a template can't give; a template without markers
    # simply has no spans, which is what we report.
    marked = bool(GENERATION_MARKER.search(template))
    try:
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
    except (RenderLimit, InputError):
        raise
    except Exception as err:  # noqa: BLE001 - whatever the template's code raised (IndexError, OverflowError...)
        raise InputError(f"template failed to render: {template_error_text(err)}") from None
    # With `continue_final_message` transformers cuts the text after the final message but not the spans
    # (a block that ran past the cut ends beyond the text): only the text that exists can be trained.
    text = texts[0]
    return Rendered(text=text, spans=[(start, min(end, len(text))) for start, end in spans[0] if start < len(text)])


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


def assistant_mask(offsets, spans) -> np.ndarray:
    """Which tokens `apply_chat_template(return_assistant_tokens_mask=True)` marks, from their character offsets
    and the render's generation spans: transformers' own rule, for a tokenization done elsewhere (a batch call).

    transformers walks the tokens in order with a pointer into the spans: the pointer skips every span that ends
    at or before the token's start, and the token is marked when it ends after the start of the span the pointer
    is at (so a token straddling a span's edge is marked). With span ends and token starts both in order (every
    render and fast tokenizer here), the pointer is the first span ending after the token's start, which numpy
    finds for all tokens at once; otherwise the loop below repeats transformers' own, step for step.
    """
    token = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if not len(bounds) or not len(token):
        return np.zeros(len(token), dtype=bool)
    if np.all(bounds[1:, 1] >= bounds[:-1, 1]) and np.all(token[1:, 0] >= token[:-1, 0]):
        at = np.searchsorted(bounds[:, 1], token[:, 0], side="right")
        inside = at < len(bounds)
        mask = np.zeros(len(token), dtype=bool)
        mask[inside] = token[inside, 1] > bounds[at[inside], 0]
        return mask
    mask = np.zeros(len(token), dtype=bool)
    span_idx = 0
    for token_id, (token_start, token_end) in enumerate(token.tolist()):
        while span_idx < len(bounds) and token_start >= bounds[span_idx][1]:
            span_idx += 1
        if span_idx == len(bounds):
            break
        if token_end > bounds[span_idx][0]:
            mask[token_id] = True
    return mask


def span_token_ranges(encoding, spans, token_count: int) -> list[tuple[int, int]] | None:
    """The tokens `assistant_mask` marks for a row's generation `spans`, read at the spans' edges only: a
    [first, stop) range of token indices per span, or None when the edges can't tell (a span edge on a character
    no token covers, spans out of order), and the caller walks every offset instead.

    `encoding`: the row's `tokenizers.Encoding`, from a tokenizer whose offsets are in order (`offsets_in_order`),
    starts and ends both non-decreasing: a normalizer aligns each character it writes with the characters it came
    from, in order; pre-tokenizers split the text in order; a model writes a word's tokens in order (the pieces of
    one character share its offsets). With spans in order too, transformers' walk marks a token exactly when it
    overlaps a span (its end past the span's start, its start before the span's end; an empty span marks the token
    straddling it), and those tokens are one run per span: from the first token ending after the span's start
    (`char_to_token` of the start: the first token holding it) to the last one starting before its end
    (`char_to_token` of the end's character, moved on, one `token_to_chars` at a time, past the tokens that share
    it or start before the end). No offset list is read into Python.
    """
    for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
        if next_start < start or next_end < end:
            return None
    ranges = []
    for start, end in spans:
        if start > end:
            return None
        first = encoding.char_to_token(start)  # the first token holding the character
        if first is None:
            return None
        last = first - 1 if end == start else encoding.char_to_token(end - 1)
        if last is None:
            return None
        while last + 1 < token_count and encoding.token_to_chars(last + 1)[0] < end:
            last += 1
        if last >= first:
            ranges.append((first, last + 1))
    return ranges


# Post-processors that leave the model's offsets as they are: ByteLevel and RobertaProcessing only without
# `trim_offsets`, which `offsets_in_order` reads from their settings.
_OFFSET_KEEPING_PROCESSORS = frozenset({"TemplateProcessing", "BertProcessing", "ByteLevel", "RobertaProcessing"})


def _keeps_offsets(spec: dict) -> bool:
    if spec.get("type") == "Sequence":
        return all(_keeps_offsets(part) for part in spec.get("processors", []))
    return spec.get("type") in _OFFSET_KEEPING_PROCESSORS and not spec.get("trim_offsets", False)


def offsets_in_order(backend) -> bool:
    """Whether the encodings of `backend` (a `tokenizers.Tokenizer`) have their offsets in order, starts and ends
    both non-decreasing, so that `span_token_ranges` may read a row's mask at its spans' edges.

    True unless one of two parts of the pipeline can write them out of order
    (`tests/test_mask_edges_adversarial.py` builds both), and transformers' walk then marks other tokens than the
    edges would:
    - a post-processor that trims offsets (ByteLevel's or RobertaProcessing's `trim_offsets`, GPT-2's and
      RoBERTa's, applied even with `add_special_tokens=False`), or one this function does not know. Trimming moves
      a token's start past the leading spaces of its *text*: a space the pipeline wrote shares its offsets with the
      character it was written for (ByteLevel's `add_prefix_space` before the text after an added token, NFKC's
      '¸' -> ' ̧'), so the space's token starts after that character while the next token starts at it;
    - an added token that strips the whitespace around it (`lstrip`/`rstrip`): its offsets take in the whitespace
      after it even where another added token ('\n') matches there, and that token follows with offsets inside.
    """
    if any(token.lstrip or token.rstrip for token in backend.get_added_tokens_decoder().values()):
        return False
    processor = backend.post_processor
    if processor is None:
        return True
    return _keeps_offsets(json.loads(processor.__getstate__()))


def batch_assistant_mask(encodings, spans, token_counts, *, in_order: bool) -> np.ndarray:
    """`assistant_mask` of several rows at once, as one flat array (the rows' tokens back to back): each row's
    `tokenizers.Encoding`, generation spans and token count. When the tokenizer's offsets are in order
    (`in_order`: `offsets_in_order` of the tokenizer that wrote `encodings`), a row's marked tokens come from its
    spans' edges (`span_token_ranges`); every other row has its offsets walked by `assistant_mask`."""
    token_counts = np.asarray(token_counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(token_counts)])
    opened, closed, walked = [], [], []
    for row, (encoding, row_spans) in enumerate(zip(encodings, spans)):
        ranges = span_token_ranges(encoding, row_spans, int(token_counts[row])) if in_order else None
        if ranges is None:
            walked.append(row)
            continue
        for first, stop in ranges:
            opened.append(starts[row] + first)
            closed.append(starts[row] + stop)
    total = int(starts[-1])
    depth = np.bincount(np.asarray(opened, dtype=np.int64), minlength=total + 1) - np.bincount(
        np.asarray(closed, dtype=np.int64), minlength=total + 1
    )
    mask = np.cumsum(depth[:total]) > 0
    for row in walked:
        mask[starts[row] : starts[row + 1]] = assistant_mask(encodings[row].offsets, spans[row])
    return mask
