"""Add `{% generation %}` markers to an inference chat template, and prove the result before handing it out.

Hand-placing markers in a 200-line template is where masks go wrong, and TRL only swaps in a training
template when a model's template is byte-identical to one of the few it stores. Here the template is
*run* to find where its assistant output comes from, then markers are placed at those places in the
source, and the result must pass the same checks as a hand-written template:

1. Trace. jinja2's own parser gives the AST; every piece that emits text (a `{{ }}` expression, each
   operand of a `+`/`~` chain in it, a run of literal text) is wrapped in a recording call, and the
   instrumented tree is compiled with transformers' own environment (same filters, globals, sandbox).
   Rendering the probe corpus then says, for every output character, which piece emitted it and for
   which message of the conversation loop.
2. Label. lint's `locate_turns` says where each assistant turn is in the text (from the end of the
   generation prompt's role header to its end-of-turn): those characters must be trained, all others
   must not. Whitespace after the end-of-turn may go either way (we leave it untrained, as the bundled
   templates do); so may text the generation prompt pre-fills and a tool-call turn's closing markup,
   which are trained where that gives the markers a fixed place.
3. Place. Walking the template's statement lists, maximal runs of pieces that only emit trained text
   get one generation block each; pieces that emit both are split (an expression at its `+`, literal
   text between characters, a printed variable after its role header) or, when the same code renders
   every role (`'<|start_header_id|>' + role + ... + content`), duplicated under
   `{% if message.role == 'assistant' %}` so only the assistant copy is marked; when the same assistant
   code is the prompt's in one place and the model's in another (a second message header inside one
   turn), it is duplicated under a flag saying whether the turn has begun (see `_Placer`). Whitespace
   control is preserved by moving each tag's `-` to the inserted tag and using `+` where jinja's
   trim_blocks/lstrip_blocks would otherwise eat text.
4. Verify. The result must render byte-identically to the input on every probe (with and without the
   generation prompt, every prefix; every tool-call shape in `probes.TOOL_SHAPE_PROBES`), train every
   labelled character and, checked apart from the labels, every assistant content, reasoning and tool-call
   name and argument the render shows, and pass lint (`verify_placement`). Nothing is returned otherwise:
   `MarkerError` says which construct defeated the placement and on which line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from enum import Enum

import jinja2
from jinja2 import nodes

from .lint import lint, setting_label, settings_for
from .masks import GENERATION_MARKER, RenderLimit, TemplateRaised, normalize_messages, render, template_error_text
from .probes import PROBES, VERIFICATION_PROBES, Probe, text_of
from .problems import ERROR, Finding, InputError
from .turns import NO_STOP, end_of_turn, locate_turns, render_probe, usable_probe



class MarkerError(Exception):
    """The template could not be given verified markers; `line` points at the construct that defeated it."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.args[0]}"


@dataclass(frozen=True)
class Result:
    source: str
    blocks: int               # generation blocks inserted
    role_conditions: int      # shared role code duplicated under an assistant condition
    relaxed_whitespace: bool  # some whitespace inside an assistant turn had to stay untrained


def has_markers(source: str) -> bool:
    return bool(GENERATION_MARKER.search(source))


def add_markers(source: str, *, tokenizer=None) -> Result:
    """The template with generation markers added, verified; raises MarkerError (or InputError) otherwise.

    A template that already has markers is returned as it is when lint passes; otherwise its markers are
    taken out and placed again (the result must still render exactly like the input).
    """
    original = source
    if has_markers(source):
        if lint(source, "input", tokenizer=tokenizer).ok:
            return Result(source, 0, 0, False)
        source = _strip_markers(source)
    template = _Template.parse(source)
    # Markers placed for the template's defaults, when lint passes them under every setting of its switches
    # (but for header-level R002/R004 findings of one setting, allowed by name and setting); else markers that
    # suit every setting; else, where no place suits them all, the defaults' markers with the other settings'
    # R001 findings allowed too (see _inherit_allowances).
    settings = settings_for(source)
    attempts = [([{}], False)] + ([(settings, False), ([{}], True)] if len(settings) > 1 else [])
    errors, traced = [], {}
    for tried, defaults_only in attempts:
        if len(tried) not in traced:
            traced[len(tried)] = _trace_all(template, tokenizer, tried)
        traces, failed = traced[len(tried)]
        if not any("T" in t.labels for t in traces):
            raise MarkerError("no probe conversation rendered an assistant turn; is this a chat template?")
        # Plain first; then leaving whitespace inside turns untrained; then with the turn-has-begun flag.
        for relaxed, flags in ((False, False), (True, False), (False, True), (True, True)):
            try:
                placed = _Placer(template, traces, relaxed, flags).place()
            except MarkerError as err:
                errors.append(err)
                continue
            marked = _inherit_allowances(placed.source, failed, tokenizer, defaults_only=defaults_only)
            problems = _verify(original, marked, traces, tokenizer, relaxed)
            if not problems:
                return Result(marked, placed.blocks, placed.role_conditions, relaxed)
            errors.append(MarkerError("the marked template failed verification: "
                                      + "; ".join(f.message for f in problems[:3])))
    if str(errors[0]) != str(errors[1]):
        raise MarkerError(f"{errors[0]} (and with whitespace inside turns left untrained: {errors[1]})",
                          errors[0].line or errors[1].line)
    raise errors[0]


def _strip_markers(source: str) -> str:
    return re.sub(r"\{%-?\+?\s*(?:end)?generation\s*[-+]?%\}", "", source)


