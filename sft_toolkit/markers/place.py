"""Place: generation blocks at the places in the source that emit only trained text (step 3 of `markers`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from jinja2 import nodes

from . import conditions
from .atoms import ASSIGNMENT, MIXED, RESOLVED_INSIDE, TRAINED_ONLY, Atom, AtomKind
from .boundaries import apply_edits, boundary, edge
from .errors import MarkerError
from .label import Label
from .neighbours import AFTER_ASSISTANT, after_assistant, previous_role_condition
from .refusals import assembled_whole
from .source import Body, Piece, PieceKind, Statement, Template
from .trace import Trace

# The template is a tree of statement lists. In each list, every emitting piece and statement gets a
# signature over all traced renders (a set of `Label`s): {TRAINED} only trained text, {UNTRAINED} only
# untrained, {} nothing (or only whitespace that may go either way), {TRAINED, UNTRAINED} both. Mixed ones are
# resolved: literal text is split between characters, a statement is entered, and code shared by all roles is
# duplicated under a role condition. Then each maximal run of {TRAINED} atoms (with {} atoms inside it) becomes
# one generation block.


@dataclass
class Placement:
    source: str
    blocks: int
    role_conditions: int


# The namespace a converted template keeps its "this turn already wrote trained text" flag in (see `Placer`).
FLAG = "sft_toolkit_turn"
_ASSISTANT, _STARTED, _FRESH = (
    frozenset({"assistant"}),
    frozenset({"assistant", "started"}),
    frozenset({"assistant", "fresh"}),
)
_WHERE = {
    "assistant": lambda e: e.role == "assistant",
    "started": lambda e: e.started,
    "fresh": lambda e: not e.started,
    AFTER_ASSISTANT: after_assistant,
}


class Placer(conditions.ConditionSplits):
    """Places the markers. Mixed code is resolved in up to two conditions, each a copy of the code marked for
    the renders it selects (`where`): the message's role, and, with `flags`, whether the assistant's turn
    already wrote trained text in this pass through the loop. The second is for formats whose turn is
    several messages, each with its own header (gpt-oss/harmony: `<|start|>assistant<|channel|>analysis...`
    then `<|start|>assistant<|channel|>final...`): the generation prompt writes the first header, the model
    the others, from the same code. The template keeps the flag in a namespace made at the start of each
    pass and set at each block's end (so a block that rendered nothing sets it too: verification checks the
    probes); nothing of it is printed."""

    def __init__(self, template: Template, traces: list[Trace], relaxed: bool, flags: bool = False):
        self.template, self.relaxed, self.flags = template, relaxed, flags
        self.by_piece: dict[int, list] = {}
        for trace in traces:
            for e in trace.emissions:
                self.by_piece.setdefault(e.piece, []).append((trace, e))
        self.fors = [s for s in _stmts(template.body) if isinstance(s.node, nodes.For)]
        self.blocks = self.role_conditions = 0
        self.flag_loops: set[int] = set()
        self.inner_errors: dict[int, MarkerError] = {}  # statements whose inside couldn't be marked: why
        self.loop_conditions: dict[int, set[str]] = {}  # loop -> the `conditions` used in it

    def place(self) -> Placement:
        edits = self._body(self.template.body.items, frozenset())
        for loop in sorted(self.flag_loops | set(self.loop_conditions)):  # a fresh flag at the start of each pass
            tag = self.fors[loop].open
            width = 2 + (1 if tag.right_modifier else 0)
            sets = [f"set {FLAG} = namespace(started=false)"] if loop in self.flag_loops else []
            sets += conditions.loop_start(self.loop_conditions.get(loop, set()))
            edits.append(
                (tag.end - width, tag.end, "%}" + "%}".join(f"{{% {st} " for st in sets) + f"{tag.right_modifier}%}}")
            )
        source = apply_edits(self.template.source, edits, 0, len(self.template.source))
        if self.flag_loops:  # every generation block in the source is ours
            source = re.sub(
                r"\{%([-+]?) endgeneration",
                lambda m: f"{{%{m.group(1)} set {FLAG}.started = true %}}{{% endgeneration",
                source,
            )
        return Placement(source, self.blocks, self.role_conditions)

    # What pieces emitted -------------------------------------------------------------------------------
    def _emissions(self, pieces, where):
        for pid in pieces:
            for trace, e in self.by_piece.get(pid, []):
                if all(_WHERE[name](e) if name in _WHERE else conditions.holds(name, e) for name in where):
                    yield trace, e

    def _signature(self, pieces, where, prefill=False) -> frozenset:
        """The labels the pieces emit. Pre-filled text (p) follows the rest unless `prefill` asks to see it:
        untrained beside untrained text, trained otherwise (as TRL's training templates train a pre-filled
        `<think>` block)."""
        signature = {_label(trace, e, i) for trace, e in self._emissions(pieces, where) for i in range(e.start, e.end)}
        signature.discard(Label.EITHER)
        if Label.PREFILL in signature and not prefill:
            signature.discard(Label.PREFILL)
            signature = signature or {Label.TRAINED}
        return frozenset(signature)

    def _char_labels(self, piece: Piece, where) -> list[str] | None:
        """One label per character of a literal, or None when renders disagree. In relaxed mode a whitespace
        character that is trained in some renders and not in others (a separator the template shares with
        the role header) stays untrained. Whitespace that may go either way (after an end-of-turn) is trained
        only between trained characters."""
        labels, forced = [Label.EITHER] * len(piece.text), set()
        for trace, e in self._emissions([piece.id], where):
            for k in range(len(piece.text)):
                label = _label(trace, e, e.start + k)
                if (
                    label == Label.EITHER
                    or labels[k] == label
                    or (label == Label.PREFILL and labels[k] != Label.EITHER)
                ):
                    continue
                if labels[k] in (Label.EITHER, Label.PREFILL):
                    labels[k] = label
                elif self.relaxed and piece.text[k].isspace():
                    forced.add(k)
                else:
                    return None
        for k in forced:
            labels[k] = Label.UNTRAINED
        labels = [Label.TRAINED if label == Label.PREFILL else label for label in labels]
        for start, end, label in _label_runs(labels):
            if label == Label.EITHER:
                inside = (
                    start > 0
                    and end < len(labels)
                    and labels[start - 1] == Label.TRAINED
                    and labels[end] == Label.TRAINED
                )
                labels[start:end] = [Label.TRAINED if inside else Label.UNTRAINED] * (end - start)
        return labels

    def _stmt_pieces(self, stmt: Statement) -> list[int]:
        return [p.id for p in self.template.pieces if stmt.open.start <= p.start and p.end <= stmt.close.end]

    # The walk ------------------------------------------------------------------------------------------
    def _body(self, items, where: frozenset) -> list:
        """Edits that mark one statement list; raises MarkerError when it can't be done."""
        atoms, edits = [], []
        for item in items:
            resolved = self._resolve(item, where, edits)
            if resolved is None:
                try:
                    edits.append(self._role_condition(item) if not where else self._split(item, where))
                except MarkerError as err:  # what defeated the code inside says more than the whole statement
                    raise self.inner_errors.get(id(item), err) from None
                atoms.append(Atom(AtomKind.RESOLVED, item, RESOLVED_INSIDE))
            else:
                atoms += resolved
        return edits + self._runs(atoms)

    def _resolve(self, item, where, edits) -> list[Atom] | None:
        """The item's atoms with their signatures, mixed ones resolved; None when only a condition can."""
        if isinstance(item, Statement):
            signature = self._signature(self._stmt_pieces(item), where)
            if isinstance(item.node, (nodes.Assign, nodes.AssignBlock, nodes.Macro)) and not signature:
                return [Atom(AtomKind.ASSIGNMENT, item, ASSIGNMENT)]  # a `set` inside a block is not seen after it
            if signature != MIXED:
                return [Atom(AtomKind.STATEMENT, item, signature)]
            if not item.bodies:
                return None
            try:
                inner = [e for body in item.bodies for e in self._body(body.items, where)]
            except MarkerError as err:
                if where:  # statements are conditioned on the role only
                    raise
                self.inner_errors[id(item)] = err
                return None
            edits += inner
            return [Atom(AtomKind.RESOLVED, item, RESOLVED_INSIDE)]
        atoms = []
        for piece in self.template.exprs.get(item.id, [item]):
            signature = self._signature([piece.id], where)
            splittable = piece.text is not None and self._signature([piece.id], where, prefill=True) & {
                Label.TRAINED,
                Label.PREFILL,
            }
            labels = self._char_labels(piece, where) if splittable else None
            if signature != MIXED and not (labels and Label.UNTRAINED in labels):
                # (a trained literal that ends in whitespace after an end-of-turn is split all the same)
                atoms.append(Atom(AtomKind.PIECE, piece, signature))
                continue
            if labels is None:
                landmark = (
                    self._landmark(piece, where) if piece.variable or piece.kind == PieceKind.EXPRESSION else None
                )
                if landmark:
                    atoms += [
                        Atom(AtomKind.HEAD, piece, frozenset({Label.UNTRAINED}), landmark=landmark),
                        Atom(AtomKind.TAIL, piece, TRAINED_ONLY, landmark=landmark),
                    ]
                    continue
                if not where or (self.flags and where == _ASSISTANT) or self._conditions(item, where):
                    return None
                if piece.variable:
                    raise MarkerError(
                        f"the turn is assembled in the variable `{piece.variable}` and printed in one "
                        "piece; markers can only go where its parts are printed",
                        piece.line,
                    )
                raise MarkerError(
                    "the same code prints assistant output in some conversations and text the model "
                    "is given in others (e.g. a reasoning block the generation prompt pre-fills), "
                    "so no fixed place for a marker exists",
                    piece.line,
                )
            atoms += [
                Atom(AtomKind.CHARACTERS, piece, frozenset({label}), start, end)
                for start, end, label in _label_runs(labels)
            ]
        return atoms

    def _landmark(self, piece: Piece, where) -> str | None:
        """For `{{ name }}` printing a turn assembled elsewhere (llama 3.0: `set content = header + text + eot`):
        text that ends the untrained head of every emission and first occurs there, so the print can be split
        at `name.find(landmark) + len(landmark)`. The longest such text (the whole role header) is taken. A
        split renders the same bytes wherever it falls; verification checks that it falls right."""
        heads = []
        for trace, e in self._emissions([piece.id], where):
            labels, text = trace.labels[e.start : e.end], trace.text[e.start : e.end]
            first = labels.find(Label.TRAINED)
            if (
                first <= 0
                or set(labels[:first]) - {Label.UNTRAINED, Label.PREFILL}
                or Label.UNTRAINED in labels[first:]
            ):
                return None
            heads.append((text, first))
        if not heads:
            return None
        size = min(k for _, k in heads)
        while size and len({text[k - size : k] for text, k in heads}) > 1:
            size -= 1
        for n in range(size, 0, -1):
            landmark = heads[0][0][heads[0][1] - n : heads[0][1]]
            if all(text.find(landmark) + n == k for text, k in heads):
                return landmark
        return None

    def _role_condition(self, item) -> tuple[int, int, str]:
        """`{% if m.role == 'assistant' %}marked copy{% else %}original{% endif %}` around a whole item; or, for
        code that prints a message's end-of-turn in the next message's pass, a condition on the previous
        message's role (see `neighbours`)."""
        pieces = (
            self._stmt_pieces(item)
            if isinstance(item, Statement)
            else [p.id for p in self.template.exprs.get(item.id, [item])]
        )
        emissions = list(self._emissions(pieces, frozenset()))
        loops = {e.loop for _, e in emissions}
        line = item.line
        if (
            not emissions
            or None in loops
            or len(loops) != 1
            or any(
                trace.labels[i] == Label.TRAINED
                for trace, e in emissions
                if e.role != "assistant"
                for i in range(e.start, e.end)
            )
        ):
            if condition := previous_role_condition(emissions, self.fors, item, self.template.source):
                return self._conditioned(item, condition, frozenset({AFTER_ASSISTANT}))
            if not emissions or None in loops or len(loops) != 1:
                raise assembled_whole(item, self.template.source) or MarkerError(
                    "assistant output and other text come from the same code here, outside a "
                    "`for message in messages` loop, so it can't be conditioned on the role",
                    line,
                )
            raise MarkerError("this code trains text of non-assistant messages", line)
        return self._conditioned(item, f"{self.fors[loops.pop()].loop_var}.role == 'assistant'", _ASSISTANT)

    def _conditioned(self, item, condition: str, where: frozenset) -> tuple[int, int, str]:
        """`{% if <condition> %}copy marked for the renders `where` selects{% else %}original{% endif %}`."""
        start, left_modifier = edge(self.template, item, "left")
        end, right_modifier = edge(self.template, item, "right")
        marked = self._copy(item, where, start, end)
        self.role_conditions += 1
        return (
            start,
            end,
            f"{{%{left_modifier} if {condition} +%}}{marked}{{%+ else +%}}"
            f"{self.template.source[start:end]}{{%+ endif {right_modifier}%}}",
        )

    def _turn_condition(self, item) -> tuple[int, int, str]:
        """`{% if <flag>.started %}copy marked for later messages of a turn{% else %}copy for its first{% endif %}`
        around one `{{ }}` of an assistant message (see the class docstring)."""
        emissions = list(self._emissions([p.id for p in self.template.exprs.get(item.id, [item])], _ASSISTANT))
        loops = {e.loop for _, e in emissions}
        if None in loops or len(loops) != 1 or len({e.started for _, e in emissions}) != 2:
            raise MarkerError(
                "the same code prints assistant output in some conversations and text the model is "
                "given in others, and whether the turn has begun doesn't tell which",
                item.line,
            )
        start, left_modifier = edge(self.template, item, "left")
        end, right_modifier = edge(self.template, item, "right")
        self.flag_loops.add(loops.pop())
        return (
            start,
            end,
            f"{{%{left_modifier} if {FLAG}.started +%}}{self._copy(item, _STARTED, start, end)}{{%+ else +%}}"
            f"{self._copy(item, _FRESH, start, end)}{{%+ endif {right_modifier}%}}",
        )

    def _split(self, item, where) -> tuple[int, int, str]:
        """A `{{ }}` that prints the model's text in some renders of the assistant's copy and given text in
        others, duplicated under the first condition that separates them: whether the turn has begun (with
        `flags`), then the `conditions` on the conversation. Raises the first condition's failure."""
        errors = []
        if self.flags and where == _ASSISTANT:
            try:
                return self._turn_condition(item)
            except MarkerError as err:
                errors.append(err)
        for name in self._conditions(item, where):
            try:
                return self._on_condition(item, where, name)
            except MarkerError as err:
                errors.append(err)
        raise errors[0]

    def _copy(self, item, where: frozenset, start: int, end: int) -> str:
        """The item's source marked for the renders `where` selects, to sit inside a condition's branch."""
        marked = apply_edits(self.template.source, self._body([item], where), start, end)
        # Inside the copy the neighbours are the condition's own tags, so no `+` is needed at its edges.
        marked = re.sub(r"\A\{%\+ generation", "{% generation", marked)
        return re.sub(r"endgeneration \+%\}\Z", "endgeneration %}", marked)

    def _runs(self, atoms: list[Atom]) -> list:
        """One generation block per maximal run of trained atoms; silent atoms join runs but never end them."""
        edits, run = [], []

        def close():
            while run and run[-1].signature != TRAINED_ONLY:
                run.pop()
            if run:
                edits.append(boundary(self.template, run[0], "left", "generation"))
                edits.append(boundary(self.template, run[-1], "right", "endgeneration"))
                self.blocks += 1
            run.clear()

        for atom in atoms:
            if atom.signature == TRAINED_ONLY or (not atom.signature and run):
                run.append(atom)
            elif atom.signature:
                close()
        close()
        return edits


def _label(trace: Trace, emission, i: int) -> Label:
    """The label of output character i, where text that may go either way (a tool-call turn's closing markup)
    printed by another message's code goes either way untrained: the next message's header is never trained."""
    label = trace.labels[i]
    return Label.EITHER if label == Label.PREFILL and emission.role not in (None, "assistant") else label


def _stmts(items_or_body):
    items = items_or_body.items if isinstance(items_or_body, Body) else items_or_body
    for item in items:
        if isinstance(item, Statement):
            yield item
            for body in item.bodies:
                yield from _stmts(body)


def _label_runs(labels: list[str]) -> list[tuple[int, int, str]]:
    out, start = [], 0
    for k in range(1, len(labels) + 1):
        if k == len(labels) or labels[k] != labels[start]:
            out.append((start, k, labels[start]))
            start = k
    return out
