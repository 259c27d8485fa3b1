"""The template's source scanned into tags and text and matched to jinja2's AST: the map from every piece that
emits text to its place in the source, which tracing numbers and placing edits (step 1 of `markers`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import jinja2
from jinja2 import nodes

from ..masks import DEFAULT_SPECIAL_TOKENS
from ..problems import InputError
from .errors import MarkerError
from .tags import Tag, TagKind, outside_strings, scan_tags


def strip_markers(source: str) -> str:
    return re.sub(r"\{%-?\+?\s*(?:end)?generation\s*[-+]?%\}", "", source)


def with_special_tokens(kwargs: dict) -> dict:
    return {**DEFAULT_SPECIAL_TOKENS, **kwargs}


class PieceKind(str, Enum):
    DATA = "data"  # literal text
    EXPRESSION = "expr"  # a whole `{{ }}`
    OPERAND = "operand"  # one operand of a `+`/`~` chain in a `{{ }}`


@dataclass
class Piece:
    """Something that emits text: literal text, a whole `{{ }}` expression, or one operand of a `+`/`~` chain."""

    id: int
    kind: PieceKind
    start: int  # source span of the text / tag / operand
    end: int
    line: int
    tag: Tag | None = None  # the {{ }} tag of an expr / operand
    index: int = 0  # operand index in its chain
    count: int = 1  # operands in the chain
    cuts: list = field(default_factory=list)  # operator spans between operands (for the owning expr)
    text: str | None = None  # literal value (data, string constant): splittable between characters
    offsets: list | None = None  # source position of each character of `text` (and of the closing quote)
    variable: str | None = None  # `{{ name }}`: the text was assembled elsewhere


@dataclass
class Statement:
    """A block statement (if/for/with/...) and the statement lists inside it."""

    node: nodes.Node
    open: Tag
    close: Tag
    bodies: list  # list of Body
    line: int
    loop_var: str | None = None  # `for <name> in ...`: the name, for role conditions


@dataclass
class Body:
    items: list  # Piece (the first operand stands for its whole `{{ }}`) | Statement


class Template:
    """The source, its tags, and a tree of statement lists whose leaves know their source spans."""

    def __init__(self, source: str, env, tree):
        self.source, self.env = source, env
        self.tags = scan_tags(source)
        self.pieces: list[Piece] = []
        self.exprs: dict[int, list[Piece]] = {}  # id of the first operand -> all operands of that {{ }}
        self._tag_index, self._position = 0, 0
        self.body = self._body(tree.body)
        while self._tag_index < len(self.tags) and self.tags[self._tag_index].kind == TagKind.COMMENT:
            self._tag_index += 1  # comments after the last statement (a licence line) emit nothing
        if self._tag_index != len(self.tags):
            raise MarkerError(
                "the template's tags and jinja2's parse disagree (unsupported construct)",
                self._line(self.tags[self._tag_index].start) if self._tag_index < len(self.tags) else None,
            )

    @classmethod
    def parse(cls, source: str) -> Template:
        env = _environment()
        try:
            tree = env.parse(source)
        except jinja2.TemplateSyntaxError as err:
            raise InputError(f"template syntax error at line {err.lineno}: {err.message}") from None
        return cls(source, env, tree)

    def _line(self, pos: int) -> int:
        return self.source.count("\n", 0, pos) + 1

    def _next(self, kinds=(TagKind.BLOCK,), names=None) -> Tag:
        """The next tag, skipping comments; it must be what the AST says comes next."""
        while self._tag_index < len(self.tags) and self.tags[self._tag_index].kind == TagKind.COMMENT:
            self._tag_index += 1
        if self._tag_index >= len(self.tags):
            raise MarkerError("unexpected end of the template's tags (unsupported construct)")
        tag = self.tags[self._tag_index]
        if tag.kind not in kinds or (names and tag.name not in names):
            raise MarkerError(
                f"could not match the {tag.kind.value} tag {self.source[tag.start : tag.end][:40]!r} to "
                "jinja2's parse (unsupported construct)",
                self._line(tag.start),
            )
        self._tag_index += 1
        self._position = tag.end
        return tag

    def _peek(self) -> Tag | None:
        index = self._tag_index
        while index < len(self.tags) and self.tags[index].kind == TagKind.COMMENT:
            index += 1
        return self.tags[index] if index < len(self.tags) else None

    def _body(self, stmts) -> Body:
        items = []
        for node in stmts:
            if isinstance(node, nodes.Output):
                for child in node.nodes:
                    items.append(self._data(child) if isinstance(child, nodes.TemplateData) else self._expr(child))
            else:
                items.append(self._stmt(node))
        return Body(items)

    def _data(self, node: nodes.TemplateData) -> Piece:
        """Literal text: the gap between tags (comments split gaps) that jinja trimmed into `node.data`."""
        gaps, s, k = [], self._position, self._tag_index
        while k < len(self.tags) and self.tags[k].kind == TagKind.COMMENT:
            gaps.append((s, self.tags[k].start))
            s, k = self.tags[k].end, k + 1
        gaps.append((s, self.tags[k].start if k < len(self.tags) else len(self.source)))
        for gs, ge in gaps:
            trimmed = self._trim(gs, ge)
            if trimmed is not None and self.source[trimmed[0] : trimmed[1]] == node.data:
                at = trimmed[0]
            elif (at := self.source.find(node.data, gs, ge)) < 0:
                continue
            self._position = ge
            piece = self._new(PieceKind.DATA, at, at + len(node.data))
            piece.text = node.data
            piece.offsets = list(range(at, at + len(node.data) + 1))
            return piece
        if k < len(self.tags) and self.tags[k].kind == TagKind.RAW:  # {% raw %}: kept whole
            self._tag_index = k + 1
            self._position = self.tags[k].end
            return self._new(PieceKind.DATA, self.tags[k].start, self.tags[k].end)
        raise MarkerError("could not locate literal text in the source", node.lineno)

    def _trim(self, gs: int, ge: int) -> tuple[int, int] | None:
        """The part of the gap [gs, ge) jinja keeps with trim_blocks/lstrip_blocks and `-` modifiers."""
        before = next((t for t in self.tags if t.end == gs), None)
        after = next((t for t in self.tags if t.start == ge), None)
        s, e = gs, ge
        text = self.source
        if before is not None:
            if before.right_modifier == "-":
                while s < e and text[s].isspace():
                    s += 1
            elif (
                before.kind in (TagKind.BLOCK, TagKind.COMMENT)
                and before.right_modifier != "+"
                and text.startswith("\n", s)
            ):
                s += 1
        if after is not None:
            if after.left_modifier == "-":
                while e > s and text[e - 1].isspace():
                    e -= 1
            elif after.kind in (TagKind.BLOCK, TagKind.COMMENT) and after.left_modifier != "+":
                k = e
                while k > s and text[k - 1] in " \t":
                    k -= 1
                if k == 0 or text[k - 1] == "\n":
                    e = k
        return (s, e) if s < e else None

    def _new(self, kind, start, end, **kw) -> Piece:
        piece = Piece(len(self.pieces), kind, start, end, self._line(start), **kw)
        self.pieces.append(piece)
        return piece

    def _expr(self, node: nodes.Node) -> Piece:
        tag = self._next((TagKind.EXPRESSION,))
        leaves = _chain(node)
        cuts = _operators(self.source, tag) if len(leaves) > 1 else []
        if len(leaves) > 1 and (len(cuts) != len(leaves) - 1 or _adds_markup(node)):
            # parentheses or mixed operators, or a `+` that escapes its other operands: keep the expression whole
            leaves, cuts = [node], []
        if len(leaves) == 1:
            piece = self._new(PieceKind.EXPRESSION, tag.start, tag.end, tag=tag)
            if isinstance(node, nodes.Name):
                piece.variable = node.name
            if isinstance(node, nodes.Const) and isinstance(node.value, str):
                inner = (
                    tag.start + 2 + (1 if tag.left_modifier else 0),
                    tag.end - 2 - (1 if tag.right_modifier else 0),
                )
                offsets = _literal_offsets(self.source, *inner, node.value)
                if offsets is not None:
                    piece.text, piece.offsets = node.value, offsets
            self.exprs[piece.id] = [piece]
            return piece
        bounds = [tag.start + 2 + (1 if tag.left_modifier else 0)] + [c[1] for c in cuts]
        ends = [c[0] for c in cuts] + [tag.end - 2 - (1 if tag.right_modifier else 0)]
        operands = []
        for i, (leaf, s, e) in enumerate(zip(leaves, bounds, ends)):
            piece = self._new(PieceKind.OPERAND, s, e, tag=tag, index=i, count=len(leaves), cuts=cuts)
            if isinstance(leaf, nodes.Name):
                piece.variable = leaf.name
            if isinstance(leaf, nodes.Const) and isinstance(leaf.value, str):
                offsets = _literal_offsets(self.source, s, e, leaf.value)
                if offsets is not None:
                    piece.text, piece.offsets = leaf.value, offsets
            operands.append(piece)
        self.exprs[operands[0].id] = operands
        return operands[0]

    def _stmt(self, node: nodes.Node):
        line = node.lineno
        if isinstance(node, nodes.If):
            open_ = self._next(names=("if",))
            bodies = [self._body(node.body)]
            for elif_ in node.elif_:
                self._next(names=("elif",))
                bodies.append(self._body(elif_.body))
            if self._peek() is not None and self._peek().name == "else":
                self._next(names=("else",))
                bodies.append(self._body(node.else_))
            close = self._next(names=("endif",))
            return Statement(node, open_, close, bodies, line)
        if isinstance(node, nodes.For):
            open_ = self._next(names=("for",))
            bodies = [self._body(node.body)]
            if self._peek() is not None and self._peek().name == "else":
                self._next(names=("else",))
                bodies.append(self._body(node.else_))
            close = self._next(names=("endfor",))
            var = node.target.name if isinstance(node.target, nodes.Name) else None
            return Statement(node, open_, close, bodies, line, loop_var=var)
        if isinstance(node, nodes.Assign):
            tag = self._next(names=("set",))
            return Statement(node, tag, tag, [], line)
        simple = {nodes.Break: "break", nodes.Continue: "continue"}
        if type(node) in simple:
            tag = self._next(names=(simple[type(node)],))
            return Statement(node, tag, tag, [], line)
        blocks = {
            nodes.Macro: ("macro", "endmacro"),
            nodes.AssignBlock: ("set", "endset"),
            nodes.With: ("with", "endwith"),
            nodes.FilterBlock: ("filter", "endfilter"),
            nodes.CallBlock: ("call", "endcall"),
            nodes.Scope: ("scope", "endscope"),
        }
        for kind, (opening, closing) in blocks.items():
            if isinstance(node, kind):
                open_ = self._next(names=(opening,))
                # Inside macros, set blocks and filter/call blocks output is captured, not emitted: opaque.
                self._skip_to(closing)
                close = self._next(names=(closing,))
                return Statement(node, open_, close, [], line)
        raise MarkerError(f"unsupported statement {type(node).__name__}", line)

    def _skip_to(self, closing: str) -> None:
        """Skip the tags of an opaque block, nested blocks of the same kind included."""
        opening = {
            "endmacro": "macro",
            "endset": "set",
            "endwith": "with",
            "endfilter": "filter",
            "endcall": "call",
            "endscope": "scope",
        }[closing]
        depth = 0
        while self._tag_index < len(self.tags):
            tag = self.tags[self._tag_index]
            if tag.kind == TagKind.BLOCK and tag.name == closing:
                if depth == 0:
                    return
                depth -= 1
            elif (
                tag.kind == TagKind.BLOCK
                and tag.name == opening
                and not (opening == "set" and "=" in self.source[tag.start : tag.end])
            ):
                depth += 1
            self._tag_index += 1


def _chain(node: nodes.Node) -> list[nodes.Node]:
    """Operands of a string concatenation chain (`a + b ~ c`), in source order."""
    if isinstance(node, nodes.Add):
        return _chain(node.left) + _chain(node.right)
    if isinstance(node, nodes.Concat):
        return [leaf for child in node.nodes for leaf in _chain(child)]
    return [node]


# Filters whose value is `Markup`: `+` with a Markup operand escapes the other one (`"'"|safe + name` prints
# `&#39;` for a quote in `name`), so the operands' own texts don't add up to what the expression prints.
_MARKUP_FILTERS = {"safe", "escape", "e", "forceescape", "urlize", "xmlattr"}


def _adds_markup(node: nodes.Node) -> bool:
    markup = (nodes.Filter, nodes.MarkSafe, nodes.MarkSafeIfAutoescape)
    return (isinstance(node, nodes.Add) or any(True for _ in node.find_all(nodes.Add))) and any(
        not isinstance(found, nodes.Filter) or found.name in _MARKUP_FILTERS for found in node.find_all(markup)
    )


def _operators(source: str, tag: Tag) -> list[tuple[int, int]]:
    """Spans of the top-level `+`/`~` operators inside a `{{ }}` tag (outside strings and brackets)."""
    out, depth = [], 0
    for k, c in outside_strings(
        source, tag.start + 2 + (1 if tag.left_modifier else 0), tag.end - 2 - (1 if tag.right_modifier else 0)
    ):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in "+~" and depth == 0:
            out.append((k, k + 1))
    return out


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0"}


def _literal_offsets(source: str, start: int, end: int, value: str) -> list[int] | None:
    """Source position of each character of a string literal's value (plus its closing quote), or None when
    the literal uses escapes we don't split across."""
    text = source[start:end]
    lead = len(text) - len(text.lstrip())
    body = text.strip()
    if len(body) < 2 or body[0] not in "'\"" or body[-1] != body[0]:
        return None
    base, chars, out, k = start + lead, [], [], 1
    while k < len(body) - 1:
        out.append(base + k)
        if body[k] == "\\":
            if body[k + 1] not in _ESCAPES:
                return None
            chars.append(_ESCAPES[body[k + 1]])
            k += 2
        else:
            chars.append(body[k])
            k += 1
    out.append(base + len(body) - 1)
    return out if "".join(chars) == value else None


def _environment():
    """transformers' own jinja environment (sandbox, filters, globals), taken from its compiler."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template("{{ '' }}").environment