def _inherit_allowances(marked: str, failed: list[str], tokenizer, defaults_only: bool = False) -> str:
    """Findings that belong to the original's text, which the marked template reproduces byte for byte, are
    allowed with that reason in a comment (lint keeps showing them, as info) instead of failing the
    conversion: R004 (its generation prompt is not how it renders a past assistant turn) and R007 for
    probes the original itself fails to render (e.g. a template without tool support); R002/R004 seen only
    under one setting of the template's switches, for that setting (with `enable_thinking=false` glm4's
    generation prompt writes the role header's newline that starts a turn by default: a byte-identical
    conversion places one block boundary for both), and R001 too when the markers were placed for the
    template's defaults only (`defaults_only`: no place suits every setting; check-data's content coverage
    still checks each row rendered with its own settings); and R003 when the
    original writes nothing after an assistant's content (glm4: the next message's role tag ends the turn, and
    a byte-identical conversion can't train a tag that belongs to the next message)."""
    errors = [f for f in lint(marked, "marked", tokenizer=tokenizer).findings if f.severity == ERROR]
    rules = {f.rule for f in errors}
    reasons = []
    setting_rules = ("R001", "R002", "R004") if defaults_only else ("R002", "R004")
    for label in dict.fromkeys(m.group(1) for f in errors if f.rule in setting_rules
                               and (m := re.search(r" with (\w+=[^\s,;()]+(?:; \w+=[^\s,;()]+)*)\]$", f.message))):
        rules_there = ", ".join(sorted({f.rule for f in errors if f.message.endswith(f" with {label}]")}))
        why = ("markers placed for the template's defaults: with {label} the same code writes assistant output "
               "and text the model is given, so no place suits both" if defaults_only else
               "with {label} its generation prompt ends elsewhere than its turns begin by default, and a "
               "byte-identical conversion marks one place")
        reasons.append(f"{rules_there} when {label} (inherited from the original template: {why.format(label=label)})")
    if any(f.rule == "R003" and f.message.startswith(NO_STOP) for f in errors):
        reasons.append("R003 (inherited from the original template: it writes nothing after an assistant's content, "
                       "the next message's role tag ends the turn, so no stop token can be trained)")
    if "R004" in rules:
        reasons.append("R004 (inherited from the original template: its generation prompt differs from how it "
                       "renders a past assistant turn)")
    if "R007" in rules and failed:
        reasons.append(f"R007 (inherited from the original template: it fails to render the probes "
                       f"{', '.join(sorted({n.split(' (')[0].split('[')[0].split('+')[0] for n in failed}))})")
    return "".join(f"{{# sft-toolkit: allow {r} #}}" for r in reasons) + marked


# ---------------------------------------------------------------------------------------------------------
# 1. The source, scanned into tags and text, matched to jinja2's AST


@dataclass
class _Tag:
    kind: str        # "var" {{ }}, "block" {% %}, "comment" {# #}, "raw" ({% raw %}...{% endraw %}, kept as text)
    start: int
    end: int
    name: str = ""   # first word of a block tag
    lmod: str = ""   # "-", "+" or "" right after the opening delimiter
    rmod: str = ""   # "-", "+" or "" right before the closing delimiter


def _scan(source: str) -> list[_Tag]:
    """Tags with their exact positions (jinja2's lexer has line numbers only). Strings inside tags are skipped."""
    tags, i, n = [], 0, len(source)
    while True:
        j = source.find("{", i)
        while j >= 0 and source[j + 1:j + 2] not in ("{", "%", "#"):
            j = source.find("{", j + 1)
        if j < 0:
            return tags
        opener = source[j + 1]
        if opener == "#":
            end = source.find("#}", j + 2)
            if end < 0:
                raise MarkerError("unclosed comment", source.count("\n", 0, j) + 1)
            tags.append(_Tag("comment", j, end + 2, lmod=_mod(source[j + 2:j + 3]), rmod=_mod(source[end - 1])))
            i = end + 2
            continue
        close = "}}" if opener == "{" else "%}"
        k = next((k for k, _ in _outside_strings(source, j + 2, n) if source.startswith(close, k)), n)
        if k >= n:
            raise MarkerError(f"unclosed {'{{' if opener == '{' else '{%'} tag", source.count("\n", 0, j) + 1)
        inner = source[j + 2:k]
        tag = _Tag("var" if opener == "{" else "block", j, k + 2, lmod=_mod(inner[:1]), rmod=_mod(inner[-1:]))
        if tag.kind == "block":
            tag.name = (inner.strip("-+ \t\r\n").split() or [""])[0]
            if tag.name == "raw":
                m = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}").search(source, tag.end)
                if not m:
                    raise MarkerError("unclosed raw block", source.count("\n", 0, j) + 1)
                tag = _Tag("raw", j, m.end(), lmod=tag.lmod, rmod=m.group(0)[-3:-2].replace("%", ""))
        tags.append(tag)
        i = tag.end


def _mod(ch: str) -> str:
    return ch if ch in ("-", "+") else ""


@dataclass
class _Piece:
    """Something that emits text: literal text, a whole `{{ }}` expression, or one operand of a `+`/`~` chain."""

    id: int
    kind: str                 # "data", "expr", "operand"
    start: int                # source span of the text / tag / operand
    end: int
    line: int
    tag: _Tag | None = None   # the {{ }} tag of an expr / operand
    index: int = 0            # operand index in its chain
    count: int = 1            # operands in the chain
    cuts: list = field(default_factory=list)   # operator spans between operands (for the owning expr)
    text: str | None = None   # literal value (data, string constant): splittable between characters
    offsets: list | None = None  # source position of each character of `text` (and of the closing quote)
    variable: str | None = None  # `{{ name }}`: the text was assembled elsewhere


@dataclass
class _Stmt:
    """A block statement (if/for/with/...) and the statement lists inside it."""

    node: nodes.Node
    open: _Tag
    close: _Tag
    bodies: list            # list of _Body
    line: int
    loop_var: str | None = None   # `for <name> in ...`: the name, for role conditions


@dataclass
class _Body:
    items: list             # _Piece (the first operand stands for its whole `{{ }}`) | _Stmt


