"""Where each assistant turn is in a rendered conversation: the one turn model lint and add-markers share.

A turn's place is found without knowing the template's family: `render(messages[:i],
add_generation_prompt=True)` ends where the model starts writing turn i, so everything the template emits
from there up to the turn's end-of-turn text is the assistant's output. lint compares what a template
trains with these turns; add-markers labels every rendered character with them before placing markers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import policy as control
from .masks import Rendered, TemplateRaised, render
from .probes import Probe, fallback_variants, probe_variants, text_of
from .problems import InputError


@dataclass(frozen=True)
class Turn:
    """Where assistant message `index` sits in the full render.

    `region` may be trained (from where the generation prompt's role header ends to just past the
    end-of-turn text and the whitespace after it); `required` spans must be trained, each with its kind
    ("content" or "eot"); `header` is the role header the generation prompt writes before the turn, which
    must not be trained. Two parts of the region may be trained or not: `prefill`, its start that the
    generation prompt writes after the role header (qwen3.5's `<think>\n\n</think>\n\n`: text of the turn the
    model is handed at inference; TRL's training templates train it), and `tail`, the markup after the last
    tool-call value of a turn with no end-of-turn text (see `locate_turns`). `gap` is text inside the region
    that is not the turn's: tool results a template prints before the message's own text.
    """

    index: int
    region: tuple[int, int]
    required: list[tuple[int, int, str]]
    header: tuple[int, int] | None
    prefill: tuple[int, int] | None = None
    tail: tuple[int, int] | None = None
    gap: tuple[int, int] | None = None


NO_STOP = "the template writes nothing after an assistant message's content"


def usable_probe(source: str, probe: Probe, kwargs) -> Probe:
    """The probe in the form the template understands. Templates disagree on two shapes: vision-language ones
    want `content` as a list of parts (and may silently render nothing for a string), some want tool-call
    `arguments` as a JSON string. The variant whose rendering shows the most message texts wins. When none
    renders, a tool-calling probe is tried with Mistral-style call ids and without its tool definitions
    (`probes.fallback_variants`): a template whose tool-call code only those shapes reach would otherwise
    have that code neither traced nor verified. The probe as written when nothing renders."""
    best, best_score = probe, -1
    for variants in (probe_variants(probe), fallback_variants(probe)):
        for variant in variants:
            try:
                text = render_probe(source, variant, variant.messages, False, kwargs).text
            except (TemplateRaised, InputError):
                continue
            score = sum(1 for m in variant.messages if (c := text_of(m.get("content"))) and c in text)
            if score > best_score:
                best, best_score = variant, score
        if best_score >= 0:
            break
    return best


def render_probe(source, probe: Probe, messages, add_generation_prompt, kwargs) -> Rendered:
    # Training renders without the control fields (preprocess strips them), so lint does too.
    return render(
        source,
        control.strip_control(messages),
        add_generation_prompt=add_generation_prompt,
        tools=probe.tools,
        template_kwargs={**kwargs, **probe.template_kwargs},
        keep_none=probe.keep_none,
    )


def end_of_turn(source: str, probe: Probe, kwargs) -> str | None:
    """The template's end-of-turn text: what it writes right after a plain assistant message's content; ""
    when it writes nothing there, None when the probe can't tell."""
    for i, message in enumerate(probe.messages):
        content = text_of(message.get("content"))
        if message.get("role") != "assistant" or not content or message.get("tool_calls"):
            continue
        try:
            text = render_probe(source, probe, probe.messages[: i + 1], False, kwargs).text
        except (TemplateRaised, InputError):
            return None
        at = text.rfind(content)
        if at < 0:
            return None
        tail = text[at + len(content) :].split()
        if not tail:
            return _end_before_user(source, probe, i, content, kwargs)
        return _written_also_when_continued(source, probe, i, text[: at + len(content)], tail[0], kwargs)
    return None


def _written_also_when_continued(source: str, probe: Probe, i: int, before: str, word: str, kwargs) -> str:
    """`word`, the text after the content up to whitespace, unless the template writes it only when the
    conversation ends there (command-r's closing system instruction and a role header printed whatever
    add_generation_prompt says both follow the last message's end-of-turn with no space): then what follows the
    content also when a next message does (the probe's, or its first user message again), less the start of the
    generation prompt's role header."""
    users = [m for m in probe.messages if m.get("role") == "user"]
    if i + 1 >= len(probe.messages) and not users:
        return word
    following = probe.messages[i + 1] if i + 1 < len(probe.messages) else users[0]  # (a user asks again)
    try:
        continued = render_probe(source, probe, [*probe.messages[: i + 1], following], False, kwargs).text
        ended = render_probe(source, probe, probe.messages[: i + 1], False, kwargs).text
        prompted = render_probe(source, probe, probe.messages[: i + 1], True, kwargs).text
    except (TemplateRaised, InputError):
        return word
    if not continued.startswith(before) or continued.startswith(word, len(before)):
        return word
    common = word[: first_difference(word, continued[len(before) :])]
    common = common[: _markup_start(common, len(common))]
    header = prompted[len(ended) :] if prompted.startswith(ended) else ""
    cut = next((k for k in range(len(common), 0, -1) if header.startswith(common[-k:])), 0)
    if not cut:  # a header printed whatever add_generation_prompt says (command-a): the shortest markup that
        # starts it, as the role header before this message's content shows it
        rest = ended[len(before) + len(common) :]
        token = rest[: rest.find(">") + 1] if rest.startswith("<") else ""
        starts = [k for k in range(1, len(common)) if common[k] == "<"]
        cut = next((len(common) - k for k in reversed(starts) if token and common[k:] + token in before), 0)
    return common[: len(common) - cut] or word


def _end_before_user(source: str, probe: Probe, i: int, content: str, kwargs) -> str:
    """For a template that writes nothing after the conversation's last assistant message: what it writes
    after messages[i] when a user message follows, unless that is the user's own role tag (glm4's
    `<|user|>`). "" when it writes nothing there either."""
    following = probe.messages[i + 1] if i + 1 < len(probe.messages) else {}
    later = text_of(following.get("content"))
    if following.get("role") != "user" or not later:
        return ""
    try:
        text = render_probe(source, probe, probe.messages, False, kwargs).text
    except (TemplateRaised, InputError):
        return ""
    at, next_at = text.find(content), text.find(later)
    between = text[at + len(content) : next_at] if 0 <= at < next_at else ""
    # Written without whitespace before the user's header (`<｜hy_eos｜><｜hy_User｜>`), the end-of-turn is the
    # markup before that header, as the template writes it before the first user message.
    first = next((c for m in probe.messages if m.get("role") == "user" and (c := text_of(m.get("content")))), "")
    first_at = text.find(first) if first else -1
    size = next(
        (k for k in range(len(between), 0, -1) if k <= first_at and text[first_at - k : first_at] == between[-k:]), 0
    )
    split = len(between) - size
    if 0 < split < len(between) and _markup_start(between, split) != split:  # inside a token: the next one
        split = max(between.find("<", split), 0)
    tail = (between[:split] if size and between[:split].strip() else between).split()
    return tail[0] if tail and "user" not in tail[0].lower() else ""


def locate_turns(
    source: str, probe: Probe, full: Rendered, eot: str | None, kwargs
) -> tuple[list[Turn], list[tuple[str, int, str]]]:
    """Find each assistant turn of `probe` in `full`; also return generation-prompt mismatches found on the way."""
    turns, mismatches = [], []
    text = full.text
    cursor = 0
    for i, message in enumerate(probe.messages):
        if message.get("role") != "assistant":
            continue
        prompt, header = _generation_prompt(source, probe, i, kwargs)
        prefill_at, role_header, prefill_text, role_text = None, None, "", ""
        if prompt is not None and header is not None:
            size = _role_header_length(prompt[header[0] :], text, probe)
            role_text = prompt[header[0] : header[0] + size] if size is not None else prompt[header[0] :]
            if size is not None:
                prefill_text = prompt[header[0] + size :]
                if text.startswith(prompt[: header[0] + size]):
                    prefill_at, role_header = header[0] + size, (header[0], header[0] + size)
        diverged, given = None, prompt
        added = prompt[header[0] : header[1]] if prompt is not None and header is not None else ""
        added = added[: len(added) - len(prefill_text)] if prefill_text and added.endswith(prefill_text) else added
        if prompt is not None and not text.startswith(prompt):
            at = diverged = first_difference(prompt, text)
            mismatches.append(
                (
                    "train/inference mismatch: the generation prompt (add_generation_prompt=True) does not end where "
                    "training renders the assistant turn, so the model is trained on a context it never sees at "
                    "inference. Make the prompt write exactly the header training writes.",
                    i,
                    f"prompt {prompt[at : at + 20]!r} vs training {text[at : at + 20]!r}",
                )
            )
            prompt, header = None, None
        content = text_of(message.get("content"))
        start = (
            len(prompt)
            if prompt is not None
            else _after_previous(text, probe.messages[i - 1] if i else None, cursor, eot)
        )
        if diverged is not None:  # the model was prompted with the text up to where prompt and training part
            start = max(start, _markup_start(text, diverged))
            if start > diverged and (closing := _after_last_message(given, probe.messages[i - 1])):
                # What the prompt writes after the last message is given too (mistral's `[/INST]`, a header),
                # as far as training writes the same; the part of it that pre-fills the turn, either way.
                same = _markup_start(text, start + first_difference(closing, text[start : start + len(closing)]))
                given_end = start + len(closing) - (len(prefill_text) if closing.endswith(prefill_text) else 0)
                if prefill_text and same > given_end:
                    prefill_at, role_header = given_end, None
                start = same
            closing = _after_last_message(given, probe.messages[i - 1]) if role_text else ""
            if closing.endswith(role_text + prefill_text):
                # Training writes the prompt's role header without what the prompt writes before it (an
                # end-of-turn the template leaves out after some messages): the header is given all the same.
                wanted = len(role_text + prefill_text)
                n = next((n for n in range(len(closing), wanted - 1, -1) if text.startswith(closing[-n:], start)), 0)
                if n:
                    prefill_at, start = start + n - len(prefill_text), start + n
                    role_header = header = (prefill_at - len(role_text), prefill_at)
                    added = ""  # the header is found: no need to look further
        if diverged is not None and added and added.strip():
            # Training writes the prompt's whole role header after where the two part (hermes closes a tool
            # result one way when it is the last message and another when it isn't): the turn starts after it.
            # (a header after some of the message's own output is one of its later messages': gpt-oss)
            reasoning = [text_of(message.get(key)) for key in ("reasoning_content", "thinking")]
            values = [v for v in [content, *reasoning, *_call_values(message)] if v]
            # Only values before the next message's text are this message's (a value found there or later, as
            # the place named in a tool call that an answer repeats, is a later message's).
            following = next((shown[0] for m in probe.messages[i + 1 :] if (shown := _shown(text, m, start))), -1)
            stop = following if following >= 0 else len(text)
            bound = min((at for value in values if (at := text.find(value, start, stop)) >= 0), default=-1)
            found = text.find(added, start, bound) if bound >= 0 else -1
            if found >= 0:
                start, header, prefill_at = found + len(added), (found, found + len(added)), None
        prefill = None
        if prefill_at is not None and prefill_at < start:
            prefill, start, header = (prefill_at, start), prefill_at, role_header
        content_at = text.find(content, start) if content else -1
        if content and eot and (followed := text.find(content + eot, start)) >= 0:
            content_at = followed  # a short text can also occur inside markup (`N` in `[/INST]`)
        body_end = content_at + len(content) if content_at >= 0 else start
        tail = gap = None
        if (
            content_at >= 0
            and message.get("tool_calls")
            and i + 1 < len(probe.messages)
            and (shown := _shown(text, probe.messages[i + 1], start))
            and shown[0] < content_at
        ):
            # The template prints this message's text after the tool results (gemma4): its tool calls come
            # before them and its text after; the results between are not the turn's.
            calls_end = _values_end(text, _call_values(message), start, shown[0])
            tail, gap = ((calls_end, shown[0]) if calls_end < shown[0] else None), (shown[0], content_at)
        required = [(content_at, body_end, "content")] if content_at >= 0 else []
        # The end-of-turn must come before the next message's text (the first one the render shows as given).
        next_at = next((shown[0] for m in probe.messages[i + 1 :] if (shown := _shown(text, m, body_end))), -1)
        values = _call_values(message)
        if (
            gap is None
            and values
            and values[0] not in text[start:body_end]
            and (next_at >= 0 or i + 1 == len(probe.messages))
        ):
            # calls printed after the content (before the next message's text; not before the content too): the
            # turn ends after them
            body_end = _calls_end(text, message, body_end, next_at if next_at >= 0 else len(text))
        end = body_end
        ends_in_call = i + 1 == len(probe.messages) and message.get("tool_calls")
        limit = len(text)
        if ends_in_call:  # (not when the result changes how the turn itself renders: qwen3 drops its reasoning)
            end_only = _end_only_start(source, probe, text, kwargs)
            limit = end_only if end_only > _values_end(text, _call_values(message), start, len(text)) else limit
        if eot and (eot_at := text.find(eot, body_end, limit)) >= 0 and not 0 <= next_at < eot_at:
            required.append((eot_at, eot_at + len(eot), "eot"))
            end = eot_at + len(eot)
        elif (
            gap is None
            and i + 1 < len(probe.messages)
            and (stop_last := _turn_end(source, probe, i, text, start, next_at, kwargs))[0] > end
        ):
            # No end-of-turn text before the next message: the turn ends where the conversation cut after it
            # ends. What follows its last tool-call value there may be closing markup (glm4's `</tool_call>`)
            # or a hand-off the next message's code also prints (gemma4's `<|tool_response>`): either way.
            stop, last = stop_last
            last = max(last, end)
            tail, end = ((last, stop) if last < stop else None), stop
        elif gap is None and ends_in_call:
            # The conversation ends in this tool call, with no end-of-turn text: the turn runs to where the
            # render without the generation prompt ends, or text written only after the whole conversation
            # begins; what follows its last call value may go either way.
            stop = max(start, min(_last_turn_end(source, probe, text, start, kwargs), limit))
            last = max(end, _values_end(text, _call_values(message), start, stop))
            tail, end = ((last, stop) if last < stop else None), max(stop, end)
        while end < len(text) and text[end] in " \t\r\n":
            end += 1
        turns.append(Turn(i, (start, end), required, header, prefill, tail, gap))
        cursor = end
    return turns, mismatches


def _call_values(message: dict) -> list[str]:
    """The texts a tool call is made of (function name, argument values), to find where one ends."""
    out = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        arguments = function.get("arguments")
        out += [str(function.get("name"))] + (
            [str(v) for v in arguments.values()]
            if isinstance(arguments, dict)
            else [arguments]
            if isinstance(arguments, str)
            else []
        )
    return [v for v in out if v]


def _turn_end(source: str, probe: Probe, i: int, text: str, start: int, next_at: int, kwargs) -> tuple[int, int]:
    """Where assistant turn `i` ends in a template with no end-of-turn text of its own, and where its last
    tool-call value ends: (0, 0) when unknown. The turn ends where the conversation cut after it ends (glm4's
    tool calls). When the cut conversation renders differently (gemma4 shows reasoning only in the last
    turn), where the text the cut one writes after its last tool-call value ends."""
    values = _call_values(probe.messages[i])
    try:
        cut = render_probe(source, probe, probe.messages[: i + 1], False, kwargs).text
    except (TemplateRaised, InputError):
        return 0, 0
    if text.startswith(cut):
        return len(cut), _values_end(text, values, start, len(cut))
    # The cut conversation's last tool-call value and what it writes after it, found last before the next
    # message in the full text.
    ends = [(at + len(v), at, v) for v in values if (at := cut.rfind(v)) >= 0]  # (a template may drop calls)
    if not ends:
        return 0, 0
    _, at, value = max(ends)
    ending, limit = cut[at:], next_at if next_at >= 0 else len(text)
    found = text.rfind(ending, start, limit + len(ending))
    if found >= 0:
        return (found + len(ending), found + len(value)) if len(ending) > len(value) else (0, 0)
    # The cut one also ends differently (a last-turn-only end-of-turn): as far as both agree.
    found = text.rfind(value, start, limit)
    stop = (
        _markup_start(text, found + first_difference(ending, text[found : found + len(ending)])) if found >= 0 else 0
    )
    return (stop, found + len(value)) if stop > found + len(value) else (0, 0)


def _last_turn_end(source: str, probe: Probe, text: str, start: int, kwargs) -> int:
    """Where the conversation's last turn ends in `text`: the end of the render without the generation
    prompt, trailing whitespace excluded ("start" when that render is not where `text` begins)."""
    try:
        plain = render_probe(source, probe, probe.messages, False, kwargs).text
    except (TemplateRaised, InputError):
        return start
    return max(start, len(plain.rstrip())) if text.startswith(plain) else start


def _end_only_start(source: str, probe: Probe, text: str, kwargs) -> int:
    """Where text the template writes only after the whole conversation begins in `text`, which ends in a tool
    call (command-r's closing system instruction): where the render without the generation prompt parts from
    the render with the call's result after it, when that one ends with the same text; else the end of `text`."""
    call = (probe.messages[-1].get("tool_calls") or [{}])[-1]
    function = call.get("function", call) if isinstance(call, dict) else {}
    result = {"role": "tool", "content": "{}", "name": str(function.get("name")), "tool_call_id": call.get("id", "")}
    try:
        plain = render_probe(source, probe, probe.messages, False, kwargs).text
        continued = render_probe(source, probe, [*probe.messages, result], False, kwargs).text
    except (TemplateRaised, InputError):
        return len(text)
    at = _markup_start(plain, first_difference(plain, continued))
    # Text written after the whole conversation ends the render with the result too (else the result changed
    # how the turn itself renders: apriel prints call ids only before a result).
    return at if at < len(plain) and continued.endswith(plain[at:]) and text.startswith(plain) else len(text)


def _calls_end(text: str, message: dict, start: int, stop: int) -> int:
    """Where the tool calls end when they are printed whole in text[start:stop], each value in order (a
    template that prints the calls as a message of their own after the content's end-of-turn; one that
    prints only the first call); else `start`."""
    pos = start
    for call in message.get("tool_calls") or []:
        at = start
        for value in _call_values({"tool_calls": [call]}):
            # as written, or JSON-encoded (a template that runs string arguments through `tojson`)
            found = [
                (k, len(form))
                for form in (value, json.dumps(value)[1:-1])
                if (k := text.find(form, max(at, pos), stop)) >= 0
            ]
            if not found:
                return pos
            at = sum(min(found))
        pos = at
    return pos


def _values_end(text: str, values: list[str], start: int, stop: int) -> int:
    """Where the tool-call values end in text[start:stop], found in the order the calls write them."""
    pos = start
    for value in values:
        at = text.find(value, pos, stop)
        pos = at + len(value) if at >= 0 else pos
    return pos


_ROLE_NAMES = (("user", "assistant"), ("User", "Assistant"), ("USER", "ASSISTANT"))


def _role_header_length(addition: str, text: str, probe: Probe) -> int | None:
    """How much of the generation prompt's addition is the role header, when the rest pre-fills the turn.

    The header is what the template writes before a user message's content with the role name swapped
    (`<|im_start|>user\n` -> `<|im_start|>assistant\n`, `<｜User｜>` -> `<｜Assistant｜>`). None when no such
    header starts the addition, or nothing follows it: then the whole addition counts as header, which is
    the strict reading (gemma's `<start_of_turn>model\n` names the role differently, and stays strict)."""
    for message in probe.messages:
        content = text_of(message.get("content"))
        if message.get("role") != "user" or not content or (at := text.find(content)) < 0:
            continue
        for size in range(min(at, len(addition)), 0, -1):  # the longest header first
            before = text[at - size : at]
            if "user" not in before.lower():
                break
            for name, assistant in _ROLE_NAMES:
                before = before.replace(name, assistant)
            if addition.startswith(before):
                return len(before) if len(before) < len(addition) else None
    return None


def _markup_start(text: str, at: int) -> int:
    """`at`, or the `<` before it when `at` falls inside a markup token (prompt `<turn|>` and training
    `<|tool_call>` part after their common `<`)."""
    k = text.rfind("<", 0, at)
    return k if k >= 0 and not any(c == ">" or c.isspace() for c in text[k:at]) else at


def _shown(text: str, message: dict | None, start: int) -> tuple[int, int] | None:
    """Where a message's text first shows in the render from `start`: as written, or JSON-escaped (a template
    that prints a tool result with `| tojson`); None when it doesn't."""
    found = [(at, at + len(form)) for form in _forms(message) if (at := text.find(form, start)) >= 0]
    return min(found, key=lambda span: (span[0], -span[1]), default=None)


def _forms(message: dict | None) -> list[str]:
    """A message's text as a template may print it: as written, or JSON-encoded with or without quotes."""
    content = text_of(message.get("content")) if message else ""
    if not content:
        return []
    encoded = {json.dumps(content, ensure_ascii=False), json.dumps(content)}
    return [content, *encoded, *(form[1:-1] for form in encoded)]


def _after_last_message(prompt: str, previous: dict) -> str:
    """The text a generation prompt ends with after the previous message's content ("" when not found)."""
    ends = [at + len(form) for form in _forms(previous) if (at := prompt.rfind(form)) >= 0]
    return prompt[max(ends) :] if ends else ""


def _after_previous(text: str, previous: dict | None, cursor: int, eot: str | None) -> int:
    """Without a usable generation prompt, a turn starts after the previous message's text and end-of-turn."""
    shown = _shown(text, previous, cursor)
    if shown is None:
        return cursor
    at = shown[1]
    return at + len(eot) if eot and text.startswith(eot, at) else at


def _generation_prompt(source: str, probe: Probe, i: int, kwargs) -> tuple[str | None, tuple[int, int] | None]:
    """render(messages[:i], add_generation_prompt=True), and the header span it adds to the plain render."""
    if i == 0:
        return None, None
    try:
        prompt = render_probe(source, probe, probe.messages[:i], True, kwargs).text
        plain = render_probe(source, probe, probe.messages[:i], False, kwargs).text
    except (TemplateRaised, InputError):
        return None, None
    header = (len(plain), len(prompt)) if prompt.startswith(plain) and len(prompt) > len(plain) else None
    return prompt, header


def first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
