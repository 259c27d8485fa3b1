"""Conditions on the conversation that separate the renders in which the same code prints assistant output from
those in which it prints text the model is given (for `place`).

The generation prompt writes different text after different messages, so the same piece of an assistant
message's code can be the model's in one conversation and the prompt's in another: deepseek-v3 writes
`<｜Assistant｜>` in its generation prompt after a user message but not after tool results, where the model
writes it (the assistant message's code prints it in both); gemma4's generation prompt writes an empty
thought channel after a user message and nothing after a tool result; a template that prints an empty
message as a second `<｜Assistant｜>…<｜end▁of▁sentence｜>` after a tool-call turn has ended prints the same code
as part of the turn when the message has text. When the role of the message before this one, or whether this
message has text, tells the two apart on every probe, the code is duplicated under that condition and each
copy is marked for the renders it selects. Verification then checks every probe, as for any placement.

A condition is named by a string kept in the placer's `where` set: `previous=<role>` (the message the loop
went through before this one has that role; the template keeps the answer in `sft_toolkit_after_<role>`, set
from `loop.previtem` at the start of each pass, so that no test of a generation block names another role
than the assistant's), `content` (the message's `content` is truthy), each also negated with `not `.
"""

from __future__ import annotations

from .atoms import MIXED
from .boundaries import edge
from .source import Piece

NOT = "not "


def holds(name: str, emission) -> bool:
    """Whether the condition `name` holds where `emission` was printed."""
    if name.startswith(NOT):
        return not holds(name[len(NOT) :], emission)
    if name.startswith("previous="):
        return emission.previous_role == name[len("previous=") :]
    if name == "content":
        return emission.has_content
    raise ValueError(name)


def candidates(emissions: list, where: frozenset) -> list[str]:
    """The conditions worth trying on these emissions: each splits them in two and is not yet decided in
    `where`. Previous roles first (sorted, so placement is deterministic), then content."""
    decided = {name[len(NOT) :] if name.startswith(NOT) else name for name in where}
    roles = sorted(
        {e.previous_role for e in emissions if e.previous_role is not None and e.previous_role.isidentifier()}
    )
    names = [f"previous={role}" for role in roles] + ["content"]
    return [name for name in names if name not in decided and len({holds(name, e) for e in emissions}) == 2]


def jinja(name: str, loop_var: str) -> str:
    """The condition as a jinja test inside the loop over messages whose variable is `loop_var`."""
    if name.startswith(NOT):
        return f"not ({jinja(name[len(NOT) :], loop_var)})"
    if name.startswith("previous="):
        return _after(name)
    if name == "content":
        return f"{loop_var}.content"
    raise ValueError(name)


def loop_start(names: set[str]) -> list[str]:
    """The statements the start of each pass through the loop runs for the conditions `names` use."""
    return [
        f"set {_after(name)} = (loop.previtem or {{}}).role == '{name[len('previous=') :]}'"
        for name in sorted(names)
        if name.startswith("previous=")
    ]


def _after(name: str) -> str:
    return f"sft_toolkit_after_{name[len('previous=') :]}"


class ConditionSplits:
    """The `Placer`'s part that duplicates a `{{ }}` under a condition (it owns `_emissions`, `_signature`,
    `_char_labels`, `_copy`, `template`, `fors` and `loop_conditions`)."""

    def _conditions(self, item, where) -> list[str]:
        """The `conditions` that split the renders of a `{{ }}` (inside the assistant's copy) in two."""
        if "assistant" not in where or not isinstance(item, Piece):
            return []
        emissions = [e for _, e in self._emissions([p.id for p in self.template.exprs.get(item.id, [item])], where)]
        if len({e.loop for e in emissions}) != 1:
            return []
        # Conditions that leave every piece consistent on both sides first, so that one condition does.
        return sorted(candidates(emissions, where), key=lambda name: not self._separates(item, where, name))

    def _separates(self, item, where, name: str) -> bool:
        return all(
            self._signature([piece.id], side) != MIXED or self._char_labels(piece, side) is not None
            for side in (where | {name}, where | {NOT + name})
            for piece in self.template.exprs.get(item.id, [item])
            if piece.text is not None or self._signature([piece.id], side) != MIXED
        )

    def _on_condition(self, item, where, name: str) -> tuple[int, int, str]:
        """`{% if <condition> %}copy marked for it{% else %}copy marked for its negation{% endif %}`."""
        loop = next(
            e.loop for _, e in self._emissions([p.id for p in self.template.exprs.get(item.id, [item])], where)
        )
        start, left_modifier = edge(self.template, item, "left")
        end, right_modifier = edge(self.template, item, "right")
        holds = self._copy(item, where | {name}, start, end)
        fails = self._copy(item, where | {NOT + name}, start, end)
        self.loop_conditions.setdefault(loop, set()).add(name)
        test = jinja(name, self.fors[loop].loop_var)
        return (
            start,
            end,
            f"{{%{left_modifier} if {test} +%}}{holds}{{%+ else +%}}{fails}{{%+ endif {right_modifier}%}}",
        )