class _Template:
    """The source, its tags, and a tree of statement lists whose leaves know their source spans."""

    def __init__(self, source: str, env, tree):
        self.source, self.env = source, env
        self.tags = _scan(source)
        self.pieces: list[_Piece] = []
        self.exprs: dict[int, list[_Piece]] = {}   # id of the first operand -> all operands of that {{ }}
        self._t, self._pos = 0, 0
        self.body = self._body(tree.body)
        if self._t != len(self.tags):
            raise MarkerError("the template's tags and jinja2's parse disagree (unsupported construct)",
                              self._line(self.tags[self._t].start) if self._t < len(self.tags) else None)

    @classmethod
    def parse(cls, source: str) -> "_Template":
        env = _environment()
        try:
            tree = env.parse(source)
        except jinja2.TemplateSyntaxError as err:
            raise InputError(f"template syntax error at line {err.lineno}: {err.message}") from None
        return cls(source, env, tree)

    def _line(self, pos: int) -> int:
        return self.source.count("\n", 0, pos) + 1

    def _next(self, kinds=("block",), names=None) -> _Tag:
        """The next tag, skipping comments; it must be what the AST says comes next."""
        while self._t < len(self.tags) and self.tags[self._t].kind == "comment":
            self._t += 1
        if self._t >= len(self.tags):
            raise MarkerError("unexpected end of the template's tags (unsupported construct)")
        tag = self.tags[self._t]
        if tag.kind not in kinds or (names and tag.name not in names):
            raise MarkerError(f"could not match the {tag.kind} tag {self.source[tag.start:tag.end][:40]!r} to "
                              "jinja2's parse (unsupported construct)", self._line(tag.start))
        self._t += 1
        self._pos = tag.end
        return tag

    def _peek(self) -> _Tag | None:
        t = self._t
        while t < len(self.tags) and self.tags[t].kind == "comment":
            t += 1
        return self.tags[t] if t < len(self.tags) else None

    def _body(self, stmts) -> _Body:
        items = []
        for node in stmts:
            if isinstance(node, nodes.Output):
                for child in node.nodes:
                    items.append(self._data(child) if isinstance(child, nodes.TemplateData) else self._expr(child))
            else:
                items.append(self._stmt(node))
        return _Body(items)

    def _data(self, node: nodes.TemplateData) -> _Piece:
        """Literal text: the gap between tags (comments split gaps) that jinja trimmed into `node.data`."""
        gaps, s, k = [], self._pos, self._t
        while k < len(self.tags) and self.tags[k].kind == "comment":
            gaps.append((s, self.tags[k].start))
            s, k = self.tags[k].end, k + 1
        gaps.append((s, self.tags[k].start if k < len(self.tags) else len(self.source)))
        for gs, ge in gaps:
            trimmed = self._trim(gs, ge)
            if trimmed is not None and self.source[trimmed[0]:trimmed[1]] == node.data:
                at = trimmed[0]
            elif (at := self.source.find(node.data, gs, ge)) < 0:
                continue
            self._pos = ge
            piece = self._new("data", at, at + len(node.data))
            piece.text = node.data
            piece.offsets = list(range(at, at + len(node.data) + 1))
            return piece
        if k < len(self.tags) and self.tags[k].kind == "raw":  # {% raw %}: kept whole
            self._t = k + 1
            self._pos = self.tags[k].end
            return self._new("data", self.tags[k].start, self.tags[k].end)
        raise MarkerError("could not locate literal text in the source", node.lineno)

    def _trim(self, gs: int, ge: int) -> tuple[int, int] | None:
        """The part of the gap [gs, ge) jinja keeps with trim_blocks/lstrip_blocks and `-` modifiers."""
        before = next((t for t in self.tags if t.end == gs), None)
        after = next((t for t in self.tags if t.start == ge), None)
        s, e = gs, ge
        text = self.source
        if before is not None:
            if before.rmod == "-":
                while s < e and text[s].isspace():
                    s += 1
            elif before.kind in ("block", "comment") and before.rmod != "+" and text.startswith("\n", s):
                s += 1
        if after is not None:
            if after.lmod == "-":
                while e > s and text[e - 1].isspace():
                    e -= 1
            elif after.kind in ("block", "comment") and after.lmod != "+":
                k = e
                while k > s and text[k - 1] in " \t":
                    k -= 1
                if k == 0 or text[k - 1] == "\n":
                    e = k
        return (s, e) if s < e else None

    def _new(self, kind, start, end, **kw) -> _Piece:
        piece = _Piece(len(self.pieces), kind, start, end, self._line(start), **kw)
        self.pieces.append(piece)
        return piece

    def _expr(self, node: nodes.Node) -> _Piece:
        tag = self._next(("var",))
        leaves = _chain(node)
        cuts = _operators(self.source, tag) if len(leaves) > 1 else []
        if len(leaves) > 1 and len(cuts) != len(leaves) - 1:
            leaves, cuts = [node], []  # parentheses or mixed operators: keep the expression whole
        if len(leaves) == 1:
            piece = self._new("expr", tag.start, tag.end, tag=tag)
            if isinstance(node, nodes.Name):
                piece.variable = node.name
            if isinstance(node, nodes.Const) and isinstance(node.value, str):
                inner = (tag.start + 2 + (1 if tag.lmod else 0), tag.end - 2 - (1 if tag.rmod else 0))
                offsets = _literal_offsets(self.source, *inner, node.value)
                if offsets is not None:
                    piece.text, piece.offsets = node.value, offsets
            self.exprs[piece.id] = [piece]
            return piece
        bounds = [tag.start + 2 + (1 if tag.lmod else 0)] + [c[1] for c in cuts]
        ends = [c[0] for c in cuts] + [tag.end - 2 - (1 if tag.rmod else 0)]
        operands = []
        for i, (leaf, s, e) in enumerate(zip(leaves, bounds, ends)):
            piece = self._new("operand", s, e, tag=tag, index=i, count=len(leaves), cuts=cuts)
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
            return _Stmt(node, open_, close, bodies, line)
        if isinstance(node, nodes.For):
            open_ = self._next(names=("for",))
            bodies = [self._body(node.body)]
            if self._peek() is not None and self._peek().name == "else":
                self._next(names=("else",))
                bodies.append(self._body(node.else_))
            close = self._next(names=("endfor",))
            var = node.target.name if isinstance(node.target, nodes.Name) else None
            return _Stmt(node, open_, close, bodies, line, loop_var=var)
        if isinstance(node, nodes.Assign):
            tag = self._next(names=("set",))
            return _Stmt(node, tag, tag, [], line)
        simple = {nodes.Break: "break", nodes.Continue: "continue"}
        if type(node) in simple:
            tag = self._next(names=(simple[type(node)],))
            return _Stmt(node, tag, tag, [], line)
        blocks = {nodes.Macro: ("macro", "endmacro"), nodes.AssignBlock: ("set", "endset"),
                  nodes.With: ("with", "endwith"), nodes.FilterBlock: ("filter", "endfilter"),
                  nodes.CallBlock: ("call", "endcall"), nodes.Scope: ("scope", "endscope")}
        for kind, (opening, closing) in blocks.items():
            if isinstance(node, kind):
                open_ = self._next(names=(opening,))
                # Inside macros, set blocks and filter/call blocks output is captured, not emitted: opaque.
                self._skip_to(closing)
                close = self._next(names=(closing,))
                return _Stmt(node, open_, close, [], line)
        raise MarkerError(f"unsupported statement {type(node).__name__}", line)

    def _skip_to(self, closing: str) -> None:
        """Skip the tags of an opaque block, nested blocks of the same kind included."""
        opening = {"endmacro": "macro", "endset": "set", "endwith": "with", "endfilter": "filter",
                   "endcall": "call", "endscope": "scope"}[closing]
        depth = 0
        while self._t < len(self.tags):
            tag = self.tags[self._t]
            if tag.kind == "block" and tag.name == closing:
                if depth == 0:
                    return
                depth -= 1
            elif tag.kind == "block" and tag.name == opening and not (opening == "set" and "=" in
                                                                    self.source[tag.start:tag.end]):
                depth += 1
            self._t += 1


def _chain(node: nodes.Node) -> list[nodes.Node]:
    """Operands of a string concatenation chain (`a + b ~ c`), in source order."""
    if isinstance(node, nodes.Add):
        return _chain(node.left) + _chain(node.right)
    if isinstance(node, nodes.Concat):
        return [leaf for child in node.nodes for leaf in _chain(child)]
    return [node]


