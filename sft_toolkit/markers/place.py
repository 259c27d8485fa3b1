"""Place: generation blocks at the places in the source that emit only trained text (step 3 of `markers`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from jinja2 import nodes

from .source import Body, MarkerError, Piece, Statement, Tag, Template
from .trace import Trace


# The template is a tree of statement lists. In each list, every emitting piece and statement gets a
# signature over all traced renders: {T} only trained text, {U} only untrained, {} nothing (or only
# whitespace that may go either way), {T, U} both. Mixed ones are resolved: literal text is split between
# characters, a statement is entered, and code shared by all roles is duplicated under a role condition.
# Then each maximal run of {T} atoms (with {} atoms inside it) becomes one generation block.


@dataclass
class Placement:
    source: str
    blocks: int
    role_conditions: int


@dataclass(frozen=True)
class _Atom:
    kind: str          # "piece" | "chars" (part of a literal) | "head"/"tail" (of a split `{{ name }}`) | "stmt" |
                       # "done" (resolved inside) | "break"
    obj: object        # Piece | Statement
    sig: frozenset
    a: int = 0         # chars: [a, b) of the literal's text
    b: int = 0
    landmark: str = ""  # head/tail: the text the head ends with


# The namespace a converted template keeps its "this turn already wrote trained text" flag in (see `Placer`).
FLAG = "sft_toolkit_turn"
_ASSISTANT, _STARTED, _FRESH = frozenset({"assistant"}), frozenset({"assistant", "started"}), frozenset({"assistant", "fresh"})
_WHERE = {"assistant": lambda e: e.role == "assistant", "started": lambda e: e.started, "fresh": lambda e: not e.started}


class Placer:
    """Places the markers. Mixed code is resolved in up to two conditions, each a copy of the code marked for
    the renders it selects (`where`): the message's role, and, with `flags`, whether the assistant's turn
    already wrote trained text in this pass through the loop. The second is for formats whose turn is
    several messages, each with its own header (gpt-oss/harmony: `<|start|>assistant<|channel|>analysis...`
    then `<|start|>assistant<|channel|>final...`): the generation prompt writes the first header, the model
    the others, from the same code. The template keeps the flag in a namespace made at the start of each
    pass and set at each block's end (so a block that rendered nothing sets it too: verification checks the
    probes); nothing of it is printed."""

    def __init__(self, template: Template, traces: list[Trace], relaxed: bool, flags: bool = False):
        self.t, self.relaxed, self.flags = template, relaxed, flags
        self.by_piece: dict[int, list] = {}
        for trace in traces:
            for e in trace.emissions:
                self.by_piece.setdefault(e.piece, []).append((trace, e))
        self.fors = [s for s in _stmts(template.body) if isinstance(s.node, nodes.For)]
        self.blocks = self.role_conditions = 0
        self.flag_loops: set[int] = set()

    def place(self) -> Placement:
        edits = self._body(self.t.body.items, frozenset())
        for loop in sorted(self.flag_loops):  # a fresh flag at the start of each pass
            tag = self.fors[loop].open
            width = 2 + (1 if tag.rmod else 0)
            edits.append((tag.end - width, tag.end, f"%}}{{% set {FLAG} = namespace(started=false) {tag.rmod}%}}"))
        source = _apply(self.t.source, edits, 0, len(self.t.source))
        if self.flag_loops:  # every generation block in the source is ours
            source = re.sub(r"\{%([-+]?) endgeneration",
                            lambda m: f"{{%{m.group(1)} set {FLAG}.started = true %}}{{% endgeneration", source)
        return Placement(source, self.blocks, self.role_conditions)

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

    def _char_labels(self, piece: Piece, where) -> list[str] | None:
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

    def _stmt_pieces(self, stmt: Statement) -> list[int]:
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
        if isinstance(item, Statement):
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

    def _landmark(self, piece: Piece, where) -> str | None:
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
        pieces = self._stmt_pieces(item) if isinstance(item, Statement) else [p.id for p in self.t.exprs.get(item.id, [item])]
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
    items = items_or_body.items if isinstance(items_or_body, Body) else items_or_body
    for item in items:
        if isinstance(item, Statement):
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


def _left_mod(t: Template, pos: int, tag: Tag | None) -> str:
    if tag is not None and (tag.kind == "block" or tag.lmod == "-"):
        return tag.lmod
    return "+" if _lstrip_applies(t.source, pos) else ""


def _right_mod(t: Template, pos: int, tag: Tag | None) -> str:
    if tag is not None and (tag.kind == "block" or tag.rmod == "-"):
        return tag.rmod
    return "+" if t.source.startswith(("\n", "\r\n"), pos) else ""


def _edge(t: Template, item, side: str) -> tuple[int, str]:
    """Source position and whitespace modifier of an item's outer edge (for a condition around it)."""
    left = side == "left"
    tag = (item.open if left else item.close) if isinstance(item, Statement) else (None if item.kind == "data" else item.tag)
    pos = (tag.start if left else tag.end) if tag is not None else (item.start if left else item.end)
    return pos, (_left_mod(t, pos, tag) if left else _right_mod(t, pos, tag)) or "+"


def _boundary(t: Template, atom: _Atom, side: str, name: str) -> tuple[int, int, str]:
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
    if isinstance(obj, Statement):
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
