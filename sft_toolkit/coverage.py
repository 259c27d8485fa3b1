"""Content coverage: does a row's mask train what the assistant wrote, and nothing anyone else wrote?

A mask can be non-empty and still wrong. A template that iterates over content parts renders nothing for
a string content and trains only its end-of-turn marker; a misplaced generation block trains the user's
question. check-data's zero-mask accounting sees neither, so each row is also checked on the render's
characters (the generation spans transformers turns into TRL's mask):

- every assistant message the row trains has its content (each text part) and its tool calls (function
  name and argument values) inside trained spans: else `assistant_content_untrained`;
- no character of a user, system or tool message's text is trained: else `non_assistant_text_trained`.

Exempt: assistant messages switched off (`train: false`, `train_roles`, `train_turns`; sft_toolkit/policy.py),
their `reasoning_content`, and reasoning written into the content before `</think>` (templates such as
qwen3 drop the reasoning of earlier turns by design). A switched-off message is held to the opposite rule, on
the characters of the row's final labels (`trained_spans`), not on the spans the policy kept: no character of its
text may be trained (`switched_off_turn_trained`, `switched_off_problems`), which a token it shares with a trained
neighbour (`Hel` + `lo` written back to back as one token `Hello`) breaks.

Finding a message's text in the render. Messages are looked for in order, each from where the previous
one was found, as written, stripped (templates `trim` content) or JSON-escaped (templates that print with
`tojson`); for an assistant message the first fully trained occurrence before the next message's text
counts, so a short text that also occurs in markup (`N` in `[/INST]`) is not mistaken for it. A text found
in no such form is not a failure by itself: the template changed or dropped it (llama 3.1 writes a turn's
tool calls without its content), which this check can't judge. But a row in which no trained assistant
message's text is found at all, while its mask trains something, trains only markup: that is
`assistant_content_untrained`, on the first such message. A user text found trained inside what is also an
assistant message's text (a system prompt the template drops, quoted by the answer) is not a failure either.

Prompt/completion rows (TRL's `completion_only_loss`) are held to the same rules with the prompt as context: the
completion's assistant messages must be trained, and no character of the prompt's text may be, whatever the
role that wrote it (`prompt_text_trained`): TRL starts the completion where the prompt rendered alone (with the
generation prompt) and prompt + completion stop agreeing, and only warns when that is inside the prompt (a
template that renders the prompt differently when a completion follows, tokens merged across the boundary).
The trained characters of such a row are its trained tokens' offsets (`trained_spans`), not generation spans.
Where the two renders part in the markup between the prompt's text and the completion's (a template that ends
the last prompt turn differently when a generation prompt follows), no text is trained but the markup is: what
the prompt rendered alone ends with (the generation prompt, which inference supplies) is trained in front of the
completion's text (`generation_prompt_trained`, on the last prompt message; `generation_prompt_problem`).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

ASSISTANT_CONTENT_UNTRAINED = "assistant_content_untrained"
NON_ASSISTANT_TEXT_TRAINED = "non_assistant_text_trained"
PROMPT_TEXT_TRAINED = "prompt_text_trained"
GENERATION_PROMPT_TRAINED = "generation_prompt_trained"
SWITCHED_OFF_TURN_TRAINED = "switched_off_turn_trained"
REASONING_END = "</think>"


@dataclass(frozen=True)
class CoverageProblem:
    """`message`: the offending message's position in the row's `messages`."""

    reason: str
    message: int


def columns(problems: list[CoverageProblem] = (), *, unchecked: bool = False) -> dict:
    """A tokenized row's coverage columns: its first problem (`coverage_reason`, `coverage_message`; "" and -1
    when none), every problem, in message order, as JSON `[[reason, message], ...]` (`coverage_problems`;
    "" when none: a string column types the same in every batch), and whether the row's coverage could not be
    checked (`coverage_unchecked`, 1: no verdict, counted in the report, never a pass)."""
    first = problems[0] if problems else CoverageProblem("", -1)
    every = json.dumps([[p.reason, p.message] for p in problems]) if problems else ""
    return {
        "coverage_reason": first.reason,
        "coverage_message": first.message,
        "coverage_problems": every,
        "coverage_unchecked": int(unchecked),
    }


def problems_from(column: str) -> list[CoverageProblem]:
    """The problems `columns` wrote into `coverage_problems`."""
    return [CoverageProblem(reason, message) for reason, message in json.loads(column)] if column else []


def trained_spans(offsets, labels) -> list[tuple[int, int]]:
    """The characters a row trains: the offsets of its tokens whose label is not -100, each run of trained
    tokens as one span (from its first token's start to its last token's end)."""
    spans: list[tuple[int, int]] = []
    run_start = run_end = None
    for (start, end), label in zip(offsets, labels):
        if start >= end:
            continue  # a token of no characters (one the tokenizer adds): nothing to train or to break a run
        if label == -100:
            if run_start is not None:
                spans.append((run_start, run_end))
                run_start = None
        elif run_start is None:
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    if run_start is not None:
        spans.append((run_start, run_end))
    return spans


class TrainedSpans:
    """The trained characters of a render as merged, sorted intervals, asked about ranges in O(log n)."""

    def __init__(self, spans):
        merged: list[list[int]] = []
        for start, end in sorted(s for s in spans if s[0] < s[1]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def all_trained(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def any_trained(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self.ends, start + 1)  # the first interval ending after `start`
        return i < len(self.starts) and self.starts[i] < end


def content_pieces(message: dict) -> list[str]:
    """The texts of a message's content that must show: the string, or each text part; for an assistant
    message, only what follows reasoning written into the content (`...</think>answer`)."""
    content = message.get("content")
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    else:
        texts = []
    if message.get("role") == "assistant":
        texts = [t.rsplit(REASONING_END, 1)[1] if REASONING_END in t else t for t in texts]
    return [t.strip() for t in texts if t.strip()]


def call_pieces(message: dict) -> list[str]:
    """The texts a message's tool calls are made of: each function's name and its argument values."""
    out = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        if not isinstance(function, dict):
            continue
        out.append(function.get("name"))
        out += _leaves(function.get("arguments"))
    return [v.strip() for v in out if isinstance(v, str) and v.strip()]


def _leaves(value) -> list[str]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [json.dumps(value)]
    return []  # booleans and null: templates spell them differently (True, true)


def forms(piece: str, text: str) -> list[str]:
    """A text as a template may print it into `text`: as written, or JSON-escaped (`tojson`), without the quotes.
    Every escaped form that differs from the text as written has a backslash, so a `text` without one can only
    hold the text as written."""
    out = [piece]
    if "\\" not in text or (piece.isascii() and piece.isprintable() and '"' not in piece and "\\" not in piece):
        return out  # JSON writes it as it is, or `text` holds no escaped form
    for encoded in (json.dumps(piece, ensure_ascii=False), json.dumps(piece)):
        if encoded[1:-1] not in out:
            out.append(encoded[1:-1])
    return out


def _find(text: str, piece: str, start: int, stop: int | None = None) -> tuple[int, int] | None:
    """The first occurrence of any form of `piece` in text[start:stop]."""
    found = [
        (at, at + len(f)) for f in forms(piece, text) if (at := text.find(f, start, stop if stop else len(text))) >= 0
    ]
    return min(found, default=None)


def _find_trained(text: str, piece: str, start: int, stop, trained: TrainedSpans) -> tuple[tuple | None, bool]:
    """The first occurrence of `piece` from `start` when it is fully trained (True); else the first fully trained
    one before `stop()` (where the next message shows, asked only then), else the first one (False)."""
    found = _find(text, piece, start)
    if found is None or trained.all_trained(*found):
        return found, found is not None
    limit = stop()
    for form in forms(piece, text):
        at = text.find(form, start, limit)
        while at >= 0:
            if trained.all_trained(at, at + len(form)):
                return (at, at + len(form)), True
            at = text.find(form, at + 1, limit)
    return found, False


def coverage_problems(
    text: str, spans, messages: list[dict], trained_messages: set[int] | None = None, prompt_messages: int = 0
) -> list[CoverageProblem]:
    """What the row's trained spans get wrong, one problem per offending message, in message order.

    `trained_messages`: the assistant messages the row trains (default: all); the others are exempt.
    `prompt_messages`: how many leading messages are a prompt/completion row's prompt (context whatever their
    role: any trained character of their text is PROMPT_TEXT_TRAINED).
    """
    trained = TrainedSpans(spans)
    if not trained.starts:
        return []  # nothing trained: the zero-mask accounting reports the row
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and i >= prompt_messages]
    if trained_messages is None:
        trained_messages = set(assistant)
    problems, missing, found_any = [], [], False
    assistant_regions: list[tuple[int, int]] = []
    cursor = 0
    for j, message in enumerate(messages):
        if message.get("role") == "assistant" and j >= prompt_messages:
            pieces = content_pieces(message) + call_pieces(message)
            end, untrained, lost = cursor, False, False
            for piece in pieces:
                at, ok = _find_trained(text, piece, cursor, lambda: _next_anchor(text, messages, j, cursor), trained)
                if at is None:
                    lost = True
                    continue
                found_any = found_any or j in trained_messages
                assistant_regions.append(at)
                end = max(end, at[1])
                untrained = untrained or not ok
            if j in trained_messages:
                if untrained:
                    problems.append(CoverageProblem(ASSISTANT_CONTENT_UNTRAINED, j))
                elif lost and pieces:
                    missing.append(j)
            cursor = end
            continue
        pieces = content_pieces(message)
        for piece in pieces:
            at = _find(text, piece, cursor)
            if at is None:
                continue
            if trained.any_trained(*at):
                if _inside_assistant_text(text, at, messages, assistant):
                    continue  # can't be told from an answer that quotes it: no verdict, and no anchor either
                problems.append(
                    CoverageProblem(PROMPT_TEXT_TRAINED if j < prompt_messages else NON_ASSISTANT_TEXT_TRAINED, j)
                )
                break
            cursor = at[1]
    if missing and not found_any and not any(p.reason == ASSISTANT_CONTENT_UNTRAINED for p in problems):
        problems.append(CoverageProblem(ASSISTANT_CONTENT_UNTRAINED, missing[0]))
    return sorted(problems, key=lambda p: p.message)


def switched_off_problems(text: str, spans, messages: list[dict], trained_messages: set[int]) -> list[CoverageProblem]:
    """SWITCHED_OFF_TURN_TRAINED for each assistant message outside `trained_messages` (switched off) that has a
    character of its text (content, tool calls) trained. `spans`: the trained characters of the row's final labels
    (`trained_spans` of its tokens' offsets), so this reads what the trainer gets, not what the policy meant.

    Messages are found in order, each from where the previous one was found (a switched-off one before the next
    user/system/tool message's text); an occurrence inside a trained assistant message's text (a switched-off answer
    that a later one quotes) is no verdict."""
    trained = TrainedSpans(spans)
    if not trained.starts:
        return []
    kept = [i for i in trained_messages if messages[i].get("role") == "assistant"]
    problems, cursor = [], 0
    for j, message in enumerate(messages):
        assistant = message.get("role") == "assistant"
        off = assistant and j not in trained_messages
        # A switched-off message's text is looked for before the next other message's text only (not found there:
        # the template dropped it, and a later turn's occurrence is not its own).
        stop = _next_anchor(text, messages, j, cursor) if off else None
        for piece in content_pieces(message) + (call_pieces(message) if assistant else []):
            at = _find(text, piece, cursor, stop)
            if at is None:
                continue
            if off and trained.any_trained(*at) and not _inside_assistant_text(text, at, messages, kept):
                problems.append(CoverageProblem(SWITCHED_OFF_TURN_TRAINED, j))
                off = False  # one problem per message
            cursor = at[1]
    return problems


def generation_prompt_problem(
    text: str, spans, messages: list[dict], prompt_messages: int, prompt_alone
) -> CoverageProblem | None:
    """GENERATION_PROMPT_TRAINED when a trained, non-blank character in front of the completion's first text
    belongs to the end the prompt rendered alone (`prompt_alone()`, asked only then) shares with the render up to
    that text: markup inference supplies, trained as if the model wrote it. Markup of the completion's own (an
    empty think block) and the prompt's end that the full render drops (TRL's `common_prefix_length` case) are
    not."""
    trained = TrainedSpans(spans)
    start = _completion_start(text, messages, prompt_messages)
    if not trained.starts or start is None or trained.starts[0] >= start:
        return None
    first = trained.starts[0]
    if not any(
        not c.isspace() and trained.all_trained(first + i, first + i + 1) for i, c in enumerate(text[first:start])
    ):
        return None
    prompt, shared = prompt_alone(), 0
    while shared < min(len(prompt), start - first) and prompt[-1 - shared] == text[start - 1 - shared]:
        shared += 1
    end = text[start - shared : start]
    if any(
        not c.isspace() and trained.all_trained(start - shared + i, start - shared + i + 1) for i, c in enumerate(end)
    ):
        return CoverageProblem(GENERATION_PROMPT_TRAINED, prompt_messages - 1)
    return None


def _completion_start(text: str, messages: list[dict], prompt_messages: int) -> int | None:
    """Where the first text of the completion's messages shows, after the prompt's texts (None: it doesn't)."""
    cursor = 0
    for message in messages[:prompt_messages]:
        for piece in content_pieces(message):
            if (at := _find(text, piece, cursor)) is not None:
                cursor = at[1]
    for message in messages[prompt_messages:]:
        for piece in content_pieces(message) + call_pieces(message):
            if (at := _find(text, piece, cursor)) is not None:
                return at[0]
    return None


def _next_anchor(text: str, messages: list[dict], j: int, cursor: int) -> int:
    """Where the first later non-assistant message's text shows (the end of the render when none does)."""
    for message in messages[j + 1 :]:
        if message.get("role") == "assistant":
            continue
        for piece in content_pieces(message):
            if (at := _find(text, piece, cursor)) is not None:
                return at[0]
    return len(text)


def _inside_assistant_text(text: str, at: tuple[int, int], messages: list[dict], assistant: list[int]) -> bool:
    """Whether the range lies inside some occurrence of an assistant message's text (then it can't be told
    from the answer that quotes it)."""
    for i in assistant:
        for piece in content_pieces(messages[i]) + call_pieces(messages[i]):
            for form in forms(piece, text):
                k = text.find(form)
                while k >= 0:
                    if k <= at[0] and at[1] <= k + len(form):
                        return True
                    k = text.find(form, k + 1)
    return False
