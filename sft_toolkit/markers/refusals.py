"""Refusals that say what to write by hand, for constructs no marker placement can serve."""

from __future__ import annotations

import re

from .errors import MarkerError
from .source import PieceKind, Statement


def assembled_whole(item, source: str) -> MarkerError | None:
    """For `{{ name }}` / `{{ ns.attr }}` printing the whole conversation after the loop over messages (Reka:
    `{% set ns.out = ns.out ~ ... %}` for every message, one print at the end): a refusal that says so and what
    to write instead; None for other code."""
    if isinstance(item, Statement) or item.kind == PieceKind.DATA or item.tag is None:
        return None
    printed = re.fullmatch(r"\{\{[-+]?\s*([\w.]+)\s*[-+]?\}\}", source[item.tag.start : item.tag.end])
    if not printed:
        return None
    return MarkerError(
        f"the conversation is assembled in `{printed.group(1)}` and printed in one piece, outside the loop over "
        "messages; markers can only go where its parts are printed: print each message's text where it is built "
        "(`{{ ... }}` instead of adding it to the variable), then mark the assistant's parts "
        "(templates/README.md, 'When add-markers refuses a template')",
        item.line,
    )
