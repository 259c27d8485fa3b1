"""Where a generation tag goes at an atom's edge, and how the edits are applied to the source (for `place`).

A start tag goes right before an atom and an end tag right after one. Where the atom begins (ends) with a
tag, the inserted tag takes over that tag's whitespace control: `{{- x }}` strips the text before it, so it
becomes `{%- generation %}{{ x }}`, with nothing left between the two to strip. An inserted `{% %}` is also
subject to jinja's lstrip_blocks/trim_blocks, which `{{ }}` and plain text are not: it gets a `+` exactly
where those would eat text (indentation before it, a newline after it). Elsewhere the tags stay plain,
because TRL (`has_generation_markers`) only recognises `{% generation %}` written with or without `-`.
"""

from __future__ import annotations

from .atoms import Atom, AtomKind
from .errors import MarkerError
from .source import PieceKind, Statement, Template
from .tags import Tag, TagKind

# The variable a `{{ expr }}` split at a landmark (a macro's output that begins with the role header) is held in.
CAPTURE = "sft_toolkit_text"


def _lstrip_applies(source: str, pos: int) -> bool:
    k = pos
    while k > 0 and source[k - 1] in " \t":
        k -= 1
    return k < pos and (k == 0 or source[k - 1] == "\n")


def _left_modifier(template: Template, pos: int, tag: Tag | None) -> str:
    if tag is not None and (tag.kind == TagKind.BLOCK or tag.left_modifier == "-"):
        return tag.left_modifier
    return "+" if _lstrip_applies(template.source, pos) else ""


def _right_modifier(template: Template, pos: int, tag: Tag | None) -> str:
    if tag is not None and (tag.kind == TagKind.BLOCK or tag.right_modifier == "-"):
        return tag.right_modifier
    return "+" if template.source.startswith(("\n", "\r\n"), pos) else ""


def edge(template: Template, item, side: str) -> tuple[int, str]:
    """Source position and whitespace modifier of an item's outer edge (for a condition around it)."""
    left = side == "left"
    tag = (
        (item.open if left else item.close)
        if isinstance(item, Statement)
        else (None if item.kind == PieceKind.DATA else item.tag)
    )
    pos = (tag.start if left else tag.end) if tag is not None else (item.start if left else item.end)
    return pos, (_left_modifier(template, pos, tag) if left else _right_modifier(template, pos, tag)) or "+"


def boundary(template: Template, atom: Atom, side: str, name: str) -> tuple[int, int, str]:
    """The edit that puts `{% name %}` on `side` of `atom`."""
    item, left = atom.item, side == "left"
    if (
        atom.kind == AtomKind.CHARACTERS
        and not (left and atom.start == 0)
        and not (not left and atom.end == len(item.text))
    ):
        pos = item.offsets[atom.start if left else atom.end]
        if item.kind != PieceKind.DATA:  # inside a string literal: end the literal and the tag around the marker
            quote = template.source[item.offsets[-1]]
            return (pos, pos, f"{quote} }}}}{{% {name} %}}{{{{ {quote}")
        return (pos, pos, f"{{%{_left_modifier(template, pos, None)} {name} {_right_modifier(template, pos, None)}%}}")
    if atom.kind == AtomKind.TAIL and left:  # `{{ name }}` -> `{{ name[:k] }}{% generation %}{{ name[k:] }}`
        tag, variable = item.tag, item.variable or CAPTURE
        at = f"{variable}.find({_jinja_string(atom.landmark)}) + {len(atom.landmark)}"
        inner = (tag.start + 2 + (1 if tag.left_modifier else 0), tag.end - 2 - (1 if tag.right_modifier else 0))
        if not item.variable:  # any other `{{ expr }}` is printed from a `set` that runs it once
            lead = f"{{%{_left_modifier(template, tag.start, tag)} set {CAPTURE} ={template.source[inner[0] : inner[1]]}%}}"
            return (tag.start, inner[1], f"{lead}{{{{ {CAPTURE}[:{at}] }}}}{{% {name} %}}{{{{ {CAPTURE}[{at}:] ")
        inner = (item.start, item.end) if item.kind == PieceKind.OPERAND else inner  # `a + name + b`: the operand
        return (*inner, f" {variable}[:{at}] }}}}{{% {name} %}}{{{{ {variable}[{at}:] ")
    if isinstance(item, Statement):
        tag = item.open if left else item.close
    elif item.kind == PieceKind.DATA:
        pos = item.start if left else item.end
        return (pos, pos, f"{{%{_left_modifier(template, pos, None)} {name} {_right_modifier(template, pos, None)}%}}")
    elif item.kind == PieceKind.OPERAND and (item.index > 0 if left else item.index < item.count - 1):
        op = item.cuts[item.index - 1] if left else item.cuts[item.index]
        before, after = _undefined_guards(template, item, op, left)
        return (op[0], op[1], f"{before} }}}}{{% {name} %}}{{{{ {after}")
    else:
        tag = item.tag
    width = 2 + (1 if (tag.left_modifier if left else tag.right_modifier) else 0)
    if left:
        return (
            tag.start,
            tag.start + width,
            f"{{%{_left_modifier(template, tag.start, tag)} {name} %}}{template.source[tag.start : tag.start + 2]}",
        )
    return (
        tag.end - width,
        tag.end,
        f"{template.source[tag.end - 2 : tag.end]}{{% {name} {_right_modifier(template, tag.end, tag)}%}}",
    )


def _undefined_guards(template: Template, item, op: tuple[int, int], left: bool) -> tuple[str, str]:
    """What keeps a `+` chain cut in two failing where it failed whole. `'<|im_start|>' + m.role + content`
    raises when `content` is undefined (a message without the key), but a lone `{{ content }}` prints "":
    a lone operand that is not a string literal keeps a `+ ''` (`'' +`) on the side of the cut."""
    if template.source[op[0] : op[1]] != "+":
        return "", ""
    operands = template.exprs[item.id - item.index]
    right = item.index if left else item.index + 1  # the first operand after the cut
    spaced = template.source[op[0] - 1] == " ", template.source[op[1]] == " "
    before = ("" if spaced[0] else " ") + "+ ''" if right == 1 and operands[0].text is None else ""
    after = "'' +" + ("" if spaced[1] else " ") if right == len(operands) - 1 and operands[right].text is None else ""
    return before, after


def _jinja_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped.replace("\t", "\\t") + "'"


def apply_edits(source: str, edits, start: int, end: int) -> str:
    edits = sorted((e for e in edits if start <= e[0] and e[1] <= end), key=lambda e: (e[0], e[1]))
    out, pos = [], start
    for s, e, text in edits:
        if s < pos:
            raise MarkerError("two markers would land on the same place", source.count("\n", 0, s) + 1)
        out += [source[pos:s], text]
        pos = e
    out.append(source[pos:end])
    return "".join(out)
