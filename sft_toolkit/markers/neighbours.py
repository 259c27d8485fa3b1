"""Conditions on the previous message's role, for code that prints one message's end-of-turn in the next
message's pass through the loop (jamba: `{% if ns.message_count > 0 %}{{ eom }}{% endif %}` opens every pass,
and the same print after the loop ends the last message).

Such code prints an assistant's end-of-turn and a user's alike, so the role of the pass it runs in says
nothing: the role of the message before it does. When the traces show that the code prints trained text
exactly where the previous message is the assistant's (inside the loop: the previous pass's message; after
it: the loop's last one), it is duplicated under that condition (`loop.previtem.role == 'assistant'`, or
`(<the loop's list>|last).role == 'assistant'` after the loop) and only that copy is marked. Both copies
print the same text, and verification checks that the marks fall right on every probe.
"""

from __future__ import annotations

import re

from jinja2 import nodes

from .label import Label
from .source import Statement
from .trace import Emission, Trace

# Selects the renders the marked copy is for (a `where` of `place.Placer`).
AFTER_ASSISTANT = "after_assistant"


def after_assistant(emission: Emission) -> bool:
    return emission.previous_role == "assistant"


def previous_role_condition(emissions: list[tuple[Trace, Emission]], fors: list[Statement], item, source: str):
    """The jinja condition under which `item` prints trained text, when that is "the previous message is the
    assistant's" on every traced render; None when the traces say otherwise or no condition can be written."""
    seen = set()
    for trace, e in emissions:
        labels = set(trace.labels[e.start : e.end]) - {Label.EITHER, Label.PREFILL}
        if len(labels) > 1:
            return None  # part trained, part not: a condition can't split it
        if labels:
            seen.add((next(iter(labels)) == Label.TRAINED, after_assistant(e)))
    if not seen or any(trained != after for trained, after in seen) or (True, True) not in seen:
        return None
    loops = {e.loop for _, e in emissions}
    if loops == {None}:
        ended = {e.after_loop for _, e in emissions}
        if len(ended) != 1 or None in ended:
            return None
        iterable = _iterable(source, fors[ended.pop()])
        return f"({iterable}|last).role == 'assistant'" if iterable else None
    if None in loops or len(loops) != 1:
        return None
    loop = fors[loops.pop()]
    if _innermost_for(fors, item) is not loop:  # `loop` names the innermost for-loop around the code
        return None
    return "loop.previtem is defined and loop.previtem.role == 'assistant'"


def _innermost_for(fors: list[Statement], item) -> Statement | None:
    start = item.open.start if isinstance(item, Statement) else item.start
    around = [f for f in fors if f.open.end <= start and start < f.close.start]
    return max(around, key=lambda f: f.open.start, default=None)


def _iterable(source: str, loop: Statement) -> str | None:
    """The list a `{% for x in <list> %}` tag loops over, as written (None for a filtered or recursive loop, or
    an expression that isn't a plain name or subscript)."""
    if not isinstance(loop.node, nodes.For) or loop.node.test is not None or loop.node.recursive:
        return None
    tag = source[loop.open.start : loop.open.end]
    match = re.fullmatch(r"\{%[-+]?\s*for\s+\w+\s+in\s+(.+?)\s*[-+]?%\}", tag, flags=re.S)
    if not match or not re.fullmatch(r"[\w.]+(\[[^\]]*\])?", match.group(1)):
        return None
    return match.group(1)