def _operators(source: str, tag: _Tag) -> list[tuple[int, int]]:
    """Spans of the top-level `+`/`~` operators inside a `{{ }}` tag (outside strings and brackets)."""
    out, depth = [], 0
    for k, c in _outside_strings(source, tag.start + 2 + (1 if tag.lmod else 0), tag.end - 2 - (1 if tag.rmod else 0)):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in "+~" and depth == 0:
            out.append((k, k + 1))
    return out


def _outside_strings(source: str, start: int, end: int):
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


# ---------------------------------------------------------------------------------------------------------
# 2. Trace: render the probe corpus with every emitting piece recorded, and label every character


@dataclass
class _Emission:
    piece: int
    start: int
    end: int
    role: str | None      # role of the innermost message being looped over, if any
    loop: int | None      # id of that for-loop node
    iteration: int | None = None  # which pass through that loop
    started: bool = False  # whether this pass already emitted trained text (before this `{{ }}`)


@dataclass
class _Trace:
    name: str
    text: str
    emissions: list
    labels: str           # per character: T (must train), U (must not), * (either)
    probe: Probe          # the conversation rendered (a probe or a prefix of one)
    prompt: bool          # add_generation_prompt


def _instrument(template: _Template):
    """A fresh AST of the same source with every piece wrapped in `sft_emit(id, value)`, every for-loop body
    opened with `sft_enter(loop, item)` and every for-loop followed by `sft_leave(loop)` (so text after an
    inner loop over messages, e.g. gpt-oss's look-ahead, is not taken for the last message it saw); pieces
    are numbered in the same order as `_Template`."""
    tree = template.env.parse(template.source)
    counter = iter(range(len(template.pieces)))
    loop_ids = {}

    def call(name, *args):
        return nodes.Call(nodes.Name(name, "load"), list(args), [], None, None)

    def walk(stmts):
        out = []
        for node in stmts:
            out.append(node)
            if isinstance(node, nodes.Output):
                new = []
                for child in node.nodes:
                    pid = next(counter)
                    if isinstance(child, nodes.TemplateData):
                        new.append(call("sft_emit", nodes.Const(pid), nodes.Const(child.data)))
                        continue
                    operands = template.exprs[pid]
                    if len(operands) == 1:
                        new.append(call("sft_emit", nodes.Const(pid), child))
                    else:
                        for _ in operands[1:]:
                            next(counter)
                        new.append(_wrap_chain(child, iter(p.id for p in operands), call))
                node.nodes = new
            elif isinstance(node, nodes.If):
                node.body = walk(node.body)
                for elif_ in node.elif_:
                    elif_.body = walk(elif_.body)
                node.else_ = walk(node.else_)
            elif isinstance(node, nodes.For):
                loop = loop_ids[id(node)] = len(loop_ids)
                node.body = walk(node.body)
                if isinstance(node.target, nodes.Name):
                    node.body.insert(0, nodes.Output([call("sft_enter", nodes.Const(loop),
                                                            nodes.Name(node.target.name, "load"))]))
                    out.append(nodes.Output([call("sft_leave", nodes.Const(loop))]))
                node.else_ = walk(node.else_)
        return out
    tree.body = walk(tree.body)
    return tree


def _wrap_chain(node, ids, call):
    if isinstance(node, nodes.Add):
        node.left = _wrap_chain(node.left, ids, call)
        node.right = _wrap_chain(node.right, ids, call)
        return node
    if isinstance(node, nodes.Concat):
        node.nodes = [_wrap_chain(n, ids, call) for n in node.nodes]
        return node
    return call("sft_emit", nodes.Const(next(ids)), node)


def _cases(probe: Probe):
    """(name, messages, add_generation_prompt): the renders training and inference make of a probe."""
    yield probe.name, probe.messages, False
    yield f"{probe.name}+prompt", probe.messages, True
    for i, m in enumerate(probe.messages):
        # A conversation cut right after a tool call has no turn end to find: some templates
        # keep the model's turn open for the tool's answer, so where the turn stops is unknowable there.
        if m.get("role") == "assistant" and i + 1 < len(probe.messages) and text_of(m.get("content")) \
                and not m.get("tool_calls"):
            yield f"{probe.name}[:{i + 1}]", probe.messages[: i + 1], False


def _trace_all(template: _Template, tokenizer, settings: list[dict]) -> tuple[list[_Trace], list[str]]:
    from transformers.utils.chat_template_utils import _alias_reasoning_fields, _plain_template_data

    env = template.env
    code = env.compile(_instrument(template))
    traced = env.template_class.from_code(env, code, env.make_globals(None), None)
    kwargs = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    # The end-of-turn text, from the first probe that shows it (a prefix ending in a tool call doesn't).
    eot = next((e for p in PROBES if (e := end_of_turn(template.source, usable_probe(template.source, p, _special(
        kwargs)), _special(kwargs)))), None)
    out, failed, first_error = [], [], None
    # The settings of the template's switches the markers must suit (lint checks each one).
    for setting, probe in ((setting, probe) for setting in settings for probe in VERIFICATION_PROBES):
        probe = replace(probe, template_kwargs={**setting, **probe.template_kwargs})
        probe = usable_probe(template.source, probe, _special(kwargs))
        for name, messages, prompt in _cases(probe):
            if setting:
                name = f"{name} ({setting_label(setting, {})})"
            sub = replace(probe, messages=messages)
            try:
                expected = render_probe(template.source, sub, messages, prompt, kwargs)
            except TemplateRaised:
                continue  # the original refuses this conversation, the marked one must too (checked by lint)
            except InputError as err:
                if probe.training_shape:  # a shape only other renderers give: no allowance is needed
                    failed.append(name)  # the original can't render it either (e.g. no tool support): not ours
                    first_error = first_error or err
                continue
            emissions, stack, passes = [], [], []

            def enter(loop, item):
                while stack and stack[-1][0] == loop:
                    stack.pop()
                if isinstance(item, dict) and isinstance(item.get("role"), str):
                    stack.append((loop, item["role"], len(passes)))
                    passes.append(loop)
                return ""

            def leave(loop):
                while stack and stack[-1][0] == loop:
                    stack.pop()
                return ""

            def emit(pid, value, _e=emissions, _s=stack):
                text = str(value) if value is not None else "None"
                loop, role, iteration = _s[-1] if _s else (None, None, None)
                _e.append((pid, text, role, iteration, loop))
                return value

            variables = {**_special(kwargs), **probe.template_kwargs}
            chat = _alias_reasoning_fields(_plain_template_data(messages if probe.keep_none
                                                                else normalize_messages(messages)))
            try:
                text = traced.render(messages=chat, tools=_plain_template_data(probe.tools), documents=None,
                                     add_generation_prompt=prompt, sft_emit=emit, sft_enter=enter, sft_leave=leave,
                                     **_plain_template_data(variables))
            except RenderLimit as err:  # the traced render has the same budget as any other (a template that
                raise RenderLimit(f"tracing probe {name}: {err}") from None  # loops only when traced stops too)
            except jinja2.TemplateError as err:
                raise MarkerError(f"tracing the template failed on probe {name}: {template_error_text(err)}") from None
            except Exception as err:  # noqa: BLE001 - whatever the template's code raised while traced
                raise InputError(f"the template failed while traced on probe {name}: "
                                 f"{template_error_text(err)}") from None
            pos, located = 0, []
            for pid, piece_text, role, iteration, loop in emissions:
                located.append(_Emission(pid, pos, pos + len(piece_text), role, loop, iteration))
                pos += len(piece_text)
            if text != expected.text or "".join(e[1] for e in emissions) != text:
                raise MarkerError(f"the template's output could not be traced to its source on probe {name} "
                                  "(output from a filter/call block, or a non-string `+`)")
            labels = _labels(template.source, sub, expected, eot, kwargs)
            _mark_started(located, labels, template.pieces)
            out.append(_Trace(name, text, located, labels, sub, prompt))
    if not out and first_error:
        raise InputError(f"the template fails to render every probe conversation: {first_error}")
    return out, failed


