"""See the mask: every token of a rendered conversation, coloured by whether the model learns from it.

Token boundaries are drawn by alternating two shades within each colour, so a mask that starts one
token early (the newline of a role header) or stops one token short (the end-of-turn) is visible at a
glance. Whitespace is made visible (`↵`, `·`) because the off-by-ones hide in it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from rich.text import Text

from .masks import TokenMask

TRAINED = ("black on #8fd694", "black on #5cbf69")
UNTRAINED = ("#aaaaaa on #2b2b2b", "#cccccc on #3a3a3a")


@dataclass(frozen=True)
class TokenView:
    id: int
    text: str
    trained: bool


def token_views(tm: TokenMask) -> list[TokenView]:
    return [TokenView(i, tm.text[a:b], bool(m)) for i, (a, b), m in zip(tm.ids, tm.offsets, tm.mask)]


def char_views(text: str, spans: list[tuple[int, int]]) -> list[TokenView]:
    """Without a tokenizer: runs of characters, trained or not (ids are -1)."""
    views, pos = [], 0
    for start, end in sorted(spans):
        if start > pos:
            views.append(TokenView(-1, text[pos:start], False))
        views.append(TokenView(-1, text[start:end], True))
        pos = end
    if pos < len(text):
        views.append(TokenView(-1, text[pos:], False))
    return views


def visible(text: str) -> str:
    return text.replace(" ", "·").replace("\t", "→").replace("\n", "↵\n")


def to_rich(views: list[TokenView]) -> Text:
    out = Text()
    for n, view in enumerate(views):
        style = (TRAINED if view.trained else UNTRAINED)[n % 2]
        out.append(visible(view.text), style=style)
    return out


def to_plain(views: list[TokenView]) -> str:
    """A colourless form (for logs and snapshot tests): trained runs inside ⟦ ⟧, tokens split by │."""
    out, in_trained = [], False
    for n, view in enumerate(views):
        if view.trained != in_trained:
            out.append("⟦" if view.trained else "⟧")
            in_trained = view.trained
        elif n:
            out.append("│")
        out.append(view.text.replace("\n", "↵\n"))
    if in_trained:
        out.append("⟧")
    return "".join(out)


def to_html(views: list[TokenView], title: str, summary: str) -> str:
    """A self-contained page: no scripts, no external assets; hover a token for its id."""
    spans = []
    for n, view in enumerate(views):
        cls = ("t" if view.trained else "u") + str(n % 2)
        spans.append(f'<span class="{cls}" title="id {view.id}">{html.escape(visible(view.text))}</span>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: ui-monospace, monospace; background: #1e1e1e; color: #ddd; margin: 2em; }}
pre {{ white-space: pre-wrap; line-height: 1.7; }}
.t0 {{ background: #8fd694; color: #000; }} .t1 {{ background: #5cbf69; color: #000; }}
.u0 {{ background: #2b2b2b; color: #aaa; }} .u1 {{ background: #3a3a3a; color: #ccc; }}
.legend span {{ padding: 0 .5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>
<p class="legend"><span class="t0">trained</span> <span class="u0">not trained</span>
(alternating shades mark token boundaries)</p>
<pre>{"".join(spans)}</pre>
</body></html>
"""
