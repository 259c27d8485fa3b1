"""Label: what each rendered character must be, from lint's turn finder (step 2 of `markers`)."""

from __future__ import annotations

from ..probes import Probe
from ..turns import locate_turns
from .source import with_special_tokens


def label_characters(source, probe: Probe, rendered, eot, kwargs) -> str:
    """T from each assistant turn's start to its end-of-turn, * for the whitespace after it, p for the parts
    of the turn that may go either way (the generation prompt's prefill, a tool-call turn's closing markup;
    trained where that gives a fixed marker place), U elsewhere."""
    turns, _ = locate_turns(source, probe, rendered, eot, with_special_tokens(kwargs))
    labels = ["U"] * len(rendered.text)
    for turn in turns:
        start, end = turn.region
        last = len(rendered.text[:end].rstrip()) if end > start else start
        for i in range(start, end):
            labels[i] = "T" if i < last else "*"
        for a, b in filter(None, (turn.prefill, turn.tail)):
            labels[a:b] = ["p"] * (b - a)
        if turn.gap:
            labels[turn.gap[0]:turn.gap[1]] = ["U"] * (turn.gap[1] - turn.gap[0])
    return "".join(labels)