def _mark_started(emissions: list[_Emission], labels: str, pieces: list[_Piece]) -> None:
    """Set `started` on each emission: its pass through the messages loop already emitted trained text.
    Operands of one `{{ }}` share the first operand's value, as a condition around the tag sees it."""
    trained, previous = set(), None
    for e in emissions:
        piece = pieces[e.piece]
        e.started = previous.started if piece.kind == "operand" and piece.index > 0 else e.iteration in trained
        if e.iteration is not None and "T" in labels[e.start:e.end]:
            trained.add(e.iteration)
        previous = e


def _special(kwargs: dict) -> dict:
    from .masks import DEFAULT_SPECIAL_TOKENS

    return {**DEFAULT_SPECIAL_TOKENS, **kwargs}


def _labels(source, probe: Probe, rendered, eot, kwargs) -> str:
    """T from each assistant turn's start to its end-of-turn, * for the whitespace after it, p for the parts
    of the turn that may go either way (the generation prompt's prefill, a tool-call turn's closing markup;
    trained where that gives a fixed marker place), U elsewhere."""
    turns, _ = locate_turns(source, probe, rendered, eot, _special(kwargs))
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


# ---------------------------------------------------------------------------------------------------------
# 3. Place the markers
#
# The template is a tree of statement lists. In each list, every emitting piece and statement gets a
# signature over all traced renders: {T} only trained text, {U} only untrained, {} nothing (or only
# whitespace that may go either way), {T, U} both. Mixed ones are resolved: literal text is split between
# characters, a statement is entered, and code shared by all roles is duplicated under a role condition.
# Then each maximal run of {T} atoms (with {} atoms inside it) becomes one generation block.


@dataclass
class _Placed:
    source: str
    blocks: int
    role_conditions: int


@dataclass(frozen=True)
class _Atom:
    kind: str          # "piece" | "chars" (part of a literal) | "head"/"tail" (of a split `{{ name }}`) | "stmt" |
                       # "done" (resolved inside) | "break"
    obj: object        # _Piece | _Stmt
    sig: frozenset
    a: int = 0         # chars: [a, b) of the literal's text
    b: int = 0
    landmark: str = ""  # head/tail: the text the head ends with


# The namespace a converted template keeps its "this turn already wrote trained text" flag in (see `_Placer`).
FLAG = "sft_toolkit_turn"
_ASSISTANT, _STARTED, _FRESH = frozenset({"assistant"}), frozenset({"assistant", "started"}), frozenset({"assistant", "fresh"})
_WHERE = {"assistant": lambda e: e.role == "assistant", "started": lambda e: e.started, "fresh": lambda e: not e.started}


