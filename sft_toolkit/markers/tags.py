"""The template's tags (`{{ }}`, `{% %}`, `{# #}`, raw blocks) with their exact source positions, which jinja2's
lexer doesn't give (it has line numbers only); `source` matches them to jinja2's AST."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import MarkerError


class TagKind(str, Enum):
    EXPRESSION = "var"  # {{ }}
    BLOCK = "block"  # {% %}
    COMMENT = "comment"  # {# #}
    RAW = "raw"  # {% raw %}...{% endraw %}, kept as text


@dataclass
class Tag:
    kind: TagKind
    start: int
    end: int
    name: str = ""  # first word of a block tag
    left_modifier: str = ""  # "-", "+" or "" right after the opening delimiter
    right_modifier: str = ""  # "-", "+" or "" right before the closing delimiter


def scan_tags(source: str) -> list[Tag]:
    """Tags with their exact positions (jinja2's lexer has line numbers only). Strings inside tags are skipped."""
    tags, i, n = [], 0, len(source)
    while True:
        j = source.find("{", i)
        while j >= 0 and source[j + 1 : j + 2] not in ("{", "%", "#"):
            j = source.find("{", j + 1)
        if j < 0:
            return tags
        opener = source[j + 1]
        if opener == "#":
            end = source.find("#}", j + 2)
            if end < 0:
                raise MarkerError("unclosed comment", source.count("\n", 0, j) + 1)
            tags.append(
                Tag(
                    TagKind.COMMENT,
                    j,
                    end + 2,
                    left_modifier=_mod(source[j + 2 : j + 3]),
                    right_modifier=_mod(source[end - 1]),
                )
            )
            i = end + 2
            continue
        close = "}}" if opener == "{" else "%}"
        k = next((k for k, _ in outside_strings(source, j + 2, n) if source.startswith(close, k)), n)
        if k >= n:
            raise MarkerError(f"unclosed {'{{' if opener == '{' else '{%'} tag", source.count("\n", 0, j) + 1)
        inner = source[j + 2 : k]
        tag = Tag(
            TagKind.EXPRESSION if opener == "{" else TagKind.BLOCK,
            j,
            k + 2,
            left_modifier=_mod(inner[:1]),
            right_modifier=_mod(inner[-1:]),
        )
        if tag.kind == TagKind.BLOCK:
            tag.name = (inner.strip("-+ \t\r\n").split() or [""])[0]
            if tag.name == "raw":
                m = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}").search(source, tag.end)
                if not m:
                    raise MarkerError("unclosed raw block", source.count("\n", 0, j) + 1)
                tag = Tag(
                    TagKind.RAW,
                    j,
                    m.end(),
                    left_modifier=tag.left_modifier,
                    right_modifier=m.group(0)[-3:-2].replace("%", ""),
                )
        tags.append(tag)
        i = tag.end


def _mod(ch: str) -> str:
    return ch if ch in ("-", "+") else ""


def outside_strings(source: str, start: int, end: int):
    """(position, character) of the code in source[start:end] that is not inside a quoted string."""
    k, quote = start, None
    while k < end:
        c = source[k]
        if quote:
            if c == "\\":
                k += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        else:
            yield k, c
        k += 1
