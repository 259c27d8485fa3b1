"""Label: what each rendered character must be, from the turns `turns.locate_turns` finds (step 2 of `markers`)."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum

from ..masks import Rendered
from ..probes import Probe
from ..turns import locate_turns
from .source import with_special_tokens


class Label(str, Enum):
    """What one rendered character must be. A trace keeps its labels as a string, one value per character, so
    a member hashes and compares as its one-character value: `Label.TRAINED in {"T"}` and `{Label.TRAINED} ==
    {"T"}` hold, and a slice of the string is searched with members (`labels.find(Label.TRAINED)`)."""

    TRAINED = "T"  # assistant output or its end-of-turn: must be trained
    UNTRAINED = "U"  # anything else: must not be
    EITHER = "*"  # whitespace after an end-of-turn: either way
    PREFILL = "p"  # the generation prompt's prefill or a tool-call turn's closing markup: either way, trained
    # where that gives the markers a fixed place

    __hash__ = str.__hash__


def label_characters(source: str, probe: Probe, rendered: Rendered, eot: str | None, kwargs: dict) -> str:
    """One `Label` value per character of `rendered`: TRAINED from each assistant turn's start to its
    end-of-turn, EITHER for the whitespace after it, PREFILL for the parts of the turn that may go either way
    (the generation prompt's prefill, a tool-call turn's closing markup), UNTRAINED elsewhere."""
    turns, _ = locate_turns(source, probe, rendered, eot, with_special_tokens(kwargs))
    labels = [Label.UNTRAINED] * len(rendered.text)
    # The role header the generation prompt writes before some turns (after a user message), where a turn
    # without one (after tool results, where the prompt writes nothing) begins with it: either way, as a
    # prefill. Left untrained there it keeps the model from learning a header only the template's history
    # shows mid-turn (TRL's diffusion_gemma variant leaves it so); trained, it is what the model writes.
    headers = {rendered.text[a:b] for turn in turns if turn.header and (a := turn.header[0]) < (b := turn.header[1])}
    for k, turn in enumerate(turns):
        start = turn.region[0]
        if not (turn.header and turn.header[0] < turn.header[1]) and not turn.prefill:
            header = max((h for h in headers if h.strip() and rendered.text.startswith(h, start)), key=len, default="")
            if any(a < start + len(header) for a, _, _ in turn.required):  # never the message's own text
                header = ""
            turns[k] = replace(turn, prefill=(start, start + len(header))) if header else turn
    for turn in turns:
        start, end = turn.region
        last = len(rendered.text[:end].rstrip()) if end > start else start
        for i in range(start, end):
            labels[i] = Label.TRAINED if i < last else Label.EITHER
        for either_start, either_end in filter(None, (turn.prefill, turn.tail)):
            labels[either_start:either_end] = [Label.PREFILL] * (either_end - either_start)
        if turn.gap:
            labels[turn.gap[0] : turn.gap[1]] = [Label.UNTRAINED] * (turn.gap[1] - turn.gap[0])
    return "".join(labels)