class _Placer:
    """Places the markers. Mixed code is resolved in up to two conditions, each a copy of the code marked for
    the renders it selects (`where`): the message's role, and, with `flags`, whether the assistant's turn
    already wrote trained text in this pass through the loop. The second is for formats whose turn is
    several messages, each with its own header (gpt-oss/harmony: `<|start|>assistant<|channel|>analysis...`
    then `<|start|>assistant<|channel|>final...`): the generation prompt writes the first header, the model
    the others, from the same code. The template keeps the flag in a namespace made at the start of each
    pass and set at each block's end (so a block that rendered nothing sets it too: verification checks the
    probes); nothing of it is printed."""

    def __init__(self, template: _Template, traces: list[_Trace], relaxed: bool, flags: bool = False):
        self.t, self.relaxed, self.flags = template, relaxed, flags
        self.by_piece: dict[int, list] = {}
        for trace in traces:
            for e in trace.emissions:
                self.by_piece.setdefault(e.piece, []).append((trace, e))
        self.fors = [s for s in _stmts(template.body) if isinstance(s.node, nodes.For)]
        self.blocks = self.role_conditions = 0
        self.flag_loops: set[int] = set()

    def place(self) -> _Placed:
        edits = self._body(self.t.body.items, frozenset())
        for loop in sorted(self.flag_loops):  # a fresh flag at the start of each pass
            tag = self.fors[loop].open
            width = 2 + (1 if tag.rmod else 0)
            edits.append((tag.end - width, tag.end, f"%}}{{% set {FLAG} = namespace(started=false) {tag.rmod}%}}"))
        source = _apply(self.t.source, edits, 0, len(self.t.source))
        if self.flag_loops:  # every generation block in the source is ours
            source = re.sub(r"\{%([-+]?) endgeneration",
                            lambda m: f"{{%{m.group(1)} set {FLAG}.started = true %}}{{% endgeneration", source)
        return _Placed(source, self.blocks, self.role_conditions)

    # What pieces emitted -------------------------------------------------------------------------------
    def _emissions(self, pieces, where):
        for pid in pieces:
            for trace, e in self.by_piece.get(pid, []):
                if all(_WHERE[name](e) for name in where):
                    yield trace, e

    def _sig(self, pieces, where, prefill=False) -> frozenset:
        """The labels the pieces emit. Pre-filled text (p) follows the rest unless `prefill` asks to see it:
        untrained beside untrained text, trained otherwise (as TRL's training templates train a pre-filled
        `<think>` block)."""
        sig = {trace.labels[i] for trace, e in self._emissions(pieces, where) for i in range(e.start, e.end)}
        sig.discard("*")
        if "p" in sig and not prefill:
            sig.discard("p")
            sig = sig or {"T"}
        return frozenset(sig)

    def _char_labels(self, piece: _Piece, where) -> list[str] | None:
        """One label per character of a literal, or None when renders disagree. In relaxed mode a whitespace
        character that is trained in some renders and not in others (a separator the template shares with
        the role header) stays untrained. Whitespace that may go either way (after an end-of-turn) is trained
        only between trained characters."""
        labels, forced = ["*"] * len(piece.text), set()
        for trace, e in self._emissions([piece.id], where):
            for k in range(len(piece.text)):
                label = trace.labels[e.start + k]
                if label == "*" or labels[k] == label or (label == "p" and labels[k] != "*"):
                    continue
                if labels[k] in ("*", "p"):
                    labels[k] = label
                elif self.relaxed and piece.text[k].isspace():
                    forced.add(k)
                else:
                    return None
        for k in forced:
            labels[k] = "U"
        labels = ["T" if label == "p" else label for label in labels]
        for a, b, label in _label_runs(labels):
            if label == "*":
                inside = a > 0 and b < len(labels) and labels[a - 1] == "T" and labels[b] == "T"
                labels[a:b] = ["T" if inside else "U"] * (b - a)
        return labels

    def _stmt_pieces(self, stmt: _Stmt) -> list[int]:
        return [p.id for p in self.t.pieces if stmt.open.start <= p.start and p.end <= stmt.close.end]

    # The walk ------------------------------------------------------------------------------------------
    def _body(self, items, where: frozenset) -> list:
        """Edits that mark one statement list; raises MarkerError when it can't be done."""
        atoms, edits = [], []
        for item in items:
            resolved = self._resolve(item, where, edits)
            if resolved is None:
                edits.append(self._role_condition(item) if not where else self._turn_condition(item))
                atoms.append(_Atom("done", item, frozenset("X")))
            else:
                atoms += resolved
        return edits + self._runs(atoms)

    def _resolve(self, item, where, edits) -> list[_Atom] | None:
        """The item's atoms with their signatures, mixed ones resolved; None when only a condition can."""
        if isinstance(item, _Stmt):
            sig = self._sig(self._stmt_pieces(item), where)
            if isinstance(item.node, (nodes.Assign, nodes.AssignBlock, nodes.Macro)) and not sig:
                return [_Atom("break", item, frozenset("B"))]  # a `set` inside a block is not seen after it
            if sig != {"T", "U"}:
                return [_Atom("stmt", item, sig)]
            if not item.bodies:
                return None
            try:
                inner = [e for body in item.bodies for e in self._body(body.items, where)]
            except MarkerError:
                if where:  # statements are conditioned on the role only
                    raise
                return None
            edits += inner
            return [_Atom("done", item, frozenset("X"))]
        atoms = []
        for piece in self.t.exprs.get(item.id, [item]):
            sig = self._sig([piece.id], where)
            splittable = piece.text is not None and self._sig([piece.id], where, prefill=True) & {"T", "p"}
            labels = self._char_labels(piece, where) if splittable else None
            if sig != {"T", "U"} and not (labels and "U" in labels):
                # (a trained literal that ends in whitespace after an end-of-turn is split all the same)
                atoms.append(_Atom("piece", piece, sig))
                continue
            if labels is None:
                landmark = self._landmark(piece, where) if piece.variable else None
                if landmark:
                    atoms += [_Atom("head", piece, frozenset("U"), landmark=landmark),
                              _Atom("tail", piece, frozenset("T"), landmark=landmark)]
                    continue
                if not where or (self.flags and where == _ASSISTANT):
                    return None
                if piece.variable:
                    raise MarkerError(f"the turn is assembled in the variable `{piece.variable}` and printed in one "
                                      "piece; markers can only go where its parts are printed", piece.line)
                raise MarkerError("the same code prints assistant output in some conversations and text the model "
                                  "is given in others (e.g. a reasoning block the generation prompt pre-fills), "
                                  "so no fixed place for a marker exists", piece.line)
            atoms += [_Atom("chars", piece, frozenset(label), a, b) for a, b, label in _label_runs(labels)]
        return atoms

    def _landmark(self, piece: _Piece, where) -> str | None:
        """For `{{ name }}` printing a turn assembled elsewhere (llama 3.0: `set content = header + text + eot`):
        text that ends the untrained head of every emission and first occurs there, so the print can be split
        at `name.find(landmark) + len(landmark)`. The longest such text (the whole role header) is taken. A
        split renders the same bytes wherever it falls; verification checks that it falls right."""
        heads = []
        for trace, e in self._emissions([piece.id], where):
            labels, text = trace.labels[e.start:e.end], trace.text[e.start:e.end]
            first = labels.find("T")
            if first <= 0 or set(labels[:first]) - {"U", "p"} or "U" in labels[first:]:
                return None
            heads.append((text, first))
        if not heads:
            return None
        size = min(k for _, k in heads)
        while size and len({text[k - size:k] for text, k in heads}) > 1:
            size -= 1
        for n in range(size, 0, -1):
            landmark = heads[0][0][heads[0][1] - n:heads[0][1]]
            if all(text.find(landmark) + n == k for text, k in heads):
                return landmark
        return None

    def _role_condition(self, item) -> tuple[int, int, str]:
        """`{% if m.role == 'assistant' %}marked copy{% else %}original{% endif %}` around a whole item."""
        pieces = self._stmt_pieces(item) if isinstance(item, _Stmt) else [p.id for p in self.t.exprs.get(item.id, [item])]
        emissions = list(self._emissions(pieces, frozenset()))
        loops = {e.loop for _, e in emissions}
        line = item.line
        if not emissions or None in loops or len(loops) != 1:
            raise MarkerError("assistant output and other text come from the same code here, outside a "
                              "`for message in messages` loop, so it can't be conditioned on the role", line)
        if any(trace.labels[i] == "T" for trace, e in emissions if e.role != "assistant"
               for i in range(e.start, e.end)):
            raise MarkerError("this code trains text of non-assistant messages", line)
        var = self.fors[loops.pop()].loop_var
        start, lmod = _edge(self.t, item, "left")
        end, rmod = _edge(self.t, item, "right")
        marked = self._copy(item, _ASSISTANT, start, end)
        self.role_conditions += 1
        return (start, end, f"{{%{lmod} if {var}.role == 'assistant' +%}}{marked}{{%+ else +%}}"
                            f"{self.t.source[start:end]}{{%+ endif {rmod}%}}")

    def _turn_condition(self, item) -> tuple[int, int, str]:
        """`{% if <flag>.started %}copy marked for later messages of a turn{% else %}copy for its first{% endif %}`
        around one `{{ }}` of an assistant message (see the class docstring)."""
        emissions = list(self._emissions([p.id for p in self.t.exprs.get(item.id, [item])], _ASSISTANT))
        loops = {e.loop for _, e in emissions}
        if None in loops or len(loops) != 1 or len({e.started for _, e in emissions}) != 2:
            raise MarkerError("the same code prints assistant output in some conversations and text the model is "
                              "given in others, and whether the turn has begun doesn't tell which", item.line)
        start, lmod = _edge(self.t, item, "left")
        end, rmod = _edge(self.t, item, "right")
        self.flag_loops.add(loops.pop())
        return (start, end, f"{{%{lmod} if {FLAG}.started +%}}{self._copy(item, _STARTED, start, end)}{{%+ else +%}}"
                            f"{self._copy(item, _FRESH, start, end)}{{%+ endif {rmod}%}}")

    def _copy(self, item, where: frozenset, start: int, end: int) -> str:
        """The item's source marked for the renders `where` selects, to sit inside a condition's branch."""
        marked = _apply(self.t.source, self._body([item], where), start, end)
        # Inside the copy the neighbours are the condition's own tags, so no `+` is needed at its edges.
        marked = re.sub(r"\A\{%\+ generation", "{% generation", marked)
        return re.sub(r"endgeneration \+%\}\Z", "endgeneration %}", marked)

    def _runs(self, atoms: list[_Atom]) -> list:
        """One generation block per maximal run of trained atoms; silent atoms join runs but never end them."""
        edits, run = [], []

        def close():
            while run and run[-1].sig != {"T"}:
                run.pop()
            if run:
                edits.append(_boundary(self.t, run[0], "left", "generation"))
                edits.append(_boundary(self.t, run[-1], "right", "endgeneration"))
                self.blocks += 1
            run.clear()

        for atom in atoms:
            if atom.sig == {"T"} or (not atom.sig and run):
                run.append(atom)
            elif atom.sig:
                close()
        close()
        return edits


def _stmts(items_or_body):
    items = items_or_body.items if isinstance(items_or_body, _Body) else items_or_body
    for item in items:
        if isinstance(item, _Stmt):
            yield item
            for body in item.bodies:
                yield from _stmts(body)


def _label_runs(labels: list[str]):
    out, start = [], 0
    for k in range(1, len(labels) + 1):
        if k == len(labels) or labels[k] != labels[start]:
            out.append((start, k, labels[start]))
            start = k
    return out


# Boundaries ---------------------------------------------------------------------------------------------
#
# A start tag goes right before an atom and an end tag right after one. Where the atom begins (ends) with a
# tag, the inserted tag takes over that tag's whitespace control: `{{- x }}` strips the text before it, so it
# becomes `{%- generation %}{{ x }}`, with nothing left between the two to strip. An inserted `{% %}` is also
# subject to jinja's lstrip_blocks/trim_blocks, which `{{ }}` and plain text are not: it gets a `+` exactly
# where those would eat text (indentation before it, a newline after it). Elsewhere the tags stay plain,
# because TRL (`has_generation_markers`) only recognises `{% generation %}` written with or without `-`.


def _lstrip_applies(source: str, pos: int) -> bool:
    k = pos
    while k > 0 and source[k - 1] in " \t":
        k -= 1
    return k < pos and (k == 0 or source[k - 1] == "\n")


def _left_mod(t: _Template, pos: int, tag: _Tag | None) -> str:
    if tag is not None and (tag.kind == "block" or tag.lmod == "-"):
        return tag.lmod
    return "+" if _lstrip_applies(t.source, pos) else ""


def _right_mod(t: _Template, pos: int, tag: _Tag | None) -> str:
    if tag is not None and (tag.kind == "block" or tag.rmod == "-"):
        return tag.rmod
    return "+" if t.source.startswith(("\n", "\r\n"), pos) else ""


def _edge(t: _Template, item, side: str) -> tuple[int, str]:
    """Source position and whitespace modifier of an item's outer edge (for a condition around it)."""
    left = side == "left"
    tag = (item.open if left else item.close) if isinstance(item, _Stmt) else (None if item.kind == "data" else item.tag)
    pos = (tag.start if left else tag.end) if tag is not None else (item.start if left else item.end)
    return pos, (_left_mod(t, pos, tag) if left else _right_mod(t, pos, tag)) or "+"


def _boundary(t: _Template, atom: _Atom, side: str, name: str) -> tuple[int, int, str]:
    """The edit that puts `{% name %}` on `side` of `atom`."""
    obj, left = atom.obj, side == "left"
    if atom.kind == "chars" and not (left and atom.a == 0) and not (not left and atom.b == len(obj.text)):
        pos = obj.offsets[atom.a if left else atom.b]
        if obj.kind != "data":  # inside a string literal: end the literal and the tag around the marker
            quote = t.source[obj.offsets[-1]]
            return (pos, pos, f"{quote} }}}}{{% {name} %}}{{{{ {quote}")
        return (pos, pos, f"{{%{_left_mod(t, pos, None)} {name} {_right_mod(t, pos, None)}%}}")
    if atom.kind == "tail" and left:  # `{{ name }}` -> `{{ name[:k] }}{% generation %}{{ name[k:] }}`
        tag, at = obj.tag, f"{obj.variable}.find({_jinja_string(atom.landmark)}) + {len(atom.landmark)}"
        inner = (tag.start + 2 + (1 if tag.lmod else 0), tag.end - 2 - (1 if tag.rmod else 0))
        return (*inner, f" {obj.variable}[:{at}] }}}}{{% {name} %}}{{{{ {obj.variable}[{at}:] ")
    if isinstance(obj, _Stmt):
        tag = obj.open if left else obj.close
    elif obj.kind == "data":
        pos = obj.start if left else obj.end
        return (pos, pos, f"{{%{_left_mod(t, pos, None)} {name} {_right_mod(t, pos, None)}%}}")
    elif obj.kind == "operand" and (obj.index > 0 if left else obj.index < obj.count - 1):
        op = obj.cuts[obj.index - 1] if left else obj.cuts[obj.index]
        return (op[0], op[1], f" }}}}{{% {name} %}}{{{{ ")
    else:
        tag = obj.tag
    width = 2 + (1 if (tag.lmod if left else tag.rmod) else 0)
    if left:
        return (tag.start, tag.start + width,
                f"{{%{_left_mod(t, tag.start, tag)} {name} %}}{t.source[tag.start:tag.start + 2]}")
    return (tag.end - width, tag.end, f"{t.source[tag.end - 2:tag.end]}{{% {name} {_right_mod(t, tag.end, tag)}%}}")


def _jinja_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped.replace("\t", "\\t") + "'"


def _apply(source: str, edits, start: int, end: int) -> str:
    edits = sorted((e for e in edits if start <= e[0] and e[1] <= end), key=lambda e: (e[0], e[1]))
    out, pos = [], start
    for s, e, text in edits:
        if s < pos:
            raise MarkerError("two markers would land on the same place", source.count("\n", 0, s) + 1)
        out += [source[pos:s], text]
        pos = e
    out.append(source[pos:end])
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------
# 4. Verify


class Refusal(str, Enum):
    """Why verification refuses a marked template: the `rule` of each finding `verify_placement` returns."""

    RENDER_FAILED = "render-failed"            # the marked template fails where the original renders
    RENDER_DIFFERS = "render-differs"          # not byte-identical to the original
    OUTPUT_UNTRAINED = "output-untrained"      # assistant output or its end-of-turn left outside every block
    TRAINED_OUTSIDE = "trained-outside-turn"   # user/system/tool text or template text between turns trained
    MARKERS_UNRECOGNISED = "markers-unrecognised"  # TRL's has_generation_markers doesn't see the blocks
    LINT = "lint"                              # a lint error on the marked template


def verify_placement(original: str, marked: str, *, tokenizer=None,
                     relaxed_whitespace: bool = False) -> list[Finding]:
    """Why `marked` is not `original` with correctly placed generation markers; [] when it is.

    The checks add-markers runs before it writes anything: on every probe render (whole, prefixes, with and
    without the generation prompt) the marked template renders the original's text byte for byte, trains
    every character of each assistant turn and its end-of-turn and nothing else, leaves no assistant content,
    reasoning or tool-call name or argument it shows untrained, and passes lint. `relaxed_whitespace` lets
    whitespace inside a turn stay untrained. Raises InputError when the original doesn't parse, MarkerError
    when its output can't be traced to its source.
    """
    template = _Template.parse(_strip_markers(original))
    traces, _ = _trace_all(template, tokenizer, settings_for(original))
    return _verify(original, marked, traces, tokenizer, relaxed_whitespace)


def _verify(original: str, marked: str, traces: list[_Trace], tokenizer, relaxed: bool) -> list[Finding]:
    """Byte-identical on every traced render, every labelled character trained as labelled, every piece of
    assistant output the render shows trained, lint passes."""
    problems = []

    def refuse(reason: Refusal, message: str) -> None:
        problems.append(Finding(reason.value, ERROR, message))

    kwargs = _special(dict(tokenizer.special_tokens_map) if tokenizer is not None else {})
    for trace in traces:
        probe = trace.probe
        try:
            out = render(marked, probe.messages, add_generation_prompt=trace.prompt, tools=probe.tools,
                         template_kwargs={**kwargs, **probe.template_kwargs}, placeholders=False,
                         keep_none=probe.keep_none)
        except (TemplateRaised, InputError) as err:
            refuse(Refusal.RENDER_FAILED, f"{trace.name}: {err}")
            continue
        if out.text != trace.text:
            at = next((i for i, (x, y) in enumerate(zip(out.text, trace.text)) if x != y),
                      min(len(out.text), len(trace.text)))
            refuse(Refusal.RENDER_DIFFERS, f"{trace.name}: renders {out.text[at:at + 30]!r} where the original "
                   f"renders {trace.text[at:at + 30]!r}")
            continue
        trained = out.trained_chars()
        wrong = [(label == "U" and trained[i]) or (label == "T" and not trained[i] and not (
            relaxed and trace.text[i].isspace())) for i, label in enumerate(trace.labels)]
        if True in wrong:
            start = wrong.index(True)
            end = wrong.index(False, start) if False in wrong[start:] else len(wrong)
            shown = f"{trace.name}: {trace.text[start:end][:60]!r} (characters {start}-{end})"
            if trained[start]:
                refuse(Refusal.TRAINED_OUTSIDE, f"{shown} trained outside the assistant turn")
            else:
                refuse(Refusal.OUTPUT_UNTRAINED, f"{shown} of the assistant turn untrained")
        else:
            if missed := _untrained_output(probe.messages, out.text, trained, relaxed):
                refuse(Refusal.OUTPUT_UNTRAINED, f"{trace.name}: {missed} is untrained")
    from trl.chat_template_utils import has_generation_markers

    if not has_generation_markers(marked):
        refuse(Refusal.MARKERS_UNRECOGNISED, "TRL would not recognise the markers (only `+` forms of the tag)")
    if not problems:
        result = lint(marked, "marked", tokenizer=tokenizer, reference=original)
        for f in result.findings:
            if f.severity == ERROR:
                refuse(Refusal.LINT, f"lint {f.rule}: {f.message}")
    return problems


def _untrained_output(messages: list[dict], text: str, trained: list[bool], relaxed: bool) -> str | None:
    """The first piece of assistant output the render shows but leaves untrained, named; None when all is.

    Checked apart from the labels (which come from lint's turn finder): each assistant message's content and
    reasoning, found after the message before it, and each tool call's argument values and the name before
    them, found before the next message's text. Output the template doesn't print is not looked for."""
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            own = text_of(message.get("content"))
            if own and message.get("role") != "system" and (at := text.find(own, cursor)) >= 0:
                cursor = at + len(own)
            continue
        following = next((text_of(m.get("content")) for m in messages[i + 1:] if m.get("role") != "assistant"), "")
        forms = {following, json.dumps(following)[1:-1], json.dumps(following, ensure_ascii=False)[1:-1]}
        stop = min((at for form in forms if form and (at := text.find(form, cursor)) >= 0), default=len(text))
        pieces = [(key, value) for key in ("reasoning_content", "thinking", "content")
                  if (value := text_of(message.get(key)))]
        position = cursor
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            values = _argument_values(function.get("arguments"))
            found = [at for value in values if (at := text.find(value, position, stop)) >= 0]
            if not found:
                continue  # the template doesn't print this call
            name = str(function.get("name"))
            name_at = text.rfind(name, position, min(found))
            if name_at >= 0:
                pieces.append(("tool call name", name, name_at))
            for value in values:
                if (at := text.find(value, position, stop)) >= 0:
                    pieces.append(("tool call argument", value, at))
                    position = at + len(value)
        for piece in pieces:
            what, value = piece[0], piece[1]
            at = piece[2] if len(piece) == 3 else text.find(value, cursor)
            if at < 0:
                continue
            if not all(trained[k] or (relaxed and text[k].isspace()) for k in range(at, at + len(value))):
                return f"message {i}'s {what} {value[:40]!r} (character {at})"
    return None


def _argument_values(arguments) -> list[str]:
    """The texts a tool call's arguments show in any serialization: each value (of the object, or of the JSON
    string parsed), or the string itself when it is not a JSON object."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return [arguments] if arguments else []
        arguments = parsed if isinstance(parsed, dict) else {"": arguments}
    if not isinstance(arguments, dict):
        return []
    return [value if isinstance(value, str) else json.dumps(value) for value in arguments.values() if value != ""]
